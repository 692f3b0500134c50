//! Prepares llama.cpp's shared libraries and backend modules for the binaries of this
//! workspace, and records what later checks need.
//!
//! - `ISTHMUS_BUILD_BACKENDS_DIR`: where the backend modules (the CPU variants) were built,
//!   so a binary run from the build tree finds them; installed binaries find them beside
//!   themselves (see `Engine::backend_search_dirs`).
//! - `ISTHMUS_LLAMA_SOURCE_FINGERPRINT`: the fingerprint of the llama.cpp sources (see
//!   `backends.rs`); a CUDA backend built elsewhere must carry it as its ELF build id.
//! - `ISTHMUS_CPU_BACKEND_DIGESTS`: the SHA-256 of each CPU backend module built here.
//! - Completes the copies of `libllama.so` / `libggml*.so` that `llama-cpp-sys-2` places in the
//!   target directory: it links only the unversioned names, which are symbolic links to
//!   `libX.so.N`, so they dangle there. A dangling link both stops a binary in the target
//!   directory from loading the library through its `$ORIGIN` run path and makes the next run
//!   of `llama-cpp-sys-2`'s build script fail. We add the versioned files beside them.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

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
    match llama_source_dir(llama_out).map(|source| source_fingerprint(&source)) {
        Some(Ok(fingerprint)) => {
            println!("cargo:rustc-env=ISTHMUS_LLAMA_SOURCE_FINGERPRINT={fingerprint}");
        }
        Some(Err(error)) => println!("cargo:warning=llama.cpp source fingerprint: {error}"),
        None => println!("cargo:warning=llama.cpp source directory not found in CMakeCache.txt"),
    }
    match cpu_module_digests(&backends_dir) {
        Ok(digests) => println!("cargo:rustc-env=ISTHMUS_CPU_BACKEND_DIGESTS={digests}"),
        Err(error) => println!("cargo:warning=hashing the CPU backend modules: {error}"),
    }
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

/// The llama.cpp tree CMake configured, from its cache.
fn llama_source_dir(llama_out: &Path) -> Option<PathBuf> {
    let cache = std::fs::read_to_string(llama_out.join("build/CMakeCache.txt")).ok()?;
    cache
        .lines()
        .find_map(|line| line.strip_prefix("CMAKE_HOME_DIRECTORY:INTERNAL="))
        .map(PathBuf::from)
}

/// SHA-256 of the `sha256sum` listing of every file under ggml/, include/ and src/, sorted
/// by path: `find ggml include src -type f | LC_ALL=C sort | xargs sha256sum | sha256sum`.
fn source_fingerprint(root: &Path) -> std::io::Result<String> {
    let mut files = Vec::new();
    for top in ["ggml", "include", "src"] {
        collect_files(root, Path::new(top), &mut files)?;
    }
    files.sort_by(|left, right| left.as_bytes().cmp(right.as_bytes()));
    let mut listing = Sha256::new();
    for file in files {
        let digest = file_sha256(&root.join(&file))?;
        listing.update(format!("{digest}  {file}\n").as_bytes());
    }
    Ok(hex::encode(listing.finalize()))
}

fn collect_files(root: &Path, relative: &Path, files: &mut Vec<String>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(root.join(relative))? {
        let entry = entry?;
        let path = relative.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            collect_files(root, &path, files)?;
        } else if kind.is_file() {
            files.push(path.to_string_lossy().into_owned());
        }
    }
    Ok(())
}

fn file_sha256(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0_u8; 1 << 16];
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buffer[..read]);
    }
}

fn cpu_module_digests(dir: &Path) -> std::io::Result<String> {
    let mut pairs = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("libggml-cpu") && name.ends_with(".so") {
            pairs.push(format!("{name}={}", file_sha256(&entry.path())?));
        }
    }
    pairs.sort();
    Ok(pairs.join(";"))
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
