//! The operator guides' private-registry workflow, verbatim, against regmirror: a self-signed
//! certificate from `openssl req`, users from `htpasswd -Bbn moby gordon`, dockerd trusting the
//! certificate through `certs.d/<host:port>/ca.crt`, `docker login`, then `docker tag`,
//! `docker push`, `docker image rm` and `docker pull` of `127.0.0.1:PORT/hello-world`.

use std::path::Path;
use std::time::Duration;

use crate::certs::{generate, htpasswd_line, pinned_client, CertFiles};
use crate::dockerd::{CertsD, Dockerd, DOCKER};
use crate::hosted::{
    assert_upstream_never_asked, output_text, pushed_digest, small_image, write_config,
};
use crate::mirror::Options;
use crate::procs::{run, run_ok, run_with_input};
use crate::push::sha256;
use crate::skopeo::Skopeo;
use crate::world::World;

const USER: &str = "moby";
const PASSWORD: &str = "gordon";
const LIMIT: Duration = Duration::from_secs(120);

/// `DIR/certs/domain.{crt,key}`, `DIR/auth/htpasswd` (moby:gordon) and `DIR/mirror.toml` with
/// `[tls]`, `[auth]` and `[hosted]`, as the guides and issue 16 write them.
fn operator_files(dir: &Path) -> (CertFiles, std::path::PathBuf) {
    let cert = generate(&dir.join("certs"), "domain", "regmirror-e2e");
    std::fs::create_dir_all(dir.join("auth")).expect("create auth dir");
    let htpasswd = dir.join("auth/htpasswd");
    std::fs::write(&htpasswd, htpasswd_line(USER, PASSWORD)).expect("write htpasswd");
    let config = write_config(
        dir,
        &format!(
            "[tls]\ncert = {:?}\nkey = {:?}\n\n[auth]\nhtpasswd = {:?}\n",
            cert.cert.display().to_string(),
            cert.key.display().to_string(),
            htpasswd.display().to_string(),
        ),
    );
    (cert, config)
}

/// The image the guides take from Docker Hub, made here: a layout written by the test,
/// turned into a `docker save` archive by skopeo and loaded with `docker load`.
async fn load_hello_world(world: &World, dockerd: &Dockerd) {
    let layout = world.dir("layout");
    small_image(&layout, "latest", "hello-world", 0);
    let archive = world.dir("archive").join("hello-world.tar");
    let skopeo = Skopeo::plain(&world.dir("skopeo"));
    let mut copy = skopeo.command("copy");
    copy.arg(format!("oci:{}:latest", layout.display()))
        .arg(format!(
            "docker-archive:{}:hello-world:latest",
            archive.display()
        ));
    run_ok(&mut copy, LIMIT).await;
    let mut load = dockerd.docker();
    load.arg("load").arg("-i").arg(&archive);
    let out = run_ok(&mut load, LIMIT).await;
    assert!(
        output_text(&out).contains("hello-world:latest"),
        "docker load should have loaded hello-world:latest: {}",
        output_text(&out)
    );
}

/// `docker image inspect --format FORMAT REFERENCE`, trimmed; `None` when there is no such
/// image.
async fn inspect(dockerd: &Dockerd, format: &str, reference: &str) -> Option<String> {
    let mut cmd = dockerd.docker();
    cmd.args(["image", "inspect", "--format", format, reference]);
    let out = run(&mut cmd, Duration::from_secs(30)).await;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The guides' workflow: the image pulled back after `docker image rm` has the digest the push
/// reported (as RepoDigests), the same image ID as the one loaded, and the mirror served its
/// manifest and layers; the upstream never heard of hello-world.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guides_push_and_pull_with_dockerd_over_tls_and_htpasswd() {
    let mut world = World::upstream_only(&["dockerd", DOCKER, "htpasswd"]).await;
    let (cert, config) = operator_files(&world.dir("ops"));
    let (client, _) = pinned_client(std::slice::from_ref(&cert.der));
    let opts = Options {
        config: Some(config),
        https: Some(client.clone()),
        ready_status: 401,
        ..Options::default()
    };
    world.start_mirror_with(&opts).await;
    let addr = world.mirror().addr();
    let _certs_d = CertsD::install(&addr, &cert.cert);
    let dockerd = Dockerd::start(&world.dir("dk"), &[]).await;

    let mut login = dockerd.docker();
    login.args(["login", &addr, "-u", USER, "--password-stdin"]);
    let out = run_with_input(&mut login, PASSWORD, Duration::from_secs(60)).await;
    assert!(
        out.status.success(),
        "docker login {addr} failed: {}",
        output_text(&out)
    );

    load_hello_world(&world, &dockerd).await;
    let loaded_id = inspect(&dockerd, "{{.Id}}", "hello-world")
        .await
        .expect("the loaded hello-world");
    let remote = format!("{addr}/hello-world");
    let mut tag = dockerd.docker();
    tag.args(["tag", "hello-world", &remote]);
    run_ok(&mut tag, LIMIT).await;

    let mark = world.mirror().log_mark();
    let mut push = dockerd.docker();
    push.args(["push", &remote]);
    let out = run(&mut push, LIMIT).await;
    assert!(
        out.status.success(),
        "docker push {remote} failed: {}\n--- what the mirror served ---\n{}",
        output_text(&out),
        crate::hosted::listing(&world.mirror().served_since(mark))
    );
    let digest = pushed_digest(&output_text(&out));

    // What the mirror now serves under the tag is what was pushed.
    let url = format!("https://{addr}/v2/hello-world/manifests/latest");
    let resp = client
        .get(&url)
        .basic_auth(USER, Some(PASSWORD))
        .header(
            "accept",
            "application/vnd.docker.distribution.manifest.v2+json, \
             application/vnd.oci.image.manifest.v1+json",
        )
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert_eq!(resp.status(), 200, "GET {url} as moby");
    let header = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let manifest = resp.bytes().await.expect("manifest body");
    assert_eq!(
        sha256(&manifest),
        digest,
        "the digest of the manifest served"
    );
    assert_eq!(
        header.as_deref(),
        Some(digest.as_str()),
        "Docker-Content-Digest"
    );
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).expect("manifest json");
    let layers: Vec<String> = manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["digest"].as_str().expect("layer digest").to_owned())
        .collect();

    let mut rm = dockerd.docker();
    rm.args(["image", "rm", "hello-world", &remote]);
    run_ok(&mut rm, LIMIT).await;
    assert_eq!(
        inspect(&dockerd, "{{.Id}}", &loaded_id).await,
        None,
        "the image should be gone from dockerd after docker image rm"
    );

    let mark = world.mirror().log_mark();
    dockerd.pull(&remote).await;
    assert_eq!(
        dockerd.repo_digests(&remote).await,
        vec![format!("{remote}@{digest}")],
        "RepoDigests of the image pulled back"
    );
    assert_eq!(
        inspect(&dockerd, "{{.Id}}", &remote).await.as_deref(),
        Some(loaded_id.as_str()),
        "the image ID pulled back (its config's digest)"
    );
    world
        .mirror()
        .assert_served_blobs(mark, "hello-world", &layers, "");
    assert_upstream_never_asked(&world, "hello-world");
    assert_upstream_never_asked(&world, "library/hello-world");
}
