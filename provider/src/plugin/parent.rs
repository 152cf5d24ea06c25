//! Noticing that the client (terraform/tofu) died, so the provider exits instead of lingering.
//!
//! go-plugin (v1.4, the version Terraform 1.5 and OpenTofu 1.10 ship) starts the provider as
//! its direct child with `cmd.Stdin = os.Stdin`: the provider's stdin is the *client's* stdin
//! (a terminal, or /dev/null under CI), not a pipe from the client, so EOF on stdin says
//! nothing about the client and would stop a provider started with `</dev/null` at once.
//! What does change when the client dies, SIGKILL included, is the provider's parent: the
//! kernel re-parents it to init or the nearest subreaper. `getppid()` is POSIX, so watching it
//! works on every Unix, needs no signal set-up, and (unlike Linux's `PR_SET_PDEATHSIG`) is not
//! fooled by the Go runtime retiring the OS thread that forked the provider.

use std::time::Duration;

use tracing::warn;

/// How often the parent is checked; the provider exits within this plus the shutdown path.
pub const POLL: Duration = Duration::from_millis(250);

/// What the watcher concluded about the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parent {
    /// Still the process that started us.
    Alive,
    /// We were re-parented: the client is gone.
    Gone { was: u32, now: u32 },
}

/// Compares the current parent with the one that started us.
pub fn check(started_by: u32, now: u32) -> Parent {
    if now == started_by {
        Parent::Alive
    } else {
        Parent::Gone {
            was: started_by,
            now,
        }
    }
}

/// Resolves once the process that started this one is gone. A parent of pid 1 is not taken
/// as "already gone": in a container the client itself may be pid 1.
pub async fn gone() {
    let started_by = std::os::unix::process::parent_id();
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Parent::Gone { was, now } = check(started_by, std::os::unix::process::parent_id()) {
            warn!(
                client_pid = was,
                new_parent = now,
                "the client process is gone; cancelling calls and exiting"
            );
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reparenting_means_the_client_is_gone() {
        assert_eq!(check(4242, 4242), Parent::Alive);
        assert_eq!(check(4242, 1), Parent::Gone { was: 4242, now: 1 });
        // A subreaper (e.g. a container's init or systemd --user) adopts us instead of pid 1.
        assert_eq!(check(4242, 77), Parent::Gone { was: 4242, now: 77 });
    }
}
