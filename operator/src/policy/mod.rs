//! Policy evaluation: pure functions from (policy, device, signed payload) to a decision. No I/O, so
//! the embedded and distributed runtimes decide identically and every rule is unit-tested here.
//!
//! Not yet evaluated: rate limits and budgets (they need usage counters from the store); see
//! docs/gateway.md.

use agentplane_api::IntentPayload;
use agentplane_api::device::EdgeDeviceSpec;
use agentplane_api::policy::{AgentPolicySpec, UnlistedIntents};
use agentplane_api::task::ModelSelection;

/// The model tier a task will run on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TierChoice {
    /// Position on the policy's ladder (0 = most capable).
    pub index: usize,
    pub name: String,
    /// What the device asked for, if anything.
    pub requested: Option<String>,
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
    /// The kill switch is on: admit nothing, keep the task Pending.
    Hold { reason: String },
    /// Refuse; the task ends Denied with this reason.
    Deny { code: &'static str, reason: String },
    /// Park in AwaitingApproval; the tier is chosen now so the approver sees what will run.
    AwaitApproval(TierChoice),
    /// Enqueue on this tier.
    Admit(TierChoice),
}

/// Decides a task's fate. The caller has already verified the envelope and the display fields.
pub fn evaluate(
    policy: Option<&AgentPolicySpec>,
    device: &EdgeDeviceSpec,
    payload: &IntentPayload,
) -> Decision {
    let Some(policy) = policy else {
        return deny("no_policy", "no AgentPolicy exists in the namespace");
    };
    if policy.suspend {
        return Decision::Hold {
            reason: "the AgentPolicy is suspended".into(),
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
/// payload's privacy level and offers a GPU when one is required.
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
    let needs_gpu = payload.required_resources.gpu;
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
    use agentplane_api::policy::{EndpointKind, IntentRule, ModelTier, RateLimitAction};

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
        p.required_resources.gpu = true;
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
}
