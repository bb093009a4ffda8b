//! The server's certificates and its HTTPS listener.
//!
//! At start the server makes a fresh CA and a serving certificate signed by it (ECDSA P-256,
//! `rcgen`), with the names a client inside or outside the cluster may dial. Clients trust
//! the CA through the kubeconfig's `certificate-authority-data`; nothing is written to disk.
//!
//! ```text
//!  generate(): CA key ──self-sign──► CA cert ──► ca_pem (kubeconfigs, ca_pem())
//!                 └────sign──► serving cert (SANs below) ──► rustls ServerConfig (ring)
//!
//!  serve(): TcpListener ──accept──► TLS handshake (ALPN h2, http/1.1)
//!                                      └─► hyper-util auto (HTTP/1.1 or h2) ──► axum Router
//! ```

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

/// Names and addresses of the serving certificate: loopback, the `kubernetes` Service's
/// ClusterIP and its DNS names, as a kube-apiserver certificate carries them.
pub const SERVING_NAMES: &[&str] = &[
    "127.0.0.1",
    "::1",
    "localhost",
    "10.96.0.1",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
];

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Failures of making the certificates.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A key pair could not be generated.
    #[error("failed to generate the {what} key")]
    GenerateKey {
        /// Which key.
        what: &'static str,
        /// Underlying error.
        #[source]
        source: rcgen::Error,
    },
    /// A certificate could not be built or signed.
    #[error("failed to sign the {what} certificate")]
    SignCertificate {
        /// Which certificate.
        what: &'static str,
        /// Underlying error.
        #[source]
        source: rcgen::Error,
    },
    /// rustls refused the certificate or key.
    #[error("failed to build the TLS server configuration")]
    BuildServerConfig(#[source] rustls::Error),
}

/// The CA and the serving configuration made at start.
pub struct Certificates {
    /// PEM of the CA certificate clients trust.
    pub ca_pem: String,
    /// PEM of the serving certificate (for inspection in tests).
    pub serving_pem: String,
    /// rustls configuration of the listener (ring provider, ALPN `h2` and `http/1.1`).
    pub server_config: Arc<rustls::ServerConfig>,
}

/// Makes a CA and a serving certificate for [`SERVING_NAMES`].
pub fn generate() -> Result<Certificates, TlsError> {
    let ca_key =
        KeyPair::generate().map_err(|source| TlsError::GenerateKey { what: "CA", source })?;
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "meshlet-test-apiserver-ca");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(|source| TlsError::SignCertificate { what: "CA", source })?;
    let issuer = Issuer::new(ca_params, ca_key);

    let key = KeyPair::generate().map_err(|source| TlsError::GenerateKey {
        what: "serving",
        source,
    })?;
    let names: Vec<String> = SERVING_NAMES.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(names).map_err(|source| TlsError::SignCertificate {
        what: "serving",
        source,
    })?;
    params
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|source| TlsError::SignCertificate {
            what: "serving",
            source,
        })?;

    let chain = vec![
        cert.der().clone(),
        CertificateDer::from(ca_cert.der().to_vec()),
    ];
    let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let mut config = rustls::ServerConfig::builder_with_provider(ring_provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::BuildServerConfig)?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(TlsError::BuildServerConfig)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Certificates {
        ca_pem: ca_cert.pem(),
        serving_pem: cert.pem(),
        server_config: Arc::new(config),
    })
}

/// rustls' *ring* provider, the one kube's `ring` feature selects on the client side.
#[expect(
    deprecated,
    reason = "rustls 0.23.48 deprecates the ring provider only for lacking post-quantum key \
              exchange; kubectl and kube-rs fall back to X25519, and ring keeps aws-lc out of the build"
)]
fn ring_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Serves `app` over HTTPS on `listener` until `shutdown` fires; then stops accepting and
/// closes every open connection (watches included), as a stopped server would.
pub async fn serve(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    app: axum::Router,
    mut shutdown: oneshot::Receiver<()>,
) {
    let acceptor = TlsAcceptor::from(config);
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let tcp = match accepted {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "failed to accept a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let app = app.clone();
                connections.spawn(async move {
                    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            // A client that does not trust our CA ends up here.
                            tracing::debug!(error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!("TLS handshake timed out");
                            return;
                        }
                    };
                    let service = TowerToHyperService::new(app);
                    if let Err(e) = auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(tls), service)
                        .await
                    {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
        }
    }
}
