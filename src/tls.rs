//! The server's TLS certificate and key (`[tls]`): loaded from PEM files at start, and again
//! on SIGHUP. Each new connection takes the pair current when it is accepted; connections
//! already open keep the one they started with. A pair that does not load is refused and the
//! previous one stays.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

/// Why a certificate or key could not be used. The message names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {file}: {source}")]
    Read { file: PathBuf, source: std::io::Error },
    #[error("{file} holds no PEM certificate")]
    NoCertificate { file: PathBuf },
    #[error("{file} is not a PEM certificate chain: {reason}")]
    BadCertificate { file: PathBuf, reason: String },
    #[error("{file} holds no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {reason}")]
    BadKey { file: PathBuf, reason: String },
    #[error("the key in {key_file} does not fit the certificate in {cert_file}: {reason}")]
    Mismatch { cert_file: PathBuf, key_file: PathBuf, reason: String },
}

/// Builds a server configuration from a PEM certificate chain and a PEM private key.
pub fn load(cert_file: &Path, key_file: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let read = |file: &Path| std::fs::read(file).map_err(|source| TlsError::Read { file: file.into(), source });
    let cert_pem = read(cert_file)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| TlsError::BadCertificate { file: cert_file.into(), reason: err.to_string() })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate { file: cert_file.into() });
    }
    let key = PrivateKeyDer::from_pem_slice(&read(key_file)?)
        .map_err(|err| TlsError::BadKey { file: key_file.into(), reason: err.to_string() })?;
    // The provider is named rather than taken from a process default, so the build's feature
    // set can never make this ambiguous.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default protocol versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|err| match err {
            rustls::Error::InvalidCertificate(_) => {
                TlsError::BadCertificate { file: cert_file.into(), reason: err.to_string() }
            }
            rustls::Error::InconsistentKeys(_) => {
                TlsError::Mismatch { cert_file: cert_file.into(), key_file: key_file.into(), reason: err.to_string() }
            }
            // What remains is a key the provider cannot use.
            _ => TlsError::BadKey { file: key_file.into(), reason: err.to_string() },
        })?;
    Ok(Arc::new(config))
}

/// The pair new connections use, replaceable while the server runs.
pub struct ServerCertificate {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<Arc<ServerConfig>>,
    reloads: AtomicU64,
    reload_failures: AtomicU64,
}

impl ServerCertificate {
    /// Loads the pair named by the config.
    pub fn load(config: &crate::config::Tls) -> Result<Self, TlsError> {
        let current = load(&config.cert_file, &config.key_file)?;
        Ok(Self {
            cert_file: config.cert_file.clone(),
            key_file: config.key_file.clone(),
            current: RwLock::new(current),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
        })
    }

    /// The configuration for a connection accepted now.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads the files again, without using them yet (see `install`). A pair that does not
    /// load is counted as a failed reload and its error returned.
    pub fn load_again(&self) -> Result<Arc<ServerConfig>, TlsError> {
        load(&self.cert_file, &self.key_file).inspect_err(|_| {
            self.reload_failures.fetch_add(1, Ordering::Relaxed);
        })
    }

    /// Connections accepted from now on use `config` (from `load_again`).
    pub fn install(&self, config: Arc<ServerConfig>) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
        self.reloads.fetch_add(1, Ordering::Relaxed);
    }

    pub fn cert_file(&self) -> &Path {
        &self.cert_file
    }

    pub fn key_file(&self) -> &Path {
        &self.key_file
    }

    /// Successful reloads since start.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    /// Refused reloads since start.
    pub fn reload_failures(&self) -> u64 {
        self.reload_failures.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for `localhost` and its key, as PEM.
    fn pair() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap().self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn files(cert: &str, key: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert_file, cert).unwrap();
        std::fs::write(&key_file, key).unwrap();
        (dir, cert_file, key_file)
    }

    #[test]
    fn a_matching_pair_loads() {
        let (cert, key) = pair();
        let (_dir, cert_file, key_file) = files(&cert, &key);
        load(&cert_file, &key_file).unwrap();
    }

    #[test]
    fn each_kind_of_bad_file_is_named() {
        let (cert, key) = pair();
        let (_other_cert, other_key) = pair();
        let (dir, cert_file, key_file) = files(&cert, &other_key);
        let err = load(&cert_file, &key_file).unwrap_err();
        assert!(matches!(err, TlsError::Mismatch { .. }), "{err}");

        let missing = dir.path().join("missing.pem");
        let err = load(&missing, &key_file).unwrap_err();
        assert!(matches!(err, TlsError::Read { .. }) && err.to_string().contains("missing.pem"), "{err}");

        std::fs::write(&cert_file, "no PEM here\n").unwrap();
        let err = load(&cert_file, &key_file).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");

        let garbled = "-----BEGIN CERTIFICATE-----\nnotbase64atall\n-----END CERTIFICATE-----\n";
        std::fs::write(&cert_file, garbled).unwrap();
        std::fs::write(&key_file, &key).unwrap();
        let err = load(&cert_file, &key_file).unwrap_err();
        assert!(matches!(err, TlsError::BadCertificate { .. }) && err.to_string().contains("cert.pem"), "{err}");

        std::fs::write(&cert_file, &cert).unwrap();
        std::fs::write(&key_file, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").unwrap();
        let err = load(&cert_file, &key_file).unwrap_err();
        assert!(matches!(err, TlsError::BadKey { .. }) && err.to_string().contains("key.pem"), "{err}");
    }
}
