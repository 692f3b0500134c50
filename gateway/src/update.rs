//! `isthmus update`: signed updates of the appliance (`firmware::update` does the work). An
//! operator signs a bundle on a build host (`keygen`, `pack`); the appliance verifies it with
//! the keys in `/etc/isthmus-update/keys/` and installs it into the inactive slot (`apply`);
//! the systemd unit counts starts (`boot`) and ends the trial once the gateway is ready
//! (`commit`), so a slot that does not come up is rolled back by itself.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use firmware::update::{BootOutcome, Firmware, SlotState};

/// Where the trusted keys are on the appliance: outside `/etc/isthmus`, which the service may
/// write (the admin console rewrites its configuration), and owned by root.
pub const KEYS_DIRECTORY_DEFAULT: &str = "/etc/isthmus-update/keys";
/// Where the slots and their state are on the appliance: outside the service's state
/// directory, and owned by root.
pub const FIRMWARE_DIRECTORY_DEFAULT: &str = "/var/lib/isthmus-firmware";
/// What the package installed: `bin/isthmus` and `lib/isthmus/` under it.
pub const FACTORY_ROOT_DEFAULT: &str = "/usr";

/// Where the slots are.
#[derive(Debug, clap::Args)]
pub struct Slots {
    /// The firmware directory: the slots, their state and the `current` link. Only root may
    /// be able to write it and every directory above it.
    #[arg(long, default_value = FIRMWARE_DIRECTORY_DEFAULT)]
    pub firmware_dir: PathBuf,
    /// The factory slot: the package's installation root.
    #[arg(long, default_value = FACTORY_ROOT_DEFAULT)]
    pub factory_root: PathBuf,
}

impl Slots {
    fn firmware(&self) -> Firmware {
        Firmware::new(&self.firmware_dir, &self.factory_root)
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum UpdateCommand {
    /// Make a signing key pair: PREFIX.key (PEM PKCS #8, mode 0600) and PREFIX.pub (PEM),
    /// which goes into the appliances' keys directory.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Pack and sign every file and link under ROOT (bin/isthmus, lib/isthmus/...).
    Pack {
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        version: String,
        /// The private key (PEM PKCS #8, as `keygen` or `openssl genpkey -algorithm ed25519`
        /// writes it).
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Check a bundle's signature and manifest without installing it.
    Verify {
        bundle: PathBuf,
        #[arg(long, default_value = KEYS_DIRECTORY_DEFAULT)]
        keys: PathBuf,
    },
    /// Verify a bundle and install it into the inactive slot, which runs on trial from the
    /// next start (`systemctl restart isthmus`).
    Apply {
        bundle: PathBuf,
        #[arg(long, default_value = KEYS_DIRECTORY_DEFAULT)]
        keys: PathBuf,
        /// Apply a version below the highest one committed (refused otherwise).
        #[arg(long)]
        allow_downgrade: bool,
        #[command(flatten)]
        slots: Slots,
    },
    /// Count a start of the slot on trial, rolling back one that used up its starts (the
    /// unit's ExecStartPre).
    Boot {
        #[command(flatten)]
        slots: Slots,
    },
    /// End the trial: the gateway became ready (the unit's ExecStartPost).
    Commit {
        /// Wait this long first and commit only if the gateway (--main-pid) still runs then,
        /// so a start that fails soon after READY=1 still counts against the trial. Returns
        /// at once when nothing is on trial, or when the gateway exits meanwhile.
        #[arg(long, default_value_t = 0, value_name = "SECONDS")]
        after_seconds: u64,
        /// The gateway's process, watched while --after-seconds passes (the unit passes
        /// $MAINPID: systemd does not stop this step when the gateway exits, it waits for it).
        #[arg(long, value_name = "PID", requires = "after_seconds")]
        main_pid: Option<u32>,
        #[command(flatten)]
        slots: Slots,
    },
    /// Go back to the previous slot (takes effect at the next start).
    Rollback {
        #[command(flatten)]
        slots: Slots,
    },
    /// Print the slots' state as JSON.
    Status {
        #[command(flatten)]
        slots: Slots,
    },
}

/// Runs an `isthmus update` command: exit 0, or 1 with a message naming the file and the
/// problem.
pub fn run(command: UpdateCommand) -> ExitCode {
    match execute(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("isthmus update: {message}");
            ExitCode::FAILURE
        }
    }
}

fn execute(command: UpdateCommand) -> Result<(), String> {
    match command {
        UpdateCommand::Keygen { out } => keygen(&out),
        UpdateCommand::Pack {
            root,
            version,
            key,
            out,
        } => {
            let contents =
                std::fs::read(&key).map_err(|error| format!("{}: {error}", key.display()))?;
            let signing = firmware::keys::parse_private_key(&contents)
                .map_err(|reason| format!("{}: {reason}", key.display()))?;
            let manifest = firmware::update::pack(&root, &version, &signing, &out)
                .map_err(|error| error.to_string())?;
            println!(
                "{}: version {} with {} entries, signed by key {}",
                out.display(),
                manifest.version,
                manifest.entries.len(),
                firmware::keys::key_id(&signing.verifying_key())
            );
            Ok(())
        }
        UpdateCommand::Verify { bundle, keys } => {
            let trusted =
                firmware::update::read_trusted_keys(&keys).map_err(|error| error.to_string())?;
            let verified = firmware::update::open_verified(&bundle, &trusted, &keys)
                .map_err(|error| error.to_string())?;
            // Reading every file checks its bytes too: install into a scratch directory, made
            // here and private (a name another user prepared, or a link, is refused).
            let scratch = std::env::temp_dir().join(format!(
                ".isthmus-update-verify-{:016x}",
                rand::random::<u64>()
            ));
            {
                use std::os::unix::fs::DirBuilderExt as _;
                std::fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&scratch)
                    .map_err(|error| format!("{}: {error}", scratch.display()))?;
            }
            let key_id = verified.key_id.clone();
            let outcome = verified.install(&scratch);
            let _ = std::fs::remove_dir_all(&scratch);
            let manifest = outcome.map_err(|error| error.to_string())?;
            println!(
                "{}: ok, version {} with {} entries, signed by key {key_id}",
                bundle.display(),
                manifest.version,
                manifest.entries.len()
            );
            Ok(())
        }
        UpdateCommand::Apply {
            bundle,
            keys,
            allow_downgrade,
            slots,
        } => {
            let applied = slots
                .firmware()
                .apply(&bundle, &keys, allow_downgrade)
                .map_err(|error| error.to_string())?;
            println!(
                "installed {} ({} entries, key {}) into slot {}; it runs on trial from the next start (systemctl restart isthmus)",
                applied.version,
                applied.files,
                applied.key_id,
                applied.slot.name()
            );
            Ok(())
        }
        UpdateCommand::Boot { slots } => {
            let (outcome, state) = slots.firmware().boot().map_err(|error| error.to_string())?;
            match outcome {
                BootOutcome::Steady => {
                    println!("running slot {}", state.active.name());
                }
                BootOutcome::Trying { slot, attempt } => println!(
                    "running slot {} on trial, start {attempt} of {}",
                    slot.name(),
                    firmware::update::ATTEMPTS_MAX
                ),
                BootOutcome::RolledBack { .. } => {
                    // A journal line at warning level: `systemctl status` shows it.
                    eprintln!(
                        "<4>isthmus update: {}",
                        state.last_event.unwrap_or_default()
                    );
                }
            }
            Ok(())
        }
        UpdateCommand::Commit {
            after_seconds,
            main_pid,
            slots,
        } => {
            let firmware = slots.firmware();
            let committed = if after_seconds == 0 {
                firmware.commit()
            } else {
                let mut state = firmware.state().map_err(|error| error.to_string())?;
                // What the gateway really runs (an `apply` may have come between this start's
                // `boot` and its `ExecStart`): the state is corrected before it is trusted.
                if let Some(slot) = main_pid
                    .and_then(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).ok())
                    .and_then(|executable| firmware.slot_of(&executable))
                {
                    state = firmware
                        .note_running(slot)
                        .map_err(|error| error.to_string())?;
                }
                let Some(trial) = state.trial.filter(|trial| trial.attempts >= 1) else {
                    println!("nothing on trial");
                    return Ok(());
                };
                // Journal lines: the unit stays `activating` while this waits.
                println!(
                    "slot {} on trial: committing it if the gateway still runs in {after_seconds} s",
                    trial.slot.name()
                );
                use std::io::Write as _;
                let _ = std::io::stdout().flush();
                let watched = main_pid.map(|pid| (pid, process_start(pid)));
                let deadline =
                    std::time::Instant::now() + std::time::Duration::from_secs(after_seconds);
                loop {
                    if let Some((pid, started)) = watched
                        && (started.is_none() || process_start(pid) != started)
                    {
                        println!(
                            "the gateway (pid {pid}) exited before its slot was committed: slot {} stays on trial",
                            trial.slot.name()
                        );
                        return Ok(());
                    }
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    std::thread::sleep(left.min(MAIN_PID_POLL));
                }
                firmware.commit_trial(&trial)
            };
            match committed.map_err(|error| error.to_string())? {
                Some(state) => println!("{}", state.last_event.unwrap_or_default()),
                None => println!("nothing on trial"),
            }
            Ok(())
        }
        UpdateCommand::Rollback { slots } => {
            let state = slots
                .firmware()
                .rollback()
                .map_err(|error| error.to_string())?;
            println!(
                "{}; restart the service to run it",
                state.last_event.unwrap_or_default()
            );
            Ok(())
        }
        UpdateCommand::Status { slots } => {
            let firmware = slots.firmware();
            let state: SlotState = firmware.state().map_err(|error| error.to_string())?;
            let mut value = serde_json::to_value(&state).map_err(|error| error.to_string())?;
            value["current"] = std::fs::read_link(firmware.current_link())
                .map(|target| target.display().to_string())
                .ok()
                .into();
            println!("{value:#}");
            Ok(())
        }
    }
}

/// How often `commit --main-pid` looks at the gateway's process.
const MAIN_PID_POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// When process `pid` started (`/proc/PID/stat`'s field 22, in clock ticks since boot), so
/// that a reused pid does not pass for the gateway; `None` when no such process runs (or
/// only its zombie is left).
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_process_start(&stat)
}

/// The start time of a `/proc/PID/stat` line, `None` for a zombie or a dead process.
fn parse_process_start(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces and parentheses.
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    // Field 3, the state, is the first after it; field 22 the 20th.
    if matches!(fields.first(), Some(&("Z" | "X" | "x"))) {
        return None;
    }
    fields.get(19)?.parse().ok()
}

fn keygen(out: &Path) -> Result<(), String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut seed = [0_u8; 32];
    getrandom::fill(&mut seed).map_err(|error| format!("generating a key: {error}"))?;
    let signing = ed25519_dalek::SigningKey::from_bytes(&seed);
    let with = |extension: &str| {
        let mut path = out.as_os_str().to_owned();
        path.push(extension);
        PathBuf::from(path)
    };
    let (private, public) = (with(".key"), with(".pub"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&private)
        .map_err(|error| format!("{}: {error}", private.display()))?;
    file.write_all(firmware::keys::private_key_pem(&signing).as_bytes())
        .map_err(|error| format!("{}: {error}", private.display()))?;
    std::fs::write(
        &public,
        firmware::keys::public_key_pem(&signing.verifying_key()),
    )
    .map_err(|error| format!("{}: {error}", public.display()))?;
    println!(
        "wrote {} (keep it secret) and {} (key {}): copy the .pub into {KEYS_DIRECTORY_DEFAULT}/ on each appliance",
        private.display(),
        public.display(),
        firmware::keys::key_id(&signing.verifying_key())
    );
    Ok(())
}

#[cfg(test)]
mod tests;
