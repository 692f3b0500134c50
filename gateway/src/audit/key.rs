//! The device key that signs checkpoints: an Ed25519 key made at first start in the state
//! directory (`audit-device.key`, mode 0600, written atomically) with its public half beside it
//! (`audit-device.pub`, a PEM `PUBLIC KEY`, which `openssl pkey -pubin` reads).
//!
//! The private key file holds the 32-byte seed in base64 and is never logged.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};

/// File name of the private key in the state directory.
pub const PRIVATE_KEY_FILE: &str = "audit-device.key";
/// File name of the public key (state directory, and copied into the audit directory).
pub const PUBLIC_KEY_FILE: &str = "audit-device.pub";
const PRIVATE_KEY_MODE: u32 = 0o600;
const PUBLIC_KEY_MODE: u32 = 0o644;
/// A key file is never longer than this.
const KEY_FILE_BYTES_MAX: usize = 4096;
/// Why a key could not be loaded, made or read.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{}: {io}", .path.display())]
    Io { path: PathBuf, io: io::Error },
    #[error("{}: not an Ed25519 key ({reason})", .path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("generating the device key: {0}")]
    Random(String),
}

/// The signing key.
pub struct DeviceKey {
    signing: SigningKey,
}

impl std::fmt::Debug for DeviceKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("DeviceKey")
            .field("key_id", &self.key_id())
            .finish_non_exhaustive()
    }
}

impl DeviceKey {
    /// Loads `audit-device.key` from `directory`, or makes it (and `audit-device.pub`) there.
    pub fn load_or_create(directory: &Path) -> Result<DeviceKey, KeyError> {
        let path = directory.join(PRIVATE_KEY_FILE);
        let key = match fs::read(&path) {
            Ok(contents) => DeviceKey::parse(&path, &contents)?,
            Err(io) if io.kind() == io::ErrorKind::NotFound => {
                let mut seed = [0_u8; 32];
                getrandom::fill(&mut seed).map_err(|error| KeyError::Random(error.to_string()))?;
                let key = DeviceKey {
                    signing: SigningKey::from_bytes(&seed),
                };
                let mut text = BASE64.encode(seed);
                text.push('\n');
                write_atomically(&path, text.as_bytes(), PRIVATE_KEY_MODE)
                    .map_err(|io| KeyError::Io { path, io })?;
                key
            }
            Err(io) => return Err(KeyError::Io { path, io }),
        };
        let public_path = directory.join(PUBLIC_KEY_FILE);
        key.export_public(&public_path)?;
        Ok(key)
    }

    fn parse(path: &Path, contents: &[u8]) -> Result<DeviceKey, KeyError> {
        let invalid = |reason: &str| KeyError::Invalid {
            path: path.to_owned(),
            reason: reason.to_owned(),
        };
        if contents.len() > KEY_FILE_BYTES_MAX {
            return Err(invalid("file too large"));
        }
        let text = std::str::from_utf8(contents).map_err(|_| invalid("not text"))?;
        let seed = BASE64
            .decode(text.trim())
            .map_err(|_| invalid("not base64"))?;
        let seed: [u8; 32] = seed.try_into().map_err(|_| invalid("not 32 bytes"))?;
        Ok(DeviceKey {
            signing: SigningKey::from_bytes(&seed),
        })
    }

    /// Writes the public key as PEM to `path` unless it already holds it.
    pub fn export_public(&self, path: &Path) -> Result<(), KeyError> {
        let pem = public_key_pem(&self.signing.verifying_key());
        if fs::read(path).is_ok_and(|existing| existing == pem.as_bytes()) {
            return Ok(());
        }
        write_atomically(path, pem.as_bytes(), PUBLIC_KEY_MODE).map_err(|io| KeyError::Io {
            path: path.to_owned(),
            io,
        })
    }

    /// The base64 signature of `message`.
    pub fn sign(&self, message: &[u8]) -> String {
        BASE64.encode(self.signing.sign(message).to_bytes())
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    /// First 16 hex digits of SHA-256 of the public key: names the key in checkpoints.
    pub fn key_id(&self) -> String {
        key_id(&self.signing.verifying_key())
    }
}

/// First 16 hex digits of SHA-256 of `key`.
pub fn key_id(key: &VerifyingKey) -> String {
    firmware::keys::key_id(key)
}

/// Whether `signature` (base64) signs `message` under `key`.
pub fn verify_signature(key: &VerifyingKey, message: &[u8], signature: &str) -> bool {
    let Ok(bytes) = BASE64.decode(signature) else {
        return false;
    };
    let Ok(signature) = Signature::from_slice(&bytes) else {
        return false;
    };
    key.verify(message, &signature).is_ok()
}

/// `key` as a PEM `PUBLIC KEY` (SubjectPublicKeyInfo).
pub fn public_key_pem(key: &VerifyingKey) -> String {
    firmware::keys::public_key_pem(key)
}

/// Reads a public key file: PEM `PUBLIC KEY`, or the raw 32 bytes in base64.
pub fn read_public_key(path: &Path) -> Result<VerifyingKey, KeyError> {
    let contents = fs::read(path).map_err(|io| KeyError::Io {
        path: path.to_owned(),
        io,
    })?;
    firmware::keys::parse_public_key(&contents).map_err(|reason| KeyError::Invalid {
        path: path.to_owned(),
        reason,
    })
}

/// Writes `contents` to a temporary file created with `mode`, syncs it, renames it over `path`
/// and syncs the directory, so `path` is either the old file or the whole new one.
pub(crate) fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut temporary_name = std::ffi::OsString::from(".");
    temporary_name.push(name);
    temporary_name.push(".tmp");
    let temporary = path.with_file_name(temporary_name);
    match fs::remove_file(&temporary) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temporary)?;
    file.set_permissions(Permissions::from_mode(mode))?;
    file.write_all(contents)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&temporary, path)?;
    let directory = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty());
    File::open(directory.unwrap_or(Path::new(".")))?.sync_all()
}
