//! Signed updates with A/B slots and automatic rollback.
//!
//! An update is one bundle file: a header, a JSON manifest (version, and every file's path,
//! size, mode and SHA-256, or a symbolic link's target), an Ed25519 signature over the
//! manifest, then the files' bytes in manifest order. Applying one verifies the signature
//! against the trusted keys first, then streams each file into the inactive slot while
//! hashing it; one wrong byte and nothing changes.
//!
//! The appliance runs the gateway through `<firmware>/current`, a symbolic link to the
//! active slot: `factory` (what the Debian package installed under `/usr`), `a` or `b`. A
//! new slot starts on trial: the unit's `ExecStartPre` ([`boot`]) counts each start, the
//! unit's `ExecStartPost` ([`commit`]) ends the trial once the gateway has said it is ready,
//! and a slot that has not become ready after [`ATTEMPTS_MAX`] starts is rolled back to the
//! slot that ran before it. Every transition is a pure function over [`SlotState`]; the
//! functions here only read and write the state file (atomically) and switch the link.
//!
//! Only root (or the user running the command) may be able to change the trusted keys and
//! the firmware directory: every command that reads or writes them checks their owners and
//! modes, and those of every directory above them, and refuses to act otherwise. A service
//! that could write there could choose what root installs and runs next.
//!
//! Downgrades are refused: the highest version ever committed (at least the installed
//! package's) is the floor, and a bundle of
//! a lower version (a validly signed old release with a known flaw, say) is applied only
//! when the operator says so (`--allow-downgrade`). Versions are ordered as semantic
//! versions (dotted numbers, a `-pre-release` before its release, `+build` ignored); two
//! versions that cannot be ordered count as a downgrade.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Component, Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::files::{self, io_reason};

/// First line of a bundle.
const MAGIC: &str = "ISTHMUS-UPDATE 1";
/// Signed before the manifest bytes, so a signature made for anything else never verifies.
const SIGNATURE_CONTEXT: &[u8] = b"isthmus-update-v1\0";
/// The most manifest bytes read.
const MANIFEST_BYTES_MAX: usize = 1024 * 1024;
/// The most entries one bundle carries.
const FILES_MAX: usize = 1024;
/// The most bytes one file may have.
const FILE_BYTES_MAX: u64 = 4 * 1024 * 1024 * 1024;
/// The most bytes of a header line.
const HEADER_LINE_BYTES_MAX: usize = 256;
/// Starts a slot on trial gets before it is rolled back.
pub const ATTEMPTS_MAX: u32 = 3;
/// Mode of the firmware directory and the slots' directories: root writes them, the
/// service's user runs the gateway from them.
const SLOT_DIRECTORY_MODE: u32 = 0o755;
const STATE_FILE: &str = "state.json";
const CURRENT_LINK: &str = "current";
const LOCK_FILE: &str = ".lock";
const SLOTS_DIRECTORY: &str = "slots";

/// A place the gateway can run from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    /// What the package installed (`/usr`); never written by an update.
    Factory,
    A,
    B,
}

impl Slot {
    pub fn name(self) -> &'static str {
        match self {
            Slot::Factory => "factory",
            Slot::A => "a",
            Slot::B => "b",
        }
    }
}

/// A slot that has not yet proven it starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trial {
    pub slot: Slot,
    /// Starts counted so far.
    pub attempts: u32,
}

/// The slots' state, kept in `<firmware>/state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotState {
    pub active: Slot,
    /// Where a rollback goes.
    pub previous: Option<Slot>,
    pub trial: Option<Trial>,
    /// The version each written slot holds.
    pub versions: BTreeMap<Slot, String>,
    /// The last transition, for `isthmus update status` and the log.
    pub last_event: Option<String>,
    /// The highest version ever committed: bundles below it are refused unless allowed.
    #[serde(default)]
    pub version_floor: Option<String>,
    /// The slot the last start ran (set by each start's `boot`): when a rollback by hand
    /// made another slot active, this one still runs until a restart.
    #[serde(default)]
    pub running: Option<Slot>,
}

impl Default for SlotState {
    fn default() -> Self {
        SlotState {
            active: Slot::Factory,
            previous: None,
            trial: None,
            versions: BTreeMap::new(),
            last_event: None,
            version_floor: None,
            running: None,
        }
    }
}

/// The version of the package this program came from (the factory slot's, for the
/// `isthmus` on the path that applies updates).
pub const PACKAGE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Orders two versions as semantic versions; `None` when either is not one.
pub fn compare_versions(a: &str, b: &str) -> Option<std::cmp::Ordering> {
    use std::cmp::Ordering;
    fn parse(version: &str) -> Option<(Vec<u64>, Option<&str>)> {
        let version = version
            .split_once('+')
            .map_or(version, |(release, _)| release);
        let (release, pre) = match version.split_once('-') {
            Some((release, pre)) => (release, Some(pre)),
            None => (version, None),
        };
        let numbers = release
            .split('.')
            .map(|part| part.parse::<u64>().ok())
            .collect::<Option<Vec<_>>>()?;
        Some((numbers, pre))
    }
    fn pre_order(a: &str, b: &str) -> Ordering {
        let mut left = a.split('.');
        let mut right = b.split('.');
        loop {
            let order = match (left.next(), right.next()) {
                (None, None) => return Ordering::Equal,
                (None, Some(_)) => return Ordering::Less,
                (Some(_), None) => return Ordering::Greater,
                (Some(x), Some(y)) => match (x.parse::<u64>(), y.parse::<u64>()) {
                    (Ok(x), Ok(y)) => x.cmp(&y),
                    (Ok(_), Err(_)) => Ordering::Less,
                    (Err(_), Ok(_)) => Ordering::Greater,
                    (Err(_), Err(_)) => x.cmp(y),
                },
            };
            if order.is_ne() {
                return order;
            }
        }
    }
    let (a_release, a_pre) = parse(a)?;
    let (b_release, b_pre) = parse(b)?;
    let width = a_release.len().max(b_release.len());
    let padded = |numbers: &[u64]| {
        let mut numbers = numbers.to_vec();
        numbers.resize(width, 0);
        numbers
    };
    Some(
        padded(&a_release)
            .cmp(&padded(&b_release))
            .then_with(|| match (a_pre, b_pre) {
                (None, None) => Ordering::Equal,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some(a), Some(b)) => pre_order(a, b),
            }),
    )
}

/// What a start does, decided by [`boot_step`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootOutcome {
    /// No trial: run the active slot.
    Steady,
    /// The trial slot gets start number `attempt`.
    Trying { slot: Slot, attempt: u32 },
    /// The trial slot used up its starts; `to` runs instead.
    RolledBack { from: Slot, to: Slot },
}

/// Counts a start: a trial slot gets [`ATTEMPTS_MAX`] starts to become ready, then the slot
/// before it runs again.
pub fn boot_step(state: &SlotState) -> (SlotState, BootOutcome) {
    let (mut next, outcome) = count_start(state);
    next.running = Some(next.active);
    (next, outcome)
}

fn count_start(state: &SlotState) -> (SlotState, BootOutcome) {
    let mut next = state.clone();
    let Some(trial) = &state.trial else {
        return (next, BootOutcome::Steady);
    };
    if trial.attempts < ATTEMPTS_MAX {
        let attempt = trial.attempts + 1;
        next.trial = Some(Trial {
            slot: trial.slot,
            attempts: attempt,
        });
        return (
            next,
            BootOutcome::Trying {
                slot: trial.slot,
                attempt,
            },
        );
    }
    let to = state.previous.unwrap_or(Slot::Factory);
    next.active = to;
    next.previous = None;
    next.trial = None;
    next.last_event = Some(format!(
        "rolled back from {} ({}) to {}: not ready after {ATTEMPTS_MAX} starts",
        trial.slot.name(),
        version_of(state, trial.slot),
        to.name()
    ));
    (
        next,
        BootOutcome::RolledBack {
            from: trial.slot,
            to,
        },
    )
}

/// Corrects the state with the slot a started gateway is seen to run (its executable's
/// slot, read by `commit --main-pid`): `running` names it, and a trial of that slot that
/// `boot` did not count — applied between that start's `boot` and its `ExecStart`, which
/// then ran the new slot — counts this start as its first. `None` when nothing changes.
/// Without this, `running` would name the slot before, and a rollback then an `apply` would
/// pass the guard against writing the slot that runs.
pub fn running_step(state: &SlotState, running: Slot) -> Option<SlotState> {
    let mut next = state.clone();
    next.running = Some(running);
    if let Some(trial) = &mut next.trial
        && trial.slot == running
        && trial.attempts == 0
    {
        trial.attempts = 1;
    }
    (next != *state).then_some(next)
}

/// Ends a trial: the active slot became ready. `None` when there is no trial, or when the
/// trial has not started yet (applied while this start, of the slot before it, was under
/// way: that start's readiness says nothing of the slot on trial).
pub fn commit_step(state: &SlotState) -> Option<SlotState> {
    let trial = state.trial.as_ref().filter(|trial| trial.attempts >= 1)?;
    let mut next = state.clone();
    next.trial = None;
    if let Some(version) = state.versions.get(&trial.slot) {
        let raised = match &state.version_floor {
            None => true,
            Some(floor) => compare_versions(version, floor).is_none_or(|order| order.is_gt()),
        };
        if raised {
            next.version_floor = Some(version.clone());
        }
    }
    next.last_event = Some(format!(
        "committed {} ({}) after {} start(s)",
        trial.slot.name(),
        version_of(state, trial.slot),
        trial.attempts
    ));
    Some(next)
}

/// The slot an update goes to (the one of `a` and `b` not running) and the state once it is
/// written: that slot active and on trial, the running one kept for a rollback.
pub fn apply_step(
    state: &SlotState,
    version: &str,
    allow_downgrade: bool,
) -> Result<(Slot, SlotState), UpdateError> {
    if let Some(trial) = &state.trial {
        return Err(UpdateError::TrialPending(trial.slot.name()));
    }
    // After a rollback by hand the slot not active may be the one still running.
    if let Some(running) = state.running
        && running != state.active
    {
        return Err(UpdateError::RestartPending {
            running: running.name(),
            active: state.active.name(),
        });
    }
    // The installed package's own version is a floor too: an appliance that never committed
    // an update must not take a validly signed older release either.
    let floor = match &state.version_floor {
        Some(floor)
            if compare_versions(floor, PACKAGE_VERSION).is_none_or(|order| order.is_gt()) =>
        {
            floor.as_str()
        }
        _ => PACKAGE_VERSION,
    };
    if !allow_downgrade && compare_versions(version, floor).is_none_or(|order| order.is_lt()) {
        return Err(UpdateError::Downgrade {
            version: version.to_owned(),
            floor: floor.to_owned(),
        });
    }
    let target = if state.active == Slot::A {
        Slot::B
    } else {
        Slot::A
    };
    let mut next = state.clone();
    next.previous = Some(state.active);
    next.active = target;
    next.trial = Some(Trial {
        slot: target,
        attempts: 0,
    });
    next.versions.insert(target, version.to_owned());
    next.last_event = Some(format!(
        "applied {version} to {} (on trial; {} was running)",
        target.name(),
        state.active.name()
    ));
    Ok((target, next))
}

/// Goes back to the previous slot by hand.
pub fn rollback_step(state: &SlotState) -> Result<SlotState, UpdateError> {
    let to = state.previous.ok_or(UpdateError::NothingToRollBackTo)?;
    let mut next = state.clone();
    next.active = to;
    next.previous = None;
    next.trial = None;
    next.last_event = Some(format!(
        "rolled back by hand from {} to {}",
        state.active.name(),
        to.name()
    ));
    Ok(next)
}

fn version_of(state: &SlotState, slot: Slot) -> String {
    state
        .versions
        .get(&slot)
        .cloned()
        .unwrap_or_else(|| "version unknown".to_owned())
}

/// One entry of a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestEntry {
    /// Relative path inside the slot, e.g. `bin/isthmus`, `lib/isthmus/libllama.so.0`.
    pub path: String,
    /// A regular file's size, mode and SHA-256 (hex); absent for a link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// A symbolic link's target: a name in the same directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

/// What a bundle holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub version: String,
    pub entries: Vec<ManifestEntry>,
}

/// Why an update step failed. Each names the file or the rule it broke.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("{path}: not an update bundle ({reason})")]
    Format { path: PathBuf, reason: String },
    #[error(
        "{path}: the signature does not verify with any trusted key ({keys} key(s) in {directory})"
    )]
    Untrusted {
        path: PathBuf,
        keys: usize,
        directory: PathBuf,
    },
    #[error("{path}: `{entry}` {reason}")]
    Entry {
        path: PathBuf,
        entry: String,
        reason: String,
    },
    #[error(
        "{0}: only root (or the user running this command) may be able to change update keys and slots (chown root:root, chmod go-w)"
    )]
    Unprotected(String),
    #[error("no trusted update keys in {0} (one PEM Ed25519 public key per *.pub file)")]
    NoKeys(PathBuf),
    #[error("slot {0} is on trial: wait until it is committed or rolled back")]
    TrialPending(&'static str),
    #[error("there is no previous slot to roll back to")]
    NothingToRollBackTo,
    #[error(
        "slot {running} still runs while {active} is active (a rollback waits for a restart): restart the service before applying an update, which would overwrite {running}"
    )]
    RestartPending {
        running: &'static str,
        active: &'static str,
    },
    #[error("the bundle has no bin/isthmus")]
    NoBinary,
    #[error(
        "version {version} is below {floor}, the highest version this appliance has committed: refused as a downgrade (apply it with --allow-downgrade if that is meant)"
    )]
    Downgrade { version: String, floor: String },
}

fn io_error(path: &Path) -> impl Fn(io::Error) -> UpdateError + '_ {
    move |error| UpdateError::Io {
        path: path.to_owned(),
        reason: io_reason(&error),
    }
}

/// Reads the trusted keys: every `*.pub` file of `directory`.
pub fn read_trusted_keys(directory: &Path) -> Result<Vec<VerifyingKey>, UpdateError> {
    files::check_protected(directory).map_err(UpdateError::Unprotected)?;
    let mut keys = Vec::new();
    let entries = fs::read_dir(directory).map_err(io_error(directory))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "pub"))
        .collect();
    paths.sort();
    for path in paths {
        files::check_protected(&path).map_err(UpdateError::Unprotected)?;
        let contents = fs::read(&path).map_err(io_error(&path))?;
        let key =
            crate::keys::parse_public_key(&contents).map_err(|reason| UpdateError::Format {
                path: path.clone(),
                reason,
            })?;
        keys.push(key);
    }
    if keys.is_empty() {
        return Err(UpdateError::NoKeys(directory.to_owned()));
    }
    Ok(keys)
}

/// Writes a bundle of every file and link under `root` (sorted by path) to `out`, signed
/// with `key`. Returns its manifest.
pub fn pack(
    root: &Path,
    version: &str,
    key: &SigningKey,
    out: &Path,
) -> Result<Manifest, UpdateError> {
    let mut paths = Vec::new();
    walk(root, root, &mut paths)?;
    paths.sort();
    if !paths.iter().any(|path| path == "bin/isthmus") {
        return Err(UpdateError::NoBinary);
    }
    let mut entries = Vec::new();
    for relative in &paths {
        let path = root.join(relative);
        let metadata = fs::symlink_metadata(&path).map_err(io_error(&path))?;
        if metadata.file_type().is_symlink() {
            let target = fs::read_link(&path).map_err(io_error(&path))?;
            entries.push(ManifestEntry {
                path: relative.clone(),
                size: None,
                mode: None,
                sha256: None,
                link: Some(target.to_string_lossy().into_owned()),
            });
        } else {
            let mut file = fs::File::open(&path).map_err(io_error(&path))?;
            let mut hasher = Sha256::new();
            io::copy(&mut file, &mut hasher).map_err(io_error(&path))?;
            entries.push(ManifestEntry {
                path: relative.clone(),
                size: Some(metadata.len()),
                mode: Some(metadata.permissions().mode() & 0o755),
                sha256: Some(hex::encode(hasher.finalize())),
                link: None,
            });
        }
    }
    let manifest = Manifest {
        version: version.to_owned(),
        entries,
    };
    check_manifest(out, &manifest)?;
    let manifest_bytes = serde_json::to_vec(&manifest).map_err(|error| UpdateError::Format {
        path: out.to_owned(),
        reason: error.to_string(),
    })?;
    let mut message = SIGNATURE_CONTEXT.to_vec();
    message.extend_from_slice(&manifest_bytes);
    let signature = BASE64.encode(key.sign(&message).to_bytes());
    let write = || -> io::Result<()> {
        let mut bundle = io::BufWriter::new(fs::File::create(out)?);
        write!(
            bundle,
            "{MAGIC}\nsignature: {signature}\nmanifest-bytes: {}\n\n",
            manifest_bytes.len()
        )?;
        bundle.write_all(&manifest_bytes)?;
        for entry in &manifest.entries {
            if entry.link.is_none() {
                io::copy(&mut fs::File::open(root.join(&entry.path))?, &mut bundle)?;
            }
        }
        bundle
            .into_inner()
            .map_err(io::IntoInnerError::into_error)?
            .sync_all()
    };
    write().map_err(io_error(out))?;
    Ok(manifest)
}

fn walk(root: &Path, directory: &Path, paths: &mut Vec<String>) -> Result<(), UpdateError> {
    for entry in fs::read_dir(directory).map_err(io_error(directory))? {
        let entry = entry.map_err(io_error(directory))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(io_error(&path))?;
        if kind.is_dir() {
            walk(root, &path, paths)?;
        } else if (kind.is_file() || kind.is_symlink())
            && let Ok(relative) = path.strip_prefix(root)
        {
            paths.push(relative.to_string_lossy().into_owned());
        }
    }
    Ok(())
}

/// A bundle whose header and manifest were read and whose signature verified; its files are
/// still to be read (and checked against the manifest) by [`Verified::install`].
#[derive(Debug)]
pub struct Verified {
    pub manifest: Manifest,
    /// Names the key that signed it.
    pub key_id: String,
    path: PathBuf,
    reader: BufReader<fs::File>,
}

/// Opens `path`, reads its manifest and checks its signature against `keys`.
pub fn open_verified(
    path: &Path,
    keys: &[VerifyingKey],
    keys_directory: &Path,
) -> Result<Verified, UpdateError> {
    let format = |reason: &str| UpdateError::Format {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let file = fs::File::open(path).map_err(io_error(path))?;
    let mut reader = BufReader::new(file);
    let mut line = || -> Result<String, UpdateError> {
        let mut bytes = Vec::new();
        (&mut reader)
            .take(HEADER_LINE_BYTES_MAX as u64)
            .read_until(b'\n', &mut bytes)
            .map_err(io_error(path))?;
        let text = String::from_utf8(bytes).map_err(|_| format("the header is not text"))?;
        text.strip_suffix('\n')
            .map(str::to_owned)
            .ok_or_else(|| format("a header line is cut short"))
    };
    if line()? != MAGIC {
        return Err(format("it does not start with `ISTHMUS-UPDATE 1`"));
    }
    let signature = line()?
        .strip_prefix("signature: ")
        .map(str::to_owned)
        .ok_or_else(|| format("no `signature:` line"))?;
    let length: usize = line()?
        .strip_prefix("manifest-bytes: ")
        .and_then(|length| length.parse().ok())
        .filter(|length| *length <= MANIFEST_BYTES_MAX)
        .ok_or_else(|| format("no valid `manifest-bytes:` line"))?;
    if !line()?.is_empty() {
        return Err(format("no blank line after the header"));
    }
    let mut manifest_bytes = vec![0; length];
    reader
        .read_exact(&mut manifest_bytes)
        .map_err(|_| format("the manifest is cut short"))?;
    let signature = BASE64
        .decode(signature)
        .ok()
        .and_then(|bytes| Signature::from_slice(&bytes).ok())
        .ok_or_else(|| format("the signature is not a base64 Ed25519 signature"))?;
    let mut message = SIGNATURE_CONTEXT.to_vec();
    message.extend_from_slice(&manifest_bytes);
    let key = keys
        .iter()
        .find(|key| key.verify(&message, &signature).is_ok())
        .ok_or_else(|| UpdateError::Untrusted {
            path: path.to_owned(),
            keys: keys.len(),
            directory: keys_directory.to_owned(),
        })?;
    // Only signed bytes are parsed.
    let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
        .map_err(|error| format(&format!("the manifest: {error}")))?;
    check_manifest(path, &manifest)?;
    Ok(Verified {
        manifest,
        key_id: crate::keys::key_id(key),
        path: path.to_owned(),
        reader,
    })
}

/// Checks what a manifest may hold: relative paths of plain names, links to a name in the
/// same directory, sizes and modes within bounds, a `bin/isthmus` to run.
fn check_manifest(path: &Path, manifest: &Manifest) -> Result<(), UpdateError> {
    let entry_error = |entry: &str, reason: &str| UpdateError::Entry {
        path: path.to_owned(),
        entry: entry.to_owned(),
        reason: reason.to_owned(),
    };
    if manifest.entries.len() > FILES_MAX {
        return Err(UpdateError::Format {
            path: path.to_owned(),
            reason: format!("more than {FILES_MAX} entries"),
        });
    }
    if manifest.version.is_empty()
        || manifest.version.len() > 64
        || !manifest.version.chars().all(plain_character)
    {
        return Err(UpdateError::Format {
            path: path.to_owned(),
            reason: "the version must be 1 to 64 letters, digits, `.`, `-`, `_` or `+`".to_owned(),
        });
    }
    let mut seen = std::collections::BTreeSet::new();
    for entry in &manifest.entries {
        let name = entry.path.as_str();
        let relative = Path::new(name);
        let plain = !name.is_empty()
            && name.len() <= 255
            && relative
                .components()
                .all(|component| matches!(component, Component::Normal(_)))
            && name.split('/').all(|part| {
                !part.is_empty() && !part.starts_with('.') && part.chars().all(plain_character)
            });
        if !plain {
            return Err(entry_error(
                name,
                "is not a plain relative path (letters, digits, `.-_+`, no `..`)",
            ));
        }
        if !seen.insert(name) {
            return Err(entry_error(name, "appears twice"));
        }
        match (&entry.link, entry.size, &entry.sha256, entry.mode) {
            (Some(target), None, None, None) => {
                if target.is_empty()
                    || target.starts_with('.')
                    || !target.chars().all(plain_character)
                {
                    return Err(entry_error(
                        name,
                        "links outside its directory (a link names a file beside it)",
                    ));
                }
            }
            (None, Some(size), Some(sha256), Some(mode)) => {
                if size > FILE_BYTES_MAX {
                    return Err(entry_error(name, "is too large"));
                }
                if sha256.len() != 64 || !sha256.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(entry_error(name, "has no valid SHA-256"));
                }
                if mode & !0o755 != 0 {
                    return Err(entry_error(name, "has a mode beyond 0755"));
                }
            }
            _ => {
                return Err(entry_error(
                    name,
                    "must be a file (size, mode, sha256) or a link (link)",
                ));
            }
        }
    }
    if !manifest
        .entries
        .iter()
        .any(|entry| entry.path == "bin/isthmus" && entry.link.is_none())
    {
        return Err(UpdateError::NoBinary);
    }
    Ok(())
}

/// Makes `directory` and every directory below it durable (their entries: the files'
/// data is synced as each is written), so that a slot renamed into place after a power loss
/// is the slot that was written, not one missing files.
fn sync_directories(directory: &Path) -> io::Result<()> {
    for entry in fs::read_dir(directory)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            sync_directories(&entry.path())?;
        }
    }
    files::sync_directory(directory)
}

fn plain_character(character: char) -> bool {
    character.is_ascii_alphanumeric() || matches!(character, '.' | '-' | '_' | '+')
}

impl Verified {
    /// Writes the files into `directory` (created; must not exist), checking each one's size
    /// and SHA-256 as it streams. On any mismatch the directory is removed again.
    pub fn install(mut self, directory: &Path) -> Result<Manifest, UpdateError> {
        files::create_directories_with_mode(directory, SLOT_DIRECTORY_MODE)
            .map_err(io_error(directory))?;
        let outcome = self
            .write_entries(directory)
            .and_then(|()| sync_directories(directory).map_err(io_error(directory)));
        if outcome.is_err() {
            let _ = fs::remove_dir_all(directory);
        }
        outcome.map(|()| self.manifest)
    }

    fn write_entries(&mut self, directory: &Path) -> Result<(), UpdateError> {
        let bundle = self.path.clone();
        for entry in &self.manifest.entries {
            let target = directory.join(&entry.path);
            if let Some(parent) = target.parent() {
                files::create_directories_with_mode(parent, SLOT_DIRECTORY_MODE)
                    .map_err(io_error(parent))?;
            }
            if let Some(link) = &entry.link {
                std::os::unix::fs::symlink(link, &target).map_err(io_error(&target))?;
                continue;
            }
            let (Some(size), Some(sha256), Some(mode)) = (entry.size, &entry.sha256, entry.mode)
            else {
                continue;
            };
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&target)
                .map_err(io_error(&target))?;
            let mut hashing = HashingWriter {
                inner: &mut file,
                hasher: Sha256::new(),
            };
            let copied = io::copy(&mut (&mut self.reader).take(size), &mut hashing)
                .map_err(io_error(&bundle))?;
            let digest = hex::encode(hashing.hasher.finalize());
            if copied != size {
                return Err(UpdateError::Entry {
                    path: bundle,
                    entry: entry.path.clone(),
                    reason: format!("is cut short ({copied} of {size} bytes)"),
                });
            }
            if &digest != sha256 {
                return Err(UpdateError::Entry {
                    path: bundle,
                    entry: entry.path.clone(),
                    reason: "does not match its SHA-256 in the signed manifest".to_owned(),
                });
            }
            file.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(io_error(&target))?;
            file.sync_all().map_err(io_error(&target))?;
        }
        let mut rest = [0_u8; 1];
        if self.reader.read(&mut rest).map_err(io_error(&bundle))? != 0 {
            return Err(UpdateError::Format {
                path: bundle,
                reason: "bytes follow the last file".to_owned(),
            });
        }
        Ok(())
    }
}

struct HashingWriter<'a> {
    inner: &'a mut fs::File,
    hasher: Sha256,
}

impl Write for HashingWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(bytes)?;
        self.hasher.update(&bytes[..written]);
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The firmware directory (`/var/lib/isthmus-firmware` on the appliance), with its slots,
/// state and `current` link.
#[derive(Debug, Clone)]
pub struct Firmware {
    directory: PathBuf,
    /// Where the factory slot lives (`/usr` for the package: `bin/isthmus` under it).
    factory_root: PathBuf,
}

/// What [`Firmware::apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub slot: Slot,
    pub version: String,
    pub key_id: String,
    pub files: usize,
}

impl Firmware {
    pub fn new(directory: &Path, factory_root: &Path) -> Firmware {
        Firmware {
            directory: directory.to_owned(),
            factory_root: factory_root.to_owned(),
        }
    }

    /// `<firmware>/current`: run `current/bin/isthmus`.
    pub fn current_link(&self) -> PathBuf {
        self.directory.join(CURRENT_LINK)
    }

    /// Where `slot`'s files are.
    pub fn slot_root(&self, slot: Slot) -> PathBuf {
        match slot {
            Slot::Factory => self.factory_root.clone(),
            Slot::A | Slot::B => self.directory.join(SLOTS_DIRECTORY).join(slot.name()),
        }
    }

    /// The state, or the default (factory, nothing applied) when none was written.
    pub fn state(&self) -> Result<SlotState, UpdateError> {
        let path = self.directory.join(STATE_FILE);
        match files::read_optional_capped(&path, 64 * 1024).map_err(io_error(&path))? {
            None => Ok(SlotState::default()),
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|error| UpdateError::Format {
                path,
                reason: error.to_string(),
            }),
        }
    }

    /// Creates the directory if needed, checks that no other user can change it, and takes
    /// its lock.
    fn lock(&self) -> Result<files::DirectoryLock, UpdateError> {
        files::create_directories_with_mode(&self.directory, SLOT_DIRECTORY_MODE)
            .map_err(io_error(&self.directory))?;
        files::check_protected(&self.directory).map_err(UpdateError::Unprotected)?;
        let path = self.directory.join(LOCK_FILE);
        files::DirectoryLock::acquire(&path).map_err(io_error(&path))
    }

    /// Writes `state` and points `current` at its active slot, each atomically (state first:
    /// a crash between the two is repaired by the next [`Firmware::boot`]).
    fn save(&self, state: &SlotState) -> Result<(), UpdateError> {
        let path = self.directory.join(STATE_FILE);
        let mut bytes = serde_json::to_vec_pretty(state).map_err(|error| UpdateError::Format {
            path: path.clone(),
            reason: error.to_string(),
        })?;
        bytes.push(b'\n');
        files::StagedFile::write(&path, &bytes, files::PUBLIC_FILE_MODE)
            .and_then(files::StagedFile::commit)
            .map_err(io_error(&path))?;
        self.point_current(state.active)?;
        files::sync_directory(&self.directory).map_err(io_error(&self.directory))
    }

    fn point_current(&self, slot: Slot) -> Result<(), UpdateError> {
        let link = self.current_link();
        let target = self.slot_root(slot);
        if fs::read_link(&link).is_ok_and(|existing| existing == target) {
            return Ok(());
        }
        let temporary = self.directory.join(".current.tmp");
        let _ = fs::remove_file(&temporary);
        std::os::unix::fs::symlink(&target, &temporary).map_err(io_error(&temporary))?;
        fs::rename(&temporary, &link).map_err(io_error(&link))
    }

    /// Verifies `bundle` with the keys of `keys_directory` and installs it into the slot not
    /// running, which becomes active on trial. The running slot is untouched.
    pub fn apply(
        &self,
        bundle: &Path,
        keys_directory: &Path,
        allow_downgrade: bool,
    ) -> Result<Applied, UpdateError> {
        let keys = read_trusted_keys(keys_directory)?;
        let verified = open_verified(bundle, &keys, keys_directory)?;
        let _lock = self.lock()?;
        let state = self.state()?;
        let (slot, next) = apply_step(&state, &verified.manifest.version, allow_downgrade)?;
        let root = self.slot_root(slot);
        let staging = self
            .directory
            .join(SLOTS_DIRECTORY)
            .join(format!(".{}.staging", slot.name()));
        let _ = fs::remove_dir_all(&staging);
        let key_id = verified.key_id.clone();
        let manifest = verified.install(&staging)?;
        // The slot is about to go: first the state stops naming it (a rollback to it, its
        // version), so that a crash or a failed save from here on leaves no state that
        // points at a missing or half-written slot.
        if state.previous == Some(slot) || state.versions.contains_key(&slot) {
            let mut forgotten = state.clone();
            if forgotten.previous == Some(slot) {
                forgotten.previous = None;
            }
            forgotten.versions.remove(&slot);
            self.save(&forgotten)?;
        }
        match fs::remove_dir_all(&root) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(io_error(&root)(error)),
        }
        fs::rename(&staging, &root).map_err(io_error(&root))?;
        // The rename itself, before the state names the slot.
        let slots = self.directory.join(SLOTS_DIRECTORY);
        files::sync_directory(&slots).map_err(io_error(&slots))?;
        self.save(&next)?;
        Ok(Applied {
            slot,
            version: manifest.version,
            key_id,
            files: manifest.entries.len(),
        })
    }

    /// Counts a start (the unit's `ExecStartPre`): see [`boot_step`]. Also repairs `current`
    /// if it does not point at the active slot.
    pub fn boot(&self) -> Result<(BootOutcome, SlotState), UpdateError> {
        let _lock = self.lock()?;
        let state = self.state()?;
        let (next, outcome) = boot_step(&state);
        self.save(&next)?;
        Ok((outcome, next))
    }

    /// Ends the trial of the active slot (the unit's `ExecStartPost`, after `READY=1`).
    pub fn commit(&self) -> Result<Option<SlotState>, UpdateError> {
        self.commit_if(|_| true)
    }

    /// Ends the trial `expected` if it is still the one pending: for a caller that waited
    /// after reading the state, where a rollback by hand or another start in the meantime
    /// leaves nothing to commit.
    pub fn commit_trial(&self, expected: &Trial) -> Result<Option<SlotState>, UpdateError> {
        self.commit_if(|state| state.trial.as_ref() == Some(expected))
    }

    fn commit_if(
        &self,
        still_meant: impl FnOnce(&SlotState) -> bool,
    ) -> Result<Option<SlotState>, UpdateError> {
        let _lock = self.lock()?;
        let state = self.state()?;
        if !still_meant(&state) {
            return Ok(None);
        }
        match commit_step(&state) {
            Some(next) => {
                self.save(&next)?;
                Ok(Some(next))
            }
            None => Ok(None),
        }
    }

    /// The slot whose tree holds `executable` (a running gateway's `/proc/PID/exe`), if any.
    pub fn slot_of(&self, executable: &Path) -> Option<Slot> {
        let executable = fs::canonicalize(executable).ok()?;
        [Slot::A, Slot::B, Slot::Factory].into_iter().find(|slot| {
            fs::canonicalize(self.slot_root(*slot)).is_ok_and(|root| executable.starts_with(root))
        })
    }

    /// Records that a started gateway runs `slot` ([`running_step`]); the state after.
    pub fn note_running(&self, slot: Slot) -> Result<SlotState, UpdateError> {
        let _lock = self.lock()?;
        let state = self.state()?;
        match running_step(&state, slot) {
            Some(next) => {
                self.save(&next)?;
                Ok(next)
            }
            None => Ok(state),
        }
    }

    /// Goes back to the previous slot.
    pub fn rollback(&self) -> Result<SlotState, UpdateError> {
        let _lock = self.lock()?;
        let state = self.state()?;
        let next = rollback_step(&state)?;
        self.save(&next)?;
        Ok(next)
    }
}

#[cfg(test)]
mod tests;
