//! Serde helpers for the audit log's JSON: hashes as lowercase hex, signatures as standard base64.

use serde::{Deserialize as _, Deserializer, Serializer};

use super::merkle::Hash;

/// Parses 64 hex digits into a hash.
pub fn parse_hash(s: &str) -> Result<Hash, String> {
    let bytes = hex::decode(s).map_err(|e| format!("not hex: {e}"))?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| format!("a hash is 32 bytes, not {}", b.len()))
}

pub mod hex_hash {
    use super::*;

    pub fn serialize<S: Serializer>(h: &Hash, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(h))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Hash, D::Error> {
        let s = String::deserialize(d)?;
        parse_hash(&s).map_err(serde::de::Error::custom)
    }
}

pub mod hex_hashes {
    use super::*;
    use serde::ser::SerializeSeq as _;

    pub fn serialize<S: Serializer>(hs: &[Hash], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(hs.len()))?;
        for h in hs {
            seq.serialize_element(&hex::encode(h))?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Hash>, D::Error> {
        let v = Vec::<String>::deserialize(d)?;
        if v.len() > crate::audit::merkle::MAX_PROOF_LEN {
            return Err(serde::de::Error::custom("too many hashes for a proof"));
        }
        v.iter()
            .map(|s| parse_hash(s).map_err(serde::de::Error::custom))
            .collect()
    }
}

pub mod base64_bytes {
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(b))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}
