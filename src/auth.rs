//! Client authentication: HTTP Basic against an htpasswd file of bcrypt
//! users (`htpasswd -B`). A verified (user, password) is remembered for a few
//! minutes so a pull of 30 layers costs one bcrypt. The file is reloaded when
//! it changes.
//!
//! bcrypt is what a client without credentials can make the mirror spend, so
//! it is bounded three ways: it runs on a few threads of its own
//! ([`pool`]), concurrent checks of the same credentials share one run
//! (and its outcome, right or wrong, is remembered), and each client address
//! may cause only a few failed runs per window ([`backoff`]). An unknown user
//! is checked against a dummy hash of the file's cost, so the time of a
//! refusal does not tell which user names exist.
//!
//! What an authenticated user (or a client without credentials) may do is
//! [`access`]'s decision, asked through [`Authenticator::authorize`].

pub mod access;
mod backoff;
mod pool;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use base64::Engine as _;

use crate::config::AuthConfig;
use crate::endpoint::Endpoint;
use crate::error::Error;
use crate::hashing::hmac_sha256;
use crate::metrics::Metrics;

use access::{Decision, Policy};
use backoff::Backoff;
use pool::BcryptPool;

/// How long the outcome of a check of (user, hash, password) is trusted
/// without bcrypt. The outcome never changes (bcrypt is deterministic and a
/// changed file changes the hash); this only bounds how long it takes memory.
const REMEMBER: Duration = Duration::from_secs(300);
/// How many outcomes are remembered. The cache admits by frequency, so a
/// flood of one-off wrong passwords does not push out the credentials every
/// pull uses.
const OUTCOMES: u64 = 10_000;
/// How often the file is checked for changes.
const WATCH_EVERY: Duration = Duration::from_secs(2);
/// The cost of the dummy hash when the file has no users (`htpasswd -B`'s).
const DEFAULT_COST: u32 = 5;

/// Users and their bcrypt hashes.
#[derive(Debug, Default, Clone)]
pub struct Htpasswd {
    users: HashMap<String, String>,
    /// What an unknown user is checked against: a hash of the cost most of
    /// the users have, that no password matches.
    dummy: String,
}

impl Htpasswd {
    /// Parses `user:hash` lines; blank lines and `#` comments are skipped.
    /// A hash that is not bcrypt is an error naming the line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut users = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                return Err(format!("line {}: expected user:hash", n + 1));
            };
            let bcrypt = ["$2a$", "$2b$", "$2y$", "$2x$"]
                .iter()
                .any(|p| hash.starts_with(p));
            if user.is_empty() || !bcrypt {
                return Err(format!(
                    "line {}: user {user:?} has no bcrypt hash (create it with htpasswd -B)",
                    n + 1
                ));
            }
            users.insert(user.to_owned(), hash.to_owned());
        }
        let dummy = dummy_hash(usual_cost(users.values()));
        Ok(Self { users, dummy })
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// The cost most hashes have (the higher of a tie), so an unknown user takes
/// as long as most known ones.
fn usual_cost<'a>(hashes: impl Iterator<Item = &'a String>) -> u32 {
    let mut counts: HashMap<u32, usize> = HashMap::new();
    for h in hashes {
        if let Ok(parts) = h.parse::<bcrypt::HashParts>() {
            *counts.entry(parts.get_cost()).or_default() += 1;
        }
    }
    counts
        .into_iter()
        .max_by_key(|&(cost, n)| (n, cost))
        .map_or(DEFAULT_COST, |(cost, _)| cost)
}

/// A well-formed bcrypt hash of `cost` with a random salt and a random
/// digest: checking a password against it costs a full bcrypt of that cost
/// (a malformed one would be refused at once, which is the leak this
/// avoids), and no password is known to match it; its outcome is ignored
/// anyway.
fn dummy_hash(cost: u32) -> String {
    let b64 = base64::engine::GeneralPurpose::new(
        &base64::alphabet::BCRYPT,
        base64::engine::general_purpose::NO_PAD,
    );
    let cost = cost.clamp(4, 31);
    let salt: [u8; 16] = rand::random();
    let digest: [u8; 23] = rand::random();
    format!("$2b${cost:02}${}{}", b64.encode(salt), b64.encode(digest))
}

/// The key of a check's outcome: a keyed hash of user, the hash checked
/// against (a changed file makes new keys) and password, so the password
/// itself is not kept, and a memory dump does not give a fast offline test
/// of guesses without the per-process key.
type CheckKey = [u8; 32];

/// A user whose credentials [`Authenticator::check`] verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User(String);

impl User {
    pub fn name(&self) -> &str {
        &self.0
    }
}

/// Checks `Authorization: Basic` headers, and what their users may do.
pub struct Authenticator {
    realm: String,
    access: Policy,
    path: PathBuf,
    users: RwLock<Arc<Htpasswd>>,
    modified: Mutex<Option<SystemTime>>,
    /// Outcomes of checks, right and wrong; also where concurrent checks of
    /// the same credentials wait for the one that runs.
    outcomes: moka::future::Cache<CheckKey, bool>,
    /// The per-process key of [`CheckKey`]s.
    secret: [u8; 32],
    pool: BcryptPool,
    backoff: Backoff,
    metrics: Arc<Metrics>,
}

impl Authenticator {
    /// Checks against `users`, loaded from `path` (watched for changes).
    pub fn new(path: &Path, users: Htpasswd, config: &AuthConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            realm: config.realm.clone(),
            access: Policy::new(config, true),
            path: path.to_path_buf(),
            users: RwLock::new(Arc::new(users)),
            modified: Mutex::new(modified(path)),
            outcomes: moka::future::Cache::builder()
                .max_capacity(OUTCOMES)
                .time_to_live(REMEMBER)
                .build(),
            secret: rand::random(),
            pool: BcryptPool::new(config.bcrypt_threads),
            backoff: Backoff::new(config.max_failures, config.failure_window),
            metrics,
        }
    }

    fn unauthorized(&self, reason: &'static str, detail: &str) -> Error {
        self.metrics.auth_refusal(reason);
        Error::Unauthorized {
            realm: self.realm.clone(),
            detail: detail.to_owned(),
        }
    }

    /// The user whose credentials the header carries, when they are right.
    /// `client` is the address failures are held against.
    pub async fn check(&self, authorization: Option<&str>, client: IpAddr) -> Result<User, Error> {
        let Some(value) = authorization else {
            return Err(self.unauthorized("missing", "authentication required"));
        };
        let Some((user, password)) = parse_basic(value) else {
            return Err(self.unauthorized("malformed", "malformed Basic credentials"));
        };
        let (hash, known) = {
            let users = self.users.read().unwrap_or_else(|p| p.into_inner());
            match users.users.get(&user) {
                Some(hash) => (hash.clone(), true),
                None => (users.dummy.clone(), false),
            }
        };
        let key = check_key(&self.secret, &user, &hash, &password);
        // The one check of these credentials runs here; concurrent callers
        // with the same key wait for its outcome. An error (backoff, a lost
        // thread) is not remembered.
        let verified = self
            .outcomes
            .try_get_with(key, async move {
                let charge =
                    self.backoff
                        .charge(client)
                        .await
                        .map_err(|wait| Error::LoginBackoff {
                            retry_after: wait.as_secs().max(1),
                        })?;
                self.metrics.auth_bcrypt();
                let matched = self
                    .pool
                    .run(move || bcrypt::verify(password, &hash).unwrap_or(false))
                    .await?;
                // An unknown user is refused whatever the dummy check said.
                let ok = matched && known;
                if ok {
                    charge.succeeded();
                }
                Ok::<_, Error>(ok)
            })
            .await;
        match verified {
            Ok(true) => Ok(User(user)),
            Ok(false) => Err(self.unauthorized("invalid", "invalid username or password")),
            Err(e) => {
                if matches!(*e, Error::LoginBackoff { .. }) {
                    self.metrics.auth_refusal("backoff");
                }
                Err((*e).clone())
            }
        }
    }

    /// Whether a request without credentials goes on without a check
    /// (`auth.anonymous_pull`): `endpoint` is the parsed request (`None`
    /// when it did not parse), `read` whether its method is GET or HEAD.
    pub fn lets_in_anonymous(&self, endpoint: Option<&Endpoint>, read: bool) -> bool {
        self.access.lets_in_anonymous(endpoint, read)
    }

    /// Whether `user` (`None`: no credentials were sent) may make the
    /// request: `DENIED` naming user, action and repository when a user may
    /// not, the challenge when a client without credentials may not.
    pub fn authorize(&self, user: Option<&User>, endpoint: &Endpoint) -> Result<(), Error> {
        match self.access.decide(user.map(User::name), endpoint) {
            Decision::Allowed => Ok(()),
            Decision::Denied(denial) => Err(Error::Denied(denial.to_string())),
            Decision::Unauthenticated(want) => {
                let detail = match want {
                    Some(want) => format!("authentication required to {want}"),
                    None => "authentication required".to_owned(),
                };
                Err(self.unauthorized("missing", &detail))
            }
        }
    }

    /// Reloads the file when it changes, until the process ends. A broken
    /// file is logged and the previous users stay.
    pub async fn watch(self: Arc<Self>) {
        loop {
            tokio::time::sleep(WATCH_EVERY).await;
            let now = modified(&self.path);
            {
                let mut last = self.modified.lock().unwrap_or_else(|p| p.into_inner());
                if *last == now {
                    continue;
                }
                *last = now;
            }
            match Htpasswd::load(&self.path) {
                Ok(users) => {
                    let count = users.users.len();
                    *self.users.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(users);
                    tracing::info!(users = count, "htpasswd file reloaded");
                }
                Err(_) if !self.path.exists() => {
                    // Kept rather than dropped: an empty user list would
                    // lock every client out, and no list at all would open
                    // the mirror; the file is read again when it is back.
                    tracing::error!(path = %self.path.display(), "htpasswd file is gone; keeping the previous users until it is back")
                }
                Err(e) => {
                    tracing::error!(error = %e, "htpasswd reload failed; keeping the previous users")
                }
            }
        }
    }
}

/// HMAC-SHA256 (RFC 2104) of user, hash and password under `secret`, each
/// part length-prefixed so no two triples give the same message.
fn check_key(secret: &[u8; 32], user: &str, hash: &str, password: &str) -> CheckKey {
    let mut message = Vec::with_capacity(24 + user.len() + hash.len() + password.len());
    for part in [user, hash, password] {
        message.extend_from_slice(&(part.len() as u64).to_be_bytes());
        message.extend_from_slice(part.as_bytes());
    }
    hmac_sha256(secret, &message)
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// `Basic base64(user:password)` → (user, password).
fn parse_basic(value: &str) -> Option<(String, String)> {
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn htpasswd_lines() {
        let ok = Htpasswd::parse(
            "# users\n\nmoby:$2y$05$abcdefghijklmnopqrstuu5K4Wq3Ud3R6yxnT0p4kC4o5QKQhYfq\n",
        )
        .unwrap();
        assert_eq!(ok.users.len(), 1);
        let e = Htpasswd::parse("a:$2y$05$x\nb:{SHA}abc\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("\"b\""), "{e}");
        assert!(Htpasswd::parse("nocolon").unwrap_err().contains("line 1"));
        assert!(Htpasswd::parse("u:$apr1$xyz").is_err());
    }

    #[test]
    fn basic_header() {
        assert_eq!(
            parse_basic("Basic bW9ieTpnb3Jkb24="),
            Some(("moby".into(), "gordon".into()))
        );
        assert_eq!(parse_basic("Bearer xyz"), None);
        assert_eq!(parse_basic("Basic !!!"), None);
        assert_eq!(parse_basic("Basic bm9jb2xvbg=="), None);
    }

    fn encoded(user_password: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(user_password)
        )
    }

    /// The `regmirror_auth_*` sample `name` (with its labels) in `metrics`.
    fn sample(metrics: &Metrics, name: &str) -> u64 {
        let text = metrics.encode();
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in {text}"));
        line.rsplit_once(' ').unwrap().1.parse().unwrap()
    }

    fn authenticator(users: &str, config: &AuthConfig) -> (Authenticator, Arc<Metrics>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        std::fs::write(&path, users).unwrap();
        let metrics = Arc::new(Metrics::new());
        let users = Htpasswd::load(&path).unwrap();
        let auth = Authenticator::new(&path, users, config, metrics.clone());
        (auth, metrics)
    }

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[tokio::test]
    async fn verifies_once_then_remembers() {
        let hash = bcrypt::hash("gordon", 4).unwrap();
        let (auth, metrics) = authenticator(&format!("moby:{hash}\n"), &AuthConfig::default());
        let good = encoded("moby:gordon");
        let bad = encoded("moby:wrong");
        assert_eq!(
            auth.check(Some(&good), CLIENT).await.unwrap().name(),
            "moby"
        );
        assert_eq!(
            auth.check(Some(&good), CLIENT).await.unwrap().name(),
            "moby"
        );
        assert_eq!(sample(&metrics, "regmirror_auth_bcrypt_total"), 1);
        for _ in 0..3 {
            assert!(matches!(
                auth.check(Some(&bad), CLIENT).await,
                Err(Error::Unauthorized { .. })
            ));
        }
        assert_eq!(
            sample(&metrics, "regmirror_auth_bcrypt_total"),
            2,
            "a known wrong password is refused without another bcrypt"
        );
        assert!(matches!(
            auth.check(None, CLIENT).await,
            Err(Error::Unauthorized { .. })
        ));
        let invalid = "regmirror_auth_refusals_total{reason=\"invalid\"}";
        assert_eq!(sample(&metrics, invalid), 3);
    }

    #[tokio::test]
    async fn refusals_are_denied_for_a_user_and_the_challenge_without_credentials() {
        use crate::endpoint::Endpoint;
        use crate::reference::{Reference, RepoName};
        let hash = bcrypt::hash("pw", 4).unwrap();
        let config = AuthConfig {
            realm: "r".into(),
            anonymous_pull: true,
            access: vec![crate::config::AccessRule {
                users: vec!["ci".into()],
                repos: vec!["myorg/*".into()],
                actions: vec!["push".into()],
            }],
            ..AuthConfig::default()
        };
        let users = format!("ci:{hash}\nbob:{hash}\n");
        let (auth, metrics) = authenticator(&users, &config);
        let push = Endpoint::PutManifest {
            name: RepoName::parse("myorg/app").unwrap(),
            reference: Reference::parse("v1").unwrap(),
        };
        let ci = auth.check(Some(&encoded("ci:pw")), CLIENT).await.unwrap();
        let bob = auth.check(Some(&encoded("bob:pw")), CLIENT).await.unwrap();
        assert!(auth.authorize(Some(&ci), &push).is_ok());
        let e = auth.authorize(Some(&bob), &push).unwrap_err();
        assert_eq!(
            e.to_string(),
            Error::Denied(
                "user \"bob\" may not push to myorg/app: no auth.access rule grants it".into()
            )
            .to_string()
        );
        assert!(!e.to_string().contains("pw"), "{e}");
        let e = auth.authorize(None, &push).unwrap_err();
        let Error::Unauthorized { realm, detail } = e else {
            panic!("{e:?}")
        };
        assert_eq!(
            (realm.as_str(), detail.as_str()),
            ("r", "authentication required to push to myorg/app")
        );
        let ping = auth.authorize(None, &Endpoint::Ping);
        assert!(
            matches!(&ping, Err(Error::Unauthorized { detail, .. }) if detail == "authentication required"),
            "{ping:?}"
        );
        let missing = "regmirror_auth_refusals_total{reason=\"missing\"}";
        assert_eq!(sample(&metrics, missing), 2);
        assert!(auth.lets_in_anonymous(
            Some(&Endpoint::Catalog {
                page: Default::default()
            }),
            true
        ));
        assert!(!auth.lets_in_anonymous(Some(&push), false));
    }

    #[test]
    fn the_dummy_hash_costs_a_full_bcrypt_of_the_usual_cost_and_matches_nothing() {
        let h = |cost| bcrypt::hash("x", cost).unwrap();
        assert_eq!(usual_cost([h(4), h(6), h(6)].iter()), 6);
        assert_eq!(usual_cost([h(4), h(5)].iter()), 5, "a tie: the higher");
        assert_eq!(usual_cost([].iter()), DEFAULT_COST);
        for cost in [4, 5, 12] {
            let dummy = dummy_hash(cost);
            let parts: bcrypt::HashParts = dummy.parse().unwrap();
            assert_eq!(parts.get_cost(), cost);
            // Ok(false), not an error: an error would mean no bcrypt ran.
            if cost < 12 {
                assert!(!bcrypt::verify("", &dummy).unwrap(), "{dummy}");
            }
        }
        let file = Htpasswd::parse(&format!("a:{}\nb:{}\n", h(5), h(5))).unwrap();
        assert!(file.dummy.starts_with("$2b$05$"), "{}", file.dummy);
    }

    #[test]
    fn check_keys_tell_every_part_apart() {
        let k = [7u8; 32];
        let key = |u, h, p| check_key(&k, u, h, p);
        assert_ne!(key("ab", "h", "c"), key("a", "h", "bc"));
        assert_ne!(key("a", "h", "b"), key("a", "h2", "b"));
        assert_ne!(key("a", "h", "b"), check_key(&[8u8; 32], "a", "h", "b"));
    }

    #[tokio::test]
    async fn an_unknown_user_costs_a_bcrypt_and_is_refused_whatever_the_password() {
        let moby = bcrypt::hash("gordon", 4).unwrap();
        let (auth, metrics) = authenticator(&format!("moby:{moby}\n"), &AuthConfig::default());
        assert!(matches!(
            auth.check(Some(&encoded("nobody:gordon")), CLIENT).await,
            Err(Error::Unauthorized { .. })
        ));
        assert_eq!(sample(&metrics, "regmirror_auth_bcrypt_total"), 1);
    }

    #[tokio::test]
    async fn concurrent_identical_credentials_share_one_bcrypt() {
        let moby = bcrypt::hash("gordon", 6).unwrap();
        let (auth, metrics) = authenticator(&format!("moby:{moby}\n"), &AuthConfig::default());
        let (good, bad) = (encoded("moby:gordon"), encoded("moby:wrong"));
        let checks = (0..40).map(|i| {
            let (auth, value) = (&auth, if i % 2 == 0 { &good } else { &bad });
            async move { auth.check(Some(value), CLIENT).await.is_ok() }
        });
        let oks = futures_util::future::join_all(checks).await;
        assert_eq!(oks.iter().filter(|ok| **ok).count(), 20);
        assert_eq!(sample(&metrics, "regmirror_auth_bcrypt_total"), 2);
    }

    #[tokio::test]
    async fn an_address_past_its_failures_is_refused_without_bcrypt_but_known_credentials_pass() {
        let moby = bcrypt::hash("gordon", 4).unwrap();
        let config = AuthConfig {
            max_failures: 3,
            ..AuthConfig::default()
        };
        let (auth, metrics) = authenticator(&format!("moby:{moby}\n"), &config);
        let good = encoded("moby:gordon");
        assert!(auth.check(Some(&good), CLIENT).await.is_ok());
        for i in 0..3 {
            let wrong = encoded(&format!("moby:wrong{i}"));
            assert!(matches!(
                auth.check(Some(&wrong), CLIENT).await,
                Err(Error::Unauthorized { .. })
            ));
        }
        let e = auth.check(Some(&encoded("moby:wrong3")), CLIENT).await;
        assert!(
            matches!(e, Err(Error::LoginBackoff { retry_after }) if retry_after <= 60),
            "{e:?}"
        );
        assert!(
            auth.check(Some(&good), CLIENT).await.is_ok(),
            "verified before"
        );
        let other: IpAddr = "192.0.2.7".parse().unwrap();
        assert!(auth
            .check(Some(&encoded("moby:wrong3")), other)
            .await
            .is_err());
        assert_eq!(sample(&metrics, "regmirror_auth_bcrypt_total"), 5);
        let backoff = "regmirror_auth_refusals_total{reason=\"backoff\"}";
        assert_eq!(sample(&metrics, backoff), 1);
    }
}
