//! Image references as people write them on a command line:
//! `alpine:3.19`, `docker.io/library/alpine:3.19`, `ghcr.io/org/app@sha256:…`.

use std::fmt;

use crate::reference::{Digest, ParseError, Reference, RepoName, Tag};

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// The registry named (`None`: the default upstream).
    pub registry: Option<String>,
    pub repo: RepoName,
    pub reference: Reference,
}

impl ImageRef {
    /// Parses `[registry/]repo[:tag][@digest]`; the tag defaults to `latest`,
    /// and a digest wins over a tag.
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        let (name_tag, digest) = match s.split_once('@') {
            Some((n, d)) => (n, Some(Digest::parse(d)?)),
            None => (s, None),
        };
        // A ':' after the last '/' separates the tag (a registry port comes before).
        let (name, tag) = match name_tag.rfind(':') {
            Some(i) if !name_tag[i..].contains('/') => (&name_tag[..i], Some(&name_tag[i + 1..])),
            _ => (name_tag, None),
        };
        let (registry, path) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (Some(first.to_owned()), rest)
            }
            _ => (None, name),
        };
        let reference = match (digest, tag) {
            (Some(d), _) => Reference::Digest(d),
            (None, Some(t)) => Reference::Tag(Tag::parse(t)?),
            (None, None) => Reference::Tag(Tag::parse("latest")?),
        };
        Ok(Self {
            registry,
            repo: RepoName::parse(path)?,
            reference,
        })
    }

    /// The name as the mirror's router sees it (`ghcr.io/org/app`, or the
    /// bare repository for the default upstream).
    pub fn routed_name(&self) -> RepoName {
        match &self.registry {
            Some(r) => self.repo.prefixed(r),
            None => self.repo.clone(),
        }
    }

    /// The `/v2/<name>` path prefix to ask a mirror for this image, where
    /// `default` is the mirror's default upstream name.
    pub fn path(&self, default: &str) -> String {
        match &self.registry {
            Some(r) if r != default => format!("/v2/{r}/{}", self.repo),
            _ => format!("/v2/{}", self.repo),
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(r) = &self.registry {
            write!(f, "{r}/")?;
        }
        match &self.reference {
            Reference::Tag(t) => write!(f, "{}:{t}", self.repo),
            Reference::Digest(d) => write!(f, "{}@{d}", self.repo),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        let r = ImageRef::parse("alpine").unwrap();
        assert_eq!((r.registry.as_deref(), r.repo.as_str()), (None, "alpine"));
        assert_eq!(r.reference.to_string(), "latest");
        let r = ImageRef::parse("docker.io/library/alpine:3.19").unwrap();
        assert_eq!(r.registry.as_deref(), Some("docker.io"));
        assert_eq!(r.repo.as_str(), "library/alpine");
        assert_eq!(r.path("docker.io"), "/v2/library/alpine");
        let d = format!("sha256:{}", "a".repeat(64));
        let r = ImageRef::parse(&format!("ghcr.io/org/app:1@{d}")).unwrap();
        assert_eq!(r.reference.to_string(), d);
        assert_eq!(r.path("docker.io"), "/v2/ghcr.io/org/app");
        assert_eq!(r.routed_name().as_str(), "ghcr.io/org/app");
        let r = ImageRef::parse("localhost/x:2").unwrap();
        assert_eq!(r.registry.as_deref(), Some("localhost"));
        assert!(ImageRef::parse("Alpine").is_err());
        assert!(ImageRef::parse("alpine:-bad").is_err());
        assert_eq!(
            ImageRef::parse("host:5000/a/b")
                .unwrap()
                .registry
                .as_deref(),
            Some("host:5000")
        );
        assert_eq!(
            ImageRef::parse("bitnami/redis:7").unwrap().to_string(),
            "bitnami/redis:7"
        );
    }
}
