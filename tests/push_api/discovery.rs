//! Content discovery of hosted repositories: tags/list (sorted, `n`/`last`, `Link`),
//! `_catalog` with hosted and cached repositories together, and the referrers API answering
//! from pushed manifests with a `subject` (`OCI-Subject` on their PUT, `artifactType` and
//! annotations in the descriptors, the `artifactType` filter).

use crate::common::images::{sha256_digest, OCI_INDEX, OCI_MANIFEST};
use crate::common::{random_bytes, FakeUpstream};
use crate::push::{
    artifact, descriptor, get, hosted_mirror, index, push_blob, push_image, put_manifest,
    upstream_requests_for, APP, EMPTY_JSON, EMPTY_JSON_BLOB,
};
use serde_json::{json, Value};

/// The `tags` of a tags/list answer.
fn tags_of(v: &Value) -> Vec<String> {
    v["tags"]
        .as_array()
        .unwrap_or_else(|| panic!("no tags in {v}"))
        .iter()
        .map(|t| t.as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn tags_list_of_a_hosted_repository_is_sorted_and_pages() {
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    let img = push_image(&m, APP, "v3", vec![random_bytes(500, 30)]).await;
    for tag in ["v1", "latest", "v2", "alpha"] {
        put_manifest(&m, APP, tag, OCI_MANIFEST, &img.manifest)
            .await
            .expect(201);
    }
    let all = get(&m, &format!("/v2/{APP}/tags/list")).await.expect(200);
    let v = all.json();
    assert_eq!(v["name"], APP);
    assert_eq!(tags_of(&v), ["alpha", "latest", "v1", "v2", "v3"]);
    assert_eq!(all.header("link"), "", "no Link on a whole list");

    // Pages of two, following `Link`.
    let mut next = format!("/v2/{APP}/tags/list?n=2");
    let mut pages = Vec::new();
    for _ in 0..5 {
        let a = get(&m, &next).await.expect(200);
        pages.push(tags_of(&a.json()));
        let link = a.header("link");
        if link.is_empty() {
            break;
        }
        assert!(link.ends_with(r#">; rel="next""#), "Link {link}");
        next = link
            .trim_start_matches('<')
            .split('>')
            .next()
            .unwrap()
            .to_owned();
        assert!(
            next.starts_with(&format!("/v2/{APP}/tags/list?")),
            "Link {link}"
        );
    }
    assert_eq!(
        pages,
        [vec!["alpha", "latest"], vec!["v1", "v2"], vec!["v3"]]
    );

    // `last` is exclusive; `n=0` is an empty list without `Link`.
    let a = get(&m, &format!("/v2/{APP}/tags/list?n=2&last=latest"))
        .await
        .expect(200);
    assert_eq!(tags_of(&a.json()), ["v1", "v2"]);
    let a = get(&m, &format!("/v2/{APP}/tags/list?n=0"))
        .await
        .expect(200);
    assert!(tags_of(&a.json()).is_empty());
    assert_eq!(a.header("link"), "");
    assert!(upstream_requests_for(&fake, "/v2/myorg/").is_empty());
}

#[tokio::test]
async fn catalog_lists_hosted_repositories_beside_cached_ones() {
    let fake = FakeUpstream::start().await;
    let img = fake.add_image("library/alpine", "3.19", vec![random_bytes(500, 31)]);
    let m = hosted_mirror(&fake, |_| {}).await;
    m.get_ok("/v2/library/alpine/manifests/3.19").await;
    m.blob("library/alpine", &img.layer_digests[0]).await;
    push_image(&m, "myorg/tools", "v1", vec![random_bytes(500, 32)]).await;
    push_image(&m, APP, "v1", vec![random_bytes(500, 33)]).await;

    let v = get(&m, "/v2/_catalog").await.expect(200).json();
    let repos: Vec<&str> = v["repositories"]
        .as_array()
        .unwrap_or_else(|| panic!("no repositories in {v}"))
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    for want in ["library/alpine", APP, "myorg/tools"] {
        assert!(repos.contains(&want), "{want} not in {repos:?}");
    }
    let mut sorted = repos.clone();
    sorted.sort_unstable();
    assert_eq!(repos, sorted, "catalog not sorted");

    // Paged, hosted repositories in their place.
    let a = get(&m, "/v2/_catalog?n=1&last=library/alpine")
        .await
        .expect(200);
    assert_eq!(a.json()["repositories"], json!([APP]));
    assert!(!a.header("link").is_empty(), "no Link after {APP}");
    assert!(upstream_requests_for(&fake, "/v2/myorg/").is_empty());
}

/// The conformance suite's referrers setup, in small: two artifacts and an index refer to
/// an image; one artifact refers to a manifest nobody pushed.
#[tokio::test]
async fn referrers_list_the_manifests_pushed_with_a_subject() {
    const TYPE_A: &str = "application/vnd.example.sbom";
    const TYPE_B: &str = "application/vnd.example.signature";
    const TYPE_INDEX: &str = "application/vnd.example.bundle";
    let fake = FakeUpstream::start().await;
    let m = hosted_mirror(&fake, |_| {}).await;
    push_blob(&m, APP, EMPTY_JSON_BLOB).await;
    let layer_a = random_bytes(300, 34);
    let layer_b = random_bytes(300, 35);
    push_blob(&m, APP, &layer_a).await;
    push_blob(&m, APP, &layer_b).await;

    // A referrer pushed before its subject is accepted (spec: "in either order").
    let img = crate::common::images::build_image(
        vec![random_bytes(700, 36)],
        crate::common::images::Format::Oci,
        "amd64",
    );
    let subject = descriptor(OCI_MANIFEST, &img.manifest);
    // artifactType set, config the empty JSON.
    let a = artifact(&subject, Some(TYPE_A), EMPTY_JSON, &layer_a, "a");
    let put = put_manifest(&m, APP, &sha256_digest(&a), OCI_MANIFEST, &a)
        .await
        .expect(201);
    assert_eq!(put.header("oci-subject"), img.manifest_digest);

    for (_, b) in img.blobs() {
        push_blob(&m, APP, &b).await;
    }
    put_manifest(&m, APP, "v1", OCI_MANIFEST, &img.manifest)
        .await
        .expect(201);
    // No artifactType: the config's media type stands for it.
    let b = artifact(&subject, None, TYPE_B, &layer_b, "b");
    let put = put_manifest(&m, APP, &sha256_digest(&b), OCI_MANIFEST, &b)
        .await
        .expect(201);
    assert_eq!(put.header("oci-subject"), img.manifest_digest);
    // An index with a subject.
    let idx = index(
        vec![descriptor(OCI_MANIFEST, &a)],
        json!({"artifactType": TYPE_INDEX, "subject": subject, "annotations": {"org.example.note": "i"}}),
    );
    let put = put_manifest(&m, APP, &sha256_digest(&idx), OCI_INDEX, &idx)
        .await
        .expect(201);
    assert_eq!(put.header("oci-subject"), img.manifest_digest);
    // A manifest with no subject is no referrer and gets no OCI-Subject.
    let plain = push_image(&m, APP, "v2", vec![random_bytes(100, 37)]).await;

    let r = get(&m, &format!("/v2/{APP}/referrers/{}", img.manifest_digest))
        .await
        .expect(200);
    assert_eq!(r.header("content-type"), OCI_INDEX);
    let v = r.json();
    assert_eq!(v["schemaVersion"], 2);
    assert_eq!(v["mediaType"], OCI_INDEX);
    let mut got: Vec<Value> = v["manifests"].as_array().unwrap().clone();
    got.sort_by_key(|d| {
        d["annotations"]["org.example.note"]
            .as_str()
            .unwrap()
            .to_owned()
    });
    let want = [
        (&a, OCI_MANIFEST, TYPE_A, "a"),
        (&b, OCI_MANIFEST, TYPE_B, "b"),
        (&idx, OCI_INDEX, TYPE_INDEX, "i"),
    ];
    assert_eq!(got.len(), want.len(), "{v}");
    for (d, (bytes, media_type, artifact_type, note)) in got.iter().zip(want) {
        assert_eq!(d["digest"], sha256_digest(bytes), "{d}");
        assert_eq!(d["size"], bytes.len(), "{d}");
        assert_eq!(d["mediaType"], media_type, "{d}");
        assert_eq!(d["artifactType"], artifact_type, "{d}");
        assert_eq!(d["annotations"], json!({"org.example.note": note}), "{d}");
    }
    assert!(
        !v.to_string().contains(&plain.manifest_digest),
        "a manifest without subject listed: {v}"
    );

    // Filtered by artifactType.
    let r = get(
        &m,
        &format!(
            "/v2/{APP}/referrers/{}?artifactType={TYPE_B}",
            img.manifest_digest
        ),
    )
    .await
    .expect(200);
    assert_eq!(r.header("oci-filters-applied"), "artifactType");
    let v = r.json();
    assert_eq!(v["manifests"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["manifests"][0]["digest"], sha256_digest(&b));

    // An index without artifactType: listed without one (spec: "MUST be omitted").
    let bare = index(
        vec![descriptor(OCI_MANIFEST, &b)],
        json!({"subject": descriptor(OCI_MANIFEST, &plain.manifest)}),
    );
    put_manifest(&m, APP, &sha256_digest(&bare), OCI_INDEX, &bare)
        .await
        .expect(201);
    let r = get(
        &m,
        &format!("/v2/{APP}/referrers/{}", plain.manifest_digest),
    )
    .await
    .expect(200);
    let v = r.json();
    assert_eq!(v["manifests"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["manifests"][0]["digest"], sha256_digest(&bare));
    assert!(
        v["manifests"][0].get("artifactType").is_none(),
        "an index without artifactType listed with one: {v}"
    );

    // A referrer deleted is no longer listed.
    crate::push::delete(&m, &format!("/v2/{APP}/manifests/{}", sha256_digest(&b)))
        .await
        .expect(202);
    let r = get(&m, &format!("/v2/{APP}/referrers/{}", img.manifest_digest))
        .await
        .expect(200);
    let v = r.json();
    let listed: Vec<&str> = v["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["digest"].as_str().unwrap())
        .collect();
    let mut want = vec![sha256_digest(&a), sha256_digest(&idx)];
    want.sort();
    let mut listed_sorted = listed.clone();
    listed_sorted.sort_unstable();
    assert_eq!(listed_sorted, want, "after deleting {}", sha256_digest(&b));

    // A subject nobody pushed: its referrers are listed all the same (the conformance
    // suite's "GET request to missing manifest should yield 200").
    let ghost = descriptor(OCI_MANIFEST, b"{\"never\":\"pushed\"}");
    let c = artifact(&ghost, Some(TYPE_A), EMPTY_JSON, &layer_a, "c");
    let put = put_manifest(&m, APP, &sha256_digest(&c), OCI_MANIFEST, &c)
        .await
        .expect(201);
    assert_eq!(put.header("oci-subject"), ghost["digest"].as_str().unwrap());
    let r = get(
        &m,
        &format!("/v2/{APP}/referrers/{}", ghost["digest"].as_str().unwrap()),
    )
    .await
    .expect(200);
    let v = r.json();
    assert_eq!(v["manifests"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["manifests"][0]["digest"], sha256_digest(&c));

    // A digest that does not parse is 400 (spec: "a `<digest>` with an invalid syntax").
    let a = get(&m, &format!("/v2/{APP}/referrers/sha256:totallywrong")).await;
    a.expect_error(400, "DIGEST_INVALID");

    // A subject nobody refers to: an empty index, not 404.
    let r = get(
        &m,
        &format!("/v2/{APP}/referrers/{}", sha256_digest(b"nobody")),
    )
    .await
    .expect(200);
    assert_eq!(r.header("content-type"), OCI_INDEX);
    assert_eq!(r.json()["manifests"], json!([]));
    assert!(upstream_requests_for(&fake, "/v2/myorg/").is_empty());
}
