use http::Method;

use super::{client_network, route_path};

fn check(method: Method, path: &str, query: Option<&str>) -> String {
    match route_path(&method, path, query) {
        Ok(operation) => format!("{operation:?}"),
        Err(error) => match error.allow() {
            Some(allow) => format!("{} {} (allow: {allow})", error.status().as_u16(), error),
            None => format!("{} {}", error.status().as_u16(), error),
        },
    }
}

#[test]
fn paths_map_to_operations() {
    assert_eq!(
        check(Method::POST, "/v1/chat/completions", None),
        "Chat { deployment: None }"
    );
    assert_eq!(
        check(Method::POST, "/v1/completions", None),
        "Completions { deployment: None }"
    );
    assert_eq!(check(Method::GET, "/v1/models", None), "Models");
    assert_eq!(check(Method::POST, "/v1/responses", None), "Responses");
    // Azure OpenAI's v1 API: the model in the body, no api-version.
    assert_eq!(
        check(Method::POST, "/openai/v1/chat/completions", None),
        "Chat { deployment: None }"
    );
    assert_eq!(
        check(Method::POST, "/openai/v1/responses", None),
        "Responses"
    );
    assert_eq!(check(Method::GET, "/openai/v1/models", None), "Models");
    assert_eq!(
        check(Method::GET, "/v1/models/meta-llama%2FLlama-3.1-8B", None),
        "Model { id: \"meta-llama/Llama-3.1-8B\" }"
    );
    assert_eq!(
        check(Method::GET, "/openai/v1/models/org/name", None),
        "Model { id: \"org/name\" }"
    );
    // HEAD goes where GET goes; only the content is left out.
    assert_eq!(check(Method::HEAD, "/v1/models", None), "Models");
    assert_eq!(
        check(Method::HEAD, "/v1/responses/resp_1/input_items", None),
        "StoredResponse { id: \"resp_1\", part: InputItems }"
    );
    assert_eq!(
        check(
            Method::POST,
            "/openai/responses",
            Some("api-version=2025-04-01-preview")
        ),
        "Responses"
    );
    assert_eq!(
        check(Method::POST, "/v1/embeddings", None),
        "Embeddings { deployment: None }"
    );
    assert_eq!(
        check(
            Method::POST,
            "/openai/deployments/bge/embeddings",
            Some("api-version=2024-10-21")
        ),
        "Embeddings { deployment: Some(\"bge\") }"
    );
    assert_eq!(
        check(
            Method::POST,
            "/openai/deployments/smollm2/chat/completions",
            Some("api-version=2024-10-21")
        ),
        "Chat { deployment: Some(\"smollm2\") }"
    );
}

#[test]
fn wrong_methods_unknown_paths_and_missing_api_versions_are_refused() {
    assert_eq!(
        check(Method::GET, "/v1/chat/completions", None),
        "405 method GET is not allowed for /v1/chat/completions (allow: POST)"
    );
    assert_eq!(
        check(Method::GET, "/v1/embeddings", None),
        "405 method GET is not allowed for /v1/embeddings (allow: POST)"
    );
    assert_eq!(
        check(Method::GET, "/v1/responses", None),
        "405 method GET is not allowed for /v1/responses (allow: POST)"
    );
    // Stored responses: read, deleted, their input items listed; nothing else.
    assert_eq!(
        check(Method::GET, "/v1/responses/resp_1", None),
        "StoredResponse { id: \"resp_1\", part: Get }"
    );
    assert_eq!(
        check(Method::DELETE, "/openai/v1/responses/resp_1/", None),
        "StoredResponse { id: \"resp_1\", part: Delete }"
    );
    assert_eq!(
        check(Method::GET, "/v1/responses/resp_1/input_items", None),
        "StoredResponse { id: \"resp_1\", part: InputItems }"
    );
    assert_eq!(
        check(Method::POST, "/v1/responses/resp_1", None),
        "405 method POST is not allowed for /v1/responses/resp_1 (allow: GET, HEAD, DELETE)"
    );
    assert_eq!(
        check(Method::PUT, "/v1/responses/resp_1/input_items", None),
        "405 method PUT is not allowed for /v1/responses/resp_1/input_items (allow: GET, HEAD)"
    );
    assert_eq!(
        check(Method::POST, "/v1/models", None),
        "405 method POST is not allowed for /v1/models (allow: GET, HEAD)"
    );
    assert_eq!(
        check(Method::DELETE, "/v1/models/smollm2", None),
        "405 method DELETE is not allowed for /v1/models/smollm2 (allow: GET, HEAD)"
    );
    assert_eq!(
        check(Method::GET, "/v1/models/bad%zzescape", None),
        "404 unknown URL: GET /v1/models/bad%zzescape"
    );
    assert_eq!(
        check(Method::HEAD, "/v1/chat/completions", None),
        "405 method HEAD is not allowed for /v1/chat/completions (allow: POST)"
    );
    assert_eq!(
        check(Method::POST, "/v1/responses/resp_1/cancel", None),
        "404 unknown URL: POST /v1/responses/resp_1/cancel"
    );
    assert_eq!(
        check(Method::POST, "/v1/assistants", None),
        "404 unknown URL: POST /v1/assistants"
    );
    assert_eq!(
        check(
            Method::POST,
            "/openai/deployments/smollm2/chat/completions",
            None
        ),
        "400 the api-version query parameter is required (e.g. ?api-version=2024-10-21)"
    );
    assert_eq!(
        check(
            Method::POST,
            "/openai/deployments//chat/completions",
            Some("api-version=1")
        ),
        "404 unknown URL: POST /openai/deployments//chat/completions"
    );
}

#[test]
fn only_identity_content_encoding_is_accepted() {
    let coding = |values: &[&str]| {
        let mut header =
            pingora_http::RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
        for value in values {
            header.append_header("content-encoding", *value).unwrap();
        }
        super::content_encoding(&header)
    };
    assert_eq!(coding(&[]), None);
    assert_eq!(coding(&["identity"]), None);
    assert_eq!(coding(&[" Identity , identity"]), None);
    assert_eq!(coding(&["gzip"]).as_deref(), Some("gzip"));
    assert_eq!(coding(&["identity, br"]).as_deref(), Some("br"));
    assert_eq!(coding(&["identity", "zstd"]).as_deref(), Some("zstd"));
    let long = "x".repeat(100);
    assert_eq!(coding(&[&long]).map(|named| named.len()), Some(64));
}

/// A panic while a request is handled ends that request's future, not the connection's task,
/// and across an await as well as before one.
#[test]
fn a_panic_in_handling_is_caught_and_the_next_request_is_served() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    runtime.block_on(async {
        let panics_at_once = std::pin::pin!(async {
            let groups: Vec<u8> = Vec::new();
            usize::from(groups[std::hint::black_box(3)])
        });
        assert_eq!(super::unless_it_panics(panics_at_once).await, None);
        let panics_after_waiting = std::pin::pin!(async {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            if std::hint::black_box(true) {
                panic!("a bug");
            }
            1
        });
        assert_eq!(super::unless_it_panics(panics_after_waiting).await, None);
        let answers = std::pin::pin!(async { 7 });
        assert_eq!(super::unless_it_panics(answers).await, Some(7));
    });
}

#[test]
fn anonymous_clients_are_told_apart_by_ipv4_address_or_ipv6_network() {
    let network = |text: &str, length: u8| client_network(text.parse().unwrap(), length);
    assert_eq!(network("192.0.2.7", 64), "192.0.2.7");
    assert_eq!(network("::ffff:192.0.2.7", 64), "192.0.2.7");
    assert_eq!(network("2001:db8:1:2:aaaa::1", 64), "2001:db8:1:2::/64");
    assert_eq!(
        network("2001:db8:1:2:bbbb::9", 64),
        network("2001:db8:1:2:aaaa::1", 64)
    );
    assert_ne!(
        network("2001:db8:1:3::1", 64),
        network("2001:db8:1:2::1", 64)
    );
    assert_eq!(
        network("2001:db8:1:2:aaaa::1", 128),
        "2001:db8:1:2:aaaa::1/128"
    );
    assert_eq!(network("2001:db8:1:2:aaaa::1", 48), "2001:db8:1::/48");
}
