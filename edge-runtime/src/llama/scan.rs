//! Greedy token choice from a step's logits, and the helper threads that share those scans
//! on a GPU host.
//!
//! An offloaded model's logits arrive by DMA in host memory that no core has cached: one
//! 49,152-token row takes tens of microseconds to scan, so a step of many greedy sequences
//! shares its rows among helper threads. Handing work to a sleeping thread costs a wake-up
//! of similar length, paid on every step while the device has finished and waits for the
//! next one. [`ScanCrew`] wakes its helpers while the device still computes the step, timed
//! from the steps before, so that they spin, awake, when the logits arrive.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Rows one helper takes at a time.
const ROWS_PER_CLAIM: usize = 2;
/// How long before the logits are expected the woken helpers stop sleeping and spin: room
/// for the steps' own variation and for a sleeping thread's late wake-up.
const SPIN_LEAD: Duration = Duration::from_micros(300);
/// How long past the expected arrival a helper keeps spinning before it gives up.
const SPIN_OVERRUN_MAX: Duration = Duration::from_millis(2);
/// A helper sleeps in slices this long until its spin begins, so that logits that arrive
/// early find it soon.
const SLEEP_SLICE: Duration = Duration::from_micros(100);

/// The greedy scans' helper threads, and when to wake them.
pub(super) struct ScanCrew {
    pool: rayon::ThreadPool,
    threads: usize,
    /// The number of the last step whose logits are out: helpers woken for step N spin
    /// until it reaches N.
    released: Arc<AtomicU64>,
    /// Helpers spinning now, ready for rows.
    spinning: Arc<AtomicUsize>,
    /// The step launched last (numbered from 1).
    step: u64,
    /// When the last decode-only step was launched, until its logits arrived.
    launched: Option<Instant>,
    /// Launch to logits of the last decode-only step.
    expected: Option<Duration>,
    /// How long past the expected arrival helpers spin ([`SPIN_OVERRUN_MAX`]).
    overrun: Duration,
}

impl ScanCrew {
    /// A crew of `threads` helpers.
    pub fn new(threads: usize) -> Result<ScanCrew, rayon::ThreadPoolBuildError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|index| format!("argmax-{index}"))
            .build()?;
        Ok(ScanCrew {
            pool,
            threads,
            released: Arc::new(AtomicU64::new(0)),
            spinning: Arc::new(AtomicUsize::new(0)),
            step: 0,
            launched: None,
            expected: None,
            overrun: SPIN_OVERRUN_MAX,
        })
    }

    /// Helpers that spin until released however late that is: for tests on a busy machine.
    #[cfg(test)]
    pub fn patient(mut self) -> ScanCrew {
        self.overrun = Duration::from_secs(3_600);
        self
    }

    /// A step was launched whose logits will hold `rows` greedy rows. For a step of decode
    /// alone (whose duration the last one predicts) this wakes the helpers its scan will
    /// use, to sleep until shortly before the logits are expected and then spin.
    pub fn launched(&mut self, rows: usize, decode_only: bool) {
        self.step += 1;
        let now = Instant::now();
        self.launched = decode_only.then_some(now);
        let helpers = helpers_for(rows, self.threads);
        let Some(expected) = self.expected.filter(|_| decode_only && helpers > 0) else {
            return;
        };
        let spin_from = now + expected.saturating_sub(SPIN_LEAD);
        let give_up = now + expected + self.overrun;
        for _ in 0..helpers {
            let released = Arc::clone(&self.released);
            let spinning = Arc::clone(&self.spinning);
            let step = self.step;
            self.pool.spawn(move || {
                wait_for_logits(&released, &spinning, step, spin_from, give_up);
            });
        }
    }

    /// The launched step's logits are out: a decode-only step's time predicts the next
    /// one's.
    fn arrived(&mut self) {
        if let Some(launched) = self.launched.take() {
            self.expected = Some(launched.elapsed());
        }
    }

    /// Lets the helpers woken for the launched step go.
    fn release(&self) {
        self.released.store(self.step, Ordering::Release);
    }

    /// Helpers spinning now.
    #[cfg(test)]
    pub fn spinning(&self) -> usize {
        self.spinning.load(Ordering::Acquire)
    }

    /// The launched step failed: its helpers stop waiting, and it predicts nothing.
    pub fn abandon(&mut self) {
        self.launched = None;
        self.release();
    }

    /// The greedy choice of each row, in order: shared with the helpers that spin now, or
    /// with the whole pool when none does (a step after prompt tokens, the first step).
    pub fn choose(&mut self, rows: &[GreedyRow<'_>]) -> Vec<(usize, f32)> {
        self.arrived();
        let needed = helpers_for(rows.len(), self.threads);
        let spinning = self.spinning.load(Ordering::Acquire).min(needed);
        if spinning == 0 {
            self.release();
            return greedy_rows(rows, Some(&self.pool));
        }
        let next = AtomicUsize::new(0);
        let chosen: Vec<AtomicU64> = rows.iter().map(|_| AtomicU64::new(0)).collect();
        let (next, chosen) = (&next, &chosen);
        self.pool.in_place_scope(|scope| {
            // Queued before the helpers are released, so that they find them at once.
            for _ in 0..spinning {
                scope.spawn(move |_| claim_rows(rows, next, chosen));
            }
            self.release();
            claim_rows(rows, next, chosen);
        });
        chosen
            .iter()
            .map(|packed| unpack(packed.load(Ordering::Acquire)))
            .collect()
    }
}

/// Helpers worth waking for `rows` rows: one per claim beyond the caller's own, none below
/// [`PARALLEL_ARGMAX_ROWS_MIN`] rows.
fn helpers_for(rows: usize, threads: usize) -> usize {
    if rows < PARALLEL_ARGMAX_ROWS_MIN {
        return 0;
    }
    (rows.div_ceil(ROWS_PER_CLAIM) - 1).min(threads)
}

/// A woken helper: sleeps in slices until `spin_from`, then spins until step `step`'s
/// logits are out or `give_up` passes.
fn wait_for_logits(
    released: &AtomicU64,
    spinning: &AtomicUsize,
    step: u64,
    spin_from: Instant,
    give_up: Instant,
) {
    let out = || released.load(Ordering::Acquire) >= step;
    loop {
        let now = Instant::now();
        if out() || now >= give_up {
            return;
        }
        if now >= spin_from {
            break;
        }
        std::thread::sleep(SLEEP_SLICE.min(spin_from - now));
    }
    spinning.fetch_add(1, Ordering::AcqRel);
    while !out() && Instant::now() < give_up {
        std::hint::spin_loop();
    }
    spinning.fetch_sub(1, Ordering::AcqRel);
}

/// Takes [`ROWS_PER_CLAIM`] rows at a time until none is left, storing each choice by row.
fn claim_rows(rows: &[GreedyRow<'_>], next: &AtomicUsize, chosen: &[AtomicU64]) {
    loop {
        let first = next.fetch_add(ROWS_PER_CLAIM, Ordering::Relaxed);
        if first >= rows.len() {
            return;
        }
        let last = (first + ROWS_PER_CLAIM).min(rows.len());
        for (row, slot) in rows[first..last].iter().zip(&chosen[first..last]) {
            slot.store(pack(row.choose()), Ordering::Release);
        }
    }
}

/// A choice in one word: the token in the high half, the margin's bits in the low half.
fn pack((token, margin): (usize, f32)) -> u64 {
    let token = u32::try_from(token).unwrap_or(u32::MAX);
    (u64::from(token) << 32) | u64::from(margin.to_bits())
}

fn unpack(packed: u64) -> (usize, f32) {
    let token = u32::try_from(packed >> 32).unwrap_or(u32::MAX);
    let margin = u32::try_from(packed & u64::from(u32::MAX)).unwrap_or(0);
    (
        usize::try_from(token).unwrap_or(usize::MAX),
        f32::from_bits(margin),
    )
}

/// One sequence's logits to choose a token from greedily.
pub(super) struct GreedyRow<'a> {
    pub slot: usize,
    pub logits: &'a [f32],
    pub banned: Option<&'a [bool]>,
    /// Whether the top-2 margin is wanted (a full scan) or only the winner.
    pub margin: bool,
}

impl GreedyRow<'_> {
    /// (token, margin or NaN).
    pub fn choose(&self) -> (usize, f32) {
        if self.margin {
            greedy_choice(self.logits, self.banned)
        } else {
            (greedy_index(self.logits, self.banned), f32::NAN)
        }
    }
}

/// The greedy choice of each row, in order; shared among `pool`'s threads when there are
/// enough rows to be worth a hand-off (a row takes tens of microseconds from memory).
pub(super) fn greedy_rows(
    rows: &[GreedyRow<'_>],
    pool: Option<&rayon::ThreadPool>,
) -> Vec<(usize, f32)> {
    use rayon::prelude::*;
    match pool {
        Some(pool) if rows.len() >= PARALLEL_ARGMAX_ROWS_MIN => pool.install(|| {
            rows.par_iter()
                .with_max_len(2)
                .map(GreedyRow::choose)
                .collect()
        }),
        _ => rows.iter().map(GreedyRow::choose).collect(),
    }
}

/// Rows below which the greedy scans stay on the worker's own thread.
const PARALLEL_ARGMAX_ROWS_MIN: usize = 4;

/// Independent running maxima in the argmax scan: enough for the compiler to keep several
/// vector registers busy instead of one dependent chain of comparisons.
const ARGMAX_LANES: usize = 16;

/// The token with the largest logit among those not `banned`; ties go to the lower id. The
/// common case (the winner is not banned) scans the vocabulary in lanes that the compiler
/// vectorises, then finds the first chunk holding the maximum: about 6 µs for 49,152 logits
/// against 38 µs for a plain fold. It runs once per sequence per step, so at 32 sequences
/// it is the difference between 0.2 and 1.2 ms of every step.
pub(super) fn greedy_index(logits: &[f32], banned: Option<&[bool]>) -> usize {
    let largest = max_logit(logits);
    let chunks = logits.chunks(ARGMAX_LANES);
    let mut best = None;
    for (number, chunk) in chunks.enumerate() {
        // Branch-free within a chunk, so this loop vectorises too.
        let hit = chunk
            .iter()
            .fold(false, |hit, &logit| hit | (logit == largest));
        if hit {
            let within = chunk
                .iter()
                .position(|&logit| logit == largest)
                .unwrap_or(0);
            best = Some(number * ARGMAX_LANES + within);
            break;
        }
    }
    match best {
        Some(best) if !banned.is_some_and(|banned| banned.get(best).copied().unwrap_or(false)) => {
            best
        }
        _ => greedy_choice(logits, banned).0,
    }
}

/// The largest logit (NaN never wins: a comparison with NaN is false).
fn max_logit(logits: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; ARGMAX_LANES];
    let chunks = logits.chunks_exact(ARGMAX_LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &logit) in lanes.iter_mut().zip(chunk) {
            *lane = if logit > *lane { logit } else { *lane };
        }
    }
    lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |largest, &logit| {
            if logit > largest { logit } else { largest }
        })
}

/// The token with the largest logit among those not `banned`, and its lead over the
/// runner-up (how close the greedy choice was). Ties go to the lower token id, as llama.cpp's
/// greedy sampler decides them.
pub(super) fn greedy_choice(logits: &[f32], banned: Option<&[bool]>) -> (usize, f32) {
    let (mut best, mut first, mut second) = (0, f32::NEG_INFINITY, f32::NEG_INFINITY);
    for (index, &logit) in logits.iter().enumerate() {
        if banned.is_some_and(|banned| banned.get(index).copied().unwrap_or(false)) {
            continue;
        }
        if logit > first {
            second = first;
            first = logit;
            best = index;
        } else if logit > second {
            second = logit;
        }
    }
    (best, first - second)
}
