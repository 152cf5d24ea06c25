//! Exponential backoff with jitter, so a device that cannot reach the gateway (or gets garbage or 5xx
//! back) waits longer and longer instead of spinning, and a fleet coming back online does not retry in
//! lockstep.

use std::time::Duration;

#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(250),
            max: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The pause after `failures` consecutive failures (1 = the first). "Equal jitter": half the
    /// exponential delay is fixed, half random, so the pause never collapses towards zero.
    pub fn delay(&self, failures: u32, hint: Option<Duration>) -> Duration {
        let exp = failures.saturating_sub(1).min(30);
        let raw = self.base.saturating_mul(1u32 << exp.min(20)).min(self.max);
        let half = raw / 2;
        let jitter_ms = (half.as_millis() as u64).max(1);
        let rand = getrandom::u64().unwrap_or(jitter_ms / 2) % (jitter_ms + 1);
        let d = half + Duration::from_millis(rand);
        // A gateway asking for a longer pause (Retry-After) is obeyed, within reason.
        match hint {
            Some(h) => d.max(h.min(Duration::from_secs(3600))),
            None => d,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_stays_bounded_and_never_collapses() {
        let b = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(5),
        };
        for _ in 0..100 {
            let d1 = b.delay(1, None);
            assert!(
                d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100),
                "{d1:?}"
            );
            let d4 = b.delay(4, None);
            assert!(
                d4 >= Duration::from_millis(400) && d4 <= Duration::from_millis(800),
                "{d4:?}"
            );
            let big = b.delay(1000, None);
            assert!(
                big >= Duration::from_millis(2500) && big <= Duration::from_secs(5),
                "{big:?}"
            );
        }
        assert!(b.delay(1, Some(Duration::from_secs(7))) >= Duration::from_secs(7));
    }
}
