//! Budgets and model tiering: what a task is expected to cost on a tier, which calendar period its
//! spend falls in, and how far down the ladder a task must move to stay within every budget.
//!
//! - **Periods** are UTC calendar periods: the hour, the day, the ISO week (Monday 00:00 UTC) and the
//!   month. A task's spend counts in the period it was *admitted* in (the admission time is persisted
//!   in the task's `Admitted` condition, so it survives restarts); a task admitted at 23:59 that
//!   finishes at 00:01 is billed to the earlier day.
//! - **Spend** of a scope key in a period is the actual cost (`status.usage.costMicros`) of its tasks
//!   that succeeded, plus the *estimate* of its admitted tasks that have not finished yet. Counting
//!   in-flight tasks at their estimate is what keeps a burst from overrunning a budget before the
//!   first result is billed; the estimate is replaced by the real cost when the task succeeds, and
//!   released (0) when it ends any other way.
//! - **Estimate** of a task on a tier: input tokens (the larger of the word count the builtin models
//!   bill and the usual one-token-per-four-bytes of BPE models) at the input price, plus
//!   `params.maxTokens` (or `max_tokens`, else [`DEFAULT_OUTPUT_TOKENS`]) at the output price.
//! - **Tiering**: starting from the tier the policy would pick without budgets, walk down the ladder
//!   over tiers that still serve the payload's privacy level and GPU need, and take the first whose
//!   estimate fits every budget of the task's user, device and namespace. A tier whose estimate is 0
//!   always fits (it adds no spend). No tier fits: `budget_exhausted`, naming the budget that stopped
//!   the cheapest eligible tier.

use agentplane_api::IntentPayload;
use agentplane_api::intent::Intent;
use agentplane_api::policy::{AgentPolicySpec, Budget, BudgetPeriod, ModelTier, Scope};
use jiff::civil::{DateTime, Time};
use jiff::tz::TimeZone;
use jiff::{Span, Timestamp};

use super::TierChoice;
use super::ledger::{Ledger, Subject};
use crate::models::count_tokens;

/// Output tokens assumed when the intent does not cap them with `params.maxTokens`.
pub const DEFAULT_OUTPUT_TOKENS: u64 = 256;

/// Every budget period, for the ledger's per-period sums.
pub const PERIODS: [BudgetPeriod; 4] = [
    BudgetPeriod::Hour,
    BudgetPeriod::Day,
    BudgetPeriod::Week,
    BudgetPeriod::Month,
];

/// Tokens a task is assumed to use: (input, output).
pub fn estimate_tokens(intent: &Intent) -> (u64, u64) {
    let prompt = &intent.prompt;
    let bpe = u64::try_from(prompt.len()).unwrap_or(u64::MAX).div_ceil(4);
    let input = count_tokens(prompt).max(bpe);
    let output = ["maxTokens", "max_tokens"]
        .iter()
        .find_map(|k| intent.params.get(*k).and_then(serde_json::Value::as_u64))
        .unwrap_or(DEFAULT_OUTPUT_TOKENS);
    (input, output)
}

/// What a task is expected to cost on `tier`, in micros (rounded up like the real bill).
pub fn estimate_micros(tier: &ModelTier, intent: &Intent) -> u64 {
    let (input, output) = estimate_tokens(intent);
    tier.cost_micros(input, output)
}

/// Start of the UTC calendar period containing `at`. Out of range only at the ends of jiff's
/// timestamp range, where `at` itself is returned (a period of one instant: never a panic).
pub fn period_start(period: BudgetPeriod, at: Timestamp) -> Timestamp {
    start_datetime(period, at)
        .and_then(|dt| TimeZone::UTC.to_timestamp(dt).ok())
        .unwrap_or(at)
}

/// Start of the period after the one containing `at` (when a budget resets).
pub fn period_end(period: BudgetPeriod, at: Timestamp) -> Timestamp {
    let unit = match period {
        BudgetPeriod::Hour => Span::new().hours(1),
        BudgetPeriod::Day => Span::new().days(1),
        BudgetPeriod::Week => Span::new().weeks(1),
        BudgetPeriod::Month => Span::new().months(1),
    };
    start_datetime(period, at)
        .and_then(|dt| dt.checked_add(unit).ok())
        .and_then(|dt| TimeZone::UTC.to_timestamp(dt).ok())
        .unwrap_or(Timestamp::MAX)
}

fn start_datetime(period: BudgetPeriod, at: Timestamp) -> Option<DateTime> {
    let dt = at.to_zoned(TimeZone::UTC).datetime();
    let date = dt.date();
    Some(match period {
        BudgetPeriod::Hour => date.at(dt.hour(), 0, 0, 0),
        BudgetPeriod::Day => date.to_datetime(Time::midnight()),
        BudgetPeriod::Week => {
            let back = i64::from(date.weekday().to_monday_zero_offset());
            date.checked_sub(Span::new().days(back))
                .ok()?
                .to_datetime(Time::midnight())
        }
        BudgetPeriod::Month => date.first_of_month().to_datetime(Time::midnight()),
    })
}

pub fn period_name(period: BudgetPeriod) -> &'static str {
    match period {
        BudgetPeriod::Hour => "hour",
        BudgetPeriod::Day => "day",
        BudgetPeriod::Week => "week",
        BudgetPeriod::Month => "month",
    }
}

/// A budget that a task's estimate would overrun.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocked {
    pub scope: Scope,
    /// The scope key (user id, device id, or empty for the namespace).
    pub key: String,
    pub limit_micros: u64,
    pub period: BudgetPeriod,
    pub spent_micros: u64,
    pub estimate_micros: u64,
    pub resets_at: Timestamp,
}

impl std::fmt::Display for Blocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let who = match self.scope {
            Scope::User => format!("user {:?}", self.key),
            Scope::Device => format!("device {:?}", self.key),
            Scope::Namespace => "the namespace".to_owned(),
        };
        write!(
            f,
            "the budget of {who} ({} micros per {}) has {} spent and the task needs about {} more (resets at {})",
            self.limit_micros,
            period_name(self.period),
            self.spent_micros,
            self.estimate_micros,
            self.resets_at,
        )
    }
}

/// The first of the policy's budgets that `estimate` would overrun for `subject`, if any.
pub fn blocking(
    budgets: &[Budget],
    subject: &Subject<'_>,
    ledger: &Ledger,
    estimate: u64,
    now: Timestamp,
) -> Option<Blocked> {
    if estimate == 0 {
        return None;
    }
    budgets.iter().find_map(|b| {
        let key = subject.key(b.scope);
        let spent = ledger.spent(b.scope, key, b.period, now);
        // A negative limit (refused by the CRD, possible in a hand-written embedded policy) is 0.
        let limit = u64::try_from(b.limit_micros).unwrap_or(0);
        (spent.saturating_add(estimate) > limit).then(|| Blocked {
            scope: b.scope,
            key: key.to_owned(),
            limit_micros: limit,
            period: b.period,
            spent_micros: spent,
            estimate_micros: estimate,
            resets_at: period_end(b.period, now),
        })
    })
}

/// Moves `first` (the tier chosen without budgets) down the ladder until its estimate fits every
/// budget. `Err` carries the `budget_exhausted` reason.
pub fn fit_tier(
    policy: &AgentPolicySpec,
    payload: &IntentPayload,
    first: TierChoice,
    ledger: &Ledger,
    now: Timestamp,
) -> Result<TierChoice, String> {
    let subject = Subject::of(payload);
    let level = payload.privacy_level;
    let needs_gpu = payload.required_resources.needs_gpu();
    let mut first_block: Option<Blocked> = None;
    let mut last: Option<(String, Blocked)> = None;
    let eligible = policy
        .models
        .iter()
        .enumerate()
        .skip(first.index)
        .filter(|(_, m)| m.serves(level) && (!needs_gpu || m.gpu));
    for (index, tier) in eligible {
        let estimate = estimate_micros(tier, &payload.intent);
        match blocking(&policy.budgets, &subject, ledger, estimate, now) {
            None => {
                let downgrade = first_block.map(|b| {
                    format!(
                        "moved down the model ladder from {:?} to {:?}: on {:?} {b}",
                        first.name, tier.name, first.name
                    )
                });
                return Ok(TierChoice {
                    index,
                    name: tier.name.clone(),
                    requested: first.requested,
                    estimate_micros: estimate,
                    downgrade,
                });
            }
            Some(b) => {
                first_block.get_or_insert_with(|| b.clone());
                last = Some((tier.name.clone(), b));
            }
        }
    }
    Err(match last {
        Some((name, b)) => format!(
            "no model tier at or below {:?} fits the budget; on the cheapest eligible tier {name:?}, {b}",
            first.name
        ),
        // `first` itself was eligible, so the loop ran at least once; kept for a clear message.
        None => format!("no model tier at or below {:?} is eligible", first.name),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn periods_are_utc_calendar_periods() {
        // Wednesday 2025-01-01 13:45:10.5 UTC.
        let at = ts("2025-01-01T13:45:10.5Z");
        assert_eq!(
            period_start(BudgetPeriod::Hour, at),
            ts("2025-01-01T13:00:00Z")
        );
        assert_eq!(
            period_start(BudgetPeriod::Day, at),
            ts("2025-01-01T00:00:00Z")
        );
        // The ISO week began on Monday 2024-12-30, in the previous month and year.
        assert_eq!(
            period_start(BudgetPeriod::Week, at),
            ts("2024-12-30T00:00:00Z")
        );
        assert_eq!(
            period_start(BudgetPeriod::Month, at),
            ts("2025-01-01T00:00:00Z")
        );
        assert_eq!(
            period_end(BudgetPeriod::Hour, at),
            ts("2025-01-01T14:00:00Z")
        );
        assert_eq!(
            period_end(BudgetPeriod::Week, at),
            ts("2025-01-06T00:00:00Z")
        );
        assert_eq!(
            period_end(BudgetPeriod::Month, ts("2024-02-29T23:59:59Z")),
            ts("2024-03-01T00:00:00Z")
        );
    }

    #[test]
    fn period_boundaries_are_half_open() {
        // The first instant of a period belongs to it; the last nanosecond before belongs to the
        // previous one. Monday 2025-09-01 00:00 starts an hour, a day, an ISO week and a month.
        let midnight = ts("2025-09-01T00:00:00Z");
        let before = ts("2025-08-31T23:59:59.999999999Z");
        for p in PERIODS {
            assert_eq!(period_start(p, midnight), midnight, "{p:?}");
            assert_ne!(period_start(p, before), midnight, "{p:?}");
            assert_eq!(period_end(p, before), midnight, "{p:?}");
        }
        // A Sunday night and the Monday morning after are in different weeks.
        let sunday = ts("2025-03-02T23:59:59Z");
        let monday = ts("2025-03-03T00:00:00Z");
        assert_eq!(
            period_start(BudgetPeriod::Week, sunday),
            ts("2025-02-24T00:00:00Z")
        );
        assert_eq!(period_start(BudgetPeriod::Week, monday), monday);
    }

    #[test]
    fn extreme_timestamps_do_not_panic() {
        for p in PERIODS {
            let _ = period_start(p, Timestamp::MIN);
            let _ = period_end(p, Timestamp::MAX);
        }
    }

    #[test]
    fn estimates_are_conservative_and_honour_max_tokens() {
        let mut intent = Intent {
            kind: "k".into(),
            prompt: "a b c d".into(),
            params: Default::default(),
        };
        assert_eq!(estimate_tokens(&intent), (4, DEFAULT_OUTPUT_TOKENS));
        intent
            .params
            .insert("maxTokens".into(), serde_json::json!(5));
        assert_eq!(estimate_tokens(&intent), (4, 5));
        // One long word is billed like a BPE model would, not as one token.
        intent.prompt = "x".repeat(40);
        assert_eq!(estimate_tokens(&intent).0, 10);
        let tier = ModelTier {
            name: "t".into(),
            endpoint_kind: agentplane_api::policy::EndpointKind::Builtin,
            endpoint: "builtin:echo".into(),
            model: None,
            price_per_1k_input_micros: 1000,
            price_per_1k_output_micros: 3000,
            privacy_levels: vec![],
            gpu: false,
            secret_ref: None,
        };
        assert_eq!(estimate_micros(&tier, &intent), 10 + 15);
    }
}
