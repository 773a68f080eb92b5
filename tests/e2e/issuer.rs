//! The token issuer: an in-process stand-in for Docker Hub's `auth.docker.io/token` that signs
//! RS256 JWTs (with an `x5c` certificate) for docker-registry, and records every request it got.
//! It owns the signing key and certificate; it knows nothing about images.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

/// The `service` the upstream registry names in its challenge and expects as the `aud` claim.
pub const SERVICE: &str = "registry.e2e.test";
/// The `iss` claim the upstream registry accepts.
pub const ISSUER: &str = "regmirror-e2e-issuer";

/// A signing key and its self-signed certificate, made with the `openssl` CLI.
pub struct KeyPair {
    pub key: PathBuf,
    pub cert: PathBuf,
}

impl KeyPair {
    pub fn generate(dir: &Path) -> KeyPair {
        let key = dir.join("issuer.key");
        let cert = dir.join("issuer.crt");
        let out = std::process::Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3",
            ])
            .args(["-subj", "/CN=regmirror-e2e-issuer", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl req failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        KeyPair { key, cert }
    }
}

/// One request the issuer answered.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    pub scopes: Vec<String>,
    /// The user name of the request's HTTP Basic credentials, if it had any.
    pub basic_user: Option<String>,
    pub status: u16,
}

struct Signer {
    key: EncodingKey,
    cert_der_b64: String,
    /// When set, only requests with exactly these Basic credentials get a token.
    require: Option<(String, String)>,
    log: Mutex<Vec<TokenRequest>>,
}

/// A running issuer; it stops when dropped.
pub struct Issuer {
    pub port: u16,
    signer: Arc<Signer>,
    task: tokio::task::JoinHandle<()>,
}

impl Issuer {
    /// Starts on a free port of 127.0.0.1; with `require`, anonymous requests get 401.
    pub async fn start(keys: &KeyPair, require: Option<(&str, &str)>) -> Issuer {
        let pem = std::fs::read(&keys.key).expect("read issuer key");
        let cert_pem = std::fs::read_to_string(&keys.cert).expect("read issuer cert");
        let der_b64: String = cert_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        let signer = Arc::new(Signer {
            key: EncodingKey::from_rsa_pem(&pem).expect("parse issuer key"),
            cert_der_b64: der_b64,
            require: require.map(|(u, p)| (u.to_owned(), p.to_owned())),
            log: Mutex::new(Vec::new()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind issuer");
        let port = listener.local_addr().expect("issuer addr").port();
        let served = Arc::clone(&signer);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let signer = Arc::clone(&served);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let signer = Arc::clone(&signer);
                        async move { Ok::<_, Infallible>(signer.answer(&req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Issuer { port, signer, task }
    }

    /// The realm to put in the upstream's `auth.token.realm`.
    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    /// Every request answered so far.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.signer.log.lock().expect("issuer log").clone()
    }

    /// A token granting `actions` on repository `name`, for the harness's own requests.
    pub fn token_for(&self, name: &str, actions: &[&str]) -> String {
        let scope = format!("repository:{name}:{}", actions.join(","));
        self.signer.sign(&[scope], None)
    }
}

impl Drop for Issuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Signer {
    fn answer(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let query: HashMap<String, Vec<String>> = req
            .uri()
            .query()
            .map(|q| {
                url::form_urlencoded::parse(q.as_bytes()).fold(HashMap::new(), |mut m, (k, v)| {
                    m.entry(k.into_owned())
                        .or_insert_with(Vec::new)
                        .push(v.into_owned());
                    m
                })
            })
            .unwrap_or_default();
        let scopes: Vec<String> = query.get("scope").cloned().unwrap_or_default();
        let basic = basic_credentials(req);
        let user = basic.as_ref().map(|(u, _)| u.clone());
        let status = if req.uri().path() != "/token" {
            StatusCode::NOT_FOUND
        } else if self.require.is_some() && basic != self.require {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::OK
        };
        self.log.lock().expect("issuer log").push(TokenRequest {
            scopes: scopes.clone(),
            basic_user: user.clone(),
            status: status.as_u16(),
        });
        let body = if status == StatusCode::OK {
            let token = self.sign(&scopes, user.as_deref());
            json!({
                "token": token,
                "access_token": token,
                "expires_in": 300,
                "issued_at": rfc3339_now(),
            })
        } else {
            json!({"details": "incorrect username or password"})
        };
        let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                hyper::header::HeaderValue::from_static("Basic realm=\"e2e issuer\""),
            );
        }
        resp
    }

    /// Signs a token granting every action asked for in `scopes` (`type:name:actions`; the
    /// name may itself hold colons, so it is split at the first and the last one).
    fn sign(&self, scopes: &[String], user: Option<&str>) -> String {
        let access: Vec<serde_json::Value> = scopes
            .iter()
            .flat_map(|s| s.split(' '))
            .filter_map(|s| {
                let (kind, rest) = s.split_once(':')?;
                let (name, actions) = rest.rsplit_once(':')?;
                let actions: Vec<&str> = actions.split(',').filter(|a| !a.is_empty()).collect();
                Some(json!({"type": kind, "name": name, "actions": actions}))
            })
            .collect();
        let now = unix_now();
        let claims = json!({
            "iss": ISSUER,
            "sub": user.unwrap_or(""),
            "aud": SERVICE,
            "exp": now + 300,
            "nbf": now - 30,
            "iat": now,
            "jti": format!("{:032x}", rand::random::<u128>()),
            "access": access,
        });
        let mut header = Header::new(Algorithm::RS256);
        header.x5c = Some(vec![self.cert_der_b64.clone()]);
        jsonwebtoken::encode(&header, &claims, &self.key).expect("sign token")
    }
}

fn basic_credentials(req: &Request<Incoming>) -> Option<(String, String)> {
    let value = req
        .headers()
        .get(hyper::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, pass) = text.split_once(':')?;
    Some((user.to_owned(), pass.to_owned()))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Now as RFC 3339 UTC, e.g. `2024-05-01T12:00:00Z` (civil-from-days, no date crate needed).
pub fn rfc3339_now() -> String {
    let secs = unix_now();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}
