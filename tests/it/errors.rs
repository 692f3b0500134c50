//! Bad requests get OpenAI error bodies with the right status, and never take the gateway
//! down or leak into the next request.

use rustls_pki_types::pem::PemObject as _;
use serde_json::{Value, json};
use tests::{API_KEY, Gateway, GatewayOptions, client, serial};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::{block_on, chat_body};

async fn error_of(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    assert_eq!(response.headers()["content-type"], "application/json");
    assert!(response.headers().contains_key("x-request-id"));
    assert!(response.headers().contains_key("x-isthmus-rule"));
    (status, response.json().await.unwrap())
}

/// An HTTP/1.1 connection over TLS to `address`, trusting the test CA.
async fn tls_http1(
    address: std::net::SocketAddr,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    let ca = tests::TestPki::shared().ca_pem.as_bytes();
    roots.add_parsable_certificates(
        rustls_pki_types::CertificateDer::pem_slice_iter(ca).map(Result::unwrap),
    );
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap()
}

/// Reads one response head (through its blank line), byte by byte so that nothing after
/// it is consumed.
async fn read_head(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let byte = stream.read_u8().await.unwrap();
        head.push(byte);
    }
    String::from_utf8(head).unwrap()
}

#[test]
fn bad_requests_get_openai_errors_with_the_right_status() {
    let _serial = serial();
    let options = GatewayOptions {
        context_tokens: 256,
        body_bytes_max: 64 * 1024,
        ..GatewayOptions::default()
    };
    let gateway = Gateway::start(&options);
    block_on(async {
        let post = |body: Vec<u8>| {
            client()
                .post(gateway.url("/v1/chat/completions"))
                .bearer_auth(API_KEY)
                .header("content-type", "application/json")
                .body(body)
                .send()
        };

        // Malformed JSON.
        let (status, body) = error_of(post(b"{\"messages\": [".to_vec()).await.unwrap()).await;
        assert_eq!(status, 400);
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "invalid_json");

        // A bad field names its param.
        let request = chat_body("hi", json!({"temperature": "hot"}));
        let (status, body) =
            error_of(post(serde_json::to_vec(&request).unwrap()).await.unwrap()).await;
        assert_eq!(
            (status, body["error"]["param"].as_str()),
            (400, Some("temperature"))
        );

        // What the engine cannot honour is refused, not ignored.
        let request = chat_body("hi", json!({"audio": {"voice": "alloy", "format": "wav"}}));
        let (status, body) =
            error_of(post(serde_json::to_vec(&request).unwrap()).await.unwrap()).await;
        assert_eq!(status, 400);
        assert_eq!(body["error"]["code"], "unsupported_parameter");
        assert_eq!(body["error"]["param"], "audio");

        // Unknown model.
        let request = chat_body("hi", json!({"model": "gpt-unknown"}));
        let response = post(serde_json::to_vec(&request).unwrap()).await.unwrap();
        assert_eq!(response.headers()["x-isthmus-route"], "rejected");
        assert_eq!(response.headers()["x-isthmus-rule"], "default");
        let (status, body) = error_of(response).await;
        assert_eq!(status, 404);
        assert_eq!(body["error"]["code"], "model_not_found");

        // A prompt longer than the context.
        let long_prompt = "tell me a story about a lighthouse keeper ".repeat(60);
        let request = chat_body(&long_prompt, json!({}));
        let (status, body) =
            error_of(post(serde_json::to_vec(&request).unwrap()).await.unwrap()).await;
        assert_eq!(status, 400);
        assert_eq!(body["error"]["code"], "context_length_exceeded");
        assert!(
            body["error"]["message"].as_str().unwrap().contains("256"),
            "{body}"
        );
        // Prompt plus max_tokens over the context is refused the same way.
        let request = chat_body("hi", json!({"max_tokens": 300}));
        let (status, body) =
            error_of(post(serde_json::to_vec(&request).unwrap()).await.unwrap()).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("context_length_exceeded"))
        );

        // Prompts that certainly cannot fit are refused before they are tokenized: more
        // messages than the context has tokens, more text than its tokens can spell.
        let mut request = chat_body("hi", json!({}));
        request["messages"] = json!(
            (0..300)
                .map(|turn| json!({"role": if turn % 2 == 0 { "user" } else { "assistant" }, "content": "a"}))
                .collect::<Vec<_>>()
        );
        let too_much = chat_body(&"a ".repeat(12 * 1024), json!({}));
        for (request, says) in [(request, "300 messages"), (too_much, "bytes of text")] {
            let (status, body) =
                error_of(post(serde_json::to_vec(&request).unwrap()).await.unwrap()).await;
            assert_eq!(status, 400, "{body}");
            assert_eq!(body["error"]["code"], "context_length_exceeded", "{body}");
            assert_eq!(body["error"]["param"], "messages", "{body}");
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.contains(says) && message.contains("256"), "{body}");
        }

        // A body over the limit, declared up front and streamed without a length.
        let huge = chat_body(&"x".repeat(100 * 1024), json!({}));
        let (status, body) =
            error_of(post(serde_json::to_vec(&huge).unwrap()).await.unwrap()).await;
        assert_eq!(status, 413);
        assert_eq!(body["error"]["code"], "request_too_large");
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
            (0..40).map(|_| Ok(vec![b' '; 4096])).collect();
        let response = client()
            .post(gateway.url("/v1/chat/completions"))
            .bearer_auth(API_KEY)
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                chunks,
            )))
            .send()
            .await
            .unwrap();
        let (status, _) = error_of(response).await;
        assert_eq!(status, 413);

        // A compressed body is refused by name, not read as bad JSON.
        let response = client()
            .post(gateway.url("/v1/chat/completions"))
            .bearer_auth(API_KEY)
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(vec![0x1f, 0x8b, 0x08, 0x00])
            .send()
            .await
            .unwrap();
        let (status, body) = error_of(response).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (415, Some("unsupported_content_encoding"))
        );
        assert!(
            body["error"]["message"].as_str().unwrap().contains("gzip"),
            "{body}"
        );
        let identity = client()
            .post(gateway.url("/v1/chat/completions"))
            .bearer_auth(API_KEY)
            .header("content-encoding", "identity")
            .json(&chat_body("Say hi", json!({"max_tokens": 1})))
            .send()
            .await
            .unwrap();
        assert_eq!(identity.status(), 200);

        // Missing and wrong keys.
        let response = client()
            .post(gateway.url("/v1/chat/completions"))
            .json(&chat_body("hi", json!({})))
            .send()
            .await
            .unwrap();
        let (status, body) = error_of(response).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (401, Some("invalid_api_key"))
        );
        let response = client()
            .post(gateway.url("/v1/chat/completions"))
            .bearer_auth("wrong-key")
            .json(&chat_body("hi", json!({})))
            .send()
            .await
            .unwrap();
        assert_eq!(error_of(response).await.0, 401);
        // Two keys: neither is checked, whichever comes first.
        let response = client()
            .post(gateway.url("/v1/chat/completions"))
            .header("authorization", "Bearer wrong-key")
            .header("authorization", format!("Bearer {API_KEY}"))
            .json(&chat_body("hi", json!({})))
            .send()
            .await
            .unwrap();
        let (status, body) = error_of(response).await;
        assert_eq!(status, 401);
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("more than one API key presented"),
            "{body}"
        );

        // Unknown path and wrong method.
        let response = client()
            .post(gateway.url("/v1/assistants"))
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(error_of(response).await.0, 404);
        let response = client()
            .get(gateway.url("/v1/chat/completions"))
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(response.headers()["allow"], "POST");
        assert_eq!(error_of(response).await.0, 405);

        // HEAD is answered as GET without content, on HTTP/2 (where content on it is a
        // protocol error) and on one HTTP/1.1 connection (where it would misframe the next
        // response).
        let http1 = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(
                reqwest::Certificate::from_pem(tests::TestPki::shared().ca_pem.as_bytes()).unwrap(),
            )
            .http1_only()
            .pool_max_idle_per_host(1)
            .build()
            .unwrap();
        for (client, version) in [
            (client(), reqwest::Version::HTTP_2),
            (http1, reqwest::Version::HTTP_11),
        ] {
            let get = client
                .get(gateway.url("/v1/models"))
                .bearer_auth(API_KEY)
                .send()
                .await
                .unwrap();
            assert_eq!(get.version(), version);
            let get_length = get.bytes().await.unwrap().len();
            let head = client
                .head(gateway.url("/v1/models"))
                .bearer_auth(API_KEY)
                .send()
                .await
                .unwrap();
            assert_eq!(head.status(), 200, "{version:?}");
            assert_eq!(
                head.headers()["content-length"],
                get_length.to_string().as_str()
            );
            assert!(head.bytes().await.unwrap().is_empty());
            let refused = client
                .head(gateway.url("/v1/chat/completions"))
                .bearer_auth(API_KEY)
                .send()
                .await
                .unwrap();
            assert_eq!(refused.status(), 405, "{version:?}");
            assert_eq!(refused.headers()["allow"], "POST");
            assert!(refused.bytes().await.unwrap().is_empty());
            let after = client
                .get(gateway.url("/v1/models"))
                .bearer_auth(API_KEY)
                .send()
                .await
                .unwrap();
            assert_eq!(
                after.bytes().await.unwrap().len(),
                get_length,
                "{version:?}"
            );
        }

        // `Expect: 100-continue` on HTTP/1.1: the interim answer comes before the body is
        // sent (curl waits a second for it above 1 MB), and not to a caller it would refuse.
        // The body is larger than a header may be: its bytes must not be taken for the
        // next request's header once the interim answer is out.
        let padding = "x".repeat(40 * 1024);
        let body = serde_json::to_vec(&chat_body(
            "Say hi",
            json!({"max_tokens": 2, "metadata": {"padding": padding}}),
        ))
        .unwrap();
        let head = |key: &str| {
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\n\
                 authorization: Bearer {key}\r\ncontent-type: application/json\r\n\
                 expect: 100-continue\r\ncontent-length: {}\r\n\r\n",
                body.len()
            )
        };
        let mut stream = tls_http1(gateway.data).await;
        stream.write_all(head(API_KEY).as_bytes()).await.unwrap();
        let interim = read_head(&mut stream).await;
        assert!(
            interim.starts_with("HTTP/1.1 100 Continue\r\n"),
            "{interim}"
        );
        stream.write_all(&body).await.unwrap();
        let answer = read_head(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        let mut stream = tls_http1(gateway.data).await;
        stream
            .write_all(head("wrong-key").as_bytes())
            .await
            .unwrap();
        let refused = read_head(&mut stream).await;
        assert!(refused.starts_with("HTTP/1.1 401 "), "{refused}");
        // Its body never came (or may come late): the connection ends with the answer, so
        // that a next request cannot be taken for it.
        assert!(
            refused
                .to_ascii_lowercase()
                .contains("\r\nconnection: close\r\n"),
            "{refused}"
        );

        // A chunked body that cannot be framed gets an answer that says so, not a silent
        // close.
        let mut stream = tls_http1(gateway.data).await;
        stream
            .write_all(
                format!(
                    "POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\n\
                     authorization: Bearer {API_KEY}\r\ncontent-type: application/json\r\n\
                     transfer-encoding: chunked\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n"
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        let malformed = read_head(&mut stream).await;
        assert!(malformed.starts_with("HTTP/1.1 400 "), "{malformed}");
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.ok();
        let rest = String::from_utf8_lossy(&rest);
        assert!(
            rest.contains("chunked transfer coding is malformed"),
            "{rest}"
        );

        // An HTTP/1.1 request without a Host header, or with two, is malformed (RFC 9112):
        // Pingora refuses two itself (with an empty 400), the gateway a missing one.
        for hosts in ["", "host: localhost\r\nhost: evil.example\r\n"] {
            let mut stream = tls_http1(gateway.data).await;
            stream
                .write_all(
                    format!(
                        "GET /v1/models HTTP/1.1\r\n{hosts}authorization: Bearer {API_KEY}\r\n\
                         connection: close\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .await
                .unwrap();
            let refused = read_head(&mut stream).await;
            assert!(refused.starts_with("HTTP/1.1 400 "), "{hosts:?}: {refused}");
            if hosts.is_empty() {
                let mut rest = Vec::new();
                stream.read_to_end(&mut rest).await.ok();
                let rest = String::from_utf8_lossy(&rest);
                assert!(rest.contains("exactly one Host header"), "{refused}{rest}");
            }
        }

        // The header cap (16 KiB here) holds on HTTP/2 too, where h2 answers 431 itself.
        let response = client()
            .get(gateway.url("/v1/models"))
            .bearer_auth(API_KEY)
            .header("x-padding", "a".repeat(20 * 1024))
            .send()
            .await
            .unwrap();
        assert_eq!(
            (response.version(), response.status().as_u16()),
            (reqwest::Version::HTTP_2, 431)
        );

        // After all that, a good request is still answered.
        let response =
            post(serde_json::to_vec(&chat_body("Say hi", json!({"max_tokens": 3}))).unwrap())
                .await
                .unwrap();
        assert_eq!(response.status(), 200);
    });
    let metrics = gateway.metrics();
    for line in [
        "isthmus_requests_total{route=\"rejected\",status=\"400\"}",
        "isthmus_requests_total{route=\"rejected\",status=\"401\"} 4",
        "isthmus_requests_total{route=\"rejected\",status=\"404\"} 2",
        "isthmus_requests_total{route=\"rejected\",status=\"413\"} 2",
        "isthmus_requests_total{route=\"rejected\",status=\"415\"} 1",
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }
}

#[test]
fn browser_origins_get_cors_answers_only_where_configured() {
    let _serial = serial();
    let options = GatewayOptions {
        extra: "[cors]\nallow_origins = [\"https://chat.contoso.com\"]\n".to_owned(),
        ..GatewayOptions::default()
    };
    let gateway = Gateway::start(&options);
    let allowed = "https://chat.contoso.com";
    let preflight = |origin: &str, method: &str, path: &str, headers: &str| {
        client()
            .request(reqwest::Method::OPTIONS, gateway.url(path))
            .header("origin", origin)
            .header("access-control-request-method", method)
            .header("access-control-request-headers", headers)
            .send()
    };
    block_on(async {
        // A preflight needs no key: browsers send none with it.
        let answer = preflight(
            allowed,
            "POST",
            "/v1/chat/completions",
            "authorization,Content-Type,x-stainless-os",
        )
        .await
        .unwrap();
        assert_eq!(answer.status(), 204);
        let headers = answer.headers();
        assert_eq!(headers["access-control-allow-origin"], allowed);
        assert_eq!(headers["access-control-allow-methods"], "POST");
        assert_eq!(
            headers["access-control-allow-headers"],
            "authorization, content-type, x-stainless-os"
        );
        assert_eq!(headers["access-control-max-age"], "600");
        assert!(
            headers["vary"].to_str().unwrap().contains("Origin"),
            "{headers:?}"
        );
        let answer = preflight(allowed, "GET", "/v1/models", "authorization")
            .await
            .unwrap();
        assert_eq!(answer.status(), 204);
        assert_eq!(
            answer.headers()["access-control-allow-methods"],
            "GET, HEAD"
        );
        // A method the path does not take, and a header no OpenAI client sends.
        let answer = preflight(allowed, "DELETE", "/v1/chat/completions", "")
            .await
            .unwrap();
        assert_eq!(answer.status(), 405);
        let (status, body) = error_of(
            preflight(allowed, "POST", "/v1/chat/completions", "x-forwarded-host")
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(
            (status, body["error"]["param"].as_str()),
            (400, Some("access-control-request-headers"))
        );

        // The request itself, and its errors, say the origin may read them.
        let post = |origin: &str, key: &str| {
            client()
                .post(gateway.url("/v1/chat/completions"))
                .header("origin", origin)
                .bearer_auth(key)
                .json(&chat_body("Say hi", json!({"max_tokens": 2})))
                .send()
        };
        let answer = post(allowed, API_KEY).await.unwrap();
        assert_eq!(answer.status(), 200);
        assert_eq!(answer.headers()["access-control-allow-origin"], allowed);
        assert!(
            answer.headers()["access-control-expose-headers"]
                .to_str()
                .unwrap()
                .contains("x-request-id")
        );
        let answer = post(allowed, "wrong-key").await.unwrap();
        assert_eq!(answer.headers()["access-control-allow-origin"], allowed);
        assert_eq!(error_of(answer).await.0, 401);

        // Another origin is refused before anything runs, preflight or not.
        for answer in [
            preflight("https://evil.example", "POST", "/v1/chat/completions", "")
                .await
                .unwrap(),
            post("https://evil.example", API_KEY).await.unwrap(),
        ] {
            assert!(!answer.headers().contains_key("access-control-allow-origin"));
            let (status, body) = error_of(answer).await;
            assert_eq!(
                (status, body["error"]["code"].as_str()),
                (403, Some("origin_not_allowed"))
            );
        }
        // Clients that are not browsers send no Origin and are served as ever.
        let answer = client()
            .post(gateway.url("/v1/chat/completions"))
            .bearer_auth(API_KEY)
            .json(&chat_body("Say hi", json!({"max_tokens": 2})))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        assert!(!answer.headers().contains_key("access-control-allow-origin"));
    });
    let metrics = gateway.metrics();
    assert!(
        metrics.contains("isthmus_requests_total{route=\"preflight\",status=\"204\"} 2"),
        "{metrics}"
    );

    // `[cors]` takes part in the hot reload: without origins, OPTIONS is a method no path
    // takes.
    let config_path = gateway.dir.path().join("isthmus.toml");
    let text = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(
        &config_path,
        text.replace("allow_origins = [\"https://chat.contoso.com\"]", ""),
    )
    .unwrap();
    let reloaded = crate::cloud::admin_post(&gateway, "/admin/api/reload");
    assert_eq!(reloaded["reloaded"], true, "{reloaded}");
    block_on(async {
        let answer = preflight(allowed, "POST", "/v1/chat/completions", "")
            .await
            .unwrap();
        assert!(!answer.headers().contains_key("access-control-allow-origin"));
        assert_eq!(error_of(answer).await.0, 405);
    });
}
