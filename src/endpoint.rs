//! The typed `/v2/` API: a request line is parsed once into an [`Endpoint`],
//! then dispatched. Names contain `/`, so paths are split from the right.
//! Reads (GET, HEAD) and the push API (POST, PATCH, PUT, DELETE) alike;
//! whether a repository takes a write is decided later, by the
//! configuration, not here.
//!
//! This module only parses; it never touches the cache or the upstream.

use http::Method;

use crate::error::Error;
use crate::reference::{Digest, Reference, RepoName, Tag, UploadId};

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
    /// `POST /v2/<name>/blobs/uploads/`: a new upload; with `?digest=` the
    /// body is the whole blob (monolithic), with `?mount=&from=` a blob of
    /// another repository is mounted instead.
    StartUpload { name: RepoName, start: UploadStart },
    /// `GET|PATCH|PUT|DELETE /v2/<name>/blobs/uploads/<id>`.
    Upload {
        name: RepoName,
        id: UploadId,
        op: UploadOp,
    },
    /// `PUT /v2/<name>/manifests/<reference>`.
    PutManifest {
        name: RepoName,
        reference: Reference,
    },
    /// `DELETE /v2/<name>/manifests/<reference>` (a digest, or a tag).
    DeleteManifest {
        name: RepoName,
        reference: Reference,
    },
    /// `DELETE /v2/<name>/blobs/<digest>`.
    DeleteBlob { name: RepoName, digest: Digest },
}

/// How a `POST` starts an upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UploadStart {
    /// An empty upload the client then sends chunks to.
    Open,
    /// `?digest=`: the request body is the whole blob.
    Monolithic(Digest),
    /// `?mount=<digest>&from=<repo>`: link a blob another repository holds
    /// (without `from`, or where it cannot be mounted, an upload opens).
    Mount {
        digest: Digest,
        from: Option<RepoName>,
    },
}

/// What a request to an open upload does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UploadOp {
    /// `GET`: how far it got.
    Status,
    /// `PATCH`: a chunk (with or without `Content-Range`).
    Append,
    /// `PUT ?digest=`: the last chunk, if any, then commit as `digest`.
    Finish(Digest),
    /// `DELETE`: abandon it.
    Cancel,
}

/// What a request does to a repository, for access rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Pull,
    Push,
    Delete,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "push",
            Action::Delete => "delete",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pull" => Some(Action::Pull),
            "push" => Some(Action::Push),
            "delete" => Some(Action::Delete),
            _ => None,
        }
    }
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
            Endpoint::StartUpload { .. } | Endpoint::Upload { .. } => "upload",
            Endpoint::PutManifest { .. } | Endpoint::DeleteManifest { .. } => "manifest_write",
            Endpoint::DeleteBlob { .. } => "blob_delete",
        }
    }

    /// What the request does to its repository.
    pub fn action(&self) -> Action {
        match self {
            Endpoint::Ping
            | Endpoint::Manifest { .. }
            | Endpoint::Blob { .. }
            | Endpoint::TagsList { .. }
            | Endpoint::Referrers { .. }
            | Endpoint::Catalog { .. } => Action::Pull,
            Endpoint::StartUpload { .. }
            | Endpoint::Upload { .. }
            | Endpoint::PutManifest { .. } => Action::Push,
            Endpoint::DeleteManifest { .. } | Endpoint::DeleteBlob { .. } => Action::Delete,
            // An upload's DELETE abandons the client's own upload: part of a push.
        }
    }

    /// Another repository the request reads: a mount's `from`, which needs
    /// the pull right there.
    pub fn reads_from(&self) -> Option<&RepoName> {
        match self {
            Endpoint::StartUpload {
                start: UploadStart::Mount { from, .. },
                ..
            } => from.as_ref(),
            _ => None,
        }
    }

    /// The repository the request is about, if any.
    pub fn name(&self) -> Option<&RepoName> {
        match self {
            Endpoint::Manifest { name, .. }
            | Endpoint::Blob { name, .. }
            | Endpoint::TagsList { name, .. }
            | Endpoint::Referrers { name, .. }
            | Endpoint::StartUpload { name, .. }
            | Endpoint::Upload { name, .. }
            | Endpoint::PutManifest { name, .. }
            | Endpoint::DeleteManifest { name, .. }
            | Endpoint::DeleteBlob { name, .. } => Some(name),
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
    let head = *method == Method::HEAD;
    let params = QueryParams::parse(query.unwrap_or(""));
    let endpoint = match *method {
        Method::GET | Method::HEAD => parse_path(rest, &params)?,
        Method::POST | Method::PATCH | Method::PUT | Method::DELETE => {
            parse_write(method, rest, &params)?
        }
        _ => {
            return Err(Error::Unsupported(format!(
                "{} is not a method of the registry API",
                bounded(method.as_str())
            )))
        }
    };
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
            reference: manifest_reference(last)?,
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
        "uploads" => match name.strip_suffix("/blobs") {
            Some(name) => Ok(Endpoint::Upload {
                name: RepoName::parse(name)?,
                id: upload_id(last)?,
                op: UploadOp::Status,
            }),
            None => Err(Error::NotFound(bounded(rest))),
        },
        _ => Err(Error::NotFound(bounded(rest))),
    }
}

/// The push API: POST, PATCH, PUT and DELETE.
fn parse_write(method: &Method, rest: &str, params: &QueryParams) -> Result<Endpoint, Error> {
    // `POST /v2/<name>/blobs/uploads/` (the trailing slash is optional).
    if *method == Method::POST {
        let name = rest
            .strip_suffix('/')
            .unwrap_or(rest)
            .strip_suffix("/blobs/uploads")
            .ok_or_else(|| Error::NotFound(bounded(rest)))?;
        let name = RepoName::parse(name)?;
        let start = match (&params.digest, &params.mount) {
            (_, Some(mount)) => UploadStart::Mount {
                digest: Digest::parse(mount)?,
                from: match params.from.as_deref() {
                    None | Some("") => None,
                    Some(from) => Some(RepoName::parse(from)?),
                },
            },
            (Some(digest), None) => UploadStart::Monolithic(Digest::parse(digest)?),
            (None, None) => UploadStart::Open,
        };
        return Ok(Endpoint::StartUpload { name, start });
    }
    let mut parts = rest.rsplitn(3, '/');
    let (Some(last), Some(kind), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(Error::NotFound(bounded(rest)));
    };
    match (kind, method.clone()) {
        ("manifests", Method::PUT) => Ok(Endpoint::PutManifest {
            name: RepoName::parse(name)?,
            reference: Reference::parse(last)?,
        }),
        ("manifests", Method::DELETE) => Ok(Endpoint::DeleteManifest {
            name: RepoName::parse(name)?,
            reference: manifest_reference(last)?,
        }),
        ("blobs", Method::DELETE) => Ok(Endpoint::DeleteBlob {
            name: RepoName::parse(name)?,
            digest: Digest::parse(last)?,
        }),
        ("uploads", m) => {
            let name = name
                .strip_suffix("/blobs")
                .ok_or_else(|| Error::NotFound(bounded(rest)))?;
            let op = match m {
                Method::PATCH => UploadOp::Append,
                Method::DELETE => UploadOp::Cancel,
                Method::PUT => UploadOp::Finish(match params.digest.as_deref() {
                    Some(d) => Digest::parse(d)?,
                    None => {
                        return Err(Error::DigestInvalid(
                            "the PUT that completes an upload needs ?digest=".into(),
                        ))
                    }
                }),
                _ => {
                    return Err(Error::Unsupported(format!(
                        "{} is not a method for an upload",
                        m.as_str()
                    )))
                }
            };
            Ok(Endpoint::Upload {
                name: RepoName::parse(name)?,
                id: upload_id(last)?,
                op,
            })
        }
        _ => Err(Error::Unsupported(format!(
            "{} {} is not part of the registry API",
            method.as_str(),
            bounded(rest)
        ))),
    }
}

/// The reference of a manifest to read or delete. A malformed digest is a bad
/// request (`DIGEST_INVALID`); a string that can be no tag names nothing, so
/// it is not found (`MANIFEST_UNKNOWN`), as the conformance suite expects of
/// `.INVALID_MANIFEST_NAME`. A push to such a tag is `TAG_INVALID`.
fn manifest_reference(s: &str) -> Result<Reference, Error> {
    match Reference::parse(s) {
        Ok(r) => Ok(r),
        Err(e @ crate::reference::ParseError::Tag(_)) => Err(Error::ManifestUnknown(e.to_string())),
        Err(e) => Err(e.into()),
    }
}

/// An upload id from a path: one the mirror could have handed out, or an
/// upload that does not exist.
fn upload_id(s: &str) -> Result<UploadId, Error> {
    UploadId::parse(s).map_err(|_| Error::BlobUploadUnknown(bounded(s)))
}

/// The query parameters the API knows; others are ignored.
#[derive(Debug, Default)]
struct QueryParams {
    ns: Option<String>,
    n: Option<String>,
    last: Option<String>,
    artifact_type: Option<String>,
    digest: Option<String>,
    mount: Option<String>,
    from: Option<String>,
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
                "digest" => p.digest = Some(v.into_owned()),
                "mount" => p.mount = Some(v.into_owned()),
                "from" => p.from = Some(v.into_owned()),
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
        // A reference that cannot exist is not found (the conformance
        // suite's `.INVALID_MANIFEST_NAME`); as a push target it is invalid.
        assert!(matches!(
            get("/v2/a/manifests/-x"),
            Err(Error::ManifestUnknown(_))
        ));
        assert!(matches!(
            get("/v2/a/manifests/.INVALID_MANIFEST_NAME"),
            Err(Error::ManifestUnknown(_))
        ));
        assert!(matches!(
            parse(&Method::PUT, "/v2/a/manifests/-x", None),
            Err(Error::TagInvalid(_))
        ));
        assert!(matches!(get("/v3/"), Err(Error::NotFound(_))));
        assert!(matches!(get("/v2/alpine"), Err(Error::NotFound(_))));
    }

    fn write(method: Method, path: &str, query: Option<&str>) -> Result<Endpoint, Error> {
        parse(&method, path, query).map(|r| r.endpoint)
    }

    #[test]
    fn the_push_api_parses_into_typed_endpoints() {
        let d = format!("sha256:{}", "a".repeat(64));
        let id = "0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9";
        let name = RepoName::parse("myorg/app").unwrap();
        for path in [
            "/v2/myorg/app/blobs/uploads/",
            "/v2/myorg/app/blobs/uploads",
        ] {
            assert_eq!(
                write(Method::POST, path, None).unwrap(),
                Endpoint::StartUpload {
                    name: name.clone(),
                    start: UploadStart::Open
                }
            );
        }
        assert_eq!(
            write(
                Method::POST,
                "/v2/myorg/app/blobs/uploads/",
                Some(&format!("digest={d}"))
            )
            .unwrap(),
            Endpoint::StartUpload {
                name: name.clone(),
                start: UploadStart::Monolithic(Digest::parse(&d).unwrap())
            }
        );
        assert_eq!(
            write(
                Method::POST,
                "/v2/myorg/app/blobs/uploads/",
                Some(&format!("mount={d}&from=library/alpine"))
            )
            .unwrap(),
            Endpoint::StartUpload {
                name: name.clone(),
                start: UploadStart::Mount {
                    digest: Digest::parse(&d).unwrap(),
                    from: Some(RepoName::parse("library/alpine").unwrap())
                }
            }
        );
        let upload = format!("/v2/myorg/app/blobs/uploads/{id}");
        for (method, query, op) in [
            (Method::GET, None, UploadOp::Status),
            (Method::PATCH, None, UploadOp::Append),
            (Method::DELETE, None, UploadOp::Cancel),
            (
                Method::PUT,
                Some(format!("digest={d}")),
                UploadOp::Finish(Digest::parse(&d).unwrap()),
            ),
        ] {
            assert_eq!(
                write(method, &upload, query.as_deref()).unwrap(),
                Endpoint::Upload {
                    name: name.clone(),
                    id: UploadId::parse(id).unwrap(),
                    op
                }
            );
        }
        assert!(matches!(
            write(Method::PUT, &upload, None),
            Err(Error::DigestInvalid(_))
        ));
        assert!(matches!(
            write(Method::PATCH, "/v2/a/blobs/uploads/..", None),
            Err(Error::BlobUploadUnknown(_))
        ));
        assert!(matches!(
            write(Method::PATCH, "/v2/a/blobs/uploads/1234", None),
            Err(Error::BlobUploadUnknown(_))
        ));
        assert_eq!(
            write(Method::PUT, "/v2/myorg/app/manifests/v1", None).unwrap(),
            Endpoint::PutManifest {
                name: name.clone(),
                reference: Reference::parse("v1").unwrap()
            }
        );
        assert_eq!(
            write(Method::DELETE, &format!("/v2/myorg/app/blobs/{d}"), None).unwrap(),
            Endpoint::DeleteBlob {
                name: name.clone(),
                digest: Digest::parse(&d).unwrap()
            }
        );
        assert!(matches!(
            write(Method::DELETE, "/v2/myorg/app/tags/list", None),
            Err(Error::Unsupported(_))
        ));
        assert!(matches!(
            write(Method::OPTIONS, "/v2/", None),
            Err(Error::Unsupported(_))
        ));
    }

    #[test]
    fn actions_for_access_rules() {
        let d = Digest::parse(&format!("sha256:{}", "a".repeat(64))).unwrap();
        let name = RepoName::parse("a").unwrap();
        let from = RepoName::parse("b").unwrap();
        let mount = Endpoint::StartUpload {
            name: name.clone(),
            start: UploadStart::Mount {
                digest: d.clone(),
                from: Some(from.clone()),
            },
        };
        assert_eq!(mount.action(), Action::Push);
        assert_eq!(mount.reads_from(), Some(&from));
        let delete = Endpoint::DeleteBlob { name, digest: d };
        assert_eq!(delete.action(), Action::Delete);
        assert_eq!(delete.reads_from(), None);
        assert_eq!(Endpoint::Ping.action(), Action::Pull);
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
