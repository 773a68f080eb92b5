//! deploy/compose.yaml, its mirror.compose.toml and .env.example: what is mounted where, the
//! configuration that names those mounts, `docker-compose config`, and the service started with
//! a certificate and users made as the README makes them. deploy/compose.cluster.yaml with its
//! mirror.cluster.toml, garage.toml, nginx.conf and cluster.env.example: each replica's
//! configuration as compose would make it, loaded, and agreeing with Garage, Redis and nginx
//! (each replica its own service on the compose network, the bucket over plain HTTP only with
//! `storage.s3.allow_http`); `docker-compose config` and its resolved file, `nginx -t` (on a copy
//! whose upstream names are loopback: nginx resolves them as it loads).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::docker::{image_entrypoint, image_healthcheck};
use crate::mirror::{assert_serves_v2, status, wait_ready, Mirror, Mounts};
use crate::{array_at, load_config, read, repo, run_ok, str_at, tool, yaml, CONFIG, DATA_DIR};

fn compose_service() -> Value {
    let compose = yaml("deploy/compose.yaml");
    compose
        .pointer("/services/regmirror")
        .cloned()
        .expect("a service named regmirror")
}

/// `(source, target, read_only)` of each short-syntax volume of the service.
fn compose_volumes(service: &Value) -> Vec<(String, String, bool)> {
    array_at(service, "/volumes")
        .iter()
        .map(|v| {
            let parts: Vec<&str> = v
                .as_str()
                .expect("short volume syntax")
                .split(':')
                .collect();
            (
                parts[0].to_owned(),
                parts[1].to_owned(),
                parts.get(2) == Some(&"ro"),
            )
        })
        .collect()
}

/// The `KEY=VALUE` lines of `.env.example`, commented out or not.
fn env_example() -> Vec<(String, String)> {
    read("deploy/.env.example")
        .lines()
        .filter_map(|l| l.trim_start_matches(['#', ' ']).split_once('='))
        .filter(|(k, _)| !k.contains(' '))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[test]
fn compose_file_mounts_what_its_config_names() {
    let service = compose_service();
    assert_eq!(
        str_at(&service, "/build/context"),
        "..",
        "the build context is the repository root"
    );
    assert_eq!(str_at(&service, "/build/dockerfile"), "deploy/Dockerfile");
    assert!(["always", "unless-stopped"].contains(&str_at(&service, "/restart")));
    assert_eq!(str_at(&service, "/env_file"), ".env");
    assert!(array_at(&service, "/ports")
        .iter()
        .any(|p| p.as_str().is_some_and(|p| p.ends_with(":5000"))));
    let check: Vec<&str> = array_at(&service, "/healthcheck/test")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        check[0] == "CMD" && check.contains(&"https://127.0.0.1:5000/readyz"),
        "{check:?}"
    );

    let volumes = compose_volumes(&service);
    let source_of = |target: &str| {
        volumes
            .iter()
            .find(|(_, t, _)| t == target)
            .unwrap_or_else(|| panic!("nothing is mounted at {target}: {volumes:?}"))
    };
    let (config_file, _, ro) = source_of(CONFIG);
    assert!(*ro, "the configuration is mounted read-only");
    let config = load_config(&read(&format!("deploy/{config_file}")), &[]);
    assert_eq!(config.data_dir, Path::new(DATA_DIR));
    assert_eq!(config.listen.port(), 5000);
    let (data, _, _) = source_of(DATA_DIR);
    assert!(
        yaml("deploy/compose.yaml")
            .pointer(&format!("/volumes/{data}"))
            .is_some(),
        "{data}: a named volume"
    );
    // The files the configuration names are inside read-only mounts of ./certs and ./auth.
    let named = [
        config.tls.cert.clone(),
        config.tls.key.clone(),
        config.auth.htpasswd.clone(),
    ];
    for (path, dir) in named.iter().zip(["./certs", "./certs", "./auth"]) {
        let path = path
            .as_ref()
            .expect("TLS and htpasswd are configured")
            .display()
            .to_string();
        assert!(
            volumes
                .iter()
                .any(|(s, t, ro)| s == dir && *ro && path.starts_with(&format!("{t}/"))),
            "{path} is not in a read-only mount of {dir}: {volumes:?}"
        );
    }
    // Uncommented, .env.example's variables are config keys: an unknown one would stop the mirror.
    let env = env_example();
    assert!(
        env.iter().any(|(k, _)| k == "REGMIRROR_UPSTREAM_PASSWORD"),
        "{env:?}"
    );
    let with_env = load_config(&read(&format!("deploy/{config_file}")), &env);
    assert!(with_env.upstream.username.is_some());
}

#[test]
fn compose_file_passes_docker_compose_config() {
    let Some(compose) = tool("docker-compose") else {
        return;
    };
    // A copy with the .env that the README has one make, under a parent for `context: ..`.
    let dir = tempfile::tempdir().unwrap();
    let deploy = dir.path().join("deploy");
    std::fs::create_dir(&deploy).unwrap();
    for file in ["compose.yaml", "mirror.compose.toml"] {
        std::fs::copy(repo(&format!("deploy/{file}")), deploy.join(file)).unwrap();
    }
    std::fs::copy(repo("deploy/.env.example"), deploy.join(".env")).unwrap();
    run_ok(
        Command::new(compose)
            .current_dir(&deploy)
            .args(["-f", "compose.yaml", "config", "-q"]),
    );
}

#[tokio::test]
async fn compose_service_serves_https_to_its_users() {
    let (Some(openssl), Some(htpasswd)) = (tool("openssl"), tool("htpasswd")) else {
        return;
    };
    let service = compose_service();
    let dir = tempfile::tempdir().unwrap();
    let mut pairs = Vec::new();
    for (source, target, _) in compose_volumes(&service) {
        let host = match source.strip_prefix("./") {
            Some(rel) => dir.path().join(rel),
            None => dir.path().join("volumes").join(&source),
        };
        pairs.push((target, host));
    }
    let mounts = Mounts::new(pairs);
    // The mounted configuration, its container paths pointing into the temp dir.
    let config_source = compose_volumes(&service)
        .into_iter()
        .find(|(_, t, _)| t == CONFIG)
        .unwrap()
        .0;
    let text = mounts.map_toml(&read(&format!("deploy/{config_source}")));
    std::fs::write(mounts.map(CONFIG), &text).unwrap();
    let config = load_config(&text, &[]);
    // Certificate and users as the README's "Deploying with TLS and users" makes them.
    let (cert, key) = (config.tls.cert.unwrap(), config.tls.key.unwrap());
    std::fs::create_dir_all(cert.parent().unwrap()).unwrap();
    run_ok(
        Command::new(openssl)
            .args(["req", "-newkey", "rsa:2048", "-nodes", "-sha256", "-keyout"])
            .arg(&key)
            .args([
                "-x509",
                "-days",
                "1",
                "-subj",
                "/CN=mirror.example",
                "-addext",
                "subjectAltName=DNS:mirror.example",
                "-out",
            ])
            .arg(&cert),
    );
    let users = config.auth.htpasswd.unwrap();
    std::fs::create_dir_all(users.parent().unwrap()).unwrap();
    let (line, _) = run_ok(Command::new(htpasswd).args(["-Bbn", "moby", "gordon"]));
    std::fs::write(&users, line).unwrap();

    let mut mirror = Mirror::start(&image_entrypoint(), &mounts, &[]);
    let base = format!("https://{}", mirror.addr);
    assert_eq!(
        status(&format!("{base}/v2/"), None).await,
        401,
        "users are required"
    );
    assert_serves_v2(&base, Some(("moby", "gordon"))).await;
    if tool("curl").is_some() {
        // Without credentials, as the health check asks.
        wait_ready(&base).await;
        let check: Vec<String> = array_at(&service, "/healthcheck/test")[1..]
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        mirror.run_check(&check);
        mirror.run_check(&["sh".into(), "-c".into(), image_healthcheck()]);
    }
    // `docker compose kill -s HUP`: the certificate is reloaded, the mirror keeps serving.
    mirror.signal("HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_serves_v2(&base, Some(("moby", "gordon"))).await;
    let exit = mirror.terminate(Duration::from_secs(15)).await;
    assert!(
        exit.is_some_and(|s| s.success()),
        "SIGTERM: {exit:?}; log:\n{}",
        mirror.log()
    );
}

/// The variables `cluster.env.example` sets (uncommented lines).
fn cluster_env_example() -> Vec<(String, String)> {
    read("deploy/cluster.env.example")
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// `s` with compose's interpolation done: `${VAR}`, `${VAR:?err}`, `${VAR:-default}`, `$$`.
fn interpolate(s: &str, vars: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at + 1..];
        if let Some(r) = rest.strip_prefix('$') {
            out.push('$');
            rest = r;
            continue;
        }
        let (expr, after) = rest
            .strip_prefix('{')
            .and_then(|r| r.split_once('}'))
            .unwrap_or_else(|| panic!("{s}: write variables as ${{NAME}}"));
        rest = after;
        let name_end = expr
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(expr.len());
        let (name, op) = expr.split_at(name_end);
        let value = vars
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str());
        match (value.filter(|v| !v.is_empty()), op.strip_prefix(":-")) {
            (Some(v), _) => out.push_str(v),
            (None, Some(default)) => out.push_str(default),
            (None, None) => panic!("{s}: ${{{name}}} is not set by cluster.env.example ({op})"),
        }
    }
    out.push_str(rest);
    out
}

/// Every string of `v` interpolated.
fn interpolate_all(v: &mut Value, vars: &[(String, String)]) {
    match v {
        Value::String(s) => *s = interpolate(s, vars),
        Value::Array(a) => a.iter_mut().for_each(|v| interpolate_all(v, vars)),
        Value::Object(o) => o.values_mut().for_each(|v| interpolate_all(v, vars)),
        _ => {}
    }
}

/// deploy/compose.cluster.yaml as compose reads it with `--env-file cluster.env` made from
/// the example: YAML merge keys applied, variables interpolated, `x-` fields left out.
fn compose_cluster() -> Value {
    let mut doc: serde_norway::Value =
        serde_norway::from_str(&read("deploy/compose.cluster.yaml")).unwrap();
    doc.apply_merge().unwrap();
    let mut v = serde_json::to_value(doc).unwrap();
    v.as_object_mut()
        .unwrap()
        .retain(|k, _| !k.starts_with("x-"));
    interpolate_all(&mut v, &cluster_env_example());
    v
}

/// A service's `environment` mapping as pairs.
fn compose_env(service: &Value) -> Vec<(String, String)> {
    service["environment"]
        .as_object()
        .expect("environment as a mapping")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().expect("a string").to_owned()))
        .collect()
}

fn env_value<'a>(env: &'a [(String, String)], name: &str) -> &'a str {
    env.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("{name} is not set: {env:?}"))
}

/// `host:port` (or `[v6]:port`) split at its last colon.
fn host_port(addr: &str) -> (&str, u16) {
    let (host, port) = addr.rsplit_once(':').unwrap();
    (host, port.parse().unwrap())
}

/// The `(host, port)` of each `server` of nginx.conf's upstream blocks.
fn nginx_upstreams(conf: &str) -> Vec<(String, u16)> {
    conf.lines()
        .filter_map(|l| l.trim().strip_prefix("server "))
        .filter(|l| !l.starts_with('{')) // the server block, not an upstream server
        .map(|l| {
            let (host, port) =
                host_port(l.split_whitespace().next().unwrap().trim_end_matches(';'));
            (host.to_owned(), port)
        })
        .collect()
}

/// The services named `regmirror*`, as `(name, service)`.
fn cluster_replicas(compose: &Value) -> Vec<(String, Value)> {
    compose["services"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(name, _)| name.starts_with("regmirror"))
        .map(|(name, s)| (name.clone(), s.clone()))
        .collect()
}

#[test]
fn compose_cluster_replicas_share_one_bucket_and_redis() {
    let compose = compose_cluster();
    let services = compose["services"].as_object().unwrap();
    let garage = &services["garage"];
    let redis = &services["redis"];
    let nginx = &services["nginx"];
    assert_eq!(str_at(garage, "/image"), "dxflrs/garage:v2.5.0");
    assert!(str_at(redis, "/image").starts_with("redis:7"));
    // Every service on the compose network, in a namespace of its own; nginx's port alone is
    // published.
    for (name, service) in services {
        assert!(
            service.get("network_mode").is_none(),
            "{name}: on the compose network"
        );
        if name != "nginx" {
            assert!(
                service.get("ports").is_none(),
                "{name}: nothing published to the host"
            );
        }
    }

    // Garage: its S3 API bound on the compose network (not published), no secret in its file.
    let garage_volumes = compose_volumes(garage);
    let garage_file = &garage_volumes
        .iter()
        .find(|(_, t, _)| t == "/etc/garage.toml")
        .expect("garage.toml mounted")
        .0;
    let garage_toml: toml::Table = toml::from_str(&read(&format!("deploy/{garage_file}"))).unwrap();
    assert_eq!(garage_toml["replication_factor"].as_integer(), Some(1));
    assert!(
        garage_toml.get("rpc_secret").is_none(),
        "the RPC secret comes from the environment"
    );
    let garage_env = compose_env(garage);
    env_value(&garage_env, "GARAGE_RPC_SECRET");
    let (s3_host, s3_port) = host_port(garage_toml["s3_api"]["api_bind_addr"].as_str().unwrap());
    assert!(
        s3_host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_unspecified()),
        "Garage's S3 API on every interface of its container, so on the compose network: {s3_host}"
    );
    let s3_region = garage_toml["s3_api"]["s3_region"].as_str().unwrap();

    // Redis: the password it requires.
    let redis_args: Vec<&str> = array_at(redis, "/command")
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let redis_password = redis_args
        .windows(2)
        .find(|w| w[0] == "--requirepass")
        .map(|w| w[1])
        .expect("Redis requires a password");

    // The replicas.
    let replicas = cluster_replicas(&compose);
    assert_eq!(replicas.len(), 3, "three replicas");
    let mut reached = Vec::new();
    let mut advertised = Vec::new();
    let mut data_volumes = Vec::new();
    for (name, service) in &replicas {
        assert_eq!(str_at(service, "/build/context"), "..", "{name}");
        assert_eq!(str_at(service, "/build/dockerfile"), "deploy/Dockerfile");
        assert!(["always", "unless-stopped"].contains(&str_at(service, "/restart")));
        assert_eq!(service["read_only"], true, "{name}");
        let volumes = compose_volumes(service);
        let (config_file, _, ro) = volumes
            .iter()
            .find(|(_, t, _)| t == CONFIG)
            .unwrap_or_else(|| panic!("{name}: nothing at {CONFIG}"));
        assert!(*ro, "{name}: the configuration is mounted read-only");
        assert_eq!(
            config_file, "./mirror.cluster.toml",
            "{name}: one configuration for all"
        );
        let (data, _, _) = volumes
            .iter()
            .find(|(_, t, _)| t == DATA_DIR)
            .unwrap_or_else(|| panic!("{name}: nothing at {DATA_DIR}"));
        assert!(
            compose.pointer(&format!("/volumes/{data}")).is_some(),
            "{data}: a named volume"
        );
        data_volumes.push(data.clone());

        let env = compose_env(service);
        let text = read("deploy/mirror.cluster.toml");
        let config = load_config(&text, &env);
        assert_eq!(config.data_dir, Path::new(DATA_DIR));
        assert_eq!(config.storage.backend, regmirror::config::Backend::S3);
        let s3 = &config.storage.s3;
        let endpoint = s3.endpoint.as_ref().expect("storage.s3.endpoint");
        assert_eq!(
            (endpoint.scheme(), endpoint.host_str(), endpoint.port()),
            ("http", Some("garage"), Some(s3_port)),
            "{name}: {endpoint} is not Garage's service and S3 port ({s3_port})"
        );
        assert!(
            s3.allow_http,
            "{name}: plain HTTP to Garage, not loopback, is asked for"
        );
        assert!(
            config
                .storage
                .warnings()
                .iter()
                .any(|w| w.contains("plain HTTP")),
            "{name}: and warned about at start"
        );
        // Without allow_http the same configuration is refused.
        let mut refused = env.clone();
        refused.push(("REGMIRROR_STORAGE_S3_ALLOW_HTTP".into(), "false".into()));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mirror.toml");
        std::fs::write(&file, &text).unwrap();
        let err = regmirror::config::load(Some(&file), refused, &Default::default())
            .expect_err("plain HTTP to garage without allow_http")
            .to_string();
        assert!(err.contains("allow_http"), "{err}");
        assert_eq!(
            s3.bucket.as_deref(),
            Some(env_value(&garage_env, "GARAGE_DEFAULT_BUCKET"))
        );
        assert_eq!(s3.region, s3_region, "Garage's s3_region");
        assert!(s3.path_style, "Garage addresses buckets by path");
        assert_eq!(
            s3.access_key_id.as_ref().map(|k| k.expose()),
            Some(env_value(&garage_env, "GARAGE_DEFAULT_ACCESS_KEY"))
        );
        assert_eq!(
            s3.secret_access_key.as_ref().map(|k| k.expose()),
            Some(env_value(&garage_env, "GARAGE_DEFAULT_SECRET_KEY"))
        );
        let redis_url = url::Url::parse(
            config
                .cluster
                .redis
                .as_ref()
                .expect("cluster.redis")
                .expose(),
        )
        .unwrap();
        assert_eq!(redis_url.host_str(), Some("redis"), "the Redis service");
        assert_eq!(
            redis_url.password(),
            Some(redis_password),
            "Redis' password"
        );
        assert!(config.cluster.secret.is_some());
        // Its own container: it listens on every interface, and the others reach it at its
        // service name.
        assert!(
            config.listen.ip().is_unspecified(),
            "{name}: {}",
            config.listen
        );
        let port = config.listen.port();
        let advertise = config.cluster.advertise.clone().expect("cluster.advertise");
        assert_eq!(
            (advertise.scheme(), advertise.host_str(), advertise.port()),
            ("http", Some(name.as_str()), Some(port)),
            "{name}: peers reach it at its service name and port {port}, not {advertise}"
        );
        // The health check, the image's unless the service has its own, asks its own listener.
        let check = match service.pointer("/healthcheck/test") {
            Some(test) => test
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect::<Vec<_>>()
                .join(" "),
            None => image_healthcheck(),
        };
        assert!(
            check.contains(&format!("http://127.0.0.1:{port}/readyz")),
            "{name}: the health check asks its own port: {check}"
        );
        reached.push((name.clone(), port));
        advertised.push(advertise.to_string());
    }
    for list in [advertised, data_volumes] {
        let mut unique = list.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), list.len(), "one each per replica: {list:?}");
    }
    // The file alone holds no secret.
    let bare = load_config(&read("deploy/mirror.cluster.toml"), &[]);
    assert!(bare.cluster.redis.is_none() && bare.cluster.secret.is_none());
    assert!(bare.storage.s3.access_key_id.is_none());

    // nginx: port 5000 published, round-robin over exactly the replicas' services and ports.
    assert!(array_at(nginx, "/ports")
        .iter()
        .any(|p| p.as_str().is_some_and(|p| p.ends_with(":5000"))));
    let depends: Vec<&str> = array_at(nginx, "/depends_on")
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    let nginx_file = &compose_volumes(nginx)
        .into_iter()
        .find(|(_, t, _)| t == "/etc/nginx/nginx.conf")
        .expect("nginx.conf mounted")
        .0;
    let conf = read(&format!("deploy/{nginx_file}"));
    assert!(conf.contains("listen 5000;"));
    let mut upstream = nginx_upstreams(&conf);
    upstream.sort();
    reached.sort();
    assert_eq!(
        upstream, reached,
        "nginx spreads clients over every replica"
    );
    for (name, _) in &reached {
        assert!(
            depends.contains(&name.as_str()),
            "nginx looks {name} up at start: it waits for it"
        );
    }

    // cluster.env stays out of git; its example only has placeholders.
    assert!(read("deploy/.gitignore")
        .lines()
        .any(|l| l == "/cluster.env"));
    for (k, v) in cluster_env_example() {
        assert!(
            v.contains("CHANGE-ME"),
            "cluster.env.example: {k} is a placeholder"
        );
    }
}

#[test]
fn compose_cluster_passes_docker_compose_config() {
    let Some(compose) = tool("docker-compose") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let deploy = dir.path().join("deploy");
    std::fs::create_dir(&deploy).unwrap();
    for file in [
        "compose.cluster.yaml",
        "mirror.cluster.toml",
        "garage.toml",
        "nginx.conf",
    ] {
        std::fs::copy(repo(&format!("deploy/{file}")), deploy.join(file)).unwrap();
    }
    std::fs::copy(
        repo("deploy/cluster.env.example"),
        deploy.join("cluster.env"),
    )
    .unwrap();
    let (resolved, _) = run_ok(Command::new(compose).current_dir(&deploy).args([
        "-f",
        "compose.cluster.yaml",
        "--env-file",
        "cluster.env",
        "config",
    ]));
    // docker-compose's own reading agrees with the one the other tests check: each replica's
    // environment as interpolated here, on the compose network, nothing but nginx published.
    let resolved: Value = serde_norway::from_str(&resolved).unwrap();
    let ours = compose_cluster();
    let services = resolved["services"].as_object().unwrap();
    let mut names: Vec<&String> = services.keys().collect();
    let mut our_names: Vec<&String> = ours["services"].as_object().unwrap().keys().collect();
    names.sort();
    our_names.sort();
    assert_eq!(names, our_names);
    for (name, service) in services {
        assert!(service.get("network_mode").is_none(), "{name}");
        assert_eq!(
            service.get("ports").is_some(),
            name == "nginx",
            "{name}: published ports"
        );
    }
    for (name, ours) in cluster_replicas(&ours) {
        let mut theirs = compose_env(&services[&name]);
        let mut ours = compose_env(&ours);
        theirs.sort();
        ours.sort();
        assert_eq!(theirs, ours, "{name}: the environment docker-compose makes");
    }
}

#[test]
fn compose_cluster_nginx_conf_passes_nginx_t() {
    let Some(nginx) = tool("nginx") else {
        return;
    };
    // nginx resolves upstream names as it loads the file, and the replicas' service names
    // resolve inside compose only: in a copy, loopback stands in for each (same ports, same
    // parameters). The names themselves are checked against the compose services above.
    let dir = tempfile::tempdir().unwrap();
    let mut conf = read("deploy/nginx.conf");
    let upstreams = nginx_upstreams(&conf);
    assert!(!upstreams.is_empty());
    for (host, port) in upstreams {
        conf = conf.replace(
            &format!("server {host}:{port} "),
            &format!("server 127.0.0.1:{port} "),
        );
    }
    assert_eq!(
        nginx_upstreams(&conf)
            .iter()
            .filter(|(h, _)| h != "127.0.0.1")
            .count(),
        0,
        "every upstream replaced:\n{conf}"
    );
    let file = dir.path().join("nginx.conf");
    std::fs::write(&file, conf).unwrap();
    run_ok(
        Command::new(nginx)
            .args(["-t", "-q", "-e", "/dev/stderr", "-p"])
            .arg(dir.path())
            .arg("-c")
            .arg(&file),
    );
}
