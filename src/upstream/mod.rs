//! The HTTP client for the upstream registry: bearer-token auth, redirects
//! without credentials, timeouts, and the mapping of upstream failures to
//! registry errors. It knows nothing of the cache.

pub mod challenge;
pub mod rate;
pub mod reach;
pub mod resume;
pub mod token;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, Method, StatusCode};
use reqwest::{RequestBuilder, Response};
use url::Url;

use crate::cache::policy;
use crate::config::{Secret, UpstreamConfig};
use crate::error::Error;
use crate::manifest::ACCEPT_ALL;
use crate::metrics::{parse_ratelimit, Metrics};
use crate::reference::{Digest, Reference, RepoName, Tag};
use challenge::Challenge;
use reach::Reach;
pub use resume::BlobBody;
use resume::Patience;
use token::{Token, TokenCache, TokenKey, TokenResponse};

/// Largest manifest or tag list the mirror accepts from the upstream.
pub const MAX_DOCUMENT: usize = 4 * 1024 * 1024;

/// Tags asked for per page, and pages followed, when listing tags.
const TAG_PAGE: usize = 1000;
const MAX_TAG_PAGES: usize = 100;

#[derive(serde::Deserialize)]
struct TagPage {
    tags: Option<Vec<String>>,
}

/// The `last` parameter of a `Link: <...?last=x&n=y>; rel="next"` header.
fn next_last(link: &str) -> Option<String> {
    let target = link
        .split(';')
        .next()?
        .trim()
        .strip_prefix('<')?
        .strip_suffix('>')?;
    let query = target.split_once('?')?.1;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "last")
        .map(|(_, v)| v.into_owned())
}

/// Redirects followed for one request (Hub sends one, to its CDN).
const MAX_REDIRECTS: usize = 5;

/// What an upstream request was for, to name a 404 correctly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum What {
    Manifest,
    Blob,
    Tags,
}

/// A manifest's headers, from a HEAD.
#[derive(Debug, Clone)]
pub struct ManifestHead {
    pub digest: Option<Digest>,
    pub media_type: Option<String>,
    pub size: Option<u64>,
}

/// A small document (manifest, tag list) with its headers.
#[derive(Debug, Clone)]
pub struct Document {
    pub headers: HeaderMap,
    pub bytes: Bytes,
}

/// The upstream registry.
pub struct Upstream {
    /// Its configured name, for metrics.
    name: String,
    metrics: Arc<Metrics>,
    base: Url,
    http: reqwest::Client,
    username: Option<String>,
    password: Option<Secret>,
    credential_hosts: Vec<String>,
    /// Repository globs the credentials are used for (all when empty).
    credentials_for: Vec<String>,
    /// Which redirect and realm targets are followed.
    reach: Reach,
    timeout: Duration,
    read_timeout: Duration,
    /// How blob bodies are read and resumed.
    patience: Patience,
    tokens: TokenCache,
    /// The realm and service of the last Bearer challenge, so tokens for other
    /// repositories can be fetched before the first request instead of after a 401.
    realm: RwLock<Option<(String, Option<String>)>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("base", &self.base.as_str())
            .finish()
    }
}

impl Upstream {
    pub fn new(config: &UpstreamConfig, metrics: Arc<Metrics>) -> Result<Self, Error> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(config.connect_timeout)
            .user_agent(concat!("regmirror/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::internal("building the upstream HTTP client", e))?;
        Ok(Self {
            name: config.name.clone(),
            metrics,
            base: config.url.clone(),
            http,
            username: config.username.clone(),
            password: config.password.clone(),
            credential_hosts: config.credential_hosts.clone(),
            credentials_for: config.credentials_for.clone(),
            reach: Reach::new(&config.url),
            timeout: config.timeout,
            read_timeout: config.read_timeout,
            patience: Patience {
                read_timeout: config.read_timeout,
                timeout: config.timeout,
                retries: config.retries,
                backoff: config.retry_backoff,
                min_rate: config.min_rate.0,
                rate_window: config.min_rate_window,
            },
            tokens: TokenCache::default(),
            realm: RwLock::new(None),
        })
    }

    pub fn read_timeout(&self) -> Duration {
        self.read_timeout
    }

    /// The longest a blob body from [`Self::get_blob`] may stay silent, its
    /// resumes included: the guard for the download that reads it.
    pub fn blob_silence_bound(&self) -> Duration {
        self.patience.silence_bound()
    }

    /// HEAD a manifest: its digest, media type and size, without counting
    /// against Docker Hub's pull limit.
    pub async fn head_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<ManifestHead, Error> {
        let path = format!("/v2/{repo}/manifests/{reference}");
        let resp = self
            .send(Method::HEAD, repo, &path, Some(ACCEPT_ALL), What::Manifest)
            .await?;
        let headers = resp.headers();
        Ok(ManifestHead {
            digest: header_str(headers, "docker-content-digest")
                .and_then(|d| Digest::parse(d).ok()),
            media_type: header_str(headers, header::CONTENT_TYPE.as_str()).map(str::to_owned),
            size: header_str(headers, header::CONTENT_LENGTH.as_str()).and_then(|s| s.parse().ok()),
        })
    }

    /// GET a manifest's bytes (bounded by [`MAX_DOCUMENT`]).
    pub async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Document, Error> {
        let path = format!("/v2/{repo}/manifests/{reference}");
        let resp = self
            .send(Method::GET, repo, &path, Some(ACCEPT_ALL), What::Manifest)
            .await?;
        self.read_document(resp).await
    }

    /// HEAD a blob: `Ok(size)` when the repository has it upstream.
    pub async fn head_blob(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>, Error> {
        let path = format!("/v2/{repo}/blobs/{digest}");
        let resp = self
            .send(Method::HEAD, repo, &path, None, What::Blob)
            .await?;
        Ok(
            header_str(resp.headers(), header::CONTENT_LENGTH.as_str())
                .and_then(|s| s.parse().ok()),
        )
    }

    /// GET a blob; the caller streams the body, which resumes with `Range`
    /// where a connection broke (see [`resume`]).
    pub async fn get_blob(
        self: &Arc<Self>,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<BlobBody, Error> {
        let path = format!("/v2/{repo}/blobs/{digest}");
        let resp = self
            .send_with(Method::GET, repo, &path, None, What::Blob, None)
            .await?;
        let asked = self
            .base
            .join(&path)
            .map_err(|e| Error::internal("building the upstream URL", e))?;
        let redirected = (*resp.url() != asked).then(|| resp.url().clone());
        Ok(self.resumable(repo, digest, resp, redirected))
    }

    /// The rest of a blob from `offset`: at `from` (the redirect target the
    /// body came from) when it still answers, else at the registry, which
    /// hands out a fresh redirect (and a fresh token, when it refuses the
    /// one it had). The caller checks the answer continues at `offset`.
    async fn resume_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        from: Option<&Url>,
        offset: u64,
    ) -> Result<(Response, Option<Url>), Error> {
        let range = format!("bytes={offset}-");
        if let Some(url) = from {
            let req = self
                .request(Method::GET, url.clone(), None, None)
                .header(header::RANGE, &range);
            match self.execute(req).await {
                Ok(resp)
                    if resp.status().is_success()
                        || resp.status() == StatusCode::RANGE_NOT_SATISFIABLE =>
                {
                    return Ok((resp, Some(url.clone())));
                }
                Ok(resp) => tracing::info!(
                    %digest,
                    status = resp.status().as_u16(),
                    "the redirect target refused a resume (an expired URL?); asking the registry again"
                ),
                Err(e) => tracing::info!(
                    %digest,
                    error = %e,
                    "the redirect target failed a resume; asking the registry again"
                ),
            }
        }
        let path = format!("/v2/{repo}/blobs/{digest}");
        let asked = self
            .base
            .join(&path)
            .map_err(|e| Error::internal("building the upstream URL", e))?;
        let resp = self
            .send_with(Method::GET, repo, &path, None, What::Blob, Some(&range))
            .await?;
        let redirected = (*resp.url() != asked).then(|| resp.url().clone());
        Ok((resp, redirected))
    }

    /// A repository's whole tag list, following the upstream's pagination
    /// (at most [`MAX_TAG_PAGES`] pages). Tags that do not parse are skipped.
    pub async fn get_all_tags(&self, repo: &RepoName) -> Result<Vec<Tag>, Error> {
        let mut tags = Vec::new();
        let mut last: Option<String> = None;
        for _ in 0..MAX_TAG_PAGES {
            let mut path = format!("/v2/{repo}/tags/list?n={TAG_PAGE}");
            if let Some(l) = &last {
                path.push_str("&last=");
                path.push_str(
                    &url::form_urlencoded::byte_serialize(l.as_bytes()).collect::<String>(),
                );
            }
            let resp = self
                .send(Method::GET, repo, &path, None, What::Tags)
                .await?;
            let doc = self.read_document(resp).await?;
            let page: TagPage = serde_json::from_slice(&doc.bytes).map_err(|_| {
                Error::UpstreamFailed("upstream sent a tag list that is not JSON".into())
            })?;
            tags.extend(
                page.tags
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|t| Tag::parse(t).ok()),
            );
            last = doc
                .headers
                .get(header::LINK)
                .and_then(|v| v.to_str().ok())
                .and_then(next_last);
            if last.is_none() {
                break;
            }
        }
        tags.sort();
        tags.dedup();
        Ok(tags)
    }

    /// The upstream's referrers index for `digest`; `None` when the upstream
    /// has no referrers API (it answers 404).
    pub async fn get_referrers(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<Document>, Error> {
        let path = format!("/v2/{repo}/referrers/{digest}");
        match self
            .send(Method::GET, repo, &path, None, What::Manifest)
            .await
        {
            Ok(resp) => self.read_document(resp).await.map(Some),
            Err(Error::ManifestUnknown(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reads a small body within the header timeout and the size bound.
    async fn read_document(&self, mut resp: Response) -> Result<Document, Error> {
        if resp
            .content_length()
            .is_some_and(|l| l > MAX_DOCUMENT as u64)
        {
            return Err(Error::UpstreamFailed(format!(
                "upstream document larger than {MAX_DOCUMENT} bytes"
            )));
        }
        let headers = resp.headers().clone();
        let mut bytes = BytesMut::new();
        loop {
            let chunk = tokio::time::timeout(self.read_timeout, resp.chunk())
                .await
                .map_err(|_| Error::UpstreamTimeout("upstream body stalled".into()))?
                .map_err(transport_error)?;
            let Some(chunk) = chunk else { break };
            if bytes.len() + chunk.len() > MAX_DOCUMENT {
                return Err(Error::UpstreamFailed(format!(
                    "upstream document larger than {MAX_DOCUMENT} bytes"
                )));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(Document {
            headers,
            bytes: bytes.freeze(),
        })
    }

    /// Sends a request with a token when one is known, answers a 401 challenge
    /// once, follows redirects without credentials, and maps failures.
    async fn send(
        &self,
        method: Method,
        repo: &RepoName,
        path_and_query: &str,
        accept: Option<&str>,
        what: What,
    ) -> Result<Response, Error> {
        self.send_with(method, repo, path_and_query, accept, what, None)
            .await
    }

    /// [`Self::send`] with a `Range` header, kept across redirects.
    async fn send_with(
        &self,
        method: Method,
        repo: &RepoName,
        path_and_query: &str,
        accept: Option<&str>,
        what: What,
        range: Option<&str>,
    ) -> Result<Response, Error> {
        let url = self
            .base
            .join(path_and_query)
            .map_err(|e| Error::internal("building the upstream URL", e))?;
        let scope = format!("repository:{repo}:pull");
        let credentials = self.credentials(repo);
        let known_realm = self.realm.read().map(|g| g.clone()).unwrap_or(None);
        let mut auth = match known_realm {
            Some((realm, service)) => {
                let key = TokenKey {
                    realm,
                    service,
                    scope: Some(scope.clone()),
                    with_credentials: credentials.is_some(),
                };
                let token = self.token(&key, credentials).await?;
                Some(Auth::Bearer(key, token.value.clone()))
            }
            None => None,
        };
        let mut retried = false;
        loop {
            let mut req = self.request(method.clone(), url.clone(), accept, auth.as_ref());
            if let Some(r) = range {
                req = req.header(header::RANGE, r);
            }
            let resp = self.execute(req).await?;
            if resp.status() == StatusCode::UNAUTHORIZED && !retried {
                retried = true;
                if let Some(Auth::Bearer(key, _)) = &auth {
                    self.tokens.invalidate(key).await;
                }
                auth = self
                    .answer_challenge(resp.headers(), &scope, credentials)
                    .await?;
                if auth.is_some() {
                    continue;
                }
                return Err(map_status(&resp, what));
            }
            if resp.status().is_redirection() {
                return self
                    .follow_redirects(method, resp, accept, what, range)
                    .await;
            }
            if resp.status().is_success() {
                return Ok(resp);
            }
            return Err(map_status(&resp, what));
        }
    }

    fn request(
        &self,
        method: Method,
        url: Url,
        accept: Option<&str>,
        auth: Option<&Auth>,
    ) -> RequestBuilder {
        let mut req = self.http.request(method, url);
        if let Some(a) = accept {
            req = req.header(header::ACCEPT, a);
        }
        match auth {
            Some(Auth::Bearer(_, token)) => req.bearer_auth(token.expose()),
            Some(Auth::Basic(user, pass)) => req.basic_auth(user, Some(pass.expose())),
            None => req,
        }
    }

    /// Sends within the header timeout, and records the answer.
    async fn execute(&self, req: RequestBuilder) -> Result<Response, Error> {
        let req = req
            .build()
            .map_err(|e| Error::internal("building an upstream request", e.without_url()))?;
        let method = req.method().clone();
        let started = std::time::Instant::now();
        let result = match tokio::time::timeout(self.timeout, self.http.execute(req)).await {
            Err(_) => Err(Error::UpstreamTimeout(format!(
                "no response from the upstream within {}",
                humantime::format_duration(self.timeout)
            ))),
            Ok(r) => r.map_err(transport_error),
        };
        match &result {
            Ok(resp) => self.metrics.upstream_answer(
                &self.name,
                method.as_str(),
                resp.status().as_u16(),
                started.elapsed(),
                header_str(resp.headers(), "ratelimit-remaining").and_then(parse_ratelimit),
            ),
            Err(e) => self.metrics.upstream_failure(&self.name, &e.to_string()),
        }
        result
    }

    /// The credentials to use for `repo`: the configured ones when
    /// `credentials_for` is empty or one of its globs matches, else none, so
    /// an open mirror does not lend them to every repository.
    fn credentials(&self, repo: &RepoName) -> Option<Credentials<'_>> {
        let (user, pass) = (self.username.as_ref()?, self.password.as_ref()?);
        let in_scope = self.credentials_for.is_empty()
            || self
                .credentials_for
                .iter()
                .any(|p| policy::glob_match(p, repo.as_str()));
        in_scope.then_some((user.as_str(), pass))
    }

    /// Works out credentials for a 401: a bearer token for the challenge's
    /// scope, or Basic credentials. `None` when there is nothing to try.
    async fn answer_challenge(
        &self,
        headers: &HeaderMap,
        default_scope: &str,
        credentials: Option<Credentials<'_>>,
    ) -> Result<Option<Auth>, Error> {
        let challenge = headers
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(challenge::parse);
        match challenge {
            Some(Challenge::Bearer {
                realm,
                service,
                scope,
            }) => {
                if let Ok(mut g) = self.realm.write() {
                    *g = Some((realm.clone(), service.clone()));
                }
                let key = TokenKey {
                    realm,
                    service,
                    scope: Some(scope.unwrap_or_else(|| default_scope.to_owned())),
                    with_credentials: credentials.is_some(),
                };
                let token = self.token(&key, credentials).await?;
                Ok(Some(Auth::Bearer(key, token.value.clone())))
            }
            Some(Challenge::Basic) => {
                Ok(credentials.map(|(u, p)| Auth::Basic(u.to_owned(), p.clone())))
            }
            None => Ok(None),
        }
    }

    async fn token(
        &self,
        key: &TokenKey,
        credentials: Option<Credentials<'_>>,
    ) -> Result<Arc<Token>, Error> {
        self.tokens
            .get_or_fetch(key.clone(), self.fetch_token(key, credentials))
            .await
    }

    async fn fetch_token(
        &self,
        key: &TokenKey,
        credentials: Option<Credentials<'_>>,
    ) -> Result<Token, Error> {
        let mut realm = Url::parse(&key.realm)
            .map_err(|_| Error::UpstreamFailed("upstream sent an invalid token realm".into()))?;
        self.reach.check(&realm, "token realm").await?;
        {
            let mut q = realm.query_pairs_mut();
            if let Some(s) = &key.service {
                q.append_pair("service", s);
            }
            if let Some(s) = &key.scope {
                q.append_pair("scope", s);
            }
        }
        let mut req = self.http.get(realm.clone());
        if let Some((user, pass)) = credentials {
            if reach::may_receive_credentials(&self.base, &self.credential_hosts, &realm) {
                req = req.basic_auth(user, Some(pass.expose()));
            } else {
                tracing::warn!(
                    realm_host = realm.host_str().unwrap_or(""),
                    realm_scheme = realm.scheme(),
                    realm_port = realm.port_or_known_default().unwrap_or(0),
                    "token realm is on another host, port or scheme than the upstream; fetching an anonymous token"
                );
            }
        }
        self.metrics.token_fetch(&self.name);
        let resp = self.execute(req).await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(match status {
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Error::UpstreamDenied(format!(
                    "the upstream token realm refused the request ({status})"
                )),
                StatusCode::TOO_MANY_REQUESTS => Error::TooManyRequests {
                    retry_after: retry_after(resp.headers()),
                },
                _ => Error::UpstreamFailed(format!("upstream token realm answered {status}")),
            });
        }
        let doc = self.read_document(resp).await?;
        serde_json::from_slice::<TokenResponse>(&doc.bytes)
            .ok()
            .and_then(TokenResponse::into_token)
            .ok_or_else(|| Error::UpstreamFailed("upstream token realm sent no token".into()))
    }

    /// Follows redirects (Hub's CDN) with the same method and no Authorization.
    async fn follow_redirects(
        &self,
        method: Method,
        mut resp: Response,
        accept: Option<&str>,
        what: What,
        range: Option<&str>,
    ) -> Result<Response, Error> {
        for _ in 0..MAX_REDIRECTS {
            let location =
                header_str(resp.headers(), header::LOCATION.as_str()).ok_or_else(|| {
                    Error::UpstreamFailed("upstream redirect without Location".into())
                })?;
            let next = resp
                .url()
                .join(location)
                .map_err(|_| Error::UpstreamFailed("upstream redirect to an invalid URL".into()))?;
            self.reach.check(&next, "redirect").await?;
            let mut req = self.request(method.clone(), next, accept, None);
            if let Some(r) = range {
                req = req.header(header::RANGE, r);
            }
            resp = self.execute(req).await?;
            if resp.status().is_success() {
                return Ok(resp);
            }
            if !resp.status().is_redirection() {
                return Err(map_status(&resp, what));
            }
        }
        Err(Error::UpstreamFailed("too many upstream redirects".into()))
    }
}

/// A user and password of the upstream configuration.
type Credentials<'a> = (&'a str, &'a Secret);

enum Auth {
    Bearer(TokenKey, Secret),
    Basic(String, Secret),
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn retry_after(headers: &HeaderMap) -> Option<String> {
    header_str(headers, header::RETRY_AFTER.as_str()).map(str::to_owned)
}

/// An upstream answer that is not a success, as the client should see it.
fn map_status(resp: &Response, what: What) -> Error {
    let status = resp.status();
    match status {
        StatusCode::NOT_FOUND => match what {
            What::Manifest => Error::ManifestUnknown("not found upstream".into()),
            What::Blob => Error::BlobUnknown("not found upstream".into()),
            What::Tags => Error::NameUnknown("repository not found upstream".into()),
        },
        StatusCode::TOO_MANY_REQUESTS => Error::TooManyRequests {
            retry_after: retry_after(resp.headers()),
        },
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Error::UpstreamDenied(format!(
            "upstream answered {status}: the repository does not exist or needs other credentials"
        )),
        s if s.is_server_error() => Error::UpstreamFailed(format!("upstream answered {s}")),
        s => Error::UpstreamFailed(format!("unexpected upstream status {s}")),
    }
}

/// A transport failure, without the URL (a CDN URL carries a signature).
pub fn transport_error(e: reqwest::Error) -> Error {
    let e = e.without_url();
    if e.is_timeout() {
        Error::UpstreamTimeout(format!("upstream timed out: {e}"))
    } else if e.is_connect() {
        Error::UpstreamUnreachable(format!("cannot connect to the upstream: {e}"))
    } else {
        Error::UpstreamFailed(format!("upstream connection failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_header_next_page() {
        assert_eq!(
            next_last(r#"</v2/library/a/tags/list?last=v9&n=1000>; rel="next""#),
            Some("v9".into())
        );
        assert_eq!(next_last(r#"</v2/a/tags/list?n=2>; rel="next""#), None);
        assert_eq!(next_last("garbage"), None);
    }
}
