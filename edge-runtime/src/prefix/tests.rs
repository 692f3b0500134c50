use super::{CellLedger, Park, PrefixCache, PrefixMatch, best_match, choose_slot, common_prefix};

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
