//! The shipped complexity weights are what the deterministic trainer produces, and the model
//! they make beats ranking by prompt length on the validation split (RouteLLM's APGR).

use std::process::{Command, Output};

fn train_complexity(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_train-complexity"))
        .args(args)
        .output()
        .unwrap()
}

/// The APGR of `router` in the `validation` rows of the trainer's report.
fn validation_apgr(report: &str, router: &str) -> f64 {
    report
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                ["validation", name, "APGR", apgr, ..] if *name == router => apgr.parse().ok(),
                _ => None,
            }
        })
        .unwrap_or_else(|| panic!("no validation APGR for {router} in:\n{report}"))
}

#[test]
fn shipped_weights_are_reproduced_and_beat_prompt_length() {
    let output = train_complexity(&["--check"]);
    let report = String::from_utf8_lossy(&output.stdout);
    println!("{report}");
    assert!(
        output.status.success(),
        "train-complexity --check failed:\n{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let model = validation_apgr(&report, "complexity");
    let length = validation_apgr(&report, "length-only");
    assert!(
        model > length + 0.03,
        "complexity APGR {model} does not beat length-only {length}"
    );
}

#[test]
fn check_fails_on_weights_the_trainer_does_not_reproduce() {
    let shipped = tests::workspace_root().join("data/routing/complexity-weights.txt");
    let text = std::fs::read_to_string(shipped).unwrap();
    let edited = text.replacen("\ntokens_log ", "\ntokens_log 1", 1);
    assert_ne!(edited, text);
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("complexity-weights.txt");
    std::fs::write(&path, edited).unwrap();

    let output = train_complexity(&["--check", "--weights", path.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("differs from the retrained weights"),
        "{stderr}"
    );
}
