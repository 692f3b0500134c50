//! TLS for the data plane: a rustls server configuration whose certificate can be replaced
//! while the gateway runs.
//!
//! The certificate and key are read from files (configured, or provisioned by `firmware`).
//! They are reloaded when the files change (checked every `reload_interval`) or on SIGHUP;
//! new handshakes use the new certificate, established connections keep theirs. A reload that
//! fails (a half-written file, a key that does not match) keeps the old certificate and logs
//! why. Only TLS 1.2 and 1.3 are offered, with rustls's default (AEAD, forward-secret) suites.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsFiles;

/// Why a certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{cert} and {key}: the private key does not match the certificate")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("building the TLS configuration: {0}")]
    Config(String),
}

/// What identifies a file's content cheaply: size, modification time and inode.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    length: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        length: metadata.len(),
        modified: metadata.modified().ok(),
        inode: metadata.ino(),
    })
}

/// Serves the current certificate to every handshake; swapped atomically on reload.
#[derive(Debug)]
pub struct ReloadingCertResolver {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    stamps: Mutex<(Option<FileStamp>, Option<FileStamp>)>,
}

impl ReloadingCertResolver {
    /// Loads the certificate chain and key now; fails if they cannot be used.
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let stamps = (stamp(&files.cert), stamp(&files.key));
        let key = load_certified_key(&files, &provider)?;
        Ok(Arc::new(ReloadingCertResolver {
            files,
            provider,
            current: RwLock::new(Arc::new(key)),
            stamps: Mutex::new(stamps),
        }))
    }

    /// Reloads if either file changed since the last load. Returns whether it reloaded.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let mut last = self
            .stamps
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if *last == (stamp(&self.files.cert), stamp(&self.files.key)) {
            return Ok(false);
        }
        self.reload_holding(&mut last)?;
        Ok(true)
    }

    /// Reloads unconditionally (SIGHUP).
    pub fn reload(&self) -> Result<(), TlsError> {
        let mut last = self
            .stamps
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        self.reload_holding(&mut last)
    }

    /// Loads and installs the files' certificate, with `last` (the stamps' lock) held from
    /// before reading them to after installing it: two reloads at once (SIGHUP and the file
    /// watch) would otherwise interleave, the older read installed last and its stamps saying
    /// nothing changed since.
    fn reload_holding(
        &self,
        last: &mut (Option<FileStamp>, Option<FileStamp>),
    ) -> Result<(), TlsError> {
        let stamps = (stamp(&self.files.cert), stamp(&self.files.key));
        let key = load_certified_key(&self.files, &self.provider)?;
        if let Ok(mut current) = self.current.write() {
            *current = Arc::new(key);
        }
        *last = stamps;
        tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
        Ok(())
    }

    /// A rustls server configuration that resolves certificates through this resolver.
    pub fn server_config(self: &Arc<Self>) -> Result<rustls::ServerConfig, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|error| TlsError::Config(error.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

impl ResolvesServerCert for ReloadingCertResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|current| Arc::clone(&current))
    }
}

/// Whether the files hold a certificate chain and a private key that matches it, as
/// [`ReloadingCertResolver::load`] would use them (for `check-config`).
pub fn check(files: &TlsFiles) -> Result<(), TlsError> {
    load_certified_key(files, &rustls::crypto::ring::default_provider()).map(drop)
}

fn load_certified_key(
    files: &TlsFiles,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let file_error = |path: &Path, reason: String| TlsError::File {
        path: path.to_path_buf(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|error| file_error(&files.cert, error.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| file_error(&files.cert, error.to_string()))?;
    if chain.is_empty() {
        return Err(file_error(
            &files.cert,
            "no PEM certificate found".to_owned(),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|error| file_error(&files.key, format!("no usable PEM private key: {error}")))?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|error| file_error(&files.key, error.to_string()))?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|_| TlsError::KeyMismatch {
        cert: files.cert.clone(),
        key: files.key.clone(),
    })?;
    Ok(certified)
}
