//! The mirror over HTTPS with htpasswd users, as the operator docs set it up: real dockerd,
//! containerd and skopeo trusting its certificate and logging in, the Basic challenge and
//! HTTP/2 seen by a plain HTTPS client, and certificate and users reloaded while it serves.

use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::StatusCode;

use crate::assert_digest;
use crate::certs::{generate, htpasswd_line, pinned_client, presented_certificate, CertFiles};
use crate::containerd::Containerd;
use crate::dockerd::{CertsD, Dockerd, DOCKER};
use crate::mirror::Options;
use crate::procs::run_with_input;
use crate::skopeo::Skopeo;
use crate::world::World;

const USER: &str = "moby";
const PASSWORD: &str = "gordon";

/// Makes `DIR/certs/domain.{crt,key}` and `DIR/auth/htpasswd` (moby:gordon) as the operator
/// docs do, and a `DIR/mirror.toml` with `[tls]` and `[auth]` naming them.
fn operator_files(dir: &Path) -> (CertFiles, std::path::PathBuf, std::path::PathBuf) {
    let cert = generate(&dir.join("certs"), "domain", "regmirror-e2e");
    std::fs::create_dir_all(dir.join("auth")).expect("create auth dir");
    let htpasswd = dir.join("auth/htpasswd");
    std::fs::write(&htpasswd, htpasswd_line(USER, PASSWORD)).expect("write htpasswd");
    let config = dir.join("mirror.toml");
    std::fs::write(
        &config,
        format!(
            "[tls]\ncert = {:?}\nkey = {:?}\n\n[auth]\nhtpasswd = {:?}\nrealm = \"regmirror\"\n",
            cert.cert.display().to_string(),
            cert.key.display().to_string(),
            htpasswd.display().to_string(),
        ),
    )
    .expect("write mirror.toml");
    (cert, htpasswd, config)
}

/// Starts the world's mirror with `config`, ready once `GET https://.../v2/` answers 401.
async fn start_tls_mirror(world: &mut World, cert: &CertFiles, config: &Path) {
    let (client, _) = pinned_client(std::slice::from_ref(&cert.der));
    let opts = Options {
        config: Some(config.to_owned()),
        https: Some(client),
        ready_status: 401,
        ..Options::default()
    };
    world.start_mirror_with(&opts).await;
}

/// `GET url` with optional Basic credentials; the status, HTTP version and headers.
async fn get(
    client: &reqwest::Client,
    url: &str,
    creds: Option<(&str, &str)>,
) -> reqwest::Response {
    let mut req = client.get(url);
    if let Some((user, password)) = creds {
        req = req.basic_auth(user, Some(password));
    }
    req.send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e:?}"))
}

/// dockerd (`certs.d` + `docker login` + `--registry-mirror https://...`), containerd
/// (`hosts.toml` with `ca` + `ctr --user`) and skopeo (`--src-cert-dir` + `skopeo login`)
/// pull through an HTTPS mirror that requires a user; without (or with wrong) credentials the
/// mirror answers 401 with its Basic challenge; HTTP/2 is negotiated by ALPN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_htpasswd_with_real_clients() {
    let mut world =
        World::upstream_only(&["dockerd", DOCKER, "containerd", "ctr", "htpasswd"]).await;
    let (cert, _, config) = operator_files(&world.dir("ops"));
    start_tls_mirror(&mut world, &cert, &config).await;
    let addr = world.mirror().addr();
    let (small, multi, many) = (
        world.image("small"),
        world.image("multi"),
        world.image("many"),
    );

    // What a user sees with curl: the challenge, refusals, and HTTP/2.
    let (client, _) = pinned_client(std::slice::from_ref(&cert.der));
    let v2 = format!("https://{addr}/v2/");
    let resp = get(&client, &v2, None).await;
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    assert_eq!(
        resp.status(),
        StatusCode::UNAUTHORIZED,
        "GET /v2/ anonymous"
    );
    assert_eq!(
        resp.headers()
            .get("docker-distribution-api-version")
            .and_then(|v| v.to_str().ok()),
        Some("registry/2.0"),
        "Docker-Distribution-API-Version on the 401"
    );
    assert_eq!(
        challenge.as_deref(),
        Some("Basic realm=\"regmirror\""),
        "the challenge of GET /v2/ without credentials"
    );
    let resp = get(&client, &v2, Some((USER, "not-gordon"))).await;
    assert_eq!(
        resp.status(),
        StatusCode::UNAUTHORIZED,
        "GET /v2/ with a wrong password"
    );
    let resp = get(&client, &v2, Some(("nobody", PASSWORD))).await;
    assert_eq!(
        resp.status(),
        StatusCode::UNAUTHORIZED,
        "GET /v2/ as an unknown user"
    );
    let resp = get(&client, &v2, Some((USER, PASSWORD))).await;
    assert_eq!(resp.status(), StatusCode::OK, "GET /v2/ as moby:gordon");
    assert_eq!(
        resp.version(),
        reqwest::Version::HTTP_2,
        "ALPN should have chosen HTTP/2"
    );

    // dockerd: trusts the certificate from certs.d, logs in, pulls.
    let mark = world.mirror().log_mark();
    let _certs_d = CertsD::install(&addr, &cert.cert);
    let dockerd = Dockerd::start(
        &world.dir("dk"),
        &["--registry-mirror".into(), format!("https://{addr}")],
    )
    .await;
    let mut login = dockerd.docker();
    login.args(["login", &addr, "-u", USER, "--password-stdin"]);
    let out = run_with_input(&mut login, PASSWORD, Duration::from_secs(60)).await;
    assert!(
        out.status.success(),
        "docker login {addr} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // dockerd 20.10 sends a mirror the credentials the client holds for the image's registry
    // (Docker Hub, `https://index.docker.io/v1/`), never those of `docker login MIRROR`
    // ("no basic auth credentials"). Hub's entry is what `docker login` would store for Hub,
    // which this machine cannot reach, so it is written here beside the mirror's.
    add_docker_hub_auth(&dockerd.config_dir(), USER, PASSWORD);
    dockerd.pull(&small.docker_io()).await;
    let digests = dockerd.repo_digests(&small.docker_io()).await;
    assert_eq!(
        digests,
        vec![format!("small@{}", small.digest)],
        "RepoDigests"
    );
    world
        .mirror()
        .assert_served_blobs(mark, &small.name, &small.blobs(), "miss");
    world.assert_blob_gets(small, &small.blobs(), 1, "after docker pull over HTTPS");

    // containerd: hosts.toml with the CA, credentials from ctr.
    let mark = world.mirror().log_mark();
    let ctr = Containerd::start(&world.dir("ct"), None).await;
    ctr.write_hosts(
        "docker.io",
        &format!(
            "server = \"https://registry-1.docker.io\"\n\n[host.\"https://{addr}\"]\n  \
             capabilities = [\"pull\", \"resolve\"]\n  ca = {:?}\n",
            cert.cert.display().to_string()
        ),
    );
    ctr.pull(
        &multi.docker_io(),
        &["--user", &format!("{USER}:{PASSWORD}")],
    )
    .await;
    let got = ctr.image_digest(&multi.docker_io()).await;
    assert_digest("ctr over HTTPS", multi, &got, &multi.digest);
    let amd64 = multi.platform("amd64").blobs();
    world
        .mirror()
        .assert_served_blobs(mark, &multi.name, &amd64, "");
    world.assert_blob_gets(multi, &amd64, 1, "after ctr pull over HTTPS");

    // skopeo: trusts the certificate with --src-cert-dir, credentials from `skopeo login`.
    let mark = world.mirror().log_mark();
    let skopeo = Skopeo::with_tls_mirror(&world.dir("skopeo"), &addr, &cert.cert);
    skopeo.login(&addr, USER, PASSWORD).await;
    let got = skopeo
        .pull_to_dir(&many.docker_io(), &world.dir("out-many"), false)
        .await;
    assert_digest("skopeo over HTTPS", many, &got, &many.digest);
    world
        .mirror()
        .assert_served_blobs(mark, &many.name, &many.blobs(), "miss");
    world.assert_blob_gets(many, &many.blobs(), 1, "after skopeo copy over HTTPS");

    // Cached content needs credentials too.
    let blob = format!(
        "https://{addr}/v2/{}/blobs/{}",
        small.name,
        small.blobs()[0]
    );
    let resp = get(&client, &blob, None).await;
    assert_eq!(
        resp.status(),
        StatusCode::UNAUTHORIZED,
        "GET of a cached blob without credentials"
    );
    let resp = get(&client, &blob, Some((USER, PASSWORD))).await;
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "GET of a cached blob as moby"
    );
}

/// Adds `https://index.docker.io/v1/` credentials to a docker client's `config.json`.
fn add_docker_hub_auth(config_dir: &Path, user: &str, password: &str) {
    use base64::Engine as _;
    let path = config_dir.join("config.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|_| "{}".into());
    let mut config: serde_json::Value = serde_json::from_str(&text).expect("config.json");
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    config["auths"]["https://index.docker.io/v1/"] = serde_json::json!({ "auth": auth });
    std::fs::write(&path, config.to_string()).expect("write config.json");
}

/// With the mirror serving, a new certificate and a new htpasswd (moby removed, alice added)
/// are written over the files: within seconds new handshakes get the new certificate, alice
/// gets in and moby does not, while a connection opened before the change keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_and_htpasswd_reload() {
    const LIMIT: Duration = Duration::from_secs(6);
    let mut world = World::upstream_only(&["htpasswd"]).await;
    let (old, htpasswd, config) = operator_files(&world.dir("ops"));
    start_tls_mirror(&mut world, &old, &config).await;
    let (port, addr) = (world.mirror().port, world.mirror().addr());
    let v2 = format!("https://{addr}/v2/");

    // A client that trusts only the old certificate: once connected, it can only go on using
    // its connection, since any new handshake would now fail.
    let (kept, kept_seen) = pinned_client(std::slice::from_ref(&old.der));
    let resp = get(&kept, &v2, Some((USER, PASSWORD))).await;
    assert_eq!(resp.status(), StatusCode::OK, "moby before the change");

    let new = generate(&world.dir("new-certs"), "domain", "regmirror-e2e-renewed");
    assert_ne!(old.der, new.der);
    let both = [old.der.clone(), new.der.clone()];
    assert_eq!(
        presented_certificate(port, &both).await,
        Ok(old.der.clone()),
        "the certificate presented before the change"
    );
    let copy = |from: &Path, to: &Path| {
        let bytes = std::fs::read(from).expect("read new file");
        std::fs::write(to, bytes).expect("write over the served file");
    };
    copy(&new.key, &old.key);
    copy(&new.cert, &old.cert);
    std::fs::write(&htpasswd, htpasswd_line("alice", "wonderland")).expect("write htpasswd");
    let changed = Instant::now();

    // Both files are checked every couple of seconds: poll new handshakes and logins.
    let presented = loop {
        let presented = presented_certificate(port, &both).await;
        if presented.as_ref() == Ok(&new.der) || changed.elapsed() > LIMIT {
            break presented;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let which = match &presented {
        Ok(c) if *c == new.der => "the new certificate".to_owned(),
        Ok(c) if *c == old.der => "the old certificate".to_owned(),
        Ok(_) => "an unknown certificate".to_owned(),
        Err(e) => e.clone(),
    };
    assert!(
        presented.as_ref() == Ok(&new.der),
        "{:?} after the certificate files were replaced, a new TLS handshake got {which}; \
         mirror log:\n{}",
        changed.elapsed(),
        crate::procs::tail(&world.mirror().own_log(), 40)
    );
    eprintln!(
        "[e2e] new certificate presented after {:?}",
        changed.elapsed()
    );

    let (fresh, _) = pinned_client(std::slice::from_ref(&new.der));
    let want = (StatusCode::OK, StatusCode::UNAUTHORIZED);
    let statuses = loop {
        let statuses = (
            get(&fresh, &v2, Some(("alice", "wonderland")))
                .await
                .status(),
            get(&fresh, &v2, Some((USER, PASSWORD))).await.status(),
        );
        if statuses == want || changed.elapsed() > LIMIT {
            break statuses;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        statuses,
        want,
        "(alice, moby) {:?} after the htpasswd file was replaced; mirror log:\n{}",
        changed.elapsed(),
        crate::procs::tail(&world.mirror().own_log(), 40)
    );

    let resp = get(&kept, &v2, Some(("alice", "wonderland"))).await;
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "alice on the connection opened before the change"
    );
    let resp = get(&kept, &v2, Some((USER, PASSWORD))).await;
    assert_eq!(
        resp.status(),
        StatusCode::UNAUTHORIZED,
        "moby on the connection opened before the change"
    );
    let handshakes = kept_seen.lock().expect("seen").len();
    assert_eq!(
        handshakes, 1,
        "the client of the old certificate should have kept its one connection"
    );
    let log = world.mirror().own_log();
    for line in ["TLS certificate reloaded", "htpasswd file reloaded"] {
        assert!(
            log.contains(line),
            "the mirror's log lacks `{line}`:\n{log}"
        );
    }
}
