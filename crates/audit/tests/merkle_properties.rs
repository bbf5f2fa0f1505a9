//! Property tests for proofs and the Frontier over trees of up to 2000
//! leaves.
//!
//! Note on "changing the size": RFC 6962 proofs do not bind the tree size on
//! their own. The same proof and root verify for another size exactly when
//! the walk from the root to the leaf (inclusion), or to the old tree's
//! right edge (consistency), has the same shape for both sizes; e.g. the
//! proof for leaf 0 of a 3-leaf tree also verifies as leaf 0 of a 4-leaf tree
//! with the same root. (The size is authenticated by the signed checkpoint.)
//! The tests check that characterisation exactly, using an independent
//! shape oracle.

use std::sync::OnceLock;
use std::time::Instant;

use custos_audit::merkle::{
    EMPTY_ROOT, Frontier, Hash32, MemoryNodes, consistency_proof, inclusion_proof, leaf_hash,
    node_hash, root, verify_consistency, verify_inclusion,
};
use proptest::prelude::*;

const MAX: u64 = 2000;

fn data(i: u64) -> Vec<u8> {
    format!("entry {i}").into_bytes()
}

/// One tree of MAX leaves; every smaller tree is a prefix of its storage.
fn tree() -> &'static MemoryNodes {
    static TREE: OnceLock<MemoryNodes> = OnceLock::new();
    TREE.get_or_init(|| {
        let mut m = MemoryNodes::new();
        for i in 0..MAX {
            m.append(&data(i)).expect("append");
        }
        m
    })
}

/// Largest power of two strictly below `n` (n ≥ 2).
fn split(n: u64) -> u64 {
    1 << (63 - (n - 1).leading_zeros())
}

/// Left/right turns from the root to leaf `index` of a `size`-leaf tree.
fn inclusion_shape(index: u64, size: u64) -> Vec<bool> {
    let (mut lo, mut hi, mut turns) = (0, size, Vec::new());
    while hi - lo > 1 {
        let k = split(hi - lo);
        if index < lo + k {
            hi = lo + k;
            turns.push(false);
        } else {
            lo += k;
            turns.push(true);
        }
    }
    turns
}

/// Turns from the root of the `new`-leaf tree to the subtree ending at
/// `old`, and whether that subtree starts at 0.
fn consistency_shape(old: u64, new: u64) -> (Vec<bool>, bool) {
    let (mut lo, mut hi, mut turns) = (0, new, Vec::new());
    while old != hi {
        let k = split(hi - lo);
        if old <= lo + k {
            hi = lo + k;
            turns.push(false);
        } else {
            lo += k;
            turns.push(true);
        }
    }
    (turns, lo == 0)
}

fn flipped(proof: &[Hash32], byte: usize, mask: u8) -> Vec<Hash32> {
    let mut p = proof.to_vec();
    p[byte / 32][byte % 32] ^= mask;
    p
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn inclusion_proofs(size in 1..=MAX, idx in any::<prop::sample::Index>(),
                        other in 1..2 * MAX, mask in 1..=255u8) {
        let m = tree();
        let index = idx.index(size as usize) as u64;
        let r = root(size, m).unwrap();
        let leaf = leaf_hash(&data(index));
        let proof = inclusion_proof(index, size, m).unwrap();
        prop_assert_eq!(proof.len(), inclusion_shape(index, size).len());
        prop_assert!(verify_inclusion(leaf, index, size, &proof, r).is_ok());

        // Any changed byte of the proof.
        for byte in 0..proof.len() * 32 {
            let bad = flipped(&proof, byte, mask);
            prop_assert!(verify_inclusion(leaf, index, size, &bad, r).is_err());
        }
        // A wrong leaf, a wrong root, a shortened or lengthened proof.
        prop_assert!(verify_inclusion(leaf_hash(b"x"), index, size, &proof, r).is_err());
        // (Not the leaf hash as the wrong root: for one leaf that is the root.)
        let mut wrong_root = r;
        wrong_root[0] ^= mask;
        prop_assert!(verify_inclusion(leaf, index, size, &proof, wrong_root).is_err());
        if let Some((_, shorter)) = proof.split_last() {
            prop_assert!(verify_inclusion(leaf, index, size, shorter, r).is_err());
        }
        let mut longer = proof.clone();
        longer.push(r);
        prop_assert!(verify_inclusion(leaf, index, size, &longer, r).is_err());

        // Any other index, inside or outside the tree.
        for j in [index ^ 1, index.wrapping_sub(1), index + 1, other % size, size, u64::MAX] {
            if j != index {
                prop_assert!(verify_inclusion(leaf, j, size, &proof, r).is_err(), "index {}", j);
            }
        }
        // Another size: fails unless the path to the leaf has the same shape.
        let shape = inclusion_shape(index, size);
        for s in [size - 1, size + 1, size * 2, size / 2, other, 0, u64::MAX] {
            if s == size {
                continue;
            }
            let ok = verify_inclusion(leaf, index, s, &proof, r).is_ok();
            let same = index < s && inclusion_shape(index, s) == shape;
            prop_assert_eq!(ok, same, "size {} -> {}", size, s);
        }
    }

    #[test]
    fn consistency_proofs(new in 1..=MAX, o in any::<prop::sample::Index>(),
                          other in 1..2 * MAX, mask in 1..=255u8) {
        let m = tree();
        let old = o.index(new as usize) as u64 + 1; // 1..=new
        let (r1, r2) = (root(old, m).unwrap(), root(new, m).unwrap());
        let proof = consistency_proof(old, new, m).unwrap();
        prop_assert!(verify_consistency(old, r1, new, r2, &proof).is_ok());
        if old == new {
            prop_assert!(proof.is_empty());
            return Ok(());
        }
        prop_assert!(!proof.is_empty());

        for byte in 0..proof.len() * 32 {
            let bad = flipped(&proof, byte, mask);
            prop_assert!(verify_consistency(old, r1, new, r2, &bad).is_err());
        }
        prop_assert!(verify_consistency(old, r2, new, r1, &proof).is_err());
        prop_assert!(verify_consistency(old, r1, new, r1, &proof).is_err());
        prop_assert!(verify_consistency(old, r2, new, r2, &proof).is_err());
        if let Some((_, shorter)) = proof.split_last() {
            prop_assert!(verify_consistency(old, r1, new, r2, shorter).is_err());
        }
        let mut longer = proof.clone();
        longer.push(r1);
        prop_assert!(verify_consistency(old, r1, new, r2, &longer).is_err());

        // Other sizes: fail unless the proof has the same shape for them.
        let shape = consistency_shape(old, new);
        let alternatives = [
            (old - 1, new), (old + 1, new), (old ^ 2, new), (other, new),
            (old, new - 1), (old, new + 1), (old, new * 2), (old, new / 2), (old, other),
        ];
        for (o2, n2) in alternatives {
            if (o2, n2) == (old, new) {
                continue;
            }
            let ok = verify_consistency(o2, r1, n2, r2, &proof).is_ok();
            let same = 0 < o2 && o2 < n2 && consistency_shape(o2, n2) == shape;
            prop_assert_eq!(ok, same, "({}, {}) -> ({}, {})", old, new, o2, n2);
        }
    }

    #[test]
    fn frontier_matches_root(size in 0..=MAX) {
        let mut f = Frontier::new();
        for i in 0..size {
            f.push(leaf_hash(&data(i)));
        }
        prop_assert_eq!(f.size(), size);
        prop_assert_eq!(f.root(), root(size, tree()).unwrap());
        prop_assert_eq!(Frontier::from_source(size, tree()).unwrap(), f);
    }
}

#[test]
fn frontier_root_for_every_size() {
    let m = tree();
    let mut f = Frontier::new();
    assert_eq!(f.root(), EMPTY_ROOT);
    for i in 0..MAX {
        f.push_data(&data(i));
        assert_eq!(f.root(), root(i + 1, m).unwrap(), "size {}", i + 1);
    }
}

#[test]
fn size_is_not_bound_by_inclusion_proof() {
    // Documented RFC 6962 property (see module docs).
    let m = tree();
    let r3 = root(3, m).unwrap();
    let p = inclusion_proof(0, 3, m).unwrap();
    let leaf = leaf_hash(&data(0));
    assert!(verify_inclusion(leaf, 0, 3, &p, r3).is_ok());
    assert!(verify_inclusion(leaf, 0, 4, &p, r3).is_ok());
    assert_ne!(inclusion_proof(0, 4, m).unwrap(), p);
}

/// Frontier throughput including leaf hashing of 300-byte leaves. Run with
/// `cargo test --release -p custos-audit --test merkle_properties -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark; run in release mode"]
fn frontier_throughput() {
    const N: u64 = 2_000_000;
    let mut leaf = [b'x'; 300];
    for round in 0..3 {
        let mut f = Frontier::new();
        let start = Instant::now();
        for i in 0..N {
            leaf[..8].copy_from_slice(&i.to_le_bytes());
            f.push(leaf_hash(&leaf));
        }
        let r = f.root();
        let secs = start.elapsed().as_secs_f64();
        println!(
            "round {round}: {N} leaves of 300 bytes in {secs:.3}s = {:.0} leaves/s (root {:02x}{:02x}..)",
            N as f64 / secs,
            r[0],
            r[1]
        );
    }
    // Interior hashing alone, for reference.
    let start = Instant::now();
    let mut h = EMPTY_ROOT;
    for _ in 0..N {
        h = node_hash(h, h);
    }
    println!(
        "node_hash: {:.0}/s ({:02x})",
        N as f64 / start.elapsed().as_secs_f64(),
        h[0]
    );
}
