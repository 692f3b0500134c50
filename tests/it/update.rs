//! Signed updates end to end, on the unpacked Debian package: a key made by `isthmus update
//! keygen`, a bundle packed from the package's own tree, applied into slot `a`, started the
//! way the unit starts it (`update boot`, then `current/bin/isthmus serve`, then `update
//! commit` once ready) and serving a chat answer; then a broken update that never starts,
//! rolled back by the fourth `boot` to the slot that worked; and bundles refused for their
//! signer or a changed byte.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tests::{Gateway, scratch_dir, serial, workspace_root};

use crate::package::{package, packaged_config, place_model, run, say_hi};

/// `isthmus update ...` with the factory binary, on the test's firmware directory and factory.
struct Appliance {
    factory: PathBuf,
    firmware: PathBuf,
    keys: PathBuf,
}

impl Appliance {
    fn update(&self, arguments: &[&str]) -> Output {
        Command::new(self.factory.join("bin/isthmus"))
            .arg("update")
            .args(arguments)
            .output()
            .unwrap()
    }

    /// A command that acts on the slots (`apply`, `boot`, `commit`, `status`, ...).
    fn slots(&self, arguments: &[&str]) -> Output {
        let mut all: Vec<&str> = arguments.to_vec();
        all.extend([
            "--firmware-dir",
            self.firmware.to_str().unwrap(),
            "--factory-root",
            self.factory.to_str().unwrap(),
        ]);
        self.update(&all)
    }

    fn apply(&self, bundle: &Path) -> Output {
        self.slots(&[
            "apply",
            bundle.to_str().unwrap(),
            "--keys",
            self.keys.to_str().unwrap(),
        ])
    }

    fn current(&self) -> PathBuf {
        self.firmware.join("current")
    }

    fn status(&self) -> serde_json::Value {
        let output = self.slots(&["status"]);
        assert!(output.status.success(), "{output:?}");
        serde_json::from_slice(&output.stdout).unwrap()
    }
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn failure(output: &Output) -> String {
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_signed_update_runs_on_trial_and_a_broken_one_rolls_back_by_itself() {
    let _serial = serial();
    let work = scratch_dir();
    let root = work.path().join("root");
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&package().deb)
        .arg(&root));
    let appliance = Appliance {
        factory: root.join("usr"),
        firmware: root.join("var/lib/isthmus-firmware"),
        keys: root.join("etc/isthmus-update/keys"),
    };
    std::fs::create_dir_all(&appliance.keys).unwrap();
    let signer = work.path().join("release");
    stdout(&appliance.update(&["keygen", "--out", signer.to_str().unwrap()]));
    std::fs::copy(
        signer.with_extension("pub"),
        appliance.keys.join("release.pub"),
    )
    .unwrap();
    let private_mode = std::fs::metadata(signer.with_extension("key"))
        .unwrap()
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&private_mode) & 0o777,
        0o600
    );

    // The release: the package's own tree under a new version.
    let bundle = work.path().join("isthmus-9.9.9.update");
    let packed = stdout(&appliance.update(&[
        "pack",
        "--root",
        appliance.factory.to_str().unwrap(),
        "--version",
        "9.9.9",
        "--key",
        signer.with_extension("key").to_str().unwrap(),
        "--out",
        bundle.to_str().unwrap(),
    ]));
    assert!(packed.contains("version 9.9.9"), "{packed}");
    let verified = stdout(&appliance.update(&[
        "verify",
        bundle.to_str().unwrap(),
        "--keys",
        appliance.keys.to_str().unwrap(),
    ]));
    assert!(verified.contains(": ok, version 9.9.9"), "{verified}");

    // Before any update the unit's boot step points `current` at the factory slot.
    assert!(stdout(&appliance.slots(&["boot"])).contains("running slot factory"));
    assert_eq!(
        std::fs::read_link(appliance.current()).unwrap(),
        appliance.factory
    );
    let applied = stdout(&appliance.apply(&bundle));
    assert!(applied.contains("into slot a"), "{applied}");
    assert!(stdout(&appliance.slots(&["boot"])).contains("on trial, start 1 of 3"));

    // The gateway as the unit runs it: from `current`, with the slot's own libraries and
    // backend modules.
    let config = configure(&root);
    let binary = appliance.current().join("bin/isthmus");
    let gateway = Gateway::start_program(&binary, scratch_dir(), &config, |command| {
        command.args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]);
    });
    let running = std::fs::read_link(format!("/proc/{}/exe", gateway.child.id())).unwrap();
    assert_eq!(
        running,
        appliance.firmware.join("slots/a/bin/isthmus"),
        "the gateway runs from slot a"
    );
    assert!(
        gateway.log().contains(&format!(
            "\"backends_dir\":\"{}\"",
            appliance
                .firmware
                .join("slots/a/bin/../lib/isthmus/backends")
                .display()
        )),
        "{}",
        gateway.log()
    );
    let ca_pem = std::fs::read_to_string(root.join("var/lib/isthmus/tls/ca.pem")).unwrap();
    say_hi(
        &tests::client_trusting(&ca_pem),
        &gateway.url("/v1/chat/completions"),
        Some("package-test-key"),
    );
    // The unit's commit waits, watching the gateway's process (systemd passes $MAINPID and
    // waits for the step rather than stopping it): a gateway that exits first leaves the
    // slot on trial, and the step ends at once instead of at the end of its wait.
    let mut short_lived = tests::kill_with_parent(Command::new("sleep").arg("600"))
        .spawn()
        .unwrap();
    let mut waiting =
        tests::kill_with_parent(&mut Command::new(appliance.factory.join("bin/isthmus")))
            .args(["update", "commit", "--after-seconds", "600", "--main-pid"])
            .arg(short_lived.id().to_string())
            .arg("--firmware-dir")
            .arg(&appliance.firmware)
            .arg("--factory-root")
            .arg(&appliance.factory)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
    let mut lines = std::io::BufReader::new(waiting.stdout.take().unwrap());
    let mut announced = String::new();
    std::io::BufRead::read_line(&mut lines, &mut announced).unwrap();
    assert!(
        announced.contains("slot a on trial: committing it if the gateway still runs in 600 s"),
        "{announced}"
    );
    short_lived.kill().unwrap();
    short_lived.wait().unwrap();
    let mut ended = String::new();
    std::io::BufRead::read_line(&mut lines, &mut ended).unwrap();
    assert!(
        ended.contains("exited before its slot was committed: slot a stays on trial"),
        "{ended}"
    );
    assert!(waiting.wait().unwrap().success());
    assert_eq!(appliance.status()["trial"]["slot"], "a");
    // While the gateway runs through the wait, the slot is committed.
    let committed = stdout(&appliance.slots(&[
        "commit",
        "--after-seconds",
        "1",
        "--main-pid",
        &gateway.child.id().to_string(),
    ]));
    assert!(
        committed.contains("committed a (9.9.9) after 1 start(s)"),
        "{committed}"
    );
    drop(gateway);

    // Bundles that must not install: another signer, one changed byte.
    let stranger = work.path().join("stranger");
    stdout(&appliance.update(&["keygen", "--out", stranger.to_str().unwrap()]));
    let forged = work.path().join("forged.update");
    stdout(&appliance.update(&[
        "pack",
        "--root",
        appliance.factory.to_str().unwrap(),
        "--version",
        "6.6.6",
        "--key",
        stranger.with_extension("key").to_str().unwrap(),
        "--out",
        forged.to_str().unwrap(),
    ]));
    let refused = failure(&appliance.apply(&forged));
    assert!(
        refused.contains("does not verify with any trusted key"),
        "{refused}"
    );
    let mut bytes = std::fs::read(&bundle).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    let tampered = work.path().join("tampered.update");
    std::fs::write(&tampered, bytes).unwrap();
    let refused = failure(&appliance.apply(&tampered));
    assert!(refused.contains("does not match its SHA-256"), "{refused}");
    // Keys or slots the service's group could change are not trusted with a root step.
    let set_mode = |path: &Path, mode: u32| {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    set_mode(&appliance.keys, 0o775);
    let refused = failure(&appliance.apply(&bundle));
    assert!(
        refused.contains(&format!(
            "{}: writable by group or others (mode 0775): only root",
            appliance.keys.display()
        )),
        "{refused}"
    );
    set_mode(&appliance.keys, 0o755);
    set_mode(&appliance.firmware, 0o775);
    let refused = failure(&appliance.slots(&["boot"]));
    assert!(
        refused.contains(&format!(
            "{}: writable by group or others",
            appliance.firmware.display()
        )),
        "{refused}"
    );
    set_mode(&appliance.firmware, 0o755);
    assert_eq!(appliance.status()["active"], "a");

    // A signed release older than the committed one: refused as a downgrade.
    let older = work.path().join("isthmus-9.0.0.update");
    stdout(&appliance.update(&[
        "pack",
        "--root",
        appliance.factory.to_str().unwrap(),
        "--version",
        "9.0.0",
        "--key",
        signer.with_extension("key").to_str().unwrap(),
        "--out",
        older.to_str().unwrap(),
    ]));
    let refused = failure(&appliance.apply(&older));
    assert!(
        refused.contains("version 9.0.0 is below 9.9.9") && refused.contains("--allow-downgrade"),
        "{refused}"
    );
    let status = appliance.status();
    assert_eq!(status["version_floor"], "9.9.9", "{status}");
    assert_eq!(status["active"], "a");

    // A signed release that cannot start: its trial uses up three starts, the fourth runs
    // slot a again.
    let broken_root = work.path().join("broken");
    copy_tree(&appliance.factory, &broken_root);
    std::fs::write(
        broken_root.join("bin/isthmus"),
        "#!/bin/sh\necho 'this build cannot start' >&2\nexit 1\n",
    )
    .unwrap();
    let broken = work.path().join("isthmus-10.0.0.update");
    stdout(&appliance.update(&[
        "pack",
        "--root",
        broken_root.to_str().unwrap(),
        "--version",
        "10.0.0",
        "--key",
        signer.with_extension("key").to_str().unwrap(),
        "--out",
        broken.to_str().unwrap(),
    ]));
    assert!(stdout(&appliance.apply(&broken)).contains("into slot b"));
    let pending = failure(&appliance.apply(&bundle));
    assert!(pending.contains("slot b is on trial"), "{pending}");
    for start in 1..=3 {
        let boot = stdout(&appliance.slots(&["boot"]));
        assert!(
            boot.contains(&format!("on trial, start {start} of 3")),
            "{boot}"
        );
        let started = Command::new(appliance.current().join("bin/isthmus"))
            .args(["serve", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(!started.status.success());
    }
    let boot = appliance.slots(&["boot"]);
    assert!(boot.status.success(), "{boot:?}");
    let warning = String::from_utf8_lossy(&boot.stderr);
    assert!(
        warning.contains("rolled back from b (10.0.0) to a: not ready after 3 starts"),
        "{warning}"
    );
    let status = appliance.status();
    assert_eq!(status["active"], "a");
    assert_eq!(status["trial"], serde_json::Value::Null);
    assert_eq!(
        status["current"],
        appliance.firmware.join("slots/a").display().to_string()
    );
    // Slot a still serves.
    run(Command::new(appliance.current().join("bin/isthmus"))
        .arg("check-config")
        .arg(&config));
    // The unit is wired to these steps.
    let unit =
        std::fs::read_to_string(workspace_root().join("deploy/systemd/isthmus.service")).unwrap();
    assert!(unit.contains(
        "ExecStartPost=+/usr/bin/isthmus update commit --after-seconds 60 --main-pid $MAINPID"
    ));
}

/// The packaged configuration under `root`, with the model in place.
fn configure(root: &Path) -> PathBuf {
    let config = packaged_config(root);
    place_model(root);
    config
}

/// `cp -a`: files, links and modes.
fn copy_tree(from: &Path, to: &Path) {
    run(Command::new("cp").arg("-a").arg(from).arg(to));
}
