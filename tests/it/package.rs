//! The appliance install: `deploy/systemd/isthmus.service` passes `systemd-analyze verify`
//! and its offline security review, and `deploy/debian/build-deb` makes a package whose
//! unpacked tree is a gateway that serves from its own layout (libraries through the run path,
//! CPU backend modules from `/usr/lib/isthmus/backends`, not from the build tree), with the
//! shipped configuration, the unit, and maintainer scripts that parse.
//!
//! Installing the package for real (`dpkg -i` creates a system user) is not done here; the
//! README's "Install on an appliance" is that procedure.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::{Value, json};
use tests::{Gateway, isthmus_binary, scratch_dir, serial, workspace_root};

use crate::block_on;

/// What `systemd-analyze security --offline` may score the unit at most (0 is fully locked
/// down, 10 fully exposed; below 4 systemd calls it "OK"). The unit scores 2.1: what is left
/// is the network access a gateway needs and the devices a GPU needs.
const UNIT_EXPOSURE_MAX: f64 = 3.0;

pub(crate) fn run(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("cannot run {command:?}: {error}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn systemd_analyze() -> Command {
    let program = "systemd-analyze";
    assert!(
        Command::new(program).arg("--version").output().is_ok(),
        "systemd-analyze is missing: run scripts/test as root, or apt-get install -y systemd"
    );
    Command::new(program)
}

/// The unit with `/usr/bin/isthmus` pointing at `binary`, so that `verify` finds an
/// executable where the package would install one.
fn unit_for(binary: &Path, dir: &Path, unit_text: &str) -> PathBuf {
    let path = dir.join("isthmus.service");
    std::fs::write(
        &path,
        unit_text
            .replace(
                "/var/lib/isthmus-firmware/current/bin/isthmus",
                binary.to_str().unwrap(),
            )
            .replace("/usr/bin/isthmus", binary.to_str().unwrap()),
    )
    .unwrap();
    path
}

#[test]
fn the_systemd_unit_verifies_and_is_locked_down() {
    let unit_text =
        std::fs::read_to_string(workspace_root().join("deploy/systemd/isthmus.service")).unwrap();
    // What the gateway's notifications, reload and drain rely on.
    for line in [
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30s",
        // The running slot (see `update.rs`), started and confirmed by the factory binary.
        "ExecStartPre=+/usr/bin/isthmus update boot",
        "ExecStartPre=/var/lib/isthmus-firmware/current/bin/isthmus check-config /etc/isthmus/isthmus.toml",
        "ExecStart=/var/lib/isthmus-firmware/current/bin/isthmus serve --config /etc/isthmus/isthmus.toml",
        "ExecStartPost=+/usr/bin/isthmus update commit --after-seconds 60 --main-pid $MAINPID",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "TimeoutStopSec=90s",
        "StateDirectory=isthmus",
        "User=isthmus",
    ] {
        assert!(
            unit_text.lines().any(|candidate| candidate == line),
            "the unit lacks `{line}`"
        );
    }
    let dir = scratch_dir();
    let unit = unit_for(isthmus_binary(), dir.path(), &unit_text);
    let verified = run(systemd_analyze().arg("verify").arg(&unit));
    // `verify` exits 0 on unknown keys and only warns: any output is a problem.
    assert_eq!(
        String::from_utf8_lossy(&verified.stderr),
        "",
        "systemd-analyze verify warned"
    );
    // That check is real: a misspelt key in the same unit is reported.
    let misspelt = dir.path().join("misspelt");
    std::fs::create_dir(&misspelt).unwrap();
    let broken = unit_for(
        isthmus_binary(),
        &misspelt,
        &unit_text.replace("WatchdogSec=", "WatchdogSecs="),
    );
    let warned = run(systemd_analyze().arg("verify").arg(&broken));
    assert!(
        String::from_utf8_lossy(&warned.stderr).contains("Unknown key 'WatchdogSecs'"),
        "{}",
        String::from_utf8_lossy(&warned.stderr)
    );

    let review = run(systemd_analyze()
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit));
    let text = String::from_utf8_lossy(&review.stdout);
    let exposure: f64 = text
        .lines()
        .find_map(|line| {
            line.split("Overall exposure level for isthmus.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure level in:\n{text}"));
    assert!(
        exposure <= UNIT_EXPOSURE_MAX,
        "exposure {exposure} > {UNIT_EXPOSURE_MAX}:\n{text}"
    );
}

/// `dpkg-deb --field` of the package.
fn field(deb: &Path, name: &str) -> String {
    let output = run(Command::new("dpkg-deb").arg("--field").arg(deb).arg(name));
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// The package built once from the test build of `isthmus`, shared by the tests here.
pub(crate) struct Package {
    pub(crate) deb: PathBuf,
    build_info: Value,
    _dir: tempfile::TempDir,
}

pub(crate) fn package() -> &'static Package {
    static PACKAGE: OnceLock<Package> = OnceLock::new();
    PACKAGE.get_or_init(|| {
        let dir = scratch_dir();
        let binary = isthmus_binary();
        let build_info: Value =
            serde_json::from_slice(&run(Command::new(binary).arg("build-info")).stdout).unwrap();
        // Uncompressed: the tests are about what is inside, and xz takes a while.
        let built = run(
            Command::new(workspace_root().join("deploy/debian/build-deb"))
                .arg("--binary")
                .arg(binary)
                .arg("--out")
                .arg(dir.path())
                .args(["--compression", "none"]),
        );
        Package {
            deb: PathBuf::from(String::from_utf8_lossy(&built.stdout).trim()),
            build_info,
            _dir: dir,
        }
    })
}

#[test]
fn the_package_unpacks_into_a_gateway_that_serves_from_its_own_layout() {
    let _serial = serial();
    let work = scratch_dir();
    let Package {
        deb, build_info, ..
    } = package();
    let version = build_info["version"].as_str().unwrap();
    assert_eq!(
        deb.file_name().unwrap().to_str().unwrap(),
        format!("isthmus_{version}_amd64.deb")
    );
    assert_eq!(field(deb, "Package"), "isthmus");
    assert_eq!(field(deb, "Version"), version);
    assert_eq!(field(deb, "Architecture"), "amd64");
    let depends = field(deb, "Depends");
    // OpenMP: the CPU backend modules use it; dpkg-shlibdeps finds it, a fixed list would not.
    for dependency in [
        "libc6 (>= 2.",
        "libstdc++6 (>= ",
        "libgomp1 (>= ",
        "adduser",
    ] {
        assert!(depends.contains(dependency), "Depends: {depends}");
    }

    let root = work.path().join("root");
    let control = work.path().join("control");
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root));
    run(Command::new("dpkg-deb").arg("-e").arg(deb).arg(&control));
    assert_eq!(
        std::fs::read_to_string(control.join("conffiles")).unwrap(),
        "/etc/isthmus/isthmus.toml\n"
    );
    for script in ["postinst", "prerm", "postrm"] {
        run(Command::new("sh").arg("-n").arg(control.join(script)));
    }
    assert_eq!(
        std::fs::read(root.join("lib/systemd/system/isthmus.service")).unwrap(),
        std::fs::read(workspace_root().join("deploy/systemd/isthmus.service")).unwrap()
    );
    assert_eq!(
        std::fs::read(root.join("etc/isthmus/isthmus.toml")).unwrap(),
        std::fs::read(workspace_root().join("deploy/debian/isthmus.toml")).unwrap()
    );
    // Every CPU backend module the binary was built with, byte for byte.
    let modules = build_info["cpu_backend_modules"].as_array().unwrap();
    assert!(!modules.is_empty());
    for module in modules {
        let file = module["file"].as_str().unwrap();
        let bytes = std::fs::read(root.join("usr/lib/isthmus/backends").join(file))
            .unwrap_or_else(|error| panic!("{file}: {error}"));
        use sha2::Digest;
        assert_eq!(
            hex::encode(sha2::Sha256::digest(&bytes)),
            module["sha256"].as_str().unwrap(),
            "{file}"
        );
    }

    let packaged = root.join("usr/bin/isthmus");
    let config = packaged_config(&root);
    // Before a model is in place, check-config (the unit's ExecStartPre) says what is missing.
    let missing = Command::new(&packaged)
        .arg("check-config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("models.local.path: file not found"),
        "{stderr}"
    );
    place_model(&root);
    run(Command::new(&packaged).arg("check-config").arg(&config));

    let gateway = Gateway::start_program(&packaged, work, &config, |command| {
        command.args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]);
    });
    let backends = root.join("usr/bin/../lib/isthmus/backends");
    assert!(
        gateway
            .log()
            .contains(&format!("\"backends_dir\":\"{}\"", backends.display())),
        "the packaged gateway did not load its own backend modules; log:\n{}",
        gateway.log()
    );
    let ca_pem = std::fs::read_to_string(root.join("var/lib/isthmus/tls/ca.pem")).unwrap();
    let body = say_hi(
        &tests::client_trusting(&ca_pem),
        &gateway.url("/v1/chat/completions"),
        Some("package-test-key"),
    );
    assert_eq!(body["usage"]["completion_tokens"], 4);
    // The admin API wants the package's admin token, even from this machine.
    let mut anonymous = std::net::TcpStream::connect(gateway.admin).unwrap();
    anonymous
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    std::io::Write::write_all(
        &mut anonymous,
        b"GET /admin/api/config HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut anonymous, &mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
}

/// The shipped configuration of the package unpacked at `root`, its absolute paths moved
/// under `root`, and its API key (`package-test-key`) and admin token (the harness's
/// [`tests::ADMIN_TOKEN`]) written.
pub(crate) fn packaged_config(root: &Path) -> PathBuf {
    let text = std::fs::read_to_string(root.join("etc/isthmus/isthmus.toml"))
        .unwrap()
        .replace("/etc/isthmus", root.join("etc/isthmus").to_str().unwrap())
        .replace(
            "/var/lib/isthmus",
            root.join("var/lib/isthmus").to_str().unwrap(),
        );
    let config = root.join("etc/isthmus/isthmus.test.toml");
    std::fs::write(&config, text).unwrap();
    std::fs::write(root.join("etc/isthmus/api-key"), "package-test-key").unwrap();
    std::fs::write(root.join("etc/isthmus/admin-token"), tests::ADMIN_TOKEN).unwrap();
    config
}

/// The test model where the packaged configuration expects it.
pub(crate) fn place_model(root: &Path) {
    let models = root.join("var/lib/isthmus/models");
    std::fs::create_dir_all(&models).unwrap();
    std::os::unix::fs::symlink(tests::model_path(), models.join("model.gguf")).unwrap();
}

/// A short chat request to the configurations' `local` model (alias `gpt-4o-mini`) with
/// `api_key` (none: anonymous): the answer, after checking that it is a 200 from that model.
pub(crate) fn say_hi(client: &reqwest::Client, url: &str, api_key: Option<&str>) -> Value {
    let (status, body) = block_on(async {
        let mut request = client.post(url);
        if let Some(api_key) = api_key {
            request = request.bearer_auth(api_key);
        }
        let response = request
            .json(&json!({
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": "Say hi."}],
                "max_tokens": 4,
                // Exactly four tokens: no end of text before them, whatever the model says.
                "temperature": 0,
                "ignore_eos": true,
            }))
            .send()
            .await
            .unwrap();
        (response.status(), response.json::<Value>().await.unwrap())
    });
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], "local");
    body
}

/// Whether the tests run as root (`/proc/self/status`).
fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0")
}

/// A script that runs the image's `/usr/bin/isthmus` with `rootfs` as `/`, in a mount
/// namespace of its own with `/proc` mounted, as a container runtime does: as the image's
/// user when the tests run as root, else as the caller mapped to root in a user namespace.
fn image_runner(rootfs: &Path, path: &Path) {
    let identity = if running_as_root() {
        format!(
            "--setuid {user} --setgid {user}",
            user = crate::deploy::IMAGE_USER
        )
    } else {
        "--user --map-root-user".to_owned()
    };
    std::fs::write(
        path,
        format!(
            "#!/bin/sh\nexec unshare --mount --mount-proc --root={} {identity} /usr/bin/isthmus \"$@\"\n",
            rootfs.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A JSON file of the image layout, by digest.
fn blob(layout: &Path, digest: &Value) -> PathBuf {
    let digest = digest.as_str().unwrap();
    layout
        .join("blobs/sha256")
        .join(digest.strip_prefix("sha256:").unwrap())
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn the_image_runs_the_sidecar_configuration_and_answers_its_probes() {
    let _serial = serial();
    let work = scratch_dir();
    let built = run(
        Command::new(workspace_root().join("deploy/container/build-image"))
            .arg("--deb")
            .arg(&package().deb)
            .arg("--out")
            .arg(work.path()),
    );
    let archive = PathBuf::from(String::from_utf8_lossy(&built.stdout).trim());
    let version = package().build_info["version"].as_str().unwrap();
    assert!(archive.ends_with(format!("isthmus_{version}.oci.tar")));

    // skopeo reads the archive as registries and runtimes will, checking every digest.
    assert!(
        Command::new("skopeo").arg("--version").output().is_ok(),
        "skopeo is missing: run scripts/test as root, or apt-get install -y skopeo"
    );
    run(Command::new("skopeo")
        .args(["copy", "--quiet"])
        .arg(format!("oci-archive:{}", archive.display()))
        .arg(format!(
            "oci:{}:isthmus",
            work.path().join("copied").display()
        )));

    let layout = work.path().join("layout");
    std::fs::create_dir(&layout).unwrap();
    run(Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(&layout));
    let index = read_json(&layout.join("index.json"));
    assert_eq!(
        index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
        format!("isthmus:{version}")
    );
    let manifest = read_json(&blob(&layout, &index["manifests"][0]["digest"]));
    let config = read_json(&blob(&layout, &manifest["config"]["digest"]));
    let user = crate::deploy::IMAGE_USER;
    assert_eq!(config["config"]["User"], format!("{user}:{user}"));
    assert_eq!(config["config"]["Entrypoint"], json!(["/usr/bin/isthmus"]));
    // The sidecar's arguments are the image's own command.
    assert_eq!(
        config["config"]["Cmd"],
        crate::deploy::sidecar_container()["args"]
    );

    let rootfs = work.path().join("rootfs");
    std::fs::create_dir(&rootfs).unwrap();
    run(Command::new("tar")
        .arg("-xzf")
        .arg(blob(&layout, &manifest["layers"][0]["digest"]))
        .arg("-C")
        .arg(&rootfs));
    let packages =
        std::fs::read_to_string(rootfs.join("usr/share/doc/isthmus/image-packages.txt")).unwrap();
    for package in ["libc6 ", "libstdc++6 ", "libgomp1 ", "ca-certificates "] {
        assert!(
            packages.lines().any(|line| line.starts_with(package)),
            "{packages}"
        );
    }
    assert!(
        std::fs::read_to_string(rootfs.join("etc/passwd"))
            .unwrap()
            .contains(&format!("isthmus:x:{user}:{user}:"))
    );
    {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        let state = std::fs::metadata(rootfs.join("var/lib/isthmus")).unwrap();
        assert_eq!(state.permissions().mode() & 0o777, 0o700);
        if running_as_root() {
            assert_eq!(u64::from(state.uid()), user);
        }
    }

    // What the pod mounts: the ConfigMap's file, the models volume.
    std::fs::write(
        rootfs.join("etc/isthmus/isthmus.toml"),
        crate::deploy::sidecar_config_text().replace("127.0.0.1:8080", "127.0.0.1:0"),
    )
    .unwrap();
    std::fs::create_dir(rootfs.join("models")).unwrap();
    if std::fs::hard_link(tests::model_path(), rootfs.join("models/model.gguf")).is_err() {
        std::fs::copy(tests::model_path(), rootfs.join("models/model.gguf")).unwrap();
    }
    let runner = work.path().join("in-image");
    image_runner(&rootfs, &runner);

    let gateway = Gateway::start_program(
        &runner,
        work,
        Path::new("/etc/isthmus/isthmus.toml"),
        |command| {
            command
                .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
                .env("ISTHMUS_API_KEY", "image-test-key-0123");
        },
    );
    if running_as_root() {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", gateway.child.id())).unwrap();
        let uid = status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .unwrap();
        assert_eq!(
            uid.split_whitespace().next(),
            Some(user.to_string().as_str()),
            "{status}"
        );
    }

    // The kubelet's probes, run in the container as the Deployment writes them.
    let admin = gateway.admin.to_string();
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let command = crate::deploy::sidecar_probe(probe);
        let arguments: Vec<String> = command[1..]
            .iter()
            .map(|argument| {
                if argument.starts_with("127.0.0.1:") {
                    admin.clone()
                } else {
                    argument.clone()
                }
            })
            .collect();
        run(Command::new(&runner).args(&arguments));
    }
    let missing = Command::new(&runner)
        .args(["probe", "--admin", &admin, "/no-such-path"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1), "a 404 must fail the probe");
    // A reload from inside the image, which has no shell to send SIGHUP with.
    let reload = Command::new(&runner)
        .args(["probe", "--admin", &admin, "--post", "/admin/api/reload"])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&reload.stdout);
    assert!(
        reload.status.success() && report.contains("\"reloaded\":true"),
        "{report}{}",
        String::from_utf8_lossy(&reload.stderr)
    );

    // The application's side: plain HTTP on the pod's loopback, with the shared key.
    let plain = gateway
        .plain
        .expect("the sidecar configures a plain listener");
    say_hi(
        &reqwest::Client::new(),
        &format!("http://{plain}/v1/chat/completions"),
        Some("image-test-key-0123"),
    );
}
