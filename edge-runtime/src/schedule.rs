//! How a decode step's batch is shared between generating sequences and waiting prompts.
//!
//! Generating sequences always contribute their next token. While any generate, prompts
//! advance by a bounded chunk per step so that the gap between those sequences' tokens stays
//! bounded; with none generating, the whole batch goes to prompts. The rest of a short
//! prompt is fed whole once it fits in a few chunks: its slot starts generating steps sooner
//! instead of idling through small chunks, each of which llama.cpp runs as a forward pass
//! apart from the decode tokens. A step still carries at most `FINISH_CHUNKS` chunks of
//! prompt, and long prompts, whose arrival is what the bound on token gaps is for, are
//! chunked to their end. The prompt budget goes to the oldest request first.
//!
//! This module is pure: the worker asks it and then fills the batch.

/// While sequences generate, the rest of a short prompt is fed in one step once it fits in
/// this many chunks, and no step carries more prompt tokens than that.
const FINISH_CHUNKS: usize = 4;
/// Prompts of at most this many chunks (beyond their cached prefix) are short.
const SHORT_CHUNKS: usize = 8;

/// A prompt still being prefilled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingPrompt {
    /// Prompt tokens not yet in the cache.
    pub remaining: usize,
    /// Prompt tokens that were not served from a cached prefix at admission.
    pub uncached: usize,
}

/// Prompt tokens each pending prompt (in admission order) puts into this step, given how
/// many sequences generate a token in it, the batch's capacity and the configured chunk.
pub fn prefill_plan(
    prompts: &[PendingPrompt],
    generating: usize,
    batch_capacity: usize,
    chunk_tokens: usize,
) -> Vec<usize> {
    let room = batch_capacity.saturating_sub(generating);
    let (mut chunk_budget, mut step_budget) = if generating > 0 {
        let chunk = chunk_tokens.min(room);
        (chunk, chunk.saturating_mul(FINISH_CHUNKS).min(room))
    } else {
        (room, room)
    };
    let short = chunk_tokens.saturating_mul(SHORT_CHUNKS);
    prompts
        .iter()
        .map(|prompt| {
            let take = if prompt.uncached <= short && prompt.remaining <= step_budget {
                prompt.remaining
            } else {
                prompt.remaining.min(chunk_budget).min(step_budget)
            };
            chunk_budget = chunk_budget.saturating_sub(take);
            step_budget -= take;
            take
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{PendingPrompt, prefill_plan};

    fn fresh(tokens: usize) -> PendingPrompt {
        PendingPrompt {
            remaining: tokens,
            uncached: tokens,
        }
    }

    #[test]
    fn with_nothing_generating_prompts_fill_the_batch_oldest_first() {
        assert_eq!(
            prefill_plan(&[fresh(300), fresh(300)], 0, 512, 16),
            [300, 212]
        );
    }

    #[test]
    fn a_long_prompt_advances_one_chunk_per_step_to_its_end() {
        assert_eq!(prefill_plan(&[fresh(1000)], 3, 512, 16), [16]);
        let tail = PendingPrompt {
            remaining: 40,
            uncached: 1000,
        };
        assert_eq!(prefill_plan(&[tail], 3, 512, 16), [16]);
    }

    #[test]
    fn a_short_prompt_finishes_once_its_rest_fits_in_four_chunks() {
        // 70 tokens: one chunk, then the remaining 54 in one step.
        assert_eq!(prefill_plan(&[fresh(70)], 7, 512, 16), [16]);
        let rest = PendingPrompt {
            remaining: 54,
            uncached: 70,
        };
        assert_eq!(prefill_plan(&[rest], 7, 512, 16), [54]);
        // Behind a long prompt's chunk, a short one still finishes within the step's bound.
        assert_eq!(
            prefill_plan(&[fresh(1000), fresh(40)], 3, 512, 16),
            [16, 40]
        );
        // Two short prompts share the bound of four chunks: the second waits.
        assert_eq!(prefill_plan(&[fresh(40), fresh(40)], 3, 512, 16), [40, 0]);
    }

    #[test]
    fn the_batch_capacity_bounds_everything() {
        assert_eq!(prefill_plan(&[fresh(40)], 30, 32, 16), [2]);
        assert_eq!(prefill_plan(&[fresh(40)], 32, 32, 16), [0]);
    }
}
