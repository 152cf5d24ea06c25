//! The per-call tool gate of a plan: is this tool on the intent's allow-list, does it need a human,
//! and does its rate limit have room.
//!
//! A refusal is not an error of the task: the worker returns it to the model as an error result
//! (`is_error`), so the model can answer without the tool. Rate limits use the same exact
//! sliding-window log as admissions ([`super::ratelimit::wait_for_room`]), keyed per
//! (server/tool, scope key); only calls that were let through count.

use std::collections::{HashMap, VecDeque};

use agentplane_api::policy::{AgentPolicySpec, RateLimit, Scope};
use jiff::Timestamp;

use super::ledger::{MAX_WINDOW, Subject};
use super::ratelimit::{retry_after_secs, wait_for_room};

/// What the gate says about one tool call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolDecision {
    /// Call it now.
    Allow,
    /// Park the task in AwaitingApproval for this exact call.
    NeedsApproval,
    /// Do not call it; tell the model why.
    Refuse(String),
}

/// Calls let through, per (intent, server/tool, scope, scope key), as unix milliseconds ascending.
#[derive(Debug, Default)]
pub struct ToolCallLog {
    windows: HashMap<(String, String, Scope, String), VecDeque<i64>>,
}

fn period_ms(limit: &RateLimit) -> i64 {
    i64::from(limit.period_seconds.max(1))
        .saturating_mul(1000)
        .min(MAX_WINDOW.as_millis() as i64)
}

impl ToolCallLog {
    /// Decides one call of `server`/`tool` for `subject`. `approved` is true when an approver already
    /// approved exactly this call (same step, same arguments); it lifts the approval gate, never the
    /// allow-list or the rate limit. An allowed call is recorded against its limits.
    pub fn decide(
        &mut self,
        policy: &AgentPolicySpec,
        subject: &Subject<'_>,
        server: &str,
        tool: &str,
        approved: bool,
        now: Timestamp,
    ) -> ToolDecision {
        let Some(rule) = policy.tool_rule(subject.intent, server, tool) else {
            return ToolDecision::Refuse(format!(
                "tool {server}/{tool} is not allowed for intent {:?}",
                subject.intent
            ));
        };
        if policy.mcp_server(server).is_none() {
            return ToolDecision::Refuse(format!(
                "tool {server}/{tool}: MCP server {server:?} is not declared in the policy"
            ));
        }
        let now_ms = now.as_millisecond();
        let tool_key = format!("{server}/{tool}");
        let window_key = |limit: &RateLimit| {
            (
                subject.intent.to_owned(),
                tool_key.clone(),
                limit.scope,
                subject.key(limit.scope).to_owned(),
            )
        };
        for limit in &rule.rate_limits {
            let key = window_key(limit);
            let empty = VecDeque::new();
            let times = self.windows.get(&key).unwrap_or(&empty);
            if let Some(wait) = wait_for_room(times, limit.requests, period_ms(limit), now_ms) {
                return ToolDecision::Refuse(format!(
                    "tool {tool_key} is rate limited: {} calls per {} s per {:?}; retry after {}s",
                    limit.requests,
                    limit.period_seconds,
                    limit.scope,
                    retry_after_secs(wait)
                ));
            }
        }
        if rule.requires_approval && !approved {
            return ToolDecision::NeedsApproval;
        }
        for limit in &rule.rate_limits {
            let key = window_key(limit);
            let times = self.windows.entry(key).or_default();
            times.push_back(now_ms);
            let cutoff = now_ms.saturating_sub(period_ms(limit));
            while times.front().is_some_and(|t| *t <= cutoff) {
                times.pop_front();
            }
        }
        ToolDecision::Allow
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentplane_api::policy::{HttpTransport, IntentRule, McpServer, RateLimitAction, ToolRule};

    fn policy() -> AgentPolicySpec {
        let tool = |name: &str, requires_approval: bool, rate_limits| ToolRule {
            server: "files".into(),
            name: name.into(),
            requires_approval,
            rate_limits,
        };
        AgentPolicySpec {
            intents: vec![IntentRule {
                kind: "chat".into(),
                allowed: true,
                requires_approval: false,
                privacy_levels: vec![],
                rate_limits: vec![],
                on_rate_limit: RateLimitAction::Deny,
                tools: vec![
                    tool("list", false, vec![]),
                    tool("delete", true, vec![]),
                    tool(
                        "search",
                        false,
                        vec![RateLimit {
                            scope: Scope::User,
                            requests: 2,
                            period_seconds: 60,
                        }],
                    ),
                ],
                max_steps: None,
            }],
            mcp_servers: vec![McpServer {
                name: "files".into(),
                stdio: None,
                http: Some(HttpTransport {
                    url: "http://127.0.0.1:1/mcp".into(),
                    headers: vec![],
                }),
                call_timeout_seconds: 5,
                max_result_bytes: 1024,
                max_tools: 10,
            }],
            ..Default::default()
        }
    }

    fn subject(user: &str) -> Subject<'_> {
        Subject {
            intent: "chat",
            user,
            device: "d1",
        }
    }

    #[test]
    fn only_listed_tools_pass_and_destructive_ones_wait_for_a_human() {
        let p = policy();
        let mut log = ToolCallLog::default();
        let now = Timestamp::now();
        let s = subject("u1");
        assert_eq!(
            log.decide(&p, &s, "files", "list", false, now),
            ToolDecision::Allow
        );
        assert_eq!(
            log.decide(&p, &s, "files", "delete", false, now),
            ToolDecision::NeedsApproval
        );
        assert_eq!(
            log.decide(&p, &s, "files", "delete", true, now),
            ToolDecision::Allow
        );
        let ToolDecision::Refuse(why) = log.decide(&p, &s, "files", "format_disk", true, now)
        else {
            panic!("an unlisted tool must be refused, even with an approval");
        };
        assert!(why.contains("files/format_disk is not allowed"), "{why}");
        let other_intent = Subject {
            intent: "shell",
            ..s
        };
        assert!(matches!(
            log.decide(&p, &other_intent, "files", "list", false, now),
            ToolDecision::Refuse(_)
        ));
    }

    #[test]
    fn tool_rate_limits_are_per_scope_key_and_slide() {
        let p = policy();
        let mut log = ToolCallLog::default();
        let t0 = Timestamp::now();
        let (a, b) = (subject("u1"), subject("u2"));
        for _ in 0..2 {
            assert_eq!(
                log.decide(&p, &a, "files", "search", false, t0),
                ToolDecision::Allow
            );
        }
        let ToolDecision::Refuse(why) = log.decide(&p, &a, "files", "search", false, t0) else {
            panic!("the third call in the window must be refused");
        };
        assert!(
            why.contains("rate limited") && why.contains("retry after 60s"),
            "{why}"
        );
        assert_eq!(
            log.decide(&p, &b, "files", "search", false, t0),
            ToolDecision::Allow,
            "another user has their own window"
        );
        let later = t0 + jiff::SignedDuration::from_secs(61);
        assert_eq!(
            log.decide(&p, &a, "files", "search", false, later),
            ToolDecision::Allow
        );
    }
}
