//! The task phase machine (DESIGN.md §2). Both backends and every writer go through `TaskPhase::can_move_to`.

use serde::{Deserialize, Serialize};

/// Where a task is in its life.
#[derive(
    Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, Default,
)]
pub enum TaskPhase {
    #[default]
    Pending,
    Denied,
    AwaitingApproval,
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl TaskPhase {
    pub const ALL: [TaskPhase; 8] = [
        TaskPhase::Pending,
        TaskPhase::Denied,
        TaskPhase::AwaitingApproval,
        TaskPhase::Queued,
        TaskPhase::Running,
        TaskPhase::Succeeded,
        TaskPhase::Failed,
        TaskPhase::Cancelled,
    ];

    /// Terminal phases never change again.
    pub const TERMINAL: [TaskPhase; 4] = [
        TaskPhase::Denied,
        TaskPhase::Succeeded,
        TaskPhase::Failed,
        TaskPhase::Cancelled,
    ];

    pub fn is_terminal(self) -> bool {
        Self::TERMINAL.contains(&self)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TaskPhase::Pending => "Pending",
            TaskPhase::Denied => "Denied",
            TaskPhase::AwaitingApproval => "AwaitingApproval",
            TaskPhase::Queued => "Queued",
            TaskPhase::Running => "Running",
            TaskPhase::Succeeded => "Succeeded",
            TaskPhase::Failed => "Failed",
            TaskPhase::Cancelled => "Cancelled",
        }
    }

    /// Whether `self -> next` is an edge of the machine. Staying in the same non-terminal phase is allowed
    /// (a status refresh); leaving a terminal phase never is.
    ///
    /// `Running -> Queued` is the redelivery edge: a worker died and SQS hands the message out again.
    /// `Pending -> Failed` covers tasks that can never be admitted for a runtime reason (not policy).
    /// `Running -> AwaitingApproval` is a plan reaching a tool call that needs a human: the approval
    /// sends it back through `Queued`, and the plan resumes at that step.
    pub fn can_move_to(self, next: TaskPhase) -> bool {
        use TaskPhase::*;
        if self.is_terminal() {
            return false;
        }
        if self == next || next == Cancelled {
            return true;
        }
        matches!(
            (self, next),
            (Pending, Denied | AwaitingApproval | Queued | Failed)
                | (AwaitingApproval, Queued | Denied)
                | (Queued, Running | Failed)
                | (Running, Succeeded | Failed | Queued | AwaitingApproval)
        )
    }
}

impl std::fmt::Display for TaskPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TaskPhase {
    type Err = UnknownPhase;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| UnknownPhase(s.chars().take(64).collect()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown task phase {0:?}")]
pub struct UnknownPhase(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_phases_are_sinks() {
        for from in TaskPhase::TERMINAL {
            for to in TaskPhase::ALL {
                assert!(!from.can_move_to(to), "{from} -> {to} must be refused");
            }
        }
    }

    #[test]
    fn the_happy_path_and_approval_path_are_edges() {
        use TaskPhase::*;
        for (a, b) in [
            (Pending, Queued),
            (Queued, Running),
            (Running, Succeeded),
            (Pending, AwaitingApproval),
            (AwaitingApproval, Queued),
            (Running, AwaitingApproval),
        ] {
            assert!(a.can_move_to(b), "{a} -> {b}");
        }
        assert!(
            !Pending.can_move_to(Running),
            "a task is queued before it runs"
        );
        assert!(!Pending.can_move_to(Succeeded));
        assert!(!AwaitingApproval.can_move_to(Running));
    }

    #[test]
    fn cancel_from_any_non_terminal() {
        for p in TaskPhase::ALL.into_iter().filter(|p| !p.is_terminal()) {
            assert!(p.can_move_to(TaskPhase::Cancelled));
        }
    }

    #[test]
    fn parses_its_own_names() {
        for p in TaskPhase::ALL {
            assert_eq!(p.as_str().parse::<TaskPhase>().unwrap(), p);
        }
        assert!("Done".parse::<TaskPhase>().is_err());
    }
}
