//! Prefix reuse bookkeeping: which token sequences have their KV cells in the cache, which
//! of them a new prompt can start from, and how many cells are in use.
//!
//! With a unified KV cache, llama.cpp lets one cell belong to several sequences, so copying
//! a prefix from one sequence to another (`seq_cp` over positions `[0, L)`) costs no memory
//! and no compute: the new sequence decodes only the rest of its prompt. Sources are the
//! active sequences (a shared system prompt of a request still running) and cached prefixes:
//! finished sequences parked under spare sequence ids, evicted least-recently-used when
//! their count or their total tokens exceed the configured bounds.
//!
//! This module is pure: the worker asks it what to do and then does it to the context.

use std::collections::HashMap;

/// A sequence id in the llama.cpp context.
pub type SeqId = i32;

/// A prefix a prompt can start from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixMatch {
    pub source: SeqId,
    /// Tokens to copy, `[0, length)`; always less than the prompt's length, so at least one
    /// prompt token is decoded and yields the logits of the first generated token.
    pub length: usize,
}

/// Length of the common prefix of two token sequences.
pub fn common_prefix(left: &[i32], right: &[i32]) -> usize {
    left.iter()
        .zip(right)
        .take_while(|(left, right)| left == right)
        .count()
}

/// The longest usable prefix of `prompt` among `candidates` (sequence id and the tokens
/// whose KV is in the cache), if any is at least `minimum` tokens long.
pub fn best_match<'a>(
    prompt: &[i32],
    candidates: impl IntoIterator<Item = (SeqId, &'a [i32])>,
    minimum: usize,
) -> Option<PrefixMatch> {
    let usable = prompt.len().checked_sub(1)?;
    candidates
        .into_iter()
        .map(|(source, tokens)| PrefixMatch {
            source,
            length: common_prefix(prompt, tokens).min(usable),
        })
        .filter(|candidate| candidate.length >= minimum.max(1))
        .max_by_key(|candidate| (candidate.length, std::cmp::Reverse(candidate.source)))
}

/// Where a new prompt goes when each sequence keeps its own KV cache: the free slot whose
/// leftover tokens (what its last occupant decoded, still in its cache) share the longest
/// prefix with the prompt, and how many of those tokens the prompt keeps. The kept length
/// stops one short of the prompt, so its last token is decoded and gives logits.
///
/// Without a useful leftover, an empty slot is preferred over one whose leftover another
/// prompt might still reuse. `free` lists `(slot, leftover)` for the free slots.
pub fn choose_slot<'a>(
    prompt: &[i32],
    free: impl IntoIterator<Item = (usize, &'a [i32])>,
) -> Option<(usize, usize)> {
    let usable = prompt.len().saturating_sub(1);
    free.into_iter()
        .map(|(slot, leftover)| {
            let kept = common_prefix(prompt, leftover).min(usable);
            (slot, kept, leftover.is_empty())
        })
        .max_by_key(|&(slot, kept, empty)| (kept, empty, std::cmp::Reverse(slot)))
        .map(|(slot, kept, _)| (slot, kept))
}

#[derive(Debug, Clone)]
struct Entry {
    seq: SeqId,
    tokens: Vec<i32>,
    last_used: u64,
}

/// What the worker does to park a finished sequence in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Park {
    /// Clear these cache sequence ids first (evicted or replaced entries).
    pub clear: Vec<SeqId>,
    /// Then copy the finished sequence into this id.
    pub target: SeqId,
}

/// Finished sequences kept for reuse, under the sequence ids `first_seq..first_seq+entries`.
#[derive(Debug, Clone)]
pub struct PrefixCache {
    entries: Vec<Entry>,
    free: Vec<SeqId>,
    tokens_max: usize,
    clock: u64,
}

impl PrefixCache {
    /// A cache of at most `entries_max` prefixes holding at most `tokens_max` tokens in all.
    pub fn new(first_seq: SeqId, entries_max: usize, tokens_max: usize) -> Self {
        let count = SeqId::try_from(entries_max).unwrap_or(SeqId::MAX);
        PrefixCache {
            entries: Vec::new(),
            free: (first_seq..first_seq.saturating_add(count)).rev().collect(),
            tokens_max,
            clock: 0,
        }
    }

    /// Whether the cache can hold anything.
    pub fn enabled(&self) -> bool {
        self.tokens_max > 0 && (!self.free.is_empty() || !self.entries.is_empty())
    }

    /// The cached prefixes as match candidates.
    pub fn candidates(&self) -> impl Iterator<Item = (SeqId, &[i32])> {
        self.entries
            .iter()
            .map(|entry| (entry.seq, entry.tokens.as_slice()))
    }

    /// Marks a cached prefix as just used.
    pub fn touch(&mut self, seq: SeqId) {
        self.clock += 1;
        let clock = self.clock;
        if let Some(entry) = self.entries.iter_mut().find(|entry| entry.seq == seq) {
            entry.last_used = clock;
        }
    }

    /// Tokens held by cached prefixes.
    pub fn tokens(&self) -> usize {
        self.entries.iter().map(|entry| entry.tokens.len()).sum()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Decides where a finished sequence with these tokens is parked, evicting what it must;
    /// `None` when it does not fit at all or adds nothing.
    pub fn park(&mut self, tokens: Vec<i32>) -> Option<Park> {
        if tokens.is_empty() || tokens.len() > self.tokens_max {
            return None;
        }
        // Already covered: an entry that starts with all of these tokens.
        if let Some(entry) = self
            .entries
            .iter()
            .find(|entry| common_prefix(&entry.tokens, &tokens) == tokens.len())
        {
            let seq = entry.seq;
            self.touch(seq);
            return None;
        }
        let mut clear = Vec::new();
        // Entries the new one extends are replaced by it.
        let (covered, kept): (Vec<Entry>, Vec<Entry>) = self
            .entries
            .drain(..)
            .partition(|entry| common_prefix(&entry.tokens, &tokens) == entry.tokens.len());
        self.entries = kept;
        for entry in covered {
            clear.push(entry.seq);
            self.free.push(entry.seq);
        }
        while self.free.is_empty() || self.tokens() + tokens.len() > self.tokens_max {
            let seq = self.evict_lru()?;
            clear.push(seq);
        }
        let target = self.free.pop()?;
        self.clock += 1;
        self.entries.push(Entry {
            seq: target,
            tokens,
            last_used: self.clock,
        });
        Some(Park { clear, target })
    }

    /// Drops an entry whose contents could not be saved.
    pub fn forget(&mut self, seq: SeqId) {
        if let Some(index) = self.entries.iter().position(|entry| entry.seq == seq) {
            self.entries.swap_remove(index);
            self.free.push(seq);
        }
    }

    /// Removes the least recently used prefix; returns its sequence id to clear.
    pub fn evict_lru(&mut self) -> Option<SeqId> {
        let index = self
            .entries
            .iter()
            .enumerate()
            .min_by_key(|(_, entry)| entry.last_used)
            .map(|(index, _)| index)?;
        let entry = self.entries.swap_remove(index);
        self.free.push(entry.seq);
        Some(entry.seq)
    }
}

/// Which KV cells are in use, tracked from the operations the worker performs.
///
/// Cells are written in runs: each decode appends to the writing sequence's current run.
/// Copying a prefix makes the target reference the same runs; removing a sequence drops its
/// references. A run's cells beyond the furthest position any sequence references are free
/// again, which is exactly when llama.cpp frees them.
#[derive(Debug, Clone, Default)]
pub struct CellLedger {
    /// For each sequence, its spans in position order: (run, first position, end position).
    spans: HashMap<SeqId, Vec<Span>>,
    next_run: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    run: u64,
    /// Whether this sequence's own decoding wrote the span, since its cells were last
    /// released; a span copied in (from a parked prefix, or another sequence) is not, even
    /// when the same sequence id wrote the run in an earlier occupancy.
    own: bool,
    start: usize,
    end: usize,
}

impl CellLedger {
    /// The sequence wrote `count` new cells after its current end.
    pub fn extend(&mut self, seq: SeqId, count: usize) {
        if count == 0 {
            return;
        }
        let spans = self.spans.entry(seq).or_default();
        match spans.last_mut() {
            // Its own run grows; a copied prefix stays as it is (other sequences may hold
            // the cells after it in the same run).
            Some(last) if last.own => last.end += count,
            last => {
                let end = last.map_or(0, |span| span.end);
                spans.push(Span {
                    run: self.next_run,
                    own: true,
                    start: end,
                    end: end + count,
                });
                self.next_run += 1;
            }
        }
    }

    /// `target` (empty) now references `source`'s cells for positions `[0, length)`.
    pub fn copy_prefix(&mut self, source: SeqId, target: SeqId, length: usize) {
        let spans: Vec<Span> = self
            .spans
            .get(&source)
            .map(|spans| {
                spans
                    .iter()
                    .filter(|span| span.start < length)
                    .map(|span| Span {
                        end: span.end.min(length),
                        own: false,
                        ..*span
                    })
                    .collect()
            })
            .unwrap_or_default();
        if spans.is_empty() {
            self.spans.remove(&target);
        } else {
            self.spans.insert(target, spans);
        }
    }

    /// The sequence's cells are released.
    pub fn remove(&mut self, seq: SeqId) {
        self.spans.remove(&seq);
    }

    /// Cells holding KV data that some sequence references.
    pub fn used_cells(&self) -> usize {
        let mut furthest: HashMap<u64, (usize, usize)> = HashMap::new();
        for span in self.spans.values().flatten() {
            let extent = furthest.entry(span.run).or_insert((span.start, span.end));
            extent.0 = extent.0.min(span.start);
            extent.1 = extent.1.max(span.end);
        }
        furthest.values().map(|(start, end)| end - start).sum()
    }
}

#[cfg(test)]
mod tests;

/// Tokens per block of a prompt's lane-affinity digests.
pub const AFFINITY_BLOCK_TOKENS: usize = 64;

/// Digests of a prompt's whole-block prefixes: the `k`-th covers its first
/// `k × AFFINITY_BLOCK_TOKENS` tokens, so two prompts share their first `n` digests exactly
/// when they share their first `n` blocks (up to hash collisions, which only cost a hint).
pub fn block_digests(tokens: &[i32]) -> Vec<u64> {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut hasher = DefaultHasher::new();
    tokens
        .chunks_exact(AFFINITY_BLOCK_TOKENS)
        .map(|block| {
            block.hash(&mut hasher);
            hasher.finish()
        })
        .collect()
}

/// The prompts a lane was sent lately, as block digests, oldest first: where their KV most
/// likely still is (in a slot or in the lane's prefix cache), for sending a prompt that
/// shares their start to the same lane. A hint only: the lane's worker decides what it
/// reuses.
#[derive(Debug)]
pub struct RecentPrompts {
    prompts: std::collections::VecDeque<Vec<u64>>,
    capacity: usize,
}

impl RecentPrompts {
    pub fn new(capacity: usize) -> RecentPrompts {
        RecentPrompts {
            prompts: std::collections::VecDeque::new(),
            capacity,
        }
    }

    /// The most leading blocks `digests` shares with a remembered prompt.
    pub fn shared_blocks(&self, digests: &[u64]) -> usize {
        self.prompts
            .iter()
            .map(|prompt| {
                prompt
                    .iter()
                    .zip(digests)
                    .take_while(|(left, right)| left == right)
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    /// Remembers a prompt sent to the lane, forgetting the oldest beyond the capacity.
    /// Prompts shorter than one block leave nothing to match.
    pub fn remember(&mut self, digests: Vec<u64>) {
        if digests.is_empty() || self.capacity == 0 {
            return;
        }
        if self.prompts.len() == self.capacity {
            self.prompts.pop_front();
        }
        self.prompts.push_back(digests);
    }
}
