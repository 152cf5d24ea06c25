//! The log file's tables and the row-level reads shared by the writer (`log`) and the offline
//! verifier (`verify`). Decoding is separate from reading so the verifier can name a malformed row
//! instead of failing on it.

use rusqlite::{Connection, OptionalExtension as _, params};

use super::checkpoint::{SignatureAlgorithm, SignedCheckpoint, TrustedKey};
use super::log::{Leaf, LogError};
use super::merkle::{self, Hash, MerkleError, NodeId, decompose, fold_right};

/// `meta.format` of a log this code can read.
pub const FORMAT: &str = "agentplane-audit-log v1";

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- seq is the leaf index; data is the canonical JSON of the event, exactly the bytes that are hashed.
CREATE TABLE IF NOT EXISTS leaves (
    seq INTEGER PRIMARY KEY,
    event_key TEXT NOT NULL UNIQUE,
    data BLOB NOT NULL,
    hash BLOB NOT NULL
);
-- Perfect subtrees above the leaves: 2^level leaves starting at leaf idx << level.
CREATE TABLE IF NOT EXISTS nodes (
    level INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    hash BLOB NOT NULL,
    PRIMARY KEY (level, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY,
    algorithm TEXT NOT NULL,
    spki BLOB NOT NULL
);
-- consistency: the proof (concatenated 32-byte hashes) from the previous checkpoint to this one.
CREATE TABLE IF NOT EXISTS checkpoints (
    idx INTEGER PRIMARY KEY,
    size INTEGER NOT NULL,
    root BLOB NOT NULL,
    timestamp_ms INTEGER NOT NULL,
    key_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    signature BLOB NOT NULL,
    consistency BLOB NOT NULL
);
";

pub(crate) fn read_meta(conn: &Connection, key: &str) -> Result<Option<String>, rusqlite::Error> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
}

/// One perfect subtree's hash: level 0 from the leaves, above from the nodes table.
pub(crate) fn node(conn: &Connection, id: NodeId) -> Result<Hash, LogError> {
    let blob: Option<Vec<u8>> = if id.level == 0 {
        conn.prepare_cached("SELECT hash FROM leaves WHERE seq = ?1")?
            .query_row([id.index as i64], |r| r.get(0))
            .optional()?
    } else {
        conn.prepare_cached("SELECT hash FROM nodes WHERE level = ?1 AND idx = ?2")?
            .query_row(params![id.level, id.index as i64], |r| r.get(0))
            .optional()?
    };
    blob.and_then(|b| <Hash>::try_from(b).ok()).ok_or_else(|| {
        LogError::Corrupt(format!(
            "tree node (level {}, index {}) is missing or malformed",
            id.level, id.index
        ))
    })
}

/// MTH(D[start:end]) from stored nodes, for the ranges the RFC recursion asks for.
pub(crate) fn subtree(conn: &Connection, start: u64, end: u64) -> Result<Hash, LogError> {
    if start >= end {
        return Err(MerkleError::BadRange { start, end }.into());
    }
    let hashes = decompose(start, end)
        .into_iter()
        .map(|id| node(conn, id))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(fold_right(&hashes))
}

pub(crate) fn read_leaf(conn: &Connection, seq: u64) -> Result<Option<Leaf>, LogError> {
    let row: Option<(Vec<u8>, Vec<u8>)> = conn
        .query_row(
            "SELECT data, hash FROM leaves WHERE seq = ?1",
            [seq as i64],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    row.map(|(data, hash)| {
        let hash = <Hash>::try_from(hash)
            .map_err(|_| LogError::Corrupt(format!("leaf {seq}: stored hash is not 32 bytes")))?;
        Ok(Leaf { seq, data, hash })
    })
    .transpose()
}

/// The keys the log holds, as recorded (each checked to parse and to match its id).
pub(crate) fn read_keys(conn: &Connection) -> Result<Vec<TrustedKey>, LogError> {
    let mut stmt = conn.prepare("SELECT key_id, spki FROM keys ORDER BY key_id")?;
    let rows = stmt
        .query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    rows.into_iter()
        .map(|(id, der)| {
            let key = TrustedKey::from_spki_der(&der)
                .map_err(|e| LogError::Corrupt(format!("key {id}: {e}")))?;
            if key.key_id() != id {
                return Err(LogError::Corrupt(format!(
                    "key {id}: stored under the wrong id (its id is {})",
                    key.key_id()
                )));
            }
            Ok(key)
        })
        .collect()
}

/// A checkpoint row as stored, before any checking.
pub(crate) struct CheckpointRow {
    pub idx: i64,
    pub size: i64,
    pub root: Vec<u8>,
    pub timestamp_ms: i64,
    pub key_id: String,
    pub algorithm: String,
    pub signature: Vec<u8>,
    pub consistency: Vec<u8>,
}

impl CheckpointRow {
    /// Decodes the row; the error says what is malformed.
    pub fn decode(self, origin: &str) -> Result<(SignedCheckpoint, Vec<Hash>), String> {
        let index = u64::try_from(self.idx).map_err(|_| "negative index".to_string())?;
        let size = u64::try_from(self.size).map_err(|_| "negative size".to_string())?;
        let root = <Hash>::try_from(self.root)
            .map_err(|r| format!("root is {} bytes, not 32", r.len()))?;
        let algorithm = match self.algorithm.as_str() {
            "ed25519" => SignatureAlgorithm::Ed25519,
            "ecdsa-p256-sha256" => SignatureAlgorithm::EcdsaP256Sha256,
            other => return Err(format!("unknown signature algorithm {other:?}")),
        };
        if !self.consistency.len().is_multiple_of(32)
            || self.consistency.len() / 32 > merkle::MAX_PROOF_LEN
        {
            return Err("consistency proof is not a list of hashes".into());
        }
        let consistency = self
            .consistency
            .chunks_exact(32)
            .map(|c| {
                let mut h = [0u8; 32];
                h.copy_from_slice(c);
                h
            })
            .collect();
        Ok((
            SignedCheckpoint {
                index,
                origin: origin.to_owned(),
                size,
                root,
                timestamp_ms: self.timestamp_ms,
                key_id: self.key_id,
                algorithm,
                signature: self.signature,
            },
            consistency,
        ))
    }
}

pub(crate) fn read_checkpoint_rows(conn: &Connection) -> Result<Vec<CheckpointRow>, LogError> {
    let mut stmt = conn.prepare(
        "SELECT idx, size, root, timestamp_ms, key_id, algorithm, signature, consistency
             FROM checkpoints ORDER BY idx",
    )?;
    let rows = stmt
        .query_map([], |r| {
            Ok(CheckpointRow {
                idx: r.get(0)?,
                size: r.get(1)?,
                root: r.get(2)?,
                timestamp_ms: r.get(3)?,
                key_id: r.get(4)?,
                algorithm: r.get(5)?,
                signature: r.get(6)?,
                consistency: r.get(7)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}
