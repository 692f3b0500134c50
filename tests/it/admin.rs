//! The admin listener off loopback: TLS with the gateway's certificate and a bearer token on
//! every endpoint, `/metrics` and the probes included.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tests::{GatewayOptions, serial};

use crate::block_on;

const ADMIN_TOKEN: &str = "admin-secret-token";

/// Kills the gateway when the test ends, however it ends.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn off_loopback_the_admin_api_needs_tls_and_a_token() {
    let _serial = serial();
    let dir = tests::scratch_dir();
    let config_path = dir.path().join("isthmus.toml");
    let text = tests::config_text(&GatewayOptions::default(), dir.path()).replace(
        "admin_listen = \"127.0.0.1:0\"",
        &format!(
            "admin_listen = \"0.0.0.0:0\"\nadmin_tokens = [{{ id = \"ops\", sha256 = \"{}\" }}]",
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
                ADMIN_TOKEN.as_bytes()
            ))
        ),
    );
    std::fs::write(&config_path, text).unwrap();
    let mut child = Running(
        Command::new(tests::isthmus_binary())
            .args(["serve", "--config"])
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.path().join("gateway.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let mut admin_url = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        let announcement: serde_json::Value = serde_json::from_str(&line).unwrap();
        if announcement["listening"] == "admin" {
            admin_url = announcement["url"].as_str().map(str::to_owned);
        }
        if announcement["listening"] == "data" {
            break;
        }
    }
    let admin_url = admin_url.unwrap().replace("0.0.0.0", "127.0.0.1");
    assert!(admin_url.starts_with("https://"), "{admin_url}");
    block_on(async {
        let client = tests::client();
        // Plain HTTP is not served there.
        let plain = admin_url.replace("https://", "http://");
        // (With the token: a plain answer would be 200, not the 401 a missing token gets.)
        let refused = reqwest::Client::new()
            .get(format!("{plain}/healthz"))
            .bearer_auth(ADMIN_TOKEN)
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        assert!(refused.map_or(true, |response| !response.status().is_success()));
        let deadline = Instant::now() + tests::START_DEADLINE;
        loop {
            let response = client
                .get(format!("{admin_url}/readyz"))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await;
            if response.is_ok_and(|response| response.status() == 200) {
                break;
            }
            assert!(Instant::now() < deadline, "never ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for path in ["/metrics", "/healthz", "/admin/api/models"] {
            let anonymous = client
                .get(format!("{admin_url}{path}"))
                .send()
                .await
                .unwrap();
            assert_eq!(anonymous.status(), 401, "{path}");
            let wrong = client
                .get(format!("{admin_url}{path}"))
                .bearer_auth("nope")
                .send()
                .await
                .unwrap();
            assert_eq!(wrong.status(), 401, "{path}");
            let good = client
                .get(format!("{admin_url}{path}"))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .unwrap();
            assert_eq!(good.status(), 200, "{path}");
            if path.starts_with("/admin/api/") {
                assert_eq!(good.headers()["cache-control"], "no-store", "{path}");
            }
            // HEAD is GET without the content, on HTTP/2 too (content there would be a
            // protocol error).
            let head = client
                .head(format!("{admin_url}{path}"))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .unwrap();
            assert_eq!(
                (head.version(), head.status().as_u16()),
                (reqwest::Version::HTTP_2, 200),
                "{path}"
            );
            assert!(head.headers().contains_key("content-length"), "{path}");
            assert!(head.bytes().await.unwrap().is_empty(), "{path}");
        }
        // A known path with the wrong method gets 405 and `Allow`; an unknown one 404.
        for (method, path, allow) in [
            (reqwest::Method::POST, "/metrics", Some("GET, HEAD")),
            (reqwest::Method::GET, "/admin/api/reload", Some("POST")),
            (
                reqwest::Method::DELETE,
                "/admin/api/config",
                Some("GET, HEAD, PUT"),
            ),
            (
                reqwest::Method::GET,
                "/admin/api/upstreams/cloud/backends/a",
                Some("PUT"),
            ),
            (reqwest::Method::POST, "/admin/api/nothing", None),
        ] {
            let response = client
                .request(method.clone(), format!("{admin_url}{path}"))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let allowed = response
                .headers()
                .get("allow")
                .map(|value| value.to_str().unwrap().to_owned());
            let body: serde_json::Value = response.json().await.unwrap();
            match allow {
                Some(allow) => {
                    assert_eq!((status, allowed.as_deref()), (405, Some(allow)), "{path}");
                    assert_eq!(body["error"]["code"], "method_not_allowed", "{path}");
                }
                None => assert_eq!(
                    (status, body["error"]["code"].as_str()),
                    (404, Some("unknown_url"))
                ),
            }
        }
    });

    // `isthmus probe` over loopback, as a pod's exec probe: the token from the environment,
    // TLS pinned to the certificate the gateway serves.
    let admin = admin_url.trim_start_matches("https://");
    let pki = tests::TestPki::shared();
    let probe = |token: Option<&str>, certificate: Option<&std::path::Path>| {
        let mut command = Command::new(tests::isthmus_binary());
        command.args(["probe", "--admin", admin]);
        if let Some(token) = token {
            command
                .args(["--token-env", "ISTHMUS_TEST_ADMIN_TOKEN"])
                .env("ISTHMUS_TEST_ADMIN_TOKEN", token);
        }
        if let Some(certificate) = certificate {
            command.arg("--tls-cert").arg(certificate);
        }
        let output = command.arg("/readyz").output().unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, stderr) = probe(Some(ADMIN_TOKEN), Some(&pki.cert_path));
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stderr) = probe(Some("nope"), Some(&pki.cert_path));
    assert!(
        code == Some(1) && stderr.contains("answered 401"),
        "{stderr}"
    );
    let (code, stderr) = probe(None, Some(&pki.cert_path));
    assert!(
        code == Some(1) && stderr.contains("answered 401"),
        "{stderr}"
    );
    // Another certificate than the one served: the token is never sent.
    let (code, stderr) = probe(Some(ADMIN_TOKEN), Some(&pki.ca_path));
    assert!(
        code == Some(1) && stderr.contains("another certificate than the --tls-cert file's"),
        "{stderr}"
    );
    // Plain HTTP to a TLS listener gets no 200.
    let (code, _) = probe(Some(ADMIN_TOKEN), None);
    assert_eq!(code, Some(1));

    // A rotated token takes effect with a reload, which asks for no restart for it.
    let digest =
        |token: &str| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(token.as_bytes()));
    let rotated = "rotated-admin-token";
    let text = std::fs::read_to_string(&config_path)
        .unwrap()
        .replace(&digest(ADMIN_TOKEN), &digest(rotated));
    std::fs::write(&config_path, text).unwrap();
    block_on(async {
        let client = tests::client();
        let report: serde_json::Value = client
            .post(format!("{admin_url}/admin/api/reload"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(report["reloaded"], true, "{report}");
        assert_eq!(
            report["restart_required"],
            serde_json::json!([]),
            "{report}"
        );
        for (token, status) in [(ADMIN_TOKEN, 401), (rotated, 200)] {
            let response = client
                .get(format!("{admin_url}/healthz"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), status, "{token}");
        }
    });
    drop(child);
}
