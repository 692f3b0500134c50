//! The state directory: where the appliance keeps what it provisions (`tls/`) between starts.
//!
//! [`StateDir::open`] creates it private (mode 0700, parents included) on first start and
//! checks on every start that it is a writable directory, so that a misconfigured path fails
//! at start-up with the path in the message instead of at the first write.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::files::{self, io_reason};

#[cfg(test)]
mod tests;

/// Name of the TLS sub-directory.
const TLS_DIRECTORY_NAME: &str = "tls";
/// Name of the file created and removed to prove the directory is writable (followed by the
/// process id, so that two processes opening the directory at once do not collide).
const WRITE_PROBE_FILE_PREFIX: &str = ".write-probe.";

/// An opened state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDir {
    root: PathBuf,
}

/// Why the state directory could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("creating state directory {}: {}", .path.display(), io_reason(.io))]
    Create { path: PathBuf, io: io::Error },
    #[error("inspecting state directory {}: {}", .path.display(), io_reason(.io))]
    Inspect { path: PathBuf, io: io::Error },
    #[error("state directory {} is not a directory", .path.display())]
    NotADirectory { path: PathBuf },
    #[error("state directory {} is not writable: {}", .path.display(), io_reason(.io))]
    NotWritable { path: PathBuf, io: io::Error },
}

impl StateDir {
    /// Opens the state directory, creating it (and parents) with mode 0700 if missing;
    /// errors clearly (naming the path) if it is not a directory or not writable.
    ///
    /// An existing directory keeps its mode (systemd's `StateDirectory=` or the package may have
    /// chosen it); what is secret inside it lives in `tls/`, which provisioning keeps at 0700.
    pub fn open(root: &Path) -> Result<StateDir, StateError> {
        let path = root.to_owned();
        match fs::metadata(root) {
            Ok(metadata) if metadata.is_dir() => {}
            Ok(_) => return Err(StateError::NotADirectory { path }),
            Err(io) if io.kind() == io::ErrorKind::NotFound => {
                files::create_private_directory(root).map_err(|io| StateError::Create {
                    path: path.clone(),
                    io,
                })?;
            }
            Err(io) if io.kind() == io::ErrorKind::NotADirectory => {
                // A parent is a file: say so about the path we were asked for.
                return Err(StateError::NotADirectory { path });
            }
            Err(io) => return Err(StateError::Inspect { path, io }),
        }
        check_writable(root).map_err(|io| StateError::NotWritable {
            path: path.clone(),
            io,
        })?;
        Ok(StateDir { root: path })
    }

    /// The root of the state directory, as given to [`StateDir::open`].
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// `<root>/tls`, created with mode 0700 on demand by provisioning.
    pub fn tls_dir(&self) -> PathBuf {
        self.root.join(TLS_DIRECTORY_NAME)
    }
}

/// Creates and removes a probe file: the only reliable test of writability (permissions, ACLs,
/// read-only mounts and running as root all count).
fn check_writable(root: &Path) -> io::Result<()> {
    let probe = root.join(format!("{WRITE_PROBE_FILE_PREFIX}{}", std::process::id()));
    match fs::remove_file(&probe) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(files::PRIVATE_FILE_MODE)
        .open(&probe)?;
    fs::remove_file(&probe)
}
