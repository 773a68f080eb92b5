//! The typed `/v2/` API: a request line is parsed once into an [`Endpoint`],
//! then dispatched. Names contain `/`, so paths are split from the right.
//!
//! This module only parses; it never touches the cache or the upstream.

use http::Method;

use crate::error::Error;
use crate::reference::{Digest, Reference, RepoName, Tag};

/// What a request asks for, fully parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `GET /v2/`: API version check.
    Ping,
    /// `GET|HEAD /v2/<name>/manifests/<reference>`.
    Manifest {
        name: RepoName,
        reference: Reference,
    },
    /// `GET|HEAD /v2/<name>/blobs/<digest>`.
    Blob { name: RepoName, digest: Digest },
    /// `GET /v2/<name>/tags/list?n=&last=`.
    TagsList { name: RepoName, page: TagsPage },
    /// `GET /v2/<name>/referrers/<digest>?artifactType=`.
    Referrers {
        name: RepoName,
        digest: Digest,
        artifact_type: Option<String>,
    },
    /// `GET /v2/_catalog?n=&last=`.
    Catalog { page: CatalogPage },
}

impl Endpoint {
    /// A short name for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Endpoint::Ping => "ping",
            Endpoint::Manifest { .. } => "manifest",
            Endpoint::Blob { .. } => "blob",
            Endpoint::TagsList { .. } => "tags",
            Endpoint::Referrers { .. } => "referrers",
            Endpoint::Catalog { .. } => "catalog",
        }
    }

    /// The repository the request is about, if any.
    pub fn name(&self) -> Option<&RepoName> {
        match self {
            Endpoint::Manifest { name, .. }
            | Endpoint::Blob { name, .. }
            | Endpoint::TagsList { name, .. }
            | Endpoint::Referrers { name, .. } => Some(name),
            Endpoint::Ping | Endpoint::Catalog { .. } => None,
        }
    }
}

/// Pagination of the catalog, validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CatalogPage {
    pub n: Option<u32>,
    pub last: Option<RepoName>,
}

/// Pagination of a tags list, validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TagsPage {
    pub n: Option<u32>,
    pub last: Option<Tag>,
}

/// A parsed request: the endpoint and whether only headers are wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiRequest {
    pub endpoint: Endpoint,
    pub head: bool,
    /// The `ns` query parameter containerd sends (the source registry).
    pub namespace: Option<String>,
}

/// Parses method, path and query. Errors are the registry errors to answer with.
pub fn parse(method: &Method, path: &str, query: Option<&str>) -> Result<ApiRequest, Error> {
    let rest = match path.strip_prefix("/v2") {
        Some("") => "",
        Some(r) if r.starts_with('/') => &r[1..],
        _ => return Err(Error::NotFound(bounded(path))),
    };
    let head = match *method {
        Method::GET => false,
        Method::HEAD => true,
        _ => {
            return Err(Error::Unsupported(format!(
                "{method} is not supported: this registry is a read-only mirror"
            )))
        }
    };
    let params = QueryParams::parse(query.unwrap_or(""));
    let endpoint = parse_path(rest, &params)?;
    Ok(ApiRequest {
        endpoint,
        head,
        namespace: params.ns,
    })
}

fn parse_path(rest: &str, params: &QueryParams) -> Result<Endpoint, Error> {
    if rest.is_empty() {
        return Ok(Endpoint::Ping);
    }
    if rest == "_catalog" {
        let page = CatalogPage {
            n: params.page_size()?,
            last: match params.last.as_deref() {
                None | Some("") => None,
                Some(l) => Some(RepoName::parse(l)?),
            },
        };
        return Ok(Endpoint::Catalog { page });
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        let page = TagsPage {
            n: params.page_size()?,
            last: match params.last.as_deref() {
                None | Some("") => None,
                Some(l) => Some(Tag::parse(l)?),
            },
        };
        return Ok(Endpoint::TagsList {
            name: RepoName::parse(name)?,
            page,
        });
    }
    let mut parts = rest.rsplitn(3, '/');
    let (Some(last), Some(kind), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(Error::NotFound(bounded(rest)));
    };
    match kind {
        "manifests" => Ok(Endpoint::Manifest {
            name: RepoName::parse(name)?,
            reference: Reference::parse(last)?,
        }),
        "blobs" => Ok(Endpoint::Blob {
            name: RepoName::parse(name)?,
            digest: Digest::parse(last)?,
        }),
        "referrers" => Ok(Endpoint::Referrers {
            name: RepoName::parse(name)?,
            digest: Digest::parse(last)?,
            artifact_type: params.artifact_type.clone(),
        }),
        "uploads" if name.ends_with("/blobs") => Err(Error::Unsupported(
            "blob uploads are not supported: this registry is a read-only mirror".into(),
        )),
        _ => Err(Error::NotFound(bounded(rest))),
    }
}

/// The query parameters the API knows; others are ignored.
#[derive(Debug, Default)]
struct QueryParams {
    ns: Option<String>,
    n: Option<String>,
    last: Option<String>,
    artifact_type: Option<String>,
}

impl QueryParams {
    fn parse(query: &str) -> Self {
        let mut p = QueryParams::default();
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            match &*k {
                "ns" => p.ns = Some(v.into_owned()),
                "n" => p.n = Some(v.into_owned()),
                "last" => p.last = Some(v.into_owned()),
                "artifactType" => p.artifact_type = Some(v.into_owned()),
                _ => {}
            }
        }
        p
    }

    fn page_size(&self) -> Result<Option<u32>, Error> {
        match &self.n {
            None => Ok(None),
            Some(n) => n.parse::<u32>().map(Some).map_err(|_| {
                Error::PaginationInvalid(format!("n must be a number, got {:?}", bounded(n)))
            }),
        }
    }
}

fn bounded(s: &str) -> String {
    s.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str) -> Result<Endpoint, Error> {
        parse(&Method::GET, path, None).map(|r| r.endpoint)
    }

    #[test]
    fn splits_names_from_the_right() {
        let d = format!("sha256:{}", "c".repeat(64));
        match get(&format!("/v2/a/b/blobs/blobs/{d}")).unwrap() {
            Endpoint::Blob { name, digest } => {
                assert_eq!(name.as_str(), "a/b/blobs");
                assert_eq!(digest.to_string(), d);
            }
            e => panic!("{e:?}"),
        }
        match get("/v2/library/alpine/manifests/3.19").unwrap() {
            Endpoint::Manifest { name, reference } => {
                assert_eq!(name.as_str(), "library/alpine");
                assert_eq!(reference.to_string(), "3.19");
            }
            e => panic!("{e:?}"),
        }
        assert_eq!(get("/v2/").unwrap(), Endpoint::Ping);
        assert_eq!(get("/v2").unwrap(), Endpoint::Ping);
        assert_eq!(
            get("/v2/_catalog").unwrap(),
            Endpoint::Catalog {
                page: CatalogPage::default()
            }
        );
    }

    #[test]
    fn bad_input_is_a_registry_error() {
        assert!(matches!(
            get("/v2/alpine/blobs/sha256:totallywrong"),
            Err(Error::DigestInvalid(_))
        ));
        assert!(matches!(
            get("/v2/../etc/manifests/latest"),
            Err(Error::NameInvalid(_))
        ));
        assert!(matches!(
            get("/v2/%2e%2e/manifests/latest"),
            Err(Error::NameInvalid(_))
        ));
        assert!(matches!(
            get("/v2/a/manifests/-x"),
            Err(Error::TagInvalid(_))
        ));
        assert!(matches!(get("/v3/"), Err(Error::NotFound(_))));
        assert!(matches!(get("/v2/alpine"), Err(Error::NotFound(_))));
    }

    #[test]
    fn writes_are_unsupported() {
        for m in [Method::PUT, Method::POST, Method::PATCH, Method::DELETE] {
            assert!(matches!(
                parse(&m, "/v2/a/blobs/uploads/", None),
                Err(Error::Unsupported(_))
            ));
        }
        assert!(matches!(
            get("/v2/a/blobs/uploads/1234"),
            Err(Error::Unsupported(_))
        ));
    }

    #[test]
    fn tags_pagination_and_namespace() {
        let r = parse(
            &Method::GET,
            "/v2/a/tags/list",
            Some("n=2&last=v1&ns=docker.io"),
        )
        .unwrap();
        assert_eq!(r.namespace.as_deref(), Some("docker.io"));
        match r.endpoint {
            Endpoint::TagsList { page, .. } => {
                assert_eq!(page.n, Some(2));
                assert_eq!(page.last.unwrap().as_str(), "v1");
            }
            e => panic!("{e:?}"),
        }
        assert!(matches!(
            parse(&Method::GET, "/v2/a/tags/list", Some("n=x")),
            Err(Error::PaginationInvalid(_))
        ));
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Whatever the path, parsing ends in an endpoint or a client error.
        #[test]
        fn any_path_is_an_endpoint_or_a_4xx(
            path in "/v2/[a-zA-Z0-9./_:%-]{0,80}",
            query in proptest::option::of("[a-z=&%0-9]{0,20}"),
            method in prop_oneof![Just(Method::GET), Just(Method::HEAD), Just(Method::PUT), Just(Method::DELETE)],
        ) {
            match parse(&method, &path, query.as_deref()) {
                Ok(_) => {}
                Err(e) => prop_assert!(e.wire().status.is_client_error(), "{e:?}"),
            }
        }
    }
}
