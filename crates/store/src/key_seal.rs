//! Sealing the audit key index off the commit path (SQLite backend).
//!
//! An append leaves an event's agent token and its one patient's token in
//! its own `audit_log` row (`agent`, `patient`), and the tokens of an event
//! of several patients in `audit_key_tail` (see `AUDIT_SCHEMA` in
//! `sqlite.rs`). Once a block of [`KEY_BLOCK`] events is full, its tokens
//! become postings in `audit_key_post`, one row per (kind, token, block).
//!
//! Doing that inside the append that fills the block stalled every request
//! waiting on that group commit: reading the block back (16,000 rows) and
//! writing its postings took about 4 ms, once per 8,192 events, which
//! alone raised the read benchmark's p99 by 1 to 2 ms. So the writer keeps
//! the block's postings in memory as its appends commit
//! ([`KeySealer::committed`]), and writes a full block's postings one step
//! per group commit (or in commits of their own while no job waits). A step
//! is a bounded piece of work: at most [`POSTINGS_PER_STEP`] postings or
//! [`TAIL_ROWS_PER_STEP`] tail rows.
//!
//! Lookups stay exact throughout, because nothing is removed before what
//! replaces it has committed: lookups scan the log's rows from
//! `audit_key_sealed.through` on, which moves past a block only with its
//! last postings, and the tail's rows go only after that (meanwhile a
//! lookup may see an event twice, which it treats as one). The memory is
//! only a cache of what the log and the tail hold: [`KeySealer::recover`]
//! rebuilds it from them when the store opens, so a crash loses no index
//! entry, and postings written twice merge into one (see `put_posting`).
use std::collections::{HashMap, VecDeque};

use rusqlite::{Connection, OptionalExtension, params};

use crate::model::{StoreError, StoreResult};
use crate::sqlite::{KEY_AGENT, KEY_BLOCK, KEY_PATIENT, backend_err, put_posting};

const _: () = assert!(KEY_PATIENT == 0 && KEY_AGENT == 1, "kinds index `Postings`");

/// Postings written by one step at most.
const POSTINGS_PER_STEP: usize = 8;
/// Tail rows deleted by one step at most.
const TAIL_ROWS_PER_STEP: i64 = 256;

/// Each kind's tokens (patients, agents) with their events in one block,
/// as offsets from the block's start.
type Postings = [HashMap<String, Vec<i64>>; 2];

/// A full block whose postings are not all written yet.
struct BlockSeal {
    block: i64,
    /// Sorted by (kind, token): neighbours in `audit_key_post`'s key.
    postings: Vec<(i64, String, Vec<i64>)>,
    /// How many of `postings` are written.
    written: usize,
    /// Whether `audit_key_sealed.through` is past this block.
    through: bool,
    /// The last `audit_key_tail` rowid of the block's events (rows are
    /// appended in index order, so every row up to it belongs to this
    /// block or an earlier one).
    tail_last: Option<i64>,
}

/// The writer's state of the key index seal (see the module documentation).
pub(crate) struct KeySealer {
    /// The block being filled and its postings so far.
    block: i64,
    filling: Postings,
    filling_tail_last: Option<i64>,
    /// Full blocks, oldest first.
    queue: VecDeque<BlockSeal>,
    /// A step failed or its transaction did not commit: the state is
    /// rebuilt from the database after it ([`KeySealer::recover`]).
    stale: bool,
    /// Set when the state could not be rebuilt: then nothing is sealed (and
    /// no tail row removed) until a restart; lookups stay exact, only slower.
    disabled: bool,
}

impl KeySealer {
    /// Rebuild the state from the database: the full blocks from
    /// `audit_key_sealed.through` on, and the block being filled. A data dir
    /// of an earlier version (which sealed each block as it filled) has no
    /// `through`: every full block is sealed there. Run outside a transaction.
    pub(crate) fn recover(conn: &Connection) -> KeySealer {
        match Self::try_recover(conn) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "the audit key index state could not be rebuilt; blocks stay unsealed until a restart (lookups still work, more slowly)");
                KeySealer {
                    block: 0,
                    filling: Postings::default(),
                    filling_tail_last: None,
                    queue: VecDeque::new(),
                    stale: false,
                    disabled: true,
                }
            }
        }
    }

    fn try_recover(conn: &Connection) -> StoreResult<KeySealer> {
        let size: i64 = conn
            .query_row(
                "SELECT COALESCE(MAX(idx) + 1, 0) FROM audit.audit_log",
                [],
                |r| r.get(0),
            )
            .map_err(backend_err)?;
        let current = size / KEY_BLOCK;
        let stored: Option<i64> = conn
            .query_row("SELECT through FROM audit.audit_key_sealed", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(backend_err)?;
        // Never past the log's full blocks (a log cut back by hand).
        let through = stored
            .map(|t| t.div_euclid(KEY_BLOCK) * KEY_BLOCK)
            .unwrap_or(current * KEY_BLOCK)
            .clamp(0, current * KEY_BLOCK);
        if stored != Some(through) {
            set_through(conn, through)?;
        }
        let mut queue = VecDeque::new();
        // Tail rows of sealed blocks (a seal stopped after its postings).
        let leftover: Option<i64> = conn
            .query_row(
                "SELECT MAX(rowid) FROM audit.audit_key_tail WHERE idx < ?1",
                [through],
                |r| r.get(0),
            )
            .map_err(backend_err)?;
        if leftover.is_some() {
            let mut cleanup =
                BlockSeal::new(through / KEY_BLOCK - 1, Postings::default(), leftover);
            cleanup.through = true;
            queue.push_back(cleanup);
        }
        for block in through / KEY_BLOCK..current {
            let (postings, tail_last) = read_block(conn, block)?;
            queue.push_back(BlockSeal::new(block, postings, tail_last));
        }
        let (filling, filling_tail_last) = read_block(conn, current)?;
        Ok(KeySealer {
            block: current,
            filling,
            filling_tail_last,
            queue,
            stale: false,
            disabled: false,
        })
    }

    /// Whether a full block waits to be sealed.
    pub(crate) fn has_work(&self) -> bool {
        !self.disabled && !self.stale && !self.queue.is_empty()
    }

    /// Whether more than one full block waits (then a commit takes steps
    /// until one is left, so that the seal never falls further behind).
    pub(crate) fn behind(&self) -> bool {
        self.has_work() && self.queue.len() > 1
    }

    /// Take in a committed event: its index, agent token, patient tokens and
    /// the rowid of its last tail row.
    pub(crate) fn committed(
        &mut self,
        idx: u64,
        agent: Option<&str>,
        patients: &[String],
        tail_rowid: Option<i64>,
    ) {
        if self.disabled || self.stale {
            return;
        }
        let idx = idx as i64;
        let block = idx / KEY_BLOCK;
        if block != self.block {
            if block < self.block {
                // Not in this writer's order: rebuild from what committed.
                self.stale = true;
                return;
            }
            let postings = std::mem::take(&mut self.filling);
            let tail_last = self.filling_tail_last.take();
            self.queue
                .push_back(BlockSeal::new(self.block, postings, tail_last));
            self.block = block;
        }
        let offset = idx - block * KEY_BLOCK;
        let tokens = agent
            .map(|a| (KEY_AGENT, a))
            .into_iter()
            .chain(patients.iter().map(|p| (KEY_PATIENT, p.as_str())));
        for (kind, token) in tokens {
            let map = &mut self.filling[kind as usize];
            match map.get_mut(token) {
                Some(v) => v.push(offset),
                None => {
                    map.insert(token.to_string(), vec![offset]);
                }
            }
        }
        if tail_rowid.is_some() {
            self.filling_tail_last = tail_rowid;
        }
    }

    /// Do the next step of the oldest full block's seal in the open
    /// transaction, and count it done. If the step fails, or its
    /// transaction does not commit, call [`KeySealer::rolled_back`].
    pub(crate) fn step(&mut self, conn: &Connection) -> StoreResult<()> {
        if !self.has_work() {
            return Ok(());
        }
        let Some(seal) = self.queue.front_mut() else {
            return Ok(());
        };
        if seal.written < seal.postings.len() {
            let end = (seal.written + POSTINGS_PER_STEP).min(seal.postings.len());
            for (kind, key, offsets) in &seal.postings[seal.written..end] {
                put_posting(conn, *kind, key, seal.block, offsets)?;
            }
            seal.written = end;
            if end < seal.postings.len() {
                return Ok(());
            }
        }
        if !seal.through {
            // Agents of this block are now in postings: lookups stop
            // scanning its log rows.
            set_through(conn, (seal.block + 1) * KEY_BLOCK)?;
            seal.through = true;
            return Ok(());
        }
        let deleted = match seal.tail_last {
            Some(last) => conn
                .prepare_cached(
                    "DELETE FROM audit.audit_key_tail WHERE rowid IN \
                     (SELECT rowid FROM audit.audit_key_tail WHERE rowid <= ?1 ORDER BY rowid LIMIT ?2)",
                )
                .and_then(|mut s| s.execute(params![last, TAIL_ROWS_PER_STEP]))
                .map_err(backend_err)? as i64,
            None => 0,
        };
        if deleted < TAIL_ROWS_PER_STEP {
            self.queue.pop_front();
        }
        Ok(())
    }

    /// The transaction of the steps taken since the last commit did not
    /// commit: rebuild from the database once it is out of that transaction.
    pub(crate) fn rolled_back(&mut self) {
        self.stale = true;
    }

    /// Whether the state must be rebuilt ([`KeySealer::recover`]).
    pub(crate) fn is_stale(&self) -> bool {
        self.stale && !self.disabled
    }
}

impl BlockSeal {
    fn new(block: i64, postings: Postings, tail_last: Option<i64>) -> BlockSeal {
        let mut all: Vec<(i64, String, Vec<i64>)> = Vec::new();
        for (kind, map) in postings.into_iter().enumerate() {
            for (key, mut offsets) in map {
                offsets.sort_unstable();
                offsets.dedup();
                all.push((kind as i64, key, offsets));
            }
        }
        all.sort_unstable_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        BlockSeal {
            block,
            postings: all,
            written: 0,
            through: false,
            tail_last,
        }
    }
}

fn set_through(conn: &Connection, through: i64) -> StoreResult<()> {
    conn.prepare_cached("DELETE FROM audit.audit_key_sealed")
        .and_then(|mut s| s.execute([]))
        .and_then(|_| {
            conn.prepare_cached("INSERT INTO audit.audit_key_sealed (through) VALUES (?1)")
        })
        .and_then(|mut s| s.execute([through]))
        .map(drop)
        .map_err(backend_err)
}

/// A block's postings as the tail and the log hold them, with the last
/// tail rowid of its events (a scan of the tail: only when the state is
/// rebuilt).
fn read_block(conn: &Connection, block: i64) -> StoreResult<(Postings, Option<i64>)> {
    let (start, end) = (block * KEY_BLOCK, (block + 1) * KEY_BLOCK);
    let mut postings = Postings::default();
    let mut tail_last = None;
    let mut stmt = conn
        .prepare(&format!(
            "SELECT kind, key, idx, rowid FROM audit.audit_key_tail WHERE idx >= ?1 AND idx < ?2 \
             UNION ALL SELECT {KEY_AGENT}, agent, idx, NULL FROM audit.audit_log \
             WHERE idx >= ?1 AND idx < ?2 AND agent IS NOT NULL \
             UNION ALL SELECT {KEY_PATIENT}, patient, idx, NULL FROM audit.audit_log \
             WHERE idx >= ?1 AND idx < ?2 AND patient IS NOT NULL"
        ))
        .map_err(backend_err)?;
    let mut rows = stmt.query([start, end]).map_err(backend_err)?;
    while let Some(r) = rows.next().map_err(backend_err)? {
        let kind: i64 = r.get(0).map_err(backend_err)?;
        let key: String = r.get(1).map_err(backend_err)?;
        let idx: i64 = r.get(2).map_err(backend_err)?;
        let rowid: Option<i64> = r.get(3).map_err(backend_err)?;
        let Some(map) = postings.get_mut(kind as usize).filter(|_| kind >= 0) else {
            return Err(StoreError::Backend(format!(
                "audit key index: unknown kind {kind} at index {idx}"
            )));
        };
        map.entry(key).or_default().push(idx - start);
        tail_last = tail_last.max(rowid);
    }
    Ok((postings, tail_last))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::sqlite::{AppendCache, append_audit, keyed_indexes};
    use crate::{AuditAppend, SqliteConfig, SqliteStore};

    /// Event `i`'s agent and patients.
    fn tokens(i: u64) -> (String, Vec<String>) {
        let mut patients = vec![format!("p{}", i % 50)];
        if i.is_multiple_of(7) {
            patients.push("q".into());
        }
        (format!("a{}", i % 3), patients)
    }

    fn expected(kind: i64, token: &str, n: u64) -> BTreeSet<i64> {
        (0..n)
            .filter(|&i| {
                let (a, ps) = tokens(i);
                if kind == KEY_AGENT {
                    a == token
                } else {
                    ps.iter().any(|p| p == token)
                }
            })
            .map(|i| i as i64)
            .collect()
    }

    fn found(conn: &Connection, kind: i64, token: &str) -> BTreeSet<i64> {
        let sql = format!("SELECT * FROM ({})", keyed_indexes(kind, 1));
        let mut stmt = conn.prepare(&sql).unwrap();
        stmt.query_map([token], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// Append events `from..to`, 64 a commit, telling the sealer of each.
    fn append(conn: &Connection, sealer: &mut KeySealer, from: u64, to: u64) {
        let mut i = from;
        while i < to {
            conn.execute_batch("BEGIN IMMEDIATE").unwrap();
            let mut cache = AppendCache::default();
            let mut done = Vec::new();
            for j in i..(i + 64).min(to) {
                let (agent, patients) = tokens(j);
                let (n, tail) = append_audit(
                    conn,
                    &mut cache,
                    &AuditAppend {
                        at: j as i64,
                        action: "R",
                        outcome: 0,
                        agent: Some(&agent),
                        patients: &patients,
                        data: &j.to_be_bytes(),
                    },
                )
                .unwrap();
                assert_eq!(n, j);
                done.push((n, agent, patients, tail));
            }
            conn.execute_batch("COMMIT").unwrap();
            for (n, agent, patients, tail) in &done {
                sealer.committed(*n, Some(agent), patients, *tail);
            }
            i = (i + 64).min(to);
        }
    }

    fn check(conn: &Connection, n: u64) {
        for (kind, token) in [
            (KEY_AGENT, "a0"),
            (KEY_AGENT, "a2"),
            (KEY_PATIENT, "p7"),
            (KEY_PATIENT, "q"),
        ] {
            assert_eq!(
                found(conn, kind, token),
                expected(kind, token, n),
                "{token}"
            );
        }
    }

    /// The seal of a full block goes step by step, each in its own commit;
    /// after every one of them lookups find exactly the events they should.
    /// Twice, the writer's memory is lost (a crash): the state rebuilt from
    /// the database finishes the seal, and it ends with every token's
    /// events of the block in one posting and the block's tail rows gone.
    #[test]
    fn lookups_are_exact_at_every_step_of_a_seal_and_after_a_rebuild() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        SqliteStore::open(SqliteConfig::new(&path)).unwrap().close();
        let conn = Connection::open(&path).unwrap();
        conn.execute(
            "ATTACH DATABASE ?1 AS audit",
            [crate::audit_path(&path).to_str().unwrap()],
        )
        .unwrap();
        let mut sealer = KeySealer::recover(&conn);
        let n = KEY_BLOCK as u64 + 300;
        append(&conn, &mut sealer, 0, n);
        assert!(sealer.has_work(), "block 0 is full");
        check(&conn, n);
        let mut steps = 0;
        while sealer.has_work() {
            conn.execute_batch("BEGIN IMMEDIATE").unwrap();
            sealer.step(&conn).unwrap();
            conn.execute_batch("COMMIT").unwrap();
            steps += 1;
            check(&conn, n);
            if steps == 1 || steps == 3 {
                // The writer's memory is lost: mid-postings, then after them.
                sealer = KeySealer::recover(&conn);
                assert!(sealer.has_work(), "the rebuilt state still seals block 0");
            }
            assert!(steps < 100, "the seal ends");
        }
        assert!(steps > 3, "the seal took steps: {steps}");
        let (through, tail_below, postings): (i64, i64, i64) = conn
            .query_row(
                "SELECT (SELECT through FROM audit.audit_key_sealed), \
                 (SELECT COUNT(*) FROM audit.audit_key_tail WHERE idx < 8192), \
                 (SELECT COUNT(*) FROM audit.audit_key_post WHERE block = 0)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(through, KEY_BLOCK);
        assert_eq!(tail_below, 0, "the sealed block's tail rows are gone");
        assert_eq!(postings, 3 + 50 + 1, "one posting per token of the block");
        let q: String = conn
            .query_row(
                "SELECT offsets FROM audit.audit_key_post WHERE kind = 0 AND key = 'q' AND block = 0",
                [],
                |r| r.get(0),
            )
            .unwrap();
        let q: Vec<i64> = serde_json::from_str(&q).unwrap();
        let want: Vec<i64> = expected(KEY_PATIENT, "q", KEY_BLOCK as u64)
            .into_iter()
            .collect();
        assert_eq!(q, want, "each event once, in order");
        // Appending on: the next block's events are found as well.
        append(&conn, &mut sealer, n, n + 100);
        check(&conn, n + 100);
    }
}
