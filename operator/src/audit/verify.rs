//! Offline verification of an audit log file, and proofs read from one.
//!
//! Nothing the log computed is trusted: leaf hashes and roots are recomputed from the leaf bytes, the
//! stored interior nodes are ignored. The checks run in two passes and stop at the first problem, which
//! names its position:
//!
//! 1. The signed skeleton: checkpoints numbered without gaps, each signature valid under a trusted key
//!    (`--public-key`, or else the keys the log records), sizes and timestamps never going backwards,
//!    and each checkpoint consistent with the one before (the RFC 6962 proof stored beside it, checked
//!    against the two signed roots). A checkpoint swapped for one from a forked history fails here.
//! 2. The leaves, in seq order: no seq missing, each leaf a well-formed event naming its own seq, its
//!    bytes hashing to the hash recorded beside them (which pinpoints an edited leaf), and the tree of
//!    the first `size` leaves hashing to each checkpoint's root. When an edit also rewrote the recorded
//!    hash, only the checkpoints can tell, so the problem names the range between the last checkpoint
//!    that still matched and the first that does not.
//!
//! Trusted checkpoints (exported earlier with `agentplane audit checkpoint` and kept elsewhere) are
//! checked in pass 2 like the log's own: a log rewritten and re-signed by someone holding the key still
//! fails against a checkpoint taken before the rewrite.
//!
//! What the file alone cannot show: leaves appended after the last checkpoint and then removed from the
//! end, or the newest checkpoints deleted together with the leaves only they cover. Checkpoints are
//! signed every N appends or T seconds, which bounds the first window; keeping checkpoints outside the
//! log (trusted checkpoints) closes the second.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};
use serde::{Deserialize, Serialize};

use super::AuditEvent;
use super::checkpoint::{SignedCheckpoint, TrustedKey};
use super::merkle::{self, Frontier, Hash, empty_root, leaf_hash, verify_consistency};
use super::schema::{FORMAT, read_checkpoint_rows, read_keys, read_meta};

/// The first thing wrong with a log, by position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("not an agentplane audit log: {0}")]
    Format(String),
    #[error("key {key_id} recorded in the log is unusable: {reason}")]
    Key { key_id: String, reason: String },
    #[error("checkpoint {index} missing")]
    CheckpointMissing { index: u64 },
    #[error("checkpoint {index}: malformed: {reason}")]
    CheckpointMalformed { index: u64, reason: String },
    #[error("checkpoint {index} (size {size}): signed by key {key_id}, which is not trusted")]
    UnknownKey {
        index: u64,
        size: u64,
        key_id: String,
    },
    #[error("checkpoint {index} (size {size}): signature does not verify with key {key_id}")]
    BadSignature {
        index: u64,
        size: u64,
        key_id: String,
    },
    #[error("checkpoint {index} is not consistent with checkpoint {previous}: {detail}")]
    Inconsistent {
        index: u64,
        previous: u64,
        detail: String,
    },
    #[error("trusted checkpoint {number} (size {size}): {reason}")]
    TrustedCheckpoint {
        number: usize,
        size: u64,
        reason: String,
    },
    #[error("leaf {seq} missing")]
    LeafMissing { seq: u64 },
    #[error("leaf {seq}: not an audit event: {reason}")]
    LeafMalformed { seq: u64, reason: String },
    #[error("leaf {seq}: the event says it is leaf {claimed}")]
    LeafSeq { seq: u64, claimed: u64 },
    #[error("leaf {seq}: hash does not match checkpoint {index} (size {size})")]
    LeafHash { seq: u64, index: u64, size: u64 },
    #[error("leaf {seq}: content does not match its recorded hash (no checkpoint covers it yet)")]
    LeafHashUncovered { seq: u64 },
    #[error(
        "checkpoint {index} (size {size}): root does not match the leaves; a leaf among {first}..={last} was changed together with its recorded hash"
    )]
    RootMismatch {
        index: u64,
        size: u64,
        first: u64,
        last: u64,
    },
    #[error(
        "trusted checkpoint {number} (size {size}) does not match the log: history was rewritten among leaves {first}..={last}"
    )]
    HistoryRewritten {
        number: usize,
        size: u64,
        first: u64,
        last: u64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot read audit log {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{0}")]
    Invalid(Problem),
    #[error("{0}")]
    Proof(String),
}

impl From<Problem> for VerifyError {
    fn from(p: Problem) -> Self {
        VerifyError::Invalid(p)
    }
}

/// What to trust.
#[derive(Clone, Debug, Default)]
pub struct VerifyOptions {
    /// Keys checkpoints must be signed with. Empty: the keys the log records (which only proves the log
    /// agrees with itself; pin the key to prove who signed).
    pub trusted_keys: Vec<TrustedKey>,
    /// Checkpoints obtained earlier, out of band, that the log must still contain.
    pub trusted_checkpoints: Vec<SignedCheckpoint>,
}

/// A log that verified.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VerifyReport {
    pub origin: String,
    pub leaves: u64,
    pub checkpoints: u64,
    pub latest_checkpoint: Option<SignedCheckpoint>,
    /// Leaves after the latest checkpoint: durable but not yet signed.
    pub uncovered_leaves: u64,
    /// Whether signatures were checked against keys the log itself records.
    pub keys_from_log: bool,
    pub key_ids: Vec<String>,
}

/// Opens a log read-only: verification never writes to the evidence.
pub fn open_read_only(path: &Path) -> Result<Connection, VerifyError> {
    let read_err = |reason: String| VerifyError::Read {
        path: path.to_owned(),
        reason,
    };
    if !path.is_file() {
        return Err(read_err("no such file".into()));
    }
    Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| read_err(e.to_string()))
}

/// Verifies the log file at `path`.
pub fn verify_log(path: &Path, opts: &VerifyOptions) -> Result<VerifyReport, VerifyError> {
    let conn = open_read_only(path)?;
    verify_conn(&conn, opts).map_err(|e| match e {
        VerifyError::Read { reason, .. } => VerifyError::Read {
            path: path.to_owned(),
            reason,
        },
        other => other,
    })
}

fn sql(e: impl std::fmt::Display) -> VerifyError {
    VerifyError::Read {
        path: PathBuf::new(),
        reason: e.to_string(),
    }
}

fn origin_of(conn: &Connection) -> Result<String, VerifyError> {
    match read_meta(conn, "format") {
        Ok(Some(f)) if f == FORMAT => {}
        Ok(Some(f)) => return Err(Problem::Format(format!("format {f:?}")).into()),
        Ok(None) => return Err(Problem::Format("no format marker".into()).into()),
        // A SQLite file without our tables, or not SQLite at all.
        Err(e) => return Err(Problem::Format(e.to_string()).into()),
    }
    read_meta(conn, "origin")
        .map_err(sql)?
        .ok_or_else(|| Problem::Format("no origin".into()).into())
}

/// Sizes up to which the leaves reproduced a signed root.
#[derive(Default)]
struct Verified {
    any: u64,
    trusted: u64,
}

/// A signed root the leaves must reproduce.
enum Target {
    Checkpoint { index: u64 },
    Trusted { number: usize },
}

/// Verifies an open log.
pub fn verify_conn(conn: &Connection, opts: &VerifyOptions) -> Result<VerifyReport, VerifyError> {
    let origin = origin_of(conn)?;
    let keys_from_log = opts.trusted_keys.is_empty();
    let keys = if keys_from_log {
        read_keys(conn).map_err(|e| {
            VerifyError::Invalid(Problem::Key {
                key_id: "?".into(),
                reason: e.to_string(),
            })
        })?
    } else {
        opts.trusted_keys.clone()
    };

    // Pass 1: the signed skeleton.
    let rows = read_checkpoint_rows(conn).map_err(sql)?;
    let mut checkpoints: Vec<SignedCheckpoint> = Vec::with_capacity(rows.len());
    for (i, row) in rows.into_iter().enumerate() {
        let expected = i as u64;
        if row.idx != i as i64 {
            return Err(Problem::CheckpointMissing { index: expected }.into());
        }
        let (cp, proof) = row
            .decode(&origin)
            .map_err(|reason| Problem::CheckpointMalformed {
                index: expected,
                reason,
            })?;
        let key = keys
            .iter()
            .find(|k| k.key_id() == cp.key_id)
            .ok_or_else(|| Problem::UnknownKey {
                index: cp.index,
                size: cp.size,
                key_id: cp.key_id.clone(),
            })?;
        cp.verify(key).map_err(|_| Problem::BadSignature {
            index: cp.index,
            size: cp.size,
            key_id: cp.key_id.clone(),
        })?;
        if let Some(prev) = checkpoints.last() {
            let inconsistent = |detail: String| Problem::Inconsistent {
                index: cp.index,
                previous: prev.index,
                detail,
            };
            if cp.size < prev.size {
                return Err(inconsistent(format!(
                    "the tree shrank from {} to {} leaves",
                    prev.size, cp.size
                ))
                .into());
            }
            verify_consistency(prev.size, cp.size, &prev.root, &cp.root, &proof)
                .map_err(|e| inconsistent(e.to_string()))?;
            if cp.timestamp_ms < prev.timestamp_ms {
                return Err(inconsistent("its timestamp is earlier".into()).into());
            }
        } else if cp.size == 0 && cp.root != empty_root() {
            return Err(Problem::CheckpointMalformed {
                index: cp.index,
                reason: "an empty tree with a non-empty root".into(),
            }
            .into());
        }
        checkpoints.push(cp);
    }
    for (number, t) in opts.trusted_checkpoints.iter().enumerate() {
        let bad = |reason: String| Problem::TrustedCheckpoint {
            number,
            size: t.size,
            reason,
        };
        if t.origin != origin {
            return Err(bad(format!("it is for log {:?}, not {origin:?}", t.origin)).into());
        }
        let key = keys
            .iter()
            .find(|k| k.key_id() == t.key_id)
            .ok_or_else(|| bad(format!("signed by key {}, which is not trusted", t.key_id)))?;
        t.verify(key).map_err(|e| bad(e.to_string()))?;
    }

    // Pass 2: the leaves against every signed root, in size order.
    let mut targets: Vec<(u64, Hash, Target)> = checkpoints
        .iter()
        .map(|c| (c.size, c.root, Target::Checkpoint { index: c.index }))
        .chain(
            opts.trusted_checkpoints
                .iter()
                .enumerate()
                .map(|(number, t)| (t.size, t.root, Target::Trusted { number })),
        )
        .collect();
    targets.sort_by_key(|(size, _, _)| *size);
    let mut next_target = 0;
    // Leaves below these sizes are covered by a root that matched: any root, and a trusted one.
    let mut verified = Verified::default();
    let mut frontier = Frontier::new();
    let check_targets =
        |frontier: &Frontier, next: &mut usize, verified: &mut Verified| -> Result<(), Problem> {
            while let Some((size, root, target)) = targets.get(*next) {
                if *size != frontier.size() {
                    break;
                }
                let last = size.saturating_sub(1);
                if frontier.root() != *root {
                    return Err(match target {
                        Target::Checkpoint { index } => Problem::RootMismatch {
                            index: *index,
                            size: *size,
                            first: verified.any,
                            last,
                        },
                        // The log's own checkpoints may have been rewritten along with the leaves:
                        // only the trusted ones bound where the rewrite starts.
                        Target::Trusted { number } => Problem::HistoryRewritten {
                            number: *number,
                            size: *size,
                            first: verified.trusted,
                            last,
                        },
                    });
                }
                verified.any = *size;
                if let Target::Trusted { .. } = target {
                    verified.trusted = *size;
                }
                *next += 1;
            }
            Ok(())
        };
    check_targets(&frontier, &mut next_target, &mut verified)?;

    let mut stmt = conn
        .prepare("SELECT seq, data, hash FROM leaves ORDER BY seq")
        .map_err(sql)?;
    let mut rows = stmt.query([]).map_err(sql)?;
    let mut expected = 0u64;
    while let Some(row) = rows.next().map_err(sql)? {
        let seq: i64 = row.get(0).map_err(sql)?;
        if seq != expected as i64 {
            return Err(Problem::LeafMissing { seq: expected }.into());
        }
        let data: Vec<u8> = row.get(1).map_err(sql)?;
        let recorded: Vec<u8> = row.get(2).map_err(sql)?;
        let event = AuditEvent::from_leaf(&data).map_err(|e| Problem::LeafMalformed {
            seq: expected,
            reason: e.to_string(),
        })?;
        if event.seq != expected {
            return Err(Problem::LeafSeq {
                seq: expected,
                claimed: event.seq,
            }
            .into());
        }
        let hash = leaf_hash(&data);
        if recorded != hash {
            return Err(match checkpoints.iter().find(|c| c.size > expected) {
                Some(c) => Problem::LeafHash {
                    seq: expected,
                    index: c.index,
                    size: c.size,
                },
                None => Problem::LeafHashUncovered { seq: expected },
            }
            .into());
        }
        frontier.push(hash);
        check_targets(&frontier, &mut next_target, &mut verified)?;
        expected += 1;
    }
    if next_target < targets.len() {
        // A signed size beyond the last leaf: the tail was removed.
        return Err(Problem::LeafMissing { seq: expected }.into());
    }

    let latest = checkpoints.last().cloned();
    Ok(VerifyReport {
        origin,
        leaves: expected,
        checkpoints: checkpoints.len() as u64,
        uncovered_leaves: expected - latest.as_ref().map_or(0, |c| c.size),
        latest_checkpoint: latest,
        keys_from_log,
        key_ids: keys.iter().map(|k| k.key_id().to_owned()).collect(),
    })
}

/// An inclusion proof as printed by `agentplane audit proof`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InclusionProof {
    pub origin: String,
    pub seq: u64,
    #[serde(with = "super::encoding::hex_hash")]
    pub leaf_hash: Hash,
    pub tree_size: u64,
    #[serde(with = "super::encoding::hex_hash")]
    pub root_hash: Hash,
    /// From the leaf's sibling up to the root's child.
    #[serde(with = "super::encoding::hex_hashes")]
    pub audit_path: Vec<Hash>,
    /// The signed checkpoint whose root the path leads to.
    pub checkpoint: SignedCheckpoint,
    pub event: AuditEvent,
}

impl InclusionProof {
    /// Checks the path against the checkpoint's root, the leaf hash against the event, and the
    /// checkpoint's signature against `key`.
    pub fn verify(&self, key: &TrustedKey) -> Result<(), String> {
        self.checkpoint.verify(key).map_err(|e| e.to_string())?;
        if self.checkpoint.size != self.tree_size || self.checkpoint.root != self.root_hash {
            return Err("the checkpoint is not for this tree".into());
        }
        let data = self.event.to_leaf().map_err(|e| e.to_string())?;
        if leaf_hash(&data) != self.leaf_hash || self.event.seq != self.seq {
            return Err("the event does not hash to the leaf".into());
        }
        merkle::verify_inclusion(
            &self.leaf_hash,
            self.seq,
            self.tree_size,
            &self.audit_path,
            &self.root_hash,
        )
        .map_err(|e| e.to_string())
    }
}

/// A consistency proof between two checkpoints, as printed by `agentplane audit consistency`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ConsistencyProof {
    pub origin: String,
    pub old: SignedCheckpoint,
    pub new: SignedCheckpoint,
    #[serde(with = "super::encoding::hex_hashes")]
    pub proof: Vec<Hash>,
}

/// Every checkpoint of a log, decoded (signatures not checked).
pub fn read_checkpoints(conn: &Connection) -> Result<Vec<SignedCheckpoint>, VerifyError> {
    let origin = origin_of(conn)?;
    read_checkpoint_rows(conn)
        .map_err(sql)?
        .into_iter()
        .map(|r| {
            let index = r.idx;
            r.decode(&origin).map(|(c, _)| c).map_err(|reason| {
                VerifyError::Invalid(Problem::CheckpointMalformed {
                    index: index.max(0) as u64,
                    reason,
                })
            })
        })
        .collect()
}

/// Leaf hashes recomputed from the leaf bytes of the first `size` leaves.
fn leaf_hashes(conn: &Connection, size: u64) -> Result<Vec<Hash>, VerifyError> {
    let mut stmt = conn
        .prepare("SELECT seq, data FROM leaves WHERE seq < ?1 ORDER BY seq")
        .map_err(sql)?;
    let mut rows = stmt.query([size as i64]).map_err(sql)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(sql)? {
        let seq: i64 = row.get(0).map_err(sql)?;
        if seq != out.len() as i64 {
            return Err(Problem::LeafMissing {
                seq: out.len() as u64,
            }
            .into());
        }
        let data: Vec<u8> = row.get(1).map_err(sql)?;
        out.push(leaf_hash(&data));
    }
    if (out.len() as u64) < size {
        return Err(Problem::LeafMissing {
            seq: out.len() as u64,
        }
        .into());
    }
    Ok(out)
}

/// The checkpoint of `size`, or the latest one.
fn pick_checkpoint(
    checkpoints: &[SignedCheckpoint],
    size: Option<u64>,
) -> Result<SignedCheckpoint, VerifyError> {
    match size {
        Some(s) => checkpoints.iter().rev().find(|c| c.size == s).cloned(),
        None => checkpoints.last().cloned(),
    }
    .ok_or_else(|| {
        VerifyError::Proof(match size {
            Some(s) => format!("the log has no checkpoint of size {s}"),
            None => "the log has no checkpoint yet".into(),
        })
    })
}

/// The inclusion proof of leaf `seq` against the checkpoint of `size` (default: the latest), read from
/// the log at `path`. The proof is checked against the signed root before it is returned.
pub fn inclusion_proof_from_file(
    path: &Path,
    seq: u64,
    size: Option<u64>,
) -> Result<InclusionProof, VerifyError> {
    let conn = open_read_only(path)?;
    let origin = origin_of(&conn)?;
    let cp = pick_checkpoint(&read_checkpoints(&conn)?, size)?;
    if seq >= cp.size {
        return Err(VerifyError::Proof(format!(
            "leaf {seq} is not covered by checkpoint {} (size {})",
            cp.index, cp.size
        )));
    }
    let hashes = leaf_hashes(&conn, cp.size)?;
    let path_hashes = merkle::inclusion_proof(seq, cp.size, merkle::slice_oracle(&hashes))
        .map_err(|e| VerifyError::Proof(e.to_string()))?;
    let leaf = hashes[seq as usize];
    merkle::verify_inclusion(&leaf, seq, cp.size, &path_hashes, &cp.root).map_err(|e| {
        VerifyError::Proof(format!(
            "the leaves do not match checkpoint {} ({e}); run `agentplane audit verify`",
            cp.index
        ))
    })?;
    let data: Vec<u8> = conn
        .query_row(
            "SELECT data FROM leaves WHERE seq = ?1",
            [seq as i64],
            |r| r.get(0),
        )
        .map_err(sql)?;
    let event = AuditEvent::from_leaf(&data).map_err(|e| Problem::LeafMalformed {
        seq,
        reason: e.to_string(),
    })?;
    Ok(InclusionProof {
        origin,
        seq,
        leaf_hash: leaf,
        tree_size: cp.size,
        root_hash: cp.root,
        audit_path: path_hashes,
        checkpoint: cp,
        event,
    })
}

/// The consistency proof between the checkpoints of sizes `old` and `new` (default: the latest).
pub fn consistency_proof_from_file(
    path: &Path,
    old: u64,
    new: Option<u64>,
) -> Result<ConsistencyProof, VerifyError> {
    let conn = open_read_only(path)?;
    let origin = origin_of(&conn)?;
    let checkpoints = read_checkpoints(&conn)?;
    let old_cp = pick_checkpoint(&checkpoints, Some(old))?;
    let new_cp = pick_checkpoint(&checkpoints, new)?;
    if old_cp.size > new_cp.size {
        return Err(VerifyError::Proof(format!(
            "checkpoint {} is larger than checkpoint {}",
            old_cp.index, new_cp.index
        )));
    }
    let hashes = leaf_hashes(&conn, new_cp.size)?;
    let proof = merkle::consistency_proof(old_cp.size, new_cp.size, merkle::slice_oracle(&hashes))
        .map_err(|e| VerifyError::Proof(e.to_string()))?;
    verify_consistency(old_cp.size, new_cp.size, &old_cp.root, &new_cp.root, &proof)
        .map_err(|e| VerifyError::Proof(format!("{e}; run `agentplane audit verify`")))?;
    Ok(ConsistencyProof {
        origin,
        old: old_cp,
        new: new_cp,
        proof,
    })
}

/// Leaves in seq order (for export), as stored.
pub fn for_each_leaf(
    path: &Path,
    mut f: impl FnMut(u64, &[u8]) -> std::io::Result<()>,
) -> Result<u64, VerifyError> {
    let conn = open_read_only(path)?;
    origin_of(&conn)?;
    let mut stmt = conn
        .prepare("SELECT seq, data FROM leaves ORDER BY seq")
        .map_err(sql)?;
    let mut rows = stmt.query([]).map_err(sql)?;
    let mut n = 0;
    while let Some(row) = rows.next().map_err(sql)? {
        let seq: i64 = row.get(0).map_err(sql)?;
        let data: Vec<u8> = row.get(1).map_err(sql)?;
        f(seq.max(0) as u64, &data).map_err(|e| VerifyError::Read {
            path: path.to_owned(),
            reason: format!("writing output: {e}"),
        })?;
        n += 1;
    }
    Ok(n)
}

/// The keys a log records.
pub fn keys_in_log(path: &Path) -> Result<Vec<TrustedKey>, VerifyError> {
    let conn = open_read_only(path)?;
    origin_of(&conn)?;
    read_keys(&conn).map_err(|e| {
        VerifyError::Invalid(Problem::Key {
            key_id: "?".into(),
            reason: e.to_string(),
        })
    })
}
