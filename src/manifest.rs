//! Manifest media types and the digests a manifest references. Pure
//! functions of the bytes; manifests are otherwise kept byte for byte.

use serde::Deserialize;

use crate::reference::Digest;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// The `Accept` header the mirror sends upstream: every type it can cache,
/// so one cached answer serves every modern client.
pub const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// The manifest media types the mirror stores from a bundle, where nothing
/// but the bundle vouches for them: each becomes the `Content-Type` the
/// manifest is served with, so an arbitrary string (`text/html`) must not.
/// The same four the mirror asks an upstream for ([`ACCEPT_ALL`]).
const KNOWN: [&str; 4] = [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST];

/// `s` as one of the known manifest media types, or `None`.
pub fn known_type(s: &str) -> Option<&'static str> {
    KNOWN.into_iter().find(|k| *k == s)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Shape {
    media_type: Option<String>,
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
    #[serde(default)]
    blobs: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Descriptor {
    digest: String,
}

/// The media type to serve a manifest with: the upstream's `Content-Type`
/// unless it is generic, else the document's own `mediaType`, else inferred
/// from its shape (an OCI manifest may omit `mediaType`). Either is taken
/// only as an `application/` type of media-type characters: it is served
/// back as `Content-Type`, and an upstream (or a document) must not make the
/// mirror serve `text/html` from its own origin.
pub fn media_type(content_type: Option<&str>, bytes: &[u8]) -> String {
    let declared = content_type
        .map(|c| c.split(';').next().unwrap_or("").trim())
        .filter(|c| *c != "application/json" && servable(c));
    if let Some(c) = declared {
        return c.to_owned();
    }
    match serde_json::from_slice::<Shape>(bytes) {
        Ok(Shape {
            media_type: Some(m),
            ..
        }) if servable(&m) => m,
        Ok(s) if !s.manifests.is_empty() => OCI_INDEX.to_owned(),
        _ => OCI_MANIFEST.to_owned(),
    }
}

/// An `application/<subtype>` media type whose subtype is made of the
/// characters RFC 6838 allows (letters, digits, `!#$&-^_.+`).
fn servable(t: &str) -> bool {
    t.strip_prefix("application/").is_some_and(|sub| {
        !sub.is_empty()
            && sub.len() <= 127
            && sub
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    })
}

/// Every digest the manifest points at (config, layers, child manifests,
/// artifact blobs): the content a repository holding this manifest holds.
pub fn references(bytes: &[u8]) -> Vec<Digest> {
    let Ok(shape) = serde_json::from_slice::<Shape>(bytes) else {
        return Vec::new();
    };
    shape
        .config
        .into_iter()
        .chain(shape.layers)
        .chain(shape.manifests)
        .chain(shape.blobs)
        .filter_map(|d| Digest::parse(&d.digest).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_application_types_are_served_back() {
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"digest":"{}"}}]}}"#,
            d('a')
        );
        let index = index.as_bytes();
        let docker = "application/vnd.docker.distribution.manifest.v2+json";
        assert_eq!(media_type(Some(docker), b"{}"), docker);
        assert_eq!(
            media_type(Some(&format!("{docker}; charset=utf-8")), b"{}"),
            docker
        );
        // An upstream's text/html, or a document's, is not served back.
        assert_eq!(media_type(Some("text/html"), index), OCI_INDEX);
        let html_doc = br#"{"schemaVersion":2,"mediaType":"text/html"}"#;
        assert_eq!(media_type(None, html_doc), OCI_MANIFEST);
        assert_eq!(
            media_type(Some("application/x<script>"), b"{}"),
            OCI_MANIFEST
        );
        assert_eq!(media_type(Some("application/"), b"{}"), OCI_MANIFEST);
        let helm = "application/vnd.cncf.helm.config.v1+json";
        let doc = format!(r#"{{"schemaVersion":2,"mediaType":"{helm}"}}"#);
        assert_eq!(media_type(Some("text/plain"), doc.as_bytes()), helm);
    }

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn references_of_manifest_and_index() {
        let m = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{}"}},"layers":[{{"digest":"{}"}},{{"digest":"bogus"}}]}}"#,
            d('a'),
            d('b')
        );
        let refs: Vec<String> = references(m.as_bytes())
            .iter()
            .map(|x| x.to_string())
            .collect();
        assert_eq!(refs, vec![d('a'), d('b')]);
        let i = format!(r#"{{"manifests":[{{"digest":"{}"}}]}}"#, d('c'));
        assert_eq!(references(i.as_bytes()).len(), 1);
        assert!(references(b"not json").is_empty());
    }

    #[test]
    fn media_type_sources() {
        assert_eq!(media_type(Some(DOCKER_MANIFEST), b"{}"), DOCKER_MANIFEST);
        let with_type = format!(r#"{{"mediaType":"{DOCKER_LIST}"}}"#);
        assert_eq!(
            media_type(Some("application/json"), with_type.as_bytes()),
            DOCKER_LIST
        );
        assert_eq!(
            media_type(None, br#"{"manifests":[{"digest":"x"}]}"#),
            OCI_INDEX
        );
        assert_eq!(media_type(None, br#"{"layers":[]}"#), OCI_MANIFEST);
    }

    #[test]
    fn known_types_are_the_four_the_mirror_asks_for() {
        for t in ACCEPT_ALL.split(", ") {
            assert_eq!(known_type(t), Some(t));
        }
        for t in [
            "text/html",
            "application/json",
            "",
            &format!("{OCI_MANIFEST} "),
        ] {
            assert_eq!(known_type(t), None, "{t:?}");
        }
    }
}
