//! RFC 6962 / RFC 9162 Merkle tree hashing, proofs and a streaming
//! [`Frontier`].
//!
//! Everything here is a thin adapter over [`tlog_tiles::tlog`]: the tree is
//! kept as tlog "stored hashes" (see [`tlog_tiles::stored_hash_index`]) in a
//! [`NodeSource`], and the proof algorithms are tlog_tiles'. The adapters add
//! what tlog_tiles leaves to the caller: exact RFC 9162 edge cases (empty
//! tree, equal sizes, out-of-range indexes) and protection against the
//! `assert!`s tlog_tiles makes on readers that return the wrong number of
//! hashes.

use std::cell::RefCell;

use tlog_tiles::tlog::{self, Hash, HashReader};

/// A SHA-256 hash: a leaf hash, an interior node hash or a tree root.
pub type Hash32 = [u8; 32];

/// Root of the empty tree: SHA-256 of the empty string (RFC 6962 §2.1).
pub const EMPTY_ROOT: Hash32 = tlog::EMPTY_HASH.0;

/// Longest inclusion proof a tree with a `u64` size can have.
const MAX_INCLUSION_PROOF: usize = 64;
/// Longest consistency proof a tree with a `u64` size can have.
const MAX_CONSISTENCY_PROOF: usize = 65;

/// Errors from tree computations, proof generation and verification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MerkleError {
    /// The leaf index is not below the tree size.
    #[error("index {index} is not in a tree of size {size}")]
    IndexOutOfRange {
        /// Requested leaf index.
        index: u64,
        /// Tree size.
        size: u64,
    },
    /// A consistency check between an old and a smaller new tree.
    #[error("old tree size {old} is greater than new tree size {new}")]
    SizeOrder {
        /// Old tree size.
        old: u64,
        /// New tree size.
        new: u64,
    },
    /// Arguments outside what RFC 9162 defines.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The proof does not prove the claim (wrong hashes, wrong length, or the
    /// recomputed root differs).
    #[error("invalid proof")]
    InvalidProof,
    /// A [`NodeSource`] returned a different number of hashes than asked for.
    #[error("node source returned {got} hashes for {want} indexes")]
    BadRead {
        /// Number of indexes requested.
        want: usize,
        /// Number of hashes returned.
        got: usize,
    },
    /// A [`NodeSource`] failed.
    #[error("node source: {0}")]
    Storage(String),
}

/// RFC 6962 leaf hash: `SHA-256(0x00 ‖ data)`.
pub fn leaf_hash(data: &[u8]) -> Hash32 {
    tlog::record_hash(data).0
}

/// RFC 6962 interior node hash: `SHA-256(0x01 ‖ left ‖ right)`.
pub fn node_hash(left: Hash32, right: Hash32) -> Hash32 {
    tlog::node_hash(Hash(left), Hash(right)).0
}

/// Storage of the tree's tlog "stored hashes", addressed by
/// [`tlog_tiles::stored_hash_index`].
pub trait NodeSource {
    /// Returns the hashes at `stored_indexes`, in the same order; must return
    /// exactly one hash per index or an error.
    fn read(&self, stored_indexes: &[u64]) -> Result<Vec<Hash32>, MerkleError>;
}

/// Adapter presenting a [`NodeSource`] as a [`tlog_tiles::HashReader`].
///
/// Guarantees tlog_tiles sees exactly as many hashes as it asked for (else
/// an error, instead of a tlog_tiles panic) and remembers the source's own
/// error so [`NodeReader::error`] can report it.
pub struct NodeReader<'a> {
    src: &'a dyn NodeSource,
    err: RefCell<Option<MerkleError>>,
}

impl<'a> NodeReader<'a> {
    /// Wraps `src`.
    pub fn new(src: &'a dyn NodeSource) -> Self {
        Self {
            src,
            err: RefCell::new(None),
        }
    }

    /// Converts a tlog_tiles error from a call using this reader into a
    /// [`MerkleError`], preferring the reader's own failure if there was one.
    pub fn error(&self, e: tlog::Error) -> MerkleError {
        self.err.borrow_mut().take().unwrap_or(match e {
            tlog::Error::InvalidProof => MerkleError::InvalidProof,
            tlog::Error::InvalidInput(s) => MerkleError::InvalidInput(s),
            other => MerkleError::Storage(other.to_string()),
        })
    }
}

impl HashReader for NodeReader<'_> {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog::Error> {
        let failure = match self.src.read(indexes) {
            Ok(hashes) if hashes.len() == indexes.len() => {
                return Ok(hashes.into_iter().map(Hash).collect());
            }
            Ok(hashes) => MerkleError::BadRead {
                want: indexes.len(),
                got: hashes.len(),
            },
            Err(e) => e,
        };
        *self.err.borrow_mut() = Some(failure);
        Err(tlog::Error::IndexesNotInTree)
    }
}

fn hashes(v: Vec<Hash>) -> Vec<Hash32> {
    v.into_iter().map(|h| h.0).collect()
}

fn tlog_proof(p: &[Hash32]) -> Vec<Hash> {
    p.iter().copied().map(Hash).collect()
}

/// Root of the tree of the first `size` leaves stored in `src`.
pub fn root(size: u64, src: &dyn NodeSource) -> Result<Hash32, MerkleError> {
    let r = NodeReader::new(src);
    tlog::tree_hash(size, &r)
        .map(|h| h.0)
        .map_err(|e| r.error(e))
}

/// RFC 9162 inclusion proof (audit path) for leaf `index` in the tree of
/// size `size`.
pub fn inclusion_proof(
    index: u64,
    size: u64,
    src: &dyn NodeSource,
) -> Result<Vec<Hash32>, MerkleError> {
    if index >= size {
        return Err(MerkleError::IndexOutOfRange { index, size });
    }
    let r = NodeReader::new(src);
    tlog::prove_record(size, index, &r)
        .map(hashes)
        .map_err(|e| r.error(e))
}

/// RFC 9162 consistency proof from the tree of size `old` to the tree of
/// size `new`. Equal sizes give the empty proof; a proof from the empty tree
/// (`old == 0 < new`) is undefined and an error.
pub fn consistency_proof(
    old: u64,
    new: u64,
    src: &dyn NodeSource,
) -> Result<Vec<Hash32>, MerkleError> {
    if old > new {
        return Err(MerkleError::SizeOrder { old, new });
    }
    if old == new {
        return Ok(Vec::new());
    }
    if old == 0 {
        return Err(MerkleError::InvalidInput(
            "consistency proof from the empty tree is undefined".into(),
        ));
    }
    let r = NodeReader::new(src);
    tlog::prove_tree(new, old, &r)
        .map(hashes)
        .map_err(|e| r.error(e))
}

/// Verifies that `proof` shows leaf hash `leaf` at `index` in the tree of
/// `size` leaves with root `root` (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(
    leaf: Hash32,
    index: u64,
    size: u64,
    proof: &[Hash32],
    root: Hash32,
) -> Result<(), MerkleError> {
    if index >= size {
        return Err(MerkleError::IndexOutOfRange { index, size });
    }
    if proof.len() > MAX_INCLUSION_PROOF {
        return Err(MerkleError::InvalidProof);
    }
    tlog::check_record(&tlog_proof(proof), size, Hash(root), index, Hash(leaf))
        .map_err(|_| MerkleError::InvalidProof)
}

/// Verifies that `proof` shows the tree (`old_size`, `old_root`) is a prefix
/// of the tree (`new_size`, `new_root`) (RFC 9162 §2.1.4.2).
///
/// Edge cases: `old_size > new_size` is an error; equal sizes need an empty
/// proof and equal roots (and for size 0, the empty-tree root); a proof from
/// size 0 to a larger size is undefined and an error.
pub fn verify_consistency(
    old_size: u64,
    old_root: Hash32,
    new_size: u64,
    new_root: Hash32,
    proof: &[Hash32],
) -> Result<(), MerkleError> {
    if old_size > new_size {
        return Err(MerkleError::SizeOrder {
            old: old_size,
            new: new_size,
        });
    }
    if old_size == new_size {
        let roots_ok = old_root == new_root && (old_size != 0 || old_root == EMPTY_ROOT);
        return if proof.is_empty() && roots_ok {
            Ok(())
        } else {
            Err(MerkleError::InvalidProof)
        };
    }
    if old_size == 0 {
        return Err(MerkleError::InvalidInput(
            "consistency proof from the empty tree is undefined".into(),
        ));
    }
    if proof.is_empty() || proof.len() > MAX_CONSISTENCY_PROOF {
        return Err(MerkleError::InvalidProof);
    }
    tlog::check_tree(
        &tlog_proof(proof),
        new_size,
        Hash(new_root),
        old_size,
        Hash(old_root),
    )
    .map_err(|_| MerkleError::InvalidProof)
}

/// The stored hashes to append when writing leaf `n` (0-based) with leaf hash
/// `leaf`: the leaf hash followed by every subtree it completes. Reads up to
/// log₂ n earlier hashes from `src`. Wraps
/// [`tlog_tiles::stored_hashes_for_record_hash`].
pub fn stored_hashes_for(
    n: u64,
    leaf: Hash32,
    src: &dyn NodeSource,
) -> Result<Vec<Hash32>, MerkleError> {
    if n == u64::MAX {
        return Err(MerkleError::InvalidInput("tree is full".into()));
    }
    let r = NodeReader::new(src);
    tlog::stored_hashes_for_record_hash(n, Hash(leaf), &r)
        .map(hashes)
        .map_err(|e| r.error(e))
}

/// An in-memory [`NodeSource`]: the stored hashes of a tree, in
/// [`tlog_tiles::stored_hash_index`] order. For tests and benchmarks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryNodes(Vec<Hash32>);

impl MemoryNodes {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of leaves.
    pub fn size(&self) -> u64 {
        // After n leaves exactly stored_hash_index(0, n) hashes are stored.
        tlog::split_stored_hash_index(self.0.len() as u64).1
    }

    /// Appends a leaf with the given data; returns its index.
    pub fn append(&mut self, data: &[u8]) -> Result<u64, MerkleError> {
        let n = self.size();
        let r = NodeReader::new(self);
        let new = tlog::stored_hashes(n, data, &r).map_err(|e| r.error(e))?;
        self.0.extend(hashes(new));
        Ok(n)
    }

    /// Appends a leaf given its leaf hash; returns its index.
    pub fn append_leaf_hash(&mut self, leaf: Hash32) -> Result<u64, MerkleError> {
        let n = self.size();
        let new = stored_hashes_for(n, leaf, self)?;
        self.0.extend(new);
        Ok(n)
    }

    /// Leaf hash of leaf `index`, if present.
    pub fn leaf(&self, index: u64) -> Option<Hash32> {
        if index >= self.size() {
            return None;
        }
        let i = usize::try_from(tlog::stored_hash_index(0, index)).ok()?;
        self.0.get(i).copied()
    }

    /// All stored hashes, in stored-hash-index order.
    pub fn stored(&self) -> &[Hash32] {
        &self.0
    }
}

impl NodeSource for MemoryNodes {
    fn read(&self, stored_indexes: &[u64]) -> Result<Vec<Hash32>, MerkleError> {
        stored_indexes
            .iter()
            .map(|&i| {
                usize::try_from(i)
                    .ok()
                    .and_then(|i| self.0.get(i))
                    .copied()
                    .ok_or_else(|| MerkleError::Storage(format!("stored hash {i} not present")))
            })
            .collect()
    }
}

/// The right edge of a tree (a compact range over `[0, size)`): the roots of
/// its maximal perfect subtrees, left to right. Enough to append leaves and
/// compute the root in O(log n) memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    /// Perfect subtree roots, largest (leftmost) first; one per set bit of
    /// `size`.
    nodes: Vec<Hash32>,
}

impl Frontier {
    /// The frontier of the empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// The frontier of the tree of the first `size` leaves in `src`.
    pub fn from_source(size: u64, src: &dyn NodeSource) -> Result<Self, MerkleError> {
        let indexes = tlog::sub_tree_index(0, size, Vec::new());
        let nodes = src.read(&indexes)?;
        if nodes.len() != indexes.len() {
            return Err(MerkleError::BadRead {
                want: indexes.len(),
                got: nodes.len(),
            });
        }
        Ok(Self { size, nodes })
    }

    /// Appends a leaf given its leaf hash.
    pub fn push(&mut self, leaf: Hash32) {
        let mut h = Hash(leaf);
        let mut s = self.size;
        // Each trailing one bit of the old size is a perfect subtree that the
        // new leaf completes.
        while s & 1 == 1 {
            let Some(left) = self.nodes.pop() else { break };
            h = tlog::node_hash(Hash(left), h);
            s >>= 1;
        }
        self.nodes.push(h.0);
        self.size += 1;
    }

    /// Appends a leaf given its data (hashes it with [`leaf_hash`]).
    pub fn push_data(&mut self, data: &[u8]) {
        self.push(leaf_hash(data));
    }

    /// Number of leaves.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The tree root (the empty-tree root for size 0).
    pub fn root(&self) -> Hash32 {
        let mut it = self.nodes.iter().rev();
        let Some(&last) = it.next() else {
            return EMPTY_ROOT;
        };
        it.fold(last, |acc, &left| node_hash(left, acc))
    }

    /// The perfect subtree roots, largest (leftmost) first.
    pub fn nodes(&self) -> &[Hash32] {
        &self.nodes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring_sha256(parts: &[&[u8]]) -> Hash32 {
        let mut c = ring::digest::Context::new(&ring::digest::SHA256);
        for p in parts {
            c.update(p);
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(c.finish().as_ref());
        out
    }

    #[test]
    fn hashes_match_ring() {
        for len in [0usize, 1, 55, 56, 63, 64, 65, 300, 1000] {
            let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
            assert_eq!(leaf_hash(&data), ring_sha256(&[&[0], &data]));
        }
        let (l, r) = (leaf_hash(b"l"), leaf_hash(b"r"));
        assert_eq!(node_hash(l, r), ring_sha256(&[&[1], &l, &r]));
        assert_eq!(EMPTY_ROOT, ring_sha256(&[]));
    }

    struct Short;
    impl NodeSource for Short {
        fn read(&self, idx: &[u64]) -> Result<Vec<Hash32>, MerkleError> {
            Ok(vec![[0; 32]; idx.len().saturating_sub(1)])
        }
    }

    struct Long;
    impl NodeSource for Long {
        fn read(&self, idx: &[u64]) -> Result<Vec<Hash32>, MerkleError> {
            Ok(vec![[0; 32]; idx.len() + 1])
        }
    }

    #[test]
    fn wrong_length_reads_are_errors_not_panics() {
        for src in [&Short as &dyn NodeSource, &Long] {
            assert!(matches!(root(5, src), Err(MerkleError::BadRead { .. })));
            assert!(matches!(
                inclusion_proof(1, 5, src),
                Err(MerkleError::BadRead { .. })
            ));
            assert!(matches!(
                consistency_proof(3, 5, src),
                Err(MerkleError::BadRead { .. })
            ));
            assert!(matches!(
                stored_hashes_for(3, [0; 32], src),
                Err(MerkleError::BadRead { .. })
            ));
            assert!(matches!(
                Frontier::from_source(5, src),
                Err(MerkleError::BadRead { .. })
            ));
        }
    }

    #[test]
    fn missing_nodes_are_storage_errors() {
        let mut m = MemoryNodes::new();
        for i in 0..3u8 {
            m.append(&[i]).unwrap();
        }
        assert!(matches!(root(9, &m), Err(MerkleError::Storage(_))));
        assert!(matches!(
            inclusion_proof(0, 9, &m),
            Err(MerkleError::Storage(_))
        ));
        assert!(matches!(
            stored_hashes_for(u64::MAX, [0; 32], &m),
            Err(MerkleError::InvalidInput(_))
        ));
    }

    #[test]
    fn memory_nodes_and_frontier() {
        let mut m = MemoryNodes::new();
        let mut f = Frontier::new();
        assert_eq!(m.size(), 0);
        assert_eq!(root(0, &m).unwrap(), EMPTY_ROOT);
        assert_eq!(f.root(), EMPTY_ROOT);
        for i in 0..100u32 {
            assert_eq!(m.append(&i.to_be_bytes()).unwrap(), u64::from(i));
            f.push_data(&i.to_be_bytes());
            assert_eq!(m.size(), u64::from(i) + 1);
            assert_eq!(m.leaf(u64::from(i)), Some(leaf_hash(&i.to_be_bytes())));
            assert_eq!(f.root(), root(f.size(), &m).unwrap());
            assert_eq!(Frontier::from_source(f.size(), &m).unwrap(), f);
        }
        assert_eq!(m.leaf(100), None);
        let mut m2 = MemoryNodes::new();
        for i in 0..100u32 {
            m2.append_leaf_hash(leaf_hash(&i.to_be_bytes())).unwrap();
        }
        assert_eq!(m, m2);
    }

    #[test]
    fn edge_cases() {
        let mut m = MemoryNodes::new();
        for i in 0..8u8 {
            m.append(&[i]).unwrap();
        }
        let r8 = root(8, &m).unwrap();
        assert_eq!(
            inclusion_proof(8, 8, &m),
            Err(MerkleError::IndexOutOfRange { index: 8, size: 8 })
        );
        assert!(inclusion_proof(0, 0, &m).is_err());
        assert_eq!(
            consistency_proof(5, 4, &m),
            Err(MerkleError::SizeOrder { old: 5, new: 4 })
        );
        assert!(consistency_proof(0, 4, &m).is_err());
        assert_eq!(consistency_proof(4, 4, &m).unwrap(), Vec::<Hash32>::new());
        assert_eq!(consistency_proof(0, 0, &m).unwrap(), Vec::<Hash32>::new());
        assert!(verify_inclusion(leaf_hash(&[0]), 0, 0, &[], EMPTY_ROOT).is_err());
        assert!(verify_inclusion(leaf_hash(&[0]), u64::MAX, 8, &[], r8).is_err());
        assert!(verify_inclusion(r8, 0, 1, &[[0; 32]; 65], r8).is_err());
        assert!(verify_consistency(8, r8, 8, r8, &[]).is_ok());
        assert!(verify_consistency(8, r8, 8, r8, &[r8]).is_err());
        assert!(verify_consistency(0, EMPTY_ROOT, 0, EMPTY_ROOT, &[]).is_ok());
        assert!(verify_consistency(0, r8, 0, r8, &[]).is_err());
        assert!(verify_consistency(0, EMPTY_ROOT, 8, r8, &[]).is_err());
        assert!(verify_consistency(9, r8, 8, r8, &[]).is_err());
        assert!(verify_consistency(1, r8, u64::MAX, r8, &[[0; 32]; 66]).is_err());
        assert!(verify_consistency(1, r8, u64::MAX, r8, &[[0; 32]; 64]).is_err());
    }
}
