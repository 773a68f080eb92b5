//! Two registries through one mirror: the fixture's docker-registry as the default upstream
//! (docker.io) and a second docker-registry as `[[upstreams]]` named `registry.test`, holding
//! `library/other` (one layer shared with `small`) and a referrers index in the tag schema.
//! containerd reaches both through one `hosts.toml` per registry (`?ns=`), skopeo through a
//! `registries.conf` whose second mirror location carries the registry as a path.

use serde_json::{json, Value};

use crate::containerd::Containerd;
use crate::mirror::Options;
use crate::oci::{Blob, Content, Flavor, Layer, Layout, OCI_INDEX, OCI_MANIFEST};
use crate::push::{descriptor, sha256, Pusher};
use crate::skopeo::{dir_blobs, Skopeo};
use crate::world::World;
use crate::{assert_cached, assert_digest};

/// The second registry's name, as clients and the mirror's `[[upstreams]]` entry call it.
const SECOND: &str = "registry.test";
const OTHER: &str = "library/other";
/// The artifact type of the referrer pushed for `other:1`.
const SBOM: &str = "application/vnd.regmirror.e2e.sbom.v1+json";

/// What the second registry holds: `library/other` tagged `1` and `2` (one manifest), and a
/// referrers index for it under the `sha256-<hex>` tag.
struct Other {
    digest: String,
    /// Config and layers, sorted.
    blobs: Vec<String>,
    /// The layer `small` has too.
    shared: String,
    referrers_tag: String,
    referrers_index: Vec<u8>,
    /// The index's one descriptor: the artifact manifest with its `artifactType`.
    artifact: Value,
}

/// A world whose mirror (with `tools` checked) has the fixture's registry as its default
/// upstream and a second registry, holding [`Other`], as `registry.test`.
async fn two_registries(tools: &[&str]) -> (World, Other) {
    let mut world = World::upstream_only(tools).await;
    world.start_second_upstream().await;
    let other = push_other(&world).await;
    let upstreams = format!(
        r#"[{{name = "{SECOND}", url = "{}"}}]"#,
        world.second().url()
    );
    world
        .start_mirror_with(&Options::env(&[("REGMIRROR_UPSTREAMS", &upstreams)]))
        .await;
    (world, other)
}

/// Pushes `other:1`/`:2` to the second registry: its first layer is `small`'s (the same
/// bytes, read from the fixture's storage), its second its own; then an SBOM artifact whose
/// subject is `other:1`, listed in an index tagged `sha256-<hex of other:1>`.
async fn push_other(world: &World) -> Other {
    let small = world.image("small").platform("amd64");
    let stored = |digest: &str| {
        let hex = digest.trim_start_matches("sha256:");
        let path = world
            .fixture
            .storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data");
        std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    };
    let shared_bytes = stored(&small.layers[0]);
    let small_config: Value = serde_json::from_slice(&stored(&small.config)).unwrap();
    let shared = Layer {
        blob: Blob {
            digest: small.layers[0].clone(),
            size: shared_bytes.len() as u64,
        },
        diff_id: small_config["rootfs"]["diff_ids"][0]
            .as_str()
            .expect("small's first diff_id")
            .to_owned(),
    };
    let dir = world.dir("other-layout");
    let layout = Layout::create(&dir);
    let own = layout.add_layer(&[(
        "regmirror-e2e/other/hello.txt",
        Content::Text("other:1, from the second registry\n".into()),
    )]);
    let m = layout.add_image(Flavor::Oci, "linux", "amd64", &[shared, own.clone()]);
    let read = |digest: &str| {
        std::fs::read(
            dir.join("blobs/sha256")
                .join(digest.trim_start_matches("sha256:")),
        )
        .expect("read a layout blob")
    };

    let push = Pusher::new(world.second(), &world.issuer, OTHER);
    push.blob(&shared_bytes).await;
    push.blob(&read(&own.blob.digest)).await;
    push.blob(&read(&m.config.digest)).await;
    let manifest = read(&m.blob.digest);
    for tag in ["1", "2"] {
        push.manifest(tag, OCI_MANIFEST, &manifest).await;
    }

    let (empty, payload) = (b"{}", b"regmirror e2e: the SBOM of other:1\n");
    push.blob(empty).await;
    push.blob(payload).await;
    let artifact = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": SBOM,
        "config": descriptor("application/vnd.oci.empty.v1+json", empty),
        "layers": [descriptor("application/vnd.regmirror.e2e.sbom.layer", payload)],
        "subject": {"mediaType": OCI_MANIFEST, "digest": m.blob.digest, "size": m.blob.size},
    }))
    .unwrap();
    push.manifest(&sha256(&artifact), OCI_MANIFEST, &artifact)
        .await;
    let mut desc = descriptor(OCI_MANIFEST, &artifact);
    desc["artifactType"] = SBOM.into();
    let index = serde_json::to_vec(
        &json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [desc]}),
    )
    .unwrap();
    let referrers_tag = format!("sha256-{}", m.blob.digest.trim_start_matches("sha256:"));
    push.manifest(&referrers_tag, OCI_INDEX, &index).await;

    let mut blobs = vec![m.config.digest.clone(), own.blob.digest.clone()];
    blobs.push(small.layers[0].clone());
    blobs.sort();
    Other {
        digest: m.blob.digest,
        blobs,
        shared: small.layers[0].clone(),
        referrers_tag,
        referrers_index: index,
        artifact: desc,
    }
}

/// containerd's `hosts.toml` for `registry`, naming the mirror at `mirror` (host:port).
fn hosts_toml(registry: &str, mirror: &str) -> String {
    format!(
        "server = \"https://{registry}\"\n\n\
         [host.\"http://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
    )
}

/// skopeo's `registries.conf`: docker.io mirrored at `mirror`, registry.test at
/// `mirror/registry.test`.
fn registries_conf(mirror: &str) -> String {
    format!(
        "[[registry]]\nprefix = \"docker.io\"\nlocation = \"docker.io\"\n\n\
         [[registry.mirror]]\nlocation = \"{mirror}\"\ninsecure = true\n\n\
         [[registry]]\nprefix = \"{SECOND}\"\nlocation = \"{SECOND}\"\n\n\
         [[registry.mirror]]\nlocation = \"{mirror}/{SECOND}\"\ninsecure = true\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_and_skopeo_pull_from_two_registries_through_one_mirror() {
    let (world, other) = two_registries(&["containerd", "ctr"]).await;
    let mirror = world.mirror().addr();
    let small = world.image("small");
    let other_ref = format!("{SECOND}/{OTHER}:1");

    let ctr = Containerd::start(&world.dir("ct"), Some(&mirror)).await;
    ctr.write_hosts(SECOND, &hosts_toml(SECOND, &mirror));
    ctr.pull(&small.docker_io(), &[]).await;
    ctr.pull(&other_ref, &[]).await;
    let got = ctr.image_digest(&small.docker_io()).await;
    assert_digest("ctr", small, &got, &small.digest);
    let got = ctr.image_digest(&other_ref).await;
    assert_eq!(got, other.digest, "ctr's digest of {other_ref}");

    let mark = world.mirror().log_mark();
    let skopeo = Skopeo::with_registries_conf(&world.dir("skopeo"), &registries_conf(&mirror));
    let out = world.dir("s-small");
    let got = skopeo.pull_to_dir(&small.docker_io(), &out, false).await;
    assert_digest("skopeo", small, &got, &small.digest);
    assert_eq!(
        dir_blobs(&out),
        small.blobs(),
        "blobs skopeo stored for small"
    );
    let out = world.dir("s-other");
    let got = skopeo.pull_to_dir(&other_ref, &out, false).await;
    assert_eq!(got, other.digest, "skopeo's digest of {other_ref}");
    assert_eq!(
        dir_blobs(&out),
        other.blobs,
        "blobs skopeo stored for other"
    );
    // skopeo's requests arrived with the registry as a path prefix.
    let prefixed = format!("{SECOND}/{OTHER}");
    world
        .mirror()
        .assert_served_blobs(mark, &prefixed, &other.blobs, "hit");

    // Every blob came once from the registry that has it; the layer both have, fetched for
    // `small` first, never from the second.
    world.assert_blob_gets(small, &small.blobs(), 1, "after pulls from both registries");
    let second = world.second();
    let gets: Vec<(String, usize)> = other
        .blobs
        .iter()
        .map(|b| (b.clone(), second.blob_gets(OTHER, b)))
        .collect();
    let want: Vec<(String, usize)> = other
        .blobs
        .iter()
        .map(|b| (b.clone(), usize::from(*b != other.shared)))
        .collect();
    assert_eq!(
        gets,
        want,
        "GETs of other's blobs at {SECOND} (the shared one is {})\n{}\n--- mirror log ---\n{}",
        other.shared,
        second.logs(),
        crate::procs::tail(&world.mirror().log(), 80)
    );
    assert_cached(&world, &other.blobs);
}

/// `GET path` from the mirror: status, `Link`, `Content-Type`, `OCI-Filters-Applied`, body.
async fn get(world: &World, path: &str) -> (u16, [String; 3], Vec<u8>) {
    let resp = reqwest::Client::new()
        .get(format!("http://{}{path}", world.mirror().addr()))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let h = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let headers = [h("link"), h("content-type"), h("oci-filters-applied")];
    let status = resp.status().as_u16();
    (status, headers, resp.bytes().await.unwrap().to_vec())
}

/// `GET path` from the mirror, asserting 200: the JSON body and the `Link` header.
async fn get_json(world: &World, path: &str) -> (Value, String) {
    let (status, [link, ..], body) = get(world, path).await;
    let text = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(
        status,
        200,
        "GET {path}: {text}\n--- mirror log ---\n{}",
        crate::procs::tail(&world.mirror().log(), 40)
    );
    let v = serde_json::from_slice(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {text}"));
    (v, link)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_lists_and_referrers_of_two_registries_through_the_mirror() {
    let (world, other) = two_registries(&[]).await;
    let small = world.image("small");
    let tags = |v: &Value| v["tags"].clone();

    let (v, link) = get_json(&world, "/v2/library/small/tags/list?ns=docker.io").await;
    assert_eq!(
        (tags(&v), link.as_str()),
        (json!(["1"]), ""),
        "small's tags"
    );
    let p = format!("/v2/{SECOND}/{OTHER}/tags/list");
    let all = json!(["1", "2", other.referrers_tag]);
    let (v, link) = get_json(&world, &p).await;
    assert_eq!((tags(&v), link.as_str()), (all, ""), "other's tags");
    let (v, link) = get_json(&world, &format!("{p}?n=2")).await;
    let next = format!("{p}?n=2&last=2");
    assert_eq!(
        (tags(&v), link),
        (json!(["1", "2"]), format!("<{next}>; rel=\"next\""))
    );
    let (v, link) = get_json(&world, &next).await;
    assert_eq!(
        (tags(&v), link.as_str()),
        (json!([other.referrers_tag]), "")
    );
    let (v, link) = get_json(
        &world,
        &format!("/v2/{OTHER}/tags/list?ns={SECOND}&n=1&last=1"),
    )
    .await;
    let want = format!("</v2/{OTHER}/tags/list?n=1&last=2&ns={SECOND}>; rel=\"next\"");
    assert_eq!((tags(&v), link), (json!(["2"]), want), "by ns");
    // The default registry has no library/other: registries never mix by name.
    let (status, _, body) = get(&world, &format!("/v2/{OTHER}/tags/list")).await;
    let text = String::from_utf8_lossy(&body);
    assert!(
        status == 404 && text.contains("NAME_UNKNOWN"),
        "default registry's {OTHER}: {status} {text}"
    );

    // Referrers: docker-registry 2.8 has no API, so the tag schema's index, byte for byte.
    let r = format!("/v2/{SECOND}/{OTHER}/referrers/{}", other.digest);
    let (status, [_, ctype, filters], body) = get(&world, &r).await;
    assert_eq!(
        (status, ctype.as_str(), filters.as_str()),
        (200, OCI_INDEX, ""),
        "GET {r}"
    );
    assert_eq!(
        String::from_utf8_lossy(&body),
        String::from_utf8_lossy(&other.referrers_index),
        "GET {r}"
    );
    let api = format!("/v2/{OTHER}/referrers/{}", other.digest);
    assert!(
        world
            .second()
            .served()
            .iter()
            .any(|s| s.path == api && s.status == 404),
        "the mirror should have tried {SECOND}'s referrers API first (answered 404)"
    );
    let by_ns = format!("/v2/{OTHER}/referrers/{}?ns={SECOND}", other.digest);
    assert_eq!(
        get(&world, &by_ns).await.2,
        other.referrers_index,
        "GET {by_ns}"
    );
    let encoded: String = url::form_urlencoded::byte_serialize(SBOM.as_bytes()).collect();
    for (artifact_type, want) in [
        (encoded.as_str(), json!([other.artifact])),
        ("application/x.none", json!([])),
    ] {
        let path = format!("{r}?artifactType={artifact_type}");
        let (status, [_, ctype, filters], body) = get(&world, &path).await;
        assert_eq!(
            (status, ctype.as_str(), filters.as_str()),
            (200, OCI_INDEX, "artifactType"),
            "GET {path}"
        );
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["manifests"], want, "GET {path}");
    }
    // small has no referrers on the default registry: an empty index.
    let (v, _) = get_json(
        &world,
        &format!("/v2/library/small/referrers/{}", small.digest),
    )
    .await;
    assert_eq!(
        v,
        json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []})
    );

    // The catalog names both registries' repositories as clients do.
    let (v, _) = get_json(&world, "/v2/_catalog").await;
    let repos: Vec<&str> = v["repositories"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for want in ["library/small".to_owned(), format!("{SECOND}/{OTHER}")] {
        assert!(
            repos.contains(&want.as_str()),
            "the catalog lacks {want}: {repos:?}"
        );
    }
}
