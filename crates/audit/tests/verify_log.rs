//! End-to-end offline verification: a log built with MemoryNodes, checkpoints
//! signed at several sizes, then tampered with in various ways.

use custos_audit::checkpoint::{LogSigner, open_checkpoint};
use custos_audit::merkle::{EMPTY_ROOT, Hash32, MemoryNodes, consistency_proof, leaf_hash, root};
use custos_audit::verify::{Report, Verifier, VerifyFailure, check_consistency_chain};

const ORIGIN: &str = "custos.test/audit";
const N: u64 = 100;
const SIZES: [u64; 4] = [10, 37, 64, 100];

struct Log {
    entries: Vec<Vec<u8>>,
    nodes: MemoryNodes,
    signer: LogSigner,
}

/// (index, data, claimed leaf hash)
type Stream = Vec<(u64, Vec<u8>, Option<Hash32>)>;

impl Log {
    fn new(n: u64) -> Log {
        let (signer, _secret) = LogSigner::generate(ORIGIN).expect("generate");
        let mut nodes = MemoryNodes::new();
        let mut entries = Vec::new();
        for i in 0..n {
            let e = format!(
                r#"{{"resourceType":"AuditEvent","id":"{i}","recorded":"2025-01-01T00:00:{:02}Z","agent":[{{"who":{{"reference":"Practitioner/{}"}}}}],"entity":[{{"what":{{"reference":"Patient/{}"}}}}],"padding":"{}"}}"#,
                i % 60,
                i % 7,
                i * 31 % 101,
                "x".repeat(100)
            );
            nodes.append(e.as_bytes()).expect("append");
            entries.push(e.into_bytes());
        }
        Log {
            entries,
            nodes,
            signer,
        }
    }

    fn vkey(&self) -> String {
        self.signer.verifier_key()
    }

    fn root(&self, size: u64) -> Hash32 {
        root(size, &self.nodes).expect("root")
    }

    fn checkpoint(&self, size: u64) -> Vec<u8> {
        self.signer.sign(size, self.root(size)).expect("sign")
    }

    fn checkpoints(&self, sizes: &[u64]) -> Vec<Vec<u8>> {
        sizes.iter().map(|&s| self.checkpoint(s)).collect()
    }

    /// Entries with their own index and, if `claims`, the stored leaf hash.
    fn stream(&self, claims: bool) -> Stream {
        self.entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let i = i as u64;
                (
                    i,
                    e.clone(),
                    claims.then(|| self.nodes.leaf(i).expect("leaf")),
                )
            })
            .collect()
    }

    /// Exported as if positions were the indexes: entries renumbered 0..,
    /// claimed leaves (if any) taken from the log's storage by position.
    fn renumbered(&self, data: Vec<Vec<u8>>, claims: bool) -> Stream {
        data.into_iter()
            .enumerate()
            .map(|(i, d)| {
                let i = i as u64;
                (i, d, if claims { self.nodes.leaf(i) } else { None })
            })
            .collect()
    }
}

fn run(vkey: &str, checkpoints: Vec<Vec<u8>>, stream: Stream) -> Result<Report, VerifyFailure> {
    let mut v = Verifier::new(vkey, checkpoints)?;
    for (i, data, claim) in stream {
        v.entry(i, &data, claim)?;
    }
    v.finish()
}

fn bad_index(r: Result<Report, VerifyFailure>) -> u64 {
    r.expect_err("verification should fail").first_bad_index
}

/// Greatest checkpoint size ≤ i (entries below it were vouched for).
fn covered_below(i: u64) -> u64 {
    SIZES.iter().copied().filter(|&s| s <= i).max().unwrap_or(0)
}

#[test]
fn untouched_log_verifies() {
    let log = Log::new(N);
    for claims in [true, false] {
        let report = run(&log.vkey(), log.checkpoints(&SIZES), log.stream(claims)).unwrap();
        assert_eq!(
            report,
            Report {
                entries: N,
                checkpoints: SIZES.len(),
                root: log.root(N),
                latest_checkpoint: Some(N),
            }
        );
    }
    // Checkpoints in any order, duplicated, or none at all.
    let mut cps = log.checkpoints(&SIZES);
    cps.reverse();
    cps.push(log.checkpoint(37));
    assert!(run(&log.vkey(), cps, log.stream(true)).is_ok());
    let report = run(&log.vkey(), vec![], log.stream(false)).unwrap();
    assert_eq!(report.latest_checkpoint, None);
    assert_eq!(report.root, log.root(N));
    // Entries beyond the latest checkpoint are accepted but not covered.
    let report = run(&log.vkey(), log.checkpoints(&[10, 64]), log.stream(true)).unwrap();
    assert_eq!((report.entries, report.latest_checkpoint), (N, Some(64)));
    // A size-0 checkpoint with the empty-tree root.
    let cps = vec![log.signer.sign(0, EMPTY_ROOT).unwrap(), log.checkpoint(N)];
    assert!(run(&log.vkey(), cps, log.stream(false)).is_ok());
    // The empty log.
    let report = run(&log.vkey(), vec![], vec![]).unwrap();
    assert_eq!((report.entries, report.root), (0, EMPTY_ROOT));
}

#[test]
fn changed_byte_names_the_entry() {
    let log = Log::new(N);
    for i in [0u64, 9, 10, 36, 50, 63, 64, 99] {
        for byte in [0usize, 17, 150] {
            for claims in [true, false] {
                let mut s = log.stream(claims);
                s[i as usize].1[byte] ^= 0x20;
                let got = bad_index(run(&log.vkey(), log.checkpoints(&SIZES), s));
                // With the log's leaf hashes the entry itself is named;
                // without them, the first entry after the last checkpoint
                // that still matched.
                let want = if claims { i } else { covered_below(i) };
                assert_eq!(got, want, "entry {i} byte {byte} claims {claims}");
            }
        }
    }
}

#[test]
fn changed_entry_with_matching_leaf_hash_is_caught_by_checkpoint() {
    // An attacker who also rewrites the stored leaf hash still fails at the
    // next checkpoint.
    let log = Log::new(N);
    let mut s = log.stream(true);
    s[50].1[3] ^= 1;
    s[50].2 = Some(leaf_hash(&s[50].1));
    assert_eq!(bad_index(run(&log.vkey(), log.checkpoints(&SIZES), s)), 37);
}

#[test]
fn deleted_entry_names_its_index() {
    let log = Log::new(N);
    for i in [0usize, 5, 37, 63, 99] {
        // Entries keep their own indexes: a gap.
        let mut s = log.stream(false);
        s.remove(i);
        let e = run(&log.vkey(), log.checkpoints(&SIZES), s).unwrap_err();
        assert_eq!(e.first_bad_index, i as u64, "{e}");
        // Deleting the last entry is indistinguishable from truncation.
        let word = if i == 99 { "truncated" } else { "missing" };
        assert!(e.reason.contains(word), "{e}");

        // Renumbered export with the log's leaf hashes.
        let mut data = log.entries.clone();
        data.remove(i);
        let s = log.renumbered(data.clone(), true);
        assert_eq!(
            bad_index(run(&log.vkey(), log.checkpoints(&SIZES), s)),
            i as u64
        );
        // Renumbered export without leaf hashes: caught at the next
        // checkpoint, or, when that is the last one (100), which the 99
        // remaining entries never reach, reported as truncation.
        let s = log.renumbered(data, false);
        let want = if i >= 64 {
            N - 1
        } else {
            covered_below(i as u64)
        };
        assert_eq!(
            bad_index(run(&log.vkey(), log.checkpoints(&SIZES), s)),
            want
        );
    }
}

#[test]
fn swapped_entries_name_the_smaller_index() {
    let log = Log::new(N);
    for (i, j) in [(0usize, 1usize), (3, 60), (36, 37), (40, 99), (98, 99)] {
        let mut s = log.stream(true);
        s.swap(i, j);
        let e = run(&log.vkey(), log.checkpoints(&SIZES), s).unwrap_err();
        assert_eq!(e.first_bad_index, i as u64, "{e}");

        let mut data = log.entries.clone();
        data.swap(i, j);
        let s = log.renumbered(data.clone(), true);
        assert_eq!(
            bad_index(run(&log.vkey(), log.checkpoints(&SIZES), s)),
            i as u64
        );
        let s = log.renumbered(data, false);
        assert_eq!(
            bad_index(run(&log.vkey(), log.checkpoints(&SIZES), s)),
            covered_below(i as u64)
        );
    }
}

#[test]
fn truncated_log_names_the_entry_count() {
    let log = Log::new(N);
    for keep in [0usize, 9, 10, 70, 99] {
        let mut s = log.stream(true);
        s.truncate(keep);
        let e = run(&log.vkey(), log.checkpoints(&SIZES), s).unwrap_err();
        assert_eq!(e.first_bad_index, keep as u64, "{e}");
        assert!(e.reason.contains("truncated"), "{e}");
    }
}

#[test]
fn checkpoint_resigned_with_another_key_fails() {
    let log = Log::new(N);
    let (other, _) = LogSigner::generate(ORIGIN).unwrap();
    let mut cps = log.checkpoints(&SIZES);
    cps[2] = other.sign(64, log.root(64)).unwrap();
    let e = Verifier::new(&log.vkey(), cps).unwrap_err();
    assert_eq!(e.first_bad_index, 37, "{e}");
    assert!(e.reason.contains("not signed by"), "{e}");

    // Only a foreign checkpoint at all.
    let cps = vec![other.sign(10, log.root(10)).unwrap()];
    assert_eq!(
        Verifier::new(&log.vkey(), cps).unwrap_err().first_bad_index,
        0
    );

    // Verifying with the wrong public key rejects everything.
    let e = Verifier::new(&other.verifier_key(), log.checkpoints(&SIZES)).unwrap_err();
    assert_eq!(e.first_bad_index, 0);
    // A malformed public key.
    let e = Verifier::new("not a key", log.checkpoints(&SIZES)).unwrap_err();
    assert_eq!(e.first_bad_index, 0);
}

#[test]
fn forged_checkpoint_root_fails() {
    let log = Log::new(N);
    let b64 = |h: Hash32| {
        use base64::prelude::*;
        BASE64_STANDARD.encode(h)
    };
    // Root edited in the note: the signature breaks.
    let mut cps = log.checkpoints(&SIZES);
    let text = String::from_utf8(cps[2].clone()).unwrap();
    let forged = text.replace(&b64(log.root(64)), &b64(leaf_hash(b"forged")));
    assert_ne!(forged, text);
    cps[2] = forged.into_bytes();
    let e = Verifier::new(&log.vkey(), cps).unwrap_err();
    assert_eq!(e.first_bad_index, 37, "{e}");
    assert!(e.reason.contains("bad signature"), "{e}");

    // A validly signed checkpoint whose root is not the entries' root (the
    // log itself lied, or entries before it were rewritten).
    let mut cps = log.checkpoints(&SIZES);
    cps[2] = log.signer.sign(64, leaf_hash(b"forged")).unwrap();
    let e = run(&log.vkey(), cps, log.stream(true)).unwrap_err();
    assert_eq!(e.first_bad_index, 37, "{e}");
    assert!(e.reason.contains("do not match"), "{e}");

    // Same at size 0.
    let cps = vec![log.signer.sign(0, leaf_hash(b"forged")).unwrap()];
    assert_eq!(
        Verifier::new(&log.vkey(), cps).unwrap_err().first_bad_index,
        0
    );

    // A checkpoint that is not even parseable: named by its list position.
    let mut cps = log.checkpoints(&SIZES);
    cps[3] = b"garbage".to_vec();
    let e = Verifier::new(&log.vkey(), cps).unwrap_err();
    assert_eq!(e.first_bad_index, 64, "{e}");
}

#[test]
fn fork_is_detected() {
    let log = Log::new(N);
    let mut cps = log.checkpoints(&SIZES);
    cps.push(log.signer.sign(64, leaf_hash(b"other branch")).unwrap());
    let e = run(&log.vkey(), cps, log.stream(true)).unwrap_err();
    assert_eq!(e.first_bad_index, 37, "{e}");
    assert!(e.reason.contains("fork"), "{e}");

    // A fork beyond the end of a truncated log.
    let mut cps = log.checkpoints(&SIZES);
    cps.push(log.signer.sign(100, leaf_hash(b"other branch")).unwrap());
    let mut s = log.stream(true);
    s.truncate(80);
    let e = run(&log.vkey(), cps, s).unwrap_err();
    assert_eq!(e.first_bad_index, 80, "{e}");
    assert!(e.reason.contains("fork"), "{e}");
}

#[test]
fn failure_is_sticky_and_displayed() {
    let log = Log::new(N);
    let mut v = Verifier::new(&log.vkey(), log.checkpoints(&SIZES)).unwrap();
    v.entry(0, &log.entries[0], None).unwrap();
    let e = v.entry(2, &log.entries[2], None).unwrap_err();
    assert_eq!(e.first_bad_index, 1);
    assert_eq!(
        e.to_string(),
        format!("first bad entry index 1: {}", e.reason)
    );
    assert_eq!(v.entry(1, &log.entries[1], None).unwrap_err(), e);
    assert_eq!(v.entries(), 1);
    assert_eq!(v.finish().unwrap_err(), e);

    // A repeated entry.
    let mut v = Verifier::new(&log.vkey(), vec![]).unwrap();
    v.entry(0, &log.entries[0], None).unwrap();
    let e = v.entry(0, &log.entries[0], None).unwrap_err();
    assert_eq!(e.first_bad_index, 1);
}

#[test]
fn consistency_chain() {
    let log = Log::new(N);
    let cps: Vec<_> = log
        .checkpoints(&SIZES)
        .iter()
        .map(|n| open_checkpoint(n, &log.vkey()).unwrap())
        .collect();
    let proofs: Vec<Vec<Hash32>> = SIZES
        .windows(2)
        .map(|w| consistency_proof(w[0], w[1], &log.nodes).unwrap())
        .collect();
    check_consistency_chain(&cps, &proofs).unwrap();
    check_consistency_chain(&[], &[]).unwrap();

    let mut bad = proofs.clone();
    bad[1][0][5] ^= 1;
    assert_eq!(
        check_consistency_chain(&cps, &bad)
            .unwrap_err()
            .first_bad_index,
        37
    );
    assert!(check_consistency_chain(&cps, &proofs[1..]).is_err());
}

#[test]
fn larger_log_with_many_checkpoints() {
    let log = Log::new(1000);
    let sizes: Vec<u64> = (0..=1000).step_by(97).chain([1000]).collect();
    let report = run(&log.vkey(), log.checkpoints(&sizes), log.stream(false)).unwrap();
    assert_eq!(report.latest_checkpoint, Some(1000));
    assert_eq!(report.checkpoints, sizes.len());
    let mut s = log.stream(false);
    s[500].1[0] ^= 1;
    assert_eq!(bad_index(run(&log.vkey(), log.checkpoints(&sizes), s)), 485);
}
