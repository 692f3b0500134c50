//! Reading answers, and what a probe refuses before it connects.

use std::net::SocketAddr;
use std::time::Duration;

use super::{Credentials, ProbeAnswer, ProbeError, parse_answer, probe};

#[test]
fn answers_give_their_status_and_body() {
    assert_eq!(
        parse_answer("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
        Ok(ProbeAnswer {
            status: 200,
            body: "ok".into()
        })
    );
    assert_eq!(
        parse_answer("HTTP/1.1 503 Service Unavailable\r\n\r\nloading models\n"),
        Ok(ProbeAnswer {
            status: 503,
            body: "loading models".into()
        })
    );
    for bad in [
        "",
        "SSH-2.0-OpenSSH",
        "HTTP/1.1 abc",
        "HTTP/2 200",
        "HTTP/1.1 999 x",
    ] {
        assert!(
            matches!(parse_answer(bad), Err(ProbeError::Answer(_))),
            "{bad:?}"
        );
    }
}

#[test]
fn only_loopback_and_plain_paths_are_probed() {
    let timeout = Duration::from_millis(100);
    let remote: SocketAddr = "10.0.0.1:9090".parse().unwrap();
    assert_eq!(
        probe(remote, "/readyz", false, timeout, &Credentials::default()),
        Err(ProbeError::NotLoopback(remote))
    );
    let local: SocketAddr = "127.0.0.1:9".parse().unwrap();
    for path in ["readyz", "/readyz HTTP/1.0\r\nX: y", "/a b"] {
        assert_eq!(
            probe(local, path, true, timeout, &Credentials::default()),
            Err(ProbeError::Path(path.to_owned()))
        );
    }
}

#[test]
fn nobody_listening_is_an_error_naming_the_address() {
    // Bind, learn the port, close: nothing listens there now.
    let address = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let error = probe(
        address,
        "/healthz",
        false,
        Duration::from_secs(2),
        &Credentials::default(),
    )
    .unwrap_err();
    assert!(
        matches!(&error, ProbeError::Io { address: named, .. } if *named == address),
        "{error}"
    );
}

#[test]
fn credentials_name_the_variable_or_file_that_failed() {
    // A variable no test environment sets.
    let unset = "ISTHMUS_PROBE_TEST_UNSET_TOKEN";
    assert_eq!(
        Credentials::load(Some(unset), None).unwrap_err(),
        ProbeError::Token(unset.to_owned())
    );
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let error = Credentials::load(None, Some(&missing)).unwrap_err();
    assert!(
        matches!(&error, ProbeError::Certificate { path, .. } if path == &missing),
        "{error}"
    );
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let error = Credentials::load(None, Some(&empty)).unwrap_err();
    assert!(
        error.to_string().contains("no PEM certificate in the file"),
        "{error}"
    );
    let none = Credentials::load(None, None).unwrap();
    assert!(none.token.is_none() && none.certificate.is_none());
}
