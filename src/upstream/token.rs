//! Bearer tokens from an upstream's token realm, cached per
//! (realm, service, scope) until shortly before they expire. Concurrent
//! requests for the same key share one fetch (moka's `try_get_with`).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::config::Secret;
use crate::error::Error;

/// What a token is good for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenKey {
    pub realm: String,
    pub service: Option<String>,
    pub scope: Option<String>,
    /// Whether the token is fetched with the upstream credentials: an
    /// anonymous token and a credentialed one for the same scope are
    /// different tokens (`upstream.credentials_for`).
    pub with_credentials: bool,
}

/// A bearer token and how long the cache may keep it.
#[derive(Debug, Clone)]
pub struct Token {
    pub value: Secret,
    pub keep_for: Duration,
}

/// The token endpoint's answer (`token`, or `access_token` from OAuth2 realms).
#[derive(Deserialize)]
pub struct TokenResponse {
    token: Option<Secret>,
    access_token: Option<Secret>,
    expires_in: Option<u64>,
}

/// Docker's token spec: a token without `expires_in` lasts 60 seconds.
const DEFAULT_LIFETIME: u64 = 60;

impl TokenResponse {
    /// The token to use and how long to keep it: its lifetime less a margin
    /// (a fifth, at most 30 s) so it is never sent just as it expires.
    pub fn into_token(self) -> Option<Token> {
        let value = self
            .token
            .filter(|t| !t.expose().is_empty())
            .or(self.access_token)?;
        let lifetime = self.expires_in.unwrap_or(DEFAULT_LIFETIME);
        let margin = (lifetime / 5).min(30);
        Some(Token {
            value,
            keep_for: Duration::from_secs(lifetime - margin),
        })
    }
}

struct KeepFor;

impl moka::Expiry<TokenKey, Arc<Token>> for KeepFor {
    fn expire_after_create(
        &self,
        _key: &TokenKey,
        value: &Arc<Token>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.keep_for)
    }
}

/// The cache of tokens for one upstream.
#[derive(Clone)]
pub struct TokenCache {
    cache: moka::future::Cache<TokenKey, Arc<Token>>,
}

impl Default for TokenCache {
    fn default() -> Self {
        Self {
            cache: moka::future::Cache::builder()
                .max_capacity(10_000)
                .expire_after(KeepFor)
                .build(),
        }
    }
}

impl TokenCache {
    /// The cached token for `key`, or the result of one shared `fetch`.
    pub async fn get_or_fetch(
        &self,
        key: TokenKey,
        fetch: impl Future<Output = Result<Token, Error>>,
    ) -> Result<Arc<Token>, Error> {
        self.cache
            .try_get_with(key, async { fetch.await.map(Arc::new) })
            .await
            .map_err(|e: Arc<Error>| (*e).clone())
    }

    /// Forgets a token the upstream rejected.
    pub async fn invalidate(&self, key: &TokenKey) {
        self.cache.invalidate(key).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(json: &str) -> Option<Token> {
        serde_json::from_str::<TokenResponse>(json)
            .unwrap()
            .into_token()
    }

    #[test]
    fn lifetime_and_fallbacks() {
        let t = response(r#"{"token":"a","expires_in":300}"#).unwrap();
        assert_eq!(t.value.expose(), "a");
        assert_eq!(t.keep_for, Duration::from_secs(270));
        let t = response(r#"{"access_token":"b"}"#).unwrap();
        assert_eq!(t.value.expose(), "b");
        assert_eq!(t.keep_for, Duration::from_secs(48));
        assert!(response(r#"{"expires_in":300}"#).is_none());
        assert!(!format!("{t:?}").contains('b'));
    }

    #[tokio::test]
    async fn concurrent_requests_share_one_fetch() {
        let cache = TokenCache::default();
        let fetches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let key = TokenKey {
            realm: "r".into(),
            service: None,
            scope: None,
            with_credentials: false,
        };
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (cache, fetches, key) = (cache.clone(), fetches.clone(), key.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_fetch(key, async {
                        fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Ok(Token {
                            value: Secret::new("t"),
                            keep_for: Duration::from_secs(60),
                        })
                    })
                    .await
                    .unwrap()
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().value.expose(), "t");
        }
        assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 1);
        cache.invalidate(&key).await;
        cache
            .get_or_fetch(key, async {
                fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok(Token {
                    value: Secret::new("u"),
                    keep_for: Duration::from_secs(60),
                })
            })
            .await
            .unwrap();
        assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 2);
    }
}
