//! Manifest media types and the digests a manifest references, and the
//! check of a pushed manifest. Pure functions of the bytes; manifests are
//! otherwise kept byte for byte.

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

/// What a pushed manifest says, checked: every descriptor's digest parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// The type it is served with (its `Content-Type`, or its own).
    pub media_type: String,
    /// Blobs it needs in its repository: config, layers, artifact blobs.
    pub blobs: Vec<Digest>,
    /// Manifests it needs in its repository (an index's children).
    pub children: Vec<Digest>,
    /// The manifest it refers to, which need not exist (yet).
    pub subject: Option<Digest>,
    /// For the referrers API: `artifactType`, else the config's media type.
    pub artifact_type: Option<String>,
    pub annotations: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PushedShape {
    schema_version: Option<u32>,
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: Option<PushedDescriptor>,
    layers: Option<Vec<PushedDescriptor>>,
    manifests: Option<Vec<PushedDescriptor>>,
    blobs: Option<Vec<PushedDescriptor>>,
    subject: Option<PushedDescriptor>,
    annotations: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PushedDescriptor {
    digest: String,
    media_type: Option<String>,
}

/// Checks a manifest a client pushes: JSON of schema version 2 with a
/// servable media type (`Content-Type` unless generic, else its own
/// `mediaType`), and every descriptor's digest well formed. The error says
/// what is wrong, for `MANIFEST_INVALID`.
pub fn check_pushed(content_type: Option<&str>, bytes: &[u8]) -> Result<Pushed, String> {
    let shape: PushedShape =
        serde_json::from_slice(bytes).map_err(|e| format!("not a manifest: {e}"))?;
    if shape.schema_version != Some(2) {
        return Err("schemaVersion must be 2 (schema 1 manifests are not taken)".into());
    }
    let declared = content_type
        .map(|c| c.split(';').next().unwrap_or("").trim())
        .filter(|c| !c.is_empty() && *c != "application/json");
    let media_type = match (declared, shape.media_type.as_deref()) {
        (Some(c), Some(m)) if c != m => {
            return Err(format!(
                "Content-Type {c:?} differs from the manifest's mediaType {m:?}"
            ))
        }
        (Some(c), _) | (None, Some(c)) => c.to_owned(),
        (None, None) if shape.manifests.is_some() => OCI_INDEX.to_owned(),
        (None, None) => OCI_MANIFEST.to_owned(),
    };
    if !servable(&media_type) {
        return Err(format!("{media_type:?} is not a manifest media type"));
    }
    let parse = |d: &PushedDescriptor| {
        Digest::parse(&d.digest).map_err(|e| format!("a descriptor's digest: {e}"))
    };
    let all = |list: &Option<Vec<PushedDescriptor>>| -> Result<Vec<Digest>, String> {
        list.iter().flatten().map(parse).collect()
    };
    let mut blobs: Vec<Digest> = shape.config.iter().map(parse).collect::<Result<_, _>>()?;
    blobs.extend(all(&shape.layers)?);
    blobs.extend(all(&shape.blobs)?);
    let children = all(&shape.manifests)?;
    if children.is_empty() && shape.manifests.is_none() && shape.config.is_none() {
        return Err("neither an image manifest (config, layers) nor an index (manifests)".into());
    }
    let subject = shape.subject.as_ref().map(parse).transpose()?;
    let artifact_type = shape
        .artifact_type
        .or_else(|| shape.config.and_then(|c| c.media_type));
    Ok(Pushed {
        media_type,
        blobs,
        children,
        subject,
        artifact_type,
        annotations: shape.annotations,
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
    fn a_pushed_manifest_is_checked_and_its_needs_listed() {
        let image = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.example+json","digest":"{}","size":2}},"layers":[{{"digest":"{}","size":1}}],"subject":{{"digest":"{}","size":3}}}}"#,
            d('a'),
            d('b'),
            d('c')
        );
        let p = check_pushed(Some(OCI_MANIFEST), image.as_bytes()).unwrap();
        assert_eq!(p.media_type, OCI_MANIFEST);
        assert_eq!(p.blobs.len(), 2);
        assert!(p.children.is_empty());
        assert_eq!(p.subject.unwrap().to_string(), d('c'));
        assert_eq!(
            p.artifact_type.as_deref(),
            Some("application/vnd.example+json")
        );
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"digest":"{}","size":1}}]}}"#,
            d('e')
        );
        let p = check_pushed(None, index.as_bytes()).unwrap();
        assert_eq!(p.media_type, OCI_INDEX);
        assert_eq!(p.children.len(), 1);
        for (ct, bad) in [
            (None, "not json".to_owned()),
            (None, r#"{"schemaVersion":1}"#.to_owned()),
            (None, r#"{"schemaVersion":2}"#.to_owned()),
            (
                None,
                r#"{"schemaVersion":2,"config":{"digest":"sha256:nope"}}"#.to_owned(),
            ),
            (Some(DOCKER_MANIFEST), image.clone()),
            (Some("text/html"), index.clone()),
        ] {
            assert!(check_pushed(ct, bad.as_bytes()).is_err(), "{bad}");
        }
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
