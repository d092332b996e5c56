//! TLS for the ext_proc port: a self-signed certificate by default (gateways connect without
//! verifying it, as with the reference EPP), or `tls.crt`/`tls.key` from `--cert-path`.

use std::path::Path;

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

#[cfg(test)]
mod tests {
    #[test]
    fn generates_pem() {
        let id = super::self_signed().unwrap();
        assert!(id.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(id.key_pem.contains("PRIVATE KEY"));
    }
}
