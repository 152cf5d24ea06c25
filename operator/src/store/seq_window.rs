//! The per-device replay rule, shared by both stores: a sliding anti-replay window over `seq`, as in
//! IPsec (RFC 4303 §3.4.3) and DTLS (RFC 6347 §4.1.2.6).
//!
//! A device keeps up to [`SEQ_WINDOW`] submissions in flight, so they can arrive out of order. The
//! device's status holds the highest seq admitted (`lastSeq`) and a 64-bit map of which of the
//! `SEQ_WINDOW` seqs ending at `lastSeq` were admitted. A new task's seq is accepted when it is above
//! `lastSeq - SEQ_WINDOW` and its bit is clear; `lastSeq` then becomes `max(lastSeq, seq)`, which keeps
//! the "never goes backwards" rule of the EdgeDevice CRD. The map lives in the same record as `lastSeq`
//! and moves with it in one conditional write, so both stores enforce "one task per (device, seq)"
//! atomically, even for tasks deleted since.

use agentplane_api::device::{EdgeDeviceStatus, SEQ_WINDOW};

// The map is one u64; a wider window needs a wider map.
const _: () = assert!(SEQ_WINDOW == u64::BITS as u64);

/// Why a seq cannot be admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqRefusal {
    /// Another task already holds this seq.
    Taken { last_seq: u64 },
    /// The seq is at or below `lastSeq - SEQ_WINDOW`: too old to tell from a replay.
    BelowWindow { last_seq: u64 },
}

impl SeqRefusal {
    pub fn last_seq(self) -> u64 {
        match self {
            SeqRefusal::Taken { last_seq } | SeqRefusal::BelowWindow { last_seq } => last_seq,
        }
    }
}

/// The window as stored in a device's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqWindow {
    /// `None`: nothing admitted yet.
    last_seq: Option<u64>,
    /// Bit `i` set: seq `last_seq - i` is taken.
    map: u64,
}

impl SeqWindow {
    /// Reads the window from a device's status. A device admitted under the older strict rule (lastSeq
    /// but no map), or a map that is not 16 hex digits (hand-edited), counts every seq up to lastSeq as
    /// taken: never more permissive than what was stored.
    pub fn of(status: &EdgeDeviceStatus) -> Self {
        let Some(last_seq) = status.last_seq else {
            return SeqWindow {
                last_seq: None,
                map: 0,
            };
        };
        let map = match status.seq_window.as_deref() {
            Some(hex) if hex.len() == 16 => u64::from_str_radix(hex, 16).ok(),
            _ => None,
        };
        let map = map.unwrap_or_else(|| {
            if status.seq_window.is_some() {
                tracing::warn!(last_seq, "unreadable EdgeDevice status.seqWindow; treating every seq up to lastSeq as taken");
            }
            u64::MAX
        });
        SeqWindow {
            last_seq: Some(last_seq),
            // lastSeq itself is always taken.
            map: map | 1,
        }
    }

    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    /// Whether `seq` may be admitted now.
    pub fn check(&self, seq: u64) -> Result<(), SeqRefusal> {
        let Some(last_seq) = self.last_seq else {
            return Ok(());
        };
        if seq > last_seq {
            return Ok(());
        }
        let age = last_seq - seq;
        if age >= SEQ_WINDOW {
            return Err(SeqRefusal::BelowWindow { last_seq });
        }
        if self.map & (1u64 << age) != 0 {
            return Err(SeqRefusal::Taken { last_seq });
        }
        Ok(())
    }

    /// The window after admitting `seq` (checked first).
    pub fn admit(&self, seq: u64) -> Result<SeqWindow, SeqRefusal> {
        self.check(seq)?;
        Ok(match self.last_seq {
            None => SeqWindow {
                last_seq: Some(seq),
                map: 1,
            },
            Some(last_seq) if seq > last_seq => {
                let shift = seq - last_seq;
                let map = if shift >= SEQ_WINDOW {
                    0
                } else {
                    self.map << shift
                };
                SeqWindow {
                    last_seq: Some(seq),
                    map: map | 1,
                }
            }
            Some(last_seq) => SeqWindow {
                last_seq: Some(last_seq),
                map: self.map | (1u64 << (last_seq - seq)),
            },
        })
    }

    /// Writes the window into a device status (keeping its other fields).
    pub fn store_in(&self, status: &mut EdgeDeviceStatus) {
        status.last_seq = self.last_seq;
        status.seq_window = self.last_seq.map(|_| format!("{:016x}", self.map));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn after(seqs: &[u64]) -> SeqWindow {
        let mut w = SeqWindow::of(&EdgeDeviceStatus::default());
        for &s in seqs {
            w = w.admit(s).unwrap();
        }
        w
    }

    #[test]
    fn out_of_order_within_the_window_is_admitted_once() {
        let w = after(&[3, 1, 5, 2]);
        assert_eq!(w.last_seq(), Some(5));
        assert_eq!(w.check(4), Ok(()));
        for taken in [1, 2, 3, 5] {
            assert_eq!(w.check(taken), Err(SeqRefusal::Taken { last_seq: 5 }));
        }
        assert_eq!(w.check(6), Ok(()));
    }

    #[test]
    fn the_window_boundary_is_exact() {
        let last = 1000;
        let w = after(&[last]);
        // lastSeq - W + 1 is the oldest seq still inside; lastSeq - W is the first one outside.
        assert_eq!(w.check(last - SEQ_WINDOW + 1), Ok(()));
        assert_eq!(
            w.check(last - SEQ_WINDOW),
            Err(SeqRefusal::BelowWindow { last_seq: last })
        );
        assert_eq!(w.check(0), Err(SeqRefusal::BelowWindow { last_seq: last }));
        // Admitting the oldest slot keeps it; moving lastSeq by one pushes it out.
        let w = w.admit(last - SEQ_WINDOW + 1).unwrap();
        assert_eq!(
            w.check(last - SEQ_WINDOW + 1),
            Err(SeqRefusal::Taken { last_seq: last })
        );
        let w = w.admit(last + 1).unwrap();
        assert_eq!(
            w.check(last - SEQ_WINDOW + 1),
            Err(SeqRefusal::BelowWindow { last_seq: last + 1 })
        );
        assert_eq!(
            w.check(last - SEQ_WINDOW + 2),
            Ok(()),
            "still inside and never taken"
        );
    }

    #[test]
    fn a_big_jump_clears_the_map_and_round_trips_through_the_status() {
        let w = after(&[1, 2, 3]).admit(500).unwrap();
        assert_eq!(w.check(499), Ok(()));
        assert_eq!(w.check(3), Err(SeqRefusal::BelowWindow { last_seq: 500 }));
        let w = w.admit(470).unwrap();
        let mut status = EdgeDeviceStatus::default();
        w.store_in(&mut status);
        assert_eq!(status.last_seq, Some(500));
        assert_eq!(status.seq_window.as_deref(), Some("0000000040000001"));
        assert_eq!(SeqWindow::of(&status), w);
    }

    #[test]
    fn a_device_without_a_map_keeps_the_strict_rule() {
        let legacy = EdgeDeviceStatus {
            last_seq: Some(10),
            ..Default::default()
        };
        let w = SeqWindow::of(&legacy);
        assert_eq!(w.check(9), Err(SeqRefusal::Taken { last_seq: 10 }));
        assert_eq!(w.check(11), Ok(()));
        let garbage = EdgeDeviceStatus {
            last_seq: Some(10),
            seq_window: Some("not hex at all!!".into()),
            ..Default::default()
        };
        assert_eq!(
            SeqWindow::of(&garbage).check(9),
            Err(SeqRefusal::Taken { last_seq: 10 })
        );
    }
}
