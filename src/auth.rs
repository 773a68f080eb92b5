//! Client authentication: HTTP Basic against an htpasswd file of bcrypt
//! users (`htpasswd -B`). bcrypt runs off the async workers, and a verified
//! (user, password) is remembered for a few minutes so a pull of 30 layers
//! costs one bcrypt. The file is reloaded when it changes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use sha2::{Digest as _, Sha256};

use crate::error::Error;

/// How long a verified (user, password) is trusted without bcrypt.
const REMEMBER: Duration = Duration::from_secs(300);
/// How often the file is checked for changes.
const WATCH_EVERY: Duration = Duration::from_secs(2);

/// Users and their bcrypt hashes.
#[derive(Debug, Default, Clone)]
pub struct Htpasswd {
    users: HashMap<String, String>,
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
        Ok(Self { users })
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// The key of a remembered verification: user, the hash it was checked
/// against (a changed file invalidates it), and a digest of the password.
type Verified = (String, String, [u8; 32]);

/// Checks `Authorization: Basic` headers.
pub struct Authenticator {
    realm: String,
    path: PathBuf,
    users: RwLock<Arc<Htpasswd>>,
    modified: Mutex<Option<SystemTime>>,
    verified: moka::future::Cache<Verified, ()>,
}

impl Authenticator {
    pub fn new(path: &Path, realm: &str) -> Result<Self, String> {
        let users = Htpasswd::load(path)?;
        Ok(Self {
            realm: realm.to_owned(),
            path: path.to_path_buf(),
            users: RwLock::new(Arc::new(users)),
            modified: Mutex::new(modified(path)),
            verified: moka::future::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(REMEMBER)
                .build(),
        })
    }

    fn unauthorized(&self, detail: &str) -> Error {
        Error::Unauthorized {
            realm: self.realm.clone(),
            detail: detail.to_owned(),
        }
    }

    /// `Ok` when the header carries the credentials of a user in the file.
    pub async fn check(&self, authorization: Option<&str>) -> Result<(), Error> {
        let Some(value) = authorization else {
            return Err(self.unauthorized("authentication required"));
        };
        let (user, password) =
            parse_basic(value).ok_or_else(|| self.unauthorized("malformed Basic credentials"))?;
        let hash = {
            let users = self.users.read().unwrap_or_else(|p| p.into_inner());
            users.users.get(&user).cloned()
        };
        let Some(hash) = hash else {
            return Err(self.unauthorized("invalid username or password"));
        };
        let key: Verified = (
            user,
            hash.clone(),
            Sha256::digest(password.as_bytes()).into(),
        );
        if self.verified.contains_key(&key) {
            return Ok(());
        }
        let ok =
            tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
                .await
                .unwrap_or(false);
        if !ok {
            return Err(self.unauthorized("invalid username or password"));
        }
        self.verified.insert(key, ()).await;
        Ok(())
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
                Err(e) => {
                    tracing::error!(error = %e, "htpasswd reload failed; keeping the previous users")
                }
            }
        }
    }
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

    #[tokio::test]
    async fn verifies_once_then_remembers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        let hash = bcrypt::hash("gordon", 4).unwrap();
        std::fs::write(&path, format!("moby:{hash}\n")).unwrap();
        let auth = Authenticator::new(&path, "regmirror").unwrap();
        let good = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("moby:gordon")
        );
        let bad = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("moby:wrong")
        );
        assert!(auth.check(Some(&good)).await.is_ok());
        auth.verified.run_pending_tasks().await;
        assert_eq!(
            auth.verified.entry_count(),
            1,
            "remembered after one bcrypt"
        );
        assert!(auth.check(Some(&good)).await.is_ok());
        assert!(matches!(
            auth.check(Some(&bad)).await,
            Err(Error::Unauthorized { .. })
        ));
        assert!(matches!(
            auth.check(None).await,
            Err(Error::Unauthorized { .. })
        ));
    }
}
