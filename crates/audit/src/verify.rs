//! Offline verification of an exported log by outsiders.
//!
//! Needs only the entries (in order), the signed checkpoints and the public
//! verifier key. The [`Verifier`] recomputes the tree from the entry stream
//! with a [`Frontier`] (O(log n) memory) and, each time the tree reaches a
//! checkpoint's size, compares the root with the signed one. Since every
//! checkpoint root is recomputed from the same ordered stream, matching
//! checkpoints are consistent with each other by construction.
//!
//! On failure, [`VerifyFailure::first_bad_index`] names where trust ends:
//! the exact entry when it can be pinned down (a gap, an entry out of
//! order, data not matching the log's leaf hash), else the size of the last
//! checkpoint that matched (a root mismatch, a fork, a bad checkpoint
//! signature). For truncation it is the number of entries provided (the
//! first missing entry); the reason then also says from which index on the
//! provided entries are not covered by a matching checkpoint.

use crate::checkpoint::{CheckpointError, SignedCheckpoint, open_checkpoint, parse_unverified};
use crate::merkle::{EMPTY_ROOT, Frontier, Hash32, leaf_hash, verify_consistency};

/// Why and where verification failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("first bad entry index {first_bad_index}: {reason}")]
pub struct VerifyFailure {
    /// First entry index that is not vouched for.
    pub first_bad_index: u64,
    /// Human-readable reason.
    pub reason: String,
}

impl VerifyFailure {
    fn new(first_bad_index: u64, reason: impl Into<String>) -> Self {
        Self {
            first_bad_index,
            reason: reason.into(),
        }
    }
}

/// Result of a successful verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Number of entries read.
    pub entries: u64,
    /// Number of checkpoints (all verified and matched).
    pub checkpoints: usize,
    /// Root of the tree of all entries.
    pub root: Hash32,
    /// Size of the largest checkpoint; entries at or beyond it are not
    /// covered by any signature.
    pub latest_checkpoint: Option<u64>,
}

/// Streaming verifier: feed entries with [`Verifier::entry`] in index order,
/// then call [`Verifier::finish`]. After a failure every later call returns
/// the same failure.
#[derive(Debug, Clone)]
pub struct Verifier {
    /// Verified checkpoints, sorted by size.
    checkpoints: Vec<SignedCheckpoint>,
    /// First checkpoint whose size is above the current tree size.
    next_cp: usize,
    /// Size of the last checkpoint whose root matched.
    last_matched: u64,
    frontier: Frontier,
    failed: Option<VerifyFailure>,
}

impl Verifier {
    /// Verifies every checkpoint note with `verifier_key` up front.
    ///
    /// A checkpoint that does not verify fails with `first_bad_index` = size
    /// of the greatest verified checkpoint below it (below its claimed size,
    /// or, if it cannot even be parsed, before it in the list), or 0. With
    /// several bad checkpoints the smallest such index is reported.
    pub fn new(verifier_key: &str, checkpoints: Vec<Vec<u8>>) -> Result<Verifier, VerifyFailure> {
        let mut good: Vec<(usize, SignedCheckpoint)> = Vec::with_capacity(checkpoints.len());
        let mut bad: Vec<(usize, Option<u64>, CheckpointError)> = Vec::new();
        for (pos, note) in checkpoints.iter().enumerate() {
            match open_checkpoint(note, verifier_key) {
                Ok(cp) => good.push((pos, cp)),
                Err(CheckpointError::InvalidKey(m)) => {
                    return Err(VerifyFailure::new(0, format!("verifier key: {m}")));
                }
                Err(e) => bad.push((pos, parse_unverified(note).ok().map(|c| c.1), e)),
            }
        }
        let worst = bad
            .iter()
            .map(|(pos, claimed, e)| {
                let below = good
                    .iter()
                    .filter(|(p, cp)| match claimed {
                        Some(c) => cp.size < *c,
                        None => p < pos,
                    })
                    .map(|(_, cp)| cp.size)
                    .max()
                    .unwrap_or(0);
                let what = match claimed {
                    Some(c) => format!("checkpoint #{pos} (claimed size {c})"),
                    None => format!("checkpoint #{pos}"),
                };
                VerifyFailure::new(below, format!("{what} rejected: {e}"))
            })
            .min_by_key(|f| f.first_bad_index);
        if let Some(f) = worst {
            return Err(f);
        }

        let mut cps: Vec<SignedCheckpoint> = good.into_iter().map(|(_, cp)| cp).collect();
        cps.sort_by_key(|cp| cp.size);
        let mut v = Verifier {
            checkpoints: cps,
            next_cp: 0,
            last_matched: 0,
            frontier: Frontier::new(),
            failed: None,
        };
        // Checkpoints of size 0 are reached before any entry.
        v.reached()?;
        Ok(v)
    }

    /// Feeds entry `index` (must be the next one: 0, 1, 2, …) with its
    /// `data` and, if available, the leaf hash the log stored for it.
    pub fn entry(
        &mut self,
        index: u64,
        data: &[u8],
        claimed_leaf: Option<Hash32>,
    ) -> Result<(), VerifyFailure> {
        if let Some(f) = &self.failed {
            return Err(f.clone());
        }
        let expected = self.frontier.size();
        if index != expected {
            let reason = if index > expected {
                format!("entry {expected} is missing (got entry {index} instead)")
            } else {
                format!("entry {index} is out of order or repeated (expected entry {expected})")
            };
            return self.fail(expected, reason);
        }
        let leaf = leaf_hash(data);
        if claimed_leaf.is_some_and(|c| c != leaf) {
            return self.fail(index, "entry data does not match the log's leaf hash");
        }
        self.frontier.push(leaf);
        self.reached()
    }

    /// Ends the stream: fails if a checkpoint is larger than the number of
    /// entries (truncation), else returns the [`Report`].
    pub fn finish(self) -> Result<Report, VerifyFailure> {
        if let Some(f) = self.failed {
            return Err(f);
        }
        let entries = self.frontier.size();
        if let Some(last) = self.checkpoints.last().filter(|c| c.size > entries) {
            let rest = &self.checkpoints[self.next_cp..];
            let fork = rest
                .windows(2)
                .find(|w| w[0].size == w[1].size && w[0].root != w[1].root)
                .map(|w| format!("; also a fork at size {}", w[0].size))
                .unwrap_or_default();
            return Err(VerifyFailure::new(
                entries,
                format!(
                    "log truncated: a checkpoint covers {} entries but only {entries} were provided \
                     (entries from {} on are not covered by a matching checkpoint){fork}",
                    last.size, self.last_matched
                ),
            ));
        }
        Ok(Report {
            entries,
            checkpoints: self.checkpoints.len(),
            root: self.frontier.root(),
            latest_checkpoint: self.checkpoints.last().map(|c| c.size),
        })
    }

    /// Number of entries accepted so far.
    pub fn entries(&self) -> u64 {
        self.frontier.size()
    }

    /// The verified checkpoints, sorted by size.
    pub fn checkpoints(&self) -> &[SignedCheckpoint] {
        &self.checkpoints
    }

    /// Checks the checkpoints whose size equals the current tree size.
    fn reached(&mut self) -> Result<(), VerifyFailure> {
        let size = self.frontier.size();
        let start = self.next_cp;
        while self
            .checkpoints
            .get(self.next_cp)
            .is_some_and(|c| c.size == size)
        {
            self.next_cp += 1;
        }
        let group = &self.checkpoints[start..self.next_cp];
        let Some(first) = group.first() else {
            return Ok(());
        };
        if group.iter().any(|c| c.root != first.root) {
            return self.fail(
                self.last_matched,
                format!("fork: signed checkpoints of size {size} with different roots"),
            );
        }
        if first.root != self.frontier.root() {
            return self.fail(
                self.last_matched,
                format!(
                    "the first {size} entries do not match the signed checkpoint of size {size}"
                ),
            );
        }
        self.last_matched = size;
        Ok(())
    }

    fn fail(&mut self, index: u64, reason: impl Into<String>) -> Result<(), VerifyFailure> {
        let f = VerifyFailure::new(index, reason);
        self.failed = Some(f.clone());
        Err(f)
    }
}

/// Checks consistency proofs between consecutive checkpoints (for
/// verifiers that hold checkpoints and proofs but not the entries):
/// `proofs[i]` must prove `checkpoints[i]` is a prefix of
/// `checkpoints[i + 1]`. A failure names the size of the older checkpoint.
/// A size-0 checkpoint must carry the empty-tree root and an empty proof.
pub fn check_consistency_chain(
    checkpoints: &[SignedCheckpoint],
    proofs: &[Vec<Hash32>],
) -> Result<(), VerifyFailure> {
    if proofs.len() != checkpoints.len().saturating_sub(1) {
        return Err(VerifyFailure::new(
            0,
            format!(
                "{} proofs given for {} checkpoints",
                proofs.len(),
                checkpoints.len()
            ),
        ));
    }
    for (pair, proof) in checkpoints.windows(2).zip(proofs) {
        let (a, b) = (&pair[0], &pair[1]);
        let ok = if a.size == 0 && b.size > 0 {
            a.root == EMPTY_ROOT && proof.is_empty()
        } else {
            verify_consistency(a.size, a.root, b.size, b.root, proof).is_ok()
        };
        if !ok {
            return Err(VerifyFailure::new(
                a.size,
                format!(
                    "checkpoint of size {} is not consistent with checkpoint of size {}",
                    a.size, b.size
                ),
            ));
        }
    }
    Ok(())
}
