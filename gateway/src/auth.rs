//! Caller authentication by API key: `Authorization: Bearer KEY` or Azure OpenAI's
//! `api-key: KEY`. Keys are held only as SHA-256 digests and compared in constant time;
//! the key id, never the key, is what logs and audit records name.

use http::HeaderMap;

use crate::config::{ApiKey, AuthConfig, sha256};
use crate::error::GatewayError;

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Anonymous,
    ApiKey { id: String },
}

impl Caller {
    /// Who owns what a caller leaves behind (stored responses, rate-limit buckets): the API
    /// key's id, or every anonymous caller together.
    pub fn owner(&self) -> String {
        match self {
            Caller::Anonymous => "anonymous".to_owned(),
            Caller::ApiKey { id } => format!("key:{id}"),
        }
    }

    /// The identity as logs name it.
    pub fn label(&self) -> &str {
        match self {
            Caller::Anonymous => "anonymous",
            Caller::ApiKey { id } => id,
        }
    }
}

/// Checks the request's credentials against the configured keys.
pub fn authenticate(headers: &HeaderMap, auth: &AuthConfig) -> Result<Caller, GatewayError> {
    let Some(presented) = presented_key(headers)? else {
        return if auth.allow_anonymous {
            Ok(Caller::Anonymous)
        } else {
            Err(GatewayError::MissingApiKey)
        };
    };
    let digest = sha256(presented);
    // Compare against every key so the time taken does not depend on which one matched.
    let mut matched: Option<&ApiKey> = None;
    for key in &auth.api_keys {
        if constant_time_eq(&key.sha256, &digest) {
            matched = Some(key);
        }
    }
    matched
        .map(|key| Caller::ApiKey { id: key.id.clone() })
        .ok_or(GatewayError::InvalidApiKey)
}

/// The key the request presents, if any. A malformed `Authorization` header is refused
/// rather than read as "no key", so it can never fall through to anonymous access.
fn presented_key(headers: &HeaderMap) -> Result<Option<&str>, GatewayError> {
    if let Some(value) = headers.get(http::header::AUTHORIZATION) {
        let value = value
            .to_str()
            .map_err(|_| GatewayError::InvalidApiKey)?
            .trim();
        return match value.split_once(' ') {
            Some((scheme, token))
                if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
            {
                Ok(Some(token.trim()))
            }
            _ => Err(GatewayError::InvalidApiKey),
        };
    }
    match headers.get("api-key") {
        None => Ok(None),
        Some(value) => match value.to_str().map(str::trim) {
            Ok(key) if !key.is_empty() => Ok(Some(key)),
            _ => Err(GatewayError::InvalidApiKey),
        },
    }
}

/// Whether the request's bearer token is one of `tokens` (the admin listener's check).
pub fn bearer_matches(headers: &HeaderMap, tokens: &[ApiKey]) -> bool {
    let Some(value) = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
    else {
        return false;
    };
    let Some((scheme, token)) = value.trim().split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return false;
    }
    let digest = sha256(token.trim());
    tokens.iter().fold(false, |found, key| {
        found | constant_time_eq(&key.sha256, &digest)
    })
}

fn constant_time_eq(left: &[u8; 32], right: &[u8; 32]) -> bool {
    left.iter()
        .zip(right)
        .fold(0_u8, |difference, (a, b)| difference | (a ^ b))
        == 0
}

#[cfg(test)]
mod tests;
