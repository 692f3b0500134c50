//! `[responses]`: whether the Responses API keeps responses for `previous_response_id` and
//! `GET /v1/responses/{id}`, and for how long.

use std::time::Duration;

use serde::Deserialize;

use super::Validator;

/// The validated `[responses]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponsesConfig {
    /// Keep responses (unless a request says `"store": false`). Off: nothing is kept, every
    /// answer says `"store": false` and `previous_response_id` is refused.
    pub store: bool,
    /// How long a stored response can be read or continued.
    pub retention: Duration,
    /// The store's bound: the oldest responses go first beyond it.
    pub bytes_max: u64,
    /// A response (with the conversation it continued) larger than this is not kept.
    pub record_bytes_max: u64,
    /// Keep responses whose conversation the sensitivity scan found sensitive content in,
    /// or content it cannot read (attachments). Off: such answers say `"store": false` and
    /// nothing of them is written.
    pub keep_sensitive: bool,
    /// Seal every kept response with this key (AES-256-GCM); `None` keeps them as JSON.
    pub encryption_key: Option<StoreKey>,
}

impl Default for ResponsesConfig {
    fn default() -> Self {
        ResponsesConfig {
            store: false,
            retention: Duration::from_secs(u64::from(DEFAULT_RETENTION_HOURS) * 3_600),
            bytes_max: DEFAULT_BYTES_MAX,
            record_bytes_max: DEFAULT_RECORD_BYTES_MAX,
            keep_sensitive: false,
            encryption_key: None,
        }
    }
}

/// A 256-bit key for the response store, read from a file or the environment. Its `Debug`
/// shows only its id (the first four bytes of its SHA-256, in hex), never the key.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreKey {
    bytes: [u8; 32],
    id: String,
}

impl StoreKey {
    /// A key written as 64 hexadecimal digits or as standard base64 of 32 bytes (line
    /// breaks and spaces around it ignored).
    pub fn parse(text: &str) -> Result<StoreKey, String> {
        use base64::Engine as _;
        let text = text.trim();
        let bytes = if text.len() == 64 && text.bytes().all(|byte| byte.is_ascii_hexdigit()) {
            hex::decode(text).map_err(|error| error.to_string())?
        } else {
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|_| {
                    "must be 32 bytes written as 64 hexadecimal digits or in base64 (e.g. the \
                     output of `openssl rand -hex 32`)"
                        .to_owned()
                })?
        };
        let bytes: [u8; 32] = bytes.try_into().map_err(|bytes: Vec<u8>| {
            format!("must be 32 bytes (256 bits), not {} bytes", bytes.len())
        })?;
        use sha2::Digest as _;
        let id = hex::encode(&sha2::Sha256::digest(bytes)[..4]);
        Ok(StoreKey { bytes, id })
    }

    pub fn bytes(&self) -> &[u8; 32] {
        &self.bytes
    }

    /// Names the key in logs and records without revealing it.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl std::fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

const DEFAULT_RETENTION_HOURS: u32 = 720;
const DEFAULT_BYTES_MAX: u64 = 256 << 20;
const DEFAULT_RECORD_BYTES_MAX: u64 = 8 << 20;
/// Ten years: anything longer is a typo.
const RETENTION_HOURS_MAX: u32 = 87_600;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawResponses {
    store: bool,
    retention_hours: u32,
    bytes_max: u64,
    record_bytes_max: u64,
    keep_sensitive: bool,
    encryption_key_file: Option<std::path::PathBuf>,
    encryption_key_env: Option<String>,
}

impl Default for RawResponses {
    fn default() -> Self {
        RawResponses {
            store: false,
            retention_hours: DEFAULT_RETENTION_HOURS,
            bytes_max: DEFAULT_BYTES_MAX,
            record_bytes_max: DEFAULT_RECORD_BYTES_MAX,
            keep_sensitive: false,
            encryption_key_file: None,
            encryption_key_env: None,
        }
    }
}

impl Validator<'_> {
    pub(super) fn responses(&mut self, raw: RawResponses) -> ResponsesConfig {
        if !(1..=RETENTION_HOURS_MAX).contains(&raw.retention_hours) {
            self.error(
                "responses.retention_hours",
                format!(
                    "must be between 1 and {RETENTION_HOURS_MAX}, not {}",
                    raw.retention_hours
                ),
            );
        }
        if raw.bytes_max < 1 << 20 {
            self.error(
                "responses.bytes_max",
                format!("must be at least 1048576 (1 MiB), not {}", raw.bytes_max),
            );
        }
        if raw.record_bytes_max == 0 || raw.record_bytes_max > raw.bytes_max {
            self.error(
                "responses.record_bytes_max",
                format!(
                    "must be greater than 0 and at most responses.bytes_max ({}), not {}",
                    raw.bytes_max, raw.record_bytes_max
                ),
            );
        }
        let encryption_key = match (raw.encryption_key_file, raw.encryption_key_env) {
            (Some(_), Some(_)) => {
                self.error(
                    "responses",
                    "set at most one of encryption_key_file or encryption_key_env",
                );
                None
            }
            (Some(file), None) => {
                let file = self.resolve(&file);
                match std::fs::read_to_string(&file) {
                    Ok(text) => StoreKey::parse(&text)
                        .map_err(|problem| {
                            self.error(
                                "responses.encryption_key_file",
                                format!("{}: {problem}", file.display()),
                            );
                        })
                        .ok(),
                    Err(error) => {
                        self.error(
                            "responses.encryption_key_file",
                            format!("cannot read {}: {error}", file.display()),
                        );
                        None
                    }
                }
            }
            (None, Some(variable)) => match self.environment.var(&variable) {
                Some(text) => StoreKey::parse(&text)
                    .map_err(|problem| {
                        self.error(
                            "responses.encryption_key_env",
                            format!("environment variable {variable}: {problem}"),
                        );
                    })
                    .ok(),
                None => {
                    self.error(
                        "responses.encryption_key_env",
                        format!("environment variable {variable} is not set"),
                    );
                    None
                }
            },
            (None, None) => None,
        };
        ResponsesConfig {
            store: raw.store,
            retention: Duration::from_secs(u64::from(raw.retention_hours) * 3_600),
            bytes_max: raw.bytes_max,
            record_bytes_max: raw.record_bytes_max,
            keep_sensitive: raw.keep_sensitive,
            encryption_key,
        }
    }
}
