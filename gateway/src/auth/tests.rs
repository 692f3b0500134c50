use http::HeaderMap;

use super::{Caller, authenticate};
use crate::config::{ApiKey, AuthConfig, RateLimits, sha256};
use crate::error::GatewayError;

fn auth(allow_anonymous: bool) -> AuthConfig {
    AuthConfig {
        allow_anonymous,
        api_keys: vec![
            ApiKey {
                id: "app-a".to_owned(),
                sha256: sha256("key-a"),
                limits: RateLimits::default(),
                file: None,
            },
            ApiKey {
                id: "app-b".to_owned(),
                sha256: sha256("key-b"),
                limits: RateLimits::default(),
                file: None,
            },
        ],
        anonymous_limits: RateLimits::default(),
        anonymous_limits_per_client: false,
        anonymous_ipv6_prefix_length: 64,
    }
}

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in pairs {
        if let Ok(value) = value.parse() {
            headers.insert(*name, value);
        }
    }
    headers
}

#[test]
fn bearer_and_api_key_headers_identify_the_key() {
    let caller = authenticate(&headers(&[("authorization", "Bearer key-b")]), &auth(false));
    assert_eq!(
        caller,
        Ok(Caller::ApiKey {
            id: "app-b".to_owned()
        })
    );
    let caller = authenticate(
        &headers(&[("authorization", "bearer  key-a ")]),
        &auth(false),
    );
    assert_eq!(
        caller,
        Ok(Caller::ApiKey {
            id: "app-a".to_owned()
        })
    );
    let caller = authenticate(&headers(&[("api-key", "key-a")]), &auth(false));
    assert_eq!(
        caller,
        Ok(Caller::ApiKey {
            id: "app-a".to_owned()
        })
    );
}

#[test]
fn wrong_or_missing_keys_are_refused() {
    assert_eq!(
        authenticate(&headers(&[("authorization", "Bearer nope")]), &auth(false)),
        Err(GatewayError::InvalidApiKey)
    );
    assert_eq!(
        authenticate(
            &headers(&[("authorization", "Basic a2V5LWE=")]),
            &auth(true)
        ),
        Err(GatewayError::InvalidApiKey)
    );
    assert_eq!(
        authenticate(&headers(&[]), &auth(false)),
        Err(GatewayError::MissingApiKey)
    );
}

#[test]
fn anonymous_callers_pass_only_when_allowed_and_keys_are_still_checked() {
    assert_eq!(
        authenticate(&headers(&[]), &auth(true)),
        Ok(Caller::Anonymous)
    );
    assert_eq!(
        authenticate(&headers(&[("api-key", "wrong")]), &auth(true)),
        Err(GatewayError::InvalidApiKey)
    );
}

#[test]
fn several_keys_in_one_request_are_refused_whichever_comes_first() {
    let mut two_bearers = HeaderMap::new();
    two_bearers.append("authorization", "Bearer key-a".parse().unwrap());
    two_bearers.append("authorization", "Bearer key-b".parse().unwrap());
    let mut two_api_keys = HeaderMap::new();
    two_api_keys.append("api-key", "key-a".parse().unwrap());
    two_api_keys.append("api-key", "nope".parse().unwrap());
    for headers in [
        two_bearers,
        two_api_keys,
        headers(&[("authorization", "Bearer key-a"), ("api-key", "key-b")]),
        headers(&[("authorization", "Bearer nope"), ("api-key", "key-a")]),
    ] {
        assert_eq!(
            authenticate(&headers, &auth(true)),
            Err(GatewayError::AmbiguousApiKey),
            "{headers:?}"
        );
    }
    // The same key in both forms is one key.
    assert_eq!(
        authenticate(
            &headers(&[("authorization", "Bearer key-b"), ("api-key", "key-b")]),
            &auth(false)
        ),
        Ok(Caller::ApiKey {
            id: "app-b".to_owned()
        })
    );
}

#[test]
fn the_admin_check_refuses_two_bearer_headers() {
    let tokens = auth(false).api_keys;
    let mut two = HeaderMap::new();
    two.append("authorization", "Bearer key-a".parse().unwrap());
    assert!(super::bearer_matches(&two, &tokens));
    two.append("authorization", "Bearer nope".parse().unwrap());
    assert!(!super::bearer_matches(&two, &tokens));
}
