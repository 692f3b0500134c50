use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{DailyUsage, FILE, until_tomorrow};

/// 2026-11-23 15:00:00 UTC.
fn afternoon() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(20_780 * 86_400 + 15 * 3_600)
}

#[test]
fn counts_survive_a_reopen_the_same_day_and_start_again_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let now = afternoon();
    let usage = DailyUsage::open(dir.path(), now).unwrap();
    usage.add("key:a", 700, now);
    usage.add("key:a", 50, now);
    usage.add("anonymous", 5, now);
    usage.add("key:b", 0, now);
    assert_eq!(usage.used("key:a", now), 750);
    assert_eq!(usage.used("key:b", now), 0);
    usage.save().unwrap();
    // Only the file itself is left, readable by the gateway's user alone.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(names, [FILE]);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join(FILE))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    let later = now + Duration::from_secs(3_600);
    let reopened = DailyUsage::open(dir.path(), later).unwrap();
    assert_eq!(reopened.used("key:a", later), 750);
    assert_eq!(reopened.used("anonymous", later), 5);

    // Nine hours on it is tomorrow: a fresh day, written as such.
    let tomorrow = now + Duration::from_secs(9 * 3_600);
    assert_eq!(reopened.used("key:a", tomorrow), 0);
    reopened.save().unwrap();
    let text = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
    assert!(!text.contains("key:a"), "{text}");
    let next_start = DailyUsage::open(dir.path(), now).unwrap();
    assert_eq!(
        next_start.used("key:a", now),
        0,
        "yesterday's counts are not today's"
    );
}

#[test]
fn saves_at_once_from_several_threads_all_land_and_the_last_counts_win() {
    let dir = tempfile::tempdir().unwrap();
    let now = afternoon();
    let usage = DailyUsage::open(dir.path(), now).unwrap();
    std::thread::scope(|scope| {
        for thread in 0..4 {
            let usage = &usage;
            scope.spawn(move || {
                for _ in 0..50 {
                    usage.add(&format!("key:{thread}"), 1, now);
                    usage.save().unwrap();
                }
            });
        }
    });
    let reopened = DailyUsage::open(dir.path(), now).unwrap();
    for thread in 0..4 {
        assert_eq!(reopened.used(&format!("key:{thread}"), now), 50);
    }
}

#[test]
fn a_damaged_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(FILE), "{not json").unwrap();
    let error = DailyUsage::open(dir.path(), afternoon()).unwrap_err();
    assert!(error.to_string().contains(FILE), "{error}");
}

#[test]
fn the_next_day_starts_at_midnight_utc() {
    assert_eq!(until_tomorrow(afternoon()), Duration::from_secs(9 * 3_600));
    let midnight = UNIX_EPOCH + Duration::from_secs(20_781 * 86_400);
    assert_eq!(until_tomorrow(midnight), Duration::from_secs(86_400));
}

#[test]
fn a_clock_set_back_keeps_the_counts_and_counts_from_far_ahead_give_way() {
    let dir = tempfile::tempdir().unwrap();
    let after_midnight = afternoon() + Duration::from_secs(9 * 3_600 + 30 * 60);
    let usage = DailyUsage::open(dir.path(), after_midnight).unwrap();
    usage.add("key:a", 700, after_midnight);
    // NTP sets the clock back across midnight: no fresh budget.
    let before_midnight = after_midnight - Duration::from_secs(40 * 60);
    assert_eq!(usage.used("key:a", before_midnight), 700);
    usage.add("key:a", 10, before_midnight);
    assert_eq!(usage.used("key:a", after_midnight), 710);
    // Counts a clock a month ahead made do not keep budgets spent for a month.
    let month_ahead = after_midnight + Duration::from_secs(30 * 86_400);
    usage.add("key:b", 5, month_ahead);
    assert_eq!(usage.used("key:b", after_midnight), 0);
}

#[test]
fn callers_beyond_the_days_bound_share_one_count() {
    let dir = tempfile::tempdir().unwrap();
    let now = afternoon();
    let usage = DailyUsage::open(dir.path(), now).unwrap();
    for index in 0..super::CALLERS_MAX {
        usage.add(&format!("anonymous@10.0.{index}"), 1, now);
    }
    // Known callers keep their own counts; new ones are counted together.
    usage.add("anonymous@10.0.7", 1, now);
    assert_eq!(usage.used("anonymous@10.0.7", now), 2);
    usage.add("anonymous@192.0.2.1", 5, now);
    usage.add("anonymous@192.0.2.2", 5, now);
    assert_eq!(usage.used("anonymous@192.0.2.3", now), 10);
}

#[test]
fn requests_in_flight_hold_their_share_of_the_budget_until_they_end() {
    let dir = tempfile::tempdir().unwrap();
    let usage = std::sync::Arc::new(DailyUsage::open(dir.path(), afternoon()).unwrap());
    usage.add("key:a", 60, afternoon());
    // A lone request is admitted while anything is left, whatever it may use.
    let first = usage.reserve("key:a", 500, 100, afternoon()).unwrap();
    // While it runs, what it holds counts: a second one at once is refused.
    assert_eq!(
        usage.reserve("key:a", 10, 100, afternoon()).err(),
        Some(560)
    );
    // Another caller's budget is its own.
    assert!(usage.reserve("key:b", 10, 100, afternoon()).is_ok());
    // It ends having used 20: counted, then its hold given back.
    usage.add("key:a", 20, afternoon());
    drop(first);
    assert_eq!(usage.used("key:a", afternoon()), 80);
    let second = usage.reserve("key:a", 10, 100, afternoon()).unwrap();
    drop(second);
    usage.add("key:a", 20, afternoon());
    assert_eq!(usage.reserve("key:a", 1, 100, afternoon()).err(), Some(100));
}
