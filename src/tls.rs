//! TLS for the listener: a rustls server configuration from PEM files (RSA
//! or ECDSA key, certificate chain), HTTP/2 and HTTP/1.1 offered by ALPN, and
//! reloaded when the files change or on SIGHUP. Connections already open keep
//! the configuration they started with. The certificate's expiry is read at
//! each load, logged when it is near or past, and reported to the metrics.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use x509_cert::der::Decode as _;

use crate::metrics::Metrics;

/// How often the files are checked for changes.
const WATCH_EVERY: Duration = Duration::from_secs(2);

/// A certificate expiring within this is warned about at each load: time
/// enough to renew it by hand, and well before an ACME client's usual 30 days
/// have run out if its renewal failed.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 86400);

/// A certificate or key that cannot be used; names the file and the problem.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct TlsError {
    pub path: String,
    pub problem: String,
}

fn err(path: &Path, problem: impl std::fmt::Display) -> TlsError {
    TlsError {
        path: path.display().to_string(),
        problem: problem.to_string(),
    }
}

/// A loaded configuration and the end-entity certificate's `notAfter`
/// (`None` when it cannot be read; rustls accepted the file all the same).
pub struct Loaded {
    pub config: Arc<ServerConfig>,
    pub not_after: Option<SystemTime>,
}

/// The `notAfter` of a DER certificate; `None` when it does not parse (it is
/// served all the same: rustls does not parse it either, clients do).
fn not_after(der: &[u8]) -> Option<SystemTime> {
    let cert = x509_cert::Certificate::from_der(der).ok()?;
    let after = cert
        .tbs_certificate()
        .validity()
        .not_after
        .to_unix_duration();
    SystemTime::UNIX_EPOCH.checked_add(after)
}

/// Logs a certificate that has expired or expires within [`EXPIRY_WARNING`]
/// of `now`; clients refuse an expired one, so it needs renewing now.
fn warn_if_expiring(cert: &Path, not_after: Option<SystemTime>, now: SystemTime) {
    let Some(at) = not_after else {
        tracing::warn!(cert = %cert.display(), "cannot read the TLS certificate's expiry date");
        return;
    };
    let when = humantime::format_rfc3339_seconds(at);
    match at.duration_since(now) {
        Err(_) => tracing::warn!(
            cert = %cert.display(), not_after = %when,
            "the TLS certificate has expired; clients will refuse it"
        ),
        Ok(left) if left < EXPIRY_WARNING => tracing::warn!(
            cert = %cert.display(), not_after = %when, days_left = left.as_secs() / 86400,
            "the TLS certificate expires soon"
        ),
        Ok(_) => {}
    }
}

/// Builds the server configuration from a PEM certificate chain and key.
pub fn load(cert: &Path, key: &Path) -> Result<Loaded, TlsError> {
    let cert_pem = std::fs::read(cert).map_err(|e| err(cert, format!("cannot read: {e}")))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(cert, format!("not a PEM certificate file: {e}")))?;
    if chain.is_empty() {
        return Err(err(
            cert,
            "no certificate (expected -----BEGIN CERTIFICATE-----)",
        ));
    }
    let key_pem = std::fs::read(key).map_err(|e| err(key, format!("cannot read: {e}")))?;
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        err(
            key,
            format!("no usable private key (PKCS#8, PKCS#1 RSA or SEC1 EC PEM): {e}"),
        )
    })?;
    // The first certificate is the end-entity one (rustls serves it first).
    let expiry = not_after(&chain[0]);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err(cert, e))?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| err(key, format!("does not fit the certificate: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    warn_if_expiring(cert, expiry, SystemTime::now());
    Ok(Loaded {
        config: Arc::new(config),
        not_after: expiry,
    })
}

/// The current TLS configuration, swapped when the files change.
pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<ServerConfig>>,
    not_after: Mutex<Option<SystemTime>>,
    stamp: Mutex<Stamp>,
    /// Where each load's expiry goes, once the server has its metrics.
    metrics: OnceLock<Arc<Metrics>>,
}

type Stamp = (Option<SystemTime>, Option<SystemTime>);

fn stamp(cert: &Path, key: &Path) -> Stamp {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    (m(cert), m(key))
}

impl Tls {
    /// Loads the files; an error here stops the mirror at startup.
    pub fn new(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let loaded = load(cert, key)?;
        Ok(Self {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: RwLock::new(loaded.config),
            not_after: Mutex::new(loaded.not_after),
            stamp: Mutex::new(stamp(cert, key)),
            metrics: OnceLock::new(),
        })
    }

    /// Reports the certificate's expiry to `metrics`, now and at each reload.
    pub fn report_to(&self, metrics: Arc<Metrics>) {
        let metrics = self.metrics.get_or_init(|| metrics);
        let not_after = *self.not_after.lock().unwrap_or_else(|p| p.into_inner());
        metrics.tls_certificate(&self.cert.display().to_string(), not_after);
    }

    /// An acceptor with the configuration in force now.
    pub fn acceptor(&self) -> TlsAcceptor {
        let config = self
            .current
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone());
        TlsAcceptor::from(config)
    }

    /// Loads the files again; on error the old configuration stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let loaded = load(&self.cert, &self.key)?;
        match self.current.write() {
            Ok(mut c) => *c = loaded.config,
            Err(p) => *p.into_inner() = loaded.config,
        }
        *self.not_after.lock().unwrap_or_else(|p| p.into_inner()) = loaded.not_after;
        if let Some(m) = self.metrics.get() {
            m.tls_certificate(&self.cert.display().to_string(), loaded.not_after);
        }
        Ok(())
    }

    fn changed(&self) -> bool {
        let now = stamp(&self.cert, &self.key);
        let mut last = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
        if *last == now {
            return false;
        }
        *last = now;
        true
    }

    pub fn reload_logged(&self, why: &str) {
        match self.reload() {
            Ok(()) => tracing::info!(cert = %self.cert.display(), why, "TLS certificate reloaded"),
            Err(e) => {
                tracing::error!(error = %e, why, "TLS reload failed; keeping the previous certificate")
            }
        }
    }

    /// Reloads when the files change, until the process ends (SIGHUP is
    /// handled by the server, which calls [`Tls::reload_logged`]).
    pub async fn watch(self: Arc<Self>) {
        loop {
            tokio::time::sleep(WATCH_EVERY).await;
            if self.changed() {
                self.reload_logged("files changed");
            }
        }
    }
}
