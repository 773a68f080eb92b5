//! A registry that speaks the OCI 1.1 referrers API, for the routing tests (the fake upstream
//! answers `/v2/<name>/referrers/<digest>` with 404, as docker-registry 2.8 does): `GET /v2/`
//! is 200, `GET /v2/<name>/referrers/<digest>` an image index of the descriptors a test put
//! (an empty one for any other subject), anything else 404. No auth; it records the paths
//! and queries it answered.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use super::images::OCI_INDEX;

#[derive(Default)]
struct State {
    /// (repository, subject digest) → the descriptors of its referrers.
    referrers: HashMap<(String, String), Vec<Value>>,
    /// Every request as `path?query`.
    requests: Vec<String>,
}

/// The running registry; it stops serving when dropped.
pub struct ReferrersApi {
    url: String,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl ReferrersApi {
    /// Starts on a fresh port of 127.0.0.1.
    pub async fn start() -> ReferrersApi {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind referrers API");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(Mutex::new(State::default()));
        let served = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = served.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(answer(&state, &req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        ReferrersApi { url, state, task }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Sets the referrers of `subject` in `repo`: the descriptors its index lists.
    pub fn set(&self, repo: &str, subject: &str, descriptors: Vec<Value>) {
        lock(&self.state)
            .referrers
            .insert((repo.to_owned(), subject.to_owned()), descriptors);
    }

    /// The bytes it answers for `subject` in `repo` (compact JSON).
    pub fn index_bytes(&self, repo: &str, subject: &str) -> Bytes {
        let st = lock(&self.state);
        let descs = st
            .referrers
            .get(&(repo.to_owned(), subject.to_owned()))
            .cloned()
            .unwrap_or_default();
        index(descs)
    }

    /// Every request it answered, as `path` or `path?query`.
    pub fn requests(&self) -> Vec<String> {
        lock(&self.state).requests.clone()
    }
}

impl Drop for ReferrersApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

fn index(descriptors: Vec<Value>) -> Bytes {
    Bytes::from(
        json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}).to_string(),
    )
}

fn answer(state: &Mutex<State>, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let mut st = lock(state);
    st.requests.push(match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path.clone(),
    });
    let reply = |status: StatusCode, ctype: &str, body: Bytes| {
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, ctype)
            .header("docker-distribution-api-version", "registry/2.0")
            .header(header::CONTENT_LENGTH, body.len())
            .body(Full::new(body))
            .expect("response")
    };
    if path == "/v2/" {
        return reply(
            StatusCode::OK,
            "application/json",
            Bytes::from_static(b"{}"),
        );
    }
    let subject = path
        .strip_prefix("/v2/")
        .and_then(|rest| rest.rsplit_once("/referrers/"));
    match subject {
        Some((repo, digest)) => {
            let descs = st
                .referrers
                .get(&(repo.to_owned(), digest.to_owned()))
                .cloned()
                .unwrap_or_default();
            reply(StatusCode::OK, OCI_INDEX, index(descs))
        }
        None => {
            let body =
                json!({"errors": [{"code": "NAME_UNKNOWN", "message": "only referrers here"}]});
            reply(
                StatusCode::NOT_FOUND,
                "application/json",
                Bytes::from(body.to_string()),
            )
        }
    }
}
