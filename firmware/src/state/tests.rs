//! Tests of opening the state directory.

use std::os::unix::fs::PermissionsExt;

use super::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[test]
fn open_creates_missing_directory_and_parents_private() -> TestResult {
    let scratch = tempfile::tempdir()?;
    let root = scratch.path().join("var/lib/isthmus");
    let state = StateDir::open(&root)?;
    assert_eq!(state.path(), root);
    assert_eq!(state.tls_dir(), root.join("tls"));
    for path in [scratch.path().join("var/lib"), root.clone()] {
        assert_eq!(fs::metadata(&path)?.permissions().mode() & 0o777, 0o700);
    }
    assert_eq!(
        fs::read_dir(&root)?.count(),
        0,
        "the write probe is removed"
    );
    assert!(!state.tls_dir().exists(), "tls/ is created by provisioning");
    Ok(())
}

#[test]
fn open_keeps_an_existing_directory_and_its_mode() -> TestResult {
    let scratch = tempfile::tempdir()?;
    let root = scratch.path().join("state");
    fs::create_dir(&root)?;
    fs::set_permissions(&root, fs::Permissions::from_mode(0o750))?;
    fs::write(root.join("keep"), b"data")?;
    StateDir::open(&root)?;
    assert_eq!(fs::metadata(&root)?.permissions().mode() & 0o777, 0o750);
    assert_eq!(fs::read(root.join("keep"))?, b"data");
    Ok(())
}

#[test]
fn open_refuses_a_file_naming_the_path() -> TestResult {
    let scratch = tempfile::tempdir()?;
    let root = scratch.path().join("state");
    fs::write(&root, b"not a directory")?;
    let message = StateDir::open(&root).err().map(|error| error.to_string());
    assert_eq!(
        message,
        Some(format!(
            "state directory {} is not a directory",
            root.display()
        ))
    );

    let below_file = root.join("child");
    let message = StateDir::open(&below_file)
        .err()
        .map(|error| error.to_string());
    assert_eq!(
        message,
        Some(format!(
            "state directory {} is not a directory",
            below_file.display()
        ))
    );
    Ok(())
}
