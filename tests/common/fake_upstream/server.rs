//! The fake registry's routing and handlers: token realm, bearer check, fault statuses,
//! manifests, blobs (with the CDN redirect), tag lists. Records every request it receives.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use rand::Rng as _;
use serde_json::json;

use super::body::{blob_body, Body, BodyPlan};
use super::resume;
use super::{IssuedToken, Seen, Shared, TokenFetch, SERVICE};

enum Route {
    Token,
    Cdn(String),
    Ping,
    Manifest(String, String),
    Blob(String, String),
    Tags(String),
    Other,
}

fn route(path: &str) -> Route {
    if path == "/token" {
        return Route::Token;
    }
    if let Some(d) = path.strip_prefix("/cdn/") {
        return Route::Cdn(d.to_owned());
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return if path == "/v2" {
            Route::Ping
        } else {
            Route::Other
        };
    };
    if rest.is_empty() {
        return Route::Ping;
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Route::Tags(name.to_owned());
    }
    let mut parts = rest.rsplitn(3, '/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(r), Some("manifests"), Some(name)) => Route::Manifest(name.to_owned(), r.to_owned()),
        (Some(d), Some("blobs"), Some(name)) => Route::Blob(name.to_owned(), d.to_owned()),
        _ => Route::Other,
    }
}

fn header_string(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

pub(super) async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    let authorization = header_string(req.headers(), header::AUTHORIZATION);
    let accept = header_string(req.headers(), header::ACCEPT);
    let range = header_string(req.headers(), header::RANGE);
    let route = route(&path);
    let repo = match &route {
        Route::Manifest(n, _) | Route::Blob(n, _) | Route::Tags(n) => Some(n.clone()),
        _ => None,
    };
    let authorized = match &route {
        Route::Token | Route::Cdn(_) | Route::Other => true,
        _ => check_token(&shared, authorization.as_deref(), repo.as_deref()),
    };
    shared.lock().requests.push(Seen {
        method: method.to_string(),
        path: path.clone(),
        query: query.clone(),
        authorization: authorization.clone(),
        accept,
        range,
        authorized,
    });
    if !authorized {
        return Ok(challenge(&shared, repo.as_deref()));
    }
    let head = method == Method::HEAD;
    let resp = match route {
        Route::Token => token(&shared, req.headers(), query.as_deref()),
        Route::Cdn(digest) => {
            if authorization.is_some() {
                error(
                    StatusCode::FORBIDDEN,
                    "DENIED",
                    "the CDN refuses Authorization headers",
                )
            } else if !query.as_deref().unwrap_or("").contains("sig=") {
                error(StatusCode::FORBIDDEN, "DENIED", "unsigned CDN URL")
            } else if let Err(status) = resume::cdn_check(&shared, query.as_deref().unwrap_or("")) {
                error(status, "DENIED", "the signed URL has expired")
            } else {
                serve_blob(&shared, &digest, head, req.headers())
            }
        }
        Route::Ping => json_response(StatusCode::OK, Bytes::from_static(b"{}")),
        Route::Other => error(StatusCode::NOT_FOUND, "UNSUPPORTED", "no such endpoint"),
        route => {
            if let Some(resp) = fault_response(&shared, &path).await {
                return Ok(resp);
            }
            if method != Method::GET && method != Method::HEAD {
                return Ok(error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "UNSUPPORTED",
                    "the fake is read-only",
                ));
            }
            match route {
                Route::Manifest(name, reference) => manifest(&shared, &name, &reference, head),
                Route::Blob(name, digest) => blob(&shared, &name, &digest, head, req.headers()),
                Route::Tags(name) => tags(&shared, &name, query.as_deref()),
                _ => error(StatusCode::NOT_FOUND, "UNSUPPORTED", "no such endpoint"),
            }
        }
    };
    Ok(resp)
}

/// Whether the request may go on: no auth required, or a live token for `repo`.
fn check_token(shared: &Shared, authorization: Option<&str>, repo: Option<&str>) -> bool {
    let mut g = shared.lock();
    if !g.faults.require_auth {
        return true;
    }
    let Some(token) = authorization.and_then(|a| a.strip_prefix("Bearer ")) else {
        return false;
    };
    let reject_all = g.faults.reject_all_tokens;
    let ok = match g.tokens.get(token) {
        Some(t) => {
            !reject_all
                && !t.revoked
                && t.expires > Instant::now()
                && (repo.is_none() || t.repo.as_deref() == repo)
        }
        None => false,
    };
    if ok && g.faults.reject_next_token {
        g.faults.reject_next_token = false;
        if let Some(t) = g.tokens.get_mut(token) {
            t.revoked = true;
        }
        g.rejected_tokens += 1;
        return false;
    }
    if !ok {
        g.rejected_tokens += 1;
    }
    ok
}

fn challenge(shared: &Shared, repo: Option<&str>) -> Response<Body> {
    let mut value = format!(
        "Bearer realm=\"{}/token\",service=\"{SERVICE}\"",
        shared.base
    );
    if let Some(r) = repo {
        value.push_str(&format!(",scope=\"repository:{r}:pull\""));
    }
    let mut resp = error(
        StatusCode::UNAUTHORIZED,
        "UNAUTHORIZED",
        "authentication required",
    );
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        value.parse().expect("challenge header"),
    );
    resp
}

/// `GET /token?service=&scope=`: checks Basic credentials when required, issues a token.
fn token(shared: &Shared, headers: &HeaderMap, query: Option<&str>) -> Response<Body> {
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .into_owned()
        .collect();
    let get = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let (service, scope) = (get("service"), get("scope"));
    let basic = header_string(headers, header::AUTHORIZATION)
        .and_then(|a| a.strip_prefix("Basic ").map(str::to_owned))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.split_once(':').map(|(u, p)| (u.to_owned(), p.to_owned())));
    let mut g = shared.lock();
    let refused = match &g.faults.credentials {
        Some(creds) => basic.as_ref() != Some(creds),
        None => false,
    };
    let repo = scope.as_deref().and_then(|s| {
        let s = s.strip_prefix("repository:")?;
        let (name, actions) = s.rsplit_once(':')?;
        actions
            .split(',')
            .any(|a| a == "pull")
            .then(|| name.to_owned())
    });
    let issued = (!refused).then(|| hex::encode(rand::thread_rng().gen::<[u8; 16]>()));
    g.token_fetches.push(TokenFetch {
        basic,
        service,
        scope,
        issued: issued.clone(),
    });
    let Some(token) = issued else {
        return error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "bad credentials");
    };
    let expires_in = g.faults.token_expires_in;
    g.tokens.insert(
        token.clone(),
        IssuedToken {
            repo,
            expires: Instant::now() + Duration::from_secs(expires_in),
            revoked: false,
        },
    );
    let body = json!({
        "token": token,
        "access_token": token,
        "expires_in": expires_in,
        "issued_at": "2024-01-01T00:00:00Z",
    });
    json_response(StatusCode::OK, Bytes::from(body.to_string()))
}

/// The `hold`, `hang` or `fail` switch, when it applies to `path`.
async fn fault_response(shared: &Shared, path: &str) -> Option<Response<Body>> {
    let (fail, hang, hold) = {
        let g = shared.lock();
        (
            g.faults.fail.clone(),
            g.faults.hang.clone(),
            g.faults.hold.clone(),
        )
    };
    if hold.is_some_and(|h| path.contains(&h)) {
        // Subscribed before counting, so a release right after the count is not missed.
        let mut gate = shared.gate.subscribe();
        shared.progress.send_modify(|p| p.held += 1);
        // Sender gone means the fake stopped: go on (the connection is dying anyway).
        let _ = gate.wait_for(|open| *open).await;
    }
    if hang.is_some_and(|h| path.contains(&h)) {
        std::future::pending::<()>().await;
    }
    let fail = fail.filter(|f| f.path_contains.as_ref().is_none_or(|p| path.contains(p)))?;
    let status = StatusCode::from_u16(fail.status).expect("fault status");
    let code = match fail.status {
        429 => "TOOMANYREQUESTS",
        _ => "UNAVAILABLE",
    };
    let mut resp = error(status, code, "fault switch");
    if let Some(r) = fail.retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, r.parse().expect("retry-after"));
    }
    Some(resp)
}

fn manifest(shared: &Shared, name: &str, reference: &str, head: bool) -> Response<Body> {
    let found = {
        let g = shared.lock();
        g.repos.get(name).and_then(|repo| {
            let digest = if reference.contains(':') {
                reference.to_owned()
            } else {
                repo.tags.get(reference)?.clone()
            };
            let (media, bytes) = repo.manifests.get(&digest)?;
            Some((digest, media.clone(), bytes.clone()))
        })
    };
    let Some((digest, media, bytes)) = found else {
        return error(
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            "manifest unknown",
        );
    };
    let b = Response::builder()
        .header(header::CONTENT_TYPE, media)
        .header("docker-content-digest", &digest)
        .header(header::ETAG, format!("\"{digest}\""))
        .header(header::CONTENT_LENGTH, bytes.len());
    let body = if head { empty() } else { full(bytes) };
    b.body(body).expect("manifest response")
}

fn blob(
    shared: &Shared,
    name: &str,
    digest: &str,
    head: bool,
    headers: &HeaderMap,
) -> Response<Body> {
    let (held, redirect) = {
        let g = shared.lock();
        let held = g.repos.get(name).is_some_and(|r| r.blobs.contains(digest))
            && g.blobs.contains_key(digest);
        (held, g.faults.redirect_blobs)
    };
    if !held {
        return error(
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
            "blob unknown to registry",
        );
    }
    if redirect && !head {
        let sig = hex::encode(rand::thread_rng().gen::<[u8; 8]>());
        return Response::builder()
            .status(StatusCode::TEMPORARY_REDIRECT)
            .header(
                header::LOCATION,
                format!("{}/cdn/{digest}?sig={sig}", resume::cdn_base(shared)),
            )
            .body(empty())
            .expect("redirect");
    }
    serve_blob(shared, digest, head, headers)
}

/// A blob's bytes (faults applied), honouring `Range: bytes=N-` / `N-M`.
fn serve_blob(shared: &Shared, digest: &str, head: bool, headers: &HeaderMap) -> Response<Body> {
    let (data, faults) = {
        let g = shared.lock();
        (g.blobs.get(digest).cloned(), g.faults.clone())
    };
    let Some(mut data) = data else {
        return error(
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
            "blob unknown to registry",
        );
    };
    if faults.corrupt.contains(digest) && !data.is_empty() {
        let mut v = data.to_vec();
        let last = v.len() - 1;
        v[last] ^= 0xff;
        data = Bytes::from(v);
    }
    let size = data.len() as u64;
    let mut b = Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header("docker-content-digest", digest)
        .header(header::ACCEPT_RANGES, "bytes");
    let range = header_string(headers, header::RANGE)
        .and_then(|r| parse_range(&r, size))
        .and_then(|r| match r {
            Ok(asked) => resume::served_range(shared, asked, size).map(Ok),
            Err(()) => Some(Err(())),
        });
    let (start, end) = match range {
        Some(Ok((s, e))) => {
            b = b
                .status(StatusCode::PARTIAL_CONTENT)
                .header(header::CONTENT_RANGE, format!("bytes {s}-{e}/{size}"));
            (s, e + 1)
        }
        Some(Err(())) => {
            return error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "RANGE_INVALID",
                "bad range",
            )
        }
        None => (0, size),
    };
    if !faults.no_content_length {
        b = b.header(header::CONTENT_LENGTH, end - start);
    }
    if head {
        return b.body(empty()).expect("blob head");
    }
    let plan = BodyPlan {
        chunk: faults.chunk_size.max(1),
        delay: faults.chunk_delay,
        cut_after: faults.cut_after,
        stall_after: faults.stall_after,
        pause_at: faults.pause_at,
    };
    let slice = data.slice(start as usize..end as usize);
    b.body(blob_body(shared, slice, plan))
        .expect("blob response")
}

/// `Some(Ok((first, last)))` inclusive, `Some(Err)` unsatisfiable, `None` no usable range.
fn parse_range(value: &str, size: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = value.strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let start: u64 = a.trim().parse().ok()?;
    let end: u64 = if b.trim().is_empty() {
        size.saturating_sub(1)
    } else {
        b.trim().parse::<u64>().ok()?.min(size.saturating_sub(1))
    };
    Some(if start >= size || start > end {
        Err(())
    } else {
        Ok((start, end))
    })
}

fn tags(shared: &Shared, name: &str, query: Option<&str>) -> Response<Body> {
    let tags: Option<Vec<String>> = shared
        .lock()
        .repos
        .get(name)
        .map(|r| r.tags.keys().cloned().collect());
    let Some(mut tags) = tags else {
        return error(
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            "repository name not known",
        );
    };
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .into_owned()
        .collect();
    let get = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    if let Some(last) = get("last") {
        tags.retain(|t| *t > last);
    }
    let mut link = None;
    if let Some(n) = get("n").and_then(|n| n.parse::<usize>().ok()) {
        if tags.len() > n {
            tags.truncate(n);
            if let Some(l) = tags.last() {
                link = Some(format!(
                    "</v2/{name}/tags/list?n={n}&last={l}>; rel=\"next\""
                ));
            }
        }
    }
    let body = json!({"name": name, "tags": tags}).to_string();
    let mut resp = json_response(StatusCode::OK, Bytes::from(body));
    if let Some(l) = link {
        resp.headers_mut()
            .insert(header::LINK, l.parse().expect("link"));
    }
    resp
}

fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

fn json_response(status: StatusCode, bytes: Bytes) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header("docker-distribution-api-version", "registry/2.0")
        .header(header::CONTENT_LENGTH, bytes.len())
        .body(full(bytes))
        .expect("json response")
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = json!({"errors": [{"code": code, "message": message, "detail": null}]});
    json_response(status, Bytes::from(body.to_string()))
}
