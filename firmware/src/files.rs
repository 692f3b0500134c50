//! File-system helpers shared by the state directory and TLS provisioning: private directories,
//! capped reads, and atomic writes that never expose a file with looser permissions than its
//! final ones (the temporary file is created with the final mode, fsynced, then renamed).

use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[cfg(test)]
mod tests;

/// Mode of private directories (the state directory when we create it, `tls/`).
pub(crate) const PRIVATE_DIRECTORY_MODE: u32 = 0o700;
/// Mode of private keys.
pub(crate) const PRIVATE_FILE_MODE: u32 = 0o600;
/// Mode of certificates, which anyone on the machine may read.
pub(crate) const PUBLIC_FILE_MODE: u32 = 0o644;

/// An `io::Error` as a lowercase reason without the `(os error N)` suffix, for messages such as
/// `writing /var/lib/isthmus/tls/server-key.pem: permission denied`.
pub(crate) fn io_reason(error: &io::Error) -> String {
    let text = error.to_string();
    let text = match (error.raw_os_error(), text.rfind(" (os error ")) {
        (Some(_), Some(index)) => text[..index].to_owned(),
        _ => text,
    };
    let mut characters = text.chars();
    match characters.next() {
        Some(first) => first.to_lowercase().chain(characters).collect(),
        None => text,
    }
}

/// Creates `path` (and missing parents) with mode 0700. Existing directories are left as they
/// are; use [`restrict_directory`] to tighten one.
pub(crate) fn create_private_directory(path: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIRECTORY_MODE)
        .create(path)
}

/// The permission bits (`0o7777`) of `path`, following symbolic links.
pub(crate) fn mode_of(path: &Path) -> io::Result<u32> {
    Ok(fs::metadata(path)?.permissions().mode() & 0o7777)
}

/// Sets the permission bits of `path` to exactly `mode`.
pub(crate) fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    fs::set_permissions(path, Permissions::from_mode(mode))
}

/// Reads `path` whole if it exists and is at most `bytes_max` long. `Ok(None)` when it does not
/// exist; an `InvalidData` error when it is longer than the limit.
pub(crate) fn read_optional_capped(path: &Path, bytes_max: u64) -> io::Result<Option<Vec<u8>>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    let mut contents = Vec::new();
    file.take(bytes_max.saturating_add(1))
        .read_to_end(&mut contents)?;
    if u64::try_from(contents.len()).map_or(true, |length| length > bytes_max) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("file is larger than {bytes_max} bytes"),
        ));
    }
    Ok(Some(contents))
}

/// A file written to a temporary name next to its final path, with its final mode, and synced;
/// [`StagedFile::commit`] renames it into place. Dropping it uncommitted removes the temporary.
#[derive(Debug)]
pub(crate) struct StagedFile {
    temporary_path: PathBuf,
    final_path: PathBuf,
    committed: bool,
}

impl StagedFile {
    /// Writes `contents` to `.<name>.tmp` beside `final_path`. The temporary file is created with
    /// `mode` (so a key is never readable by others, not even briefly) and then set to exactly
    /// `mode`, whatever the umask. Callers hold the directory's provisioning lock, so a leftover
    /// temporary file from a crash can be removed first.
    pub(crate) fn write(final_path: &Path, contents: &[u8], mode: u32) -> io::Result<StagedFile> {
        let temporary_path = temporary_path_for(final_path)?;
        match fs::remove_file(&temporary_path) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temporary_path)?;
        let staged = StagedFile {
            temporary_path,
            final_path: final_path.to_owned(),
            committed: false,
        };
        file.set_permissions(Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()?;
        Ok(staged)
    }

    /// The final path this file will have.
    pub(crate) fn final_path(&self) -> &Path {
        &self.final_path
    }

    /// Renames the temporary file over the final path (atomic on one file system). The caller
    /// syncs the directory once all files of a batch are committed.
    pub(crate) fn commit(mut self) -> io::Result<()> {
        fs::rename(&self.temporary_path, &self.final_path)?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: the next provisioning removes a leftover temporary file anyway.
            let _ = fs::remove_file(&self.temporary_path);
        }
    }
}

fn temporary_path_for(final_path: &Path) -> io::Result<PathBuf> {
    let name = final_path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut temporary_name = std::ffi::OsString::from(".");
    temporary_name.push(name);
    temporary_name.push(".tmp");
    Ok(final_path.with_file_name(temporary_name))
}

/// Creates `path` and missing parents, each new directory with exactly `mode` whatever the
/// umask (an update slot must stay readable by the service's user when root's umask is 0077).
/// Existing directories are left as they are.
pub(crate) fn create_directories_with_mode(path: &Path, mode: u32) -> io::Result<()> {
    let missing: Vec<&Path> = path
        .ancestors()
        .take_while(|step| !step.as_os_str().is_empty() && fs::symlink_metadata(step).is_err())
        .collect();
    for step in missing.into_iter().rev() {
        match fs::create_dir(step) {
            Ok(()) => set_mode(step, mode)?,
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// Flushes a directory's entries (the renames into it) to disk.
pub(crate) fn sync_directory(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// An exclusive advisory lock on a file, held until dropped (closing the file releases it).
#[derive(Debug)]
pub(crate) struct DirectoryLock {
    _file: File,
}

impl DirectoryLock {
    /// Creates `path` (mode 0600) if needed and blocks until it holds an exclusive lock on it.
    pub(crate) fn acquire(path: &Path) -> io::Result<DirectoryLock> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(PRIVATE_FILE_MODE)
            .open(path)?;
        file.lock()?;
        Ok(DirectoryLock { _file: file })
    }
}

/// Why a path is not protected from other users, or `None` when it is: what
/// [`check_protected`] decides for one file or directory on the way to the path.
///
/// Trusted owners are root and `user` (the user running the check). Nothing may be writable
/// by group or others, except a directory above the path that has the sticky bit (`/tmp`):
/// there others may create names but not rename or remove ours, and the next component's
/// owner is checked in turn.
pub(crate) fn protection_problem(
    owner: u32,
    mode: u32,
    user: u32,
    is_last: bool,
) -> Option<String> {
    if owner != 0 && owner != user {
        return Some(format!(
            "owned by user {owner}, neither root nor this user ({user})"
        ));
    }
    let sticky = mode & 0o1000 != 0;
    if mode & 0o022 != 0 && (is_last || !sticky) {
        return Some(format!(
            "writable by group or others (mode {:04o})",
            mode & 0o7777
        ));
    }
    None
}

/// Checks that no user but root and the one running this can change `path`: it and every
/// directory above it, both as written and with its symbolic links resolved, are owned by
/// one of them and not writable by group or others (see [`protection_problem`]); a link on
/// the way is owned by one of them. The update
/// keys and slots are read by root-run commands, so a directory the service's user could
/// write would let a compromised gateway choose what root installs next.
pub(crate) fn check_protected(path: &Path) -> Result<(), String> {
    let user = effective_user()
        .map_err(|error| format!("reading this process's user: {}", io_reason(&error)))?;
    let absolute = std::path::absolute(path)
        .map_err(|error| format!("{}: {}", path.display(), io_reason(&error)))?;
    let resolved = fs::canonicalize(&absolute)
        .map_err(|error| format!("{}: {}", path.display(), io_reason(&error)))?;
    for chain in [&absolute, &resolved] {
        for (index, step) in chain.ancestors().enumerate() {
            // Each name as it is: a link is judged by its own owner (who can point it
            // elsewhere: in a sticky `/tmp`, anyone's link would otherwise pass for the
            // protected directory it points at now), its target by the resolved chain.
            let metadata = fs::symlink_metadata(step)
                .map_err(|error| format!("{}: {}", step.display(), io_reason(&error)))?;
            use std::os::unix::fs::MetadataExt as _;
            let problem = if metadata.file_type().is_symlink() {
                (metadata.uid() != 0 && metadata.uid() != user).then(|| {
                    format!(
                        "a link owned by user {}, neither root nor this user ({user})",
                        metadata.uid()
                    )
                })
            } else {
                protection_problem(metadata.uid(), metadata.mode(), user, index == 0)
            };
            if let Some(problem) = problem {
                return Err(format!("{}: {problem}", step.display()));
            }
        }
    }
    Ok(())
}

/// This process's effective user id, from `/proc/self/status` (its `Uid:` line: real,
/// effective, saved, file system).
fn effective_user() -> io::Result<u32> {
    let status = fs::read_to_string("/proc/self/status")?;
    parse_effective_user(&status).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "/proc/self/status has no Uid: line",
        )
    })
}

pub(crate) fn parse_effective_user(status: &str) -> Option<u32> {
    let line = status.lines().find_map(|line| line.strip_prefix("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
