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

#[test]
fn protection_trusts_root_and_this_user_and_no_one_else_who_can_write() {
    let user = 1000;
    // (owner, mode, is the path itself, problem)
    let cases: [(u32, u32, bool, Option<&str>); 9] = [
        (0, 0o755, true, None),
        (user, 0o700, true, None),
        (user, 0o644, true, None),
        (
            1001,
            0o755,
            true,
            Some("owned by user 1001, neither root nor this user (1000)"),
        ),
        (
            0,
            0o775,
            true,
            Some("writable by group or others (mode 0775)"),
        ),
        (
            0,
            0o757,
            false,
            Some("writable by group or others (mode 0757)"),
        ),
        // `/tmp`: others may add names but not move ours.
        (0, 0o1777, false, None),
        (
            0,
            0o1777,
            true,
            Some("writable by group or others (mode 1777)"),
        ),
        (
            1001,
            0o1777,
            false,
            Some("owned by user 1001, neither root nor this user (1000)"),
        ),
    ];
    for (owner, mode, is_last, problem) in cases {
        assert_eq!(
            protection_problem(owner, mode, user, is_last).as_deref(),
            problem,
            "owner {owner}, mode {mode:o}, last {is_last}"
        );
    }
}

#[test]
fn the_effective_user_is_the_second_uid() {
    let status = "Name:\tisthmus\nUid:\t1000\t0\t0\t0\nGid:\t1000\t1000\t1000\t1000\n";
    assert_eq!(parse_effective_user(status), Some(0));
    assert_eq!(parse_effective_user("Name:\tx\n"), None);
}

#[test]
fn a_protected_path_is_checked_through_its_links_and_its_parents() -> io::Result<()> {
    let scratch = tempfile::tempdir()?;
    let private = scratch.path().join("private");
    create_directories_with_mode(&private.join("inner"), 0o755)?;
    assert_eq!(mode_of(&private)?, 0o755);
    assert_eq!(mode_of(&private.join("inner"))?, 0o755);
    assert_eq!(check_protected(&private.join("inner")), Ok(()));

    let open = scratch.path().join("open");
    create_directories_with_mode(&open.join("inner"), 0o755)?;
    set_mode(&open, 0o777)?;
    let error = check_protected(&open.join("inner"))
        .err()
        .unwrap_or_default();
    assert!(
        error.starts_with(&format!("{}: writable by group or others", open.display())),
        "{error}"
    );
    // A link from a protected place into an open one is judged by where it leads.
    let link = private.join("link");
    std::os::unix::fs::symlink(open.join("inner"), &link)?;
    let error = check_protected(&link).err().unwrap_or_default();
    assert!(
        error.starts_with(&format!("{}: writable by group or others", open.display())),
        "{error}"
    );
    // A link into a protected place is judged by its own owner too: another user's link
    // (in a sticky directory anyone may add to) can be pointed elsewhere after the check.
    let theirs = private.join("theirs");
    std::os::unix::fs::symlink(private.join("inner"), &theirs)?;
    assert_eq!(check_protected(&theirs), Ok(()), "this user's own link");
    match std::os::unix::fs::lchown(&theirs, Some(65534), None) {
        Ok(()) => {
            let error = check_protected(&theirs).err().unwrap_or_default();
            assert!(
                error.starts_with(&format!("{}: a link owned by user 65534", theirs.display())),
                "{error}"
            );
        }
        // Only root may give a link away; the refusal is checked where tests run as root.
        Err(error) if error.kind() == io::ErrorKind::PermissionDenied => {}
        Err(error) => return Err(error),
    }
    Ok(())
}
