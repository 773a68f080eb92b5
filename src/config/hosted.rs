//! `[hosted]`: the repositories that live in this registry (pushed to it,
//! never fetched from an upstream), and the check that they do not hide a
//! mirrored registry's repositories unless the operator says so.

use std::time::Duration;

use serde::Deserialize;

use super::{humantime_serde_compat, ByteSize, UpstreamConfig};

/// Docker Hub's official images: what every client pulls through a mirror
/// as `library/<name>`.
const HUB_OFFICIAL: &str = "library/";

/// `[hosted]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HostedConfig {
    /// Globs over repository names (`myorg/*`, `hello-world`): pushes go
    /// there, pulls of them never go upstream. None by default.
    pub repos: Vec<String>,
    /// Bytes the hosted repositories may take, apart from the cache's
    /// budget; a push past it is refused. Unset: no limit.
    pub max_size: Option<ByteSize>,
    /// Whether manifests, tags and blobs of hosted repositories may be
    /// deleted through the API.
    pub delete: bool,
    /// An upload nobody touched for this long is removed; a blob no
    /// manifest references is kept this long after its last link, pull or
    /// check (the grace period of `hosted::gc`).
    #[serde(with = "humantime_serde_compat")]
    pub upload_ttl: Duration,
    /// Hosted globs the operator accepts hiding a mirrored registry's
    /// repositories (`library/*` of Docker Hub, `ghcr.io/*`): each such
    /// glob of `repos` must be listed here too, or the mirror does not start.
    pub shadowing: Vec<String>,
}

impl Default for HostedConfig {
    fn default() -> Self {
        Self {
            repos: Vec::new(),
            max_size: None,
            delete: false,
            upload_ttl: Duration::from_secs(24 * 3600),
            shadowing: Vec::new(),
        }
    }
}

impl HostedConfig {
    /// Whether `repo` (a name as the client sent it) is hosted here.
    pub fn hosts(&self, repo: &str) -> bool {
        self.repos
            .iter()
            .any(|g| crate::cache::policy::glob_match(g, repo))
    }

    /// Refuses a hosted glob that would take repositories a mirrored
    /// registry serves (Docker Hub's `library/` names, or a name whose first
    /// segment routes to a configured upstream) unless `shadowing` names it.
    pub(crate) fn check<'a>(
        &self,
        upstreams: impl Iterator<Item = &'a UpstreamConfig>,
    ) -> Result<(), String> {
        if self.upload_ttl.is_zero() {
            return Err("key hosted.upload_ttl: must be longer than 0s".into());
        }
        for (i, glob) in self.repos.iter().enumerate() {
            if glob.is_empty() || glob.len() > crate::reference::MAX_NAME_LEN {
                return Err(format!(
                    "key hosted.repos[{i}]: {glob:?} is not a repository glob"
                ));
            }
        }
        let mut prefixes = Vec::new();
        for u in upstreams {
            if u.name == "docker.io" {
                prefixes.push(HUB_OFFICIAL.to_owned());
            }
            prefixes.push(format!("{}/", u.name));
        }
        for glob in &self.repos {
            if self.shadowing.contains(glob) {
                continue;
            }
            if let Some(p) = prefixes.iter().find(|p| may_match_under(glob, p)) {
                return Err(format!(
                    "key hosted.repos: {glob:?} would host repositories under {p:?}, which are \
                     mirrored from an upstream; pick a name of your own (\"myorg/*\"), or list \
                     the glob in hosted.shadowing as well to host them here on purpose"
                ));
            }
        }
        Ok(())
    }
}

/// Whether `glob` (`*` any run, else literal) matches some name starting
/// with `prefix`: its literal head and the prefix agree as far as both go,
/// and a glob without `*` must be at least as long as the prefix.
fn may_match_under(glob: &str, prefix: &str) -> bool {
    let head = glob.split('*').next().unwrap_or_default();
    let star = glob.contains('*');
    let n = head.len().min(prefix.len());
    if head.as_bytes()[..n] != prefix.as_bytes()[..n] {
        return false;
    }
    star || head.len() >= prefix.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> Vec<UpstreamConfig> {
        let ghcr = UpstreamConfig {
            name: "ghcr.io".into(),
            ..UpstreamConfig::default()
        };
        vec![UpstreamConfig::default(), ghcr]
    }

    fn config(repos: &[&str], shadowing: &[&str]) -> HostedConfig {
        HostedConfig {
            repos: repos.iter().map(|s| s.to_string()).collect(),
            shadowing: shadowing.iter().map(|s| s.to_string()).collect(),
            ..HostedConfig::default()
        }
    }

    #[test]
    fn names_of_your_own_are_hosted_and_mirrored_ones_are_refused_unless_asked_for() {
        let ok = config(&["myorg/*", "hello-world", "team-*/app"], &[]);
        assert_eq!(ok.check(hub().iter()), Ok(()));
        assert!(ok.hosts("myorg/app"));
        assert!(ok.hosts("hello-world"));
        assert!(!ok.hosts("library/hello-world"));
        for shadow in [
            "library/*",
            "*",
            "lib*",
            "library/alpine",
            "ghcr.io/*",
            "*/app",
        ] {
            let refused = config(&[shadow], &[]);
            let err = refused.check(hub().iter()).unwrap_err();
            assert!(err.contains("hosted.shadowing"), "{shadow}: {err}");
            assert_eq!(
                config(&[shadow], &[shadow]).check(hub().iter()),
                Ok(()),
                "{shadow} on purpose"
            );
        }
        assert_eq!(config(&["librarian/*"], &[]).check(hub().iter()), Ok(()));
        assert_eq!(config(&["lib"], &[]).check(hub().iter()), Ok(()));
    }
}
