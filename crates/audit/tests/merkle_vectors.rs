//! RFC 6962 test vectors (copied from transparency-dev/merkle into
//! `tests/vectors/`, see its README and LICENSE).
//!
//! The vectors carry hashes as arbitrary byte strings; some deliberately
//! broken cases use values that are not 32 bytes long ("", "don't care 1").
//! Our API takes [`Hash32`], so such values are handled the way the
//! reference (Go) verifier treats them:
//! - a leaf hash that is not 32 bytes is rejected (Go checks its length; for
//!   us it cannot even be passed in), so the case counts as an error;
//! - roots and proof elements are compared as opaque values (Go does not
//!   check their length), so each is mapped to a fixed 32-byte placeholder
//!   derived from it (equal inputs, equal placeholders; none is a real tree
//!   hash) and the case is run like any other.

use std::path::{Path, PathBuf};

use base64::prelude::*;
use custos_audit::merkle::{
    EMPTY_ROOT, Frontier, Hash32, MemoryNodes, MerkleError, consistency_proof, inclusion_proof,
    leaf_hash, root, verify_consistency, verify_inclusion,
};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn vectors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn hash32(bytes: &[u8]) -> Hash32 {
    match bytes.try_into() {
        Ok(h) => h,
        Err(_) => {
            let mut h = Sha256::new();
            h.update(b"custos-test placeholder for a non-32-byte hash\0");
            h.update(bytes);
            h.finalize().into()
        }
    }
}

fn b64_hash(v: &Value) -> Hash32 {
    let s = v.as_str().expect("hash is a string");
    hash32(&BASE64_STANDARD.decode(s).expect("base64"))
}

fn proof(v: &Value) -> Vec<Hash32> {
    match v {
        Value::Null => Vec::new(),
        Value::Array(a) => a.iter().map(b64_hash).collect(),
        other => panic!("bad proof {other}"),
    }
}

fn u64_of(v: &Value) -> u64 {
    v.as_u64().expect("u64")
}

/// The eight leaf inputs and the roots of their prefixes, from roots.json.
fn roots_json() -> (Vec<Vec<u8>>, Vec<Hash32>) {
    let text = std::fs::read_to_string(vectors().join("roots.json")).expect("roots.json");
    let v: Value = serde_json::from_str(&text).expect("json");
    let leaves = v["leaf_inputs_hex"]
        .as_array()
        .expect("leaves")
        .iter()
        .map(|l| hex(l.as_str().expect("str")))
        .collect();
    let roots = v["root_hex_by_size"]
        .as_array()
        .expect("roots")
        .iter()
        .map(|r| hash32(&hex(r.as_str().expect("str"))))
        .collect();
    (leaves, roots)
}

fn eight_leaf_tree() -> MemoryNodes {
    let (leaves, _) = roots_json();
    let mut m = MemoryNodes::new();
    for l in &leaves {
        m.append(l).expect("append");
    }
    m
}

fn json_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            json_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "json") {
            out.push(p);
        }
    }
}

fn cases(kind: &str) -> Vec<(PathBuf, Value)> {
    let mut files = Vec::new();
    json_files(&vectors().join(kind), &mut files);
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("read");
            let v = serde_json::from_str(&text).expect("json");
            (p, v)
        })
        .collect()
}

#[test]
fn roots_for_sizes_0_to_8() {
    let (leaves, roots) = roots_json();
    assert_eq!(leaves.len(), 8);
    assert_eq!(roots.len(), 9);
    assert_eq!(roots[0], EMPTY_ROOT);
    let mut m = MemoryNodes::new();
    let mut f = Frontier::new();
    assert_eq!(root(0, &m).unwrap(), roots[0]);
    assert_eq!(f.root(), roots[0]);
    for (n, l) in leaves.iter().enumerate() {
        m.append(l).unwrap();
        f.push(leaf_hash(l));
        assert_eq!(
            root(n as u64 + 1, &m).unwrap(),
            roots[n + 1],
            "size {}",
            n + 1
        );
        assert_eq!(f.root(), roots[n + 1], "frontier size {}", n + 1);
    }
    // Prefix roots are also computable from the full tree.
    for (n, r) in roots.iter().enumerate() {
        assert_eq!(root(n as u64, &m).unwrap(), *r);
    }
}

#[test]
fn inclusion_vectors() {
    let (leaves, _) = roots_json();
    let tree = eight_leaf_tree();
    let all = cases("inclusion");
    assert!(all.len() >= 80, "only {} inclusion cases found", all.len());
    let (mut good, mut compared) = (0, 0);
    for (path, c) in &all {
        let index = u64_of(&c["leafIdx"]);
        let size = u64_of(&c["treeSize"]);
        let leaf_bytes = BASE64_STANDARD
            .decode(c["leafHash"].as_str().expect("leafHash"))
            .expect("base64");
        let leaf = hash32(&leaf_bytes);
        let p = proof(&c["proof"]);
        let r = b64_hash(&c["root"]);
        let want_err = c["wantErr"].as_bool().expect("wantErr");
        let got = match <Hash32>::try_from(leaf_bytes.as_slice()) {
            Ok(leaf) => verify_inclusion(leaf, index, size, &p, r),
            Err(_) => Err(MerkleError::InvalidInput(
                "leaf hash is not 32 bytes".into(),
            )),
        };
        assert_eq!(
            got.is_err(),
            want_err,
            "{}: {} -> {got:?}",
            path.display(),
            c["desc"]
        );
        if !want_err {
            good += 1;
            // Where the vector's leaf is one of the eight known inputs, our
            // proof generator must produce exactly the expected proof.
            if size <= 8 && leaf == leaf_hash(&leaves[index as usize]) {
                assert_eq!(
                    inclusion_proof(index, size, &tree).unwrap(),
                    p,
                    "{}",
                    path.display()
                );
                compared += 1;
            }
        }
    }
    assert_eq!(good, 6);
    assert_eq!(compared, 5);
}

#[test]
fn consistency_vectors() {
    let tree = eight_leaf_tree();
    let all = cases("consistency");
    assert!(
        all.len() >= 90,
        "only {} consistency cases found",
        all.len()
    );
    let (mut good, mut compared) = (0, 0);
    for (path, c) in &all {
        let size1 = u64_of(&c["size1"]);
        let size2 = u64_of(&c["size2"]);
        let root1 = b64_hash(&c["root1"]);
        let root2 = b64_hash(&c["root2"]);
        let p = proof(&c["proof"]);
        let want_err = c["wantErr"].as_bool().expect("wantErr");
        let got = verify_consistency(size1, root1, size2, root2, &p);
        assert_eq!(
            got.is_err(),
            want_err,
            "{}: {} -> {got:?}",
            path.display(),
            c["desc"]
        );
        if !want_err {
            good += 1;
            if size2 <= 8
                && root1 == root(size1, &tree).unwrap()
                && root2 == root(size2, &tree).unwrap()
            {
                assert_eq!(
                    consistency_proof(size1, size2, &tree).unwrap(),
                    p,
                    "{}",
                    path.display()
                );
                compared += 1;
            }
        }
    }
    assert_eq!(good, 6);
    assert_eq!(compared, 5);
}

#[test]
fn every_vector_file_is_used() {
    let mut files = Vec::new();
    json_files(&vectors(), &mut files);
    // roots.json + every inclusion and consistency case.
    let used = 1 + cases("inclusion").len() + cases("consistency").len();
    assert_eq!(files.len(), used);
}
