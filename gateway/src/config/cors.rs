//! `[cors]`: which browser origins may call the data plane (cross-origin resource sharing).
//! Off unless origins are listed: a browser page of another origin can then neither send an
//! API request that needs a preflight nor read any answer.

use serde::Deserialize;

use super::Validator;

/// The validated `[cors]` section.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CorsConfig {
    /// Origins allowed, as browsers write them in `Origin` (`https://host[:port]`, lower
    /// case, no default port).
    pub allow_origins: Vec<String>,
    /// `"*"`: any origin.
    pub any_origin: bool,
    /// How long a browser may keep a preflight's answer (`Access-Control-Max-Age`).
    pub max_age_s: u32,
}

impl CorsConfig {
    /// Whether any origin is allowed at all.
    pub fn enabled(&self) -> bool {
        self.any_origin || !self.allow_origins.is_empty()
    }

    /// Whether a request's `Origin` value is allowed. Compared as browsers serialize
    /// origins: scheme and host are case-insensitive, nothing else varies.
    pub fn allows(&self, origin: &str) -> bool {
        self.any_origin
            || self
                .allow_origins
                .iter()
                .any(|allowed| allowed.eq_ignore_ascii_case(origin))
    }
}

const DEFAULT_MAX_AGE_S: u32 = 600;
/// Browsers cap the preflight cache at 2 h (Chromium) or 24 h (Firefox).
const MAX_AGE_S_MAX: u32 = 86_400;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawCors {
    allow_origins: Vec<String>,
    max_age_s: u32,
}

impl Default for RawCors {
    fn default() -> Self {
        RawCors {
            allow_origins: Vec::new(),
            max_age_s: DEFAULT_MAX_AGE_S,
        }
    }
}

impl Validator<'_> {
    pub(super) fn cors(&mut self, raw: RawCors) -> CorsConfig {
        let mut config = CorsConfig {
            max_age_s: raw.max_age_s,
            ..CorsConfig::default()
        };
        if raw.max_age_s > MAX_AGE_S_MAX {
            self.error(
                "cors.max_age_s",
                format!(
                    "must be at most {MAX_AGE_S_MAX} (24 h), not {}",
                    raw.max_age_s
                ),
            );
        }
        for (index, origin) in raw.allow_origins.iter().enumerate() {
            let path = format!("cors.allow_origins[{index}]");
            if origin == "*" {
                config.any_origin = true;
                continue;
            }
            match serialized_origin(origin) {
                Ok(origin) if config.allow_origins.contains(&origin) => {
                    self.error(path, format!("`{origin}` is listed twice"));
                }
                Ok(origin) => config.allow_origins.push(origin),
                Err(problem) => self.error(path, format!("`{origin}` {problem}")),
            }
        }
        if config.any_origin && raw.allow_origins.len() > 1 {
            self.error(
                "cors.allow_origins",
                "\"*\" allows every origin: list it alone or list origins",
            );
        }
        config
    }
}

/// An origin as a browser sends it in `Origin`: `scheme://host[:port]`, lower case, the
/// default port left out. Anything more (a path, a query, user information, a wildcard) is
/// refused, since it could never match.
fn serialized_origin(text: &str) -> Result<String, &'static str> {
    let url = reqwest::Url::parse(text).map_err(|_| "is not an origin (https://host[:port])")?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("is not an http or https origin");
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("has user information; an origin is scheme://host[:port]");
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err("has a path, query or fragment; an origin is scheme://host[:port]");
    }
    if text.ends_with('/') {
        return Err("ends with `/`; browsers send origins without it");
    }
    let host = url.host_str().ok_or("has no host")?;
    if host.contains('*') {
        return Err("has a wildcard; list each origin, or \"*\" alone");
    }
    Ok(match url.port() {
        Some(port) => format!("{}://{host}:{port}", url.scheme()),
        None => format!("{}://{host}", url.scheme()),
    })
}

#[cfg(test)]
mod tests {
    use super::serialized_origin;

    #[test]
    fn origins_are_kept_as_browsers_send_them() {
        for (written, kept) in [
            ("https://chat.contoso.com", "https://chat.contoso.com"),
            ("HTTPS://Chat.Contoso.com", "https://chat.contoso.com"),
            ("https://chat.contoso.com:443", "https://chat.contoso.com"),
            ("http://localhost:5173", "http://localhost:5173"),
            ("http://[::1]:8080", "http://[::1]:8080"),
        ] {
            assert_eq!(serialized_origin(written).as_deref(), Ok(kept), "{written}");
        }
    }

    #[test]
    fn what_could_never_match_an_origin_is_refused() {
        for text in [
            "chat.contoso.com",
            "https://chat.contoso.com/",
            "https://chat.contoso.com/app",
            "https://chat.contoso.com?x=1",
            "https://user@chat.contoso.com",
            "https://*.contoso.com",
            "file:///tmp/page.html",
            "null",
        ] {
            assert!(serialized_origin(text).is_err(), "{text}");
        }
    }
}
