//! Which outbox entries the sender may put on the wire next: a bounded window of submissions in
//! flight, dispatched in seq order, each retried on its own backoff.
//!
//! Two bounds hold at every dispatch:
//! - at most `max_in_flight` requests are outstanding (one while the link is failing: a dead gateway
//!   sees one probe per backoff pause, not one per entry);
//! - an entry goes out only if its seq is below the oldest unsettled seq + [`SEQ_WINDOW`]. The gateway's
//!   lastSeq never exceeds the highest seq dispatched, so every entry still waiting (a retried one, or
//!   one from before a crash) stays inside the gateway's replay window and can still be admitted.
//!   Entries only leave this window when settled (accepted, refused for good, held), and entries
//!   still pending in the outbox after a restart were unsettled at every earlier dispatch, so the bound
//!   holds across restarts too.
//!
//! Pure state: the caller does the I/O and feeds the outcomes back.

use std::collections::BTreeMap;
use std::time::Duration;

use agentplane_api::device::SEQ_WINDOW;
use tokio::time::Instant;

use crate::outbox::Entry;

/// One unsettled entry.
#[derive(Debug)]
struct Slot {
    entry: Entry,
    state: SlotState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    /// May go out at or after this instant.
    Waiting { not_before: Instant, failures: u32 },
    /// A request for it is outstanding.
    InFlight { failures: u32 },
}

#[derive(Debug)]
pub struct Window {
    max_in_flight: usize,
    /// Unsettled entries by seq.
    slots: BTreeMap<u64, Slot>,
    /// Highest seq ever taken in: the outbox is read from above it.
    cursor: u64,
    in_flight: usize,
    /// Consecutive retryable failures of the link (any entry); reset by any success.
    link_failures: u32,
    /// No dispatch before this (the link's backoff).
    gate: Option<Instant>,
}

/// What happened to a dispatched entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted (new or duplicate), refused for good, or kept local: it leaves the window.
    Settled,
    /// Not taken this time (network, 5xx, garbage): the entry is sent again after a pause.
    Retry,
}

impl Window {
    /// `max_in_flight` is clamped to 1..=SEQ_WINDOW: more could not all stay inside the gateway's
    /// replay window.
    pub fn new(max_in_flight: usize) -> Self {
        Window {
            max_in_flight: max_in_flight.clamp(1, SEQ_WINDOW as usize),
            slots: BTreeMap::new(),
            cursor: 0,
            in_flight: 0,
            link_failures: 0,
            gate: None,
        }
    }

    /// Entries worth reading from the outbox now: the window never holds more than `SEQ_WINDOW`.
    pub fn room(&self) -> usize {
        (SEQ_WINDOW as usize).saturating_sub(self.slots.len())
    }

    /// The outbox is read for pending entries above this seq.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Takes in entries read from the outbox (pending, above the cursor, in seq order).
    pub fn add(&mut self, entry: Entry, now: Instant) {
        self.cursor = self.cursor.max(entry.seq);
        self.slots.entry(entry.seq).or_insert(Slot {
            entry,
            state: SlotState::Waiting {
                not_before: now,
                failures: 0,
            },
        });
    }

    /// Records that an entry read in was settled without a request (e.g. held by local policy).
    pub fn drop_entry(&mut self, seq: u64) {
        if let Some(slot) = self.slots.remove(&seq)
            && matches!(slot.state, SlotState::InFlight { .. })
        {
            self.in_flight -= 1;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub fn link_failures(&self) -> u32 {
        self.link_failures
    }

    fn limit(&self) -> usize {
        if self.link_failures > 0 {
            1
        } else {
            self.max_in_flight
        }
    }

    /// The next entry to send, marked in flight: the lowest seq whose pause is over, if the link's
    /// gate is open, a request slot is free and the seq is inside the window.
    pub fn next(&mut self, now: Instant) -> Option<Entry> {
        if self.in_flight >= self.limit() || self.gate.is_some_and(|g| g > now) {
            return None;
        }
        let oldest = *self.slots.keys().next()?;
        let bound = oldest.saturating_add(SEQ_WINDOW);
        let slot = self.slots.range_mut(..bound).map(|(_, s)| s).find(
            |s| matches!(s.state, SlotState::Waiting { not_before, .. } if not_before <= now),
        )?;
        let SlotState::Waiting { failures, .. } = slot.state else {
            return None;
        };
        slot.state = SlotState::InFlight { failures };
        self.in_flight += 1;
        Some(slot.entry.clone())
    }

    /// When `next` may have something again (`None`: only after an outcome or new entries).
    pub fn wake_at(&self) -> Option<Instant> {
        if self.in_flight >= self.limit() {
            return None;
        }
        let oldest = *self.slots.keys().next()?;
        let earliest = self
            .slots
            .range(..oldest.saturating_add(SEQ_WINDOW))
            .filter_map(|(_, s)| match s.state {
                SlotState::Waiting { not_before, .. } => Some(not_before),
                SlotState::InFlight { .. } => None,
            })
            .min()?;
        Some(match self.gate {
            Some(g) => earliest.max(g),
            None => earliest,
        })
    }

    /// Feeds back the outcome of a dispatched entry. For a retry, `delay(failures)` gives the pause
    /// after that many consecutive failures; it is applied to the entry (its own count) and to the
    /// link (the link's count). Returns the link's failure count and pause for reporting.
    pub fn outcome(
        &mut self,
        seq: u64,
        outcome: Outcome,
        now: Instant,
        delay: impl Fn(u32) -> Duration,
    ) -> Option<(u32, Duration)> {
        let slot = self.slots.get_mut(&seq)?;
        let SlotState::InFlight { failures } = slot.state else {
            return None;
        };
        self.in_flight -= 1;
        match outcome {
            Outcome::Settled => {
                self.slots.remove(&seq);
                self.link_failures = 0;
                self.gate = None;
                None
            }
            Outcome::Retry => {
                let failures = failures.saturating_add(1);
                slot.state = SlotState::Waiting {
                    not_before: now + delay(failures),
                    failures,
                };
                self.link_failures = self.link_failures.saturating_add(1);
                let pause = delay(self.link_failures);
                self.gate = Some(now + pause);
                Some((self.link_failures, pause))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::EntryState;

    fn entry(seq: u64) -> Entry {
        Entry {
            seq,
            task_id: format!("t{seq}"),
            envelope: String::new(),
            traceparent: String::new(),
            intent_type: "t".into(),
            prompt: String::new(),
            privacy: "public".into(),
            created_at: String::new(),
            state: EntryState::Pending,
            runs_on: crate::outbox::RunsOn::Cloud,
            attempts: 0,
            last_error: None,
            phase: None,
            result: None,
            reason: None,
            updated_at: String::new(),
        }
    }

    fn drain(w: &mut Window, now: Instant) -> Vec<u64> {
        std::iter::from_fn(|| w.next(now)).map(|e| e.seq).collect()
    }

    const MS: fn(u32) -> Duration = |f| Duration::from_millis(100 * u64::from(f));

    #[test]
    fn dispatches_in_seq_order_up_to_the_limit() {
        let now = Instant::now();
        let mut w = Window::new(3);
        for s in 1..=5 {
            w.add(entry(s), now);
        }
        assert_eq!(w.cursor(), 5);
        assert_eq!(drain(&mut w, now), vec![1, 2, 3]);
        w.outcome(2, Outcome::Settled, now, MS);
        assert_eq!(drain(&mut w, now), vec![4]);
        assert_eq!(w.in_flight(), 3);
    }

    #[test]
    fn a_retried_entry_waits_alone_and_the_others_go_on() {
        let now = Instant::now();
        let mut w = Window::new(4);
        for s in 1..=6 {
            w.add(entry(s), now);
        }
        assert_eq!(drain(&mut w, now), vec![1, 2, 3, 4]);
        let (fails, pause) = w.outcome(1, Outcome::Retry, now, MS).unwrap();
        assert_eq!((fails, pause), (1, Duration::from_millis(100)));
        // The link is suspect: one at a time, after its pause.
        assert!(w.next(now).is_none());
        for s in 2..=4 {
            w.outcome(s, Outcome::Settled, now, MS);
        }
        // A success cleared the link; entry 1 still waits for its own pause.
        assert_eq!(drain(&mut w, now), vec![5, 6]);
        assert_eq!(w.wake_at(), Some(now + Duration::from_millis(100)));
        let later = now + Duration::from_millis(100);
        assert_eq!(drain(&mut w, later), vec![1]);
    }

    #[test]
    fn never_dispatches_a_seq_beyond_the_oldest_unsettled_plus_the_window() {
        let now = Instant::now();
        let mut w = Window::new(SEQ_WINDOW as usize);
        // Entry 10 fails (and will wait an hour) while 11 is accepted, so the link is fine.
        w.add(entry(10), now);
        w.add(entry(11), now);
        assert_eq!(drain(&mut w, now), vec![10, 11]);
        w.outcome(10, Outcome::Retry, now, |_| Duration::from_secs(3600));
        w.outcome(11, Outcome::Settled, now, MS);
        for s in 12..=200 {
            if w.room() == 0 {
                break;
            }
            w.add(entry(s), now);
        }
        let mut sent = Vec::new();
        loop {
            let batch = drain(&mut w, now);
            if batch.is_empty() {
                break;
            }
            for s in batch {
                w.outcome(s, Outcome::Settled, now, MS);
                sent.push(s);
            }
        }
        assert_eq!(sent, (12..10 + SEQ_WINDOW).collect::<Vec<_>>());
        assert_eq!(
            w.wake_at(),
            Some(now + Duration::from_secs(3600)),
            "only entry 10 may go next"
        );
        // Settling 10 opens the window again.
        let late = now + Duration::from_secs(3600);
        assert_eq!(drain(&mut w, late), vec![10]);
        w.outcome(10, Outcome::Settled, late, MS);
        w.add(entry(10 + SEQ_WINDOW), late);
        assert_eq!(drain(&mut w, late), vec![10 + SEQ_WINDOW]);
    }

    #[test]
    fn max_in_flight_is_clamped_to_the_gateway_window() {
        let now = Instant::now();
        let mut w = Window::new(10_000);
        for s in 1..=SEQ_WINDOW {
            w.add(entry(s), now);
        }
        assert_eq!(w.room(), 0);
        assert_eq!(drain(&mut w, now).len(), SEQ_WINDOW as usize);
        assert_eq!(Window::new(0).max_in_flight, 1);
    }
}
