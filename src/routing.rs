//! Which upstream a request is for, as each client says it: containerd's
//! `?ns=<registry>`, a first path segment naming a configured registry
//! (podman/skopeo mirrors with a path), or the default upstream (dockerd).
//! Pure: no I/O.

use crate::error::Error;
use crate::reference::RepoName;

/// Docker Hub's registry name and the host names clients use for it.
const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_ALIASES: &[&str] = &["registry-1.docker.io", "index.docker.io"];

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Index of the upstream (0 is the default).
    pub upstream: usize,
    /// The repository at the upstream (`library/alpine`).
    pub repo: RepoName,
    /// The repository in the cache's index: `<upstream name>/<repo>`, so
    /// tags and membership never mix between registries.
    pub key: RepoName,
}

/// The configured upstream names, the default first.
#[derive(Debug, Clone)]
pub struct Router {
    names: Vec<String>,
}

impl Router {
    pub fn new(names: Vec<String>) -> Self {
        Self { names }
    }

    pub fn name(&self, upstream: usize) -> &str {
        &self.names[upstream]
    }

    fn find(&self, registry: &str) -> Option<usize> {
        let registry = registry.to_ascii_lowercase();
        self.names.iter().position(|n| {
            *n == registry || (n == DOCKER_HUB && DOCKER_HUB_ALIASES.contains(&registry.as_str()))
        })
    }

    /// Routes the name a client asked for.
    pub fn route(&self, name: &RepoName, ns: Option<&str>) -> Result<Route, Error> {
        if let Some(ns) = ns {
            let upstream = self.find(ns).ok_or_else(|| {
                Error::NameUnknown(format!(
                    "no upstream is configured for registry {:?} (from ?ns=)",
                    bounded(ns)
                ))
            })?;
            return Ok(self.build(upstream, name.clone()));
        }
        if let Some((first, rest)) = name.split_first() {
            if let Some(upstream) = self.find(first) {
                return Ok(self.build(upstream, rest));
            }
            if looks_like_a_registry(first) {
                return Err(Error::NameUnknown(format!(
                    "no upstream is configured for registry {first:?}"
                )));
            }
        }
        Ok(self.build(0, name.clone()))
    }

    fn build(&self, upstream: usize, repo: RepoName) -> Route {
        let name = &self.names[upstream];
        // Docker Hub's short names: `alpine` is `library/alpine`.
        let repo = if name == DOCKER_HUB && repo.is_single() {
            repo.prefixed("library")
        } else {
            repo
        };
        Route {
            upstream,
            key: repo.prefixed(name),
            repo,
        }
    }
}

/// A first component with a dot is a registry host (Docker Hub namespaces
/// have none), as `docker pull` decides it too.
fn looks_like_a_registry(component: &str) -> bool {
    component.contains('.') || component == "localhost"
}

fn bounded(s: &str) -> String {
    s.chars().take(100).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        Router::new(vec!["docker.io".into(), "ghcr.io".into(), "quay.io".into()])
    }

    fn name(s: &str) -> RepoName {
        RepoName::parse(s).unwrap()
    }

    #[test]
    fn by_namespace_parameter() {
        let r = router().route(&name("org/app"), Some("ghcr.io")).unwrap();
        assert_eq!((r.upstream, r.repo.as_str()), (1, "org/app"));
        assert_eq!(r.key.as_str(), "ghcr.io/org/app");
        let r = router().route(&name("alpine"), Some("docker.io")).unwrap();
        assert_eq!(r.repo.as_str(), "library/alpine");
        let r = router()
            .route(&name("library/alpine"), Some("registry-1.docker.io"))
            .unwrap();
        assert_eq!(r.upstream, 0);
        assert!(matches!(
            router().route(&name("x/y"), Some("gcr.io")),
            Err(Error::NameUnknown(_))
        ));
    }

    #[test]
    fn by_path_prefix() {
        let r = router().route(&name("ghcr.io/org/app"), None).unwrap();
        assert_eq!((r.upstream, r.repo.as_str()), (1, "org/app"));
        let r = router().route(&name("docker.io/alpine"), None).unwrap();
        assert_eq!((r.upstream, r.repo.as_str()), (0, "library/alpine"));
        let r = router().route(&name("quay.io/a/b/c"), None).unwrap();
        assert_eq!((r.upstream, r.repo.as_str()), (2, "a/b/c"));
        assert!(matches!(
            router().route(&name("registry.k8s.io/pause"), None),
            Err(Error::NameUnknown(_))
        ));
    }

    #[test]
    fn default_upstream() {
        let r = router().route(&name("library/alpine"), None).unwrap();
        assert_eq!((r.upstream, r.repo.as_str()), (0, "library/alpine"));
        assert_eq!(r.key.as_str(), "docker.io/library/alpine");
        let r = router().route(&name("bitnami/redis"), None).unwrap();
        assert_eq!(r.repo.as_str(), "bitnami/redis");
        // A lone name that happens to equal a registry is a repository.
        let r = router().route(&name("ghcr.io"), None).unwrap();
        assert_eq!((r.upstream, r.repo.as_str()), (0, "library/ghcr.io"));
    }
}
