//! Support for the operator tests: reading the samples of a `/metrics` exposition, and a
//! pass-through proxy in front of the fake upstream that adds the `ratelimit-remaining`
//! header Docker Hub sends (the fake itself never sends it).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The samples of one scrape: `(name, labels)` → value.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    pub text: String,
    samples: BTreeMap<(String, BTreeMap<String, String>), f64>,
}

impl Scrape {
    /// Parses OpenMetrics text (`name{a="x",b="y"} 1`); comment lines are skipped.
    pub fn parse(text: &str) -> Scrape {
        let mut samples = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("not a sample line: {line:?}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad sample value in {line:?}"));
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))),
                None => (series, BTreeMap::new()),
            };
            samples.insert((name.to_owned(), labels), value);
        }
        Scrape {
            text: text.to_owned(),
            samples,
        }
    }

    /// The sample `name` with exactly `labels` (0 when absent: a counter never incremented).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples
            .get(&(name.to_owned(), labels))
            .copied()
            .unwrap_or(0.0)
    }

    /// The sum of the samples `name` whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|((n, l), _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, v)| *v)
            .sum()
    }

    /// Whether any sample of `name` (with any labels) is present.
    pub fn has(&self, name: &str) -> bool {
        self.samples.keys().any(|(n, _)| n == name)
    }

    /// Every sample whose name starts with `prefix`, one per line, for failure messages.
    pub fn show(&self, prefix: &str) -> String {
        self.samples
            .iter()
            .filter(|((n, _), _)| n.starts_with(prefix))
            .map(|((n, l), v)| format!("  {n}{l:?} {v}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some((key, after)) = rest.split_once("=\"") {
        let end = after
            .find('"')
            .unwrap_or_else(|| panic!("unterminated label value in {s:?}"));
        out.insert(
            key.trim_start_matches(',').trim().to_owned(),
            after[..end].to_owned(),
        );
        rest = &after[end + 1..];
    }
    out
}

/// A proxy to `target` (the fake upstream) that adds `ratelimit-remaining: <value>` to every
/// answer while a value is set. Stops when dropped.
pub struct RatelimitProxy {
    url: String,
    remaining: Arc<Mutex<Option<String>>>,
    task: JoinHandle<()>,
}

impl RatelimitProxy {
    pub async fn start(target: &str) -> RatelimitProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let url = format!("http://{}", listener.local_addr().expect("proxy addr"));
        let remaining = Arc::new(Mutex::new(None::<String>));
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("proxy client");
        let (target, value) = (target.trim_end_matches('/').to_owned(), remaining.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (client, target, value) = (client.clone(), target.clone(), value.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        forward(client.clone(), target.clone(), value.clone(), req)
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        RatelimitProxy {
            url,
            remaining,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// The header value sent from now on (`"100;w=21600"`), or none.
    pub fn set_remaining(&self, value: Option<&str>) {
        *self.remaining.lock().unwrap_or_else(|p| p.into_inner()) = value.map(str::to_owned);
    }
}

impl Drop for RatelimitProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(
    client: reqwest::Client,
    target: String,
    value: Arc<Mutex<Option<String>>>,
    req: http::Request<Incoming>,
) -> Result<http::Response<Full<Bytes>>, Infallible> {
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let mut upstream = client.request(req.method().clone(), format!("{target}{path}"));
    for (name, v) in req.headers() {
        if name != http::header::HOST {
            upstream = upstream.header(name, v);
        }
    }
    let resp = match upstream.send().await {
        Ok(r) => r,
        Err(e) => {
            let mut r = http::Response::new(Full::new(Bytes::from(e.to_string())));
            *r.status_mut() = http::StatusCode::BAD_GATEWAY;
            return Ok(r);
        }
    };
    let mut out = http::Response::builder().status(resp.status());
    for (name, v) in resp.headers() {
        if name != http::header::TRANSFER_ENCODING && name != http::header::CONNECTION {
            out = out.header(name, v);
        }
    }
    let remaining = value.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if let Some(r) = remaining {
        out = out.header("ratelimit-remaining", r);
    }
    let body = resp.bytes().await.unwrap_or_default();
    Ok(out.body(Full::new(body)).expect("proxy response"))
}
