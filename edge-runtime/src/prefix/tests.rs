use super::{
    AFFINITY_BLOCK_TOKENS, CellLedger, Park, PrefixCache, PrefixMatch, RecentPrompts, best_match,
    block_digests, choose_slot, common_prefix,
};

#[test]
fn the_longest_prefix_wins_and_leaves_one_token_to_decode() {
    let prompt = [1, 2, 3, 4, 5];
    let a = [1, 2, 9];
    let b = [1, 2, 3, 4, 5, 6, 7];
    let candidates = [(10, &a[..]), (11, &b[..])];
    assert_eq!(
        best_match(&prompt, candidates, 1),
        Some(PrefixMatch {
            source: 11,
            length: 4
        })
    );
    assert_eq!(best_match(&prompt, [(10, &a[..])], 3), None);
    assert_eq!(best_match(&[], [(10, &a[..])], 1), None);
    assert_eq!(common_prefix(&[1, 2], &[1, 2, 3]), 2);
}

#[test]
fn parking_replaces_covered_entries_and_evicts_least_recently_used() {
    let mut cache = PrefixCache::new(8, 2, 10);
    assert_eq!(
        cache.park(vec![1, 2, 3]),
        Some(Park {
            clear: vec![],
            target: 8
        })
    );
    // Already covered by the entry above: nothing to do.
    assert_eq!(cache.park(vec![1, 2]), None);
    // Extends the first entry: replaces it.
    assert_eq!(
        cache.park(vec![1, 2, 3, 4]),
        Some(Park {
            clear: vec![8],
            target: 8
        })
    );
    assert_eq!(
        cache.park(vec![7, 7]),
        Some(Park {
            clear: vec![],
            target: 9
        })
    );
    cache.touch(8);
    // Full by count: the least recently used (9) goes.
    assert_eq!(
        cache.park(vec![5, 5, 5]),
        Some(Park {
            clear: vec![9],
            target: 9
        })
    );
    // Over the token bound (4 + 3 + 6 > 10): evict until it fits.
    assert_eq!(
        cache.park(vec![6, 6, 6, 6, 6, 6]),
        Some(Park {
            clear: vec![8],
            target: 8
        })
    );
    assert_eq!(cache.tokens(), 9);
    // Longer than the whole budget: not kept.
    assert_eq!(cache.park(vec![0; 11]), None);
    assert_eq!(cache.len(), 2);
}

#[test]
fn the_ledger_counts_shared_cells_once() {
    let mut ledger = CellLedger::default();
    ledger.extend(0, 100); // a prompt of 100 tokens in sequence 0
    assert_eq!(ledger.used_cells(), 100);
    ledger.copy_prefix(0, 1, 80); // sequence 1 starts from 80 of them
    ledger.extend(1, 30);
    ledger.extend(0, 5);
    assert_eq!(ledger.used_cells(), 105 + 30);
    ledger.remove(0); // cells 80..105 of sequence 0's run are free again
    assert_eq!(ledger.used_cells(), 80 + 30);
    ledger.copy_prefix(1, 9, 110); // parked in the cache
    ledger.remove(1);
    assert_eq!(ledger.used_cells(), 110);
    ledger.remove(9);
    assert_eq!(ledger.used_cells(), 0);
}

#[test]
fn a_slot_that_reuses_a_prefix_its_earlier_occupant_wrote_counts_its_new_cells() {
    let mut ledger = CellLedger::default();
    // Slot 0 writes 100 cells; they are parked in cache sequence 9 and the slot released.
    ledger.extend(0, 100);
    ledger.copy_prefix(0, 9, 100);
    ledger.remove(0);
    assert_eq!(ledger.used_cells(), 100);
    // The next request in slot 0 shares 40 of them and writes 30 of its own: the 60 parked
    // cells past its prefix are still held, so 130 in all, not 100.
    ledger.copy_prefix(9, 0, 40);
    ledger.extend(0, 30);
    assert_eq!(ledger.used_cells(), 130);
    ledger.remove(9);
    assert_eq!(ledger.used_cells(), 70);
}

#[test]
fn a_prompt_goes_to_the_free_slot_whose_leftover_it_shares_most() {
    let prompt = [7, 8, 9, 1, 2];
    let other = [7, 8, 3];
    let best = [7, 8, 9, 4];
    let free = [(0, &other[..]), (2, &best[..]), (3, &[][..])];
    assert_eq!(choose_slot(&prompt, free), Some((2, 3)));
    // The same prompt again keeps all but its last token.
    let same = [7, 8, 9, 1, 2, 5, 6];
    assert_eq!(choose_slot(&prompt, [(1, &same[..])]), Some((1, 4)));
}

#[test]
fn without_a_shared_prefix_an_empty_slot_is_taken_before_a_leftover() {
    let prompt = [5, 6];
    let leftover = [1, 2, 3];
    assert_eq!(
        choose_slot(&prompt, [(0, &leftover[..]), (1, &[][..]), (2, &[][..])]),
        Some((1, 0))
    );
    assert_eq!(choose_slot(&prompt, [(4, &leftover[..])]), Some((4, 0)));
    assert_eq!(choose_slot(&prompt, []), None);
}

#[test]
fn prompts_sharing_leading_blocks_share_leading_digests() {
    let block = AFFINITY_BLOCK_TOKENS;
    let base: Vec<i32> = (0..3 * block as i32 + 5).collect();
    let mut other = base.clone();
    other[block + 3] = -1; // differs in the second block
    let (a, b) = (block_digests(&base), block_digests(&other));
    assert_eq!(a.len(), 3, "whole blocks only");
    assert_eq!(a[0], b[0]);
    assert_ne!(a[1], b[1]);
    assert_ne!(
        a[2], b[2],
        "a later block's digest covers everything before it"
    );
    assert!(block_digests(&base[..block - 1]).is_empty());
}

#[test]
fn a_lane_remembers_its_latest_prompts_and_measures_shared_blocks() {
    let block = AFFINITY_BLOCK_TOKENS as i32;
    let prompt = |seed: i32, blocks: i32| -> Vec<u64> {
        block_digests(
            &(0..blocks * block)
                .map(|i| i + seed * 1_000_000)
                .collect::<Vec<_>>(),
        )
    };
    let mut recent = RecentPrompts::new(2);
    assert_eq!(recent.shared_blocks(&prompt(1, 3)), 0);
    recent.remember(prompt(1, 3));
    recent.remember(Vec::new()); // under one block: nothing to remember
    assert_eq!(recent.shared_blocks(&prompt(1, 2)), 2);
    assert_eq!(recent.shared_blocks(&prompt(1, 5)), 3);
    assert_eq!(recent.shared_blocks(&prompt(2, 3)), 0);
    recent.remember(prompt(2, 1));
    recent.remember(prompt(3, 1));
    assert_eq!(
        recent.shared_blocks(&prompt(1, 3)),
        0,
        "the oldest is forgotten"
    );
    assert_eq!(recent.shared_blocks(&prompt(3, 2)), 1);
}
