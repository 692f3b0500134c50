//! Support for the end-to-end tests: build the current `isthmus` binary, make a test PKI,
//! write a configuration, start the gateway on loopback ports it picks itself, and talk to it.
//!
//! Every gateway a test starts is its own process, killed when the test's [`Gateway`] is
//! dropped (and by the kernel if the test process dies first). Tests that start a gateway hold
//! [`serial`] so that only one model runs at a time on a small machine.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// Generous bound on start-up (model load included); a healthy start takes about a second.
pub const START_DEADLINE: Duration = Duration::from_secs(90);
/// The API key every test configuration accepts.
pub const API_KEY: &str = "isthmus-test-key";
/// Inference threads for tests: the suite shares two cores with the compiler and itself.
pub const TEST_THREADS: u32 = 2;

/// The workspace root. Cargo names the manifest directory of the checkout under test when
/// it runs a test; the one compiled in may be another checkout's when several share a build
/// directory (this crate's library is then not rebuilt), and the gateway built and started
/// would be that checkout's.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest_dir
        .parent()
        .expect("tests crate lives in the workspace")
        .to_path_buf()
}

/// The demo model, fetched by `scripts/fetch-model`.
pub fn model_path() -> PathBuf {
    let path = workspace_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-model (scripts/test does it for you)",
        path.display()
    );
    path
}

/// One test at a time may run a gateway or a model.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A scratch directory under [`scratch_base`], removed when dropped.
pub fn scratch_dir() -> tempfile::TempDir {
    let base = scratch_base();
    std::fs::create_dir_all(&base).unwrap();
    tempfile::Builder::new()
        .prefix("isthmus-it-")
        .tempdir_in(base)
        .unwrap()
}

/// Where test scratch directories go: under the system's temporary directory (Unix socket
/// paths must stay short), one directory per user, so that a run as root and one as
/// another user on the same machine do not lock each other out.
fn scratch_base() -> PathBuf {
    let user = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1))
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "unknown".to_owned());
    std::env::temp_dir().join(format!("isthmus-tests-{user}"))
}

/// The `isthmus` binary built from the current sources (cargo decides what is stale).
pub fn isthmus_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let mut command = Command::new(cargo);
        // The same package selection as the test build, so no dependency is rebuilt with
        // other features.
        command.current_dir(workspace_root()).args([
            "build",
            "--workspace",
            "--all-targets",
            "--message-format=json-render-diagnostics",
        ]);
        // Cargo describes the running test in CARGO_* variables; some build scripts watch
        // them, so passing them on would make this build and the test build rebuild each
        // other's dependencies.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            let describes_test = name.starts_with("CARGO_PKG_")
                || name.starts_with("CARGO_BIN_")
                || [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_CRATE_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "CARGO_RUSTC_CURRENT_DIR",
                    "OUT_DIR",
                ]
                .contains(&name.as_ref());
            if describes_test {
                command.env_remove(name.as_ref());
            }
        }
        let exe = std::env::current_exe().unwrap_or_default();
        if exe
            .components()
            .any(|component| component.as_os_str() == "release")
        {
            command.arg("--release");
        }
        let output = command
            .stderr(Stdio::inherit())
            .output()
            .expect("running cargo build");
        assert!(output.status.success(), "cargo build of isthmus failed");
        let stdout = String::from_utf8_lossy(&output.stdout);
        stdout
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|message| message["reason"] == "compiler-artifact")
            .filter(|message| message["target"]["name"] == "isthmus")
            // Not the unit-test build of the same target.
            .filter(|message| message["profile"]["test"] == false)
            .find_map(|message| message["executable"].as_str().map(PathBuf::from))
            .expect("cargo reported no isthmus executable")
    })
}

/// A CA and a server certificate for `localhost` and `127.0.0.1`, made at test time.
#[derive(Debug)]
pub struct TestPki {
    pub dir: PathBuf,
    pub ca_pem: String,
    pub ca_path: PathBuf,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    ca_issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestPki {
    /// The process-wide test PKI.
    pub fn shared() -> &'static TestPki {
        static PKI: OnceLock<TestPki> = OnceLock::new();
        PKI.get_or_init(|| {
            // The PKI directories of test processes that are gone (a killed run leaves its own).
            if let Ok(entries) = std::fs::read_dir(scratch_base()) {
                for entry in entries.flatten() {
                    let name = entry.file_name();
                    let pid = name.to_str().and_then(|name| name.strip_prefix("pki-"));
                    if pid.is_some_and(|pid| !Path::new("/proc").join(pid).exists()) {
                        let _ = std::fs::remove_dir_all(entry.path());
                    }
                }
            }
            let dir = scratch_base().join(format!("pki-{}", std::process::id()));
            TestPki::create(&dir)
        })
    }

    fn create(dir: &Path) -> TestPki {
        use rcgen::{
            BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        std::fs::create_dir_all(dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, "Isthmus test CA");
        ca_params.distinguished_name = name;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let ca_pem = ca_cert.pem();
        let ca_issuer = rcgen::Issuer::new(ca_params, ca_key);
        let pki = TestPki {
            dir: dir.to_path_buf(),
            ca_path: dir.join("ca.pem"),
            cert_path: dir.join("server.pem"),
            key_path: dir.join("server-key.pem"),
            ca_pem,
            ca_issuer,
        };
        std::fs::write(&pki.ca_path, &pki.ca_pem).unwrap();
        let (cert, key) = pki.issue_server_cert("localhost");
        std::fs::write(&pki.cert_path, cert).unwrap();
        std::fs::write(&pki.key_path, key).unwrap();
        pki
    }

    /// A server certificate (PEM chain) and key signed by the test CA, for `localhost`,
    /// `127.0.0.1` and `common_name`.
    pub fn issue_server_cert(&self, common_name: &str) -> (String, String) {
        use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose};
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.ca_issuer).unwrap();
        (
            format!("{}{}", cert.pem(), self.ca_pem),
            key.serialize_pem(),
        )
    }
}

/// What a test configuration may change; everything else has test defaults.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    pub context_tokens: u32,
    pub parallel_sequences: u32,
    pub queue_depth_max: u32,
    pub body_bytes_max: u64,
    pub header_bytes_max: u64,
    pub header_read_timeout_ms: u64,
    pub body_read_timeout_ms: u64,
    pub keepalive_timeout_ms: u64,
    pub connections_max: u32,
    pub drain_timeout_ms: u64,
    /// `server.config_watch_interval_ms`: 0 reloads only on request.
    pub config_watch_interval_ms: u64,
    /// Use the test PKI's certificate; `false` lets the gateway provision its own.
    pub test_certificate: bool,
    pub extra: String,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        GatewayOptions {
            context_tokens: 1024,
            parallel_sequences: 2,
            queue_depth_max: 8,
            body_bytes_max: 1024 * 1024,
            header_bytes_max: 16 * 1024,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 30_000,
            keepalive_timeout_ms: 60_000,
            connections_max: 64,
            drain_timeout_ms: 30_000,
            config_watch_interval_ms: 0,
            test_certificate: true,
            extra: String::new(),
        }
    }
}

/// The configuration text for `options`, with the state directory under `dir`.
pub fn config_text(options: &GatewayOptions, dir: &Path) -> String {
    let pki = TestPki::shared();
    let tls = if options.test_certificate {
        format!(
            "[server.tls]\ncert = {:?}\nkey = {:?}\nreload_interval_ms = 200\n",
            pki.cert_path, pki.key_path
        )
    } else {
        String::new()
    };
    let key_sha256 = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(API_KEY.as_bytes()))
    };
    format!(
        r#"[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
state_dir = {state:?}
drain_timeout_ms = {drain}
config_watch_interval_ms = {watch}

{tls}
[server.limits]
body_bytes_max = {body}
header_bytes_max = {header}
header_read_timeout_ms = {header_timeout}
body_read_timeout_ms = {body_timeout}
keepalive_timeout_ms = {keepalive_timeout}
connections_max = {connections}
first_token_timeout_ms = 60000

[auth]
api_keys = [{{ id = "test", sha256 = "{key_sha256}" }}]

[models.smollm2]
path = {model:?}
aliases = ["gpt-4o-mini"]
context_tokens = {context}
parallel_sequences = {parallel}
batch_tokens = 256
threads = {threads}
queue_depth_max = {queue}
queue_timeout_ms = 60000

[logging]
level = "info,gateway=debug,edge_runtime=debug"

{extra}
"#,
        state = dir.join("state"),
        drain = options.drain_timeout_ms,
        watch = options.config_watch_interval_ms,
        body = options.body_bytes_max,
        header = options.header_bytes_max,
        header_timeout = options.header_read_timeout_ms,
        body_timeout = options.body_read_timeout_ms,
        keepalive_timeout = options.keepalive_timeout_ms,
        connections = options.connections_max,
        model = model_path(),
        context = options.context_tokens,
        parallel = options.parallel_sequences,
        threads = TEST_THREADS,
        queue = options.queue_depth_max,
        extra = options.extra,
    )
}

/// A scratch directory holding `isthmus.toml`, the test configuration with `options`, and
/// the file's path.
pub fn config_file(options: &GatewayOptions) -> (tempfile::TempDir, PathBuf) {
    let dir = scratch_dir();
    let path = dir.path().join("isthmus.toml");
    std::fs::write(&path, config_text(options, dir.path())).unwrap();
    (dir, path)
}

/// A running gateway process.
#[derive(Debug)]
pub struct Gateway {
    pub child: Child,
    pub data: SocketAddr,
    pub admin: SocketAddr,
    /// The plain-HTTP data listener, when the configuration enables one.
    pub plain: Option<SocketAddr>,
    pub dir: tempfile::TempDir,
    pub log_path: PathBuf,
}

impl Gateway {
    /// Starts a gateway with `options` and waits until `/readyz` says ready.
    pub fn start(options: &GatewayOptions) -> Gateway {
        let (dir, config_path) = config_file(options);
        Gateway::start_with_config(dir, &config_path)
    }

    /// Starts a gateway on an existing configuration file inside `dir`.
    pub fn start_with_config(dir: tempfile::TempDir, config_path: &Path) -> Gateway {
        Gateway::start_with_command(dir, config_path, |_| {})
    }

    /// [`Gateway::start_with_config`], letting `prepare` change the command before it is
    /// spawned (environment, `pre_exec`).
    pub fn start_with_command(
        dir: tempfile::TempDir,
        config_path: &Path,
        prepare: impl FnOnce(&mut Command),
    ) -> Gateway {
        Gateway::start_program(isthmus_binary(), dir, config_path, prepare)
    }

    /// [`Gateway::start_with_command`] with another `isthmus` executable (one unpacked from
    /// a package, say).
    pub fn start_program(
        program: &Path,
        dir: tempfile::TempDir,
        config_path: &Path,
        prepare: impl FnOnce(&mut Command),
    ) -> Gateway {
        let log_path = dir.path().join("gateway.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut command = Command::new(program);
        command
            .args(["serve", "--config"])
            .arg(config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .env("NO_COLOR", "1")
            // A test run under a service manager must not talk to it; tests that want a
            // notification socket set their own.
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID");
        kill_with_parent(&mut command);
        prepare(&mut command);
        let mut child = command.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + START_DEADLINE;
        let mut data = None;
        let mut admin = None;
        let mut plain = None;
        let mut admin_tls = false;
        while data.is_none() || admin.is_none() {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let line = match receiver.recv_timeout(remaining) {
                Ok(line) => line,
                Err(_) => panic!(
                    "gateway did not announce its listeners; log:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                ),
            };
            let Ok(announcement) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let address: Option<SocketAddr> = announcement["address"]
                .as_str()
                .and_then(|address| address.parse().ok());
            match announcement["listening"].as_str() {
                Some("data") => data = address,
                Some("admin") => {
                    admin = address;
                    admin_tls = announcement["url"]
                        .as_str()
                        .is_some_and(|url| url.starts_with("https://"));
                }
                Some("plain-http") => plain = address,
                _ => {}
            }
        }
        let gateway = Gateway {
            child,
            data: data.unwrap(),
            admin: admin.unwrap(),
            plain,
            dir,
            log_path,
        };
        // An admin listener off loopback wants TLS and a token the harness does not know:
        // the caller waits for readiness itself, with its own credentials.
        if !admin_tls {
            gateway.wait_ready(deadline);
        }
        gateway
    }

    fn wait_ready(&self, deadline: Instant) {
        loop {
            if let Ok((200, _)) = plain_get(self.admin, "/readyz") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "gateway not ready in time; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.data.port())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The admin listener's `/metrics` text.
    pub fn metrics(&self) -> String {
        plain_get(self.admin, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    /// One metric's value (the first sample whose name and labels start with `prefix`).
    pub fn metric(&self, prefix: &str) -> Option<f64> {
        metric(self.admin, prefix)
    }

    /// Sends a signal to the gateway.
    pub fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        #[allow(
            unsafe_code,
            reason = "sending a signal to the child process needs libc::kill"
        )]
        let result = unsafe { libc::kill(pid, signal) };
        assert_eq!(result, 0, "kill({pid}, {signal}) failed");
    }

    /// Waits for the process to exit, up to `deadline`.
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<std::process::ExitStatus> {
        let until = Instant::now() + deadline;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- gateway log ----\n{}", self.log());
        }
    }
}

/// Asks the kernel to kill the child when the test process dies, so no gateway outlives a
/// crashed test run.
/// Has `command`'s process killed when the thread that starts it ends (a test that panics
/// leaves no process behind).
pub fn kill_with_parent(command: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and only calls prctl(2), which is
    // async-signal-safe.
    #[allow(
        unsafe_code,
        reason = "pre_exec and prctl are the only way to set PDEATHSIG"
    )]
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    command
}

/// One metric's value from the admin listener at `admin` (the first sample whose name and
/// labels start with `prefix`).
pub fn metric(admin: SocketAddr, prefix: &str) -> Option<f64> {
    let (_, text) = plain_get(admin, "/metrics").ok()?;
    text.lines()
        .find(|line| line.starts_with(prefix))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// The admin token test configurations may require (`server.admin_tokens`); the helpers here
/// send it on every admin request, which a gateway without tokens ignores.
pub const ADMIN_TOKEN: &str = "isthmus-test-admin-token";

/// A minimal plain-HTTP GET for the admin listener, with [`ADMIN_TOKEN`]: (status, body).
pub fn plain_get(address: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|status| status.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// An HTTPS client that trusts only `ca_pem`.
pub fn client_trusting(ca_pem: &str) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap();
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .https_only(true)
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// An HTTPS client that trusts the test CA and speaks HTTP/1.1 only (kept-alive
/// connections of its own, where HTTP/2 would multiplex).
pub fn client_http1() -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(TestPki::shared().ca_pem.as_bytes()).unwrap();
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .http1_only()
        .build()
        .unwrap()
}

/// An HTTPS client that trusts the test CA.
pub fn client() -> reqwest::Client {
    client_trusting(&TestPki::shared().ca_pem)
}

/// Polls `check` until it returns true or `deadline` passes; returns whether it did.
pub fn eventually(deadline: Duration, mut check: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + deadline;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Subject common name of the test client certificate ([`TestPki::client_cert_files`]).
pub const TEST_CLIENT_CN: &str = "isthmus-test-client";
/// Generous bound on a fake upstream's start; it takes a few milliseconds.
pub const UPSTREAM_START_DEADLINE: Duration = Duration::from_secs(10);
/// How long a fake upstream gets to exit after SIGTERM before it is killed.
const UPSTREAM_STOP_DEADLINE: Duration = Duration::from_secs(2);

impl TestPki {
    /// A client certificate (PEM) and key signed by the test CA, for mTLS, with subject CN
    /// `common_name`.
    pub fn issue_client_cert(&self, common_name: &str) -> (String, String) {
        use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.ca_issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// The shared client certificate and key files (CN [`TEST_CLIENT_CN`]), made on first use.
    pub fn client_cert_files(&self) -> &'static (PathBuf, PathBuf) {
        static FILES: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
        FILES.get_or_init(|| {
            let (cert, key) = self.issue_client_cert(TEST_CLIENT_CN);
            let cert_path = self.dir.join("client.pem");
            let key_path = self.dir.join("client-key.pem");
            std::fs::write(&cert_path, cert).unwrap();
            std::fs::write(&key_path, key).unwrap();
            (cert_path, key_path)
        })
    }

    /// The shared client certificate as a reqwest identity.
    pub fn client_identity(&self) -> reqwest::Identity {
        let (cert_path, key_path) = self.client_cert_files();
        let mut pem = std::fs::read(cert_path).unwrap();
        pem.extend(std::fs::read(key_path).unwrap());
        reqwest::Identity::from_pem(&pem).unwrap()
    }
}

/// An HTTPS client that trusts the test CA and presents the test client certificate.
pub fn client_with_certificate() -> reqwest::Client {
    let pki = TestPki::shared();
    let ca = reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap();
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .identity(pki.client_identity())
        .https_only(true)
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// How to start a fake upstream (`tests/upstream`).
#[derive(Debug, Clone)]
pub struct UpstreamOptions {
    /// The `fake-upstream` executable: `env!("CARGO_BIN_EXE_fake-upstream")`, which only the
    /// `it` crate can name (`crate::upstream::options()` there).
    pub binary: PathBuf,
    pub name: String,
    /// Serve HTTPS with the test PKI's server certificate (ALPN h2 and http/1.1).
    pub tls: bool,
    /// Require a client certificate signed by the test CA; implies `tls`.
    pub mtls: bool,
    /// Plain-text HTTP/2 with prior knowledge as well as HTTP/1.1.
    pub h2c: bool,
    /// Completion tokens per answer.
    pub tokens: u32,
    /// Enable `/_control/*` (the helpers of [`Upstream`] need it).
    pub control: bool,
    /// A fixed address (to restart a backend where it was); a free port when `None`.
    pub listen: Option<SocketAddr>,
}

impl UpstreamOptions {
    /// Plain HTTP, name `upstream`, 8 tokens, control on.
    pub fn new(binary: impl Into<PathBuf>) -> UpstreamOptions {
        UpstreamOptions {
            binary: binary.into(),
            name: "upstream".to_owned(),
            tls: false,
            mtls: false,
            h2c: false,
            tokens: 8,
            control: true,
            listen: None,
        }
    }
}

/// A running fake upstream process, stopped (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub name: String,
    pub tls: bool,
    child: Child,
    /// Reaches this upstream: trusts the test CA and, for mTLS, presents the client
    /// certificate.
    client: reqwest::Client,
    _dir: tempfile::TempDir,
    log_path: PathBuf,
}

impl Upstream {
    /// Starts a fake upstream on a loopback port it picks and waits for its start line.
    pub fn start(options: UpstreamOptions) -> anyhow::Result<Upstream> {
        use anyhow::Context as _;
        let dir = scratch_dir();
        let log_path = dir.path().join("upstream.log");
        let log = std::fs::File::create(&log_path)?;
        let tls = options.tls || options.mtls;
        let mut command = Command::new(&options.binary);
        let listen = options
            .listen
            .map_or_else(|| "127.0.0.1:0".to_owned(), |address| address.to_string());
        command
            .args(["--listen", &listen, "--name", &options.name])
            .args(["--tokens", &options.tokens.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        let pki = TestPki::shared();
        if tls {
            command
                .arg("--tls-cert")
                .arg(&pki.cert_path)
                .arg("--tls-key")
                .arg(&pki.key_path);
        }
        if options.mtls {
            command.arg("--client-ca").arg(&pki.ca_path);
        }
        if options.h2c {
            command.arg("--h2c");
        }
        if options.control {
            command.arg("--control");
        }
        kill_with_parent(&mut command);
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {}", options.binary.display()))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let announced = receiver
            .recv_timeout(UPSTREAM_START_DEADLINE)
            .map_err(anyhow::Error::from)
            .and_then(|line| {
                let announcement: serde_json::Value = serde_json::from_str(&line)?;
                let address = announcement["listening"]
                    .as_str()
                    .context("no `listening` in the start line")?;
                Ok(address.parse::<SocketAddr>()?)
            });
        let addr = match announced {
            Ok(addr) => addr,
            Err(error) => {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!(
                    "fake upstream did not announce its address ({error}); log:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
        };
        let client = if options.mtls {
            client_with_certificate()
        } else if tls {
            client()
        } else {
            reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()?
        };
        Ok(Upstream {
            addr,
            name: options.name,
            tls,
            child,
            client,
            _dir: dir,
            log_path,
        })
    }

    /// `http://127.0.0.1:PORT` or `https://...`.
    pub fn base_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.addr.port())
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url())
    }

    /// A client that reaches this upstream (test CA trusted, client certificate for mTLS).
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// What the upstream wrote to stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// A control call; panics unless it answers 200 with JSON.
    async fn control(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> serde_json::Value {
        let mut request = self.client.request(method, self.url(path));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        assert_eq!(status, 200, "{path}: {text}");
        serde_json::from_str(&text).unwrap()
    }

    /// The logged requests, oldest first (the last 1000): method, path, query, authority,
    /// headers, body_bytes, body_sha256, model, stream, include_usage, http_version, tls,
    /// client_cn, connection, status.
    pub async fn requests(&self) -> Vec<serde_json::Value> {
        match self
            .control(reqwest::Method::GET, "/_control/requests", None)
            .await
        {
            serde_json::Value::Array(requests) => requests,
            other => panic!("/_control/requests answered {other}"),
        }
    }

    /// Empties the request log.
    pub async fn clear_requests(&self) {
        self.control(reqwest::Method::DELETE, "/_control/requests", None)
            .await;
    }

    /// Changes the behaviour (`{"status": 503, "retry_after_s": 1, "count": 2}`,
    /// `{"health_status": 500}`, `{"hold": true}`, `{"delay_first_byte_ms": 100}`,
    /// `{"reset": true}`); returns the behaviour now in force.
    pub async fn set_behaviour(&self, behaviour: serde_json::Value) -> serde_json::Value {
        self.control(
            reqwest::Method::POST,
            "/_control/behaviour",
            Some(behaviour),
        )
        .await
    }

    /// Releases every held answer.
    pub async fn release(&self) {
        self.control(reqwest::Method::POST, "/_control/release", None)
            .await;
    }

    /// `{"requests", "in_flight", "held", "completed", "cancelled", "injected", "dropped",
    /// "connections", "connections_open"}`; "connections" counts those that carried a request
    /// other than a control call, "connections_open" every open one.
    pub async fn stats(&self) -> serde_json::Value {
        self.control(reqwest::Method::GET, "/_control/stats", None)
            .await
    }

    /// Kills the process at once (SIGKILL): its connections break off mid-answer.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit status (`None` if it has not exited in time).
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        let pid = i32::try_from(self.child.id()).ok()?;
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        #[allow(
            unsafe_code,
            reason = "sending SIGTERM to the child process needs libc::kill"
        )]
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let until = Instant::now() + UPSTREAM_STOP_DEADLINE;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(5)),
                _ => return None,
            }
        }
    }

    /// Polls the stats until `check` accepts them; panics after `deadline`.
    pub async fn wait_for_stats(
        &self,
        deadline: Duration,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let until = Instant::now() + deadline;
        loop {
            let stats = self.stats().await;
            if check(&stats) {
                return stats;
            }
            assert!(Instant::now() < until, "stats never matched: {stats}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if self.terminate().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- fake upstream {} log ----\n{}", self.name, self.log());
        }
    }
}
