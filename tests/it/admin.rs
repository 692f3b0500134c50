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
        let refused = reqwest::Client::new()
            .get(format!("{plain}/healthz"))
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
        }
    });
    drop(child);
}
