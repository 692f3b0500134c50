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
/// rather than read as "no key", so it can never fall through to anonymous access; so are
/// several keys (two `Authorization` headers, or one with an `api-key` that differs), where
/// checking only one would let a client or a proxy in between choose which.
fn presented_key(headers: &HeaderMap) -> Result<Option<&str>, GatewayError> {
    let bearer = match single(headers, &http::header::AUTHORIZATION)? {
        None => None,
        Some(value) => {
            let value = value
                .to_str()
                .map_err(|_| GatewayError::InvalidApiKey)?
                .trim();
            match value.split_once(' ') {
                Some((scheme, token))
                    if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
                {
                    Some(token.trim())
                }
                _ => return Err(GatewayError::InvalidApiKey),
            }
        }
    };
    let api_key = match single(headers, &http::header::HeaderName::from_static("api-key"))? {
        None => None,
        Some(value) => match value.to_str().map(str::trim) {
            Ok(key) if !key.is_empty() => Some(key),
            _ => return Err(GatewayError::InvalidApiKey),
        },
    };
    match (bearer, api_key) {
        (Some(bearer), Some(api_key)) if bearer != api_key => Err(GatewayError::AmbiguousApiKey),
        (bearer, api_key) => Ok(bearer.or(api_key)),
    }
}

/// A header that may appear at most once.
fn single<'a>(
    headers: &'a HeaderMap,
    name: &http::header::HeaderName,
) -> Result<Option<&'a http::HeaderValue>, GatewayError> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (_, Some(_)) => Err(GatewayError::AmbiguousApiKey),
        (value, None) => Ok(value),
    }
}

/// Whether the request's bearer token is one of `tokens` (the admin listener's check); two
/// `Authorization` headers never pass.
pub fn bearer_matches(headers: &HeaderMap, tokens: &[ApiKey]) -> bool {
    let Some(value) = single(headers, &http::header::AUTHORIZATION)
        .ok()
        .flatten()
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
