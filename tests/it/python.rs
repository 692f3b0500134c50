//! The official `openai` Python package against a gateway that provisioned its own
//! certificate, verified with Python's strict X.509 checks.

use std::path::PathBuf;
use std::process::Command;

use tests::{API_KEY, Gateway, GatewayOptions, serial, workspace_root};

/// The Python with `openai` installed: `ISTHMUS_TEST_PYTHON`, else the one `scripts/test`
/// prepares.
fn python() -> PathBuf {
    if let Ok(python) = std::env::var("ISTHMUS_TEST_PYTHON") {
        return PathBuf::from(python);
    }
    let candidates = [
        PathBuf::from("/var/cache/isthmus/venv/bin/python"),
        workspace_root().join(".venv/bin/python"),
    ];
    candidates
        .into_iter()
        .find(|candidate| {
            Command::new(candidate)
                .args(["-c", "import openai"])
                .output()
                .is_ok_and(|output| output.status.success())
        })
        .expect("no Python with the openai package: run scripts/test, or set ISTHMUS_TEST_PYTHON")
}

#[test]
fn the_openai_python_package_talks_to_a_self_provisioned_gateway() {
    let python = python();
    let _serial = serial();
    let options = GatewayOptions {
        test_certificate: false,
        extra: "[responses]\nstore = true\n".to_owned(),
        ..GatewayOptions::default()
    };
    let gateway = Gateway::start(&options);
    let ca_file = gateway.dir.path().join("state/tls/ca.pem");
    assert!(
        ca_file.is_file(),
        "the gateway did not provision {}",
        ca_file.display()
    );
    let output = Command::new(python)
        .arg(workspace_root().join("tests/python/openai_client.py"))
        .env("ISTHMUS_CA_FILE", &ca_file)
        .env(
            "ISTHMUS_BASE_URL",
            format!("https://localhost:{}/v1", gateway.data.port()),
        )
        .env("ISTHMUS_API_KEY", API_KEY)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "python client failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.starts_with("ok: "), "{stdout}");
}
