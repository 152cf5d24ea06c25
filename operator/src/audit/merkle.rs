//! RFC 6962 / RFC 9162 Merkle tree hashing, inclusion and consistency proofs.
//!
//! Leaves are hashed as `SHA-256(0x00 || data)` and interior nodes as `SHA-256(0x01 || left || right)`,
//! so a leaf can never be passed off as a node (second-preimage defence). The tree over `n` leaves is the
//! RFC's MTH: split at the largest power of two strictly below `n`.
//!
//! Proof generation is written against a *subtree oracle*: a function returning `MTH(D[a:b])` for the
//! ranges the RFC's recursion asks for. Every such range starts at a multiple of a power of two at least
//! its length, so it decomposes into O(log n) perfect subtrees; the log answers from its stored nodes,
//! the offline tools from a slice of leaf hashes. Verification follows RFC 9162 §2.1.3.2 and §2.1.4.2.

use sha2::{Digest as _, Sha256};

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// The longest proof a tree of at most 2^64 leaves can need, plus one: anything longer is refused before
/// any hashing (proofs arrive from files and the network).
pub const MAX_PROOF_LEN: usize = 65;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MerkleError {
    #[error("leaf index {index} is outside a tree of size {size}")]
    IndexOutOfRange { index: u64, size: u64 },
    #[error("cannot prove consistency from size {old} to the smaller size {new}")]
    SizesOutOfOrder { old: u64, new: u64 },
    #[error("range {start}..{end} is not a subtree the proof algorithms ask for")]
    BadRange { start: u64, end: u64 },
    #[error("proof has {len} hashes, more than any tree needs")]
    ProofTooLong { len: usize },
    #[error("proof has the wrong number of hashes for these sizes")]
    ProofLength,
    #[error("proof does not lead to the expected root")]
    RootMismatch,
    #[error("proof does not lead to the old root")]
    OldRootMismatch,
    #[error("trees of equal size must have equal roots")]
    SameSizeDifferentRoots,
}

/// `SHA-256(0x00 || data)`.
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0x00]);
    h.update(data);
    h.finalize().into()
}

/// `SHA-256(0x01 || left || right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([0x01]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// MTH of the empty tree: `SHA-256("")`.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// The largest power of two strictly less than `n` (`n >= 2`): the RFC's split point.
pub fn split_point(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1u64 << (63 - (n - 1).leading_zeros())
}

/// A perfect subtree: `2^level` leaves starting at leaf `index << level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodeId {
    pub level: u32,
    pub index: u64,
}

/// Splits `[start, end)` into maximal aligned perfect subtrees, left to right. For the ranges MTH and
/// the proofs use (start aligned to a power of two at least the length) their sizes strictly decrease,
/// and folding them from the right gives MTH of the range.
pub fn decompose(mut start: u64, end: u64) -> Vec<NodeId> {
    let mut out = Vec::new();
    while start < end {
        // Largest level allowed by start's alignment (start == 0 is aligned to everything) ...
        let align = if start == 0 {
            63
        } else {
            start.trailing_zeros()
        };
        // ... and by what is left of the range.
        let fit = 63 - (end - start).leading_zeros();
        let level = align.min(fit);
        out.push(NodeId {
            level,
            index: start >> level,
        });
        start += 1u64 << level;
    }
    out
}

/// Folds perfect-subtree hashes (left to right, decreasing sizes) into the MTH of their union.
pub fn fold_right(hashes: &[Hash]) -> Hash {
    match hashes.split_last() {
        None => empty_root(),
        Some((last, rest)) => rest
            .iter()
            .rev()
            .fold(*last, |acc, left| node_hash(left, &acc)),
    }
}

/// The right edge of a growing tree (a "compact range" of `[0, size)`): the roots of its maximal perfect
/// subtrees. Appending is O(log n) amortised O(1) hashes, the root O(log n), memory O(log n).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    /// Left to right, i.e. largest subtree first; one per set bit of `size`.
    nodes: Vec<Hash>,
}

impl Frontier {
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds a frontier from the subtree hashes of `decompose(0, size)`.
    pub fn from_parts(size: u64, nodes: Vec<Hash>) -> Result<Self, MerkleError> {
        if nodes.len() != size.count_ones() as usize {
            return Err(MerkleError::ProofLength);
        }
        Ok(Frontier { size, nodes })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Adds a leaf hash. Returns the interior nodes this completed (each a perfect subtree that will never
    /// change again), lowest first, so a store can persist them.
    pub fn push(&mut self, leaf: Hash) -> Vec<(NodeId, Hash)> {
        let mut completed = Vec::new();
        let mut hash = leaf;
        let mut level = 0u32;
        // A set bit at `level` means a perfect subtree of that height is waiting for a right sibling.
        while (self.size >> level) & 1 == 1 {
            let Some(left) = self.nodes.pop() else {
                // Unreachable: one node per set bit is the invariant `from_parts` and `push` keep.
                break;
            };
            hash = node_hash(&left, &hash);
            level += 1;
            completed.push((
                NodeId {
                    level,
                    index: self.size >> level,
                },
                hash,
            ));
        }
        self.nodes.push(hash);
        self.size += 1;
        completed
    }

    /// MTH of the leaves pushed so far.
    pub fn root(&self) -> Hash {
        fold_right(&self.nodes)
    }
}

/// MTH of a list of leaf hashes.
pub fn root_of(leaves: &[Hash]) -> Hash {
    let mut f = Frontier::new();
    for l in leaves {
        f.push(*l);
    }
    f.root()
}

/// A subtree oracle over an in-memory list of leaf hashes (offline tools, tests). O(b - a) per call.
pub fn slice_oracle(leaves: &[Hash]) -> impl FnMut(u64, u64) -> Result<Hash, MerkleError> + '_ {
    move |start, end| {
        let (s, e) = (usize::try_from(start), usize::try_from(end));
        match (s, e) {
            (Ok(s), Ok(e)) if s < e && e <= leaves.len() => Ok(root_of(&leaves[s..e])),
            _ => Err(MerkleError::BadRange { start, end }),
        }
    }
}

/// The audit path of leaf `index` in the tree of the first `size` leaves (RFC 6962 §2.1.1 PATH), from the
/// leaf's sibling upwards. `mth(a, b)` must return MTH(D[a:b]).
pub fn inclusion_proof<E>(
    index: u64,
    size: u64,
    mut mth: impl FnMut(u64, u64) -> Result<Hash, E>,
) -> Result<Vec<Hash>, E>
where
    E: From<MerkleError>,
{
    if index >= size {
        return Err(MerkleError::IndexOutOfRange { index, size }.into());
    }
    let mut out = Vec::new();
    path(index, 0, size, &mut mth, &mut out)?;
    Ok(out)
}

fn path<E>(
    m: u64,
    start: u64,
    end: u64,
    mth: &mut impl FnMut(u64, u64) -> Result<Hash, E>,
    out: &mut Vec<Hash>,
) -> Result<(), E> {
    let n = end - start;
    if n <= 1 {
        return Ok(());
    }
    let k = split_point(n);
    if m < k {
        path(m, start, start + k, mth, out)?;
        out.push(mth(start + k, end)?);
    } else {
        path(m - k, start + k, end, mth, out)?;
        out.push(mth(start, start + k)?);
    }
    Ok(())
}

/// The consistency proof from the tree of the first `old` leaves to the tree of the first `new`
/// (RFC 6962 §2.1.2 PROOF). Empty when `old` is 0 or equals `new`.
pub fn consistency_proof<E>(
    old: u64,
    new: u64,
    mut mth: impl FnMut(u64, u64) -> Result<Hash, E>,
) -> Result<Vec<Hash>, E>
where
    E: From<MerkleError>,
{
    if old > new {
        return Err(MerkleError::SizesOutOfOrder { old, new }.into());
    }
    let mut out = Vec::new();
    if old > 0 && old < new {
        subproof(old, 0, new, true, &mut mth, &mut out)?;
    }
    Ok(out)
}

fn subproof<E>(
    m: u64,
    start: u64,
    end: u64,
    complete: bool,
    mth: &mut impl FnMut(u64, u64) -> Result<Hash, E>,
    out: &mut Vec<Hash>,
) -> Result<(), E> {
    let n = end - start;
    if m == n {
        // The old tree is this whole subtree: the verifier knows its hash already when it is the old
        // root itself (`complete`), otherwise it needs it.
        if !complete {
            out.push(mth(start, end)?);
        }
        return Ok(());
    }
    let k = split_point(n);
    if m <= k {
        subproof(m, start, start + k, complete, mth, out)?;
        out.push(mth(start + k, end)?);
    } else {
        subproof(m - k, start + k, end, false, mth, out)?;
        out.push(mth(start, start + k)?);
    }
    Ok(())
}

/// Checks an audit path (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(
    leaf: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), MerkleError> {
    if index >= size {
        return Err(MerkleError::IndexOutOfRange { index, size });
    }
    if proof.len() > MAX_PROOF_LEN {
        return Err(MerkleError::ProofTooLong { len: proof.len() });
    }
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if sn == 0 {
            return Err(MerkleError::ProofLength);
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(MerkleError::ProofLength);
    }
    if &r != root {
        return Err(MerkleError::RootMismatch);
    }
    Ok(())
}

/// Checks a consistency proof between two tree heads (RFC 9162 §2.1.4.2). An empty old tree is a prefix
/// of every tree; equal sizes need equal roots and an empty proof.
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), MerkleError> {
    if old_size > new_size {
        return Err(MerkleError::SizesOutOfOrder {
            old: old_size,
            new: new_size,
        });
    }
    if proof.len() > MAX_PROOF_LEN {
        return Err(MerkleError::ProofTooLong { len: proof.len() });
    }
    if old_size == 0 {
        // Nothing to prove; an empty tree's root is fixed, so a claimed one must be it.
        return if proof.is_empty() && old_root == &empty_root() {
            Ok(())
        } else if !proof.is_empty() {
            Err(MerkleError::ProofLength)
        } else {
            Err(MerkleError::OldRootMismatch)
        };
    }
    if old_size == new_size {
        return match (proof.is_empty(), old_root == new_root) {
            (true, true) => Ok(()),
            (false, _) => Err(MerkleError::ProofLength),
            (true, false) => Err(MerkleError::SameSizeDifferentRoots),
        };
    }
    if proof.is_empty() {
        return Err(MerkleError::ProofLength);
    }
    // Step 2: when the old tree is a perfect subtree the proof omits its root; put it back.
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if old_size.is_power_of_two() {
        path.push(*old_root);
    }
    path.extend_from_slice(proof);

    let (mut fn_, mut sn) = (old_size - 1, new_size - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (mut fr, mut sr) = (path[0], path[0]);
    for c in &path[1..] {
        if sn == 0 {
            return Err(MerkleError::ProofLength);
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(MerkleError::ProofLength);
    }
    if &fr != old_root {
        return Err(MerkleError::OldRootMismatch);
    }
    if &sr != new_root {
        return Err(MerkleError::RootMismatch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // A direct transliteration of RFC 6962 §2.1 over slices: the reference the fast code is checked against.
    mod naive {
        use super::super::{Hash, empty_root, node_hash, split_point};

        pub fn mth(d: &[Hash]) -> Hash {
            match d.len() {
                0 => empty_root(),
                1 => d[0],
                n => {
                    let k = split_point(n as u64) as usize;
                    node_hash(&mth(&d[..k]), &mth(&d[k..]))
                }
            }
        }

        pub fn path(m: usize, d: &[Hash]) -> Vec<Hash> {
            let n = d.len();
            if n <= 1 {
                return vec![];
            }
            let k = split_point(n as u64) as usize;
            if m < k {
                let mut p = path(m, &d[..k]);
                p.push(mth(&d[k..]));
                p
            } else {
                let mut p = path(m - k, &d[k..]);
                p.push(mth(&d[..k]));
                p
            }
        }

        pub fn subproof(m: usize, d: &[Hash], b: bool) -> Vec<Hash> {
            let n = d.len();
            if m == n {
                return if b { vec![] } else { vec![mth(d)] };
            }
            let k = split_point(n as u64) as usize;
            if m <= k {
                let mut p = subproof(m, &d[..k], b);
                p.push(mth(&d[k..]));
                p
            } else {
                let mut p = subproof(m - k, &d[k..], false);
                p.push(mth(&d[..k]));
                p
            }
        }
    }

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n)
            .map(|i| leaf_hash(format!("leaf {i}").as_bytes()))
            .collect()
    }

    #[test]
    fn hashes_follow_rfc_6962_domain_separation() {
        // SHA-256("") and SHA-256(0x00), known values.
        assert_eq!(
            hex::encode(empty_root()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex::encode(leaf_hash(b"")),
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
        );
        let (a, b) = (leaf_hash(b"a"), leaf_hash(b"b"));
        assert_ne!(node_hash(&a, &b), node_hash(&b, &a));
        let mut concat = vec![0x01];
        concat.extend_from_slice(&a);
        concat.extend_from_slice(&b);
        assert_eq!(node_hash(&a, &b), <[u8; 32]>::from(Sha256::digest(&concat)));
    }

    #[test]
    fn split_point_is_the_largest_power_of_two_below_n() {
        for n in 2u64..=300 {
            let k = split_point(n);
            assert!(k.is_power_of_two() && k < n && 2 * k >= n, "n={n} k={k}");
        }
        assert_eq!(split_point(u64::MAX), 1 << 63);
    }

    #[test]
    fn frontier_root_and_stored_nodes_match_the_naive_tree() {
        for n in 0..=70usize {
            let d = leaves(n);
            let mut f = Frontier::new();
            let mut nodes = std::collections::HashMap::new();
            for (i, l) in d.iter().enumerate() {
                nodes.insert(
                    NodeId {
                        level: 0,
                        index: i as u64,
                    },
                    *l,
                );
                for (id, h) in f.push(*l) {
                    nodes.insert(id, h);
                }
                assert_eq!(f.root(), naive::mth(&d[..=i]), "size {}", i + 1);
            }
            assert_eq!(f.root(), naive::mth(&d));
            // Every completed node is the MTH of its perfect range.
            for (id, h) in &nodes {
                let s = (id.index << id.level) as usize;
                let e = s + (1usize << id.level);
                assert_eq!(*h, naive::mth(&d[s..e]), "node {id:?}");
            }
            // The frontier can be rebuilt from stored nodes.
            let parts: Vec<Hash> = decompose(0, n as u64).iter().map(|id| nodes[id]).collect();
            let rebuilt = Frontier::from_parts(n as u64, parts).unwrap();
            assert_eq!(rebuilt, f);
            // Any proof range can be answered from stored nodes.
            for a in 0..n {
                for b in a + 1..=n {
                    let aligned = a == 0 || (b - a) <= (1usize << a.trailing_zeros());
                    if aligned {
                        let ids = decompose(a as u64, b as u64);
                        let hs: Vec<Hash> = ids.iter().map(|id| nodes[id]).collect();
                        assert_eq!(fold_right(&hs), naive::mth(&d[a..b]), "{a}..{b}");
                    }
                }
            }
        }
    }

    #[test]
    fn inclusion_proofs_match_the_rfc_and_verify_for_every_leaf() {
        for n in 1..=70usize {
            let d = leaves(n);
            let root = naive::mth(&d);
            for m in 0..n {
                let proof = inclusion_proof(m as u64, n as u64, slice_oracle(&d)).unwrap();
                assert_eq!(proof, naive::path(m, &d), "n={n} m={m}");
                verify_inclusion(&d[m], m as u64, n as u64, &proof, &root).unwrap();
                // The wrong leaf, the wrong index, the wrong size and a damaged path all fail.
                let other = leaf_hash(b"not a leaf");
                assert!(verify_inclusion(&other, m as u64, n as u64, &proof, &root).is_err());
                if n > 1 {
                    let wrong = ((m + 1) % n) as u64;
                    assert!(verify_inclusion(&d[m], wrong, n as u64, &proof, &root).is_err());
                }
                // (The size is not checked here: a path can fit several sizes, e.g. leaf 0 of 3 and of 4
                // share a shape. The size is bound by the signed checkpoint the root comes from.)
                for i in 0..proof.len() {
                    let mut bad = proof.clone();
                    bad[i][0] ^= 1;
                    assert!(verify_inclusion(&d[m], m as u64, n as u64, &bad, &root).is_err());
                }
                let mut longer = proof.clone();
                longer.push(root);
                assert!(verify_inclusion(&d[m], m as u64, n as u64, &longer, &root).is_err());
                if !proof.is_empty() {
                    let shorter = &proof[..proof.len() - 1];
                    assert!(verify_inclusion(&d[m], m as u64, n as u64, shorter, &root).is_err());
                }
            }
            assert!(inclusion_proof(n as u64, n as u64, slice_oracle(&d)).is_err());
        }
    }

    #[test]
    fn consistency_proofs_match_the_rfc_and_verify_for_every_pair() {
        for n in 1..=70usize {
            let d = leaves(n);
            let new_root = naive::mth(&d);
            for m in 0..=n {
                let old_root = naive::mth(&d[..m]);
                let proof = consistency_proof(m as u64, n as u64, slice_oracle(&d)).unwrap();
                let expected = if m == 0 || m == n {
                    vec![]
                } else {
                    naive::subproof(m, &d, true)
                };
                assert_eq!(proof, expected, "m={m} n={n}");
                verify_consistency(m as u64, n as u64, &old_root, &new_root, &proof).unwrap();
                if m == 0 {
                    continue;
                }
                // A different old tree (same size, one leaf changed) is refused ...
                let mut forked = d.clone();
                forked[m - 1] = leaf_hash(b"forked");
                let forked_root = naive::mth(&forked[..m]);
                assert!(
                    verify_consistency(m as u64, n as u64, &forked_root, &new_root, &proof)
                        .is_err()
                );
                // ... and so is a new tree that rewrote an old leaf.
                let rewritten = naive::mth(&forked);
                assert!(
                    verify_consistency(m as u64, n as u64, &old_root, &rewritten, &proof).is_err()
                );
                for i in 0..proof.len() {
                    let mut bad = proof.clone();
                    bad[i][31] ^= 0x80;
                    assert!(
                        verify_consistency(m as u64, n as u64, &old_root, &new_root, &bad).is_err()
                    );
                }
                if m < n {
                    assert!(
                        verify_consistency(m as u64, n as u64, &old_root, &new_root, &[]).is_err()
                    );
                    // Claiming other sizes with the same proof fails.
                    if m + 1 < n {
                        let r = naive::mth(&d[..m + 1]);
                        assert!(
                            verify_consistency(m as u64 + 1, n as u64, &r, &new_root, &proof)
                                .is_err()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn degenerate_inputs_are_refused_without_panicking() {
        let d = leaves(4);
        let root = naive::mth(&d);
        assert_eq!(
            consistency_proof(5, 4, slice_oracle(&d)),
            Err(MerkleError::SizesOutOfOrder { old: 5, new: 4 })
        );
        assert!(verify_consistency(5, 4, &root, &root, &[]).is_err());
        assert!(verify_consistency(0, 4, &root, &root, &[]).is_err());
        assert!(verify_consistency(4, 4, &root, &empty_root(), &[]).is_err());
        assert!(verify_inclusion(&d[0], 0, 0, &[], &root).is_err());
        let huge = vec![root; MAX_PROOF_LEN + 1];
        assert!(matches!(
            verify_inclusion(&d[0], 0, 4, &huge, &root),
            Err(MerkleError::ProofTooLong { .. })
        ));
        assert!(verify_consistency(1, u64::MAX, &d[0], &root, &huge).is_err());
        // Sizes near u64::MAX do not overflow.
        assert!(verify_inclusion(&d[0], u64::MAX - 1, u64::MAX, &[root; 64], &root).is_err());
        assert!(slice_oracle(&d)(3, 9).is_err());
        assert!(Frontier::from_parts(3, vec![root]).is_err());
    }
}
