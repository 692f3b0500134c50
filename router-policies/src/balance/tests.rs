use proptest::prelude::*;

use super::*;

const NAMES: [&str; 6] = ["a", "b", "c", "d", "e", "f"];

fn views(weights: &[(u32, Option<&'static str>, bool)]) -> Vec<BackendView<'static>> {
    weights
        .iter()
        .zip(NAMES)
        .map(|(&(weight, variant, available), name)| BackendView {
            name,
            weight,
            variant,
            available,
        })
        .collect()
}

fn counts(backends: &[BackendView<'_>], facts: &BalanceFacts<'_>, picks: usize) -> Vec<usize> {
    let mut round_robin = RoundRobin::default();
    let mut counts = vec![0; backends.len()];
    for _ in 0..picks {
        if let Ok(index) = choose_backend(backends, facts, &mut round_robin) {
            counts[index] += 1;
        }
    }
    counts
}

#[test]
fn round_robin_split_is_exact_per_cycle_and_interleaved() {
    let backends = views(&[(90, Some("v1"), true), (10, Some("v2"), true)]);
    assert_eq!(
        counts(&backends, &BalanceFacts::default(), 10_000),
        [9_000, 1_000]
    );
    // Smooth: the light backend is spread out, not served in one burst.
    let mut round_robin = RoundRobin::default();
    let picks: Vec<usize> = (0..10)
        .map(|_| choose_backend(&backends, &BalanceFacts::default(), &mut round_robin))
        .collect::<Result<_, _>>()
        .unwrap_or_default();
    assert_eq!(picks.iter().filter(|&&index| index == 1).count(), 1);
    assert_ne!(picks.first(), Some(&1));
}

#[test]
fn weight_zero_drains_and_unavailable_backends_get_nothing() {
    let backends = views(&[(0, None, true), (3, None, false), (1, None, true)]);
    assert_eq!(
        counts(&backends, &BalanceFacts::default(), 100),
        [0, 0, 100]
    );
    let none = views(&[(0, None, true), (5, None, false)]);
    let mut round_robin = RoundRobin::default();
    assert_eq!(
        choose_backend(&none, &BalanceFacts::default(), &mut round_robin),
        Err(NoBackend::Unavailable)
    );
}

#[test]
fn forced_variant_selects_only_its_backends() {
    let backends = views(&[
        (99, Some("v1"), true),
        (1, Some("v2"), true),
        (1, Some("v2"), true),
    ]);
    let facts = BalanceFacts {
        variant: Some("v2"),
        ..BalanceFacts::default()
    };
    assert_eq!(counts(&backends, &facts, 10), [0, 5, 5]);
    let unknown = BalanceFacts {
        variant: Some("v9"),
        ..BalanceFacts::default()
    };
    let mut round_robin = RoundRobin::default();
    assert_eq!(
        choose_backend(&backends, &unknown, &mut round_robin),
        Err(NoBackend::UnknownVariant)
    );
    // A known variant whose backends are all down is unavailable, not unknown.
    let down = views(&[(1, Some("v1"), true), (1, Some("v2"), false)]);
    assert_eq!(
        choose_backend(&down, &facts, &mut round_robin),
        Err(NoBackend::Unavailable)
    );
}

#[test]
fn retries_exclude_backends_already_tried() {
    let backends = views(&[(1, None, true), (1, None, true)]);
    let mut round_robin = RoundRobin::default();
    for tried in 0..2 {
        let facts = BalanceFacts {
            exclude: &[tried],
            ..BalanceFacts::default()
        };
        assert_eq!(
            choose_backend(&backends, &facts, &mut round_robin),
            Ok(1 - tried)
        );
    }
    let facts = BalanceFacts {
        exclude: &[0, 1],
        ..BalanceFacts::default()
    };
    assert_eq!(
        choose_backend(&backends, &facts, &mut round_robin),
        Err(NoBackend::Unavailable)
    );
}

#[test]
fn sticky_callers_keep_their_backend_and_spread_by_weight() {
    let backends = views(&[(80, Some("v1"), true), (20, Some("v2"), true)]);
    let mut round_robin = RoundRobin::default();
    let mut per_backend = [0usize; 2];
    for caller in 0..10_000 {
        let key = format!("caller-{caller}");
        let facts = BalanceFacts {
            sticky_key: Some(&key),
            ..BalanceFacts::default()
        };
        let first = choose_backend(&backends, &facts, &mut round_robin);
        for _ in 0..3 {
            assert_eq!(choose_backend(&backends, &facts, &mut round_robin), first);
        }
        if let Ok(index) = first {
            per_backend[index] += 1;
        }
    }
    // A hash spreads callers by weight within sampling error (±2 points at 10,000 callers).
    let share = per_backend[1] as f64 / 10_000.0;
    assert!((share - 0.2).abs() < 0.02, "v2 share {share}");
}

#[test]
fn only_callers_of_a_backend_that_leaves_move_and_they_come_back() {
    let mut backends = views(&[(1, None, true), (1, None, true), (2, None, true)]);
    let mut round_robin = RoundRobin::default();
    let keys: Vec<String> = (0..10_000).map(|caller| format!("team-{caller}")).collect();
    let assign = |backends: &[BackendView<'_>], round_robin: &mut RoundRobin| -> Vec<usize> {
        keys.iter()
            .map(|key| {
                let facts = BalanceFacts {
                    sticky_key: Some(key),
                    ..BalanceFacts::default()
                };
                choose_backend(backends, &facts, round_robin).unwrap_or(usize::MAX)
            })
            .collect()
    };
    let before = assign(&backends, &mut round_robin);
    // Shares by weight (1 : 1 : 2), within ±2 points at 10,000 callers.
    for (index, share) in [(0, 0.25), (1, 0.25), (2, 0.5)] {
        let count = before.iter().filter(|&&chosen| chosen == index).count();
        let measured = count as f64 / keys.len() as f64;
        assert!(
            (measured - share).abs() < 0.02,
            "backend {index}: {measured}"
        );
    }
    backends[0].available = false;
    let during = assign(&backends, &mut round_robin);
    let mut moved_to = [0usize; 3];
    for (was, now) in before.iter().zip(&during) {
        if *was == 0 {
            moved_to[*now] += 1;
        } else {
            assert_eq!(was, now, "a caller of a backend still there moved");
        }
    }
    // The departed backend's callers spread over the others by weight (1 : 2).
    let moved = (moved_to[1] + moved_to[2]) as f64;
    assert!(
        (moved_to[1] as f64 / moved - 1.0 / 3.0).abs() < 0.04,
        "{moved_to:?}"
    );
    backends[0].available = true;
    assert_eq!(assign(&backends, &mut round_robin), before);
}

#[test]
fn circuit_opens_after_failures_backs_off_and_closes_on_a_good_trial() {
    let settings = CircuitSettings {
        failures_to_open: 3,
        open_base_ms: 1_000,
        open_max_ms: 3_000,
    };
    let mut circuit = Circuit::default();
    for now in 0..2 {
        assert_eq!(circuit.admit(now), Admission::Pass);
        circuit.record(false, None, now, &settings);
    }
    assert_eq!(circuit.phase(2), CircuitPhase::Closed);
    circuit.record(false, None, 10, &settings);
    assert_eq!(circuit.phase(10), CircuitPhase::Open);
    assert_eq!(circuit.admit(1_009), Admission::Refuse);
    assert!(!circuit.is_available(1_009));
    // Half-open: one trial, and nobody else while it is out.
    assert!(circuit.is_available(1_010));
    let first = trial(circuit.admit(1_010));
    assert_eq!(circuit.admit(1_011), Admission::Refuse);
    // A failed trial opens it for twice as long, then up to the maximum.
    circuit.record(false, Some(first), 1_100, &settings);
    assert_eq!(circuit.admit(3_099), Admission::Refuse);
    let second = trial(circuit.admit(3_100));
    circuit.record(false, Some(second), 3_100, &settings);
    assert_eq!(circuit.admit(6_099), Admission::Refuse);
    let third = trial(circuit.admit(6_100));
    // An abandoned trial frees the slot for another.
    circuit.abandon_trial(third);
    let fourth = trial(circuit.admit(6_101));
    circuit.record(true, Some(fourth), 6_200, &settings);
    assert_eq!(circuit.phase(6_200), CircuitPhase::Closed);
    assert_eq!(circuit.admit(6_201), Admission::Pass);
    // Closed again with the back-off reset: three failures open it for the base time.
    for now in 7_000..7_003 {
        circuit.record(false, None, now, &settings);
    }
    assert_eq!(circuit.admit(8_001), Admission::Refuse);
    assert!(matches!(circuit.admit(8_002), Admission::Trial(_)));
}

fn trial(admission: Admission) -> Trial {
    match admission {
        Admission::Trial(trial) => trial,
        other => panic!("expected the half-open trial, got {other:?}"),
    }
}

#[test]
fn only_the_trial_out_now_settles_a_half_open_circuit() {
    let settings = CircuitSettings {
        failures_to_open: 1,
        open_base_ms: 1_000,
        open_max_ms: 8_000,
    };
    let mut circuit = Circuit::default();
    circuit.record(false, None, 0, &settings);
    let old = trial(circuit.admit(1_000));
    // A request admitted before the circuit opened fails now: the trial still decides.
    circuit.record(false, None, 1_001, &settings);
    assert_eq!(circuit.phase(1_001), CircuitPhase::HalfOpen);
    assert_eq!(circuit.admit(1_002), Admission::Refuse);
    // The trial fails: open again; the next round's trial goes out.
    circuit.record(false, Some(old), 1_100, &settings);
    let current = trial(circuit.admit(3_100));
    // The old trial's late ends (abandoned, passed, failed) touch the current one not.
    circuit.abandon_trial(old);
    assert_eq!(circuit.admit(3_101), Admission::Refuse);
    circuit.pass_trial(old);
    assert_eq!(circuit.phase(3_102), CircuitPhase::HalfOpen);
    circuit.record(false, Some(old), 3_103, &settings);
    assert_eq!(circuit.phase(3_103), CircuitPhase::HalfOpen);
    assert_eq!(circuit.admit(3_104), Admission::Refuse);
    // The current trial's good start closes it.
    circuit.pass_trial(current);
    assert_eq!(circuit.admit(3_105), Admission::Pass);
}

#[test]
fn a_success_resets_the_failure_count() {
    let settings = CircuitSettings {
        failures_to_open: 2,
        open_base_ms: 10,
        open_max_ms: 10,
    };
    let mut circuit = Circuit::default();
    circuit.record(false, None, 0, &settings);
    circuit.record(true, None, 1, &settings);
    circuit.record(false, None, 2, &settings);
    assert_eq!(circuit.phase(3), CircuitPhase::Closed);
}

proptest! {
    #[test]
    fn never_picks_an_ineligible_backend(
        backends in prop::collection::vec((0u32..5, prop::option::of(prop::sample::select(vec!["v1", "v2"])), any::<bool>()), 1..6),
        exclude in prop::collection::vec(0usize..6, 0..3),
        variant in prop::option::of(prop::sample::select(vec!["v1", "v2"])),
        sticky in prop::option::of("[a-z]{1,8}"),
    ) {
        let views: Vec<BackendView<'_>> = backends
            .iter()
            .zip(NAMES)
            .map(|(&(weight, variant, available), name)| BackendView { name, weight, variant, available })
            .collect();
        let facts = BalanceFacts { variant, sticky_key: sticky.as_deref(), exclude: &exclude };
        let mut round_robin = RoundRobin::default();
        for _ in 0..20 {
            if let Ok(index) = choose_backend(&views, &facts, &mut round_robin) {
                let chosen = views[index];
                prop_assert!(chosen.available && chosen.weight > 0);
                prop_assert!(!exclude.contains(&index));
                prop_assert!(variant.is_none_or(|variant| chosen.variant == Some(variant)));
            }
        }
    }

    #[test]
    fn round_robin_shares_are_exact_over_a_cycle(weights in prop::collection::vec(0u32..20, 1..6)) {
        let views: Vec<BackendView<'_>> = weights
            .iter()
            .zip(NAMES)
            .map(|(&weight, name)| BackendView { name, weight, variant: None, available: true })
            .collect();
        let total: u32 = weights.iter().sum();
        prop_assume!(total > 0);
        let counts = counts(&views, &BalanceFacts::default(), total as usize * 3);
        for (count, weight) in counts.iter().zip(&weights) {
            prop_assert_eq!(*count, *weight as usize * 3);
        }
    }
}

#[test]
fn a_trial_that_starts_well_lets_others_through_but_keeps_the_back_off_until_one_ends_well() {
    let settings = CircuitSettings {
        failures_to_open: 1,
        open_base_ms: 1_000,
        open_max_ms: 8_000,
    };
    let mut circuit = Circuit::default();
    circuit.record(false, None, 0, &settings);
    let first = trial(circuit.admit(1_000));
    // Its status line came: others pass while it runs.
    circuit.pass_trial(first);
    assert_eq!(circuit.admit(1_001), Admission::Pass);
    // Its answer then broke: opened again for twice as long (the back-off was kept).
    circuit.record(false, None, 1_100, &settings);
    assert_eq!(circuit.admit(3_099), Admission::Refuse);
    let second = trial(circuit.admit(3_100));
    circuit.pass_trial(second);
    // One answer that ends well resets it: the next opening is for the base time.
    circuit.record(true, None, 3_200, &settings);
    circuit.record(false, None, 4_000, &settings);
    assert_eq!(circuit.admit(4_999), Admission::Refuse);
    assert!(matches!(circuit.admit(5_000), Admission::Trial(_)));
}
