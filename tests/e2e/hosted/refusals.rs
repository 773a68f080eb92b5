//! Pushes a mirror refuses, as real clients see them: to a mirrored repository (403 DENIED
//! naming `hosted.repos`), without credentials to a mirror with users (401 with the Basic
//! challenge, even with `anonymous_pull`), by a user whom no access rule lets push (403
//! DENIED), and past `hosted.max_size` (403). Each refusal leaves nothing behind.

use std::time::Duration;

use crate::certs::htpasswd_line;
use crate::hosted::{
    hosted_world, listing, output_text, small_image, start_hosted_mirror, writes_to,
};
use crate::oci::Manifest;
use crate::procs::{run, run_ok};
use crate::skopeo::{dir_manifest_digest, Skopeo};
use crate::world::World;

const LIMIT: Duration = Duration::from_secs(120);

/// A world whose mirror has the users of `users` (name, password) in an htpasswd file and
/// `auth` as the rest of its `[auth]` table (plus whatever tables follow it).
async fn world_with_users(users: &[(&str, &str)], auth: &str) -> World {
    let mut world = World::upstream_only(&["htpasswd"]).await;
    let htpasswd = world.dir("ops").join("htpasswd");
    let lines: String = users.iter().map(|(u, p)| htpasswd_line(u, p)).collect();
    std::fs::write(&htpasswd, lines).expect("write htpasswd");
    let extra = format!(
        "[auth]\nhtpasswd = {:?}\n{auth}",
        htpasswd.display().to_string()
    );
    start_hosted_mirror(&mut world, &extra, &[], 401).await;
    world
}

/// `skopeo copy --dest-tls-verify=false oci:LAYOUT:v1 docker://DEST` of a new image with a
/// 64 KiB layer, with `creds` as `--dest-creds` if any: the command's output, whether it
/// succeeded or not, and the image's manifest.
async fn try_push(
    world: &World,
    creds: Option<&str>,
    dest: &str,
) -> (std::process::Output, Manifest) {
    try_push_sized(world, creds, dest, 64 << 10).await
}

/// [`try_push`] of an image with `random` incompressible bytes in a layer.
async fn try_push_sized(
    world: &World,
    creds: Option<&str>,
    dest: &str,
    random: u64,
) -> (std::process::Output, Manifest) {
    let name = format!("layout-{}", dest.replace(['/', ':'], "-"));
    let layout = world.dir(&name);
    let manifest = small_image(&layout, "v1", &name, random);
    let skopeo = Skopeo::plain(&world.dir("skopeo"));
    let mut cmd = skopeo.command("copy");
    cmd.arg("--dest-tls-verify=false");
    if let Some(creds) = creds {
        cmd.args(["--dest-creds", creds]);
    }
    cmd.arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("docker://{dest}"));
    (run(&mut cmd, LIMIT).await, manifest)
}

/// The status, `errors[0].code` and the body (with any challenge) of a raw request.
async fn raw(req: reqwest::RequestBuilder) -> (u16, String, String) {
    let resp = req.send().await.expect("request to the mirror");
    let status = resp.status().as_u16();
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = resp.text().await.unwrap_or_default();
    let code = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["errors"][0]["code"].as_str().map(str::to_owned))
        .unwrap_or_default();
    (
        status,
        code,
        format!("{body} (WWW-Authenticate: {challenge:?})"),
    )
}

/// Asserts that since `mark` the mirror answered some write to `name` with `status` and none
/// with 2xx.
fn assert_writes_refused(world: &World, mark: usize, name: &str, status: u16, who: &str) {
    let writes = writes_to(world, mark, name);
    assert!(
        writes.iter().any(|s| s.status == status),
        "{who}: the mirror should have answered an upload to {name} with {status}; its writes:\n{}",
        listing(&writes)
    );
    assert!(
        writes.iter().all(|s| !(200..300).contains(&s.status)),
        "{who}: the mirror accepted a write to {name}:\n{}",
        listing(&writes)
    );
}

/// skopeo's push to `library/small`, which the mirror mirrors from the upstream, fails with
/// the mirror's DENIED; a raw upload start gets 403 DENIED whose detail names `hosted.repos`;
/// no write was answered 2xx, the tag does not exist and the upstream received no write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_to_a_mirrored_repository_is_denied() {
    let world = hosted_world(&[], "", &[], 200).await;
    let addr = world.mirror().addr();
    let mark = world.mirror().log_mark();
    let (out, _) = try_push(&world, None, &format!("{addr}/library/small:pushed")).await;
    let text = output_text(&out);
    assert!(
        !out.status.success(),
        "skopeo's push to the mirrored library/small succeeded: {text}"
    );
    assert!(
        text.to_lowercase().contains("denied"),
        "skopeo should show the mirror's DENIED: {text}"
    );
    assert_writes_refused(&world, mark, "library/small", 403, "skopeo");

    let client = reqwest::Client::new();
    let url = format!("http://{addr}/v2/library/small/blobs/uploads/");
    let (status, code, body) = raw(client.post(&url)).await;
    assert_eq!(
        (status, code.as_str()),
        (403, "DENIED"),
        "POST {url}: {body}"
    );
    assert!(
        body.contains("hosted.repos"),
        "the refusal should name hosted.repos: {body}"
    );
    let url = format!("http://{addr}/v2/library/small/manifests/pushed");
    let (status, _, body) = raw(client.get(&url)).await;
    assert_eq!(
        status, 404,
        "GET {url}, the tag skopeo tried to push: {body}"
    );
    let upstream_writes: Vec<_> = world
        .upstream
        .served()
        .into_iter()
        .filter(|s| !matches!(s.method.as_str(), "GET" | "HEAD"))
        .collect();
    assert!(
        upstream_writes.is_empty(),
        "the upstream received writes: {upstream_writes:?}"
    );
}

/// With users and `anonymous_pull = true`, skopeo's push without credentials to a hosted
/// repository fails as unauthorized; a raw upload start gets 401 UNAUTHORIZED with the Basic
/// challenge; no write was answered 2xx and the tag does not exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_without_credentials_is_unauthorized() {
    let world = world_with_users(&[("moby", "gordon")], "anonymous_pull = true\n").await;
    let addr = world.mirror().addr();
    let mark = world.mirror().log_mark();
    let (out, _) = try_push(&world, None, &format!("{addr}/myorg/app:v1")).await;
    let text = output_text(&out);
    assert!(
        !out.status.success(),
        "skopeo's push without credentials succeeded: {text}"
    );
    let lower = text.to_lowercase();
    assert!(
        lower.contains("unauthorized") || lower.contains("authentication required"),
        "skopeo should show an authentication error: {text}"
    );
    let writes = writes_to(&world, mark, "myorg/app");
    assert!(
        writes.iter().all(|s| !(200..300).contains(&s.status)),
        "the mirror accepted an anonymous write:\n{}",
        listing(&writes)
    );

    let client = reqwest::Client::new();
    let url = format!("http://{addr}/v2/myorg/app/blobs/uploads/");
    let (status, code, body) = raw(client.post(&url)).await;
    assert_eq!(
        (status, code.as_str()),
        (401, "UNAUTHORIZED"),
        "POST {url}: {body}"
    );
    assert!(body.contains("Basic realm="), "the Basic challenge: {body}");
    let url = format!("http://{addr}/v2/myorg/app/manifests/v1");
    let (status, _, body) = raw(client.get(&url).basic_auth("moby", Some("gordon"))).await;
    assert_eq!(status, 404, "GET {url} after the refused push: {body}");
}

/// With access rules, `dev` (pull only) cannot push to `myorg/app`: skopeo fails with the
/// mirror's DENIED (403, not a challenge: dev is authenticated) and nothing is written; `ci`
/// (pull and push on `myorg/*`) pushes, and dev pulls ci's image with its digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_the_push_right_is_denied() {
    let rules = "\n[[auth.access]]\nusers = [\"ci\"]\nrepos = [\"myorg/*\"]\n\
                 actions = [\"pull\", \"push\"]\n\n\
                 [[auth.access]]\nusers = [\"*\"]\nrepos = [\"*\"]\nactions = [\"pull\"]\n";
    let world = world_with_users(&[("ci", "ci-secret"), ("dev", "dev-secret")], rules).await;
    let addr = world.mirror().addr();
    let dest = format!("{addr}/myorg/app:v1");

    let mark = world.mirror().log_mark();
    let (out, _) = try_push(&world, Some("dev:dev-secret"), &dest).await;
    let text = output_text(&out);
    assert!(!out.status.success(), "dev's push succeeded: {text}");
    assert!(
        text.to_lowercase().contains("denied"),
        "skopeo should show the mirror's DENIED for dev: {text}"
    );
    assert_writes_refused(&world, mark, "myorg/app", 403, "dev");

    let (out, pushed) = try_push(&world, Some("ci:ci-secret"), &dest).await;
    assert!(
        out.status.success(),
        "ci's push failed: {}\n--- what the mirror served ---\n{}",
        output_text(&out),
        listing(&world.mirror().served_since(mark))
    );
    let skopeo = Skopeo::plain(&world.dir("skopeo-dev"));
    let out_dir = world.dir("dev-out");
    let mut pull = skopeo.command("copy");
    pull.args(["--src-tls-verify=false", "--src-creds", "dev:dev-secret"])
        .arg(format!("docker://{dest}"))
        .arg(format!("dir:{}", out_dir.display()));
    run_ok(&mut pull, LIMIT).await;
    assert_eq!(
        dir_manifest_digest(&out_dir),
        pushed.blob.digest,
        "the digest dev pulled of what ci pushed"
    );
}

/// With `hosted.max_size = 512KiB`, skopeo's push of an image with a 1 MiB layer fails and the
/// mirror refused an upload with 403; the tag does not exist, the layer is not there, and a
/// 64 KiB image pushes afterwards: the refused upload's bytes were not kept against the quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_past_the_quota_is_refused_and_leaves_nothing() {
    let world = hosted_world(&[], "", &[("REGMIRROR_HOSTED_MAX_SIZE", "512KiB")], 200).await;
    let addr = world.mirror().addr();
    let mark = world.mirror().log_mark();
    let (out, big) = try_push_sized(&world, None, &format!("{addr}/myorg/big:v1"), 1 << 20).await;
    let text = output_text(&out);
    assert!(
        !out.status.success(),
        "skopeo's push past hosted.max_size succeeded: {text}"
    );
    // Its small blobs fit and may stay; the big layer's upload is refused, and so no manifest
    // can be put.
    let writes = writes_to(&world, mark, "myorg/big");
    assert!(
        writes.iter().any(|s| s.status == 403)
            && !writes
                .iter()
                .any(|s| s.path.contains("/manifests/") && (200..300).contains(&s.status)),
        "past the quota, an upload should have been answered 403 and no manifest taken:\n{}",
        listing(&writes)
    );

    let client = reqwest::Client::new();
    let url = format!("http://{addr}/v2/myorg/big/manifests/v1");
    let (status, _, body) = raw(client.get(&url)).await;
    assert_eq!(status, 404, "GET {url} after the refused push: {body}");
    let refused = big
        .layers
        .iter()
        .max_by_key(|l| l.size)
        .expect("the big layer");
    let url = format!("http://{addr}/v2/myorg/big/blobs/{}", refused.digest);
    let (status, _, _) = raw(client.head(&url)).await;
    assert_eq!(status, 404, "HEAD of the layer the quota refused, {url}");

    let (out, small) = try_push(&world, None, &format!("{addr}/myorg/small:v1")).await;
    assert!(
        out.status.success(),
        "a 64 KiB push after the refused one failed: {}\n--- what the mirror served ---\n{}",
        output_text(&out),
        listing(&world.mirror().served_since(mark))
    );
    let skopeo = Skopeo::plain(&world.dir("skopeo-pull"));
    let got = skopeo
        .pull_to_dir(
            &format!("{addr}/myorg/small:v1"),
            &world.dir("small-out"),
            false,
        )
        .await;
    assert_eq!(
        got, small.blob.digest,
        "the digest of myorg/small:v1 pulled back"
    );
}
