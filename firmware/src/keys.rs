//! Ed25519 keys in the PEM forms OpenSSL reads and writes: public keys as `PUBLIC KEY`
//! (SubjectPublicKeyInfo, RFC 8410) and private keys as `PRIVATE KEY` (PKCS #8), so a key made
//! with `openssl genpkey -algorithm ed25519` signs updates and `openssl pkey -pubin` reads
//! ours. The raw 32 bytes in base64 are accepted too. Private key bytes are never logged.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest as _, Sha256};

/// A key file is never longer than this.
pub const KEY_FILE_BYTES_MAX: usize = 4096;
/// DER prefix of an Ed25519 SubjectPublicKeyInfo, before the 32 key bytes.
const SPKI_ED25519_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
/// DER prefix of an Ed25519 PKCS #8 private key (version 0, no public key), before the seed.
const PKCS8_ED25519_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// `key` as a PEM `PUBLIC KEY`.
pub fn public_key_pem(key: &VerifyingKey) -> String {
    let mut der = SPKI_ED25519_PREFIX.to_vec();
    der.extend_from_slice(key.as_bytes());
    pem("PUBLIC KEY", &der)
}

/// `key` as a PEM `PRIVATE KEY` (PKCS #8).
pub fn private_key_pem(key: &SigningKey) -> String {
    let mut der = PKCS8_ED25519_PREFIX.to_vec();
    der.extend_from_slice(key.as_bytes());
    pem("PRIVATE KEY", &der)
}

fn pem(label: &str, der: &[u8]) -> String {
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        BASE64.encode(der)
    )
}

/// Reads a public key: PEM `PUBLIC KEY`, or the raw 32 bytes in base64. The error is a
/// reason to put after the file's name.
pub fn parse_public_key(contents: &[u8]) -> Result<VerifyingKey, String> {
    let bytes = decode(contents)?;
    let raw = match bytes.len() {
        32 => &bytes[..],
        44 if bytes.starts_with(&SPKI_ED25519_PREFIX) => &bytes[12..],
        _ => return Err("neither a PEM Ed25519 public key nor 32 bytes".to_owned()),
    };
    let raw: [u8; 32] = raw.try_into().map_err(|_| "not 32 bytes".to_owned())?;
    VerifyingKey::from_bytes(&raw).map_err(|_| "not a curve point".to_owned())
}

/// Reads a private key: PEM `PRIVATE KEY` (PKCS #8), or the raw 32-byte seed in base64.
pub fn parse_private_key(contents: &[u8]) -> Result<SigningKey, String> {
    let bytes = decode(contents)?;
    let seed = match bytes.len() {
        32 => &bytes[..],
        48 if bytes.starts_with(&PKCS8_ED25519_PREFIX) => &bytes[16..],
        _ => return Err("neither a PEM Ed25519 private key nor a 32-byte seed".to_owned()),
    };
    let seed: [u8; 32] = seed.try_into().map_err(|_| "not 32 bytes".to_owned())?;
    Ok(SigningKey::from_bytes(&seed))
}

fn decode(contents: &[u8]) -> Result<Vec<u8>, String> {
    if contents.len() > KEY_FILE_BYTES_MAX {
        return Err("file too large".to_owned());
    }
    let text = std::str::from_utf8(contents).map_err(|_| "not text".to_owned())?;
    let body: String = text
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .map(str::trim)
        .collect();
    BASE64.decode(body).map_err(|_| "not base64".to_owned())
}

/// First 16 hex digits of SHA-256 of `key`: names a key in messages and records.
pub fn key_id(key: &VerifyingKey) -> String {
    let digest = Sha256::digest(key.as_bytes());
    hex::encode(&digest[..8])
}

#[cfg(test)]
mod tests;
