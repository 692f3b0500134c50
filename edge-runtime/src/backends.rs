//! Which llama.cpp backend modules may be loaded.
//!
//! A backend module must come from the very llama.cpp sources this binary was built with:
//! ggml's backend interface has no stable ABI, and a module from other sources can crash or,
//! worse, compute wrong results. So before anything is loaded, every `libggml-*.so` in the
//! backends directory is checked, and start-up stops with a clear error if one fails:
//!
//! - CPU variants are built by the same cargo build as the binary; their SHA-256 digests are
//!   compiled in (`build.rs`) and must match.
//! - Other modules (the CUDA backend, built on a GPU host by `deploy/cuda/build-backend`) must
//!   carry the llama.cpp source fingerprint as their ELF build id (the build script links them
//!   with `--build-id=0x<fingerprint>`).
//!
//! The source fingerprint is the SHA-256 of the `sha256sum` listing of every file under
//! `ggml/`, `include/` and `src/` of the llama.cpp tree, sorted by path — what
//! `find ggml include src -type f | LC_ALL=C sort | xargs sha256sum | sha256sum` prints.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The source fingerprint of the llama.cpp this binary was built with, as hexadecimal.
pub fn source_fingerprint() -> &'static str {
    option_env!("ISTHMUS_LLAMA_SOURCE_FINGERPRINT").unwrap_or("")
}

/// The directory the build left the CPU backend modules in, when this binary was built with
/// them (the modules a package must ship beside the binary, unchanged).
pub fn build_dir() -> Option<&'static str> {
    option_env!("ISTHMUS_BUILD_BACKENDS_DIR")
}

/// The CPU backend modules built with this binary: (file name, SHA-256 as hexadecimal).
pub fn cpu_modules() -> Vec<(&'static str, &'static str)> {
    cpu_module_digests()
}

/// `file=sha256` of each CPU backend module built with this binary.
fn cpu_module_digests() -> Vec<(&'static str, &'static str)> {
    option_env!("ISTHMUS_CPU_BACKEND_DIGESTS")
        .unwrap_or("")
        .split(';')
        .filter_map(|pair| pair.split_once('='))
        .collect()
}

/// Why a backends directory cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendCheckError {
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error(
        "{path}: this CPU backend module is not the one built with this binary (SHA-256 {found}); \
         install the backends that ship with this release"
    )]
    CpuModuleMismatch { path: PathBuf, found: String },
    #[error(
        "{path}: built from other llama.cpp sources (build id {found}, expected {expected}); \
         rebuild it from this release's sources with deploy/cuda/build-backend"
    )]
    SourceMismatch {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("{path}: not a 64-bit little-endian ELF shared object")]
    NotElf { path: PathBuf },
}

/// What a checked directory holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CheckedBackends {
    pub cpu_modules: Vec<String>,
    pub other_modules: Vec<String>,
}

/// Checks every backend module in `dir` (see the module documentation).
pub fn check_dir(dir: &Path) -> Result<CheckedBackends, BackendCheckError> {
    let entries = std::fs::read_dir(dir).map_err(|error| BackendCheckError::Io {
        path: dir.to_path_buf(),
        reason: error.to_string(),
    })?;
    // Names compared as bytes, as llama.cpp's loader compares them: a module whose name is
    // not UTF-8 is refused, not skipped (the loader would still open it), and so is a
    // directory that cannot be read whole.
    let mut names: Vec<String> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|error| BackendCheckError::Io {
            path: dir.to_path_buf(),
            reason: error.to_string(),
        })?;
        let name = entry.file_name();
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(name.as_os_str());
        if !(bytes.starts_with(b"libggml-") && bytes.ends_with(b".so")) {
            continue;
        }
        match name.into_string() {
            Ok(name) => names.push(name),
            Err(name) => {
                return Err(BackendCheckError::Io {
                    path: dir.join(name),
                    reason: "a backend module's name is not UTF-8; remove it".to_owned(),
                });
            }
        }
    }
    names.sort();
    let digests = cpu_module_digests();
    let mut checked = CheckedBackends::default();
    for name in names {
        let path = dir.join(&name);
        if name.starts_with("libggml-cpu") {
            let found = file_sha256(&path)?;
            let expected = digests
                .iter()
                .find(|(file, _)| *file == name)
                .map(|(_, digest)| *digest);
            if expected != Some(found.as_str()) {
                return Err(BackendCheckError::CpuModuleMismatch { path, found });
            }
            checked.cpu_modules.push(name);
        } else {
            let bytes = std::fs::read(&path).map_err(|error| BackendCheckError::Io {
                path: path.clone(),
                reason: error.to_string(),
            })?;
            let found = build_id(&bytes)
                .ok_or_else(|| BackendCheckError::NotElf { path: path.clone() })?
                .map(hex::encode)
                .unwrap_or_else(|| "none".to_owned());
            // A build without a fingerprint trusts no module but its own CPU ones.
            if source_fingerprint().is_empty() || found != source_fingerprint() {
                return Err(BackendCheckError::SourceMismatch {
                    path,
                    found,
                    expected: source_fingerprint().to_owned(),
                });
            }
            checked.other_modules.push(name);
        }
    }
    Ok(checked)
}

fn file_sha256(path: &Path) -> Result<String, BackendCheckError> {
    let mut file = std::fs::File::open(path).map_err(|error| BackendCheckError::Io {
        path: path.to_path_buf(),
        reason: error.to_string(),
    })?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0_u8; 1 << 16];
    loop {
        let read = file
            .read(&mut buffer)
            .map_err(|error| BackendCheckError::Io {
                path: path.to_path_buf(),
                reason: error.to_string(),
            })?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// The GNU build id of a 64-bit little-endian ELF file: `None` if the bytes are not such a
/// file, `Some(None)` if it has no build id.
pub fn build_id(bytes: &[u8]) -> Option<Option<&[u8]>> {
    const NOTE: u32 = 7;
    const GNU_BUILD_ID: u32 = 3;
    if bytes.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let u16_at = |offset: usize| -> Option<u16> {
        Some(u16::from_le_bytes(
            bytes.get(offset..offset.checked_add(2)?)?.try_into().ok()?,
        ))
    };
    let u32_at = |offset: usize| -> Option<u32> {
        Some(u32::from_le_bytes(
            bytes.get(offset..offset.checked_add(4)?)?.try_into().ok()?,
        ))
    };
    let u64_at = |offset: usize| -> Option<usize> {
        usize::try_from(u64::from_le_bytes(
            bytes.get(offset..offset.checked_add(8)?)?.try_into().ok()?,
        ))
        .ok()
    };
    let section_table = u64_at(0x28)?;
    let entry_size = usize::from(u16_at(0x3A)?);
    let count = usize::from(u16_at(0x3C)?);
    for index in 0..count {
        let header = section_table.checked_add(index.checked_mul(entry_size)?)?;
        if u32_at(header.checked_add(4)?)? != NOTE {
            continue;
        }
        let start = u64_at(header.checked_add(0x18)?)?;
        let size = u64_at(header.checked_add(0x20)?)?;
        let notes = bytes.get(start..start.checked_add(size)?)?;
        let mut offset = 0;
        while offset + 12 <= notes.len() {
            let name_size = usize::try_from(u32::from_le_bytes(
                notes[offset..offset + 4].try_into().ok()?,
            ))
            .ok()?;
            let descriptor_size = usize::try_from(u32::from_le_bytes(
                notes[offset + 4..offset + 8].try_into().ok()?,
            ))
            .ok()?;
            let kind = u32::from_le_bytes(notes[offset + 8..offset + 12].try_into().ok()?);
            let name_start = offset + 12;
            let descriptor_start = name_start + name_size.div_ceil(4) * 4;
            let descriptor =
                notes.get(descriptor_start..descriptor_start.checked_add(descriptor_size)?)?;
            let name = notes.get(name_start..name_start + name_size)?;
            if kind == GNU_BUILD_ID && name == b"GNU\0" {
                return Some(Some(descriptor));
            }
            offset = descriptor_start + descriptor_size.div_ceil(4) * 4;
        }
    }
    Some(None)
}

#[cfg(test)]
mod tests;
