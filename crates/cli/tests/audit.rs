//! The audit trail, end to end: the real `custos` binary over HTTP and its
//! command line. Every request must become an AuditEvent that anyone can
//! prove against a signed checkpoint with nothing but RFC 6962 math (done
//! here, independently of the product's own Merkle code); a patient can see
//! who opened their record; tampering with the log in the database — one
//! flipped byte, a deleted or swapped entry, a truncation and re-append, a
//! log re-signed with another key — is detected and the first bad entry is
//! named; and a server killed with SIGKILL in the middle of a write storm
//! loses no acknowledged write's event.
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

use support::{Resp, SYSTEM_CLIENT, Server, custos, custos_ok, is_outcome};

const PATIENT_SCOPE: &str = "patient/*.rs launch/patient";
const USER_SCOPE: &str = "user/*.cruds";
const AUDITOR_SCOPE: &str = "user/AuditEvent.rs";
const LOG_ENTRY_EXTENSION: &str = "https://custos.dev/fhir/StructureDefinition/audit-log-entry";

type Hash = [u8; 32];

// ------------------------------------------------- RFC 6962 / RFC 9162 math

fn sha256(parts: &[&[u8]]) -> Hash {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(p);
    }
    ctx.finish()
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

/// RFC 6962 leaf hash: SHA-256(0x00 ‖ leaf).
fn leaf_hash(data: &[u8]) -> Hash {
    sha256(&[&[0], data])
}

/// RFC 6962 interior node: SHA-256(0x01 ‖ left ‖ right).
fn node_hash(left: &Hash, right: &Hash) -> Hash {
    sha256(&[&[1], left, right])
}

/// MTH(D[n]) over leaf hashes (RFC 6962 §2.1).
fn tree_hash(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => sha256(&[]),
        1 => leaves[0],
        n => {
            // The largest power of two smaller than n.
            let mut k = 1;
            while k * 2 < n {
                k *= 2;
            }
            node_hash(&tree_hash(&leaves[..k]), &tree_hash(&leaves[k..]))
        }
    }
}

/// RFC 9162 §2.1.3.2: verify an inclusion proof of leaf `index` in the tree
/// of `size` leaves whose root is `root`.
fn verify_inclusion(
    index: u64,
    size: u64,
    leaf: Hash,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), String> {
    if index >= size {
        return Err(format!("index {index} is not below size {size}"));
    }
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = leaf;
    for p in proof {
        if sn == 0 {
            return Err("the proof is too long".into());
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err("the proof is too short".into());
    }
    if &r != root {
        return Err("the proof leads to another root".into());
    }
    Ok(())
}

/// RFC 9162 §2.1.4.2: verify a consistency proof between the tree of
/// `first` leaves (root `first_root`) and that of `second` leaves.
fn verify_consistency(
    first: u64,
    second: u64,
    first_root: &Hash,
    second_root: &Hash,
    proof: &[Hash],
) -> Result<(), String> {
    if first > second {
        return Err(format!("{first} > {second}"));
    }
    if first == second {
        return if proof.is_empty() && first_root == second_root {
            Ok(())
        } else {
            Err("equal sizes need an empty proof and equal roots".into())
        };
    }
    if first == 0 {
        return if proof.is_empty() {
            Ok(())
        } else {
            Err("the empty tree needs an empty proof".into())
        };
    }
    if proof.is_empty() {
        return Err("the proof is empty".into());
    }
    let mut path = proof.to_vec();
    if first.is_power_of_two() {
        path.insert(0, *first_root);
    }
    let (mut fn_, mut sn) = (first - 1, second - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (mut fr, mut sr) = (path[0], path[0]);
    for c in &path[1..] {
        if sn == 0 {
            return Err("the proof is too long".into());
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err("the proof is too short".into());
    }
    if &fr != first_root {
        return Err("the proof does not lead to the old root".into());
    }
    if &sr != second_root {
        return Err("the proof does not lead to the new root".into());
    }
    Ok(())
}

fn hash_of(b64: &str) -> Hash {
    B64.decode(b64)
        .expect("base64 hash")
        .try_into()
        .expect("a 32-byte hash")
}

fn proof_of(r: &Resp) -> Vec<Hash> {
    r.body["proof"]
        .as_array()
        .unwrap_or_else(|| panic!("a proof: {}", r.text))
        .iter()
        .map(|h| hash_of(h.as_str().expect("base64 string")))
        .collect()
}

// ----------------------------------------------------- signed checkpoints

/// A C2SP checkpoint in a signed note.
#[derive(Debug, Clone)]
struct Checkpoint {
    origin: String,
    size: u64,
    root: Hash,
    /// The signed text: origin, size and root lines, each ending in `\n`.
    body: String,
    signatures: Vec<String>,
}

fn parse_checkpoint(note: &str) -> Checkpoint {
    let (body, sigs) = note
        .split_once("\n\n")
        .unwrap_or_else(|| panic!("a signed note has a blank line: {note:?}"));
    let lines: Vec<&str> = body.lines().collect();
    assert!(lines.len() >= 3, "a checkpoint has 3 lines: {note:?}");
    Checkpoint {
        origin: lines[0].to_string(),
        size: lines[1]
            .parse()
            .unwrap_or_else(|_| panic!("checkpoint size: {note:?}")),
        root: hash_of(lines[2]),
        body: format!("{body}\n"),
        signatures: sigs
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect(),
    }
}

/// Check a checkpoint's Ed25519 signature against a signed-note verifier
/// key (`name+hexid+base64(0x01 ‖ public key)`) with `ring`.
fn verify_checkpoint_signature(cp: &Checkpoint, verifier_key: &str) -> Result<(), String> {
    let mut parts = verifier_key.trim().splitn(3, '+');
    let (Some(name), Some(id_hex), Some(key_b64)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("malformed verifier key {verifier_key:?}"));
    };
    let key = B64.decode(key_b64).map_err(|e| e.to_string())?;
    if key.len() != 33 || key[0] != 1 {
        return Err("not an Ed25519 verifier key".into());
    }
    let id = u32::from_str_radix(id_hex, 16).map_err(|e| e.to_string())?;
    let computed = sha256(&[name.as_bytes(), b"\n", &key]);
    if computed[..4] != id.to_be_bytes() {
        return Err("the key id does not match the key".into());
    }
    if cp.origin != name {
        return Err(format!(
            "origin {:?} is not the key name {name:?}",
            cp.origin
        ));
    }
    let public = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &key[1..]);
    for line in &cp.signatures {
        let Some((who, sig)) = line
            .strip_prefix("— ")
            .and_then(|rest| rest.split_once(' '))
        else {
            continue;
        };
        let Ok(sig) = B64.decode(sig) else { continue };
        if who != name || sig.len() != 68 || sig[..4] != id.to_be_bytes() {
            continue;
        }
        return public
            .verify(cp.body.as_bytes(), &sig[4..])
            .map_err(|_| "the signature does not verify".into());
    }
    Err("no signature by this key".into())
}

// ------------------------------------------------------------ FHIR helpers

fn practitioner(family: &str) -> Value {
    json!({ "resourceType": "Practitioner", "name": [{ "family": family }] })
}

fn patient(family: &str, gp: Option<&str>) -> Value {
    let mut p = json!({
        "resourceType": "Patient",
        "name": [{ "family": family, "given": ["Test"] }],
        "birthDate": "1970-01-01",
    });
    if let Some(gp) = gp {
        p["generalPractitioner"] = json!([{ "reference": format!("Practitioner/{gp}") }]);
    }
    p
}

fn observation(subject: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "code": { "coding": [{ "system": "http://loinc.org", "code": "8867-4" }] },
        "subject": { "reference": format!("Patient/{subject}") },
        "effectiveDateTime": "2024-03-01T10:00:00Z",
        "valueQuantity": { "value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min" },
    })
}

/// Create a resource; its id.
async fn create(s: &Server, token: &str, resource: Value) -> String {
    let rtype = resource["resourceType"].as_str().unwrap().to_string();
    let r = s
        .call(Some(token), "POST", &rtype, Some(resource), &[])
        .await;
    assert_eq!(r.status, 201, "create {rtype}: {}", r.text);
    r.body["id"].as_str().expect("created id").to_string()
}

async fn get(s: &Server, token: Option<&str>, path: &str) -> Resp {
    s.call(token, "GET", path, None, &[]).await
}

/// The AuditEvents of a searchset bundle.
fn events(bundle: &Value) -> Vec<Value> {
    assert_eq!(bundle["resourceType"], "Bundle", "a bundle: {bundle}");
    bundle["entry"]
        .as_array()
        .map(|e| e.iter().map(|x| x["resource"].clone()).collect())
        .unwrap_or_default()
}

/// The `entity.what` references of an AuditEvent.
fn whats(ev: &Value) -> Vec<String> {
    ev["entity"]
        .as_array()
        .map(|es| {
            es.iter()
                .filter_map(|e| e["what"]["reference"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn subtype(ev: &Value) -> Option<&str> {
    ev["subtype"][0]["code"].as_str()
}

/// An AuditEvent's log position: (index, leaf, leaf hash as stated).
fn log_position(ev: &Value) -> (u64, Vec<u8>, Hash) {
    let ext = ev["extension"]
        .as_array()
        .and_then(|x| x.iter().find(|e| e["url"] == LOG_ENTRY_EXTENSION))
        .unwrap_or_else(|| panic!("the log-entry extension: {ev}"));
    let sub = |name: &str| -> &Value {
        ext["extension"]
            .as_array()
            .and_then(|x| x.iter().find(|e| e["url"] == name))
            .unwrap_or_else(|| panic!("sub-extension {name}: {ev}"))
    };
    let index: u64 = sub("index")["valueInteger64"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("an index: {ev}"));
    assert_eq!(
        ev["id"],
        index.to_string(),
        "AuditEvent.id is the leaf index"
    );
    let leaf = B64
        .decode(sub("leaf")["valueBase64Binary"].as_str().unwrap())
        .unwrap();
    let stated = hash_of(sub("leafHash")["valueBase64Binary"].as_str().unwrap());
    (index, leaf, stated)
}

// ------------------------------------------------------ the command line

/// The outcome of `custos audit verify`.
#[derive(Debug)]
enum Verdict {
    Verified(String),
    Failed { index: u64, message: String },
}

fn verify(args: &[&str]) -> Verdict {
    let mut all = vec!["audit", "verify"];
    all.extend_from_slice(args);
    let out = custos(&all);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        assert!(
            stdout.contains("audit log verified:"),
            "custos {all:?} succeeded without saying so: {stdout}{stderr}"
        );
        return Verdict::Verified(stdout);
    }
    assert_eq!(
        out.status.code(),
        Some(1),
        "custos {all:?}: a verification failure exits 1:\n{stdout}{stderr}"
    );
    const PREFIX: &str = "audit log verification FAILED: first bad entry index ";
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix(PREFIX))
        .unwrap_or_else(|| panic!("custos {all:?} failed without naming an index:\n{stderr}"));
    let index = line
        .split(':')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("unparsable failure line: {line}"));
    Verdict::Failed {
        index,
        message: stderr,
    }
}

fn verify_dir(dir: &Path, key: &str, witness: Option<&Path>) -> Verdict {
    let d = dir.to_str().unwrap();
    let mut args = vec!["--data-dir", d, "--public-key", key];
    if let Some(w) = witness {
        args.extend(["--witness", w.to_str().unwrap()]);
    }
    verify(&args)
}

#[track_caller]
fn assert_verified(v: &Verdict, what: &str) -> String {
    match v {
        Verdict::Verified(out) => out.clone(),
        Verdict::Failed { message, .. } => panic!("{what}: verification failed:\n{message}"),
    }
}

/// The failure, which must name an index; (index, message).
#[track_caller]
fn assert_failed(v: Verdict, what: &str) -> (u64, String) {
    match v {
        Verdict::Failed { index, message } => {
            eprintln!("{what}: {}", message.trim());
            (index, message)
        }
        Verdict::Verified(out) => panic!("{what}: the tampered log verified:\n{out}"),
    }
}

fn public_key(dir: &Path) -> String {
    custos_ok(&["audit", "public-key", "--data-dir", dir.to_str().unwrap()])
        .trim()
        .to_string()
}

/// Copy a stopped server's data directory (the SQLite shared-memory index
/// is left behind: SQLite rebuilds it from the WAL).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else if !entry.file_name().to_string_lossy().ends_with("-shm") {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// The data dir's database, with its audit file attached as `audit` (the
/// audit tables live there; unqualified names resolve to them).
fn db(dir: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(dir.join("custos.db")).expect("open custos.db");
    c.execute(
        "ATTACH DATABASE ?1 AS audit",
        [dir.join("custos.db-audit").to_str().unwrap()],
    )
    .expect("attach custos.db-audit");
    c
}

/// The sizes of the checkpoints stored in a data dir, oldest first.
fn stored_checkpoint_sizes(dir: &Path) -> Vec<u64> {
    let conn = db(dir);
    let mut stmt = conn
        .prepare("SELECT value FROM sys_log WHERE log = 'audit-checkpoint' ORDER BY seq")
        .unwrap();
    let notes: Vec<Vec<u8>> = stmt
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    notes
        .iter()
        .map(|n| parse_checkpoint(&String::from_utf8_lossy(n)).size)
        .collect()
}

fn entry_count(dir: &Path) -> u64 {
    db(dir)
        .query_row("SELECT COUNT(*) FROM audit_log", [], |r| r.get::<_, i64>(0))
        .unwrap() as u64
}

/// Cut the log back to its first `keep` entries, with their stored hashes
/// and patient index (what an attacker with the database file does).
fn truncate_log(dir: &Path, keep: u64) {
    let conn = db(dir);
    let first_hash = tlog_tiles::stored_hash_index(0, keep) as i64;
    let keep = keep as i64;
    conn.execute("DELETE FROM audit_log WHERE idx >= ?1", [keep])
        .unwrap();
    conn.execute("DELETE FROM audit_key_tail WHERE idx >= ?1", [keep])
        .unwrap();
    // Postings list a block's events together: drop those of every block
    // that reaches past the cut (the index is not what verification checks).
    conn.execute(
        "DELETE FROM audit_key_post WHERE (block + 1) * 8192 > ?1",
        [keep],
    )
    .unwrap();
    conn.execute("DELETE FROM audit_hash WHERE n >= ?1", [first_hash])
        .unwrap();
}

fn audit_config(witness: Option<&Path>) -> String {
    let mut cfg = String::from("[audit]\ncheckpoint_secs = 0\n");
    if let Some(w) = witness {
        let quoted = serde_json::to_string(w.to_str().unwrap()).unwrap();
        cfg.push_str(&format!("witness_file = {quoted}\n"));
    }
    cfg
}

/// Serve a data dir with a configuration file written next to it.
fn serve_with(dir: &Path, config: &str) -> Server {
    let cfg = dir.join("custos.toml");
    std::fs::write(&cfg, config).unwrap();
    Server::serve(dir, &["--config", cfg.to_str().unwrap()], &[])
}

/// `n` anonymous requests, each one more entry in the log.
async fn anonymous_requests(s: &Server, n: u64) {
    for _ in 0..n {
        let r = get(s, None, "metadata").await;
        assert_eq!(r.status, 200, "GET /metadata: {}", r.text);
    }
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).unwrap();
    u64::from_le_bytes(b)
}

// ===================================================================== 1

/// Every request — a create, a read, a refused request — is an AuditEvent
/// an auditor can find, and each is provably in the log: its inclusion
/// proof and the consistency proof between two checkpoints check out with
/// RFC 9162 math done here, and the checkpoints carry a valid Ed25519
/// signature by the log's published key. Only auditors (and system clients)
/// read the trail; nobody writes it.
#[tokio::test]
async fn requests_become_provable_audit_events() {
    let mut s = Server::start();
    let sys = s.sign_in_system().await;
    let pid = create(&s, &sys, patient("Audited", None)).await;
    let oid = create(&s, &sys, observation(&pid)).await;
    assert_eq!(
        get(&s, Some(&sys), &format!("Patient/{pid}")).await.status,
        200
    );
    assert_eq!(
        get(&s, Some(&sys), &format!("Observation/{oid}"))
            .await
            .status,
        200
    );
    let refused = get(&s, None, &format!("Patient/{pid}")).await;
    assert_eq!(refused.status, 401, "no token: {}", refused.text);

    let auditor = s.add_user("auditor.one", "auditor", &[]);
    let at = auditor.token(&s.base, AUDITOR_SCOPE).await;

    // The patient's events: the create and the read (and the Observation's).
    let r = get(&s, Some(&at), &format!("AuditEvent?patient={pid}")).await;
    assert_eq!(r.status, 200, "AuditEvent search by an auditor: {}", r.text);
    let evs = events(&r.body);
    let patient_create = format!("Patient/{pid}/_history/1");
    let find = |pred: &dyn Fn(&Value) -> bool, what: &str| -> Value {
        evs.iter()
            .find(|e| pred(e))
            .cloned()
            .unwrap_or_else(|| panic!("{what} is not among the patient's events: {}", r.text))
    };
    let created = find(
        &|e| e["action"] == "C" && whats(e).contains(&patient_create),
        "the create of the Patient",
    );
    assert_eq!(created["outcome"], "0", "{created}");
    assert_eq!(subtype(&created), Some("create"), "{created}");
    assert_eq!(created["agent"][0]["altId"], SYSTEM_CLIENT, "{created}");
    let read = find(
        &|e| {
            e["action"] == "R"
                && subtype(e) == Some("read")
                && whats(e).contains(&format!("Patient/{pid}"))
        },
        "the read of the Patient",
    );
    assert_eq!(read["outcome"], "0", "{read}");
    let obs_create = format!("Observation/{oid}/_history/1");
    let obs = find(
        &|e| e["action"] == "C" && whats(e).contains(&obs_create),
        "the create of the patient's Observation",
    );
    assert_eq!(obs["outcome"], "0", "{obs}");
    find(
        &|e| e["action"] == "R" && whats(e).contains(&format!("Observation/{oid}")),
        "the read of the patient's Observation",
    );
    // Newest first.
    let indexes: Vec<u64> = evs.iter().map(|e| log_position(e).0).collect();
    assert!(
        indexes.windows(2).all(|w| w[0] > w[1]),
        "events newest first: {indexes:?}"
    );

    // The refused request is recorded as a minor failure.
    let r = get(&s, Some(&at), "AuditEvent?outcome=4").await;
    assert_eq!(r.status, 200, "{}", r.text);
    let failures = events(&r.body);
    assert!(
        failures.iter().all(|e| e["outcome"] == "4"),
        "outcome=4 returns failures only: {}",
        r.text
    );
    let unauth = failures
        .iter()
        .find(|e| {
            whats(e).contains(&format!("Patient/{pid}"))
                && e["outcomeDesc"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("HTTP 401"))
        })
        .unwrap_or_else(|| panic!("the 401 on Patient/{pid} is not recorded: {}", r.text));
    assert_eq!(unauth["action"], "R", "{unauth}");

    // The read event, by itself and as leaf of the log.
    let (index, leaf, stated) = log_position(&read);
    assert_eq!(
        leaf_hash(&leaf),
        stated,
        "the stated leaf hash is SHA-256(0x00 ‖ leaf)"
    );
    let r = get(&s, Some(&at), &format!("AuditEvent/{index}")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        log_position(&r.body).1,
        leaf,
        "AuditEvent/{index} is the same leaf"
    );

    // A checkpoint covering it, signed by the published key.
    let key = get(&s, None, "audit/public-key")
        .await
        .text
        .trim()
        .to_string();
    assert_eq!(
        key,
        public_key(&s.dir),
        "the HTTP and CLI public keys agree"
    );
    let r1 = get(&s, None, "audit/checkpoint").await;
    assert_eq!(r1.status, 200, "{}", r1.text);
    let c1 = parse_checkpoint(&r1.text);
    verify_checkpoint_signature(&c1, &key)
        .unwrap_or_else(|e| panic!("checkpoint signature: {e}\n{}", r1.text));
    assert!(
        c1.size > index,
        "the checkpoint covers the event: {}",
        r1.text
    );
    let r = get(
        &s,
        None,
        &format!("audit/proof/inclusion?index={index}&size={}", c1.size),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    verify_inclusion(index, c1.size, stated, &proof_of(&r), &c1.root)
        .unwrap_or_else(|e| panic!("inclusion of {index} in {}: {e}", c1.size));
    // A proof for another leaf does not prove this one.
    let other = if index == 0 { 1 } else { index - 1 };
    let r = get(
        &s,
        None,
        &format!("audit/proof/inclusion?index={other}&size={}", c1.size),
    )
    .await;
    assert!(
        verify_inclusion(index, c1.size, stated, &proof_of(&r), &c1.root).is_err(),
        "leaf {other}'s proof must not prove leaf {index}"
    );

    // More requests, a second checkpoint, consistent with the first.
    for _ in 0..5 {
        assert_eq!(
            get(&s, Some(&sys), &format!("Patient/{pid}")).await.status,
            200
        );
    }
    // Asking signs at most one checkpoint a second.
    let first = parse_checkpoint(&get(&s, None, "audit/checkpoint").await.text);
    let again = parse_checkpoint(&get(&s, None, "audit/checkpoint").await.text);
    assert_eq!(
        again.size, first.size,
        "asking again within a second gets the same checkpoint, though the ask itself was audited"
    );
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let r2 = get(&s, None, "audit/checkpoint").await;
    let c2 = parse_checkpoint(&r2.text);
    verify_checkpoint_signature(&c2, &key).unwrap();
    assert!(c2.size >= c1.size + 6, "{} then {}", c1.size, c2.size);
    let r = get(
        &s,
        None,
        &format!("audit/proof/consistency?from={}&to={}", c1.size, c2.size),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    verify_consistency(c1.size, c2.size, &c1.root, &c2.root, &proof_of(&r))
        .unwrap_or_else(|e| panic!("consistency {} → {}: {e}", c1.size, c2.size));
    let mut forged = c1.root;
    forged[0] ^= 1;
    assert!(
        verify_consistency(c1.size, c2.size, &forged, &c2.root, &proof_of(&r)).is_err(),
        "a consistency proof does not fit another old root"
    );
    let r = get(&s, None, "audit/checkpoints").await;
    let notes: Vec<&str> = r.body["checkpoints"]
        .as_array()
        .unwrap_or_else(|| panic!("{}", r.text))
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert!(notes.contains(&r1.text.as_str()) && notes.contains(&r2.text.as_str()));

    // Every leaf, every size: the server's proofs agree with the tree this
    // test computes from the raw entries.
    let r = get(&s, Some(&at), "audit/entries").await;
    assert_eq!(r.status, 200, "{}", r.text);
    let leaves: Vec<Hash> = r
        .text
        .lines()
        .enumerate()
        .map(|(i, line)| {
            let v: Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["index"], i as u64, "entries are contiguous from 0");
            leaf_hash(&B64.decode(v["leaf"].as_str().unwrap()).unwrap())
        })
        .collect();
    assert!(leaves.len() as u64 >= c2.size);
    assert_eq!(leaves[index as usize], stated);
    assert_eq!(
        tree_hash(&leaves[..c1.size as usize]),
        c1.root,
        "root of c1"
    );
    assert_eq!(
        tree_hash(&leaves[..c2.size as usize]),
        c2.root,
        "root of c2"
    );
    let n = c2.size;
    for i in 0..n {
        let r = get(
            &s,
            None,
            &format!("audit/proof/inclusion?index={i}&size={n}"),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let proof = proof_of(&r);
        verify_inclusion(i, n, leaves[i as usize], &proof, &c2.root)
            .unwrap_or_else(|e| panic!("inclusion of {i} in {n}: {e}"));
        // The check here is not vacuous: another leaf, another index or
        // another root does not pass.
        let mut wrong = leaves[i as usize];
        wrong[31] ^= 1;
        assert!(verify_inclusion(i, n, wrong, &proof, &c2.root).is_err());
        assert!(verify_inclusion(i, n, leaves[i as usize], &proof, &c1.root).is_err());
        if n > 1 {
            let j = (i + 1) % n;
            assert!(verify_inclusion(j, n, leaves[i as usize], &proof, &c2.root).is_err());
        }
    }
    for m in 1..=n {
        let r = get(
            &s,
            None,
            &format!("audit/proof/consistency?from={m}&to={n}"),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let old = tree_hash(&leaves[..m as usize]);
        let proof = proof_of(&r);
        verify_consistency(m, n, &old, &c2.root, &proof)
            .unwrap_or_else(|e| panic!("consistency {m} → {n}: {e}"));
        if m < n {
            let mut wrong = old;
            wrong[31] ^= 1;
            assert!(verify_consistency(m, n, &wrong, &c2.root, &proof).is_err());
            assert!(verify_consistency(m, n, &old, &c1.root, &proof).is_err());
        }
    }
    let r = get(
        &s,
        None,
        &format!("audit/proof/inclusion?index={n}&size={n}"),
    )
    .await;
    assert_eq!(
        r.status, 400,
        "no proof for a leaf outside the tree: {}",
        r.text
    );

    // Only auditors read the trail; nobody writes it.
    let gp = create(&s, &sys, practitioner("Reader")).await;
    let doctor = s.add_user("dr.curious", "physician", &[("--practitioner", &gp)]);
    let dt = doctor.token(&s.base, USER_SCOPE).await;
    let pat = s.add_user("pat.curious", "patient", &[("--patient", &pid)]);
    let pt = pat.token(&s.base, PATIENT_SCOPE).await;
    for (who, t) in [("a physician", &dt), ("a patient", &pt)] {
        for path in [
            format!("AuditEvent?patient={pid}"),
            format!("AuditEvent/{index}"),
            "AuditEvent/$export".to_string(),
            "audit/entries".to_string(),
        ] {
            let r = get(&s, Some(t), &path).await;
            assert_eq!(r.status, 403, "{who} GET /{path}: {}", r.text);
            assert!(is_outcome(&r.body), "{}", r.text);
        }
    }
    assert_eq!(get(&s, None, "AuditEvent").await.status, 401);
    let forged_event = json!({"resourceType": "AuditEvent", "action": "R", "outcome": "0"});
    for (method, path) in [
        ("POST", "AuditEvent".to_string()),
        ("PUT", format!("AuditEvent/{index}")),
        ("DELETE", format!("AuditEvent/{index}")),
    ] {
        for t in [&sys, &at] {
            let body = (method != "DELETE").then(|| forged_event.clone());
            let r = s.call(Some(t), method, &path, body, &[]).await;
            assert_eq!(r.status, 405, "{method} /{path}: {}", r.text);
        }
    }
    let r = get(&s, Some(&at), &format!("AuditEvent/{index}")).await;
    assert_eq!(log_position(&r.body).1, leaf, "the event is unchanged");

    // The whole log verifies offline.
    s.terminate();
    let out = assert_verified(&verify_dir(&s.dir, &key, None), "the untouched log");
    assert!(out.contains("entries"), "{out}");
}

// ===================================================================== 2

/// A patient sees who opened their record — the system client that created
/// it, their general practitioner, an emergency physician who broke the
/// glass (with the stated reason) — and cannot see anyone else's report.
/// The log as C2SP `tlog-tiles`: a client holding only a signed checkpoint
/// fetches Merkle tiles and entry bundles and checks them with `tlog_tiles`
/// (Go sumdb's tile client, ported): every tile it reads is authenticated
/// against the checkpoint's root, a leaf's inclusion proof computed from
/// tiles alone checks out, and every entry of a bundle hashes to its place
/// in the level-0 tiles. Tiles are for readers of the trail only.
#[tokio::test]
async fn the_log_is_served_as_tlog_tiles() {
    let s = Server::start_with_config(&audit_config(None));
    let auditor = s.add_user("auditor.tiles", "auditor", &[]);
    let at = auditor.token(&s.base, AUDITOR_SCOPE).await;
    // More than one full tile of entries, and a partial one.
    anonymous_requests(&s, 300).await;
    let note = get(&s, None, "audit/tlog/checkpoint").await;
    assert_eq!(note.status, 200, "{}", note.text);
    let cp = parse_checkpoint(&note.text);
    let key = get(&s, None, "audit/public-key").await.text;
    verify_checkpoint_signature(&cp, &key).unwrap();
    assert!(cp.size > 256, "{}", note.text);

    let http = support::http();
    let fetch = |path: String, token: Option<String>| {
        let (http, url) = (http.clone(), s.url(&format!("audit/tlog/{path}")));
        async move {
            let mut req = http.get(url);
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            let cache = r
                .headers()
                .get("cache-control")
                .map(|v| v.to_str().unwrap().to_string());
            (status, cache, r.bytes().await.unwrap().to_vec())
        }
    };
    // Every tile of the checkpoint's tree (levels 0 and 1), by C2SP path.
    let mut tiles: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for level in 0..2u32 {
        let hashes = cp.size >> (8 * level);
        for n in 0..hashes.div_ceil(256) {
            let width = (hashes - n * 256).min(256);
            let mut path = format!("tile/{level}/{n:03}");
            if width < 256 {
                path.push_str(&format!(".p/{width}"));
            }
            let (status, cache, body) = fetch(path.clone(), Some(at.clone())).await;
            assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
            assert_eq!(body.len() as u64, width * 32, "{path}");
            let immutable = cache.as_deref().is_some_and(|c| c.contains("immutable"));
            assert_eq!(immutable, width == 256, "{path}: {cache:?}");
            tiles.insert(path, body);
        }
    }
    struct Fetched<'a>(&'a BTreeMap<String, Vec<u8>>);
    impl tlog_tiles::TileReader for Fetched<'_> {
        fn height(&self) -> u8 {
            8
        }
        fn read_tiles(
            &self,
            wanted: &[tlog_tiles::Tile],
        ) -> Result<Vec<Vec<u8>>, tlog_tiles::tlog::Error> {
            // The library's sumdb paths (`tile/8/L/N`) as C2SP paths (`tile/L/N`).
            wanted
                .iter()
                .map(|t| {
                    let path = t.path().replacen("tile/8/", "tile/", 1);
                    self.0
                        .get(&path)
                        .cloned()
                        .ok_or(tlog_tiles::tlog::Error::IndexesNotInTree)
                })
                .collect()
        }
        fn save_tiles(&self, _: &[tlog_tiles::Tile], _: &[Vec<u8>]) {}
    }
    let fetched = Fetched(&tiles);
    let reader = tlog_tiles::TileHashReader::new(cp.size, tlog_tiles::Hash(cp.root), &fetched);
    assert_eq!(
        tlog_tiles::tree_hash(cp.size, &reader).unwrap().0,
        cp.root,
        "the tiles hash to the checkpoint's root"
    );
    let index = 256;
    let proof = tlog_tiles::prove_record(cp.size, index, &reader).unwrap();
    let (status, _, bundle) = fetch("tile/entries/000".into(), Some(at.clone())).await;
    assert_eq!(status, 200);
    let mut leaves = Vec::new();
    let mut rest = bundle.as_slice();
    while !rest.is_empty() {
        let len = u16::from_be_bytes([rest[0], rest[1]]) as usize;
        leaves.push(rest[2..2 + len].to_vec());
        rest = &rest[2 + len..];
    }
    assert_eq!(leaves.len(), 256, "a full bundle holds 256 entries");
    for (i, leaf) in leaves.iter().enumerate() {
        assert_eq!(
            leaf_hash(leaf),
            tiles["tile/0/000"][i * 32..(i + 1) * 32],
            "entry {i} hashes to its place in the level-0 tile"
        );
    }
    let (status, _, partial) = fetch(
        format!("tile/entries/001.p/{}", cp.size - 256),
        Some(at.clone()),
    )
    .await;
    assert_eq!(status, 200);
    let leaf = &partial[2..2 + u16::from_be_bytes([partial[0], partial[1]]) as usize];
    tlog_tiles::check_record(
        &proof,
        cp.size,
        tlog_tiles::Hash(cp.root),
        index,
        tlog_tiles::record_hash(leaf),
    )
    .unwrap_or_else(|e| panic!("entry {index} is not proven by the tiles: {e}"));

    // What is not a tile of this tree (it holds a few hundred entries, and
    // grows by one per request here), or not a tile at all: 404, not an error.
    for path in [
        "tile/entries/009".to_string(),
        "tile/0/009".into(),
        "tile/1/000.p/9".into(),
        "tile/0/000.p/0".into(),
        "tile/64/000".into(),
        "tile/entries/x/1".into(),
    ] {
        let (status, _, body) = fetch(path.clone(), Some(at.clone())).await;
        assert_eq!(status, 404, "{path}: {}", String::from_utf8_lossy(&body));
    }
    // Only readers of the trail get tiles.
    assert_eq!(fetch("tile/0/000".into(), None).await.0, 401);
    let clerk = s.add_user("clerk.tiles", "registration-clerk", &[]);
    let ct = clerk.token(&s.base, USER_SCOPE).await;
    assert_eq!(fetch("tile/0/000".into(), Some(ct)).await.0, 403);
}

#[tokio::test]
async fn patient_access_report() {
    let mut s = Server::start();
    let sys = s.sign_in_system().await;
    let gp = create(&s, &sys, practitioner("Family")).await;
    let er = create(&s, &sys, practitioner("Emergency")).await;
    let a = create(&s, &sys, patient("Alpha", Some(&gp))).await;
    let b = create(&s, &sys, patient("Beta", None)).await;
    let obs = create(&s, &sys, observation(&a)).await;
    assert_eq!(
        get(&s, Some(&sys), &format!("Patient/{a}")).await.status,
        200
    );

    let dr_gp = s.add_user("dr.family", "physician", &[("--practitioner", &gp)]);
    let dr_er = s.add_user("dr.emergency", "physician", &[("--practitioner", &er)]);
    let tgp = dr_gp.token(&s.base, USER_SCOPE).await;
    let ter = dr_er.token(&s.base, USER_SCOPE).await;
    let r = get(&s, Some(&tgp), &format!("Patient/{a}")).await;
    assert_eq!(r.status, 200, "the general practitioner: {}", r.text);
    let r = get(&s, Some(&ter), &format!("Patient/{a}")).await;
    assert_eq!(r.status, 403, "no relationship: {}", r.text);
    let reason = "unconscious patient brought to the emergency department";
    let r = s
        .call(
            Some(&ter),
            "GET",
            &format!("Patient/{a}"),
            None,
            &[("X-Break-Glass-Reason", reason)],
        )
        .await;
    assert_eq!(r.status, 200, "breaking the glass: {}", r.text);
    let r = get(&s, Some(&ter), &format!("Observation/{obs}")).await;
    assert_eq!(r.status, 200, "the grant covers the record: {}", r.text);

    let pat = s.add_user("pat.alpha", "patient", &[("--patient", &a)]);
    let pt = pat.token(&s.base, PATIENT_SCOPE).await;
    let r = get(&s, Some(&pt), &format!("Patient/{a}/$access-report")).await;
    assert_eq!(r.status, 200, "the patient's own report: {}", r.text);
    assert_eq!(r.body["resourceType"], "Parameters", "{}", r.text);
    let param = |name: &str| -> Value {
        r.body["parameter"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("parameter {name}: {}", r.text))
    };
    assert_eq!(
        param("patient")["valueReference"]["reference"],
        format!("Patient/{a}")
    );
    let disclosures: Vec<Value> =
        serde_json::from_str(param("disclosures")["valueString"].as_str().unwrap())
            .expect("disclosures are a JSON array");
    let listing = serde_json::to_string_pretty(&disclosures).unwrap();
    let by =
        |who: &str| -> Vec<&Value> { disclosures.iter().filter(|d| d["who"] == who).collect() };

    let system = by(SYSTEM_CLIENT);
    assert!(
        system
            .iter()
            .filter(|d| d["action"] == "C" && d["outcome"] == 0)
            .count()
            >= 2,
        "the system client's creates of the Patient and its Observation: {listing}"
    );
    assert!(
        system
            .iter()
            .any(|d| d["action"] == "R" && d["interaction"] == "read" && d["outcome"] == 0),
        "the system client's read: {listing}"
    );
    let family = by("dr.family");
    assert!(
        family.iter().any(|d| d["interaction"] == "read"
            && d["outcome"] == 0
            && d["role"] == "physician"
            && d["rule"]
                .as_str()
                .is_some_and(|r| r.contains("general-practitioner"))
            && d.get("breakGlassReason").is_none()),
        "the general practitioner's read: {listing}"
    );
    let emergency = by("dr.emergency");
    let glass = emergency
        .iter()
        .find(|d| d["breakGlassReason"] == reason)
        .unwrap_or_else(|| panic!("the break-glass read with its reason: {listing}"));
    assert_eq!(glass["outcome"], 0, "{glass}");
    assert_eq!(glass["interaction"], "read", "{glass}");
    assert_eq!(glass["fhirUser"], format!("Practitioner/{er}"), "{glass}");
    assert!(
        glass["rule"]
            .as_str()
            .is_some_and(|r| r.contains("break-glass")),
        "{glass}"
    );
    assert!(
        emergency
            .iter()
            .any(|d| d["outcome"] == 4 && d.get("breakGlassReason").is_none()),
        "the refused attempt before breaking the glass is disclosed too: {listing}"
    );
    // Each line of the report is a leaf of the provable log.
    let auditor = s.add_user("auditor.two", "auditor", &[]);
    let at = auditor.token(&s.base, AUDITOR_SCOPE).await;
    let glass_index = glass["index"].as_u64().unwrap();
    let r = get(&s, Some(&at), &format!("AuditEvent/{glass_index}")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let (_, _, hash) = log_position(&r.body);
    assert_eq!(glass["leafHash"], B64.encode(hash), "{glass}");
    assert_eq!(
        r.body["agent"][0]["purposeOfUse"][0]["text"], reason,
        "the AuditEvent carries the reason: {}",
        r.text
    );
    // Nothing about Beta alone is in Alpha's report.
    let r = get(&s, Some(&at), &format!("AuditEvent?patient={b}")).await;
    let beta: BTreeSet<u64> = events(&r.body).iter().map(|e| log_position(e).0).collect();
    assert!(!beta.is_empty(), "Beta's create is recorded: {}", r.text);
    let alpha: BTreeSet<u64> = disclosures
        .iter()
        .map(|d| d["index"].as_u64().unwrap())
        .collect();
    assert!(
        alpha.is_disjoint(&beta),
        "Alpha's report lists Beta's events: {listing}"
    );

    // Not another patient's report; not for the physician either.
    let r = get(&s, Some(&pt), &format!("Patient/{b}/$access-report")).await;
    assert!(
        r.status == 403 || r.status == 404,
        "a patient asking for another patient's report: {} {}",
        r.status,
        r.text
    );
    assert!(!r.text.contains("disclosures"), "{}", r.text);
    let r = get(&s, Some(&tgp), &format!("Patient/{a}/$access-report")).await;
    assert_eq!(r.status, 403, "a physician asking for a report: {}", r.text);
    let r = get(&s, None, &format!("Patient/{a}/$access-report")).await;
    assert_eq!(r.status, 401, "{}", r.text);
    let r = get(&s, Some(&at), &format!("Patient/{b}/$access-report")).await;
    assert_eq!(
        r.status, 200,
        "an auditor may ask for anyone's report: {}",
        r.text
    );
}

// ===================================================================== 3

/// Tampering with a stopped server's log is detected by `custos audit
/// verify` and the first bad entry is named. Each case works on its own
/// copy of the same data dir.
#[tokio::test]
async fn tamper_is_detected_and_named() {
    let witness_dir = tempfile::tempdir().unwrap();
    let witness = witness_dir.path().join("witness.log");
    // No timer checkpoints: the checkpoints are where this test puts them.
    let mut s = Server::start_with_config(&audit_config(Some(&witness)));
    let sys = s.sign_in_system().await;
    let mut ids = Vec::new();
    for i in 0..4 {
        let p = create(&s, &sys, patient(&format!("Tamper{i}"), None)).await;
        create(&s, &sys, observation(&p)).await;
        ids.push(p);
    }
    for p in &ids {
        assert_eq!(
            get(&s, Some(&sys), &format!("Patient/{p}")).await.status,
            200
        );
        assert_eq!(get(&s, None, &format!("Patient/{p}")).await.status, 401);
    }
    // A checkpoint in the middle of the log (after entry 12).
    assert!(
        entry_count(&s.dir) > 13,
        "enough entries before the middle checkpoint"
    );
    let mid = parse_checkpoint(&get(&s, None, "audit/checkpoint").await.text);
    for p in &ids {
        let r = get(&s, Some(&sys), &format!("Observation?subject=Patient/{p}")).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(
            get(&s, Some(&sys), &format!("Patient/{p}")).await.status,
            200
        );
    }
    s.terminate();
    let orig = s.dir.clone();
    let key = public_key(&orig);
    let size = entry_count(&orig);
    let cps = stored_checkpoint_sizes(&orig);
    assert!(size >= 30, "about 30 requests were made: {size} entries");
    assert_eq!(
        cps.last(),
        Some(&size),
        "the final checkpoint covers the log: {cps:?}"
    );
    assert!(cps.contains(&mid.size), "{cps:?}");
    // The largest checkpoint at or below an index: where trust ends when a
    // change there is only caught by a checkpoint's root.
    let cp_at_or_below = |i: u64| cps.iter().copied().filter(|&c| c <= i).max().unwrap_or(0);

    let out = assert_verified(&verify_dir(&orig, &key, None), "the untouched log");
    assert!(out.contains(&format!("{size} entries")), "{out}");
    assert_verified(
        &verify(&[
            "--data-dir",
            orig.to_str().unwrap(),
            "--public-key",
            &key,
            "--decode",
        ]),
        "the untouched log, decoded",
    );
    assert_verified(&verify_dir(&orig, &key, Some(&witness)), "with its witness");

    let work = tempfile::tempdir().unwrap();
    let copy = |name: &str| -> PathBuf {
        let d = work.path().join(name);
        copy_dir(&orig, &d);
        d
    };
    let untouched = copy("untouched");
    assert_verified(&verify_dir(&untouched, &key, None), "an untouched copy");

    // (a) One flipped byte in entry 7.
    let d = copy("flip");
    let conn = db(&d);
    let mut data: Vec<u8> = conn
        .query_row("SELECT data FROM audit_log WHERE idx = 7", [], |r| r.get(0))
        .unwrap();
    let last = data.len() - 1;
    data[last] ^= 0x01;
    conn.execute("UPDATE audit_log SET data = ?1 WHERE idx = 7", [&data])
        .unwrap();
    drop(conn);
    let (index, msg) = assert_failed(verify_dir(&d, &key, None), "a flipped byte in entry 7");
    assert_eq!(index, 7, "{msg}");

    // (a') The same, with the stored leaf hash recomputed to match: the
    // signed checkpoint's root still catches it.
    let conn = db(&d);
    conn.execute(
        "UPDATE audit_hash SET hash = ?1 WHERE n = ?2",
        rusqlite::params![
            &leaf_hash(&data)[..],
            tlog_tiles::stored_hash_index(0, 7) as i64
        ],
    )
    .unwrap();
    drop(conn);
    let (index, msg) = assert_failed(
        verify_dir(&d, &key, None),
        "a flipped byte in entry 7 with its leaf hash recomputed",
    );
    assert_eq!(index, cp_at_or_below(7), "checkpoints {cps:?}: {msg}");
    assert!(index <= 7, "{msg}");

    // (b) Entry 5 deleted.
    let d = copy("delete");
    db(&d)
        .execute("DELETE FROM audit_log WHERE idx = 5", [])
        .unwrap();
    let (index, msg) = assert_failed(verify_dir(&d, &key, None), "entry 5 deleted");
    assert_eq!(index, 5, "{msg}");

    // (c) Entries 3 and 9 swapped.
    let d = copy("swap");
    let conn = db(&d);
    let leaf = |i: i64| -> Vec<u8> {
        conn.query_row("SELECT data FROM audit_log WHERE idx = ?1", [i], |r| {
            r.get(0)
        })
        .unwrap()
    };
    let (l3, l9) = (leaf(3), leaf(9));
    assert_ne!(l3, l9);
    conn.execute("UPDATE audit_log SET data = ?1 WHERE idx = 3", [&l9])
        .unwrap();
    conn.execute("UPDATE audit_log SET data = ?1 WHERE idx = 9", [&l3])
        .unwrap();
    drop(conn);
    let (index, msg) = assert_failed(verify_dir(&d, &key, None), "entries 3 and 9 swapped");
    assert_eq!(index, 3, "{msg}");

    // (d) Truncated to 12 entries, then the server restarted on it and
    // the log grown past its old size: the entries from 12 on are not what
    // the log signed.
    let d = copy("truncate");
    truncate_log(&d, 12);
    let mut t = serve_with(&d, &audit_config(None));
    anonymous_requests(&t, size - 12 + 3).await;
    t.terminate();
    let regrown = entry_count(&d);
    assert!(regrown > size, "the log grew back past {size}: {regrown}");
    let (index, msg) = assert_failed(
        verify_dir(&d, &key, None),
        "a log truncated at 12 and re-appended",
    );
    assert!(index <= 12, "names an index at or below 12: {msg}");
    assert_eq!(index, cp_at_or_below(12), "checkpoints {cps:?}: {msg}");
    // Truncated and left so: the missing entries are named.
    let d = copy("truncate-only");
    truncate_log(&d, 12);
    let (index, msg) = assert_failed(verify_dir(&d, &key, None), "a log truncated at 12");
    assert_eq!(index, 12, "{msg}");

    // (e) A stored checkpoint altered (its root changed): its signature no
    // longer verifies; trust ends at the last good checkpoint below it.
    let d = copy("checkpoint");
    let conn = db(&d);
    let rows: Vec<(i64, Vec<u8>)> = conn
        .prepare("SELECT seq, value FROM sys_log WHERE log = 'audit-checkpoint' ORDER BY seq")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let (seq, note) = rows
        .into_iter()
        .find(|(_, n)| parse_checkpoint(&String::from_utf8_lossy(n)).size == mid.size)
        .expect("the middle checkpoint is stored");
    let text = String::from_utf8(note).unwrap();
    let cp = parse_checkpoint(&text);
    assert_eq!(cp.size, mid.size);
    let mut root = cp.root;
    root[0] ^= 0x01;
    let altered = text.replacen(&B64.encode(cp.root), &B64.encode(root), 1);
    assert_ne!(altered, text);
    conn.execute(
        "UPDATE sys_log SET value = ?1 WHERE seq = ?2",
        rusqlite::params![altered.as_bytes(), seq],
    )
    .unwrap();
    drop(conn);
    let (index, msg) = assert_failed(verify_dir(&d, &key, None), "an altered checkpoint");
    let good_below = cps
        .iter()
        .copied()
        .filter(|&c| c < mid.size)
        .max()
        .unwrap_or(0);
    assert_eq!(index, good_below, "checkpoints {cps:?}: {msg}");
    assert!(msg.contains("checkpoint"), "{msg}");

    // (f) The whole log replaced by another deployment's, with that
    // deployment's own signed checkpoints.
    let mut other = Server::start_with_config(&audit_config(None));
    anonymous_requests(&other, 20).await;
    other.terminate();
    let other_key = public_key(&other.dir);
    assert_ne!(other_key, key);
    let d = copy("replaced");
    let conn = db(&d);
    let theirs = other.dir.join("custos.db");
    conn.execute("ATTACH DATABASE ?1 AS other", [theirs.to_str().unwrap()])
        .unwrap();
    let theirs_audit = other.dir.join("custos.db-audit");
    conn.execute(
        "ATTACH DATABASE ?1 AS other_audit",
        [theirs_audit.to_str().unwrap()],
    )
    .unwrap();
    conn.execute_batch(
        "DELETE FROM audit.audit_log; DELETE FROM audit.audit_hash;
         DELETE FROM audit.audit_key_tail; DELETE FROM audit.audit_key_post;
         DELETE FROM sys_log WHERE log = 'audit-checkpoint';
         INSERT INTO audit.audit_log SELECT * FROM other_audit.audit_log;
         INSERT INTO audit.audit_hash SELECT * FROM other_audit.audit_hash;
         INSERT INTO audit.audit_key_tail SELECT * FROM other_audit.audit_key_tail;
         INSERT INTO audit.audit_key_post SELECT * FROM other_audit.audit_key_post;
         INSERT INTO main.sys_log (log, at, value)
             SELECT log, at, value FROM other.sys_log WHERE log = 'audit-checkpoint' ORDER BY seq;
         DETACH DATABASE other; DETACH DATABASE other_audit;",
    )
    .unwrap();
    drop(conn);
    assert_verified(
        &verify_dir(&d, &other_key, None),
        "the replacement is a valid log under its own key",
    );
    let (index, msg) = assert_failed(
        verify_dir(&d, &key, None),
        "a log re-signed with another key",
    );
    assert_eq!(index, 0, "{msg}");
    assert!(msg.contains("checkpoint"), "{msg}");

    // (g) Export, then offline verification of the export.
    let d = copy("export");
    let file = work.path().join("export.ndjson");
    custos_ok(&[
        "audit",
        "export",
        "--data-dir",
        d.to_str().unwrap(),
        "--out",
        file.to_str().unwrap(),
    ]);
    let export_file = file.to_str().unwrap();
    assert_verified(
        &verify(&["--export", export_file, "--public-key", &key]),
        "the export",
    );
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let exported_cps: Vec<u64> = lines
        .iter()
        .filter_map(|l| l["checkpoint"].as_str())
        .map(|n| parse_checkpoint(n).size)
        .collect();
    assert!(
        !exported_cps.is_empty(),
        "the export carries the checkpoints"
    );
    let write_export = |name: &str, lines: &[Value]| -> String {
        let p = work.path().join(name);
        let body: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(&p, body).unwrap();
        p.to_str().unwrap().to_string()
    };
    // A line removed: the missing entry is named.
    let without: Vec<Value> = lines.iter().filter(|l| l["index"] != 10).cloned().collect();
    let f = write_export("without-10.ndjson", &without);
    let (index, msg) = assert_failed(
        verify(&["--export", &f, "--public-key", &key]),
        "an export without entry 10",
    );
    assert_eq!(index, 10, "{msg}");
    // A leaf changed: an export carries no leaf hashes, so the change is
    // caught by the first checkpoint covering it; trust ends at the last
    // checkpoint before it.
    let mut changed = lines.clone();
    let line = changed.iter_mut().find(|l| l["index"] == 10).unwrap();
    let mut leaf = B64.decode(line["leaf"].as_str().unwrap()).unwrap();
    leaf[20] ^= 0x80;
    line["leaf"] = json!(B64.encode(&leaf));
    let f = write_export("changed-10.ndjson", &changed);
    let (index, msg) = assert_failed(
        verify(&["--export", &f, "--public-key", &key]),
        "an export with entry 10 changed",
    );
    let expected = exported_cps
        .iter()
        .copied()
        .filter(|&c| c <= 10)
        .max()
        .unwrap_or(0);
    assert_eq!(
        index, expected,
        "export checkpoints {exported_cps:?}: {msg}"
    );
    // Another key does not verify the export.
    let (index, msg) = assert_failed(
        verify(&["--export", export_file, "--public-key", &other_key]),
        "the export under another key",
    );
    assert_eq!(index, 0, "{msg}");

    // (h) A witness outside the data dir: truncated, re-appended and its
    // stored checkpoints deleted, the log still fails against the witness.
    let d = copy("witnessed");
    truncate_log(&d, 12);
    db(&d)
        .execute("DELETE FROM sys_log WHERE log = 'audit-checkpoint'", [])
        .unwrap();
    let witness_copy = witness_dir.path().join("witness-copy.log");
    std::fs::copy(&witness, &witness_copy).unwrap();
    let witnessed_before = std::fs::read_to_string(&witness_copy).unwrap();
    assert!(
        witnessed_before.contains(&format!("\n{size}\n")),
        "the witness holds the final checkpoint of size {size}:\n{witnessed_before}"
    );
    let mut t = serve_with(&d, &audit_config(Some(&witness_copy)));
    anonymous_requests(&t, size - 12 + 3).await;
    t.terminate();
    if let Verdict::Verified(out) = verify_dir(&d, &key, None) {
        // Expected: without the stored checkpoints the rewritten log is
        // self-consistent; this is what the witness is for.
        eprintln!("without its witness the rewritten log verifies: {out}");
    }
    let (index, msg) = assert_failed(
        verify_dir(&d, &key, Some(&witness_copy)),
        "a rewritten log against its witness",
    );
    assert!(index <= 12, "names an index at or below 12: {msg}");
}

// ===================================================================== 4

/// A server killed with SIGKILL in the middle of concurrent writes and
/// reads, six times over: every create that was acknowledged with 201 (and
/// every read acknowledged with 200) has its AuditEvent, exactly once, and
/// the log still verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_keeps_every_acknowledged_write_audited() {
    const ROUNDS: usize = 6;
    const WORKERS: usize = 4;
    let started = Instant::now();
    let mut s = Server::start();
    let mut token = s.sign_in_system().await;
    let anchor = create(&s, &token, patient("Anchor", None)).await;

    // (resource type, id) acknowledged by 201; reads acknowledged by 200.
    let created: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let read: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let other_status: Arc<Mutex<BTreeMap<u16, u64>>> = Arc::default();
    for round in 0..ROUNDS {
        let mut tasks = Vec::new();
        for w in 0..WORKERS {
            let (base, token, anchor) = (s.base.clone(), token.clone(), anchor.clone());
            let (created, read, other_status) =
                (created.clone(), read.clone(), other_status.clone());
            tasks.push(tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_secs(20))
                    .build()
                    .unwrap();
                for n in 0.. {
                    let resource = if (w + n) % 2 == 0 {
                        patient(&format!("Crash{round}x{w}x{n}"), None)
                    } else {
                        observation(&anchor)
                    };
                    let rtype = resource["resourceType"].as_str().unwrap().to_string();
                    let sent = client
                        .post(format!("{base}/{rtype}"))
                        .bearer_auth(&token)
                        .header("content-type", "application/fhir+json")
                        .body(resource.to_string())
                        .send()
                        .await;
                    // The server is gone: this worker is done.
                    let Ok(resp) = sent else { break };
                    let status = resp.status().as_u16();
                    let Ok(body) = resp.bytes().await else { break };
                    if status != 201 {
                        *other_status.lock().unwrap().entry(status).or_default() += 1;
                        continue;
                    }
                    let v: Value = serde_json::from_slice(&body).expect("a created resource");
                    let id = v["id"].as_str().expect("an id").to_string();
                    created.lock().unwrap().push((rtype.clone(), id.clone()));
                    let Ok(resp) = client
                        .get(format!("{base}/{rtype}/{id}"))
                        .bearer_auth(&token)
                        .send()
                        .await
                    else {
                        break;
                    };
                    let status = resp.status().as_u16();
                    if resp.bytes().await.is_err() {
                        break;
                    }
                    if status == 200 {
                        read.lock().unwrap().push((rtype, id));
                    } else {
                        *other_status.lock().unwrap().entry(status).or_default() += 1;
                    }
                }
            }));
        }
        let delay = 100 + random_u64() % 500;
        tokio::time::sleep(Duration::from_millis(delay)).await;
        s.assert_alive();
        s.stop(); // SIGKILL
        for t in tasks {
            t.await.expect("a worker panicked");
        }
        let dir = s.tmp.take().expect("the server owns its data dir");
        drop(s);
        s = Server::start_in(dir, &[], &[]);
        // Tokens name the server's address as their issuer: a new port, a new token.
        token = s.sign_in_system().await;
    }
    let created = created.lock().unwrap().clone();
    let read = read.lock().unwrap().clone();
    eprintln!(
        "{} creates and {} reads acknowledged over {ROUNDS} crashes; other statuses {:?}",
        created.len(),
        read.len(),
        other_status.lock().unwrap()
    );
    assert!(!created.is_empty(), "no create was acknowledged at all");

    // Every acknowledged create is durable.
    for (rtype, id) in &created {
        let r = get(&s, Some(&token), &format!("{rtype}/{id}")).await;
        assert_eq!(
            r.status, 200,
            "acknowledged {rtype}/{id} is gone: {}",
            r.text
        );
    }
    s.terminate();

    // Every acknowledged request has its event, exactly once.
    let file = tempfile::NamedTempFile::new().unwrap();
    let dir = s.data();
    custos_ok(&[
        "audit",
        "export",
        "--fhir",
        "--data-dir",
        &dir,
        "--out",
        file.path().to_str().unwrap(),
    ]);
    let mut creates: BTreeMap<String, u32> = BTreeMap::new();
    let mut reads: BTreeMap<String, u32> = BTreeMap::new();
    for line in std::fs::read_to_string(file.path()).unwrap().lines() {
        let ev: Value = serde_json::from_str(line).expect("NDJSON AuditEvents");
        if ev["outcome"] != "0" {
            continue;
        }
        let tally = match (ev["action"].as_str(), subtype(&ev)) {
            (Some("C"), Some("create")) => &mut creates,
            (Some("R"), Some("read")) => &mut reads,
            _ => continue,
        };
        let distinct: BTreeSet<String> = whats(&ev).into_iter().collect();
        for w in distinct {
            *tally.entry(w).or_default() += 1;
        }
    }
    for (rtype, id) in &created {
        let what = format!("{rtype}/{id}/_history/1");
        assert_eq!(
            creates.get(&what).copied().unwrap_or(0),
            1,
            "the acknowledged create of {rtype}/{id} has exactly one AuditEvent"
        );
    }
    for (rtype, id) in &read {
        let what = format!("{rtype}/{id}");
        assert!(
            reads.get(&what).copied().unwrap_or(0) >= 1,
            "the acknowledged read of {what} has no AuditEvent"
        );
    }

    let key = public_key(&s.dir);
    let out = assert_verified(&verify_dir(&s.dir, &key, None), "the log after six crashes");
    assert_verified(
        &verify(&["--data-dir", &dir, "--public-key", &key, "--decode"]),
        "the log after six crashes, decoded",
    );
    eprintln!("{out}took {:?}", started.elapsed());
}
