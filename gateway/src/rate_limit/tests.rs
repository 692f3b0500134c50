use std::time::{Duration, Instant};

use super::{RateLimiter, Refusal, reset_text};
use crate::config::RateLimits;

const REQUESTS: RateLimits = RateLimits {
    requests_per_minute: Some(6),
    tokens_per_minute: None,
    tokens_per_day: None,
};

#[test]
fn requests_are_refused_when_the_minute_is_used_and_admitted_as_it_refills() {
    let limiter = RateLimiter::default();
    let start = Instant::now();
    for taken in 1..=6 {
        let standing = limiter.admit("key:a", REQUESTS, start).unwrap();
        let requests = standing.requests.unwrap();
        assert_eq!((requests.limit, requests.remaining), (6, 6 - taken));
        assert!(standing.tokens.is_none());
    }
    // Six a minute is one every ten seconds.
    let refused = limiter.admit("key:a", REQUESTS, start).unwrap_err();
    assert_eq!(
        refused,
        Refusal {
            kind: "requests",
            limit: 6,
            retry_after: Duration::from_secs(10)
        }
    );
    let later = start + Duration::from_secs(4);
    let refused = limiter.admit("key:a", REQUESTS, later).unwrap_err();
    assert_eq!(refused.retry_after, Duration::from_secs(6));
    // Another caller has a bucket of its own.
    assert!(limiter.admit("key:b", REQUESTS, start).is_ok());
    let refilled = start + Duration::from_secs(10);
    let standing = limiter.admit("key:a", REQUESTS, refilled).unwrap();
    let requests = standing.requests.unwrap();
    assert_eq!(requests.remaining, 0);
    assert_eq!(requests.reset, Duration::from_secs(60));
    // Never more than a minute's allowance, however long the caller was away.
    let much_later = start + Duration::from_secs(3_600);
    let standing = limiter.admit("key:a", REQUESTS, much_later).unwrap();
    assert_eq!(standing.requests.unwrap().remaining, 5);
}

#[test]
fn tokens_are_charged_when_known_and_a_debt_holds_the_next_requests() {
    let limits = RateLimits {
        requests_per_minute: None,
        tokens_per_minute: Some(600),
        tokens_per_day: None,
    };
    let limiter = RateLimiter::default();
    let start = Instant::now();
    let standing = limiter.admit("anonymous", limits, start).unwrap();
    assert_eq!(standing.tokens.unwrap().remaining, 600);
    assert!(standing.requests.is_none());
    // One request used 900 tokens: admitted with what was there, then 300 in debt.
    limiter.charge("anonymous", limits, 900, start);
    let refused = limiter.admit("anonymous", limits, start).unwrap_err();
    assert_eq!(refused.kind, "tokens");
    assert_eq!(refused.limit, 600);
    // 10 tokens a second: 301 to get back to one.
    assert_eq!(refused.retry_after, Duration::from_millis(30_100));
    let repaid = start + Duration::from_millis(30_100);
    let standing = limiter.admit("anonymous", limits, repaid).unwrap();
    assert_eq!(standing.tokens.unwrap().remaining, 1);
    // Nothing to charge without a limit or without tokens.
    limiter.charge("anonymous", REQUESTS, 1_000_000, repaid);
    limiter.charge("anonymous", limits, 0, repaid);
    assert!(limiter.admit("anonymous", limits, repaid).is_ok());
}

#[test]
fn a_request_refused_for_tokens_keeps_its_request_unit() {
    let limits = RateLimits {
        requests_per_minute: Some(2),
        tokens_per_minute: Some(60),
        tokens_per_day: None,
    };
    let limiter = RateLimiter::default();
    let start = Instant::now();
    assert!(limiter.admit("k", limits, start).is_ok());
    limiter.charge("k", limits, 100, start);
    assert_eq!(
        limiter.admit("k", limits, start).unwrap_err().kind,
        "tokens"
    );
    // The refused request did not take the second request of the minute.
    let repaid = start + Duration::from_secs(41);
    let standing = limiter.admit("k", limits, repaid).unwrap();
    assert_eq!(standing.requests.unwrap().remaining, 1);
}

#[test]
fn standing_is_read_without_taking() {
    let limits = RateLimits {
        requests_per_minute: Some(6),
        tokens_per_minute: Some(600),
        tokens_per_day: None,
    };
    let limiter = RateLimiter::default();
    let start = Instant::now();
    let fresh = limiter.standing("k", limits, start);
    assert_eq!(fresh.requests.unwrap().remaining, 6);
    assert_eq!(fresh.tokens.unwrap().remaining, 600);
    assert!(limiter.admit("k", limits, start).is_ok());
    limiter.charge("k", limits, 100, start);
    for _ in 0..2 {
        let standing = limiter.standing("k", limits, start);
        assert_eq!(standing.requests.unwrap().remaining, 5);
        assert_eq!(standing.tokens.unwrap().remaining, 500);
    }
}

#[test]
fn reset_times_read_like_openais() {
    for (duration, text) in [
        (Duration::from_millis(20), "20ms"),
        (Duration::from_millis(999), "999ms"),
        (Duration::from_secs(1), "1s"),
        (Duration::from_millis(1_200), "2s"),
        (Duration::from_secs(360), "6m0s"),
        (Duration::from_secs(3_725), "1h2m5s"),
    ] {
        assert_eq!(reset_text(duration), text, "{duration:?}");
    }
}

#[test]
fn many_callers_keep_only_the_buckets_that_still_hold_something() {
    let limiter = RateLimiter::default();
    let tokens = RateLimits {
        requests_per_minute: Some(6),
        tokens_per_minute: Some(100),
        tokens_per_day: None,
    };
    let fill = |at: Instant, network: u32| {
        for client in 0..super::CALLERS_KEPT_MAX {
            limiter
                .admit(
                    &format!("anonymous@10.{network}.{}.{}", client / 256, client % 256),
                    REQUESTS,
                    at,
                )
                .unwrap();
        }
    };
    let start = Instant::now();
    // A client in debt, and one that used its minute, among thousands that took one request.
    limiter.admit("anonymous@10.0.0.1", tokens, start).unwrap();
    limiter.charge("anonymous@10.0.0.1", tokens, 500, start);
    for _ in 0..6 {
        limiter
            .admit("anonymous@10.0.0.2", REQUESTS, start)
            .unwrap();
    }
    fill(start, 1);
    assert_eq!(limiter.callers(), super::CALLERS_KEPT_MAX + 2);
    // Within a second nothing has refilled: every bucket still differs from a fresh one.
    let at_once = start + Duration::from_millis(500);
    limiter
        .admit("anonymous@10.2.0.1", REQUESTS, at_once)
        .unwrap();
    assert_eq!(limiter.callers(), super::CALLERS_KEPT_MAX + 3);
    // Thirty seconds later (three requests refilled) the ones that took one are full again
    // and go; the debt stays, and so does the caller that spent all six.
    let soon = start + Duration::from_secs(30);
    limiter.admit("anonymous@10.2.0.2", REQUESTS, soon).unwrap();
    assert_eq!(limiter.callers(), 3);
    assert_eq!(
        limiter
            .admit("anonymous@10.0.0.1", tokens, soon)
            .unwrap_err()
            .kind,
        "tokens"
    );
    // Once the debt is repaid (400 tokens over at 100 a minute: about five minutes) the
    // indebted caller's buckets go too, the same as never made.
    let repaid = start + Duration::from_secs(5 * 60 + 1);
    fill(repaid, 3);
    // The fill went past the bound: the three earlier callers are full again and dropped.
    assert_eq!(
        limiter.callers(),
        super::CALLERS_KEPT_MAX,
        "buckets outlived their repayment"
    );
}
