use expect_test::{Expect, expect};

use super::GatewayError;

fn check(error: GatewayError, expect: Expect) {
    let body = String::from_utf8(error.body_json()).unwrap_or_default();
    expect.assert_eq(&format!("{} {body}", error.status().as_u16()));
}

#[test]
fn errors_map_to_openai_status_and_body() {
    check(
        GatewayError::invalid_value("temperature", "temperature must be between 0 and 2"),
        expect![[
            r#"400 {"error":{"message":"temperature must be between 0 and 2","type":"invalid_request_error","param":"temperature","code":"invalid_value"}}"#
        ]],
    );
    check(
        GatewayError::ModelNotFound {
            model: "gpt-9".to_owned(),
        },
        expect![[
            r#"404 {"error":{"message":"the model `gpt-9` does not exist or you do not have access to it","type":"invalid_request_error","param":"model","code":"model_not_found"}}"#
        ]],
    );
    check(
        GatewayError::RequestTooLarge { limit_bytes: 1024 },
        expect![[
            r#"413 {"error":{"message":"request body is larger than the limit of 1024 bytes","type":"invalid_request_error","param":null,"code":"request_too_large"}}"#
        ]],
    );
    check(
        GatewayError::QueueFull { retry_after_s: 2 },
        expect![[
            r#"429 {"error":{"message":"the local inference queue is full; retry after 2 s","type":"rate_limit_error","param":null,"code":"queue_full"}}"#
        ]],
    );
    check(
        GatewayError::HeaderTooLarge { limit_bytes: 4096 },
        expect![[
            r#"431 {"error":{"message":"request header is larger than the limit of 4096 bytes","type":"invalid_request_error","param":null,"code":"request_header_too_large"}}"#
        ]],
    );
    check(
        GatewayError::UnsupportedContentEncoding {
            encoding: "gzip".to_owned(),
        },
        expect![[
            r#"415 {"error":{"message":"request bodies with `Content-Encoding: gzip` are not accepted; send the body uncompressed","type":"invalid_request_error","param":null,"code":"unsupported_content_encoding"}}"#
        ]],
    );
    let backend = |throttled| GatewayError::BackendRefused {
        message: "backend `a` of pool `aks` answered 429".to_owned(),
        detail: "slow down".to_owned(),
        throttled,
        retry_after_s: 4,
    };
    check(
        backend(true),
        expect![[
            r#"503 {"error":{"message":"backend `a` of pool `aks` answered 429: slow down","type":"api_error","param":null,"code":"unavailable"}}"#
        ]],
    );
    assert_eq!(backend(true).retry_after_s(), Some(4));
    assert_eq!(backend(false).status().as_u16(), 502);
    assert_eq!(backend(false).retry_after_s(), None);
    check(
        GatewayError::InvalidApiKey,
        expect![[
            r#"401 {"error":{"message":"incorrect API key provided","type":"authentication_error","param":null,"code":"invalid_api_key"}}"#
        ]],
    );
}

#[test]
fn only_backpressure_errors_carry_retry_after() {
    assert_eq!(
        GatewayError::QueueFull { retry_after_s: 3 }.retry_after_s(),
        Some(3)
    );
    assert_eq!(GatewayError::InvalidApiKey.retry_after_s(), None);
}

/// Logs and audit records never carry what the client's body said, only where it was wrong;
/// errors in the gateway's own words keep their message.
#[test]
fn records_name_the_parameter_not_the_clients_text() {
    let recorded = |error: GatewayError| error.record_description();
    let cases = [
        (
            GatewayError::invalid_value(
                "messages[0].role",
                "`SSN 123-45-6789` is not a role (expected system, ...)",
            ),
            expect!["400 invalid_value: parameter `messages[0].role` (message to the client only)"],
        ),
        (
            GatewayError::unsupported(
                "messages[2].content[1].type",
                "`card 4111 1111 1111 1111` content parts are not supported",
            ),
            expect![
                "400 unsupported_parameter: parameter `messages[2].content[1].type` (message to the client only)"
            ],
        ),
        (
            GatewayError::invalid_value(
                "logit_bias.123456789",
                "`123456789` is not in the vocabulary",
            ),
            expect!["400 invalid_value: parameter `logit_bias.…` (message to the client only)"],
        ),
        (
            GatewayError::unsupported(
                "jane.doe@example.com",
                "`jane.doe@example.com` is not a parameter",
            ),
            expect!["400 unsupported_parameter: parameter `….….…` (message to the client only)"],
        ),
        (
            GatewayError::BackendRefused {
                message: "backend `a` of pool `aks` answered 500".to_owned(),
                detail: "Traceback: ValueError for prompt 'SSN 123-45-6789'".to_owned(),
                throttled: false,
                retry_after_s: 1,
            },
            expect!["backend `a` of pool `aks` answered 500 (its body to the client only)"],
        ),
        (
            GatewayError::invalid_value("messages[x]", "odd"),
            expect!["400 invalid_value: parameter `messages…` (message to the client only)"],
        ),
        (
            GatewayError::InvalidJson {
                message: "invalid type: string \"4111 1111 1111 1111\", expected a boolean"
                    .to_owned(),
            },
            expect!["400 invalid_json (message to the client only)"],
        ),
        (
            GatewayError::ModelNotFound {
                model: "acct-4111 1111 1111 1111".to_owned(),
            },
            expect!["404 model_not_found: parameter `model` (message to the client only)"],
        ),
        (
            GatewayError::QueueFull { retry_after_s: 2 },
            expect!["the local inference queue is full; retry after 2 s"],
        ),
    ];
    for (error, expect) in cases {
        expect.assert_eq(&recorded(error));
    }
}

#[tokio::test]
async fn a_task_that_panicked_is_reported_without_its_message() {
    // A panic's message may quote what the task worked on (a prompt, a stored answer).
    let panicked = tokio::task::spawn_blocking(|| {
        let secret = "jane.doe@contoso.com";
        if !secret.is_empty() {
            std::panic::panic_any(format!("could not parse {secret}"));
        }
    })
    .await
    .unwrap_err();
    let error = GatewayError::unfinished("evaluating the request", &panicked);
    assert_eq!(error.status(), 500);
    let shown = [
        error.to_string(),
        error.record_description(),
        serde_json::to_string(&error.body()).unwrap(),
    ];
    for text in &shown {
        assert!(!text.contains("jane.doe"), "{text}");
        assert!(text.contains("evaluating the request"), "{text}");
        assert!(text.contains("panicked"), "{text}");
    }
}
