//! Policy evaluation: pure functions from (policy, device, signed payload, ledger, now) to a
//! decision. No I/O, so the embedded and distributed runtimes decide identically and every rule is
//! unit-tested here.
//!
//! Order of the checks: no policy (deny), the kill switch (hold), the device's allowed intents, the
//! intent rule (allowed, privacy levels), the model tier the privacy level and GPU need allow, the
//! rule's rate limits ([`ratelimit`]: deny with a retry-after, or hold, as `onRateLimit` says), the
//! budgets ([`budget`]: move down the tier ladder, deny when no tier fits), then approval.
//!
//! Rate limits and budgets are decided against a [`Ledger`] of past admissions and spend that the
//! caller passes in (the controller keeps one, rebuilt from the store at start; see [`ledger`]). They
//! are enforced at admission, in the controller, because that is the one step both backends share and
//! that runs in a single process (the distributed operator under leader election), so one ledger sees
//! every admission.

pub mod breaker;
pub mod budget;
pub mod ledger;
pub mod ratelimit;
pub mod rego;
pub mod tools;

use std::time::Duration;

use agentplane_api::IntentPayload;
use agentplane_api::device::EdgeDeviceSpec;
use agentplane_api::policy::{AgentPolicySpec, RateLimitAction, UnlistedIntents};
use agentplane_api::task::ModelSelection;
use jiff::Timestamp;

pub use ledger::{Ledger, Subject};

/// The model tier a task will run on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TierChoice {
    /// Position on the policy's ladder (0 = most capable).
    pub index: usize,
    pub name: String,
    /// What the device asked for, if anything.
    pub requested: Option<String>,
    /// Expected cost on this tier, reserved against the budgets until the task finishes.
    pub estimate_micros: u64,
    /// Why the budgets moved the task below the tier it would otherwise have run on.
    pub downgrade: Option<String>,
}

impl TierChoice {
    pub fn selection(&self) -> ModelSelection {
        ModelSelection {
            requested: self.requested.clone(),
            selected: Some(self.name.clone()),
            tier: u32::try_from(self.index).ok(),
        }
    }
}

/// What to do with a verified task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Keep the task Pending: the kill switch is on (`suspended`, until the switch is turned off) or
    /// a rate limit in `Hold` mode is full (`rate_limited`, look again after `retry_after`).
    Hold {
        code: &'static str,
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Refuse; the task ends Denied with this reason.
    Deny { code: &'static str, reason: String },
    /// Park in AwaitingApproval; the tier is chosen now so the approver sees what will run.
    AwaitApproval(TierChoice),
    /// Enqueue on this tier.
    Admit(TierChoice),
}

/// Decides a task's fate at `now`. The caller has already verified the envelope and the display
/// fields; `ledger` holds the admissions and spend that rate limits and budgets count.
pub fn evaluate(
    policy: Option<&AgentPolicySpec>,
    device: &EdgeDeviceSpec,
    payload: &IntentPayload,
    ledger: &Ledger,
    now: Timestamp,
) -> Decision {
    let Some(policy) = policy else {
        return deny("no_policy", "no AgentPolicy exists in the namespace");
    };
    if policy.suspend {
        return Decision::Hold {
            code: "suspended",
            reason: "the AgentPolicy is suspended".into(),
            retry_after: None,
        };
    }
    let kind = payload.intent.kind.as_str();
    if !device.allows_intent(kind) {
        return deny(
            "intent_not_allowed_for_device",
            format!("device may not submit intent type {kind:?}"),
        );
    }
    let rule = policy.rule_for(kind);
    match rule {
        None if policy.unlisted_intents == UnlistedIntents::Deny => {
            return deny(
                "intent_not_allowed",
                format!("intent type {kind:?} is not listed in the policy"),
            );
        }
        Some(r) if !r.allowed => {
            return deny(
                "intent_not_allowed",
                format!("intent type {kind:?} is not allowed by the policy"),
            );
        }
        Some(r)
            if !r.privacy_levels.is_empty()
                && !r.privacy_levels.contains(&payload.privacy_level) =>
        {
            return deny(
                "privacy_level_not_allowed",
                format!(
                    "intent type {kind:?} may not be submitted with privacy level {}",
                    payload.privacy_level
                ),
            );
        }
        _ => {}
    }
    let tier = match select_tier(policy, payload) {
        Ok(t) => t,
        Err(reason) => return deny("no_model_tier", reason),
    };
    if let Some(rule) = rule
        && let Err(limited) = ratelimit::check(rule, &Subject::of(payload), ledger, now)
    {
        return match rule.on_rate_limit {
            RateLimitAction::Deny => deny("rate_limited", limited.reason),
            RateLimitAction::Hold => Decision::Hold {
                code: "rate_limited",
                reason: limited.reason,
                retry_after: Some(limited.retry_after),
            },
        };
    }
    let tier = match budget::fit_tier(policy, payload, tier, ledger, now) {
        Ok(t) => t,
        Err(reason) => return deny("budget_exhausted", reason),
    };
    if rule.is_some_and(|r| r.requires_approval) {
        Decision::AwaitApproval(tier)
    } else {
        Decision::Admit(tier)
    }
}

fn deny(code: &'static str, reason: impl Into<String>) -> Decision {
    Decision::Deny {
        code,
        reason: reason.into(),
    }
}

/// Walks the ladder from the requested tier (or the top) down to the first tier that may serve the
/// payload's privacy level and offers a GPU when one is required. Budgets are not considered here
/// (see [`budget::fit_tier`]); the estimate is left at 0.
pub fn select_tier(
    policy: &AgentPolicySpec,
    payload: &IntentPayload,
) -> Result<TierChoice, String> {
    let requested = payload.required_resources.model.clone();
    let start = match &requested {
        None => 0,
        Some(name) => match policy.tier(name) {
            Some((i, _)) => i,
            None => {
                return Err(format!(
                    "requested model tier {name:?} is not in the policy's ladder"
                ));
            }
        },
    };
    let level = payload.privacy_level;
    let needs_gpu = payload.required_resources.needs_gpu();
    policy
        .models
        .iter()
        .enumerate()
        .skip(start)
        .find(|(_, m)| m.serves(level) && (!needs_gpu || m.gpu))
        .map(|(index, m)| TierChoice {
            index,
            name: m.name.clone(),
            requested: requested.clone(),
            estimate_micros: 0,
            downgrade: None,
        })
        .ok_or_else(|| {
            format!(
                "no model tier at or below {:?} serves privacy level {level}{}",
                requested.as_deref().unwrap_or("the top of the ladder"),
                if needs_gpu { " with a GPU" } else { "" }
            )
        })
}

/// Whether `identity` may approve or deny tasks under this policy.
pub fn is_approver(policy: &AgentPolicySpec, identity: &str) -> bool {
    policy.approvers.iter().any(|a| a == identity)
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentplane_api::intent::{Consent, Intent, PrivacyLevel, RequiredResources};
    use agentplane_api::policy::{
        Budget, BudgetPeriod, EndpointKind, IntentRule, ModelTier, RateLimit, RateLimitAction,
        Scope,
    };

    fn tier(name: &str, levels: &[PrivacyLevel], gpu: bool) -> ModelTier {
        ModelTier {
            name: name.into(),
            endpoint_kind: EndpointKind::Builtin,
            endpoint: "builtin:echo".into(),
            model: None,
            price_per_1k_input_micros: 1,
            price_per_1k_output_micros: 1,
            privacy_levels: levels.to_vec(),
            gpu,
            secret_ref: None,
        }
    }

    fn rule(kind: &str) -> IntentRule {
        IntentRule {
            kind: kind.into(),
            allowed: true,
            requires_approval: false,
            privacy_levels: vec![],
            rate_limits: vec![],
            on_rate_limit: RateLimitAction::Deny,
            tools: vec![],
            max_steps: None,
        }
    }

    fn policy() -> AgentPolicySpec {
        AgentPolicySpec {
            intents: vec![rule("summarize")],
            models: vec![
                tier("large", &[PrivacyLevel::Public], true),
                tier(
                    "medium",
                    &[PrivacyLevel::Public, PrivacyLevel::Regulated],
                    false,
                ),
                tier("local", &[], false),
            ],
            approvers: vec!["alice".into()],
            ..Default::default()
        }
    }

    fn device() -> EdgeDeviceSpec {
        EdgeDeviceSpec {
            public_keys: vec![],
            owner: "o".into(),
            allowed_intents: vec![],
            revoked: false,
        }
    }

    fn payload(kind: &str, level: PrivacyLevel) -> IntentPayload {
        IntentPayload {
            v: 1,
            task_id: "t".into(),
            device_id: "d".into(),
            user_id: "u".into(),
            seq: 1,
            created_at: jiff::Timestamp::UNIX_EPOCH,
            consent: Consent {
                granted_at: jiff::Timestamp::UNIX_EPOCH,
                scopes: vec![],
            },
            intent: Intent {
                kind: kind.into(),
                prompt: "p".into(),
                params: Default::default(),
            },
            privacy_level: level,
            required_resources: RequiredResources::default(),
        }
    }

    /// The decision without any past admissions or spend.
    fn evaluate(
        policy: Option<&AgentPolicySpec>,
        device: &EdgeDeviceSpec,
        payload: &IntentPayload,
    ) -> Decision {
        super::evaluate(policy, device, payload, &Ledger::default(), now())
    }

    fn now() -> Timestamp {
        "2025-01-01T12:00:00Z".parse().unwrap()
    }

    fn admitted_tier(d: Decision) -> String {
        match d {
            Decision::Admit(t) => t.name,
            other => panic!("expected Admit, got {other:?}"),
        }
    }

    #[test]
    fn no_policy_denies_and_suspend_holds() {
        let p = payload("summarize", PrivacyLevel::Public);
        assert!(matches!(
            evaluate(None, &device(), &p),
            Decision::Deny {
                code: "no_policy",
                ..
            }
        ));
        let mut pol = policy();
        pol.suspend = true;
        assert!(matches!(
            evaluate(Some(&pol), &device(), &p),
            Decision::Hold { .. }
        ));
    }

    #[test]
    fn unlisted_and_disallowed_intents() {
        let pol = policy();
        let p = payload("delete-everything", PrivacyLevel::Public);
        assert!(matches!(
            evaluate(Some(&pol), &device(), &p),
            Decision::Deny {
                code: "intent_not_allowed",
                ..
            }
        ));
        let mut open = pol.clone();
        open.unlisted_intents = UnlistedIntents::Allow;
        assert_eq!(admitted_tier(evaluate(Some(&open), &device(), &p)), "large");
        let mut closed = pol;
        closed.intents[0].allowed = false;
        assert!(matches!(
            evaluate(
                Some(&closed),
                &device(),
                &payload("summarize", PrivacyLevel::Public)
            ),
            Decision::Deny {
                code: "intent_not_allowed",
                ..
            }
        ));
    }

    #[test]
    fn device_allowed_intents_narrow_the_policy() {
        let mut dev = device();
        dev.allowed_intents = vec!["translate".into()];
        assert!(matches!(
            evaluate(
                Some(&policy()),
                &dev,
                &payload("summarize", PrivacyLevel::Public)
            ),
            Decision::Deny {
                code: "intent_not_allowed_for_device",
                ..
            }
        ));
    }

    #[test]
    fn privacy_level_against_rule_and_tiers() {
        let mut pol = policy();
        // Private work skips the tiers that may not see it.
        assert_eq!(
            admitted_tier(evaluate(
                Some(&pol),
                &device(),
                &payload("summarize", PrivacyLevel::Private)
            )),
            "local"
        );
        assert_eq!(
            admitted_tier(evaluate(
                Some(&pol),
                &device(),
                &payload("summarize", PrivacyLevel::Regulated)
            )),
            "medium"
        );
        pol.intents[0].privacy_levels = vec![PrivacyLevel::Public];
        assert!(matches!(
            evaluate(
                Some(&pol),
                &device(),
                &payload("summarize", PrivacyLevel::Private)
            ),
            Decision::Deny {
                code: "privacy_level_not_allowed",
                ..
            }
        ));
    }

    #[test]
    fn tier_ladder_starts_at_the_request_and_respects_gpu() {
        let pol = policy();
        let mut p = payload("summarize", PrivacyLevel::Public);
        p.required_resources.model = Some("medium".into());
        let t = select_tier(&pol, &p).unwrap();
        assert_eq!((t.index, t.name.as_str()), (1, "medium"));
        assert_eq!(t.selection().requested.as_deref(), Some("medium"));
        p.required_resources.gpu = 1;
        assert!(
            select_tier(&pol, &p).is_err(),
            "no GPU tier at or below medium"
        );
        p.required_resources.model = Some("huge".into());
        assert!(select_tier(&pol, &p).unwrap_err().contains("huge"));
    }

    #[test]
    fn approval_rules_and_approvers() {
        let mut pol = policy();
        pol.intents[0].requires_approval = true;
        assert!(matches!(
            evaluate(
                Some(&pol),
                &device(),
                &payload("summarize", PrivacyLevel::Public)
            ),
            Decision::AwaitApproval(_)
        ));
        assert!(is_approver(&pol, "alice"));
        assert!(!is_approver(&pol, "mallory"));
    }

    fn priced(mut t: ModelTier, input: u64, output: u64) -> ModelTier {
        t.price_per_1k_input_micros = input;
        t.price_per_1k_output_micros = output;
        t
    }

    /// A ladder of three tiers, each ten times cheaper than the one above, and a free tier for
    /// regulated work only. Prompt "a b c d" with maxTokens 6 (4 + 6 tokens) costs 100 micros on
    /// large, 10 on medium and 2 on small (each direction rounds up).
    fn budget_policy(limit_micros: i64) -> AgentPolicySpec {
        AgentPolicySpec {
            intents: vec![rule("summarize")],
            models: vec![
                priced(tier("large", &[], false), 10_000, 10_000),
                priced(tier("medium", &[PrivacyLevel::Public], false), 1_000, 1_000),
                priced(
                    tier(
                        "small",
                        &[PrivacyLevel::Public, PrivacyLevel::Private],
                        false,
                    ),
                    100,
                    100,
                ),
                priced(tier("free", &[PrivacyLevel::Regulated], false), 0, 0),
            ],
            budgets: vec![Budget {
                scope: Scope::Device,
                limit_micros,
                period: BudgetPeriod::Day,
            }],
            ..Default::default()
        }
    }

    fn budget_payload(level: PrivacyLevel) -> IntentPayload {
        let mut p = payload("summarize", level);
        p.intent.prompt = "a b c d".into();
        p.intent
            .params
            .insert("maxTokens".into(), serde_json::json!(6));
        p
    }

    fn admit_with(
        pol: &AgentPolicySpec,
        p: &IntentPayload,
        ledger: &mut Ledger,
        id: &str,
    ) -> Decision {
        let d = super::evaluate(Some(pol), &device(), p, ledger, now());
        if let Decision::Admit(t) = &d {
            ledger.record_admission(id, &Subject::of(p), now(), t.estimate_micros);
        }
        d
    }

    #[test]
    fn budgets_move_tasks_down_the_ladder_then_deny() {
        let pol = budget_policy(125);
        let p = budget_payload(PrivacyLevel::Public);
        let mut ledger = Ledger::default();
        let mut tiers = Vec::new();
        for i in 0..6 {
            match admit_with(&pol, &p, &mut ledger, &format!("t{i}")) {
                Decision::Admit(t) => {
                    // Only the tasks below the top say why they moved.
                    assert_eq!(t.downgrade.is_some(), t.index > 0, "{t:?}");
                    tiers.push(t.name);
                }
                Decision::Deny { code, reason } => {
                    assert_eq!(code, "budget_exhausted");
                    // The budget that stopped the cheapest eligible tier is named.
                    assert!(reason.contains("\"small\""), "{reason}");
                    assert!(reason.contains("device \"d\""), "{reason}");
                    assert!(reason.contains("per day"), "{reason}");
                    tiers.push("denied".into());
                }
                other => panic!("{other:?}"),
            }
        }
        // 100 on large; 100 + 100 > 125 so medium (110), then medium (120); 120 + 10 > 125 so small
        // (122, 124); 124 + 2 > 125: nothing fits, and it stays that way.
        assert_eq!(
            tiers,
            ["large", "medium", "medium", "small", "small", "denied"]
        );
        assert!(matches!(
            admit_with(&pol, &p, &mut ledger, "t6"),
            Decision::Deny {
                code: "budget_exhausted",
                ..
            }
        ));
        // Another device has its own budget.
        let mut other = p.clone();
        other.device_id = "d2".into();
        assert_eq!(
            admitted_tier(super::evaluate(
                Some(&pol),
                &device(),
                &other,
                &ledger,
                now()
            )),
            "large"
        );
        // The next day starts afresh.
        let tomorrow = now()
            .checked_add(jiff::SignedDuration::from_hours(12))
            .unwrap();
        assert_eq!(
            admitted_tier(super::evaluate(
                Some(&pol),
                &device(),
                &p,
                &ledger,
                tomorrow
            )),
            "large"
        );
    }

    #[test]
    fn a_downgrade_never_breaks_privacy_or_gpu_constraints() {
        let pol = budget_policy(50);
        let mut ledger = Ledger::default();
        // Private work may only use large or small; medium (public only) is skipped even though it fits.
        let private = budget_payload(PrivacyLevel::Private);
        let d = admit_with(&pol, &private, &mut ledger, "p1");
        let Decision::Admit(t) = d else {
            panic!("{d:?}")
        };
        assert_eq!(t.name, "small");
        assert!(t.downgrade.unwrap().contains("from \"large\" to \"small\""));
        // Regulated work may use large or the free tier: over budget, it goes to the free tier, which
        // adds nothing and so always fits.
        let regulated = budget_payload(PrivacyLevel::Regulated);
        for i in 0..3 {
            assert_eq!(
                admitted_tier(admit_with(&pol, &regulated, &mut ledger, &format!("r{i}"))),
                "free"
            );
        }
        // A GPU requirement with no GPU tier left below the budget: denied, not moved to a CPU tier.
        let mut gpu_pol = budget_policy(50);
        gpu_pol.models[0].gpu = true;
        let mut gpu = budget_payload(PrivacyLevel::Public);
        gpu.required_resources.gpu = 1;
        assert!(matches!(
            super::evaluate(Some(&gpu_pol), &device(), &gpu, &ledger, now()),
            Decision::Deny {
                code: "budget_exhausted",
                ..
            }
        ));
        // Starting at a requested tier never moves up.
        let mut asked = budget_payload(PrivacyLevel::Public);
        asked.required_resources.model = Some("medium".into());
        let t = select_tier(&pol, &asked).unwrap();
        let fitted = budget::fit_tier(&pol, &asked, t, &Ledger::default(), now()).unwrap();
        assert_eq!(
            (fitted.name.as_str(), fitted.estimate_micros),
            ("medium", 10)
        );
        assert_eq!(fitted.selection().requested.as_deref(), Some("medium"));
    }

    #[test]
    fn rate_limits_deny_or_hold_as_the_rule_says() {
        let mut pol = policy();
        pol.intents[0].rate_limits = vec![RateLimit {
            scope: Scope::User,
            requests: 2,
            period_seconds: 60,
        }];
        let p = payload("summarize", PrivacyLevel::Public);
        let mut ledger = Ledger::default();
        for i in 0..2 {
            assert!(matches!(
                admit_with(&pol, &p, &mut ledger, &format!("t{i}")),
                Decision::Admit(_)
            ));
        }
        match super::evaluate(Some(&pol), &device(), &p, &ledger, now()) {
            Decision::Deny { code, reason } => {
                assert_eq!(code, "rate_limited");
                assert!(reason.contains("user \"u\""), "{reason}");
                assert!(reason.ends_with("retry after 60s"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        pol.intents[0].on_rate_limit = RateLimitAction::Hold;
        let later = now()
            .checked_add(jiff::SignedDuration::from_secs(45))
            .unwrap();
        assert_eq!(
            super::evaluate(Some(&pol), &device(), &p, &ledger, later),
            Decision::Hold {
                code: "rate_limited",
                reason:
                    "user \"u\" may have 2 \"summarize\" intents admitted per 60 s; retry after 15s"
                        .into(),
                retry_after: Some(Duration::from_secs(15)),
            }
        );
        // Limits belong to the rule: other intent types are not counted or limited.
        let mut open = pol.clone();
        open.unlisted_intents = UnlistedIntents::Allow;
        assert!(matches!(
            super::evaluate(
                Some(&open),
                &device(),
                &payload("translate", PrivacyLevel::Public),
                &ledger,
                now()
            ),
            Decision::Admit(_)
        ));
        // Refusals for other reasons come first and are not rate limited.
        pol.intents[0].privacy_levels = vec![PrivacyLevel::Private];
        assert!(matches!(
            super::evaluate(Some(&pol), &device(), &p, &ledger, now()),
            Decision::Deny {
                code: "privacy_level_not_allowed",
                ..
            }
        ));
    }
}
