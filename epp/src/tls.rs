//! TLS for the ext_proc port: a self-signed certificate by default (gateways connect without
//! verifying it, as with the reference EPP), or `tls.crt`/`tls.key` from `--cert-path`.
//!
//! The server terminates TLS itself (rustls, ring) rather than through tonic, so that the
//! certificate can change while it serves: every handshake asks [`ServerCertificate`] for the
//! current one, and with `--enable-cert-reload` [`watch_certificates`] (a task under the
//! supervisor, started in `server.rs`) replaces it when the files change, as the reference's
//! cert watcher does. New handshakes get the new certificate;
//! open connections keep the one they were made with. A pair that does not load (unreadable,
//! malformed, key not matching the certificate) is logged and the old certificate stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often `--cert-path` is read for changes with `--enable-cert-reload`. Reading the files
/// catches every way they change (written in place, renamed over, or the `..data` symlink
/// swap of a Kubernetes Secret volume) without a platform file-notification API; the cost is
/// two small reads a second, off the request path. The kubelet itself refreshes mounted
/// Secrets only every minute or so.
pub const CERT_RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// A certificate and key in PEM.
#[derive(Debug, Clone)]
pub struct TlsIdentity {
    /// Certificate chain (PEM).
    pub cert_pem: String,
    /// Private key (PEM).
    pub key_pem: String,
}

/// TLS setup failures.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Generating the self-signed certificate failed.
    #[error("generating a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// Reading the files failed.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The certificate chain is not PEM, or holds no certificate.
    #[error("the certificate chain: {0}")]
    Certificate(#[source] rustls::pki_types::pem::Error),
    /// The private key is not PEM, or holds no key.
    #[error("the private key: {0}")]
    Key(#[source] rustls::pki_types::pem::Error),
    /// rustls refused the key, or the key does not belong to the certificate.
    #[error("the certificate and key: {0}")]
    Pair(#[source] rustls::Error),
    /// rustls refused the server configuration.
    #[error("the TLS server configuration: {0}")]
    Config(#[source] rustls::Error),
    /// The client CA bundle holds no usable certificate.
    #[error("the client CA bundle {path}: {reason}")]
    ClientCa {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// SHA-256 of a certificate's DER: how logs and tests tell certificates apart.
pub type Fingerprint = [u8; 32];

/// The fingerprint of a DER certificate.
pub fn fingerprint(cert_der: &[u8]) -> Fingerprint {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, cert_der).as_ref());
    out
}

fn hex(f: &Fingerprint) -> String {
    f.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the served certificate is, for tests and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertificateStatus {
    /// Fingerprint of the end-entity certificate new handshakes get.
    pub fingerprint: Fingerprint,
    /// Changed files that were refused (the old certificate stayed).
    pub rejected: u64,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsIdentity {
    /// Parses and checks the pair: the chain must hold a certificate, the key must load, and
    /// it must be the certificate's key.
    pub fn certified_key(&self) -> Result<CertifiedKey, TlsError> {
        let chain = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(TlsError::Certificate)?;
        if chain.is_empty() {
            return Err(TlsError::Certificate(
                rustls::pki_types::pem::Error::NoItemsFound,
            ));
        }
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(TlsError::Key)?;
        let key = CertifiedKey::from_der(chain, key, &provider()).map_err(TlsError::Pair)?;
        // `from_der` lets a key whose public half it cannot compute through; insist.
        key.keys_match().map_err(TlsError::Pair)?;
        Ok(key)
    }
}

/// The certificate new handshakes get. Reading it is one atomic load per handshake.
#[derive(Debug)]
pub struct ServerCertificate {
    current: ArcSwap<CertifiedKey>,
    status: watch::Sender<CertificateStatus>,
}

impl ServerCertificate {
    /// Starts with `key`.
    pub fn new(key: CertifiedKey) -> Arc<Self> {
        let status = CertificateStatus {
            fingerprint: key_fingerprint(&key),
            rejected: 0,
        };
        Arc::new(Self {
            current: ArcSwap::from_pointee(key),
            status: watch::Sender::new(status),
        })
    }

    /// Follows the served certificate: changes on every reload and every refused one.
    pub fn status(&self) -> watch::Receiver<CertificateStatus> {
        self.status.subscribe()
    }

    /// New handshakes get `key` from now on.
    fn replace(&self, key: CertifiedKey) {
        let fingerprint = key_fingerprint(&key);
        self.current.store(Arc::new(key));
        self.status.send_modify(|s| s.fingerprint = fingerprint);
    }

    fn rejected(&self) {
        self.status.send_modify(|s| s.rejected += 1);
    }
}

fn key_fingerprint(key: &CertifiedKey) -> Fingerprint {
    key.cert.first().map(|c| fingerprint(c)).unwrap_or_default()
}

impl ResolvesServerCert for ServerCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Reloading `--cert-path` (`--enable-cert-reload`).
#[derive(Debug, Clone)]
pub struct CertReload {
    /// The directory holding `tls.crt` and `tls.key`.
    pub dir: PathBuf,
    /// How often the files are read ([`CERT_RELOAD_INTERVAL`]; shorter in tests).
    pub interval: Duration,
    /// What was loaded at start-up: files that differ from it are a change.
    loaded: TlsIdentity,
}

/// TLS serving of the ext_proc port.
#[derive(Debug)]
pub struct ServerTls {
    certificate: Arc<ServerCertificate>,
    reload: Option<CertReload>,
    /// Verifies client certificates (`--client-ca-path`); `None` asks for none.
    clients: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
}

impl ServerTls {
    /// A fresh self-signed certificate (never reloaded: there are no files).
    pub fn self_signed() -> Result<Self, TlsError> {
        Ok(Self {
            certificate: ServerCertificate::new(self_signed()?.certified_key()?),
            reload: None,
            clients: None,
        })
    }

    /// `tls.crt` and `tls.key` from `dir`, read now (a bad pair fails start-up); re-read every
    /// `reload` when given.
    pub fn from_dir(dir: &Path, reload: Option<Duration>) -> Result<Self, TlsError> {
        let loaded = from_dir(dir)?;
        let key = loaded.certified_key()?;
        Ok(Self {
            certificate: ServerCertificate::new(key),
            reload: reload.map(|interval| CertReload {
                dir: dir.to_owned(),
                interval,
                loaded,
            }),
            clients: None,
        })
    }

    /// [`ServerTls::require_client_certificates`] when a bundle is given (`--client-ca-path`),
    /// else no client certificates.
    pub fn with_client_ca(self, path: Option<&Path>) -> Result<Self, TlsError> {
        match path {
            Some(path) => self.require_client_certificates(path),
            None => Ok(self),
        }
    }

    /// Requires every client to present a certificate that chains to one of the CAs in the
    /// PEM bundle at `path` (`--client-ca-path`): then only the gateway, holding such a
    /// certificate, can open ext_proc streams. Read once, at start-up.
    pub fn require_client_certificates(mut self, path: &Path) -> Result<Self, TlsError> {
        let invalid = |reason: String| TlsError::ClientCa {
            path: path.display().to_string(),
            reason,
        };
        let pem = std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| invalid(e.to_string()))?;
            roots.add(cert).map_err(|e| invalid(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(invalid("no certificate in it".into()));
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .map_err(|e| invalid(e.to_string()))?;
        self.clients = Some(verifier);
        Ok(self)
    }

    /// The served certificate.
    pub fn certificate(&self) -> &Arc<ServerCertificate> {
        &self.certificate
    }

    /// The reload settings, if reloading.
    pub fn reload(&self) -> Option<&CertReload> {
        self.reload.as_ref()
    }

    /// The rustls configuration: the current certificate at each handshake, HTTP/2 only (gRPC),
    /// client certificates verified when [`ServerTls::require_client_certificates`] was called.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?;
        let builder = match &self.clients {
            Some(verifier) => builder.with_client_cert_verifier(verifier.clone()),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(self.certificate.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// A fresh self-signed certificate for `localhost` and the loopback addresses.
pub fn self_signed() -> Result<TlsIdentity, TlsError> {
    let names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
        "switchyard-epp".to_owned(),
    ];
    let ck = rcgen::generate_simple_self_signed(names)?;
    Ok(TlsIdentity {
        cert_pem: ck.cert.pem(),
        key_pem: ck.signing_key.serialize_pem(),
    })
}

/// Loads `tls.crt` and `tls.key` from a directory.
pub fn from_dir(dir: &Path) -> Result<TlsIdentity, TlsError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|source| TlsError::Read {
            path: path.display().to_string(),
            source,
        })
    };
    Ok(TlsIdentity {
        cert_pem: read("tls.crt")?,
        key_pem: read("tls.key")?,
    })
}

/// Re-reads `reload.dir` every `reload.interval` until `shutdown`; a changed pair that loads
/// replaces the served certificate, one that does not is logged (once per change) and the old
/// certificate stays. A pair written one file at a time may be seen half-written: that pair is
/// refused, and the next read, seeing the files change again, loads the whole new pair.
pub async fn watch_certificates(
    certificate: Arc<ServerCertificate>,
    reload: CertReload,
    shutdown: CancellationToken,
) {
    let mut last = reload.loaded.clone();
    let mut tick = tokio::time::interval(reload.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut unreadable = false;
    tracing::info!(dir = %reload.dir.display(), interval = ?reload.interval, "watching the ext_proc certificate for changes");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let dir = reload.dir.clone();
        // Blocking reads off the runtime's workers; a slow volume must not stall serving.
        let read = match tokio::task::spawn_blocking(move || from_dir(&dir)).await {
            Ok(read) => read,
            Err(e) => {
                tracing::error!(error = %e, "reading the ext_proc certificate failed");
                continue;
            }
        };
        let identity = match read {
            Ok(identity) => {
                unreadable = false;
                identity
            }
            Err(error) => {
                // Mid-swap a file may be missing for a moment; say so once, not every second.
                if !unreadable {
                    tracing::error!(%error, "cannot read the ext_proc certificate; keeping the current one");
                    certificate.rejected();
                    unreadable = true;
                }
                continue;
            }
        };
        if last.cert_pem == identity.cert_pem && last.key_pem == identity.key_pem {
            continue;
        }
        match identity.certified_key() {
            Ok(key) => {
                let fingerprint = key_fingerprint(&key);
                certificate.replace(key);
                tracing::info!(sha256 = %hex(&fingerprint), "reloaded the ext_proc certificate");
            }
            Err(error) => {
                tracing::error!(%error, "refused the changed ext_proc certificate; keeping the current one");
                certificate.rejected();
            }
        }
        last = identity;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_pem() {
        let id = self_signed().unwrap();
        assert!(id.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(id.key_pem.contains("PRIVATE KEY"));
        id.certified_key().unwrap();
    }

    #[test]
    fn a_pair_must_match_and_parse() {
        let (a, b) = (self_signed().unwrap(), self_signed().unwrap());
        let mixed = TlsIdentity {
            cert_pem: a.cert_pem.clone(),
            key_pem: b.key_pem.clone(),
        };
        assert!(matches!(mixed.certified_key(), Err(TlsError::Pair(_))));
        let no_cert = TlsIdentity {
            cert_pem: "not pem".into(),
            key_pem: a.key_pem.clone(),
        };
        assert!(matches!(
            no_cert.certified_key(),
            Err(TlsError::Certificate(_))
        ));
        let no_key = TlsIdentity {
            cert_pem: a.cert_pem.clone(),
            key_pem: String::new(),
        };
        assert!(matches!(no_key.certified_key(), Err(TlsError::Key(_))));
    }

    #[test]
    fn the_resolver_serves_the_replacement() {
        let (a, b) = (self_signed().unwrap(), self_signed().unwrap());
        let cert = ServerCertificate::new(a.certified_key().unwrap());
        let status = cert.status();
        let b = b.certified_key().unwrap();
        let b_print = key_fingerprint(&b);
        assert_ne!(status.borrow().fingerprint, b_print);
        cert.replace(b);
        assert_eq!(status.borrow().fingerprint, b_print);
        assert_eq!(key_fingerprint(&cert.current.load_full()), b_print);
    }
}
