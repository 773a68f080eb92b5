//! Listings across upstreams: tag lists (per upstream, fetched whole and paginated here,
//! kept for outages and offline restarts), the catalog of cached repositories, and referrers
//! (the upstream's API passed through, the `sha256-<hex>` tag schema, or an empty index).

use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};

use super::{assert_manifest, fakes_and_mirror, upstream, HEX};
use crate::common::images::{sha256_digest, ImageInfo, OCI_INDEX, OCI_MANIFEST};
use crate::common::referrers_api::ReferrersApi;
use crate::common::{header, json, random_bytes, start_mirror, FakeUpstream, MirrorHandle};

/// `GET path` through the mirror: the tags (or repositories, under `key`) and the Link header.
async fn page(m: &MirrorHandle, path: &str, key: &str) -> (Vec<String>, String) {
    let r = m.get(path).await.unwrap();
    assert_eq!(r.status(), 200, "GET {path}");
    let link = header(&r, "link");
    let v = json(r).await;
    let items = v[key]
        .as_array()
        .unwrap_or_else(|| panic!("GET {path}: no {key} array in {v}"))
        .iter()
        .map(|t| t.as_str().unwrap().to_owned())
        .collect();
    (items, link)
}

/// Follows `Link: <...>; rel="next"` from `first` to the end; returns everything listed.
async fn follow(m: &MirrorHandle, first: &str, key: &str) -> Vec<String> {
    let (mut all, mut link) = page(m, first, key).await;
    for _ in 0..100 {
        if link.is_empty() {
            return all;
        }
        let next = link
            .strip_prefix('<')
            .and_then(|l| l.strip_suffix(">; rel=\"next\""))
            .unwrap_or_else(|| panic!("malformed Link after {first}: {link}"));
        let (items, l) = page(m, next, key).await;
        assert!(!items.is_empty(), "{next}: a Link to an empty page");
        all.extend(items);
        link = l;
    }
    panic!("{first}: the Link headers never end");
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test]
async fn tag_lists_are_per_upstream_and_paginated_locally() {
    let (fakes, m) = fakes_and_mirror(2, |_| {}).await;
    let img = fakes[1].add_image("org/app", "e", vec![random_bytes(100, 1)]);
    for t in ["c", "a", "d", "b"] {
        fakes[1].tag("org/app", t, &img.manifest_digest);
    }
    let mine = fakes[0].add_image("org/app", "1", vec![random_bytes(100, 2)]);
    fakes[0].tag("org/app", "2", &mine.manifest_digest);

    let all = ["a", "b", "c", "d", "e"];
    let p = "/v2/ghcr.io/org/app/tags/list";
    let link = |q: &str| format!("<{p}?{q}>; rel=\"next\"");
    let cases: Vec<(String, Vec<&str>, String)> = vec![
        (p.to_owned(), all.to_vec(), String::new()),
        (format!("{p}?n=0"), vec![], String::new()),
        (format!("{p}?n=5"), all.to_vec(), String::new()),
        (format!("{p}?n=10"), all.to_vec(), String::new()),
        (format!("{p}?n=2"), vec!["a", "b"], link("n=2&last=b")),
        (
            format!("{p}?n=2&last=b"),
            vec!["c", "d"],
            link("n=2&last=d"),
        ),
        (format!("{p}?n=2&last=d"), vec!["e"], String::new()),
        (format!("{p}?last=b"), vec!["c", "d", "e"], String::new()),
        (format!("{p}?last=bb"), vec!["c", "d", "e"], String::new()),
        (format!("{p}?last=e"), vec![], String::new()),
        (format!("{p}?last=z&n=3"), vec![], String::new()),
        (
            "/v2/org/app/tags/list?n=2&ns=ghcr.io".to_owned(),
            vec!["a", "b"],
            "</v2/org/app/tags/list?n=2&last=b&ns=ghcr.io>; rel=\"next\"".to_owned(),
        ),
        (
            "/v2/org/app/tags/list?ns=ghcr.io&n=3&last=a".to_owned(),
            vec!["b", "c", "d"],
            "</v2/org/app/tags/list?n=3&last=d&ns=ghcr.io>; rel=\"next\"".to_owned(),
        ),
        (
            "/v2/org/app/tags/list".to_owned(),
            vec!["1", "2"],
            String::new(),
        ),
        (
            "/v2/docker.io/org/app/tags/list?n=1".to_owned(),
            vec!["1"],
            { "</v2/docker.io/org/app/tags/list?n=1&last=1>; rel=\"next\"".to_owned() },
        ),
    ];
    for (path, tags, want_link) in cases {
        let (got, got_link) = page(&m, &path, "tags").await;
        assert_eq!(got, strings(&tags), "GET {path}: tags");
        assert_eq!(got_link, want_link, "GET {path}: Link");
    }
    for first in [
        format!("{p}?n=2"),
        "/v2/org/app/tags/list?n=1&ns=ghcr.io".to_owned(),
    ] {
        assert_eq!(
            follow(&m, &first, "tags").await,
            strings(&all),
            "following from {first}"
        );
    }
    // Two requests for docker.io's list; the second within the tag TTL, from memory.
    assert_eq!(
        fakes[0].count_prefix("GET", "/v2/org/app/tags/list"),
        1,
        "docker.io's list GETs"
    );
}

#[tokio::test]
async fn the_upstreams_tag_pages_are_all_fetched() {
    let (fakes, m) = fakes_and_mirror(2, |_| {}).await;
    let img = fakes[1].add_image("big/list", "t0000", vec![random_bytes(100, 1)]);
    let all: Vec<String> = (0..2500).map(|i| format!("t{i:04}")).collect();
    for t in &all {
        fakes[1].tag("big/list", t, &img.manifest_digest);
    }
    let (got, link) = page(&m, "/v2/ghcr.io/big/list/tags/list", "tags").await;
    assert_eq!(
        (got.len(), link.as_str()),
        (2500, ""),
        "the whole list, unpaged"
    );
    assert_eq!(got, all);
    let pages = fakes[1].count_prefix("GET", "/v2/big/list/tags/list");
    assert!(
        pages >= 3,
        "the fake pages by the mirror's n; it was asked {pages} time(s)"
    );
    let (got, link) = page(
        &m,
        "/v2/ghcr.io/big/list/tags/list?n=1000&last=t0999",
        "tags",
    )
    .await;
    assert_eq!(got, all[1000..2000].to_vec());
    assert_eq!(
        link,
        "</v2/ghcr.io/big/list/tags/list?n=1000&last=t1999>; rel=\"next\""
    );
}

#[tokio::test]
async fn tag_lists_are_served_from_the_kept_list_when_the_upstream_is_down() {
    // A short header timeout, for the case of an upstream that never answers.
    let (fakes, m) = fakes_and_mirror(2, |c| {
        c.upstreams[0].timeout = Duration::from_millis(300);
    })
    .await;
    let img = fakes[1].add_image("org/app", "a", vec![random_bytes(100, 1)]);
    for t in ["b", "c"] {
        fakes[1].tag("org/app", t, &img.manifest_digest);
    }
    fakes[1].add_image("org/never", "1", vec![random_bytes(100, 2)]);
    let p = "/v2/ghcr.io/org/app/tags/list";
    assert_eq!(page(&m, p, "tags").await.0, strings(&["a", "b", "c"]));

    let want_link = format!("<{p}?n=2&last=b>; rel=\"next\"");
    for what in ["503", "429", "hanging", "stopped"] {
        match what {
            "503" => fakes[1].fail_with(503, None),
            "429" => fakes[1].fail_with(429, Some("1")),
            "hanging" => fakes[1].set(|f| f.hang = Some(String::new())),
            _ => fakes[1].stop(),
        }
        assert_eq!(
            page(&m, p, "tags").await.0,
            strings(&["a", "b", "c"]),
            "upstream {what}"
        );
        let (got, link) = page(&m, &format!("{p}?n=2"), "tags").await;
        assert_eq!(
            (got, link),
            (strings(&["a", "b"]), want_link.clone()),
            "upstream {what}, n=2"
        );
        let via_ns = page(&m, "/v2/org/app/tags/list?ns=ghcr.io&last=a", "tags")
            .await
            .0;
        assert_eq!(via_ns, strings(&["b", "c"]), "upstream {what}, by ns");
    }
    // A list never fetched has nothing to fall back on.
    let r = m.get("/v2/ghcr.io/org/never/tags/list").await.unwrap();
    assert!(
        r.status().is_server_error(),
        "a list never kept, upstream down: {}",
        r.status()
    );

    // The kept list survives a restart into offline mode.
    let url = fakes[0].url();
    let tmp = m.stop().await;
    let ghcr = fakes[1].url();
    let m = MirrorHandle::start_in(tmp, &url, |c| {
        c.offline = true;
        c.upstreams = vec![upstream("ghcr.io", &ghcr)];
    })
    .await;
    let (got, link) = page(&m, &format!("{p}?n=2&last=a"), "tags").await;
    assert_eq!(
        (got, link),
        (strings(&["b", "c"]), String::new()),
        "offline"
    );
}

#[tokio::test]
async fn the_catalog_lists_cached_repositories_of_every_upstream() {
    let (fakes, m) = fakes_and_mirror(2, |_| {}).await;
    let alpine = fakes[0].add_image("library/alpine", "1", vec![random_bytes(100, 1)]);
    let app0 = fakes[0].add_image("org/app", "1", vec![random_bytes(100, 2)]);
    let app1 = fakes[1].add_image("org/app", "1", vec![random_bytes(100, 3)]);
    fakes[1].add_image("team/tool", "1", vec![random_bytes(100, 4)]);
    assert_eq!(
        page(&m, "/v2/_catalog", "repositories").await.0,
        Vec::<String>::new()
    );

    assert_manifest(&m, "/v2/alpine/manifests/1", &alpine, None).await;
    assert_manifest(&m, "/v2/org/app/manifests/1", &app0, None).await;
    assert_manifest(&m, "/v2/org/app/manifests/1?ns=ghcr.io", &app1, None).await;
    page(&m, "/v2/ghcr.io/team/tool/tags/list", "tags").await;

    let all = strings(&[
        "ghcr.io/org/app",
        "ghcr.io/team/tool",
        "library/alpine",
        "org/app",
    ]);
    let c = "/v2/_catalog";
    assert_eq!(
        page(&m, c, "repositories").await,
        (all.clone(), String::new())
    );
    let cases: [(String, &[String], bool); 7] = [
        (format!("{c}?n=0"), &[], false),
        (format!("{c}?n=4"), &all, false),
        (format!("{c}?n=9"), &all, false),
        (format!("{c}?n=2"), &all[..2], true),
        (format!("{c}?last=library/alpine"), &all[3..], false),
        (format!("{c}?n=1&last=ghcr.io/org/app"), &all[1..2], true),
        (format!("{c}?last=zzz"), &[], false),
    ];
    for (path, want, more) in cases {
        let (got, link) = page(&m, &path, "repositories").await;
        assert_eq!(got, want.to_vec(), "GET {path}");
        assert_eq!(!link.is_empty(), more, "GET {path}: Link {link:?}");
        if more {
            assert!(
                link.starts_with("</v2/_catalog?") && link.ends_with(">; rel=\"next\""),
                "GET {path}: Link {link}"
            );
        }
    }
    for n in 1..=3 {
        assert_eq!(
            follow(&m, &format!("{c}?n={n}"), "repositories").await,
            all,
            "n={n}, following Link"
        );
    }
}

/// An artifact manifest for `subject` and the referrers-index descriptor naming it.
fn artifact(subject: &ImageInfo, artifact_type: &str, payload: &[u8]) -> (Bytes, Value) {
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha256_digest(b"{}"), "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": sha256_digest(payload), "size": payload.len()}],
        "subject": {"mediaType": subject.media_type, "digest": subject.manifest_digest, "size": subject.manifest.len()},
    });
    let bytes = Bytes::from(serde_json::to_vec(&manifest).unwrap());
    let desc = json!({
        "mediaType": OCI_MANIFEST,
        "digest": sha256_digest(&bytes),
        "size": bytes.len(),
        "artifactType": artifact_type,
    });
    (bytes, desc)
}

/// `s` encoded for a query (the `+` of `+json` would arrive as a space).
fn q(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

const SIG: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";
const SBOM: &str = "application/spdx+json";

/// GETs a referrers answer: asserts 200 and the OCI index type; returns the body, the
/// `OCI-Filters-Applied` header and the `OCI-Namespace` header.
async fn referrers(m: &MirrorHandle, path: &str) -> (Bytes, String, String) {
    let r = m.get(path).await.unwrap();
    assert_eq!(r.status(), 200, "GET {path}");
    assert_eq!(
        header(&r, "content-type"),
        OCI_INDEX,
        "GET {path}: Content-Type"
    );
    let (filters, ns) = (
        header(&r, "oci-filters-applied"),
        header(&r, "oci-namespace"),
    );
    (r.bytes().await.unwrap(), filters, ns)
}

fn descriptors(body: &[u8]) -> Vec<Value> {
    let v: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(v["schemaVersion"], 2, "referrers index: {v}");
    assert_eq!(v["mediaType"], OCI_INDEX, "referrers index: {v}");
    v["manifests"]
        .as_array()
        .unwrap_or_else(|| panic!("no manifests: {v}"))
        .clone()
}

#[tokio::test]
async fn referrers_from_the_api_the_tag_schema_or_none() {
    // docker.io: a fake without the API (404), the tag schema; ghcr.io: the API; quay.io:
    // a fake without the API and without referrers tags.
    let (docker, quay) = (FakeUpstream::start().await, FakeUpstream::start().await);
    let api = ReferrersApi::start().await;
    let m = start_mirror(&docker.url(), |c| {
        c.upstreams = vec![
            upstream("ghcr.io", api.url()),
            upstream("quay.io", &quay.url()),
        ];
    })
    .await;

    // ghcr.io: passed through byte for byte, kept for the tag TTL.
    let subject = docker.add_image("org/app", "1", vec![random_bytes(100, 1)]);
    let (_, sig) = artifact(&subject, SIG, b"signature");
    let (_, sbom) = artifact(&subject, SBOM, b"sbom");
    api.set(
        "org/app",
        &subject.manifest_digest,
        vec![sig.clone(), sbom.clone()],
    );
    let want = api.index_bytes("org/app", &subject.manifest_digest);
    let path = format!("/v2/ghcr.io/org/app/referrers/{}", subject.manifest_digest);
    assert_eq!(
        referrers(&m, &path).await,
        (want.clone(), String::new(), String::new())
    );
    assert_eq!(referrers(&m, &path).await.0, want, "again");
    let by_ns = format!(
        "/v2/org/app/referrers/{}?ns=ghcr.io",
        subject.manifest_digest
    );
    let (body, _, ns) = referrers(&m, &by_ns).await;
    assert_eq!((body, ns.as_str()), (want, "ghcr.io"), "by ns");
    let asked = format!("/v2/org/app/referrers/{}", subject.manifest_digest);
    assert_eq!(
        api.requests()
            .iter()
            .filter(|p| p.starts_with(&asked))
            .count(),
        1,
        "API requests: {:?}",
        api.requests()
    );
    let (body, filters, _) = referrers(&m, &format!("{path}?artifactType={}", q(SBOM))).await;
    assert_eq!(
        (descriptors(&body), filters.as_str()),
        (vec![sbom.clone()], "artifactType")
    );

    // docker.io: no API, so the `sha256-<hex>` tag's index, exactly as the upstream has it.
    let mut held = Vec::new();
    for (kind, payload) in [(SIG, &b"sig"[..]), (SBOM, b"sbom"), (SIG, b"sig2")] {
        let (bytes, desc) = artifact(&subject, kind, payload);
        docker.put_manifest("org/app", OCI_MANIFEST, bytes);
        held.push(desc);
    }
    let index = Bytes::from(
        serde_json::to_vec_pretty(
            &json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": held}),
        )
        .unwrap(),
    );
    let index_digest = docker.put_manifest("org/app", OCI_INDEX, index.clone());
    let hex = subject.manifest_digest.trim_start_matches("sha256:");
    docker.tag("org/app", &format!("sha256-{hex}"), &index_digest);
    let path = format!("/v2/org/app/referrers/{}", subject.manifest_digest);
    assert_eq!(
        referrers(&m, &path).await,
        (index, String::new(), String::new())
    );
    assert_eq!(
        docker.count("GET", &path),
        1,
        "docker.io's referrers API was tried"
    );
    let (body, filters, _) = referrers(&m, &format!("{path}?artifactType={}", q(SIG))).await;
    assert_eq!(
        (descriptors(&body), filters.as_str()),
        (vec![held[0].clone(), held[2].clone()], "artifactType")
    );
    let (body, filters, _) =
        referrers(&m, &format!("{path}?artifactType=application/x-none")).await;
    assert_eq!(
        (descriptors(&body), filters.as_str()),
        (vec![], "artifactType"),
        "no match"
    );
    let by_ns = format!(
        "/v2/org/app/referrers/{}?ns=docker.io",
        subject.manifest_digest
    );
    let (body, _, ns) = referrers(&m, &by_ns).await;
    assert_eq!(
        (descriptors(&body).len(), ns.as_str()),
        (3, "docker.io"),
        "by ns"
    );

    // quay.io: no API and no tag, or a tag that is no index: an empty index.
    let lone = quay.add_image("org/app", "1", vec![random_bytes(100, 2)]);
    let not_index = quay.add_image("org/app", "2", vec![random_bytes(100, 3)]);
    let other_hex = not_index.manifest_digest.trim_start_matches("sha256:");
    quay.tag(
        "org/app",
        &format!("sha256-{other_hex}"),
        &lone.manifest_digest,
    );
    for subject in [
        &lone.manifest_digest,
        &not_index.manifest_digest,
        &format!("sha256:{HEX}"),
    ] {
        let path = format!("/v2/quay.io/org/app/referrers/{subject}");
        let (body, filters, _) = referrers(&m, &path).await;
        let v: Value = serde_json::from_slice(&body).unwrap();
        let empty = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []});
        assert_eq!((v, filters.as_str()), (empty, ""), "GET {path}");
        let (body, filters, _) = referrers(&m, &format!("{path}?artifactType={}", q(SIG))).await;
        assert_eq!(
            (descriptors(&body), filters.as_str()),
            (vec![], "artifactType")
        );
    }
}
