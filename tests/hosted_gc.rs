//! Garbage collection of hosted content while the mirror serves and clients push
//! (issue 16): images pushed over HTTP, some deleted, then a collection asked for the
//! way `regmirror gc` asks a running mirror, while 8 clients push (uploading, mounting,
//! sending manifests) and pull. Afterwards every image kept or pushed meanwhile pulls
//! whole and verified, and what only the deleted ones referenced is gone from the API
//! and from `<data_dir>/hosted`. The grace period (`hosted.upload_ttl`) is 4 s here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::images::{build_image, build_index, sha256_digest, Format, ImageInfo, IndexInfo};
use common::{random_bytes, start_mirror, test_config, wait_until, MirrorHandle};
use regmirror::config::Config;

const APP: &str = "team/app";
const MULTI: &str = "team/multi";
/// Nothing listens there: hosted repositories never go upstream.
const UPSTREAM: &str = "http://127.0.0.1:9";
const CLIENTS: usize = 8;

/// The grace period (`hosted.upload_ttl`): a blob linked, pulled or checked
/// within it stays even when no manifest references it.
const GRACE: Duration = Duration::from_secs(4);

fn hosted(c: &mut Config) {
    c.hosted.repos = vec!["team/*".into()];
    c.hosted.delete = true;
    c.hosted.upload_ttl = GRACE;
}

/// A client of the push and pull API; every failure is a message, so the
/// concurrent clients report rather than panic in their tasks.
#[derive(Clone)]
struct Client {
    http: reqwest::Client,
    url: String,
}

type Outcome = Result<(), String>;

impl Client {
    fn of(m: &MirrorHandle) -> Self {
        Self {
            http: m.client.clone(),
            url: m.url.clone(),
        }
    }

    async fn status(&self, method: reqwest::Method, path: &str) -> u16 {
        match self
            .http
            .request(method, format!("{}{path}", self.url))
            .send()
            .await
        {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        }
    }

    /// POST an upload, PUT its bytes with `?digest=` (monolithic, in two requests).
    async fn upload(&self, repo: &str, bytes: &bytes::Bytes) -> Outcome {
        let digest = sha256_digest(bytes);
        let r = self
            .http
            .post(format!("{}/v2/{repo}/blobs/uploads/", self.url))
            .send()
            .await
            .map_err(|e| format!("POST upload to {repo}: {e}"))?;
        if r.status() != 202 {
            return Err(format!("POST upload to {repo}: {}", r.status()));
        }
        let location = r
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .ok_or("no Location")?
            .to_owned();
        let sep = if location.contains('?') { '&' } else { '?' };
        let url = if location.starts_with('/') {
            format!("{}{location}{sep}digest={digest}", self.url)
        } else {
            format!("{location}{sep}digest={digest}")
        };
        let r = self
            .http
            .put(url)
            .header("content-type", "application/octet-stream")
            .body(bytes.clone())
            .send()
            .await
            .map_err(|e| format!("PUT {digest} to {repo}: {e}"))?;
        match r.status().as_u16() {
            201 => Ok(()),
            s => Err(format!(
                "PUT {digest} to {repo}: {s} {}",
                r.text().await.unwrap_or_default()
            )),
        }
    }

    /// Links a blob of `from` into `repo`; whether it was mounted (201).
    async fn mount(&self, repo: &str, digest: &str, from: &str) -> Result<bool, String> {
        let r = self
            .http
            .post(format!(
                "{}/v2/{repo}/blobs/uploads/?mount={digest}&from={from}",
                self.url
            ))
            .send()
            .await
            .map_err(|e| format!("mount {digest} into {repo}: {e}"))?;
        Ok(r.status() == 201)
    }

    async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &bytes::Bytes,
    ) -> Outcome {
        let r = self
            .http
            .put(format!("{}/v2/{repo}/manifests/{reference}", self.url))
            .header("content-type", media_type)
            .body(bytes.clone())
            .send()
            .await
            .map_err(|e| format!("PUT manifest {repo}:{reference}: {e}"))?;
        match r.status().as_u16() {
            201 => Ok(()),
            s => Err(format!(
                "PUT manifest {repo}:{reference}: {s} {}",
                r.text().await.unwrap_or_default()
            )),
        }
    }

    /// Pushes an image as docker does: a blob the repository has is not sent
    /// again (HEAD), one `mounts` names is mounted from there, the rest uploaded.
    async fn push(
        &self,
        repo: &str,
        reference: &str,
        img: &ImageInfo,
        mounts: &[(&str, &str)],
    ) -> Outcome {
        for (digest, bytes) in img.blobs() {
            if self
                .status(reqwest::Method::HEAD, &format!("/v2/{repo}/blobs/{digest}"))
                .await
                == 200
            {
                continue;
            }
            let from = mounts
                .iter()
                .find(|(d, _)| *d == digest)
                .map(|(_, from)| *from);
            if let Some(from) = from {
                if self.mount(repo, &digest, from).await? {
                    continue;
                }
            }
            self.upload(repo, &bytes).await?;
        }
        self.put_manifest(repo, reference, img.media_type, &img.manifest)
            .await
    }

    async fn push_index(&self, repo: &str, tag: &str, index: &IndexInfo) -> Outcome {
        for (_, child) in &index.children {
            self.push(repo, &child.manifest_digest, child, &[]).await?;
        }
        self.put_manifest(repo, tag, index.media_type, &index.bytes)
            .await
    }

    /// GETs `path` whole; its bytes must hash to `digest`.
    async fn verified(&self, path: &str, digest: &str) -> Result<bytes::Bytes, String> {
        let r = self
            .http
            .get(format!("{}{path}", self.url))
            .header("accept", "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json")
            .send()
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        if r.status() != 200 {
            return Err(format!("GET {path}: {}", r.status()));
        }
        let body = r
            .bytes()
            .await
            .map_err(|e| format!("GET {path}: body cut: {e}"))?;
        if sha256_digest(&body) != digest {
            return Err(format!(
                "GET {path}: {} bytes that do not hash to {digest}",
                body.len()
            ));
        }
        Ok(body)
    }

    /// Pulls an image by `reference`: the manifest, then every blob, verified.
    async fn pull(&self, repo: &str, reference: &str, img: &ImageInfo) -> Outcome {
        let m = self
            .verified(
                &format!("/v2/{repo}/manifests/{reference}"),
                &img.manifest_digest,
            )
            .await?;
        if m != img.manifest {
            return Err(format!("{repo}:{reference}: another manifest"));
        }
        for (digest, _) in img.blobs() {
            self.verified(&format!("/v2/{repo}/blobs/{digest}"), &digest)
                .await?;
        }
        Ok(())
    }

    async fn pull_index(&self, repo: &str, tag: &str, index: &IndexInfo) -> Outcome {
        self.verified(&format!("/v2/{repo}/manifests/{tag}"), &index.digest)
            .await?;
        for (_, child) in &index.children {
            self.pull(repo, &child.manifest_digest, child).await?;
        }
        Ok(())
    }

    async fn delete_manifest(&self, repo: &str, digest: &str) -> u16 {
        self.status(
            reqwest::Method::DELETE,
            &format!("/v2/{repo}/manifests/{digest}"),
        )
        .await
    }
}

fn layer(seed: u64) -> Vec<u8> {
    random_bytes(96 * 1024 + seed as usize % 4096, seed)
}

fn image(seeds: &[u64], arch: &str) -> ImageInfo {
    build_image(seeds.iter().map(|s| layer(*s)).collect(), Format::Oci, arch)
}

/// Where the hosted store keeps an item.
fn hosted_path(m: &MirrorHandle, area: &str, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").unwrap();
    m.data_dir
        .join("hosted")
        .join(area)
        .join("sha256")
        .join(&hex[..2])
        .join(hex)
}

/// One of the concurrent clients: pushes image after image to its own
/// repository (a layer of its own, the kept image's layer mounted from
/// `team/app`, a layer the deleted image had) and pulls each back with the
/// kept image and index; pushes, pulls and deletes another, until `stop`.
/// Returns what it pushed and kept.
async fn run_client(
    c: Client,
    i: usize,
    kept: ImageInfo,
    multi: IndexInfo,
    reused: u64,
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicUsize>,
) -> Result<Vec<(String, ImageInfo)>, String> {
    let repo = format!("team/c{i}");
    let shared = kept.layer_digests[0].clone();
    let mut pushed = Vec::new();
    for n in 0u64.. {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let own = layer(1000 + i as u64 * 100 + n);
        let img = build_image(
            vec![own, kept.layers[0].to_vec(), layer(reused)],
            Format::Oci,
            "amd64",
        );
        let tag = format!("r{n}");
        c.push(&repo, &tag, &img, &[(&shared, APP)]).await?;
        c.pull(&repo, &tag, &img).await?;
        c.pull(APP, "keep", &kept).await?;
        c.pull_index(MULTI, "latest", &multi).await?;
        pushed.push((tag, img));
        // Pushed, pulled and deleted: collections take what it leaves once
        // the grace period passed, while its first layer, common to every
        // client, is found by a HEAD (which keeps it) or uploaded again.
        let churn = format!("team/churn{i}");
        let brief = build_image(
            vec![layer(7), layer(2000 + i as u64 * 100 + n)],
            Format::Oci,
            "amd64",
        );
        c.push(&churn, "brief", &brief, &[]).await?;
        c.pull(&churn, "brief", &brief).await?;
        match c.delete_manifest(&churn, &brief.manifest_digest).await {
            202 => {}
            s => return Err(format!("DELETE {churn}@{}: {s}", brief.manifest_digest)),
        }
        rounds.fetch_add(1, Ordering::Relaxed);
    }
    Ok(pushed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_while_eight_clients_push_and_pull_removes_only_what_nothing_references() {
    let m = start_mirror(UPSTREAM, hosted).await;
    let c = Client::of(&m);

    // Kept: an image sharing a layer with a deleted one, and an index.
    let kept = image(&[1, 2], "amd64");
    // Its first layer is the kept one's; the third, the clients push again.
    let doomed = build_image(
        vec![kept.layers[0].to_vec(), layer(3), layer(4)],
        Format::Oci,
        "amd64",
    );
    let multi = build_index(vec![
        ("amd64".into(), image(&[10], "amd64")),
        ("arm64".into(), image(&[11], "arm64")),
    ]);
    let doomed_index = build_index(vec![
        ("amd64".into(), image(&[20, 21], "amd64")),
        ("arm64".into(), image(&[22], "arm64")),
    ]);
    c.push(APP, "keep", &kept, &[]).await.unwrap();
    c.push(APP, "old", &doomed, &[]).await.unwrap();
    c.push_index(MULTI, "latest", &multi).await.unwrap();
    c.push_index(MULTI, "old", &doomed_index).await.unwrap();
    let pushed_at = std::time::Instant::now();

    // What only the deleted image and index referenced.
    let mut gone_blobs = vec![
        doomed.config_digest.clone(),
        doomed.layer_digests[1].clone(),
    ];
    let mut gone_manifests = vec![doomed.manifest_digest.clone(), doomed_index.digest.clone()];
    for (_, child) in &doomed_index.children {
        gone_manifests.push(child.manifest_digest.clone());
        gone_blobs.extend(child.blobs().into_iter().map(|(d, _)| d));
    }
    for d in &gone_blobs {
        assert!(hosted_path(&m, "blobs", d).is_file(), "{d} was pushed");
    }

    // The clients start, and push and pull throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            tokio::spawn(run_client(
                c.clone(),
                i,
                kept.clone(),
                multi.clone(),
                4,
                stop.clone(),
                rounds.clone(),
            ))
        })
        .collect();
    assert!(
        wait_until(Duration::from_secs(30), || rounds.load(Ordering::Relaxed)
            >= CLIENTS)
        .await,
        "the clients push and pull"
    );

    // Deleted by digest once nothing used their blobs for the grace period,
    // the index with its children; a collection asked for the way
    // `regmirror gc` asks a running mirror.
    if let Some(rest) = (GRACE + Duration::from_secs(1)).checked_sub(pushed_at.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    assert_eq!(c.delete_manifest(APP, &doomed.manifest_digest).await, 202);
    assert_eq!(c.delete_manifest(MULTI, &doomed_index.digest).await, 202);
    for (_, child) in &doomed_index.children {
        assert_eq!(c.delete_manifest(MULTI, &child.manifest_digest).await, 202);
    }
    let mut config = test_config(&m.data_dir, UPSTREAM);
    hosted(&mut config);
    let report = regmirror::admin::gc(&config).await.unwrap();
    assert!(report.mirror_running);
    assert!(
        matches!(report.hosted, regmirror::admin::HostedGc::Requested),
        "{:?}",
        report.hosted
    );
    let request = m.data_dir.join("hosted/collect-requested");
    assert!(
        wait_until(Duration::from_secs(40), || !request.exists()).await,
        "the mirror's upkeep collected"
    );
    // The clients went on throughout: a few more rounds after it, then they stop.
    let after = rounds.load(Ordering::Relaxed);
    assert!(
        wait_until(Duration::from_secs(30), || rounds.load(Ordering::Relaxed)
            >= after + CLIENTS)
        .await,
        "the clients go on after the collection"
    );
    stop.store(true, Ordering::Relaxed);
    let mut pushed = Vec::new();
    for (i, client) in clients.into_iter().enumerate() {
        let images = client
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("client {i} failed while the collection ran: {e}"));
        pushed.push((format!("team/c{i}"), images));
    }

    // Gone: from the API and from the disk.
    for d in &gone_manifests {
        let repo = if *d == doomed.manifest_digest {
            APP
        } else {
            MULTI
        };
        assert_eq!(
            c.status(reqwest::Method::GET, &format!("/v2/{repo}/manifests/{d}"))
                .await,
            404,
            "{d}"
        );
        assert!(
            !hosted_path(&m, "manifests", d).exists(),
            "manifest {d} left on disk"
        );
    }
    for d in &gone_blobs {
        for repo in [APP, MULTI] {
            assert_eq!(
                c.status(reqwest::Method::GET, &format!("/v2/{repo}/blobs/{d}"))
                    .await,
                404,
                "{d}"
            );
        }
        assert!(
            !hosted_path(&m, "blobs", d).exists(),
            "blob {d} left on disk"
        );
    }
    // The deleted image's layer the clients pushed again stays, linked where it was.
    let reused = &doomed.layer_digests[2];
    c.verified(&format!("/v2/{APP}/blobs/{reused}"), reused)
        .await
        .unwrap();
    assert!(hosted_path(&m, "blobs", reused).is_file());

    // Kept: every image, whole and verified, with the layer it shared with a deleted one.
    c.pull(APP, "keep", &kept).await.unwrap();
    c.pull_index(MULTI, "latest", &multi).await.unwrap();
    let mut count = 0;
    for (repo, images) in &pushed {
        for (tag, img) in images {
            c.pull(repo, tag, img)
                .await
                .unwrap_or_else(|e| panic!("{repo}:{tag}: {e}"));
            count += 1;
        }
    }
    assert!(count >= 2 * CLIENTS, "{count} images pushed by the clients");

    // A collection on the stopped mirror's data dir takes what the clients'
    // last deletes left, and nothing a kept image needs.
    let tmp = m.stop().await;
    let mut config = test_config(tmp.path(), UPSTREAM);
    hosted(&mut config);
    let report = regmirror::admin::gc(&config).await.unwrap();
    assert!(
        matches!(report.hosted, regmirror::admin::HostedGc::Collected { .. }),
        "a stopped mirror's hosted content is collected by gc itself: {:?}",
        report.hosted
    );
    let m = MirrorHandle::start_in(tmp, UPSTREAM, hosted).await;
    let c = Client::of(&m);
    c.pull(APP, "keep", &kept).await.unwrap();
    c.pull_index(MULTI, "latest", &multi).await.unwrap();
    for (repo, images) in &pushed {
        for (tag, img) in images {
            c.pull(repo, tag, img)
                .await
                .unwrap_or_else(|e| panic!("{repo}:{tag} after gc: {e}"));
        }
    }
}

#[tokio::test]
async fn gc_on_a_stopped_mirror_collects_what_a_delete_by_digest_left_and_keeps_an_untagged_manifest(
) {
    let m = start_mirror(UPSTREAM, hosted).await;
    let c = Client::of(&m);
    let img = image(&[30, 31], "amd64");
    c.push(APP, "v1", &img, &[]).await.unwrap();
    assert_eq!(c.delete_manifest(APP, &img.manifest_digest).await, 202);
    // Untagged only: the manifest stays, by digest, with what it references.
    let untagged = image(&[32], "amd64");
    c.push(APP, "v2", &untagged, &[]).await.unwrap();
    assert_eq!(c.delete_manifest(APP, "v2").await, 202);
    // Past the grace period of what was linked.
    tokio::time::sleep(GRACE + Duration::from_secs(1)).await;
    let tmp = m.stop().await;
    let mut config = test_config(tmp.path(), UPSTREAM);
    hosted(&mut config);
    let report = regmirror::admin::gc(&config).await.unwrap();
    assert!(!report.mirror_running);
    match report.hosted {
        regmirror::admin::HostedGc::Collected { report, .. } => {
            assert_eq!((report.manifests, report.blobs), (1, 3), "{report:?}");
        }
        other => panic!("{other:?}"),
    }
    let m = MirrorHandle::start_in(tmp, UPSTREAM, hosted).await;
    for (d, _) in img.blobs() {
        assert!(!hosted_path(&m, "blobs", &d).exists(), "{d} left on disk");
    }
    assert_eq!(
        Client::of(&m)
            .status(reqwest::Method::GET, &format!("/v2/{APP}/manifests/v1"))
            .await,
        404
    );
    let c = Client::of(&m);
    c.pull(APP, &untagged.manifest_digest, &untagged)
        .await
        .unwrap();
    assert_eq!(
        c.status(reqwest::Method::GET, &format!("/v2/{APP}/manifests/v2"))
            .await,
        404
    );
}
