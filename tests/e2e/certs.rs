//! TLS and user files made the way the operator docs make them (`openssl req ... -x509` with a
//! subjectAltName for 127.0.0.1 and localhost, `htpasswd -Bbn`), and HTTPS clients that trust
//! exactly the certificates they are given and record every certificate a server presents.
//! It knows nothing about the mirror.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

/// A certificate and its key, PEM files as an operator makes them.
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The certificate, DER.
    pub der: CertificateDer<'static>,
}

/// `openssl req -newkey rsa:4096 -nodes -sha256 -keyout DIR/NAME.key -x509 -days 365
/// -subj /CN=CN -addext subjectAltName=IP:127.0.0.1,DNS:localhost -out DIR/NAME.crt`.
/// Every call makes a new key and a new random serial.
pub fn generate(dir: &Path, name: &str, cn: &str) -> CertFiles {
    std::fs::create_dir_all(dir).expect("create cert dir");
    let key = dir.join(format!("{name}.key"));
    let cert = dir.join(format!("{name}.crt"));
    let out = std::process::Command::new("openssl")
        .args(["req", "-newkey", "rsa:4096", "-nodes", "-sha256", "-keyout"])
        .arg(&key)
        .args(["-x509", "-days", "365", "-subj", &format!("/CN={cn}")])
        .args([
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-out",
        ])
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let der = read_cert(&cert);
    CertFiles { cert, key, der }
}

/// The first certificate of a PEM file.
pub fn read_cert(path: &Path) -> CertificateDer<'static> {
    let pem = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    CertificateDer::pem_slice_iter(&pem)
        .next()
        .unwrap_or_else(|| panic!("no certificate in {}", path.display()))
        .unwrap_or_else(|e| panic!("bad PEM in {}: {e}", path.display()))
}

/// One line of an htpasswd file: `htpasswd -Bbn USER PASSWORD` (bcrypt).
pub fn htpasswd_line(user: &str, password: &str) -> String {
    let out = std::process::Command::new("htpasswd")
        .args(["-Bbn", user, password])
        .output()
        .expect("run htpasswd (apache2-utils)");
    assert!(
        out.status.success(),
        "htpasswd -Bbn failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("htpasswd output is text");
    format!("{}\n", text.trim())
}

/// Certificates a TLS client has been shown, end-entity first, one per handshake.
pub type Seen = Arc<Mutex<Vec<CertificateDer<'static>>>>;

/// Trusts a server whose end-entity certificate is exactly one of `accept` (and which proves
/// it holds its key), and records every certificate presented. The operator docs' certificate
/// is self-signed with `CA:TRUE`, which webpki refuses as a server certificate, while Go's
/// clients (dockerd, containerd, skopeo) accept it; pinning checks what the test needs.
#[derive(Debug)]
struct Pinned {
    accept: Vec<CertificateDer<'static>>,
    seen: Seen,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.seen
            .lock()
            .expect("seen certificates")
            .push(end_entity.clone().into_owned());
        if self
            .accept
            .iter()
            .any(|c| c.as_ref() == end_entity.as_ref())
        {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A rustls client configuration trusting `accept` only, offering h2 and http/1.1 by ALPN.
fn client_config(accept: &[CertificateDer<'static>], seen: &Seen) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Pinned {
        accept: accept.to_vec(),
        seen: Arc::clone(seen),
        provider: Arc::clone(&provider),
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config
}

/// An HTTPS client (HTTP/2 when the server offers it by ALPN, keep-alive) trusting `accept`
/// only, and the certificates it was shown, one per TLS handshake it made.
pub fn pinned_client(accept: &[CertificateDer<'static>]) -> (reqwest::Client, Seen) {
    let seen = Seen::default();
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(client_config(accept, &seen))
        .build()
        .expect("build HTTPS client");
    (client, seen)
}

/// Opens a new TLS connection to `127.0.0.1:port` and returns the certificate the server
/// presented, or the handshake's error (when it is none of `accept`).
pub async fn presented_certificate(
    port: u16,
    accept: &[CertificateDer<'static>],
) -> Result<CertificateDer<'static>, String> {
    let seen = Seen::default();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(accept, &seen)));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into());
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))?;
    let (_, conn) = tls.get_ref();
    conn.peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.clone().into_owned())
        .ok_or_else(|| "no peer certificate".to_owned())
}
