//! Rate limits: a sliding-window log per (intent rule, scope key).
//!
//! A limit `{scope, requests, periodSeconds}` on an intent rule allows at most `requests` admissions
//! of that intent type per scope key (the user id, the device id, or the whole namespace) in any
//! window of `periodSeconds`. The ledger keeps the admission times themselves (a log, not an
//! approximate counter), so the check is exact at the limit: of a burst of N + k, exactly N are
//! admitted, and the retry-after is the moment the oldest admission that blocks leaves the window.
//!
//! Only admissions count (a task that left Pending for AwaitingApproval or Queued), at the moment of
//! admission. Denied and held tasks do not count, so a flood that is refused does not lock its sender
//! out for longer; a task held by the limit and admitted later counts when it is admitted, so holding
//! never lets more than `requests` through in any window.

use std::collections::VecDeque;
use std::time::Duration;

use agentplane_api::policy::{IntentRule, RateLimit, Scope};
use jiff::Timestamp;

use super::ledger::{Ledger, MAX_WINDOW, Subject};

/// A rate limit that has no room now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limited {
    /// When the limit will have room again (the longest wait over the rule's full limits).
    pub retry_after: Duration,
    /// Which limit, for the task's reason; ends with `retry after Ns`.
    pub reason: String,
}

/// The period of a limit in milliseconds, clamped to 1 s ..= 31 days (the CRD's bounds; an embedded
/// policy is not checked by an API server).
fn period_ms(limit: &RateLimit) -> i64 {
    i64::from(limit.period_seconds.max(1))
        .saturating_mul(1000)
        .min(MAX_WINDOW.as_millis() as i64)
}

/// How long until a sliding-window log of admission times (unix ms, ascending) has room for one more
/// admission at `now_ms`; `None` when it has room now.
///
/// The window is `(now - period, now]`: an admission at `t` counts until `t + period`, exclusive.
pub fn wait_for_room(
    times: &VecDeque<i64>,
    requests: u32,
    period_ms: i64,
    now_ms: i64,
) -> Option<Duration> {
    let cutoff = now_ms.saturating_sub(period_ms);
    let first_in = times.partition_point(|t| *t <= cutoff);
    let count = times.len() - first_in;
    let requests = requests as usize;
    if count < requests {
        return None;
    }
    // Room appears when all but `requests - 1` of the admissions in the window have left it: the
    // last of those to leave is this one.
    let frees_at = match times.get(first_in + count - requests) {
        Some(t) => t.saturating_add(period_ms),
        // `requests == 0`: a limit that admits nothing; ask again after a period.
        None => now_ms.saturating_add(period_ms),
    };
    let wait = frees_at.saturating_sub(now_ms).max(1);
    Some(Duration::from_millis(u64::try_from(wait).unwrap_or(1)))
}

/// Checks every rate limit of `rule` for `subject` at `now`.
pub fn check(
    rule: &IntentRule,
    subject: &Subject<'_>,
    ledger: &Ledger,
    now: Timestamp,
) -> Result<(), Limited> {
    let now_ms = now.as_millisecond();
    let empty = VecDeque::new();
    let mut worst: Option<(Duration, &RateLimit)> = None;
    for limit in &rule.rate_limits {
        let key = subject.key(limit.scope);
        let times = ledger
            .window(subject.intent, limit.scope, key)
            .unwrap_or(&empty);
        if let Some(wait) = wait_for_room(times, limit.requests, period_ms(limit), now_ms)
            && worst.is_none_or(|(w, _)| wait > w)
        {
            worst = Some((wait, limit));
        }
    }
    match worst {
        None => Ok(()),
        Some((retry_after, limit)) => {
            let who = match limit.scope {
                Scope::User => format!("user {:?}", subject.user),
                Scope::Device => format!("device {:?}", subject.device),
                Scope::Namespace => "the namespace".to_owned(),
            };
            Err(Limited {
                retry_after,
                reason: format!(
                    "{who} may have {} {:?} intents admitted per {} s; retry after {}s",
                    limit.requests,
                    subject.intent,
                    period_ms(limit) / 1000,
                    retry_after_secs(retry_after),
                ),
            })
        }
    }
}

/// Whole seconds to tell a client, rounded up (never 0: "retry now" would just be refused again).
pub fn retry_after_secs(d: Duration) -> u64 {
    d.as_millis()
        .div_ceil(1000)
        .max(1)
        .try_into()
        .unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentplane_api::policy::RateLimitAction;

    fn log(times: &[i64]) -> VecDeque<i64> {
        times.iter().copied().collect()
    }

    #[test]
    fn window_edges_are_half_open() {
        // Three admissions allowed per 10 s; admitted at 0, 1 and 2 s.
        let times = log(&[0, 1000, 2000]);
        assert_eq!(
            wait_for_room(&times, 3, 10_000, 2000),
            Some(Duration::from_secs(8))
        );
        // One millisecond before the first leaves, still full; at exactly t + period it has left.
        assert_eq!(
            wait_for_room(&times, 3, 10_000, 9_999),
            Some(Duration::from_millis(1))
        );
        assert_eq!(wait_for_room(&times, 3, 10_000, 10_000), None);
        // Room for one is not room for two: after the first leaves, the second still blocks.
        let times = log(&[0, 1000, 2000, 10_000]);
        assert_eq!(
            wait_for_room(&times, 3, 10_000, 10_000),
            Some(Duration::from_secs(1))
        );
    }

    #[test]
    fn a_limit_that_shrank_waits_for_enough_to_leave() {
        // Five in the window but the limit is now 2: room once the first four have left.
        let times = log(&[0, 100, 200, 300, 400]);
        assert_eq!(
            wait_for_room(&times, 2, 1000, 500),
            Some(Duration::from_millis(800))
        );
        assert_eq!(
            wait_for_room(&times, 0, 1000, 500),
            Some(Duration::from_millis(1000))
        );
    }

    fn rule(limits: Vec<RateLimit>) -> IntentRule {
        IntentRule {
            kind: "summarize".into(),
            allowed: true,
            requires_approval: false,
            privacy_levels: vec![],
            rate_limits: limits,
            on_rate_limit: RateLimitAction::Deny,
            tools: vec![],
            max_steps: None,
        }
    }

    fn limit(scope: Scope, requests: u32, period_seconds: u32) -> RateLimit {
        RateLimit {
            scope,
            requests,
            period_seconds,
        }
    }

    #[test]
    fn a_burst_is_cut_exactly_at_the_limit() {
        let subject = Subject {
            intent: "summarize",
            user: "u",
            device: "d",
        };
        let r = rule(vec![limit(Scope::Device, 5, 60)]);
        let now: Timestamp = "2025-01-01T00:00:00Z".parse().unwrap();
        let mut ledger = Ledger::default();
        let mut admitted = 0;
        for i in 0..20 {
            if check(&r, &subject, &ledger, now).is_ok() {
                ledger.record_admission(&format!("t{i}"), &subject, now, 0);
                admitted += 1;
            }
        }
        assert_eq!(admitted, 5);
        let limited = check(&r, &subject, &ledger, now).unwrap_err();
        assert_eq!(limited.retry_after, Duration::from_secs(60));
        assert!(
            limited.reason.ends_with("retry after 60s"),
            "{}",
            limited.reason
        );
        // Other devices and other intents have their own windows.
        let other = Subject {
            device: "d2",
            ..subject
        };
        assert!(check(&r, &other, &ledger, now).is_ok());
        // A minute later the window is empty again.
        let later = now
            .checked_add(jiff::SignedDuration::from_secs(60))
            .unwrap();
        assert!(check(&r, &subject, &ledger, later).is_ok());
    }

    #[test]
    fn the_longest_wait_over_all_limits_wins() {
        let subject = Subject {
            intent: "summarize",
            user: "u",
            device: "d",
        };
        let now: Timestamp = "2025-01-01T00:00:00Z".parse().unwrap();
        let mut ledger = Ledger::default();
        ledger.record_admission("a", &subject, now, 0);
        // Per user: 1 per 10 s; per namespace: 1 per 100 s. Both full; the namespace decides.
        let r = rule(vec![
            limit(Scope::User, 1, 10),
            limit(Scope::Namespace, 1, 100),
        ]);
        let limited = check(&r, &subject, &ledger, now).unwrap_err();
        assert_eq!(limited.retry_after, Duration::from_secs(100));
        assert!(
            limited.reason.starts_with("the namespace"),
            "{}",
            limited.reason
        );
        // A period beyond 31 days is clamped rather than overflowing.
        let r = rule(vec![limit(Scope::User, 1, u32::MAX)]);
        let limited = check(&r, &subject, &ledger, now).unwrap_err();
        assert_eq!(limited.retry_after, MAX_WINDOW.unsigned_abs());
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1000)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
    }
}
