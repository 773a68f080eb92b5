//! Issue 12, item 3: a blob whose upstream connection breaks mid-body is resumed with
//! `Range: bytes=<received>-` and its clients see nothing of it; an upstream that cannot
//! continue at the offset (a 200, a 206 elsewhere), or resumes that run out, fail the download
//! with an aborted body and nothing cached; an expired redirect URL and an expired token are
//! renewed on the way. Faults come from [`crate::fault_proxy`] between the mirror and the fake.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::{random_bytes, read_body, spawn_get, statuses, wait_until, Pending};
use crate::fault_proxy::{rig, Fault, Rig};
use crate::{report, scale};

const REPO: &str = "library/alpine";

fn blob_size() -> usize {
    scale::pick(8 << 20, 256 << 20)
}

fn path(digest: &str) -> String {
    format!("/v2/{REPO}/blobs/{digest}")
}

/// Starts `n` clients of `digest` while the upstream body waits at 1 MiB, so every one of
/// them follows the same download, and lets the body go on once all have their headers.
async fn clients_at_the_gate(r: &Rig, digest: &str, n: usize) -> Vec<Pending> {
    let mut pending: Vec<_> = (0..n)
        .map(|_| spawn_get(&r.m.client, r.m.url_for(&path(digest))))
        .collect();
    r.fake
        .wait_progress("the body to reach the gate", |p| p.paused >= 1)
        .await;
    let got = statuses(&mut pending, Duration::from_secs(20)).await;
    assert_eq!(got, vec![200; n], "every client follows the download");
    r.fake.release();
    pending
}

/// What each client's body was: (whole and right, aborted). Panics on a clean wrong end.
async fn outcomes(pending: Vec<Pending>, data: &[u8]) -> (usize, usize) {
    let (mut whole, mut aborted) = (0, 0);
    for p in pending {
        match p.body.await.expect("client task") {
            Ok(b) if b == data => whole += 1,
            Ok(b) => panic!("a clean end of a wrong body ({} bytes)", b.len()),
            Err(b) => {
                assert!(b.len() < data.len(), "aborted after every byte");
                aborted += 1;
            }
        }
    }
    (whole, aborted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_blob_is_resumed_and_every_client_gets_it_whole() {
    let r = rig(|c| c.upstream.retries = 3).await;
    let size = blob_size();
    let data = random_bytes(size, 31);
    let d = r.fake.add_blob(REPO, data.clone());
    let cut = (size / 2) as u64;
    let clients = scale::pick(4, 16);
    r.fake.pause_blobs_at(1 << 20);
    r.proxy.set(Fault::CutBody(cut), "/blobs/", Some(1));

    let started = Instant::now();
    let pending = clients_at_the_gate(&r, &d, clients).await;
    let (whole, aborted) = outcomes(pending, &data).await;
    let took = started.elapsed();
    assert_eq!((whole, aborted), (clients, 0), "every client gets the blob");
    assert!(r.m.committed(&d).await, "the resumed blob is cached");
    assert_eq!(
        r.blob_get_ranges(&d),
        vec![None, Some(format!("bytes={cut}-"))],
        "one whole GET, one Range GET from where the cut was"
    );
    let refetched = r.bytes_forwarded(&d) - size as u64;
    assert_eq!(refetched, 0, "no byte crossed the proxy twice");
    report::figure(
        "upstream cut mid-blob",
        "regmirror",
        json!({
            "size": size, "cut_at": cut, "clients": clients, "clients_whole": whole,
            "clients_aborted": aborted, "upstream_gets": 2, "range_gets": 1,
            "bytes_refetched": refetched,
            "upstream_bytes_sent_extra": r.fake.progress().bytes_sent.saturating_sub(size as u64),
            "ms": took.as_millis() as u64,
        }),
    );
    if scale::compare_distribution() {
        crate::stalls::distribution_under(&r, "upstream cut mid-blob", Fault::CutBody(cut), size)
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstream_that_cannot_continue_at_the_offset_fails_cleanly_and_the_next_pull_succeeds() {
    let r = rig(|c| c.upstream.retries = 3).await;
    let size = blob_size();
    let cut = (size / 2) as u64;
    let clients = scale::pick(3, 8);
    for (i, answer) in ["a 200", "a 206 elsewhere"].into_iter().enumerate() {
        let data = random_bytes(size, 40 + i as u64);
        let d = r.fake.add_blob(REPO, data.clone());
        r.fake.set(|f| match i {
            0 => f.resume.ignore_range = true,
            _ => f.resume.misplace_range = true,
        });
        r.fake.pause_blobs_at(1 << 20);
        r.proxy.set(Fault::CutBody(cut), "/blobs/", Some(1));

        let pending = clients_at_the_gate(&r, &d, clients).await;
        let (whole, aborted) = outcomes(pending, &data).await;
        assert_eq!(
            (whole, aborted),
            (0, clients),
            "{answer}: every body aborts"
        );
        let clean = wait_until(Duration::from_secs(10), || r.m.files_under("tmp") == 0).await;
        assert!(clean, "{answer}: the spool is left behind");
        assert!(!r.m.blob_path(&d).exists(), "{answer}: the blob was cached");
        assert_eq!(
            r.blob_get_ranges(&d),
            vec![None, Some(format!("bytes={cut}-"))],
            "{answer}: no second resume of an upstream that cannot"
        );

        r.fake.clear_faults();
        r.proxy.pass();
        assert!(r.m.blob(REPO, &d).await == data, "{answer}: the next pull");
        assert_eq!(r.blob_get_ranges(&d).len(), 3, "{answer}: a fresh GET");
        assert!(r.m.committed(&d).await);
        report::figure(
            &format!("upstream answers a resume with {answer}"),
            "regmirror",
            json!({
                "size": size, "clients": clients, "clients_aborted": aborted,
                "clean_wrong_ends": 0, "cached": false, "next_pull": "ok",
            }),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_redirect_url_is_renewed_and_the_blob_resumed() {
    let r = rig(|c| c.upstream.retries = 3).await;
    let size = blob_size();
    let data = random_bytes(size, 50);
    let d = r.fake.add_blob(REPO, data.clone());
    let cut = (size / 3) as u64;
    let proxy = r.proxy.url();
    r.fake.set(|f| {
        f.redirect_blobs = true;
        f.resume.cdn_base = Some(proxy);
        f.resume.cdn_single_use = true;
    });
    r.proxy.set(Fault::CutBody(cut), "/cdn/", Some(1));

    let body = read_body(r.m.get(&path(&d)).await.unwrap()).await;
    assert!(body.as_deref() == Ok(&data[..]), "the client gets the blob");
    assert!(r.m.committed(&d).await);
    let cdn: Vec<_> = r
        .fake
        .requests()
        .into_iter()
        .filter(|q| q.path.starts_with("/cdn/"))
        .map(|q| q.range)
        .collect();
    let at = Some(format!("bytes={cut}-"));
    assert_eq!(
        cdn,
        vec![None, at.clone(), at.clone()],
        "the cut URL, tried again (expired), then a fresh one"
    );
    assert_eq!(r.fake.expired_cdn_urls(), 1);
    assert_eq!(
        r.blob_get_ranges(&d),
        vec![None, at],
        "the registry was asked again for a redirect"
    );
    report::figure(
        "redirect URL expired mid-blob",
        "regmirror",
        json!({"size": size, "client": "whole", "registry_gets": 2, "cdn_gets": 3,
               "bytes_refetched": r.bytes_forwarded(&d) - size as u64}),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_token_mid_blob_is_renewed_and_the_blob_resumed() {
    let r = rig(|c| c.upstream.retries = 3).await;
    let size = blob_size();
    let data = random_bytes(size, 60);
    let d = r.fake.add_blob(REPO, data.clone());
    let cut = (size / 2) as u64;
    r.fake.pause_blobs_at(1 << 20);
    r.proxy.set(Fault::CutBody(cut), "/blobs/", Some(1));

    let p = spawn_get(&r.m.client, r.m.url_for(&path(&d)));
    r.fake
        .wait_progress("the body to reach the gate", |p| p.paused >= 1)
        .await;
    let tokens = r.fake.token_fetches().len();
    // The token the download holds is refused from its next use on.
    r.fake.set(|f| f.reject_next_token = true);
    r.fake.release();
    let (whole, _) = outcomes(vec![p], &data).await;
    assert_eq!(whole, 1, "the client gets the blob");
    assert!(r.m.committed(&d).await);
    assert_eq!(
        r.fake.rejected_tokens(),
        1,
        "the old token was refused once"
    );
    assert_eq!(r.fake.token_fetches().len(), tokens + 1, "one new token");
    assert_eq!(
        r.blob_get_ranges(&d),
        vec![None, Some(format!("bytes={cut}-"))]
    );
    report::figure(
        "token expired mid-blob",
        "regmirror",
        json!({"size": size, "client": "whole", "token_fetches": 1, "range_gets": 1}),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_resumes_run_out_the_download_fails_and_nothing_is_cached() {
    let retries = 2;
    let r = rig(|c| c.upstream.retries = retries).await;
    let size = blob_size();
    let data = random_bytes(size, 70);
    let d = r.fake.add_blob(REPO, data.clone());
    let each = 64 << 10;
    r.proxy.set(Fault::CutBody(each), "/blobs/", None);

    let started = Instant::now();
    let resp = r.m.get(&path(&d)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let got = match read_body(resp).await {
        Ok(b) => panic!("a clean end after every resume failed ({} bytes)", b.len()),
        Err(b) => b.len() as u64,
    };
    let took = started.elapsed();
    assert!(got <= each * (retries as u64 + 1), "got {got} bytes");
    r.m.assert_nothing_stored("after the resumes ran out").await;
    let ranges: Vec<_> = (0..=retries as u64)
        .map(|i| (i > 0).then(|| format!("bytes={}-", i * each)))
        .collect();
    assert_eq!(
        r.blob_get_ranges(&d),
        ranges,
        "one GET and {retries} resumes"
    );

    r.proxy.pass();
    assert!(r.m.blob(REPO, &d).await == data, "the next pull");
    assert_eq!(
        r.blob_get_ranges(&d).last(),
        Some(&None),
        "a fresh whole GET"
    );
    report::figure(
        "upstream cut on every resume",
        "regmirror",
        json!({"size": size, "retries": retries, "client": "aborted", "client_bytes": got,
               "upstream_gets": retries + 1, "cached": false, "ms": took.as_millis() as u64}),
    );
}
