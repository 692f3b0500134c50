//! What happens around requests: clients that leave, slow or oversized headers, certificate
//! reloads, and draining on SIGTERM.

use std::io::{Read, Write};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tests::{API_KEY, Gateway, GatewayOptions, TestPki, client, eventually, serial};

use crate::{block_on, chat_body, sse_payloads};

/// A generation that would run for minutes unless cancelled: no end-of-text, a long context.
fn endless_stream_body() -> Value {
    chat_body(
        "Write a very long story.",
        json!({"stream": true, "ignore_eos": true, "max_tokens": 7000}),
    )
}

/// Reads the response until `count` SSE events arrived, then drops it.
async fn read_events(response: reqwest::Response, count: usize) {
    let mut seen = 0;
    let mut stream = response.bytes_stream();
    while seen < count {
        let bytes = stream.next().await.unwrap().unwrap();
        seen += String::from_utf8_lossy(&bytes).matches("data: ").count();
    }
}

#[test]
fn a_client_that_disconnects_mid_stream_frees_its_sequence() {
    let _serial = serial();
    let options = GatewayOptions {
        context_tokens: 8192,
        parallel_sequences: 1,
        ..GatewayOptions::default()
    };
    let gateway = Gateway::start(&options);
    let active = || gateway.metric("isthmus_local_active_sequences{model=\"smollm2\"}");
    let mut answered_tokens = 0.0;
    for http1 in [true, false] {
        block_on(async {
            let mut builder = reqwest::Client::builder()
                .tls_built_in_root_certs(false)
                .add_root_certificate(
                    reqwest::Certificate::from_pem(TestPki::shared().ca_pem.as_bytes()).unwrap(),
                );
            if http1 {
                builder = builder.http1_only();
            }
            let leaving = builder.build().unwrap();
            let response = leaving
                .post(gateway.url("/v1/chat/completions"))
                .bearer_auth(API_KEY)
                .json(&endless_stream_body())
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            read_events(response, 5).await;
            // HTTP/1.1: the connection closes; HTTP/2: the stream is reset.
            drop(leaving);
        });
        // Left alone, that generation would run for minutes; cancelled, its sequence is freed
        // at the worker's next step.
        assert!(
            eventually(Duration::from_secs(20), || active() == Some(0.0)),
            "sequence still active after the client left (http1={http1}); metrics:\n{}",
            gateway.metrics()
        );
        // With one sequence, the next request can only run if the slot was freed.
        block_on(async {
            let response = client()
                .post(gateway.url("/v1/chat/completions"))
                .bearer_auth(API_KEY)
                .json(&chat_body("Say hello.", json!({"max_tokens": 4})))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let answer: Value = response.json().await.unwrap();
            answered_tokens += answer["usage"]["completion_tokens"].as_f64().unwrap();
        });
    }
    assert!(
        gateway
            .metrics()
            .contains("isthmus_requests_total{route=\"local\",status=\"200\"} 4")
    );
    // The streams cut short are charged what they generated: at least the four tokens each
    // delivered after its role chunk.
    let charged = gateway
        .metric("isthmus_completion_tokens_total{route=\"local\"}")
        .unwrap();
    assert!(
        charged >= answered_tokens + 8.0,
        "{charged} completion tokens counted, {answered_tokens} of them answered whole"
    );
}

/// A gateway with a plain-HTTP data listener beside the TLS one, and that listener's address.
fn with_plain_listener(options: &GatewayOptions) -> (Gateway, std::net::SocketAddr) {
    let dir = tests::scratch_dir();
    let config = tests::config_text(options, dir.path()).replace(
        "admin_listen = \"127.0.0.1:0\"",
        "admin_listen = \"127.0.0.1:0\"\nplain_listen = \"127.0.0.1:0\"",
    );
    let config_path = dir.path().join("isthmus.toml");
    std::fs::write(&config_path, config).unwrap();
    let gateway = Gateway::start_with_config(dir, &config_path);
    let plain = gateway.plain.expect("plain-http listener announced");
    (gateway, plain)
}

#[test]
fn slow_and_oversized_headers_are_cut_off() {
    let _serial = serial();
    let options = GatewayOptions {
        header_read_timeout_ms: 300,
        header_bytes_max: 4096,
        keepalive_timeout_ms: 1_000,
        body_read_timeout_ms: 1_000,
        ..GatewayOptions::default()
    };
    // Plain TCP to the admin listener and to a plain-HTTP data listener, which apply the
    // same header limits as the TLS one.
    let (gateway, plain) = with_plain_listener(&options);
    for (address, path) in [(gateway.admin, "/healthz"), (plain, "/v1/models")] {
        let connect = || {
            let stream = std::net::TcpStream::connect(address).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            stream
        };
        // A client that starts a request and never finishes its header is disconnected.
        let mut slow = connect();
        write!(slow, "GET {path} HTTP/1.1\r\nHost: localhost\r\n").unwrap();
        let mut buffer = Vec::new();
        let read = slow.read_to_end(&mut buffer);
        assert!(
            read.is_ok() && buffer.is_empty(),
            "{path}: expected a silent close, got {read:?} {buffer:?}"
        );
        // A header larger than the limit is refused with 431 and an error body, before any
        // of it is parsed. The client may see a reset after the answer (the rest of its
        // header is never read), so what it read up to then is what counts.
        let mut large = connect();
        let padding = "a".repeat(8192);
        let _ = write!(
            large,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nX-Padding: {padding}\r\n\r\n"
        );
        let mut response = Vec::new();
        let _ = large.read_to_end(&mut response);
        let response = String::from_utf8_lossy(&response);
        assert!(
            response.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{path}: {response}"
        );
        assert!(
            response.ends_with(
                r#"{"error":{"message":"request header is larger than the limit of 4096 bytes","type":"invalid_request_error","param":null,"code":"request_header_too_large"}}"#
            ),
            "{path}: {response}"
        );
        // A prompt client is still served.
        let mut good = connect();
        write!(
            good,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {API_KEY}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        good.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{path}: {response}");
    }
    // Without admin tokens (on loopback) the admin API answers only requests for a loopback
    // host from pages of one: not a name rebound to 127.0.0.1, not a cross-site form.
    for (request, problem) in [
        (
            "GET /admin/api/config HTTP/1.1\r\nHost: rebound.example:9090\r\n",
            "not `rebound.example:9090`",
        ),
        (
            "POST /admin/api/reload HTTP/1.1\r\nHost: 127.0.0.1\r\n\
             Origin: https://forms.example\r\nContent-Length: 0\r\n",
            "not origin `https://forms.example`",
        ),
    ] {
        let mut stream = std::net::TcpStream::connect(gateway.admin).unwrap();
        write!(stream, "{request}Connection: close\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(
            response.starts_with("HTTP/1.1 403") && response.contains(problem),
            "{response}"
        );
    }
    // A request refused before its body was read (no credentials here): the body is read and
    // dropped, not taken for the next request's header, and the connection serves that one.
    let mut reused = std::net::TcpStream::connect(plain).unwrap();
    reused
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let body = format!(
        r#"{{"model": "gpt-4o-mini", "padding": "{}"}}"#,
        "x".repeat(100_000)
    );
    let _ = write!(
        reused,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}\
         GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    let mut answers = String::new();
    let _ = reused.read_to_string(&mut answers);
    let statuses: Vec<&str> = answers
        .match_indices("HTTP/1.1 ")
        .map(|(at, _)| &answers[at..at + 12])
        .collect();
    assert_eq!(statuses, ["HTTP/1.1 401", "HTTP/1.1 200"], "{answers}");
    // An HTTP/2 connection whose client never sends its preface is closed at the header
    // deadline too (the server does not wait for ever, holding a connection slot).
    let (mut connection, mut socket) = tls_connection(gateway.data, &[b"h2"]);
    connection.complete_io(&mut socket).unwrap();
    assert_eq!(connection.alpn_protocol(), Some(&b"h2"[..]));
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buffer = Vec::new();
    let read = rustls::Stream::new(&mut connection, &mut socket).read_to_end(&mut buffer);
    if let Err(error) = &read {
        assert!(
            !matches!(
                error.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "the connection was still open after 10 s: {error}"
        );
    }
    // A kept-alive connection left idle after its answer (here a 401: no key needed) is
    // closed at the keep-alive timeout, not held for ever.
    let mut idle = std::net::TcpStream::connect(plain).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(idle, "GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let read = idle.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        read.is_ok()
            && answer.starts_with("HTTP/1.1 401")
            && !answer.to_ascii_lowercase().contains("connection: close"),
        "expected a kept-alive 401 and then a close, got {read:?} {answer}"
    );
    // A refused request whose body trickles in is answered and closed at the header
    // deadline: the body of a request refused unread is not waited for longer.
    let mut trickle = std::net::TcpStream::connect(plain).unwrap();
    trickle
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        trickle,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: 1000\r\n\r\n{{\"model\""
    )
    .unwrap();
    let mut answer = Vec::new();
    let read = trickle.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        read.is_ok() && answer.starts_with("HTTP/1.1 401"),
        "expected a 401 and a close, got {read:?} {answer}"
    );
    // A caller with a key that trickles its body a byte at a time, each within the read
    // timeout, is cut off once the whole body is late (here after about a second).
    let trickling = std::net::TcpStream::connect(plain).unwrap();
    trickling
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut writer = trickling.try_clone().unwrap();
    write!(
        writer,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )
    .unwrap();
    let trickle = std::thread::spawn(move || {
        for _ in 0..150 {
            if writer.write_all(b" ").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let mut answer = Vec::new();
    let read = (&trickling).read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        read.is_ok()
            && answer.starts_with("HTTP/1.1 408")
            && answer.contains("not received in time"),
        "expected a 408 for a late body and a close, got {read:?} {answer}"
    );
    let _ = trickling.shutdown(std::net::Shutdown::Both);
    trickle.join().unwrap();
    // The data plane's refusals are counted (the admin listener's are not its traffic).
    let metrics = gateway.metrics();
    for line in [
        "isthmus_connections_refused_total{reason=\"header_too_large\"} 1",
        "isthmus_connections_refused_total{reason=\"header_timeout\"} 2",
        "isthmus_connections_refused_total{reason=\"tls_handshake\"} 0",
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }
}

#[test]
fn sighup_and_file_changes_reload_the_certificate() {
    let _serial = serial();
    let dir = tests::scratch_dir();
    let pki = TestPki::shared();
    // The gateway gets its own copy of the certificate files, so the test can replace them.
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::copy(&pki.cert_path, &cert).unwrap();
    std::fs::copy(&pki.key_path, &key).unwrap();
    let options = GatewayOptions {
        test_certificate: false,
        extra: String::new(),
        ..GatewayOptions::default()
    };
    let config = tests::config_text(&options, dir.path()).replace(
        "[server.limits]",
        &format!("[server.tls]\ncert = {cert:?}\nkey = {key:?}\nreload_interval_ms = 100\n\n[server.limits]"),
    );
    let config_path = dir.path().join("isthmus.toml");
    std::fs::write(&config_path, config).unwrap();
    let gateway = Gateway::start_with_config(dir, &config_path);
    let served_name = || served_certificate_common_name(gateway.data);
    assert_eq!(served_name(), "localhost");

    // A changed file is picked up by the watcher.
    let (new_cert, new_key) = pki.issue_server_cert("rotated-by-file");
    std::fs::write(&key, new_key).unwrap();
    std::fs::write(&cert, new_cert).unwrap();
    assert!(eventually(Duration::from_secs(10), || served_name()
        == "rotated-by-file"));

    // SIGHUP reloads at once; a broken file keeps the previous certificate. The signal's
    // own refusal is awaited (the watcher's says otherwise): the signal did reload.
    std::fs::write(&cert, "not a certificate").unwrap();
    gateway.signal(libc::SIGHUP);
    assert!(eventually(Duration::from_secs(10), || gateway
        .log()
        .contains("SIGHUP: TLS certificate not reloaded")));
    assert_eq!(served_name(), "rotated-by-file");
    let (new_cert, new_key) = pki.issue_server_cert("rotated-by-sighup");
    std::fs::write(&key, new_key).unwrap();
    std::fs::write(&cert, new_cert).unwrap();
    gateway.signal(libc::SIGHUP);
    assert!(eventually(Duration::from_secs(10), || served_name()
        == "rotated-by-sighup"));
    assert!(gateway.log().contains("TLS certificate reloaded"));
}

/// A TLS client connection to `address`, handshake not yet done.
fn tls_connection(
    address: std::net::SocketAddr,
    alpn: &[&[u8]],
) -> (rustls::ClientConnection, std::net::TcpStream) {
    use rustls::pki_types::ServerName;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        rustls_pki_types::CertificateDer::pem_slice_iter(TestPki::shared().ca_pem.as_bytes())
    {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    let connection = rustls::ClientConnection::new(
        std::sync::Arc::new(config),
        ServerName::try_from("localhost").unwrap(),
    )
    .unwrap();
    let socket = std::net::TcpStream::connect(address).unwrap();
    (connection, socket)
}

/// Connects with TLS and returns the common name of the certificate the server presents.
fn served_certificate_common_name(address: std::net::SocketAddr) -> String {
    let (mut connection, mut socket) = tls_connection(address, &[]);
    connection.complete_io(&mut socket).unwrap();
    let certificate = connection.peer_certificates().unwrap()[0].clone();
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate.as_ref()).unwrap();
    let common_name = parsed.subject().iter_common_name().next().unwrap();
    common_name.as_str().unwrap().to_owned()
}

#[test]
fn sigterm_lets_a_running_stream_finish_and_refuses_new_connections() {
    let _serial = serial();
    // One worker thread: the gateway runs on a current-thread runtime, where stopping the
    // inference threads must not block the runtime's only thread.
    let dir = tests::scratch_dir();
    let config_path = dir.path().join("isthmus.toml");
    // A drain long enough for the 150 tokens on a loaded machine: the test is about the
    // stream finishing, not about how fast.
    let options = GatewayOptions {
        drain_timeout_ms: 300_000,
        ..GatewayOptions::default()
    };
    let config = tests::config_text(&options, dir.path())
        .replace("[server]\n", "[server]\nworker_threads = 1\n");
    std::fs::write(&config_path, config).unwrap();
    let mut gateway = Gateway::start_with_config(dir, &config_path);
    let data = gateway.data;
    let body = chat_body(
        "Tell me about the ocean.",
        json!({"stream": true, "ignore_eos": true, "max_tokens": 150}),
    );
    let text = block_on(async {
        // A client with an idle kept-alive HTTP/1.1 connection, from an earlier request
        // (HTTP/2 connections are told to go away by Pingora itself).
        let idle = tests::client_http1();
        let models = idle
            .get(gateway.url("/v1/models"))
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(models.status(), 200);
        let _ = models.bytes().await.unwrap();
        let response = client()
            .post(gateway.url("/v1/chat/completions"))
            .bearer_auth(API_KEY)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut stream = response.bytes_stream();
        let mut text = String::new();
        // Once tokens flow, ask the gateway to stop.
        while text.matches("data: ").count() < 3 {
            text.push_str(&String::from_utf8_lossy(
                &stream.next().await.unwrap().unwrap(),
            ));
        }
        gateway.signal(libc::SIGTERM);
        // New connections are refused while the stream still runs.
        assert!(
            eventually(Duration::from_secs(10), || std::net::TcpStream::connect(
                data
            )
            .is_err()),
            "the data listener still accepts after SIGTERM"
        );
        // Idle kept-alive connections are closed too: no new request starts during the
        // drain (nor one just as the process exits).
        let late = idle
            .get(gateway.url("/v1/models"))
            .bearer_auth(API_KEY)
            .send()
            .await;
        assert!(
            late.is_err(),
            "a request on a kept-alive connection was served after SIGTERM: {late:?}"
        );
        while let Some(bytes) = stream.next().await {
            text.push_str(&String::from_utf8_lossy(&bytes.unwrap()));
        }
        text
    });
    let payloads = sse_payloads(&text);
    assert_eq!(
        payloads.last().map(String::as_str),
        Some("[DONE]"),
        "stream cut short:\n{text}"
    );
    let finish: Vec<Value> = payloads
        .iter()
        .filter(|payload| *payload != "[DONE]")
        .map(|payload| serde_json::from_str(payload).unwrap())
        .filter(|chunk: &Value| !chunk["choices"][0]["finish_reason"].is_null())
        .collect();
    assert_eq!(finish.len(), 1);
    assert_eq!(finish[0]["choices"][0]["finish_reason"], "length");
    let status = gateway
        .wait_exit(Duration::from_secs(20))
        .expect("gateway did not exit after draining");
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        gateway.log()
    );
    assert!(gateway.log().contains("drained; exiting"));
}

#[test]
fn the_plain_http_listener_is_off_unless_configured_and_warns_when_on() {
    let _serial = serial();
    let gateway = Gateway::start(&GatewayOptions::default());
    assert!(gateway.plain.is_none());
    drop(gateway);
    let (gateway, plain) = with_plain_listener(&GatewayOptions::default());
    assert!(gateway.log().contains("PLAIN-HTTP DATA LISTENER ENABLED"));
    let status = block_on(async {
        reqwest::Client::new()
            .post(format!("http://{plain}/v1/chat/completions"))
            .bearer_auth(API_KEY)
            .json(&chat_body("Hi", json!({"max_tokens": 2})))
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(status, 200);
}

#[test]
fn connections_beyond_the_limit_wait_until_one_closes() {
    let _serial = serial();
    let options = GatewayOptions {
        connections_max: 2,
        ..GatewayOptions::default()
    };
    let gateway = Gateway::start(&options);
    let open = || gateway.metric("isthmus_open_connections");
    let mut held = Vec::new();
    for _ in 0..2 {
        let (mut connection, mut socket) = tls_connection(gateway.data, &[]);
        connection.complete_io(&mut socket).unwrap();
        held.push((connection, socket));
    }
    assert!(eventually(Duration::from_secs(10), || open() == Some(2.0)));
    // The third client gets a TCP connection from the kernel's backlog, but the gateway does
    // not accept it while two are open.
    let address = gateway.data;
    let (done_sender, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut connection, mut socket) = tls_connection(address, &[]);
        socket
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let result = connection.complete_io(&mut socket).map(|_| ());
        let _ = done_sender.send(result.is_ok());
    });
    let waited = done.recv_timeout(Duration::from_millis(750));
    assert!(
        waited.is_err(),
        "third connection was served beyond the limit"
    );
    assert_eq!(open(), Some(2.0));
    // Closing one lets the third through.
    drop(held.pop());
    assert_eq!(done.recv_timeout(Duration::from_secs(20)), Ok(true));
}

#[test]
fn an_idle_listener_holds_no_connection_slot_another_listener_needs() {
    // One slot, shared by the TLS and the plain-HTTP listener: a plain request is served
    // while no TLS client is connected (a listener that held the slot while it waited for a
    // connection stranded it).
    let _serial = serial();
    let dir = tests::scratch_dir();
    let config_path = dir.path().join("isthmus.toml");
    let options = GatewayOptions {
        connections_max: 1,
        ..GatewayOptions::default()
    };
    let text = tests::config_text(&options, dir.path()).replacen(
        "[server]\n",
        "[server]\nplain_listen = \"127.0.0.1:0\"\n",
        1,
    );
    std::fs::write(&config_path, text).unwrap();
    let gateway = Gateway::start_with_config(dir, &config_path);
    let plain = gateway.plain.expect("a plain listener");
    for _ in 0..3 {
        let (status, _) = tests::plain_get(plain, "/v1/models").unwrap();
        assert_eq!(status, 401);
    }
}

#[test]
fn a_body_that_stops_arriving_is_refused_after_the_body_read_timeout() {
    let _serial = serial();
    let options = GatewayOptions {
        body_read_timeout_ms: 300,
        ..GatewayOptions::default()
    };
    let gateway = Gateway::start(&options);
    let (connection, socket) = tls_connection(gateway.data, &[]);
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut stream = rustls::StreamOwned::new(connection, socket);
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {API_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"messages\": ["
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.flush().unwrap();
    // The rest of the body never comes.
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(
        response.contains("\"code\":\"request_timeout\""),
        "{response}"
    );
    assert!(response.contains("not received in time"), "{response}");
}

/// Datagrams from the gateway to a stand-in for systemd's notification socket.
struct NotifySocket {
    socket: std::os::unix::net::UnixDatagram,
    received: Vec<String>,
}

impl NotifySocket {
    fn bind(path: &std::path::Path) -> NotifySocket {
        let socket = std::os::unix::net::UnixDatagram::bind(path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        NotifySocket {
            socket,
            received: Vec::new(),
        }
    }

    /// Receives until a datagram contains `line`, up to `deadline`; returns every datagram
    /// received on the way, that one last.
    fn until(&mut self, line: &str, deadline: Duration) -> Vec<String> {
        let until = std::time::Instant::now() + deadline;
        let mut seen = Vec::new();
        let mut buffer = vec![0_u8; 4096];
        while std::time::Instant::now() < until {
            let Ok(length) = self.socket.recv(&mut buffer) else {
                continue;
            };
            let datagram = String::from_utf8(buffer[..length].to_vec()).unwrap();
            self.received.push(datagram.clone());
            let found = datagram.lines().any(|candidate| candidate == line);
            seen.push(datagram);
            if found {
                return seen;
            }
        }
        panic!("no `{line}` within {deadline:?}; received: {seen:?}");
    }
}

/// The datagrams that say more than `WATCHDOG=1`.
fn state_changes(datagrams: &[String]) -> Vec<&str> {
    datagrams
        .iter()
        .map(String::as_str)
        .filter(|datagram| *datagram != "WATCHDOG=1\n")
        .collect()
}

#[test]
fn systemd_hears_ready_after_loading_reloads_the_watchdog_and_stopping() {
    let _serial = serial();
    let dir = tests::scratch_dir();
    let socket_path = dir.path().join("notify");
    let mut notify = NotifySocket::bind(&socket_path);
    let config_path = dir.path().join("isthmus.toml");
    std::fs::write(
        &config_path,
        tests::config_text(&GatewayOptions::default(), dir.path()),
    )
    .unwrap();
    let mut gateway = tests::Gateway::start_with_command(dir, &config_path, |command| {
        command
            .env("NOTIFY_SOCKET", &socket_path)
            .env("WATCHDOG_USEC", "300000");
    });

    // Listeners first, with the model still loading; READY=1 only once it is loaded.
    let started = notify.until("READY=1", Duration::from_secs(60));
    let changes = state_changes(&started);
    assert_eq!(changes.len(), 2, "{started:?}");
    assert_eq!(
        changes[0],
        "STATUS=loading 1 local model(s); listeners bound\n"
    );
    assert_eq!(
        changes[1],
        "READY=1\nSTATUS=ready; 1 local model(s), 0 cloud pool(s)\n"
    );
    assert_eq!(tests::plain_get(gateway.admin, "/readyz").unwrap().0, 200);

    // WatchdogSec=300ms: a ping every 150 ms while the runtime turns.
    let pings_before = notify.received.len();
    notify.until("WATCHDOG=1", Duration::from_secs(5));
    notify.until("WATCHDOG=1", Duration::from_secs(5));
    assert!(notify.received.len() >= pings_before + 2);

    gateway.signal(libc::SIGHUP);
    let reload = notify.until("READY=1", Duration::from_secs(30));
    assert_eq!(
        state_changes(&reload),
        [
            "RELOADING=1\nSTATUS=reloading the configuration\n",
            "READY=1\nSTATUS=configuration reloaded; 1 local model(s), 0 cloud pool(s)\n",
        ]
    );

    gateway.signal(libc::SIGTERM);
    let stop = notify.until("STOPPING=1", Duration::from_secs(30));
    assert_eq!(
        state_changes(&stop),
        ["STOPPING=1\nSTATUS=draining in-flight requests\n"]
    );
    let status = gateway
        .wait_exit(Duration::from_secs(60))
        .expect("gateway did not exit after SIGTERM");
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_malformed_notify_socket_stops_start_up_with_a_message_naming_it() {
    let (_dir, config_path) = tests::config_file(&GatewayOptions::default());
    let output = std::process::Command::new(tests::isthmus_binary())
        .args(["serve", "--config"])
        .arg(&config_path)
        .env("NOTIFY_SOCKET", "relative/notify")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("NOTIFY_SOCKET")
            && stderr.contains("`relative/notify` is neither an absolute path"),
        "{stderr}"
    );
}

#[test]
fn a_backend_module_llama_cpp_would_load_unchecked_stops_start_up() {
    // GGML_BACKEND_PATH makes llama.cpp load the module it names, past the source check:
    // refused, and the gateway stops as after any failed model load (exit status 1), not
    // hanging and not serving without its model.
    let _serial = serial();
    let (dir, config_path) = tests::config_file(&GatewayOptions::default());
    let output = std::process::Command::new(tests::isthmus_binary())
        .args(["serve", "--config"])
        .arg(&config_path)
        .env("GGML_BACKEND_PATH", dir.path().join("libggml-evil.so"))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let log = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    assert!(log.contains("GGML_BACKEND_PATH is set"), "{log}");
    assert!(
        log.contains("draining in-flight requests") || log.contains("audit"),
        "{log}"
    );
}

#[test]
fn listen_addresses_given_on_the_command_line_are_checked_and_stay_through_a_reload() {
    let _serial = serial();
    let dir = tests::scratch_dir();
    let config_path = dir.path().join("isthmus.toml");
    // The file's data plane on a port that is never bound: the command line's is used.
    let text = tests::config_text(&GatewayOptions::default(), dir.path()).replacen(
        "listen = \"127.0.0.1:0\"",
        "listen = \"127.0.0.1:1\"",
        1,
    );
    std::fs::write(&config_path, &text).unwrap();

    // An admin listener moved off loopback by the command line needs tokens as in the file.
    let refused = std::process::Command::new(tests::isthmus_binary())
        .args(["serve", "--config"])
        .arg(&config_path)
        .args(["--admin-listen", "192.0.2.1:9090"])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains(
            "server.admin_tokens: required when server.admin_listen (192.0.2.1:9090) is not a \
             loopback address"
        ) && stderr.contains("(--admin-listen)"),
        "{stderr}"
    );

    let gateway = Gateway::start_with_command(dir, &config_path, |command| {
        command.args(["--listen", "127.0.0.1:0"]);
    });
    assert_ne!(gateway.data.port(), 1);
    // A reload of the unchanged file keeps the command line's address and asks for no restart.
    let reloaded = crate::cloud::admin_post(&gateway, "/admin/api/reload");
    assert_eq!(reloaded["reloaded"], true, "{reloaded}");
    assert_eq!(reloaded["restart_required"], json!([]), "{reloaded}");
}

#[test]
fn a_reload_routes_to_the_models_loaded_until_a_restart_loads_the_files_models() {
    let _serial = serial();
    let gateway = Gateway::start(&GatewayOptions::default());
    let config_path = gateway.dir.path().join("isthmus.toml");
    let text = std::fs::read_to_string(&config_path).unwrap();
    let other = format!("\n[models.other]\npath = {:?}\n", tests::model_path());

    // A model added in the file and made the default cannot be routed to before a restart
    // loads it: the reload is refused, saying so.
    std::fs::write(
        &config_path,
        format!("{text}{other}\n[routing]\ndefault_model = \"other\"\n"),
    )
    .unwrap();
    let refused = crate::cloud::admin_post(&gateway, "/admin/api/reload");
    assert_eq!(refused["reloaded"], false, "{refused}");
    assert!(
        refused["errors"].to_string().contains(
            "models: [models] changed; the policy is checked against the models loaded at start-up"
        ),
        "{refused}"
    );

    // Added alone, it waits for the restart, and routing goes on over the models loaded.
    std::fs::write(&config_path, format!("{text}{other}")).unwrap();
    let reloaded = crate::cloud::admin_post(&gateway, "/admin/api/reload");
    assert_eq!(reloaded["reloaded"], true, "{reloaded}");
    assert_eq!(
        reloaded["restart_required"],
        json!(["models"]),
        "{reloaded}"
    );
    assert!(
        gateway
            .metrics()
            .contains("isthmus_config_restart_required{section=\"models\"} 1")
    );
    block_on(async {
        for (model, status) in [("smollm2", 200), ("other", 404)] {
            let response = crate::post_json(
                &gateway,
                "/v1/chat/completions",
                &chat_body("Say hi.", json!({"model": model, "max_tokens": 2})),
            )
            .await;
            assert_eq!(response.status(), status, "{model}");
        }
    });
}
