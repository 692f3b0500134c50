use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use ed25519_dalek::{Signer as _, SigningKey};

use super::{
    ATTEMPTS_MAX, BootOutcome, Firmware, PACKAGE_VERSION, Slot, SlotState, Trial, UpdateError,
    apply_step, boot_step, commit_step, compare_versions, open_verified, pack, rollback_step,
    running_step,
};

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// A slot tree: an executable `bin/isthmus`, a library and its soname link.
fn tree(root: &Path, binary: &[u8]) {
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("lib/isthmus")).unwrap();
    std::fs::write(root.join("bin/isthmus"), binary).unwrap();
    std::fs::set_permissions(
        root.join("bin/isthmus"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(root.join("lib/isthmus/libllama.so.0.6.0"), b"library").unwrap();
    std::os::unix::fs::symlink("libllama.so.0.6.0", root.join("lib/isthmus/libllama.so.0"))
        .unwrap();
}

fn keys_directory(root: &Path, keys: &[&SigningKey]) -> std::path::PathBuf {
    let directory = root.join("keys");
    std::fs::create_dir_all(&directory).unwrap();
    for (index, key) in keys.iter().enumerate() {
        std::fs::write(
            directory.join(format!("k{index}.pub")),
            crate::keys::public_key_pem(&key.verifying_key()),
        )
        .unwrap();
    }
    directory
}

#[test]
fn a_trial_gets_its_starts_then_rolls_back_and_a_commit_ends_it() {
    let (slot, mut state) = apply_step(&SlotState::default(), "2.0.0", false).unwrap();
    assert_eq!(slot, Slot::A);
    assert_eq!(state.previous, Some(Slot::Factory));
    assert!(matches!(
        apply_step(&state, "2.0.1", false),
        Err(UpdateError::TrialPending("a"))
    ));
    for attempt in 1..=ATTEMPTS_MAX {
        let (next, outcome) = boot_step(&state);
        assert_eq!(
            outcome,
            BootOutcome::Trying {
                slot: Slot::A,
                attempt
            }
        );
        state = next;
    }
    let (rolled, outcome) = boot_step(&state);
    assert_eq!(
        outcome,
        BootOutcome::RolledBack {
            from: Slot::A,
            to: Slot::Factory
        }
    );
    assert_eq!((rolled.active, rolled.trial.clone()), (Slot::Factory, None));
    assert!(
        rolled
            .last_event
            .as_deref()
            .unwrap()
            .contains("rolled back from a (2.0.0) to factory"),
        "{rolled:?}"
    );
    // The next update goes to the slot not running; a commit ends its trial.
    let (slot, state) = apply_step(&rolled, "2.0.1", false).unwrap();
    assert_eq!(slot, Slot::A);
    let (state, _) = boot_step(&state);
    let committed = commit_step(&state).unwrap();
    assert_eq!(committed.trial, None);
    assert_eq!(commit_step(&committed), None);
    assert_eq!(boot_step(&committed).1, BootOutcome::Steady);
    let (slot, on_b) = apply_step(&committed, "2.1.0", false).unwrap();
    assert_eq!((slot, on_b.previous), (Slot::B, Some(Slot::A)));
    let back = rollback_step(&on_b).unwrap();
    assert_eq!(
        (back.active, back.previous, back.trial.clone()),
        (Slot::A, None, None)
    );
    assert!(matches!(
        rollback_step(&back),
        Err(UpdateError::NothingToRollBackTo)
    ));
}

#[test]
fn a_bundle_installs_only_when_signed_by_a_trusted_key_and_every_byte_matches() {
    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path().join("root");
    tree(&root, b"#!/bin/sh\necho new\n");
    let signer = key(1);
    let keys = keys_directory(scratch.path(), &[&key(9), &signer]);
    let bundle = scratch.path().join("update.bin");
    let manifest = pack(&root, "2.0.0", &signer, &bundle).unwrap();
    assert_eq!(manifest.entries.len(), 3);

    let firmware = Firmware::new(&scratch.path().join("state"), Path::new("/usr"));
    let applied = firmware.apply(&bundle, &keys, false).unwrap();
    assert_eq!((applied.slot, applied.files), (Slot::A, 3));
    let slot = firmware.slot_root(Slot::A);
    assert_eq!(
        std::fs::read(firmware.current_link().join("bin/isthmus")).unwrap(),
        b"#!/bin/sh\necho new\n"
    );
    assert_eq!(
        std::fs::metadata(slot.join("bin/isthmus"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
    assert_eq!(
        std::fs::read_link(slot.join("lib/isthmus/libllama.so.0")).unwrap(),
        Path::new("libllama.so.0.6.0")
    );
    let state = firmware.state().unwrap();
    assert_eq!(
        state.trial,
        Some(Trial {
            slot: Slot::A,
            attempts: 0
        })
    );

    // Another signer: refused before anything is written.
    let stranger = scratch.path().join("stranger.bin");
    pack(&root, "6.6.6", &key(7), &stranger).unwrap();
    let refused = firmware.apply(&stranger, &keys, false).unwrap_err();
    assert!(
        matches!(refused, UpdateError::Untrusted { keys: 2, .. }),
        "{refused}"
    );

    // One byte changed in a file: named, and the slot left as it was.
    let mut bytes = std::fs::read(&bundle).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let tampered = scratch.path().join("tampered.bin");
    std::fs::write(&tampered, &bytes).unwrap();
    firmware.boot().unwrap();
    firmware.commit().unwrap();
    let error = firmware
        .apply(&tampered, &keys, false)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("lib/isthmus/libllama.so.0.6.0") && error.contains("SHA-256"),
        "{error}"
    );
    assert!(!firmware.slot_root(Slot::B).exists());
    assert_eq!(firmware.state().unwrap().active, Slot::A);
}

/// A bundle with any manifest, signed: what an attacker holding a key could not make, and
/// what a buggy packer might.
fn signed_bundle(path: &Path, manifest: &str, key: &SigningKey, payload: &[u8]) {
    let mut message = b"isthmus-update-v1\0".to_vec();
    message.extend_from_slice(manifest.as_bytes());
    let signature = base64::engine::general_purpose::STANDARD.encode(key.sign(&message).to_bytes());
    let mut bytes = format!(
        "ISTHMUS-UPDATE 1\nsignature: {signature}\nmanifest-bytes: {}\n\n{manifest}",
        manifest.len()
    )
    .into_bytes();
    bytes.extend_from_slice(payload);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn manifests_that_reach_outside_the_slot_are_refused_even_when_signed() {
    let scratch = tempfile::tempdir().unwrap();
    let signer = key(1);
    let keys = [signer.verifying_key()];
    let binary = r#"{"path":"bin/isthmus","size":0,"mode":493,"sha256":"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}"#;
    for (entry, reason) in [
        (
            r#"{"path":"../../etc/passwd","size":0,"mode":420,"sha256":"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}"#,
            "plain relative path",
        ),
        (
            r#"{"path":"/etc/cron.d/x","size":0,"mode":420,"sha256":"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}"#,
            "plain relative path",
        ),
        (
            r#"{"path":"lib/x","link":"../../../etc/shadow"}"#,
            "links outside",
        ),
        (
            r#"{"path":"bin/tool","size":0,"mode":2541,"sha256":"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}"#,
            "mode beyond",
        ),
    ] {
        let manifest = format!(r#"{{"version":"1.0","entries":[{binary},{entry}]}}"#);
        let path = scratch.path().join("bad.bin");
        signed_bundle(&path, &manifest, &signer, b"");
        let error = open_verified(&path, &keys, scratch.path())
            .unwrap_err()
            .to_string();
        assert!(error.contains(reason), "{entry}: {error}");
    }
    let path = scratch.path().join("junk.bin");
    std::fs::write(&path, b"PK\x03\x04 a zip file").unwrap();
    let error = open_verified(&path, &keys, scratch.path())
        .unwrap_err()
        .to_string();
    assert!(error.contains("not an update bundle"), "{error}");
}

#[test]
fn boot_and_commit_move_the_current_link_with_the_state() {
    let scratch = tempfile::tempdir().unwrap();
    let factory = scratch.path().join("usr");
    tree(&factory, b"factory");
    let root = scratch.path().join("root");
    tree(&root, b"broken");
    let signer = key(3);
    let keys = keys_directory(scratch.path(), &[&signer]);
    let bundle = scratch.path().join("update.bin");
    pack(&root, "3.0.0", &signer, &bundle).unwrap();
    let firmware = Firmware::new(&scratch.path().join("state"), &factory);
    // Before any update, boot points `current` at the factory slot.
    assert_eq!(firmware.boot().unwrap().0, BootOutcome::Steady);
    let binary = firmware.current_link().join("bin/isthmus");
    assert_eq!(std::fs::read(&binary).unwrap(), b"factory");
    firmware.apply(&bundle, &keys, false).unwrap();
    assert_eq!(std::fs::read(&binary).unwrap(), b"broken");
    for _ in 0..ATTEMPTS_MAX {
        assert!(matches!(
            firmware.boot().unwrap().0,
            BootOutcome::Trying { .. }
        ));
    }
    let (outcome, state) = firmware.boot().unwrap();
    assert_eq!(
        outcome,
        BootOutcome::RolledBack {
            from: Slot::A,
            to: Slot::Factory
        }
    );
    assert_eq!(state.active, Slot::Factory);
    assert_eq!(std::fs::read(&binary).unwrap(), b"factory");
    assert_eq!(firmware.commit().unwrap(), None);
}

#[test]
fn versions_order_as_semantic_versions() {
    use std::cmp::Ordering::{Equal, Greater, Less};
    for (a, b, order) in [
        ("1.2.3", "1.2.3", Some(Equal)),
        ("1.10.0", "1.9.9", Some(Greater)),
        ("2.0", "2.0.0", Some(Equal)),
        ("2.0.0-rc.1", "2.0.0", Some(Less)),
        ("2.0.0-rc.2", "2.0.0-rc.10", Some(Less)),
        ("2.0.0-alpha", "2.0.0-alpha.1", Some(Less)),
        ("2.0.0-1", "2.0.0-beta", Some(Less)),
        ("2.0.0+build.7", "2.0.0", Some(Equal)),
        ("nightly", "2.0.0", None),
        ("2.x", "2.0.0", None),
    ] {
        assert_eq!(compare_versions(a, b), order, "{a} against {b}");
    }
}

#[test]
fn the_installed_package_is_the_floor_before_any_commit() {
    match apply_step(&SlotState::default(), "0.0.1", false) {
        Err(UpdateError::Downgrade { floor, .. }) => assert_eq!(floor, PACKAGE_VERSION),
        other => panic!("expected a refused downgrade, got {other:?}"),
    }
    assert!(apply_step(&SlotState::default(), PACKAGE_VERSION, false).is_ok());
    assert!(apply_step(&SlotState::default(), "0.0.1", true).is_ok());
}

#[test]
fn a_committed_version_is_the_floor_and_older_bundles_need_to_be_allowed() {
    let (_, state) = apply_step(&SlotState::default(), "2.1.0", false).unwrap();
    assert_eq!(
        state.version_floor, None,
        "the floor moves at a commit, not at an apply"
    );
    let (state, _) = boot_step(&state);
    let committed = commit_step(&state).unwrap();
    assert_eq!(committed.version_floor.as_deref(), Some("2.1.0"));
    for older in ["2.0.9", "2.1.0-rc.1", "nightly"] {
        match apply_step(&committed, older, false) {
            Err(UpdateError::Downgrade { version, floor }) => {
                assert_eq!((version.as_str(), floor.as_str()), (older, "2.1.0"));
            }
            other => panic!("{older}: expected a refused downgrade, got {other:?}"),
        }
    }
    // The same version again, a newer one, or an older one the operator allows.
    assert!(apply_step(&committed, "2.1.0", false).is_ok());
    assert!(apply_step(&committed, "2.2.0", false).is_ok());
    let (_, allowed) = apply_step(&committed, "2.0.9", true).unwrap();
    // A deliberate downgrade, once committed, does not lower the floor.
    let (allowed, _) = boot_step(&allowed);
    let committed_older = commit_step(&allowed).unwrap();
    assert_eq!(committed_older.version_floor.as_deref(), Some("2.1.0"));
    // State files written before the floor existed still load.
    let old: SlotState = serde_json::from_str(
        r#"{"active":"a","previous":"factory","trial":null,"versions":{"a":"2.0.0"},"last_event":null}"#,
    )
    .unwrap();
    assert_eq!(old.version_floor, None);
}

#[test]
fn a_trial_applied_during_a_start_is_not_committed_by_that_starts_readiness() {
    let (_, applied) = apply_step(&SlotState::default(), "2.0.0", false).unwrap();
    assert_eq!(commit_step(&applied), None, "no start of the trial yet");
    let (started, _) = boot_step(&applied);
    assert!(commit_step(&started).is_some());
}

#[test]
fn an_apply_that_cannot_save_its_state_leaves_the_rollback_slot_whole() {
    let scratch = tempfile::tempdir().unwrap();
    let factory = scratch.path().join("usr");
    tree(&factory, b"factory");
    let signer = key(5);
    let keys = keys_directory(scratch.path(), &[&signer]);
    let firmware = Firmware::new(&scratch.path().join("state"), &factory);
    firmware.boot().unwrap();
    // Two committed updates: v2 runs in b, v1 in a is where a rollback goes.
    for (version, content) in [("1.0.0", b"v1"), ("2.0.0", b"v2")] {
        let root = scratch.path().join(format!("root-{version}"));
        tree(&root, content);
        let bundle = scratch.path().join(format!("update-{version}.bin"));
        pack(&root, version, &signer, &bundle).unwrap();
        firmware.apply(&bundle, &keys, false).unwrap();
        firmware.boot().unwrap();
        firmware.commit().unwrap().unwrap();
    }
    let before = firmware.state().unwrap();
    assert_eq!((before.active, before.previous), (Slot::B, Some(Slot::A)));
    // The next update goes to a; its state cannot be saved (the temporary file's name is
    // taken by a directory): nothing of a may go before the state stops naming it.
    let root = scratch.path().join("root-3");
    tree(&root, b"v3");
    let bundle = scratch.path().join("update-3.bin");
    pack(&root, "3.0.0", &signer, &bundle).unwrap();
    std::fs::create_dir(scratch.path().join("state/.state.json.tmp")).unwrap();
    assert!(firmware.apply(&bundle, &keys, false).is_err());
    assert_eq!(firmware.state().unwrap(), before);
    let slot_a = firmware.slot_root(Slot::A).join("bin/isthmus");
    assert_eq!(std::fs::read(slot_a).unwrap(), b"v1");
}

#[test]
fn an_update_after_a_rollback_by_hand_waits_for_the_restart() {
    // Committed b runs, with a before it; a rollback by hand makes a active, while b still
    // runs until the service restarts: an update would overwrite b.
    let (_, state) = apply_step(&SlotState::default(), "1.0.0", false).unwrap();
    let (state, _) = boot_step(&state);
    let state = commit_step(&state).unwrap();
    let (_, state) = apply_step(&state, "2.0.0", false).unwrap();
    let (state, _) = boot_step(&state);
    let state = commit_step(&state).unwrap();
    assert_eq!((state.active, state.running), (Slot::B, Some(Slot::B)));
    let rolled = rollback_step(&state).unwrap();
    assert_eq!(rolled.active, Slot::A);
    let refused = apply_step(&rolled, "3.0.0", false).unwrap_err();
    assert!(
        matches!(
            refused,
            UpdateError::RestartPending {
                running: "b",
                active: "a"
            }
        ),
        "{refused}"
    );
    // Once restarted on a, the update goes to b.
    let (restarted, _) = boot_step(&rolled);
    let (slot, _) = apply_step(&restarted, "3.0.0", false).unwrap();
    assert_eq!(slot, Slot::B);
}

#[test]
fn keys_and_slots_that_another_user_could_change_are_refused() {
    let (scratch, keys, bundle, firmware) = one_update(7);
    let mode = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    let refused = |error: UpdateError, path: &Path| {
        let message = error.to_string();
        assert!(matches!(error, UpdateError::Unprotected(_)), "{message}");
        assert!(
            message.starts_with(&format!("{}: writable by group or others", path.display())),
            "{message}"
        );
    };

    // A keys directory the service's group may write: a key could be slipped in.
    mode(&keys, 0o775);
    refused(firmware.apply(&bundle, &keys, false).unwrap_err(), &keys);
    refused(super::read_trusted_keys(&keys).unwrap_err(), &keys);
    mode(&keys, 0o755);
    // A key file others may rewrite.
    let key_file = keys.join("k0.pub");
    mode(&key_file, 0o666);
    refused(
        firmware.apply(&bundle, &keys, false).unwrap_err(),
        &key_file,
    );
    mode(&key_file, 0o644);

    // The firmware directory: created by the first command, readable by all, then refused
    // once group-writable; nothing is written while it is.
    firmware.boot().unwrap();
    let directory = scratch.path().join("firmware");
    assert_eq!(
        std::fs::metadata(&directory).unwrap().permissions().mode() & 0o7777,
        0o755
    );
    let before = firmware.state().unwrap();
    mode(&directory, 0o770);
    refused(
        firmware.apply(&bundle, &keys, false).unwrap_err(),
        &directory,
    );
    refused(firmware.boot().unwrap_err(), &directory);
    refused(firmware.commit().unwrap_err(), &directory);
    refused(firmware.rollback().unwrap_err(), &directory);
    assert_eq!(firmware.state().unwrap(), before);
    assert!(!firmware.slot_root(Slot::A).exists());
    // A directory above it counts as much as the directory itself.
    mode(&directory, 0o755);
    mode(scratch.path(), 0o777);
    let error = firmware.boot().unwrap_err();
    mode(scratch.path(), 0o700);
    refused(error, scratch.path());

    let applied = firmware.apply(&bundle, &keys, false).unwrap();
    assert_eq!(applied.slot, Slot::A);
    for step in ["bin", "lib", "lib/isthmus"] {
        let path = firmware.slot_root(Slot::A).join(step);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
            0o755,
            "{}",
            path.display()
        );
    }
}

#[test]
fn a_delayed_commit_ends_only_the_trial_it_waited_for() {
    let (_scratch, keys, bundle, firmware) = one_update(8);
    firmware.apply(&bundle, &keys, false).unwrap();
    firmware.boot().unwrap();
    let seen = firmware.state().unwrap().trial.unwrap();
    assert_eq!((seen.slot, seen.attempts), (Slot::A, 1));
    // Another start while the first one's commit waited: that one's wait is void.
    firmware.boot().unwrap();
    assert_eq!(firmware.commit_trial(&seen).unwrap(), None);
    let again = firmware.state().unwrap().trial.unwrap();
    assert_eq!(again.attempts, 2);
    // A rollback by hand meanwhile: nothing to commit either.
    firmware.rollback().unwrap();
    assert_eq!(firmware.commit_trial(&again).unwrap(), None);
    assert_eq!(firmware.state().unwrap().active, Slot::Factory);
}

/// A scratch directory with a factory tree, trusted keys of one signer (`seed`), a bundle of
/// version 1.0.0 signed by it, and firmware in `<scratch>/firmware`.
fn one_update(seed: u8) -> (tempfile::TempDir, PathBuf, PathBuf, Firmware) {
    let scratch = tempfile::tempdir().unwrap();
    let factory = scratch.path().join("usr");
    tree(&factory, b"factory");
    let signer = key(seed);
    let keys = keys_directory(scratch.path(), &[&signer]);
    let root = scratch.path().join("root");
    tree(&root, b"new");
    let bundle = scratch.path().join("update.bin");
    pack(&root, "1.0.0", &signer, &bundle).unwrap();
    let firmware = Firmware::new(&scratch.path().join("firmware"), &factory);
    (scratch, keys, bundle, firmware)
}

#[test]
fn a_start_that_ran_a_slot_applied_after_its_boot_is_counted_as_that_slots() {
    // This start's boot ran with the factory active; the apply came before its ExecStart,
    // which ran slot a.
    let (booted, _) = boot_step(&SlotState::default());
    let (slot, applied) = apply_step(&booted, "2.0.0", false).unwrap();
    assert_eq!(applied.running, Some(Slot::Factory));
    assert_eq!(commit_step(&applied), None, "the trial was never started");
    let seen = running_step(&applied, slot).unwrap();
    assert_eq!(seen.running, Some(slot));
    assert_eq!(seen.trial.as_ref().map(|trial| trial.attempts), Some(1));
    assert!(commit_step(&seen).is_some());
    // The guard that keeps an apply off the running slot now sees it.
    let rolled = rollback_step(&seen).unwrap();
    assert!(matches!(
        apply_step(&rolled, "2.0.1", false),
        Err(UpdateError::RestartPending { .. })
    ));
    // What boot counted already is left as it was.
    assert_eq!(running_step(&seen, slot), None);
}
