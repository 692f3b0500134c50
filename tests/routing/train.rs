//! `train-complexity`: trains the complexity model of `router_policies::complexity` on
//! RouteLLM's MMLU and GSM8K rows, deterministically, and measures it with RouteLLM's metrics.
//!
//! The features come from `router_policies::complexity::features`, the function the gateway
//! serves with. The model is a logistic regression fitted by a fixed number of Newton steps in
//! f64 over the rows in file order (no randomness, no threads), so the same data give the same
//! weights file byte for byte; `--check` proves that the shipped file is reproduced. The rows
//! of `data/routing/validation-ids.txt` (chosen before any tuning) are never trained on; they
//! only measure. `--cross-validate` measures on folds of the training rows, the place to tune.
//!
//! ```text
//! train-complexity                  # retrain, write data/routing/complexity-weights.txt
//! train-complexity --check          # retrain, fail if the shipped weights differ
//! train-complexity --cross-validate # 5-fold metrics on the training rows only
//! train-complexity --cross-validate --fold-salt a # the same on other folds
//! ```

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, bail, ensure};
use clap::Parser;
use router_policies::complexity::{
    ComplexityFacts, ComplexityModel, FEATURE_COUNT, FEATURE_NAMES, WEIGHTS_HEADER, features,
};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

/// L2 penalty per training row, on standardised features (the bias is not penalised).
const L2_PER_ROW: f64 = 0.01;
/// Newton steps; the fit converges in about eight, the rest keep it exactly reproducible.
const NEWTON_STEPS: usize = 30;
/// Folds of `--cross-validate`.
const FOLDS: u64 = 5;
/// The salt of the fold assignment of `--cross-validate`, unless `--fold-salt` is given.
const FOLD_SALT: &str = "isthmus-routing-fold";
/// Features the training rows cannot inform (every row is one turn, with no tools and no
/// `max_tokens`), with hand-set weights: a doubling moves the logit by 0.07 to 0.1.
const FIXED_WEIGHTS: [(&str, f64); 3] = [
    ("turns_log", 0.15),
    ("max_tokens_log", 0.1),
    ("tools_log", 0.15),
];

#[derive(Debug, Parser)]
#[command(about = "Train the complexity model and measure it with RouteLLM's APGR and CPT(50%)")]
struct Args {
    /// The rows (JSON lines: id, source, prompt, weak_correct, strong_correct), plain or
    /// gzip-compressed (`.gz`).
    #[arg(long)]
    data: Option<PathBuf>,
    /// The validation ids, one a line (`#` comments).
    #[arg(long)]
    validation: Option<PathBuf>,
    /// The weights file to write (or to compare with `--check`).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Do not write: exit 1 if the retrained weights differ from the file.
    #[arg(long)]
    check: bool,
    /// Only report cross-validated metrics on the training rows.
    #[arg(long, conflicts_with = "check")]
    cross_validate: bool,
    /// Assign the folds of `--cross-validate` by this salt instead: other folds, to see how
    /// much a difference between two models owes to the split.
    #[arg(long, requires = "cross_validate")]
    fold_salt: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Row {
    id: u64,
    source: String,
    prompt: String,
    weak_correct: bool,
    strong_correct: bool,
}

impl Row {
    fn texts(&self) -> [&str; 1] {
        [self.prompt.as_str()]
    }

    fn features(&self) -> [f64; FEATURE_COUNT] {
        let texts = self.texts();
        features(&ComplexityFacts {
            texts: &texts,
            turns: 1,
            max_tokens: None,
            tools: 0,
        })
        .map(f64::from)
    }

    /// The training target: 1 when only the strong model answers correctly, 0 when only the
    /// weak one does, ½ when both or neither do (either model serves as well).
    fn label(&self) -> f64 {
        (1.0 + f64::from(u8::from(self.strong_correct)) - f64::from(u8::from(self.weak_correct)))
            / 2.0
    }
}

/// A stable pseudo-random number for `id` (fold assignment, the random router).
fn hash(salt: &str, id: u64) -> u64 {
    let digest = Sha256::digest(format!("{salt}:{id}"));
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(bytes)
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("train-complexity: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    let root = tests::workspace_root().join("data/routing");
    let data_path = args
        .data
        .unwrap_or_else(|| root.join("routing-train.jsonl.gz"));
    let validation_path = args
        .validation
        .unwrap_or_else(|| root.join("validation-ids.txt"));
    let weights_path = args
        .weights
        .unwrap_or_else(|| root.join("complexity-weights.txt"));

    let rows = read_rows(&data_path)?;
    let validation_ids = read_ids(&validation_path)?;
    let known: HashSet<u64> = rows.iter().map(|row| row.id).collect();
    ensure!(known.len() == rows.len(), "row ids are not unique");
    if let Some(id) = validation_ids.iter().find(|id| !known.contains(id)) {
        bail!("validation id {id} is not in {}", data_path.display());
    }
    let (validation, training): (Vec<&Row>, Vec<&Row>) = rows
        .iter()
        .partition(|row| validation_ids.contains(&row.id));

    if args.cross_validate {
        cross_validate(&training, args.fold_salt.as_deref().unwrap_or(FOLD_SALT))?;
        return Ok(ExitCode::SUCCESS);
    }

    let text = render(&fit(&training)?, training.len());
    let model = ComplexityModel::parse(&text).context("the trained weights do not parse")?;
    report(&model, &training, &validation)?;

    if args.check {
        let shipped = std::fs::read_to_string(&weights_path)
            .with_context(|| format!("reading {}", weights_path.display()))?;
        if shipped != text {
            let line = shipped
                .lines()
                .zip(text.lines())
                .position(|(shipped, trained)| shipped != trained)
                .map_or(shipped.lines().count().min(text.lines().count()), |index| {
                    index
                });
            eprintln!(
                "{} differs from the retrained weights (first at line {}): run train-complexity \
                 and commit the result",
                weights_path.display(),
                line + 1
            );
            return Ok(ExitCode::FAILURE);
        }
        println!("{} is reproduced exactly", weights_path.display());
    } else {
        std::fs::write(&weights_path, &text)
            .with_context(|| format!("writing {}", weights_path.display()))?;
        println!("wrote {}", weights_path.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn read_rows(path: &PathBuf) -> anyhow::Result<Vec<Row>> {
    use std::io::Read as _;
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let text = if path.extension().is_some_and(|extension| extension == "gz") {
        let mut text = String::new();
        flate2::read::GzDecoder::new(bytes.as_slice())
            .read_to_string(&mut text)
            .with_context(|| format!("decompressing {}", path.display()))?;
        text
    } else {
        String::from_utf8(bytes).with_context(|| format!("{} is not UTF-8", path.display()))?
    };
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(index, line)| {
            serde_json::from_str(line)
                .with_context(|| format!("{} line {}", path.display(), index + 1))
        })
        .collect()
}

fn read_ids(path: &PathBuf) -> anyhow::Result<HashSet<u64>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .map(|(index, line)| (index, line.trim()))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'))
        .map(|(index, line)| {
            line.parse()
                .with_context(|| format!("{} line {}: not an id", path.display(), index + 1))
        })
        .collect()
}

/// A fitted model over raw (not standardised) features.
#[derive(Debug)]
struct Fitted {
    bias: f64,
    weights: [f64; FEATURE_COUNT],
}

impl Fitted {
    fn logit(&self, features: &[f64; FEATURE_COUNT]) -> f64 {
        self.weights
            .iter()
            .zip(features)
            .fold(self.bias, |sum, (weight, value)| sum + weight * value)
    }
}

/// Fits the logistic regression: L2-penalised cross-entropy against [`Row::label`], Newton's
/// method on standardised features, [`FIXED_WEIGHTS`] held at their values.
fn fit(rows: &[&Row]) -> anyhow::Result<Fitted> {
    let features: Vec<[f64; FEATURE_COUNT]> = rows.iter().map(|row| row.features()).collect();
    let labels: Vec<f64> = rows.iter().map(|row| row.label()).collect();
    let fixed = |index: usize| {
        FIXED_WEIGHTS
            .iter()
            .find(|(name, _)| *name == FEATURE_NAMES[index])
            .map(|(_, weight)| *weight)
    };
    let learned: Vec<usize> = (0..FEATURE_COUNT)
        .filter(|index| fixed(*index).is_none())
        .collect();
    for index in (0..FEATURE_COUNT).filter(|index| fixed(*index).is_some()) {
        ensure!(
            features.iter().all(|row| row[index] == 0.0),
            "`{}` varies in the training rows: learn its weight instead of fixing it",
            FEATURE_NAMES[index]
        );
    }

    // Standardise the learned features.
    let count = rows.len() as f64;
    let mut means = vec![0.0; learned.len()];
    let mut deviations = vec![0.0; learned.len()];
    for (slot, &index) in learned.iter().enumerate() {
        means[slot] = features.iter().map(|row| row[index]).sum::<f64>() / count;
        let variance = features
            .iter()
            .map(|row| (row[index] - means[slot]).powi(2))
            .sum::<f64>()
            / count;
        ensure!(
            variance > 0.0,
            "`{}` is constant in the training rows",
            FEATURE_NAMES[index]
        );
        deviations[slot] = variance.sqrt();
    }
    let standardised: Vec<Vec<f64>> = features
        .iter()
        .map(|row| {
            let mut out = Vec::with_capacity(learned.len() + 1);
            out.push(1.0);
            out.extend(
                learned
                    .iter()
                    .enumerate()
                    .map(|(slot, &index)| (row[index] - means[slot]) / deviations[slot]),
            );
            out
        })
        .collect();

    let size = learned.len() + 1;
    let penalty = L2_PER_ROW * count;
    let mut beta = vec![0.0; size];
    let mut gradient_norm = 0.0;
    for _ in 0..NEWTON_STEPS {
        let mut gradient = vec![0.0; size];
        let mut hessian = vec![vec![0.0; size]; size];
        for (row, label) in standardised.iter().zip(&labels) {
            let logit: f64 = row.iter().zip(&beta).map(|(x, b)| x * b).sum();
            let probability = 1.0 / (1.0 + (-logit).exp());
            let residual = probability - label;
            let curvature = probability * (1.0 - probability);
            for i in 0..size {
                gradient[i] += residual * row[i];
                for j in 0..=i {
                    hessian[i][j] += curvature * row[i] * row[j];
                }
            }
        }
        for i in 1..size {
            gradient[i] += penalty * beta[i];
            hessian[i][i] += penalty;
        }
        gradient_norm = gradient.iter().map(|g| g * g).sum::<f64>().sqrt();
        let step = solve_cholesky(&hessian, &gradient)?;
        for (b, s) in beta.iter_mut().zip(step) {
            *b -= s;
        }
    }
    ensure!(
        gradient_norm < 1e-6,
        "Newton's method did not converge (gradient norm {gradient_norm:e})"
    );

    let mut fitted = Fitted {
        bias: beta[0],
        weights: [0.0; FEATURE_COUNT],
    };
    for (slot, &index) in learned.iter().enumerate() {
        let weight = beta[slot + 1] / deviations[slot];
        fitted.weights[index] = weight;
        fitted.bias -= weight * means[slot];
    }
    for (index, weight) in fitted.weights.iter_mut().enumerate() {
        if let Some(value) = fixed(index) {
            *weight = value;
        }
    }
    Ok(fitted)
}

/// Solves `matrix · x = vector` for a symmetric positive-definite matrix given by its lower
/// triangle.
fn solve_cholesky(matrix: &[Vec<f64>], vector: &[f64]) -> anyhow::Result<Vec<f64>> {
    let size = vector.len();
    let mut lower = vec![vec![0.0; size]; size];
    for i in 0..size {
        for j in 0..=i {
            let sum: f64 = (0..j).map(|k| lower[i][k] * lower[j][k]).sum();
            if i == j {
                let pivot = matrix[i][i] - sum;
                ensure!(pivot > 0.0, "the Hessian is not positive definite");
                lower[i][i] = pivot.sqrt();
            } else {
                lower[i][j] = (matrix[i][j] - sum) / lower[j][j];
            }
        }
    }
    let mut forward = vec![0.0; size];
    for i in 0..size {
        let sum: f64 = (0..i).map(|k| lower[i][k] * forward[k]).sum();
        forward[i] = (vector[i] - sum) / lower[i][i];
    }
    let mut solution = vec![0.0; size];
    for i in (0..size).rev() {
        let sum: f64 = (i + 1..size).map(|k| lower[k][i] * solution[k]).sum();
        solution[i] = (forward[i] - sum) / lower[i][i];
    }
    Ok(solution)
}

/// The weights file of a fitted model.
fn render(fitted: &Fitted, rows: usize) -> String {
    let mut text = format!("{WEIGHTS_HEADER}\n");
    let fixed: Vec<&str> = FIXED_WEIGHTS.iter().map(|(name, _)| *name).collect();
    let _ = write!(
        text,
        "# Written by train-complexity (tests/routing/train.rs); do not edit by hand.\n\
         # Logistic regression on {rows} rows of routing-train.jsonl (validation ids left out),\n\
         # label (1 + strong_correct - weak_correct) / 2, L2 {L2_PER_ROW} per row on standardised\n\
         # features, {NEWTON_STEPS} Newton steps. Hand-set (not in the data): {}.\n",
        fixed.join(", ")
    );
    let _ = writeln!(text, "bias {:.9e}", fitted.bias);
    for (name, weight) in FEATURE_NAMES.iter().zip(fitted.weights) {
        let _ = writeln!(text, "{name} {weight:.9e}");
    }
    text
}

/// RouteLLM's metrics of one router on a set of rows.
#[derive(Debug, Clone, Copy)]
struct Metrics {
    /// Average performance gap recovered: the mean of PGR over the share of strong calls
    /// from 0 to 100% (trapezoids between every distinct threshold).
    apgr: f64,
    /// The smallest share of strong calls (percent) at which PGR reaches 0.5.
    cpt50_percent: f64,
}

/// Routes a row to the strong model when its score is at least the threshold, for every
/// threshold between distinct scores, and integrates PGR over the share of strong calls.
fn measure(scores: &[f64], rows: &[&Row]) -> anyhow::Result<Metrics> {
    let count = rows.len() as f64;
    let accuracy =
        |correct: fn(&Row) -> bool| rows.iter().filter(|row| correct(row)).count() as f64 / count;
    let weak = accuracy(|row| row.weak_correct);
    let strong = accuracy(|row| row.strong_correct);
    ensure!(
        strong > weak,
        "the strong model is not better on these rows"
    );
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by(|a, b| scores[*b].total_cmp(&scores[*a]));

    let mut points = vec![(0.0, 0.0)];
    let mut gain = 0i64;
    let mut start = 0;
    while start < order.len() {
        let mut end = start;
        while end < order.len() && scores[order[end]] == scores[order[start]] {
            let row = rows[order[end]];
            gain += i64::from(row.strong_correct) - i64::from(row.weak_correct);
            end += 1;
        }
        points.push((end as f64 / count, gain as f64 / count / (strong - weak)));
        start = end;
    }
    let apgr = points
        .windows(2)
        .map(|pair| (pair[1].0 - pair[0].0) * (pair[0].1 + pair[1].1) / 2.0)
        .sum();
    let cpt50 = points
        .windows(2)
        .find(|pair| pair[1].1 >= 0.5)
        .map_or(1.0, |pair| {
            let ((x0, y0), (x1, y1)) = (pair[0], pair[1]);
            if y1 == y0 {
                x1
            } else {
                x0 + (0.5 - y0) / (y1 - y0) * (x1 - x0)
            }
        });
    Ok(Metrics {
        apgr,
        cpt50_percent: cpt50 * 100.0,
    })
}

fn print_metrics(split: &str, router: &str, metrics: Metrics) {
    println!(
        "{split:<12} {router:<12} APGR {:.4}  CPT(50%) {:5.1}%",
        metrics.apgr, metrics.cpt50_percent
    );
}

/// The baselines: the prompt's length in bytes, and a stable hash of the id.
fn baselines(split: &str, rows: &[&Row]) -> anyhow::Result<()> {
    let lengths: Vec<f64> = rows.iter().map(|row| row.prompt.len() as f64).collect();
    print_metrics(split, "length-only", measure(&lengths, rows)?);
    let random: Vec<f64> = rows
        .iter()
        .map(|row| hash("isthmus-random-router", row.id) as f64)
        .collect();
    print_metrics(split, "random", measure(&random, rows)?);
    Ok(())
}

/// Measures the model through the serving path (`ComplexityModel::score`).
fn report(model: &ComplexityModel, training: &[&Row], validation: &[&Row]) -> anyhow::Result<()> {
    let score = |rows: &[&Row]| -> Vec<f64> {
        rows.iter()
            .map(|row| {
                let texts = row.texts();
                f64::from(model.score(&ComplexityFacts {
                    texts: &texts,
                    turns: 1,
                    max_tokens: None,
                    tools: 0,
                }))
            })
            .collect()
    };
    println!(
        "rows: {} training, {} validation",
        training.len(),
        validation.len()
    );
    print_metrics(
        "training",
        "complexity",
        measure(&score(training), training)?,
    );
    print_metrics(
        "validation",
        "complexity",
        measure(&score(validation), validation)?,
    );
    baselines("validation", validation)?;
    for source in ["mmlu", "gsm8k"] {
        let rows: Vec<&Row> = validation
            .iter()
            .copied()
            .filter(|row| row.source == source)
            .collect();
        let split = format!("val:{source}");
        print_metrics(&split, "complexity", measure(&score(&rows), &rows)?);
        print_metrics(
            &split,
            "length-only",
            measure(
                &rows
                    .iter()
                    .map(|row| row.prompt.len() as f64)
                    .collect::<Vec<_>>(),
                &rows,
            )?,
        );
    }

    // Thresholds for rules (`complexity >= T`): the score above which a given share of the
    // training rows lies.
    let mut scores = score(training);
    scores.sort_by(|a, b| b.total_cmp(a));
    let thresholds: Vec<String> = [10, 20, 30, 50]
        .iter()
        .map(|percent| {
            let index = (scores.len() * percent / 100).min(scores.len() - 1);
            format!("{percent}% >= {:.3}", scores[index])
        })
        .collect();
    println!(
        "strong calls by threshold (training rows): {}",
        thresholds.join(", ")
    );
    Ok(())
}

/// Out-of-fold metrics on the training rows: fit on four folds, score the fifth.
fn cross_validate(training: &[&Row], salt: &str) -> anyhow::Result<()> {
    let fold = |row: &Row| hash(salt, row.id) % FOLDS;
    let mut scores = vec![0.0; training.len()];
    for held_out in 0..FOLDS {
        let fitting: Vec<&Row> = training
            .iter()
            .copied()
            .filter(|row| fold(row) != held_out)
            .collect();
        let fitted = fit(&fitting)?;
        for (score, row) in scores.iter_mut().zip(training) {
            if fold(row) == held_out {
                *score = fitted.logit(&row.features());
            }
        }
    }
    println!(
        "{} training rows, {FOLDS} folds (salt `{salt}`)",
        training.len()
    );
    print_metrics("cross-valid", "complexity", measure(&scores, training)?);
    for source in ["mmlu", "gsm8k"] {
        let (rows, scores): (Vec<&Row>, Vec<f64>) = training
            .iter()
            .zip(&scores)
            .filter(|(row, _)| row.source == source)
            .map(|(row, score)| (*row, *score))
            .unzip();
        print_metrics(
            &format!("cv:{source}"),
            "complexity",
            measure(&scores, &rows)?,
        );
    }
    baselines("cross-valid", training)?;
    Ok(())
}
