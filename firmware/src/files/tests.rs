//! Tests of the file helpers: error wording, capped reads, staged atomic writes.

use super::*;

#[test]
fn io_reason_is_lowercase_without_the_os_error_suffix() {
    let error = io::Error::from_raw_os_error(13);
    assert_eq!(io_reason(&error), "permission denied");
    let error = io::Error::from_raw_os_error(2);
    assert_eq!(io_reason(&error), "no such file or directory");
    let error = io::Error::new(io::ErrorKind::InvalidData, "File is larger than 3 bytes");
    assert_eq!(io_reason(&error), "file is larger than 3 bytes");
}

#[test]
fn read_optional_capped_distinguishes_missing_small_and_too_large() -> io::Result<()> {
    let directory = tempfile::tempdir()?;
    let path = directory.path().join("file");
    assert_eq!(read_optional_capped(&path, 4)?, None);
    fs::write(&path, b"abcd")?;
    assert_eq!(read_optional_capped(&path, 4)?, Some(b"abcd".to_vec()));
    fs::write(&path, b"abcde")?;
    let error = read_optional_capped(&path, 4).err();
    assert_eq!(
        error.map(|error| io_reason(&error)),
        Some("file is larger than 4 bytes".to_owned())
    );
    Ok(())
}

#[test]
fn staged_file_appears_only_on_commit_with_its_mode() -> io::Result<()> {
    let directory = tempfile::tempdir()?;
    let path = directory.path().join("key.pem");
    fs::write(&path, b"old")?;
    let staged = StagedFile::write(&path, b"new", PRIVATE_FILE_MODE)?;
    assert_eq!(fs::read(&path)?, b"old");
    assert_eq!(mode_of(&directory.path().join(".key.pem.tmp"))?, 0o600);
    staged.commit()?;
    assert_eq!(fs::read(&path)?, b"new");
    assert_eq!(mode_of(&path)?, 0o600);
    assert!(!directory.path().join(".key.pem.tmp").exists());
    Ok(())
}

#[test]
fn dropped_staged_file_leaves_no_temporary_file() -> io::Result<()> {
    let directory = tempfile::tempdir()?;
    let path = directory.path().join("cert.pem");
    let staged = StagedFile::write(&path, b"contents", PUBLIC_FILE_MODE)?;
    drop(staged);
    assert!(!path.exists());
    assert!(!directory.path().join(".cert.pem.tmp").exists());
    Ok(())
}

#[test]
fn staged_file_replaces_a_leftover_temporary_file() -> io::Result<()> {
    let directory = tempfile::tempdir()?;
    let path = directory.path().join("cert.pem");
    fs::write(directory.path().join(".cert.pem.tmp"), b"leftover")?;
    StagedFile::write(&path, b"fresh", PUBLIC_FILE_MODE)?.commit()?;
    assert_eq!(fs::read(&path)?, b"fresh");
    assert_eq!(mode_of(&path)?, 0o644);
    Ok(())
}
