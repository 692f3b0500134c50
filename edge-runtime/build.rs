//! Prepares llama.cpp's shared libraries for the binaries of this workspace.
//!
//! - Records where the backend modules (the CPU variants, later CUDA) were built, so that a
//!   binary run from the build tree finds them without configuration; installed binaries find
//!   them beside themselves instead (see `Engine::backend_search_dirs`).
//! - Completes the copies of `libllama.so` / `libggml*.so` that `llama-cpp-sys-2` places in the
//!   target directory: it links only the unversioned names, which are symbolic links to
//!   `libX.so.N`, so they dangle there. A dangling link both stops a binary in the target
//!   directory from loading the library through its `$ORIGIN` run path and makes the next run
//!   of `llama-cpp-sys-2`'s build script fail. We add the versioned files beside them.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_LLAMA_BACKENDS_DIR");
    println!("cargo:rerun-if-changed=build.rs");
    let Ok(backends_dir) = std::env::var("DEP_LLAMA_BACKENDS_DIR") else {
        return;
    };
    println!("cargo:rustc-env=ISTHMUS_BUILD_BACKENDS_DIR={backends_dir}");
    let backends_dir = PathBuf::from(backends_dir);
    let Some(llama_out) = backends_dir.parent() else {
        return;
    };
    let Some(profile_dir) = profile_dir() else {
        return;
    };
    for libraries in ["lib", "lib64"] {
        let source = llama_out.join(libraries);
        for destination in [
            profile_dir.clone(),
            profile_dir.join("deps"),
            profile_dir.join("examples"),
        ] {
            if let Err(error) = complete_libraries(&source, &destination) {
                println!(
                    "cargo:warning=could not place llama.cpp libraries in {}: {error}",
                    destination.display()
                );
            }
        }
    }
}

/// `target/<profile>`, three levels above this script's OUT_DIR.
fn profile_dir() -> Option<PathBuf> {
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR")?);
    Some(out_dir.ancestors().nth(3)?.to_path_buf())
}

/// Gives `destination` every `lib*.so*` of `source`, symbolic links recreated as links and
/// files hard-linked (copied across file systems).
fn complete_libraries(source: &Path, destination: &Path) -> std::io::Result<()> {
    let Ok(entries) = std::fs::read_dir(source) else {
        return Ok(());
    };
    std::fs::create_dir_all(destination)?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(text) = name.to_str() else { continue };
        if !(text.starts_with("lib") && text.contains(".so")) {
            continue;
        }
        let from = entry.path();
        let to = destination.join(&name);
        let metadata = std::fs::symlink_metadata(&from)?;
        if metadata.file_type().is_symlink() {
            let link = std::fs::read_link(&from)?;
            if std::fs::read_link(&to).ok().as_ref() != Some(&link) {
                let _ = std::fs::remove_file(&to);
                std::os::unix::fs::symlink(&link, &to)?;
            }
        } else {
            let current = std::fs::metadata(&to).ok();
            let same = current.is_some_and(|current| {
                use std::os::unix::fs::MetadataExt;
                current.ino() == metadata.ino() && current.dev() == metadata.dev()
            });
            if !same {
                let _ = std::fs::remove_file(&to);
                if std::fs::hard_link(&from, &to).is_err() {
                    std::fs::copy(&from, &to)?;
                }
            }
        }
    }
    Ok(())
}
