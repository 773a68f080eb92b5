//! deploy/compose.yaml, its mirror.compose.toml and .env.example: what is mounted where, the
//! configuration that names those mounts, `docker-compose config`, and the service started with
//! a certificate and users made as the README makes them.

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
