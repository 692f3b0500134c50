use std::path::{Path, PathBuf};
use std::process::Command;

use super::{BackendCheckError, build_id, check_dir, source_fingerprint};

fn build_backends_dir() -> PathBuf {
    PathBuf::from(env!("ISTHMUS_BUILD_BACKENDS_DIR"))
}

fn copy_modules(into: &Path) {
    for entry in std::fs::read_dir(build_backends_dir()).unwrap().flatten() {
        std::fs::copy(entry.path(), into.join(entry.file_name())).unwrap();
    }
}

#[test]
fn the_fingerprint_and_digests_were_compiled_in() {
    assert_eq!(source_fingerprint().len(), 64, "{}", source_fingerprint());
    let checked = check_dir(&build_backends_dir()).unwrap();
    assert!(checked.cpu_modules.len() >= 2, "{checked:?}");
    assert!(
        checked
            .cpu_modules
            .iter()
            .any(|name| name == "libggml-cpu-x64.so")
    );
    assert!(checked.other_modules.is_empty());
}

#[test]
fn elf_build_ids_are_read_and_other_bytes_are_not_elf() {
    let module = build_backends_dir().join("libggml-cpu-x64.so");
    let bytes = std::fs::read(&module).unwrap();
    let id = build_id(&bytes)
        .expect("an ELF file")
        .expect("with a build id");
    assert!(id.len() >= 8);
    assert_eq!(build_id(b"#!/bin/sh\n"), None);
    assert_eq!(
        build_id(&bytes[..100]),
        None,
        "a truncated header is not an ELF file"
    );
}

#[test]
fn a_section_table_at_the_end_of_the_address_space_is_not_read() {
    // An ELF header whose section table offset is near usize::MAX, one section: the offsets
    // computed from it would overflow.
    let mut bytes = b"\x7fELF\x02\x01".to_vec();
    bytes.resize(0x40, 0);
    bytes[0x28..0x30].copy_from_slice(&(u64::MAX - 2).to_le_bytes());
    bytes[0x3A..0x3C].copy_from_slice(&64_u16.to_le_bytes());
    bytes[0x3C..0x3E].copy_from_slice(&1_u16.to_le_bytes());
    assert_eq!(build_id(&bytes), None);
}

#[test]
fn a_module_whose_name_is_not_utf8_is_refused_not_skipped() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    copy_modules(dir.path());
    // llama.cpp's loader matches names as bytes and would open this one.
    let name = std::ffi::OsStr::from_bytes(b"libggml-cuda-\xff.so");
    std::fs::write(dir.path().join(name), b"not checked").unwrap();
    let error = check_dir(dir.path()).unwrap_err().to_string();
    assert!(error.contains("not UTF-8"), "{error}");
}

#[test]
fn a_changed_cpu_module_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    copy_modules(dir.path());
    let victim = dir.path().join("libggml-cpu-x64.so");
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes.push(0);
    std::fs::write(&victim, bytes).unwrap();
    assert!(
        matches!(check_dir(dir.path()), Err(BackendCheckError::CpuModuleMismatch { path, .. }) if path == victim)
    );
}

/// Links a tiny shared object with the given build id, as deploy/cuda/build-backend does.
fn link_module(path: &Path, build_id_hex: &str) {
    let source = path.with_extension("c");
    std::fs::write(&source, "int ggml_backend_score(void) { return 0; }\n").unwrap();
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(path)
        .arg(&source)
        .arg(format!("-Wl,--build-id=0x{build_id_hex}"))
        .status()
        .expect("running cc");
    assert!(status.success());
    std::fs::remove_file(source).unwrap();
}

#[test]
fn a_module_from_other_sources_is_refused_and_one_from_ours_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    copy_modules(dir.path());
    let cuda = dir.path().join("libggml-cuda.so");
    link_module(&cuda, &"ab".repeat(32));
    match check_dir(dir.path()) {
        Err(BackendCheckError::SourceMismatch {
            path,
            found,
            expected,
        }) => {
            assert_eq!(path, cuda);
            assert_eq!(found, "ab".repeat(32));
            assert_eq!(expected, source_fingerprint());
        }
        other => panic!("expected a source mismatch, got {other:?}"),
    }
    link_module(&cuda, source_fingerprint());
    let checked = check_dir(dir.path()).unwrap();
    assert_eq!(checked.other_modules, ["libggml-cuda.so"]);
}
