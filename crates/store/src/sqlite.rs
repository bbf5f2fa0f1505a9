//! The embedded default backend: SQLite in WAL mode.
//!
//! One writer thread owns the only write connection and **group-commits**:
//! it drains every queued write job into one SQLite transaction, each job
//! after the first that succeeds inside its own savepoint, so that a failing
//! job rolls back alone and a burst of small writes costs one commit.
//! A sync thread makes each commit durable and answers its jobs, while the
//! writer goes on with the next (see `Syncer`).
//! Readers use a pool of read-only connections on the blocking thread pool;
//! WAL gives them consistent snapshots while the writer works.
use std::any::Any;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use parking_lot::Mutex;
use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params, params_from_iter};
use tokio::sync::oneshot;

use crate::key_seal::KeySealer;
use crate::model::*;
use crate::{ReadJob, Store, WriteJob};

/// How hard SQLite works to survive power loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Synchronous {
    /// fsync the WAL after every commit, before any of its jobs is answered
    /// (on a thread of its own, see `Syncer`): no acknowledged write is lost
    /// even on power loss.
    #[default]
    Full,
    /// fsync only at checkpoints: survives a process crash, may lose the last
    /// commits on power loss.
    Normal,
}

/// Settings of the SQLite backend.
#[derive(Debug, Clone)]
pub struct SqliteConfig {
    /// The database file (created if missing).
    pub path: PathBuf,
    pub synchronous: Synchronous,
    /// Page cache of the writer connection for the main file, in MiB
    /// (readers get a quarter each).
    pub cache_mib: u32,
    /// Page cache of the writer connection for the audit file, in MiB
    /// (readers get a quarter each). Small on purpose: the audit file is
    /// written at its ends (log, hashes, key tail) and at scattered
    /// posting leaves, so a large cache buys little, while SQLite pays for
    /// one at commit. A B-tree balance that puts sibling pages in order
    /// moves a page through a scratch number past the end of the file (the
    /// lock-byte page, 262,145 with 4 KiB pages); the commit after one
    /// then walks the whole cache to drop pages past the end
    /// (`pcache1TruncateUnsafe`). Posting inserts balance often, and with
    /// the writer's 256 MiB that walk was 5.9 µs of every audited read.
    pub audit_cache_mib: u32,
    /// WAL size past which the writer checkpoints and truncates it (see `writer_loop`).
    pub wal_limit_bytes: u64,
    /// Group commit under load: after a commit of several jobs, the next
    /// commit waits until this long after it for more jobs (see
    /// `writer_loop`); zero commits as soon as no job is waiting.
    pub commit_delay: std::time::Duration,
}

impl SqliteConfig {
    /// Defaults for a database at `path`.
    pub fn new(path: impl Into<PathBuf>) -> SqliteConfig {
        SqliteConfig {
            path: path.into(),
            synchronous: Synchronous::Full,
            cache_mib: 256,
            audit_cache_mib: 16,
            wal_limit_bytes: WAL_LIMIT_BYTES,
            commit_delay: COMMIT_DELAY,
        }
    }
}

type Reply = crate::WriteReply;

/// The SQLite store.
pub struct SqliteStore {
    config: SqliteConfig,
    writer: Mutex<Option<mpsc::Sender<(WriteJob, Reply)>>>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    checkpointer: Mutex<Option<(mpsc::Sender<()>, std::thread::JoinHandle<()>)>>,
    readers: Arc<Mutex<Vec<Connection>>>,
    /// A connection that answers [`Store::sys_version`], with the answers
    /// it last gave.
    versions: Mutex<Option<VersionProbe>>,
    signal: Arc<SysSignal>,
}

/// See [`Store::sys_version`]: the answers last read, and the change
/// signal's value and the time when they were read.
struct VersionProbe {
    conn: Connection,
    signal: u64,
    read_at: std::time::Instant,
    known: Vec<((String, String), i64)>,
}

/// A cross-process change counter for system records: an 8-byte file next
/// to the database (`custos.db-sys`), memory-mapped by every process that
/// opens the store. A write that changes system records increments it after
/// its commit; readers compare one atomic load against the value they saw.
/// (SQLite's own change detection — `PRAGMA data_version` — needs a read
/// transaction, that is file locks, on every check.)
struct SysSignal {
    map: memmap2::MmapMut,
}

impl SysSignal {
    fn open(db: &Path) -> StoreResult<SysSignal> {
        let mut path = db.as_os_str().to_owned();
        path.push("-sys");
        let mut opts = std::fs::OpenOptions::new();
        opts.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let file = opts
            .open(&path)
            .map_err(|e| StoreError::Backend(format!("change signal file: {e}")))?;
        if file.metadata().map(|m| m.len()).unwrap_or(0) < 8 {
            file.set_len(8)
                .map_err(|e| StoreError::Backend(format!("change signal file: {e}")))?;
        }
        // SAFETY: the file is ours (created next to the database, mode
        // 0600) and never truncated below 8 bytes while mapped; it is only
        // accessed through the atomic below.
        let map = unsafe { memmap2::MmapMut::map_mut(&file) }
            .map_err(|e| StoreError::Backend(format!("change signal map: {e}")))?;
        Ok(SysSignal { map })
    }

    fn counter(&self) -> &std::sync::atomic::AtomicU64 {
        // SAFETY: the mapping is page-aligned and at least 8 bytes long, so
        // its start is a valid, aligned AtomicU64 for the mapping's lifetime
        // (tied to &self); other processes touch it only atomically too.
        unsafe { &*(self.map.as_ptr() as *const std::sync::atomic::AtomicU64) }
    }

    fn load(&self) -> u64 {
        self.counter().load(std::sync::atomic::Ordering::Acquire)
    }

    fn bump(&self) {
        self.counter()
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS current (
    rid INTEGER PRIMARY KEY,
    rtype TEXT NOT NULL,
    id TEXT NOT NULL,
    version INTEGER NOT NULL,
    last_updated INTEGER NOT NULL,
    state INTEGER NOT NULL,
    compartment TEXT,
    index_blob BLOB,
    UNIQUE (rtype, id)
);
CREATE INDEX IF NOT EXISTS current_type_updated ON current (rtype, last_updated);
CREATE INDEX IF NOT EXISTS current_compartment ON current (compartment) WHERE compartment IS NOT NULL;
CREATE TABLE IF NOT EXISTS versions (
    seq INTEGER PRIMARY KEY,
    rid INTEGER NOT NULL,
    rtype TEXT NOT NULL,
    version INTEGER NOT NULL,
    last_updated INTEGER NOT NULL,
    state INTEGER NOT NULL,
    key_name TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS versions_rid ON versions (rid, version);
CREATE INDEX IF NOT EXISTS versions_type ON versions (rtype, seq);
CREATE TABLE IF NOT EXISTS idx_token (
    token BLOB NOT NULL,
    rid INTEGER NOT NULL,
    PRIMARY KEY (token, rid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS idx_range (
    pkey INTEGER NOT NULL,
    lo REAL NOT NULL,
    rid INTEGER NOT NULL,
    hi REAL NOT NULL,
    PRIMARY KEY (pkey, lo, rid, hi)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS idx_sort (
    pkey INTEGER NOT NULL,
    rid INTEGER NOT NULL,
    min_lo REAL NOT NULL,
    max_hi REAL NOT NULL,
    PRIMARY KEY (pkey, rid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS data_keys (
    name TEXT PRIMARY KEY,
    kek_id TEXT NOT NULL,
    blob BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS sys (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    version INTEGER NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (kind, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sys_log (
    seq INTEGER PRIMARY KEY,
    log TEXT NOT NULL,
    at INTEGER NOT NULL,
    value BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS sys_log_by_log ON sys_log (log, seq);
-- Write events of changes not yet known to be in the audit log (see
-- `AUDIT_SCHEMA`): inserted in the change's own transaction, removed once
-- the audit file has committed them too.
CREATE TABLE IF NOT EXISTS audit_outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    idx INTEGER NOT NULL,
    at INTEGER NOT NULL,
    action TEXT NOT NULL,
    outcome INTEGER NOT NULL,
    agent TEXT,
    patients TEXT NOT NULL,
    data BLOB NOT NULL
);
INSERT OR IGNORE INTO meta (k, v) VALUES ('schema_version', '1');
"#;

/// The audit log lives in its own database file (`custos.db-audit`),
/// attached to every connection as `audit`. Commits that only append audit
/// events (every read's) then never touch the main file, so readers keep
/// their page cache and memory map: SQLite drops both on any change to a
/// file's WAL. A write's event is appended in the write's transaction to
/// both files; because a WAL-mode commit across two files is atomic per
/// file only, the main file also gets a copy in `audit_outbox` (atomic with
/// the change), and `recover_audit` re-appends any the audit file lacks.
///
/// Events are found by patient and by agent through keyed tokens, indexed
/// in blocks of [`KEY_BLOCK`] events so that an append never inserts at a
/// random place in a B-tree (every such page would be rewritten into the
/// WAL at each group commit, one page per event): an event's agent token
/// and its one patient's token are columns of its own row (`agent`,
/// `patient`); an event of several patients appends their tokens at the end
/// of `audit_key_tail`. Once a block is full, its tokens become the block's
/// postings in `audit_key_post`, written a few at a time beside later group
/// commits (see `key_seal.rs`): one row per (kind, token, block) listing
/// the token's events in that block (as offsets from the block's first
/// index, a JSON array that lookups expand with `json_each`), so a seal
/// writes a row per distinct token, not per event, and a lookup is one
/// range of that table's primary key, plus the tail and the log's rows of
/// the blocks not sealed yet (from `audit_key_sealed.through` on).
/// (Earlier versions kept a row per event and token in `audit_key_run`,
/// and agents in the tail too: the runs become postings at open
/// ([`migrate_key_runs`]); agent rows left in the tail are read and sealed
/// like the rest.)
const AUDIT_SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS audit.audit_log (
    idx INTEGER PRIMARY KEY,
    at INTEGER NOT NULL,
    action TEXT NOT NULL,
    outcome INTEGER NOT NULL,
    agent TEXT,
    data BLOB NOT NULL,
    patient TEXT
);
CREATE INDEX IF NOT EXISTS audit.audit_log_at ON audit_log (at);
DROP INDEX IF EXISTS audit.audit_log_agent;
CREATE TABLE IF NOT EXISTS audit.audit_key_tail (
    idx INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    key TEXT NOT NULL
);
-- Rows of earlier versions (one per event and token); emptied at open.
CREATE TABLE IF NOT EXISTS audit.audit_key_run (
    kind INTEGER NOT NULL,
    block INTEGER NOT NULL,
    key TEXT NOT NULL,
    idx INTEGER NOT NULL,
    PRIMARY KEY (kind, block, key, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS audit.audit_key_post (
    kind INTEGER NOT NULL,
    key TEXT NOT NULL,
    block INTEGER NOT NULL,
    offsets TEXT NOT NULL,
    PRIMARY KEY (kind, key, block)
) WITHOUT ROWID;
-- The keyed index's blocks below `through` are sealed: the tokens of
-- their events' own rows (agent, lone patient) are in postings (see
-- `key_seal.rs`). One row.
CREATE TABLE IF NOT EXISTS audit.audit_key_sealed (
    through INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audit.audit_hash (
    n INTEGER PRIMARY KEY,
    hash BLOB NOT NULL
);
"#;

/// Events per block of the keyed audit index (see [`AUDIT_SCHEMA`]).
pub(crate) const KEY_BLOCK: i64 = 8192;
/// `audit_key_*.kind` of a patient token.
pub(crate) const KEY_PATIENT: i64 = 0;
/// `audit_key_*.kind` of an agent token.
pub(crate) const KEY_AGENT: i64 = 1;

/// Whether `query` (a `SELECT 1 ...`) has a row.
fn exists(conn: &Connection, query: &str) -> StoreResult<bool> {
    conn.query_row(&format!("SELECT EXISTS ({query})"), [], |r| r.get(0))
        .map_err(backend_err)
}

/// `audit_log.patient` (an event's one patient token) came after the log:
/// add it to a log of an earlier version (its rows keep their patients in
/// the tail or in postings).
fn add_log_patient_column(conn: &Connection) -> StoreResult<()> {
    let has = exists(
        conn,
        "SELECT 1 FROM pragma_table_info('audit_log', 'audit') WHERE name = 'patient'",
    )?;
    if !has {
        conn.execute_batch("ALTER TABLE audit.audit_log ADD COLUMN patient TEXT")
            .map_err(backend_err)?;
    }
    Ok(())
}

/// Before the keyed index, patients were indexed in `audit_patient`
/// (patient, idx) and agents by an index on `audit_log.agent`: move both
/// into the runs once, at open.
fn migrate_audit_keys(conn: &Connection) -> StoreResult<()> {
    let old = exists(
        conn,
        "SELECT 1 FROM audit.sqlite_master WHERE type = 'table' AND name = 'audit_patient'",
    )?;
    if !old {
        return Ok(());
    }
    conn.execute_batch(&format!(
        "BEGIN IMMEDIATE;
         INSERT OR IGNORE INTO audit.audit_key_run (kind, block, key, idx)
             SELECT {KEY_PATIENT}, idx / {KEY_BLOCK}, patient, idx FROM audit.audit_patient
             ORDER BY idx / {KEY_BLOCK}, patient, idx;
         INSERT OR IGNORE INTO audit.audit_key_run (kind, block, key, idx)
             SELECT {KEY_AGENT}, idx / {KEY_BLOCK}, agent, idx FROM audit.audit_log
             WHERE agent IS NOT NULL ORDER BY idx / {KEY_BLOCK}, agent, idx;
         DROP TABLE audit.audit_patient;
         COMMIT;"
    ))
    .map_err(|e| {
        let _ = conn.execute_batch("ROLLBACK");
        backend_err(e)
    })
}

/// Turn the per-event rows of earlier versions (`audit_key_run`) into
/// postings, once, at open. The run is read in its key order, so each
/// (kind, block, token) comes as one group, its indexes ascending.
fn migrate_key_runs(conn: &Connection) -> StoreResult<()> {
    let any = exists(conn, "SELECT 1 FROM audit.audit_key_run")?;
    if !any {
        return Ok(());
    }
    conn.execute_batch("BEGIN IMMEDIATE").map_err(backend_err)?;
    let moved = (|| {
        let mut stmt = conn
            .prepare("SELECT kind, block, key, idx FROM audit.audit_key_run ORDER BY kind, block, key, idx")
            .map_err(backend_err)?;
        let mut rows = stmt.query([]).map_err(backend_err)?;
        let mut group: Option<(i64, i64, String)> = None;
        let mut offsets: Vec<i64> = Vec::new();
        let mut postings = 0u64;
        while let Some(r) = rows.next().map_err(backend_err)? {
            let this: (i64, i64, String) = (
                r.get(0).map_err(backend_err)?,
                r.get(1).map_err(backend_err)?,
                r.get(2).map_err(backend_err)?,
            );
            let idx: i64 = r.get(3).map_err(backend_err)?;
            if group.as_ref() != Some(&this)
                && let Some((kind, block, key)) = group.replace(this.clone())
            {
                put_posting(conn, kind, &key, block, &offsets)?;
                postings += 1;
                offsets.clear();
            }
            offsets.push(idx - this.1 * KEY_BLOCK);
        }
        if let Some((kind, block, key)) = group {
            put_posting(conn, kind, &key, block, &offsets)?;
            postings += 1;
        }
        conn.execute_batch("DELETE FROM audit.audit_key_run")
            .map_err(backend_err)?;
        Ok(postings)
    })();
    match moved.and_then(|n| {
        conn.execute_batch("COMMIT")
            .map_err(backend_err)
            .map(|()| n)
    }) {
        Ok(n) => {
            tracing::info!(
                postings = n,
                "audit key index: per-event rows moved into postings"
            );
            Ok(())
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

/// Offsets as the JSON array `audit_key_post.offsets` holds.
fn offsets_json(offsets: &[i64]) -> String {
    let mut out = String::with_capacity(2 + offsets.len() * 5);
    out.push('[');
    for (i, o) in offsets.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{o}");
    }
    out.push(']');
    out
}

/// Write one posting: `offsets` (ascending, each once), merged by SQLite
/// with the row already there, if any (a block whose rows came partly from
/// an earlier version's index, or a seal written again after a crash).
pub(crate) fn put_posting(
    conn: &Connection,
    kind: i64,
    key: &str,
    block: i64,
    offsets: &[i64],
) -> StoreResult<()> {
    conn.prepare_cached(
        "INSERT INTO audit.audit_key_post (kind, key, block, offsets) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (kind, key, block) DO UPDATE SET offsets = \
             (SELECT json_group_array(value ORDER BY value) FROM \
                 (SELECT value FROM json_each(audit_key_post.offsets) \
                  UNION SELECT value FROM json_each(excluded.offsets)))",
    )
    .and_then(|mut s| s.execute(params![kind, key, block, offsets_json(offsets)]))
    .map_err(backend_err)?;
    Ok(())
}

/// The audit database file of a store at `db`.
pub fn audit_path(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push("-audit");
    PathBuf::from(p)
}

pub(crate) fn backend_err(e: rusqlite::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn open_connection(config: &SqliteConfig, read_only: bool) -> StoreResult<Connection> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let conn = Connection::open_with_flags(&config.path, flags).map_err(backend_err)?;
    // Plan from the SQL alone, never from bound values. Otherwise SQLite
    // (3.50) reads a bound `LIMIT ?` while planning and marks the statement
    // to be prepared again whenever that parameter is bound, which is every
    // execution: each search page and count was parsed and planned anew
    // (15 % of a search's CPU). The values it would plan from are only a
    // LIMIT's size, LIKE patterns (none here) and STAT4 samples (no ANALYZE
    // runs here).
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )
    .map_err(backend_err)?;
    let kib = |mib: u32| {
        if read_only {
            mib as i64 * 256
        } else {
            mib as i64 * 1024
        }
    };
    let (cache_kib, audit_cache_kib) = (kib(config.cache_mib), kib(config.audit_cache_mib));
    let sync = match config.synchronous {
        Synchronous::Full => "FULL",
        Synchronous::Normal => "NORMAL",
    };
    conn.execute(
        "ATTACH DATABASE ?1 AS audit",
        [audit_path(&config.path).to_string_lossy().as_ref()],
    )
    .map_err(backend_err)?;
    conn.execute_batch(&format!(
        "PRAGMA busy_timeout = 10000; PRAGMA cache_size = -{cache_kib}; PRAGMA temp_store = MEMORY; \
         PRAGMA mmap_size = 2147418112; PRAGMA synchronous = {sync}; \
         PRAGMA audit.cache_size = -{audit_cache_kib}; PRAGMA audit.mmap_size = 2147418112; \
         PRAGMA audit.synchronous = {sync};"
    ))
    .map_err(backend_err)?;
    if !read_only {
        conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))
            .map_err(backend_err)?;
        conn.query_row("PRAGMA audit.journal_mode = WAL", [], |_| Ok(()))
            .map_err(backend_err)?;
        // Checkpoints run on their own thread (see `checkpoint_loop`), not in
        // the writer's commits; the WAL is truncated back to 64 MiB after one.
        conn.execute_batch(
            "PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = 67108864; \
             PRAGMA audit.journal_size_limit = 67108864;",
        )
        .map_err(backend_err)?;
    }
    conn.set_prepared_statement_cache_capacity(256);
    Ok(conn)
}

impl SqliteStore {
    /// Open (creating if needed) the database and start the writer thread.
    pub fn open(config: SqliteConfig) -> StoreResult<SqliteStore> {
        if let Some(parent) = config.path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| StoreError::Backend(e.to_string()))?;
        }
        let conn = open_connection(&config, false)?;
        conn.execute_batch(SCHEMA).map_err(backend_err)?;
        conn.execute_batch(AUDIT_SCHEMA).map_err(backend_err)?;
        add_log_patient_column(&conn)?;
        migrate_audit_keys(&conn)?;
        migrate_key_runs(&conn)?;
        recover_audit(&conn)?;
        let sealer = KeySealer::recover(&conn);
        let (tx, rx) = mpsc::channel::<(WriteJob, Reply)>();
        let wal = |db: &Path| {
            let mut w = db.as_os_str().to_owned();
            w.push("-wal");
            PathBuf::from(w)
        };
        let wal = [wal(&config.path), wal(&audit_path(&config.path))];
        let limit = config.wal_limit_bytes;
        let commit_delay = config.commit_delay;
        let signal = Arc::new(SysSignal::open(&config.path)?);
        let writer_signal = signal.clone();
        let copied = Arc::new(AtomicBool::new(false));
        let writer_copied = copied.clone();
        let syncer = match config.synchronous {
            Synchronous::Full => Some(Syncer::start(&conn, wal.clone())?),
            Synchronous::Normal => None,
        };
        let handle = std::thread::Builder::new()
            .name("custos-sqlite-writer".into())
            .spawn(move || {
                writer_loop(
                    conn,
                    rx,
                    WriterParts {
                        wal,
                        wal_limit: limit,
                        commit_delay,
                        signal: writer_signal,
                        copied: writer_copied,
                        syncer,
                    },
                    sealer,
                )
            })
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        let ck_conn = open_connection(&config, false)?;
        let (stop, stopped) = mpsc::channel::<()>();
        let ck = std::thread::Builder::new()
            .name("custos-sqlite-checkpoint".into())
            .spawn(move || checkpoint_loop(ck_conn, stopped, copied))
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        Ok(SqliteStore {
            config,
            writer: Mutex::new(Some(tx)),
            writer_thread: Mutex::new(Some(handle)),
            checkpointer: Mutex::new(Some((stop, ck))),
            readers: Arc::new(Mutex::new(Vec::new())),
            versions: Mutex::new(None),
            signal,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.config.path
    }

    /// Stop the writer after the queued jobs and checkpoint the WAL.
    pub fn close(&self) {
        if let Some((stop, h)) = self.checkpointer.lock().take() {
            drop(stop);
            let _ = h.join();
        }
        self.writer.lock().take();
        if let Some(h) = self.writer_thread.lock().take() {
            let _ = h.join();
        }
        self.readers.lock().clear();
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.close();
    }
}

/// Default WAL size past which the writer truncates it (see `writer_loop`).
const WAL_LIMIT_BYTES: u64 = 256 * 1024 * 1024;

/// Copies committed WAL frames into the database every few hundred
/// milliseconds, then sets `copied` for the writer to finish the job (see
/// `writer_loop`). PASSIVE checkpoints never block the writer or readers;
/// the writer bounds the WAL itself.
///
/// Each pass is followed at once by a second, short one that copies the
/// frames committed while the first ran. The writer's own checkpoint,
/// which every request waiting on a group commit waits behind, then copies
/// only the frames of that short pass, not of the long one: under a
/// stream of audited reads (about 1,500 group commits a second) this cut
/// their p99 by about 0.5 ms (`custos bench`, interleaved runs: 6.76 →
/// 6.21 ms with tokens, 5.79 → 5.37 ms without), and ingest did not slow.
/// (Passes every 50 ms cut that p99 as much but copied hot pages five
/// times as often: ingest lost 10 %.)
///
/// Between two such passes the audit file alone is checkpointed every
/// `AUDIT_CHECKPOINT_EVERY`. It is written at the ends of its tables, so a
/// page is copied about once whatever the interval, while each pass's
/// sync of the database file now flushes a fifth of the data: with one
/// pass every 250 ms, a pass under a stream of audited reads took 6-15 ms,
/// and meanwhile the sync thread's `fdatasync` of the audit WAL, which
/// every waiting request waits for, rose from 0.3-1 ms to 3-6 ms (a trace
/// of one quick bench, not committed; about two thirds of the slowest 1 %
/// of reads with tokens fell into those moments). Four alternating pairs
/// of quick bench runs (two with an environment switch, two with two
/// builds): p99 of reads with tokens 6.35-8.40 ms, mean 7.33, before;
/// 5.57-7.36, mean 6.32, after (one of the four pairs showed no gain);
/// without authentication 4.42-6.27, mean 5.28, before; 3.96-4.54, mean
/// 4.22, after; sealed ingest unchanged (9,990-11,128 before,
/// 10,556-11,894 resources/s after).
fn checkpoint_loop(conn: Connection, stop: mpsc::Receiver<()>, copied: Arc<AtomicBool>) {
    let pass = || conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
    let audit_pass = || conn.query_row("PRAGMA audit.wal_checkpoint(PASSIVE)", [], |_| Ok(()));
    let ticks_per_pass = CHECKPOINT_EVERY
        .as_millis()
        .div_ceil(AUDIT_CHECKPOINT_EVERY.as_millis()) as u64;
    let mut tick = 0u64;
    loop {
        match stop.recv_timeout(AUDIT_CHECKPOINT_EVERY) {
            Err(mpsc::RecvTimeoutError::Timeout) => {
                tick += 1;
                let result = if tick.is_multiple_of(ticks_per_pass) {
                    pass()
                        .and_then(|()| pass())
                        .map(|()| copied.store(true, Ordering::Release))
                } else {
                    audit_pass()
                };
                if let Err(e) = result {
                    tracing::warn!(error = %e, "WAL checkpoint failed; will retry");
                }
            }
            _ => return,
        }
    }
}

/// How often the background checkpoint copies both WALs into their databases.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// How often it copies the audit WAL alone in between (see `checkpoint_loop`).
const AUDIT_CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

/// Most write jobs drained into one group commit.
const GROUP_MAX: usize = 256;

/// How long the writer waits for another job before it looks again whether
/// the previous commit is synced (a few times per `fdatasync`).
const SYNC_POLL: std::time::Duration = std::time::Duration::from_micros(100);

/// Default [`SqliteConfig::commit_delay`].
pub const COMMIT_DELAY: std::time::Duration = std::time::Duration::from_micros(1500);

/// Jobs in the last commit from which the next one waits for company: the
/// sign of concurrent writers (PostgreSQL's `commit_siblings` plays this part).
const DELAY_AFTER_JOBS: usize = 4;

/// Until when a commit waits for more jobs once none is queued, given the
/// last commit's time and job count; `None` to commit at once.
///
/// Each commit costs about the same whatever it holds: its WAL frames (the
/// B-trees' last pages again), the file locks, a sync, thread wake-ups. An
/// audited read appends one small event, so under load commits came as fast
/// as the syncs allowed (about 1,100 a second, 14 events each, at 15,000
/// reads/s). Waiting, under load only, until 1.5 ms after the last commit
/// cut the sync thread's CPU per read from 8.9 to 5.4 µs and the writer's
/// from 18.3 to 16.5 µs, and raised reads with tokens 8 % with a lower p99
/// (interleaved runs, docs/audit.md). A writer working alone (one job a
/// commit) never waits.
fn more_jobs_until(
    (at, jobs): (std::time::Instant, usize),
    delay: std::time::Duration,
) -> Option<std::time::Instant> {
    (jobs >= DELAY_AFTER_JOBS && !delay.is_zero()).then(|| at + delay)
}

/// The writer: group commits (see the module documentation). It also keeps
/// the WAL short. Under a sustained load the background checkpoint never
/// copies the last frames (new ones keep coming), so SQLite would never
/// start the WAL over: it would grow without bound (8.6 GB for a 0.95 GB
/// database in a 100,000-patient load), every commit appending to a longer
/// file (new blocks to allocate, the size to sync, colder pages). So after
/// each background pass (see `checkpoint_loop`) the writer, between two
/// group commits when no frame can be added, copies the few frames
/// committed since; its next commit then writes the WAL from the start
/// again (unless a reader is still reading old frames; then after the next
/// pass). Past `wal_limit` (readers keep it from starting over) it runs a
/// TRUNCATE checkpoint: a short pause in writes instead of unbounded disk
/// use.
fn writer_loop(
    mut conn: Connection,
    rx: mpsc::Receiver<(WriteJob, Reply)>,
    parts: WriterParts,
    mut sealer: KeySealer,
) {
    let WriterParts {
        wal,
        wal_limit,
        commit_delay,
        signal,
        copied,
        syncer,
    } = parts;
    // Answers go out in commit order: through the syncer when there is one
    // (after the frames of their commit, and of every commit before it, are
    // on disk), otherwise at once.
    let unsynced = syncer.as_ref().map(|s| s.in_flight.clone());
    let answer = |results: Vec<(StoreResult<Box<dyn Any + Send>>, Reply)>| match &syncer {
        Some(s) => s.after_sync(results),
        None => results.into_iter().for_each(|(r, reply)| reply.send(r)),
    };
    // Outbox rows up to this seq belong to committed batches: both files
    // hold their events, so the next batch that writes the main file anyway
    // removes them.
    let mut outbox_done: Option<i64> = None;
    // The last commit: when it was made and how many jobs it held.
    let mut last_commit = (std::time::Instant::now(), 0usize);
    loop {
        // With a block to seal and no job waiting, a step commits on its own.
        let first = if sealer.has_work() {
            match rx.try_recv() {
                Ok(job) => Some(job),
                Err(mpsc::TryRecvError::Empty) => None,
                Err(mpsc::TryRecvError::Disconnected) => break,
            }
        } else {
            match rx.recv() {
                Ok(job) => Some(job),
                Err(_) => break,
            }
        };
        let mut batch: Vec<(WriteJob, Reply)> = first.into_iter().collect();
        while !batch.is_empty() && batch.len() < GROUP_MAX {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            seal_alone(&conn, &mut sealer, false);
            continue;
        }
        let mut results: Vec<(StoreResult<Box<dyn Any + Send>>, Reply)> =
            Vec::with_capacity(batch.len());
        // Jobs that failed alone: answered with the batch, never ahead of an
        // earlier commit that is not yet on disk (their error may tell of it).
        let mut failed = Vec::new();
        let mut sys_changed = false;
        let mut main_dirty = false;
        let mut outbox_last = None;
        let mut appended = Vec::new();
        // Until one job has succeeded (`results` is empty) the transaction
        // holds nothing, so a job runs bare there: if it fails, rolling the
        // whole transaction back undoes it alone, and the next job begins
        // anew. That spares the usual batch of one (the audit trail's group commit)
        // every savepoint, whose sub-journal copies each page on its first
        // change (a quarter of an index insert's cost).
        let mut began = false;
        let mut queued = batch.into_iter();
        let mut taken = 0;
        loop {
            // More jobs join this commit while the previous one is being
            // synced (the sync is the slow part; see `Syncer`), and, under
            // load, until `commit_delay` after the previous commit: see
            // `more_jobs_until`.
            let next = match queued.next() {
                Some(job) => Some(job),
                None if taken < GROUP_MAX => {
                    let syncing = unsynced
                        .as_ref()
                        .is_some_and(|u| u.load(Ordering::Acquire) > 0);
                    let until = more_jobs_until(last_commit, commit_delay);
                    let delay_left =
                        until.and_then(|t| t.checked_duration_since(std::time::Instant::now()));
                    // Blocking until a job comes or the delay ends; past the
                    // delay, polling for the sync's end (it answers no one here).
                    match (delay_left, syncing) {
                        (None, false) => None,
                        (left, _) => match rx.recv_timeout(left.unwrap_or(SYNC_POLL)) {
                            Ok(job) => Some(job),
                            Err(mpsc::RecvTimeoutError::Timeout) => continue,
                            Err(mpsc::RecvTimeoutError::Disconnected) => None,
                        },
                    }
                }
                None => None,
            };
            let Some((job, reply)) = next else { break };
            taken += 1;
            if !began {
                match conn.execute_batch("BEGIN IMMEDIATE") {
                    Ok(()) => began = true,
                    Err(e) => {
                        failed.push((Err(StoreError::Backend(e.to_string())), reply));
                        continue;
                    }
                }
            }
            let empty = results.is_empty();
            let (result, effects) = run_job(&mut conn, job, !empty);
            if empty && result.is_err() {
                if let Err(e) = conn.execute_batch("ROLLBACK") {
                    tracing::warn!(error = %e, "rolling back a failed write job failed");
                }
                began = false;
                failed.push((result, reply));
                continue;
            }
            sys_changed |= effects.sys_changed;
            main_dirty |= effects.main_dirty;
            outbox_last = effects.outbox_last.or(outbox_last);
            appended.extend(effects.appended);
            results.push((result, reply));
        }
        if !began {
            // Every job failed (rolled back) or could not begin: nothing to commit.
            answer(failed);
            continue;
        }
        // A step of the key index seal rides on the commit.
        seal_steps(&conn, &mut sealer);
        if main_dirty
            && let Some(done) = outbox_done
            && conn
                .prepare_cached("DELETE FROM main.audit_outbox WHERE seq <= ?1")
                .and_then(|mut s| s.execute([done]))
                .is_ok()
        {
            outbox_done = None;
        }
        last_commit = (std::time::Instant::now(), taken);
        if let Err(e) = conn.execute_batch("COMMIT") {
            let _ = conn.execute_batch("ROLLBACK");
            let failed_commit = results
                .into_iter()
                .map(|(_, reply)| (Err(StoreError::Backend(e.to_string())), reply));
            failed.extend(failed_commit);
            answer(failed);
            sealer = KeySealer::recover(&conn);
            continue;
        }
        for a in &appended {
            sealer.committed(a.idx, a.agent.as_deref(), &a.patients, a.tail_rowid);
        }
        if sealer.is_stale() {
            sealer = KeySealer::recover(&conn);
        }
        // Signal after the commit and before any answer, so that whoever
        // learns of the change also finds the signal moved.
        if sys_changed {
            signal.bump();
        }
        if outbox_last.is_some() {
            outbox_done = outbox_last;
        }
        failed.extend(results);
        answer(failed);
        if copied.swap(false, Ordering::AcqRel)
            && let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
        {
            tracing::debug!(error = %e, "the writer's checkpoint failed; the next pass retries");
        }
        let wal_size = |p: &PathBuf| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        if wal.iter().any(|w| wal_size(w) > wal_limit)
            && let Err(e) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        {
            tracing::warn!(error = %e, "WAL truncation failed; will retry after the next commit");
        }
    }
    if let Some(done) = outbox_done {
        let _ = conn.execute("DELETE FROM main.audit_outbox WHERE seq <= ?1", [done]);
    }
    // Every answer is out before the store reports itself closed.
    if let Some(syncer) = syncer {
        syncer.finish();
    }
    // Closing: finish the seal now rather than at the next start.
    seal_alone(&conn, &mut sealer, true);
    let _ = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)");
}

/// What the writer thread works with besides its connection and jobs.
struct WriterParts {
    /// The WAL files of the main and the audit database.
    wal: [PathBuf; 2],
    /// WAL size past which the writer truncates it.
    wal_limit: u64,
    /// See [`SqliteConfig::commit_delay`].
    commit_delay: std::time::Duration,
    signal: Arc<SysSignal>,
    /// Set by the checkpointer after a background pass.
    copied: Arc<AtomicBool>,
    /// `None` when SQLite itself syncs at commit or nothing syncs
    /// ([`Synchronous::Normal`]).
    syncer: Option<Syncer>,
}

thread_local! {
    /// Which WAL files (bit 0 main, bit 1 audit) received frames since the
    /// writer last looked; set by `note_wal_frames` on the writer's thread.
    static WAL_WRITTEN: std::cell::Cell<u8> = const { std::cell::Cell::new(0) };
}

/// SQLite's WAL hook: called on the committing thread after each commit,
/// once per database whose WAL the commit wrote.
fn note_wal_frames(wal: &rusqlite::hooks::Wal, _frames: std::ffi::c_int) -> rusqlite::Result<()> {
    let bit = if wal.name().to_bytes() == b"audit" {
        2
    } else {
        1
    };
    WAL_WRITTEN.with(|w| w.set(w.get() | bit));
    Ok(())
}

/// A group commit whose answers wait for its frames to reach the disk.
struct Unsynced {
    results: Vec<(StoreResult<Box<dyn Any + Send>>, Reply)>,
    /// The WAL files written since the last hand-over: by its commit, and
    /// by any seal step committed on its own in between.
    written: u8,
}

/// Durable commits without the writer waiting for the disk.
///
/// With [`Synchronous::Full`], SQLite would `fdatasync` the WAL inside every
/// `COMMIT`: the writer thread, which every write and every audit event
/// goes through, sat idle through each sync (175–226 µs, more than half of
/// an audited read's group commit), and no job could run meanwhile. So the
/// writer's connection commits with `synchronous = NORMAL` (frames are
/// written, not synced; SQLite keeps the database consistent either way
/// and still syncs around checkpoints), and this thread syncs the WAL
/// files after the commit and only then answers its jobs: no answer goes
/// out before its commit, and every commit before it, is on disk, as with
/// `FULL`. Meanwhile the writer already runs the jobs of the next group
/// commit, and keeps taking jobs into it until the sync is done rather than
/// commit at once (a first version did, making more and smaller commits,
/// and read no faster); one sync covers every commit that came before it.
///
/// Other connections may read a commit a sync before it is on disk. Nothing
/// they read reaches a client earlier than with `FULL`: an audited read
/// answers only after its own audit event, committed later in the same
/// WAL, is synced.
struct Syncer {
    queue: mpsc::Sender<Unsynced>,
    /// Group commits handed over and not yet answered.
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    thread: std::thread::JoinHandle<()>,
    wal: [PathBuf; 2],
}

impl Syncer {
    /// Switch the writer's connection to syncing through a new syncer thread.
    fn start(conn: &Connection, wal: [PathBuf; 2]) -> StoreResult<Syncer> {
        conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA audit.synchronous = NORMAL;")
            .map_err(backend_err)?;
        // After `wal_autocheckpoint` (set in `open_connection`), which replaces the hook.
        conn.wal_hook(Some(note_wal_frames));
        let (queue, rx) = mpsc::channel::<Unsynced>();
        let paths = wal.clone();
        let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let answered = in_flight.clone();
        let thread = std::thread::Builder::new()
            .name("custos-sqlite-sync".into())
            .spawn(move || sync_loop(rx, paths, answered))
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        Ok(Syncer {
            queue,
            in_flight,
            thread,
            wal,
        })
    }

    /// Answer `results` once everything committed so far is on disk.
    fn after_sync(&self, results: Vec<(StoreResult<Box<dyn Any + Send>>, Reply)>) {
        let written = WAL_WRITTEN.with(|w| w.replace(0));
        if results.is_empty() && written == 0 {
            return;
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        if let Err(mpsc::SendError(unsynced)) = self.queue.send(Unsynced { results, written }) {
            // The syncer thread is gone (it cannot panic short of a bug):
            // sync here rather than answer early.
            answer_synced(vec![unsynced], &self.wal);
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Answer what is queued and stop the thread.
    fn finish(self) {
        drop(self.queue);
        let _ = self.thread.join();
    }
}

fn sync_loop(
    rx: mpsc::Receiver<Unsynced>,
    wal: [PathBuf; 2],
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
) {
    /// Clears the count when this thread ends, however it ends, so that the
    /// writer never waits for a sync that cannot come (it then syncs
    /// itself, see `Syncer::after_sync`).
    struct ClearOnExit(Arc<std::sync::atomic::AtomicUsize>);
    impl Drop for ClearOnExit {
        fn drop(&mut self) {
            self.0.store(0, Ordering::Release);
        }
    }
    let in_flight = ClearOnExit(in_flight);
    let in_flight = &in_flight.0;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let n = batch.len();
        answer_synced(batch, &wal);
        in_flight.fetch_sub(n, Ordering::AcqRel);
    }
}

/// Sync the WAL files `batch` wrote, then answer its jobs in order.
fn answer_synced(batch: Vec<Unsynced>, wal: &[PathBuf; 2]) {
    let written = batch.iter().fold(0, |w, u| w | u.written);
    let mut synced = Ok(());
    for (bit, path) in [(1u8, &wal[0]), (2, &wal[1])] {
        if written & bit != 0 && synced.is_ok() {
            synced = sync_file(path);
        }
    }
    if let Err(e) = &synced {
        tracing::error!(error = %e, "the WAL could not be synced: the last commits may not survive a power loss");
    }
    for unsynced in batch {
        for (result, reply) in unsynced.results {
            reply.send(match &synced {
                Ok(()) => result,
                Err(e) => Err(StoreError::Backend(e.clone())),
            });
        }
    }
}

/// `fdatasync` one WAL file. A missing file has nothing to sync: SQLite
/// removes a WAL only after copying it all into the database and syncing that.
fn sync_file(path: &Path) -> Result<(), String> {
    match std::fs::File::open(path) {
        Ok(file) => file
            .sync_data()
            .map_err(|e| format!("syncing {}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("opening {} to sync it: {e}", path.display())),
    }
}

/// Take the seal's step for this commit (more while more than one block
/// waits), in a savepoint: a failed step is undone and leaves the batch be.
fn seal_steps(conn: &Connection, sealer: &mut KeySealer) {
    if !sealer.has_work() {
        return;
    }
    if let Err(e) = conn.execute_batch("SAVEPOINT seal") {
        tracing::warn!(error = %e, "the audit key index seal could not start a savepoint");
        return;
    }
    let mut result = sealer.step(conn);
    while result.is_ok() && sealer.behind() {
        result = sealer.step(conn);
    }
    if let Err(e) = result {
        tracing::warn!(error = %e, "an audit key index seal step failed; it is retried");
        let _ = conn.execute_batch("ROLLBACK TO seal");
        sealer.rolled_back();
    }
    let _ = conn.execute_batch("RELEASE seal");
}

/// Seal steps in a transaction of their own: one while the writer is idle
/// (it then looks for jobs again), or all that are left (`finish`) when it
/// closes; whatever fails is retried after a rebuild, or at the next start.
fn seal_alone(conn: &Connection, sealer: &mut KeySealer, finish: bool) {
    let mut rebuilt = false;
    while sealer.has_work() {
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            tracing::warn!(error = %e, "the audit key index seal could not begin");
            return;
        }
        let mut result = sealer.step(conn);
        while result.is_ok() && sealer.has_work() && (finish || sealer.behind()) {
            result = sealer.step(conn);
        }
        if let Err(e) = result.and_then(|()| conn.execute_batch("COMMIT").map_err(backend_err)) {
            tracing::warn!(error = %e, "audit key index seal steps failed; they are retried");
            let _ = conn.execute_batch("ROLLBACK");
            sealer.rolled_back();
        }
        if sealer.is_stale() {
            *sealer = KeySealer::recover(conn);
            if !finish || rebuilt {
                return;
            }
            rebuilt = true;
        } else if !finish {
            return;
        }
    }
}

/// What a write job did besides its result.
#[derive(Default)]
struct JobEffects {
    sys_changed: bool,
    main_dirty: bool,
    /// The last outbox row it inserted.
    outbox_last: Option<i64>,
    /// The audit events it appended.
    appended: Vec<Appended>,
}

/// Run one job, in its own savepoint if `savepoint` (otherwise a failed
/// job leaves its changes for the caller to roll back with the whole
/// transaction); also tells what it changed.
fn run_job(
    conn: &mut Connection,
    job: WriteJob,
    savepoint: bool,
) -> (StoreResult<Box<dyn Any + Send>>, JobEffects) {
    let exec = |conn: &Connection, sql: &str| {
        conn.prepare_cached(sql)
            .and_then(|mut s| s.execute([]))
            .map_err(backend_err)
    };
    if savepoint && let Err(e) = exec(conn, "SAVEPOINT job") {
        return (Err(e), JobEffects::default());
    }
    let mut sys_changed = false;
    let mut main_dirty = false;
    let mut appended = Vec::new();
    let mut append_cache = AppendCache::default();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut tx = SqliteTx {
            conn,
            sys_changed: &mut sys_changed,
            main_dirty: &mut main_dirty,
            appended: &mut appended,
            append_cache: &mut append_cache,
        };
        job(&mut tx)
    }));
    let mut result = match outcome {
        Ok(r) => r,
        Err(_) => Err(StoreError::Backend(
            "write job panicked; its changes were rolled back".into(),
        )),
    };
    // Events appended by a job that changed the main file get their copy in
    // the outbox, atomic with the change (see `AUDIT_SCHEMA`).
    let mut outbox_last = None;
    if result.is_ok() && main_dirty && !appended.is_empty() {
        match write_outbox(conn, &appended) {
            Ok(last) => outbox_last = Some(last),
            Err(e) => result = Err(e),
        }
    }
    if result.is_err() {
        sys_changed = false;
        main_dirty = false;
        outbox_last = None;
        if savepoint && let Err(e) = exec(conn, "ROLLBACK TO job") {
            return (Err(e), JobEffects::default());
        }
    }
    if savepoint && let Err(e) = exec(conn, "RELEASE job") {
        return (Err(e), JobEffects::default());
    }
    if result.is_err() {
        appended.clear();
    }
    (
        result,
        JobEffects {
            sys_changed,
            main_dirty,
            outbox_last,
            appended,
        },
    )
}

/// An audit event as appended, kept for the outbox and the key index seal.
struct Appended {
    idx: u64,
    /// The rowid of its last `audit_key_tail` row.
    tail_rowid: Option<i64>,
    at: i64,
    action: String,
    outcome: u8,
    agent: Option<String>,
    patients: Vec<String>,
    data: Vec<u8>,
}

fn write_outbox(conn: &Connection, appended: &[Appended]) -> StoreResult<i64> {
    let mut stmt = conn
        .prepare_cached(
            "INSERT INTO main.audit_outbox (idx, at, action, outcome, agent, patients, data) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .map_err(backend_err)?;
    for a in appended {
        stmt.execute(params![
            a.idx as i64,
            a.at,
            a.action,
            a.outcome,
            a.agent,
            a.patients.join(","),
            a.data
        ])
        .map_err(backend_err)?;
    }
    Ok(conn.last_insert_rowid())
}

/// At open: every outbox event the audit file lacks (a crash between the
/// two files' commits) is appended again; then the outbox is emptied.
fn recover_audit(conn: &Connection) -> StoreResult<()> {
    let rows: Vec<(i64, Appended)> = {
        let mut stmt = conn
            .prepare(
                "SELECT seq, idx, at, action, outcome, agent, patients, data FROM main.audit_outbox ORDER BY seq",
            )
            .map_err(backend_err)?;
        let rows = stmt
            .query_map([], |r| {
                let patients: String = r.get(6)?;
                Ok((
                    r.get(0)?,
                    Appended {
                        idx: r.get::<_, i64>(1)? as u64,
                        tail_rowid: None,
                        at: r.get(2)?,
                        action: r.get(3)?,
                        outcome: r.get(4)?,
                        agent: r.get(5)?,
                        patients: patients
                            .split(',')
                            .filter(|p| !p.is_empty())
                            .map(str::to_string)
                            .collect(),
                        data: r.get(7)?,
                    },
                ))
            })
            .map_err(backend_err)?;
        rows.collect::<Result<_, _>>().map_err(backend_err)?
    };
    if rows.is_empty() {
        return Ok(());
    }
    conn.execute_batch("BEGIN IMMEDIATE").map_err(backend_err)?;
    let mut recovered = 0;
    let mut cache = AppendCache::default();
    let result = (|| {
        for (_, a) in &rows {
            let present: Option<Vec<u8>> = conn
                .query_row(
                    "SELECT data FROM audit.audit_log WHERE idx = ?1",
                    [a.idx as i64],
                    |r| r.get(0),
                )
                .optional()
                .map_err(backend_err)?;
            if present.as_deref() != Some(a.data.as_slice()) {
                append_audit(
                    conn,
                    &mut cache,
                    &AuditAppend {
                        at: a.at,
                        action: &a.action,
                        outcome: a.outcome,
                        agent: a.agent.as_deref(),
                        patients: &a.patients,
                        data: &a.data,
                    },
                )?;
                recovered += 1;
            }
        }
        conn.execute("DELETE FROM main.audit_outbox", [])
            .map_err(backend_err)?;
        Ok(())
    })();
    match result.and_then(|()| conn.execute_batch("COMMIT").map_err(backend_err)) {
        Ok(()) => {
            if recovered > 0 {
                tracing::warn!(
                    events = recovered,
                    "audit events of committed changes were missing from the audit file (a crash between the two commits); appended again"
                );
            }
            Ok(())
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn run_read(&self, job: ReadJob) -> StoreResult<Box<dyn Any + Send>> {
        let readers = self.readers.clone();
        let config = self.config.clone();
        tokio::task::spawn_blocking(move || run_read_on(&readers, &config, job))
            .await
            .map_err(|e| StoreError::Backend(format!("read task failed: {e}")))?
    }

    async fn run_read_point(&self, job: ReadJob) -> StoreResult<Box<dyn Any + Send>> {
        // A point lookup takes microseconds (WAL readers never wait for the
        // writer), less than a hand-off to the blocking pool: run it here.
        run_read_on(&self.readers, &self.config, job)
    }

    async fn run_write(&self, job: WriteJob) -> StoreResult<Box<dyn Any + Send>> {
        let (reply, wait) = oneshot::channel();
        crate::queue_write(&self.writer, job, Reply::Wait(reply))?;
        wait.await
            .map_err(|_| StoreError::Backend("writer thread stopped".into()))?
    }

    fn submit_write(&self, job: WriteJob, done: crate::WriteDone) -> StoreResult<()> {
        crate::queue_write(&self.writer, job, Reply::call(done))
    }

    async fn sys_version(&self, kind: &str, key: &str) -> StoreResult<i64> {
        /// Even without a signal, answers are re-read this often (a safety
        /// net for a writer that died between its commit and the signal).
        const RECHECK: std::time::Duration = std::time::Duration::from_secs(1);
        let signal = self.signal.load();
        let mut slot = self.versions.lock();
        if let Some(p) = slot.as_ref()
            && p.signal == signal
            && p.read_at.elapsed() < RECHECK
            && let Some((_, v)) = p.known.iter().find(|((k1, k2), _)| k1 == kind && k2 == key)
        {
            return Ok(*v);
        }
        if slot.is_none() {
            *slot = Some(VersionProbe {
                conn: open_connection(&self.config, true)?,
                signal,
                read_at: std::time::Instant::now(),
                known: Vec::new(),
            });
        }
        let probe = slot.as_mut().expect("just set");
        if probe.signal != signal || probe.read_at.elapsed() >= RECHECK {
            probe.known.clear();
            probe.signal = signal;
            probe.read_at = std::time::Instant::now();
        }
        let v: i64 = probe
            .conn
            .prepare_cached("SELECT version FROM sys WHERE kind = ?1 AND key = ?2")
            .and_then(|mut s| s.query_row(params![kind, key], |r| r.get(0)).optional())
            .map_err(backend_err)?
            .unwrap_or(0);
        probe.known.push(((kind.to_string(), key.to_string()), v));
        Ok(v)
    }

    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn describe(&self) -> String {
        format!("sqlite {}", self.config.path.display())
    }

    async fn migrations(&self) -> StoreResult<Vec<(i64, String)>> {
        // One schema version so far, created in place on open (`SCHEMA`).
        Ok(vec![(
            1,
            "records, index, keys, system records, audit log".into(),
        )])
    }

    fn close(&self) {
        SqliteStore::close(self)
    }

    fn files(&self) -> Vec<PathBuf> {
        let p = &self.config.path;
        let mut wal = p.clone().into_os_string();
        wal.push("-wal");
        let mut shm = p.clone().into_os_string();
        shm.push("-shm");
        let a = audit_path(p);
        let mut awal = a.clone().into_os_string();
        awal.push("-wal");
        let mut ashm = a.clone().into_os_string();
        ashm.push("-shm");
        vec![
            p.clone(),
            wal.into(),
            shm.into(),
            a,
            awal.into(),
            ashm.into(),
        ]
    }
}

/// Run a read job on a pooled read connection, in one read transaction.
fn run_read_on(
    readers: &Mutex<Vec<Connection>>,
    config: &SqliteConfig,
    job: ReadJob,
) -> StoreResult<Box<dyn Any + Send>> {
    let pooled = readers.lock().pop();
    let mut conn = match pooled {
        Some(c) => c,
        None => open_connection(config, true)?,
    };
    // Cached statements: parsing BEGIN and COMMIT anew cost more than a point lookup.
    conn.prepare_cached("BEGIN")
        .and_then(|mut s| s.execute([]))
        .map_err(backend_err)?;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let (mut unused, mut unused_dirty, mut unused_appended) = (false, false, Vec::new());
        let mut unused_cache = AppendCache::default();
        let mut tx = SqliteTx {
            conn: &mut conn,
            sys_changed: &mut unused,
            main_dirty: &mut unused_dirty,
            appended: &mut unused_appended,
            append_cache: &mut unused_cache,
        };
        job(&mut tx)
    }));
    let committed = conn
        .prepare_cached("COMMIT")
        .and_then(|mut s| s.execute([]))
        .is_ok();
    if committed {
        readers.lock().push(conn);
    }
    match result {
        Ok(r) => r,
        Err(_) => Err(StoreError::Backend("read job panicked".into())),
    }
}

/// A transaction on one connection.
struct SqliteTx<'c> {
    conn: &'c mut Connection,
    /// Set when a write changes system records (see [`SysSignal`]).
    sys_changed: &'c mut bool,
    /// Set when a write changes the main file (not only the audit log).
    main_dirty: &'c mut bool,
    /// Audit events appended by this job.
    appended: &'c mut Vec<Appended>,
    append_cache: &'c mut AppendCache,
}

const VERSION_COLUMNS: &str = "c.rid, c.rtype, c.id, v.version, v.last_updated, \
     CASE WHEN c.state = 2 THEN 2 ELSE v.state END, v.key_name, v.body, v.seq";

fn row_to_version(
    row: &rusqlite::Row<'_>,
    sort_col: Option<usize>,
) -> rusqlite::Result<StoredVersion> {
    Ok(StoredVersion {
        rid: row.get(0)?,
        rtype: row.get(1)?,
        id: row.get(2)?,
        version: row.get(3)?,
        last_updated: row.get(4)?,
        state: RecordState::from_i64(row.get(5)?),
        key_name: row.get(6)?,
        body: row.get(7)?,
        seq: row.get(8)?,
        sort_key: match sort_col {
            Some(i) => row.get(i)?,
            None => None,
        },
    })
}

pub(crate) fn encode_index(index: &IndexEntries) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + index.tokens.len() * 16 + index.ranges.len() * 25);
    out.extend_from_slice(&(index.tokens.len() as u32).to_le_bytes());
    for t in &index.tokens {
        out.extend_from_slice(t);
    }
    out.extend_from_slice(&(index.ranges.len() as u32).to_le_bytes());
    for r in &index.ranges {
        out.extend_from_slice(&r.pkey.to_le_bytes());
        out.extend_from_slice(&r.lo.to_le_bytes());
        out.extend_from_slice(&r.hi.to_le_bytes());
        out.push(u8::from(r.sortable));
    }
    out
}

pub(crate) fn decode_index(blob: &[u8]) -> Option<IndexEntries> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if b.len() < n {
            return None;
        }
        let (h, t) = b.split_at(n);
        *b = t;
        Some(h)
    }
    let mut b = blob;
    let n = u32::from_le_bytes(take(&mut b, 4)?.try_into().ok()?) as usize;
    let mut index = IndexEntries::default();
    for _ in 0..n {
        index.tokens.push(take(&mut b, 16)?.try_into().ok()?);
    }
    let m = u32::from_le_bytes(take(&mut b, 4)?.try_into().ok()?) as usize;
    for _ in 0..m {
        let pkey = i64::from_le_bytes(take(&mut b, 8)?.try_into().ok()?);
        let lo = f64::from_le_bytes(take(&mut b, 8)?.try_into().ok()?);
        let hi = f64::from_le_bytes(take(&mut b, 8)?.try_into().ok()?);
        let sortable = take(&mut b, 1)?[0] == 1;
        index.ranges.push(RangeEntry {
            pkey,
            lo,
            hi,
            sortable,
        });
    }
    Some(index)
}

/// Large finite stand-ins for "no value" in sort keys (NULL sorts last either way).
const SORT_LAST_ASC: f64 = 1e308;
const SORT_LAST_DESC: f64 = -1e308;

fn push_range_cond(sql: &mut String, args: &mut Vec<SqlValue>, lo: &str, hi: &str, c: &RangeCond) {
    let mut parts = Vec::new();
    if let Some(x) = c.lo_ge {
        parts.push(format!("{lo} >= ?"));
        args.push(SqlValue::Real(x));
    }
    if let Some(x) = c.lo_lt {
        parts.push(format!("{lo} < ?"));
        args.push(SqlValue::Real(x));
    }
    if let Some(x) = c.hi_gt {
        parts.push(format!("{hi} > ?"));
        args.push(SqlValue::Real(x));
    }
    if let Some(x) = c.hi_le {
        parts.push(format!("{hi} <= ?"));
        args.push(SqlValue::Real(x));
    }
    if parts.is_empty() {
        sql.push('1');
    } else {
        sql.push('(');
        sql.push_str(&parts.join(" AND "));
        sql.push(')');
    }
}

/// `(cond OR cond …)` over the columns `lo`/`hi`; an empty list matches nothing.
fn push_any_range(
    sql: &mut String,
    args: &mut Vec<SqlValue>,
    lo: &str,
    hi: &str,
    any: &[RangeCond],
) {
    sql.push('(');
    if any.is_empty() {
        sql.push('0');
    }
    for (i, c) in any.iter().enumerate() {
        if i > 0 {
            sql.push_str(" OR ");
        }
        push_range_cond(sql, args, lo, hi, c);
    }
    sql.push(')');
}

fn push_placeholders(sql: &mut String, n: usize) {
    for i in 0..n {
        if i > 0 {
            sql.push(',');
        }
        sql.push('?');
    }
}

/// Append the WHERE conditions of `filters` (each prefixed by ` AND `).
fn push_filters(sql: &mut String, args: &mut Vec<SqlValue>, filters: &[Filter]) {
    for f in filters {
        sql.push_str(" AND ");
        match f {
            Filter::AnyToken(tokens) | Filter::NoToken(tokens) => {
                if tokens.is_empty() {
                    sql.push_str(if matches!(f, Filter::AnyToken(_)) {
                        "0"
                    } else {
                        "1"
                    });
                    continue;
                }
                let not = if matches!(f, Filter::NoToken(_)) {
                    "NOT "
                } else {
                    ""
                };
                sql.push_str(&format!(
                    "c.rid {not}IN (SELECT rid FROM idx_token WHERE token IN ("
                ));
                push_placeholders(sql, tokens.len());
                sql.push_str("))");
                args.extend(tokens.iter().map(|t| SqlValue::Blob(t.to_vec())));
            }
            Filter::AnyRange { pkey, any } => {
                sql.push_str("c.rid IN (SELECT rid FROM idx_range WHERE pkey = ? AND ");
                args.push(SqlValue::Integer(*pkey));
                push_any_range(sql, args, "lo", "hi", any);
                sql.push(')');
            }
            Filter::Ids(ids) => {
                if ids.is_empty() {
                    sql.push('0');
                    continue;
                }
                sql.push_str("c.id IN (");
                push_placeholders(sql, ids.len());
                sql.push(')');
                args.extend(ids.iter().map(|i| SqlValue::Text(i.clone())));
            }
            Filter::LastUpdated(any) => {
                push_any_range(sql, args, "c.last_updated", "c.last_updated", any)
            }
            Filter::Compartment(p) => {
                sql.push_str("c.compartment = ?");
                args.push(SqlValue::Text(p.clone()));
            }
            Filter::Visible { patients, shared } => {
                sql.push('(');
                if patients.is_empty() {
                    sql.push('0');
                } else {
                    sql.push_str("c.compartment IN (");
                    push_placeholders(sql, patients.len());
                    sql.push(')');
                    args.extend(patients.iter().map(|p| SqlValue::Text(p.clone())));
                }
                if *shared {
                    sql.push_str(" OR c.compartment IS NULL");
                }
                sql.push(')');
            }
            Filter::Hidden(patients) => {
                if patients.is_empty() {
                    sql.push('1');
                    continue;
                }
                sql.push_str("(c.compartment IS NULL OR c.compartment NOT IN (");
                push_placeholders(sql, patients.len());
                sql.push_str("))");
                args.extend(patients.iter().map(|p| SqlValue::Text(p.clone())));
            }
        }
    }
}

impl SqliteTx<'_> {
    fn query_versions(
        &self,
        sql: &str,
        args: Vec<SqlValue>,
        sort_col: Option<usize>,
    ) -> StoreResult<Vec<StoredVersion>> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(backend_err)?;
        let rows = stmt
            .query_map(params_from_iter(args), |row| row_to_version(row, sort_col))
            .map_err(backend_err)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(backend_err)
    }

    fn history_sql(q: &HistoryQuery, select: &str) -> (String, Vec<SqlValue>) {
        let mut sql =
            format!("SELECT {select} FROM versions v JOIN current c ON c.rid = v.rid WHERE 1");
        let mut args = Vec::new();
        match &q.scope {
            HistoryScope::Instance { rtype, id } => {
                sql.push_str(" AND c.rtype = ? AND c.id = ?");
                args.push(SqlValue::Text(rtype.clone()));
                args.push(SqlValue::Text(id.clone()));
            }
            HistoryScope::Type(rtype) => {
                sql.push_str(" AND v.rtype = ?");
                args.push(SqlValue::Text(rtype.clone()));
            }
            HistoryScope::System => {}
        }
        if let Some(since) = q.since {
            sql.push_str(" AND v.last_updated >= ?");
            args.push(SqlValue::Integer(since));
        }
        if let Some(before) = q.before {
            sql.push_str(" AND v.last_updated < ?");
            args.push(SqlValue::Integer(before));
        }
        if let Some(seq) = q.seq_below {
            sql.push_str(" AND v.seq < ?");
            args.push(SqlValue::Integer(seq));
        }
        if let Some(keys) = &q.key_names {
            if keys.is_empty() {
                sql.push_str(" AND 0");
            } else {
                sql.push_str(" AND v.key_name IN (");
                push_placeholders(&mut sql, keys.len());
                sql.push(')');
                args.extend(keys.iter().map(|k| SqlValue::Text(k.clone())));
            }
        }
        if !q.exclude_keys.is_empty() {
            sql.push_str(" AND v.key_name NOT IN (");
            push_placeholders(&mut sql, q.exclude_keys.len());
            sql.push(')');
            args.extend(q.exclude_keys.iter().map(|k| SqlValue::Text(k.clone())));
        }
        (sql, args)
    }

    /// The fast path of the most common searches (`identifier=`, `family=`,
    /// `patient=` …): one blind token, insertion order. Index rows exist only
    /// for live resources and every token is keyed by its resource type, so
    /// the token index alone answers, already ordered by row id: the page
    /// and the count cost O(page), not O(matches).
    fn single_token_sql(q: &IndexQuery, count_only: bool) -> Option<(String, Vec<SqlValue>)> {
        let [Filter::AnyToken(tokens)] = q.filters.as_slice() else {
            return None;
        };
        let [token] = tokens.as_slice() else {
            return None;
        };
        if q.order != Order::Rid {
            return None;
        }
        let mut args = vec![SqlValue::Blob(token.to_vec())];
        if count_only {
            return Some((
                "SELECT 1 FROM idx_token t WHERE t.token = ?".to_string(),
                args,
            ));
        }
        let desc = q.descending != q.backwards;
        let mut inner =
            "SELECT t.rid AS rid, CAST(t.rid AS REAL) AS sk FROM idx_token t WHERE t.token = ?"
                .to_string();
        if let Some(k) = q.after {
            inner.push_str(if desc {
                " AND t.rid < ?"
            } else {
                " AND t.rid > ?"
            });
            args.push(SqlValue::Integer(k.rid));
        }
        let dir = if desc { "DESC" } else { "ASC" };
        inner.push_str(&format!(" ORDER BY t.rid {dir} LIMIT ?"));
        args.push(SqlValue::Integer(q.limit as i64));
        Some((
            format!(
                "SELECT {VERSION_COLUMNS}, p.sk FROM ({inner}) p JOIN current c ON c.rid = p.rid \
                 JOIN versions v ON v.rid = c.rid AND v.version = c.version ORDER BY p.sk {dir}, p.rid {dir}"
            ),
            args,
        ))
    }

    fn search_sql(q: &IndexQuery, count_only: bool) -> (String, Vec<SqlValue>) {
        if let Some(fast) = Self::single_token_sql(q, count_only) {
            return fast;
        }
        let mut args: Vec<SqlValue> = Vec::new();
        let desc = q.descending != q.backwards;
        let (sort_expr, join) = match q.order {
            Order::Rid => ("CAST(c.rid AS REAL)".to_string(), String::new()),
            Order::LastUpdated => ("CAST(c.last_updated AS REAL)".to_string(), String::new()),
            Order::Range(pkey) => {
                let (col, missing) = if q.descending {
                    ("s.max_hi", SORT_LAST_DESC)
                } else {
                    ("s.min_lo", SORT_LAST_ASC)
                };
                (
                    format!("COALESCE({col}, {missing:e})"),
                    format!(" LEFT JOIN idx_sort s ON s.pkey = {pkey} AND s.rid = c.rid"),
                )
            }
        };
        // When an index filter exists it must drive the lookup (row ids from
        // the index, then the current row by primary key). Without this hint
        // SQLite walks every resource of the type and probes the index list,
        // which grows with the data. The unary `+` removes the type index
        // from the planner's choices.
        let indexed = q
            .filters
            .iter()
            .any(|f| matches!(f, Filter::AnyToken(_) | Filter::AnyRange { .. }));
        let rtype_col = if indexed { "+c.rtype" } else { "c.rtype" };
        // The page is chosen on row ids and sort keys alone; bodies are
        // fetched afterwards for the rows of the page only (otherwise SQLite
        // carries every candidate's sealed body through the sort).
        let mut sql = if count_only {
            format!("SELECT 1 FROM current c WHERE {rtype_col} = ? AND c.state = 0")
        } else {
            format!(
                "SELECT c.rid AS rid, {sort_expr} AS sk FROM current c{join} \
                 WHERE {rtype_col} = ? AND c.state = 0"
            )
        };
        args.push(SqlValue::Text(q.rtype.clone()));
        push_filters(&mut sql, &mut args, &q.filters);
        if count_only {
            return (sql, args);
        }
        if let Some(k) = q.after {
            let op = if desc { "<" } else { ">" };
            sql.push_str(&format!(
                " AND ({sort_expr} {op} ? OR ({sort_expr} = ? AND c.rid {op} ?))"
            ));
            args.push(SqlValue::Real(k.sort_key));
            args.push(SqlValue::Real(k.sort_key));
            args.push(SqlValue::Integer(k.rid));
        }
        let dir = if desc { "DESC" } else { "ASC" };
        sql.push_str(&format!(" ORDER BY sk {dir}, c.rid {dir} LIMIT ?"));
        args.push(SqlValue::Integer(q.limit as i64));
        let sql = format!(
            "SELECT {VERSION_COLUMNS}, p.sk FROM ({sql}) p JOIN current c ON c.rid = p.rid \
             JOIN versions v ON v.rid = c.rid AND v.version = c.version ORDER BY p.sk {dir}, p.rid {dir}"
        );
        (sql, args)
    }
}

impl ReadTx for SqliteTx<'_> {
    fn current(&mut self, rtype: &str, id: &str) -> StoreResult<Option<StoredVersion>> {
        let sql = format!(
            "SELECT {VERSION_COLUMNS} FROM current c JOIN versions v ON v.rid = c.rid AND v.version = c.version \
             WHERE c.rtype = ?1 AND c.id = ?2"
        );
        let mut stmt = self.conn.prepare_cached(&sql).map_err(backend_err)?;
        stmt.query_row(params![rtype, id], |r| row_to_version(r, None))
            .optional()
            .map_err(backend_err)
    }

    fn head(&mut self, rtype: &str, id: &str) -> StoreResult<Option<Head>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT version, state, compartment FROM current WHERE rtype = ?1 AND id = ?2",
            )
            .map_err(backend_err)?;
        stmt.query_row(params![rtype, id], |r| {
            Ok(Head {
                version: r.get(0)?,
                state: RecordState::from_i64(r.get(1)?),
                compartment: r.get(2)?,
            })
        })
        .optional()
        .map_err(backend_err)
    }

    fn version(
        &mut self,
        rtype: &str,
        id: &str,
        version: i64,
    ) -> StoreResult<Option<StoredVersion>> {
        let sql = format!(
            "SELECT {VERSION_COLUMNS} FROM current c JOIN versions v ON v.rid = c.rid \
             WHERE c.rtype = ?1 AND c.id = ?2 AND v.version = ?3"
        );
        let mut stmt = self.conn.prepare_cached(&sql).map_err(backend_err)?;
        stmt.query_row(params![rtype, id, version], |r| row_to_version(r, None))
            .optional()
            .map_err(backend_err)
    }

    fn search(&mut self, q: &IndexQuery) -> StoreResult<Vec<StoredVersion>> {
        let (sql, args) = Self::search_sql(q, false);
        let mut rows = self.query_versions(&sql, args, Some(9))?;
        if q.backwards {
            rows.reverse();
        }
        Ok(rows)
    }

    fn search_ids(&mut self, q: &IndexQuery) -> StoreResult<Vec<String>> {
        let (sql, args) = Self::search_sql(q, false);
        // Same query, only the id column: the body is never read.
        let sql = sql.replacen(VERSION_COLUMNS, "c.id", 1);
        let mut stmt = self.conn.prepare_cached(&sql).map_err(backend_err)?;
        let rows = stmt
            .query_map(params_from_iter(args), |r| r.get::<_, String>(0))
            .map_err(backend_err)?;
        let mut ids = rows.collect::<Result<Vec<_>, _>>().map_err(backend_err)?;
        if q.backwards {
            ids.reverse();
        }
        Ok(ids)
    }

    fn compartments(&mut self, q: &IndexQuery, cap: usize) -> StoreResult<Vec<String>> {
        let (inner, mut args) = Self::search_sql(q, true);
        // Both shapes of the counting query select `1`; select the compartment instead.
        let inner = if let Some(rest) = inner.strip_prefix("SELECT 1 FROM idx_token t ") {
            format!(
                "SELECT c.compartment AS compartment FROM idx_token t \
                 JOIN current c ON c.rid = t.rid {rest}"
            )
        } else {
            inner.replacen("SELECT 1 ", "SELECT c.compartment AS compartment ", 1)
        };
        let sql = format!(
            "SELECT DISTINCT compartment FROM ({inner}) WHERE compartment IS NOT NULL LIMIT ?"
        );
        args.push(SqlValue::Integer(cap.min(i64::MAX as usize) as i64));
        let mut stmt = self.conn.prepare_cached(&sql).map_err(backend_err)?;
        let rows = stmt
            .query_map(params_from_iter(args), |r| r.get::<_, String>(0))
            .map_err(backend_err)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(backend_err)
    }

    fn count(&mut self, q: &IndexQuery, cap: u64) -> StoreResult<u64> {
        let (inner, mut args) = Self::search_sql(q, true);
        let sql = format!("SELECT count(*) FROM ({inner} LIMIT ?)");
        args.push(SqlValue::Integer(cap.min(i64::MAX as u64) as i64));
        let mut stmt = self.conn.prepare_cached(&sql).map_err(backend_err)?;
        let n: i64 = stmt
            .query_row(params_from_iter(args), |r| r.get(0))
            .map_err(backend_err)?;
        Ok(n as u64)
    }

    fn history(&mut self, q: &HistoryQuery) -> StoreResult<Vec<StoredVersion>> {
        let (mut sql, mut args) = Self::history_sql(q, VERSION_COLUMNS);
        sql.push_str(" ORDER BY v.seq DESC LIMIT ?");
        args.push(SqlValue::Integer(q.limit as i64));
        self.query_versions(&sql, args, None)
    }

    fn history_count(&mut self, q: &HistoryQuery, cap: u64) -> StoreResult<u64> {
        let (inner, mut args) = Self::history_sql(q, "1");
        let sql = format!("SELECT count(*) FROM ({inner} LIMIT ?)");
        args.push(SqlValue::Integer(cap.min(i64::MAX as u64) as i64));
        let mut stmt = self.conn.prepare_cached(&sql).map_err(backend_err)?;
        let n: i64 = stmt
            .query_row(params_from_iter(args), |r| r.get(0))
            .map_err(backend_err)?;
        Ok(n as u64)
    }

    fn data_key(&mut self, name: &str) -> StoreResult<Option<KeyRecord>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT name, kek_id, blob FROM data_keys WHERE name = ?1")
            .map_err(backend_err)?;
        stmt.query_row(params![name], |r| {
            Ok(KeyRecord {
                name: r.get(0)?,
                kek_id: r.get(1)?,
                blob: r.get(2)?,
            })
        })
        .optional()
        .map_err(backend_err)
    }

    fn data_keys_not_under(&mut self, kek_id: &str, limit: usize) -> StoreResult<Vec<KeyRecord>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT name, kek_id, blob FROM data_keys WHERE kek_id <> ?1 LIMIT ?2")
            .map_err(backend_err)?;
        let rows = stmt
            .query_map(params![kek_id, limit as i64], |r| {
                Ok(KeyRecord {
                    name: r.get(0)?,
                    kek_id: r.get(1)?,
                    blob: r.get(2)?,
                })
            })
            .map_err(backend_err)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(backend_err)
    }

    fn data_key_counts(&mut self) -> StoreResult<Vec<(String, u64)>> {
        self.grouped_counts(
            "SELECT kek_id, count(*) FROM data_keys GROUP BY kek_id ORDER BY kek_id",
        )
    }

    fn type_counts(&mut self) -> StoreResult<Vec<(String, u64)>> {
        self.grouped_counts(
            "SELECT rtype, count(*) FROM current WHERE state = 0 GROUP BY rtype ORDER BY rtype",
        )
    }

    fn sys_get(&mut self, kind: &str, key: &str) -> StoreResult<Option<SysRecord>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT version, value FROM sys WHERE kind = ?1 AND key = ?2")
            .map_err(backend_err)?;
        stmt.query_row(params![kind, key], |r| {
            Ok(SysRecord {
                kind: kind.to_string(),
                key: key.to_string(),
                version: r.get(0)?,
                value: r.get(1)?,
            })
        })
        .optional()
        .map_err(backend_err)
    }

    fn sys_list(&mut self, kind: &str) -> StoreResult<Vec<SysRecord>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT key, version, value FROM sys WHERE kind = ?1 ORDER BY key")
            .map_err(backend_err)?;
        let rows = stmt
            .query_map(params![kind], |r| {
                Ok(SysRecord {
                    kind: kind.to_string(),
                    key: r.get(0)?,
                    version: r.get(1)?,
                    value: r.get(2)?,
                })
            })
            .map_err(backend_err)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(backend_err)
    }

    fn audit_size(&mut self) -> StoreResult<u64> {
        audit_size_of(self.conn)
    }

    fn audit_entries(
        &mut self,
        start: u64,
        end: u64,
        limit: usize,
    ) -> StoreResult<Vec<AuditEntry>> {
        self.audit_rows(
            "SELECT idx, at, data FROM audit.audit_log WHERE idx >= ?1 AND idx < ?2 ORDER BY idx LIMIT ?3",
            &[
                SqlValue::Integer(start.min(i64::MAX as u64) as i64),
                SqlValue::Integer(end.min(i64::MAX as u64) as i64),
                SqlValue::Integer(limit.min(i64::MAX as usize) as i64),
            ],
        )
    }

    fn audit_hashes(&mut self, indexes: &[u64]) -> StoreResult<Vec<[u8; 32]>> {
        read_audit_hashes(self.conn, indexes)
    }

    fn audit_hash_range(&mut self, lo: u64, hi: u64) -> StoreResult<Vec<(u64, [u8; 32])>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT n, hash FROM audit.audit_hash WHERE n >= ?1 AND n < ?2 ORDER BY n",
            )
            .map_err(backend_err)?;
        let clamp = |x: u64| x.min(i64::MAX as u64) as i64;
        let rows = stmt
            .query_map(params![clamp(lo), clamp(hi)], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Vec<u8>>(1)?))
            })
            .map_err(backend_err)?;
        let mut out = Vec::new();
        for row in rows {
            let (n, blob) = row.map_err(backend_err)?;
            let hash = <[u8; 32]>::try_from(blob.as_slice())
                .map_err(|_| StoreError::Backend(format!("audit hash {n} is malformed")))?;
            out.push((n, hash));
        }
        Ok(out)
    }

    fn audit_search(&mut self, q: &AuditQuery) -> StoreResult<Vec<AuditEntry>> {
        let mut sql = String::from("SELECT a.idx, a.at, a.data FROM audit.audit_log a");
        let mut args: Vec<SqlValue> = Vec::new();
        let mut conds: Vec<String> = Vec::new();
        for (kind, token) in [(KEY_PATIENT, &q.patient), (KEY_AGENT, &q.agent)] {
            if let Some(t) = token {
                args.push(SqlValue::Text(t.clone()));
                conds.push(format!("a.idx IN ({})", keyed_indexes(kind, args.len())));
            }
        }
        let mut cond = |c: &str, v: SqlValue, args: &mut Vec<SqlValue>| {
            args.push(v);
            conds.push(format!("{c} ?{}", args.len()));
        };
        if let Some(a) = &q.action {
            cond("a.action =", SqlValue::Text(a.clone()), &mut args);
        }
        if let Some(o) = q.outcome {
            cond("a.outcome =", SqlValue::Integer(o.into()), &mut args);
        }
        if let Some(f) = q.from {
            cond("a.at >=", SqlValue::Integer(f), &mut args);
        }
        if let Some(u) = q.until {
            cond("a.at <", SqlValue::Integer(u), &mut args);
        }
        if let Some(b) = q.before {
            cond(
                "a.idx <",
                SqlValue::Integer(b.min(i64::MAX as u64) as i64),
                &mut args,
            );
        }
        if let Some(b) = q.after {
            cond(
                "a.idx >",
                SqlValue::Integer(b.min(i64::MAX as u64) as i64),
                &mut args,
            );
        }
        if !conds.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&conds.join(" AND "));
        }
        sql.push_str(if q.ascending {
            " ORDER BY a.idx ASC"
        } else {
            " ORDER BY a.idx DESC"
        });
        args.push(SqlValue::Integer(q.limit.min(i64::MAX as usize) as i64));
        sql.push_str(&format!(" LIMIT ?{}", args.len()));
        self.audit_rows(&sql, &args)
    }

    fn log_read(&mut self, log: &str, after: i64, limit: usize) -> StoreResult<Vec<LogEntry>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT seq, at, value FROM sys_log WHERE log = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )
            .map_err(backend_err)?;
        let rows = stmt
            .query_map(params![log, after, limit as i64], |r| {
                Ok(LogEntry {
                    seq: r.get(0)?,
                    log: log.to_string(),
                    at: r.get(1)?,
                    value: r.get(2)?,
                })
            })
            .map_err(backend_err)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(backend_err)
    }
}

/// Reads stored Merkle hashes through the transaction's connection (so a
/// job sees its own uncommitted appends).
struct TxHashes<'c>(&'c Connection, &'c AppendCache);

impl tlog_tiles::HashReader for TxHashes<'_> {
    fn read_hashes(
        &self,
        indexes: &[u64],
    ) -> Result<Vec<tlog_tiles::Hash>, tlog_tiles::tlog::Error> {
        let mut out = Vec::with_capacity(indexes.len());
        for &n in indexes {
            let h = match self.1.hash(n) {
                Some(h) => h,
                None => read_audit_hashes(self.0, &[n])
                    .map_err(|_| tlog_tiles::tlog::Error::IndexesNotInTree)?[0],
            };
            out.push(tlog_tiles::Hash(h));
        }
        Ok(out)
    }
}

/// What one write job appended so far: the next leaf index and the stored
/// hashes it wrote (the next appends read mostly those), so a burst of
/// appends in one job costs inserts, not lookups.
#[derive(Default)]
pub(crate) struct AppendCache {
    next: Option<u64>,
    hashes: std::collections::VecDeque<(u64, [u8; 32])>,
}

impl AppendCache {
    /// Hashes kept: the right edge of the tree is at most 64 nodes deep.
    const KEEP: usize = 256;

    fn hash(&self, n: u64) -> Option<[u8; 32]> {
        self.hashes
            .iter()
            .rev()
            .find(|(k, _)| *k == n)
            .map(|(_, h)| *h)
    }
}

fn read_audit_hashes(conn: &Connection, indexes: &[u64]) -> StoreResult<Vec<[u8; 32]>> {
    let mut stmt = conn
        .prepare_cached("SELECT hash FROM audit.audit_hash WHERE n = ?1")
        .map_err(backend_err)?;
    let mut out = Vec::with_capacity(indexes.len());
    for &n in indexes {
        let blob: Option<Vec<u8>> = stmt
            .query_row(params![n as i64], |r| r.get(0))
            .optional()
            .map_err(backend_err)?;
        let hash = blob
            .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
            .ok_or_else(|| {
                StoreError::Backend(format!("audit hash {n} is missing or malformed"))
            })?;
        out.push(hash);
    }
    Ok(out)
}

fn audit_size_of(conn: &Connection) -> StoreResult<u64> {
    conn.prepare_cached("SELECT COALESCE(MAX(idx) + 1, 0) FROM audit.audit_log")
        .and_then(|mut s| s.query_row([], |r| r.get::<_, i64>(0)))
        .map(|n| n as u64)
        .map_err(backend_err)
}

impl SqliteTx<'_> {
    fn audit_rows(&self, sql: &str, args: &[SqlValue]) -> StoreResult<Vec<AuditEntry>> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(backend_err)?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(args.iter()), |r| {
                Ok(AuditEntry {
                    index: r.get::<_, i64>(0)? as u64,
                    at: r.get(1)?,
                    data: r.get(2)?,
                })
            })
            .map_err(backend_err)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(backend_err)
    }
}

/// SQL for the indexes of events with token `?{key}` of kind `kind`: the
/// sealed blocks' postings (one range of their primary key), then the tail
/// and the log's rows from `audit_key_sealed.through` on (the blocks whose
/// seal has not finished; an agent and a lone patient are columns of the
/// event's row). (A set: it may name an index twice.)
pub(crate) fn keyed_indexes(kind: i64, key: usize) -> String {
    let column = if kind == KEY_AGENT {
        "agent"
    } else {
        "patient"
    };
    format!(
        "SELECT p.block * {KEY_BLOCK} + j.value FROM audit.audit_key_post p, json_each(p.offsets) j \
         WHERE p.kind = {kind} AND p.key = ?{key} \
         UNION ALL SELECT idx FROM audit.audit_key_tail WHERE kind = {kind} AND key = ?{key} \
         UNION ALL SELECT idx FROM audit.audit_log WHERE idx >= \
         (SELECT COALESCE(MAX(through), 0) FROM audit.audit_key_sealed) AND {column} = ?{key}"
    )
}

/// Append an event to the audit file: its leaf and its Merkle hashes.
pub(crate) fn append_audit(
    conn: &Connection,
    cache: &mut AppendCache,
    e: &AuditAppend<'_>,
) -> StoreResult<(u64, Option<i64>)> {
    let n = match cache.next {
        Some(n) => n,
        None => audit_size_of(conn)?,
    };
    // An event of one patient (every read of a record) keeps its token in
    // its own row; several go to the tail.
    let only_patient = match e.patients {
        [p] => Some(p.as_str()),
        _ => None,
    };
    let leaf = tlog_tiles::record_hash(e.data);
    let hashes = tlog_tiles::stored_hashes_for_record_hash(n, leaf, &TxHashes(conn, cache))
        .map_err(|err| StoreError::Backend(format!("audit tree: {err}")))?;
    conn.prepare_cached(
        "INSERT INTO audit.audit_log (idx, at, action, outcome, agent, patient, data) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .map_err(backend_err)?
    .execute(params![n as i64, e.at, e.action, e.outcome, e.agent, only_patient, e.data])
    .map_err(backend_err)?;
    let first = tlog_tiles::stored_hash_index(0, n);
    let mut put = conn
        .prepare_cached("INSERT INTO audit.audit_hash (n, hash) VALUES (?1, ?2)")
        .map_err(backend_err)?;
    for (i, h) in hashes.iter().enumerate() {
        put.execute(params![(first + i as u64) as i64, &h.0[..]])
            .map_err(backend_err)?;
        cache.hashes.push_back((first + i as u64, h.0));
    }
    while cache.hashes.len() > AppendCache::KEEP {
        cache.hashes.pop_front();
    }
    cache.next = Some(n + 1);
    let mut tail_rowid = None;
    // Most events have one patient or none: no tail statement to look up.
    if only_patient.is_none() && !e.patients.is_empty() {
        let mut key = conn
            .prepare_cached("INSERT INTO audit.audit_key_tail (idx, kind, key) VALUES (?1, ?2, ?3)")
            .map_err(backend_err)?;
        for p in e.patients {
            key.execute(params![n as i64, KEY_PATIENT, p])
                .map_err(backend_err)?;
            tail_rowid = Some(conn.last_insert_rowid());
        }
    }
    Ok((n, tail_rowid))
}

impl WriteTx for SqliteTx<'_> {
    fn audit_append(&mut self, e: &AuditAppend<'_>) -> StoreResult<u64> {
        let (n, tail_rowid) = append_audit(self.conn, self.append_cache, e)?;
        self.appended.push(Appended {
            idx: n,
            tail_rowid,
            at: e.at,
            action: e.action.to_string(),
            outcome: e.outcome,
            agent: e.agent.map(str::to_string),
            patients: e.patients.to_vec(),
            data: e.data.to_vec(),
        });
        Ok(n)
    }

    fn put(&mut self, v: &NewVersion, index: &IndexEntries, expect: Expect) -> StoreResult<()> {
        *self.main_dirty = true;
        if expect == Expect::Absent && !v.deleted && self.insert_new(v, index)? {
            return Ok(());
        }
        let existing: Option<(i64, i64, i64, Option<Vec<u8>>)> = {
            let mut stmt = self
                .conn
                .prepare_cached("SELECT rid, version, state, index_blob FROM current WHERE rtype = ?1 AND id = ?2")
                .map_err(backend_err)?;
            stmt.query_row(params![v.rtype, v.id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .optional()
            .map_err(backend_err)?
        };
        let conflict = |expected: String, found: String| StoreError::Conflict {
            rtype: v.rtype.clone(),
            id: v.id.clone(),
            expected,
            found,
        };
        let state = if v.deleted {
            RecordState::Deleted
        } else {
            RecordState::Live
        } as i64;
        let blob = if v.deleted {
            None
        } else {
            Some(encode_index(index))
        };
        let rid = match existing {
            None => {
                if let Expect::Version(n) = expect {
                    return Err(conflict(format!("version {n}"), "no resource".into()));
                }
                let mut stmt = self
                    .conn
                    .prepare_cached(
                        "INSERT INTO current (rtype, id, version, last_updated, state, compartment, index_blob) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    )
                    .map_err(backend_err)?;
                stmt.execute(params![
                    v.rtype,
                    v.id,
                    v.version,
                    v.last_updated,
                    state,
                    v.compartment,
                    blob
                ])
                .map_err(backend_err)?;
                self.conn.last_insert_rowid()
            }
            Some((rid, cur_version, cur_state, old_blob)) => {
                if cur_state == RecordState::Erased as i64 {
                    return Err(conflict(
                        "a writable resource".into(),
                        "an erased resource".into(),
                    ));
                }
                match expect {
                    Expect::Absent if cur_state == RecordState::Live as i64 => {
                        return Err(conflict(
                            "no resource".into(),
                            format!("version {cur_version}"),
                        ));
                    }
                    Expect::Version(n) if n != cur_version => {
                        return Err(conflict(
                            format!("version {n}"),
                            format!("version {cur_version}"),
                        ));
                    }
                    _ => {}
                }
                if v.version <= cur_version {
                    return Err(conflict(
                        format!("a version above {cur_version}"),
                        format!("version {}", v.version),
                    ));
                }
                if let Some(old) = old_blob.as_deref().and_then(decode_index) {
                    self.delete_index(rid, &old)?;
                }
                let mut stmt = self
                    .conn
                    .prepare_cached(
                        "UPDATE current SET version = ?2, last_updated = ?3, state = ?4, compartment = ?5, \
                         index_blob = ?6 WHERE rid = ?1",
                    )
                    .map_err(backend_err)?;
                stmt.execute(params![
                    rid,
                    v.version,
                    v.last_updated,
                    state,
                    v.compartment,
                    blob
                ])
                .map_err(backend_err)?;
                rid
            }
        };
        {
            let mut stmt = self
                .conn
                .prepare_cached(
                    "INSERT INTO versions (rid, rtype, version, last_updated, state, key_name, body) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .map_err(backend_err)?;
            stmt.execute(params![
                rid,
                v.rtype,
                v.version,
                v.last_updated,
                state,
                v.key_name,
                v.body
            ])
            .map_err(backend_err)?;
        }
        if !v.deleted {
            self.insert_index(rid, index)?;
        }
        Ok(())
    }

    fn sys_put(
        &mut self,
        kind: &str,
        key: &str,
        value: &[u8],
        expect: Option<i64>,
    ) -> StoreResult<i64> {
        *self.main_dirty = true;
        let current: Option<i64> = self
            .conn
            .prepare_cached("SELECT version FROM sys WHERE kind = ?1 AND key = ?2")
            .map_err(backend_err)?
            .query_row(params![kind, key], |r| r.get(0))
            .optional()
            .map_err(backend_err)?;
        let found = current.unwrap_or(0);
        if let Some(want) = expect
            && want != found
        {
            return Err(StoreError::Conflict {
                rtype: format!("sys:{kind}"),
                id: key.to_string(),
                expected: want.to_string(),
                found: found.to_string(),
            });
        }
        let version = found + 1;
        *self.sys_changed = true;
        self.conn
            .prepare_cached(
                "INSERT INTO sys (kind, key, version, value) VALUES (?1, ?2, ?3, ?4)                  ON CONFLICT (kind, key) DO UPDATE SET version = excluded.version, value = excluded.value",
            )
            .map_err(backend_err)?
            .execute(params![kind, key, version, value])
            .map_err(backend_err)?;
        Ok(version)
    }

    fn sys_delete(&mut self, kind: &str, key: &str) -> StoreResult<bool> {
        *self.main_dirty = true;
        *self.sys_changed = true;
        let n = self
            .conn
            .prepare_cached("DELETE FROM sys WHERE kind = ?1 AND key = ?2")
            .map_err(backend_err)?
            .execute(params![kind, key])
            .map_err(backend_err)?;
        Ok(n > 0)
    }

    fn log_append(&mut self, log: &str, at: i64, value: &[u8]) -> StoreResult<i64> {
        *self.main_dirty = true;
        self.conn
            .prepare_cached("INSERT INTO sys_log (log, at, value) VALUES (?1, ?2, ?3)")
            .map_err(backend_err)?
            .execute(params![log, at, value])
            .map_err(backend_err)?;
        Ok(self.conn.last_insert_rowid())
    }

    fn put_data_key(&mut self, key: &KeyRecord, replace: bool) -> StoreResult<()> {
        *self.main_dirty = true;
        let sql = if replace {
            "INSERT OR REPLACE INTO data_keys (name, kek_id, blob) VALUES (?1, ?2, ?3)"
        } else {
            "INSERT INTO data_keys (name, kek_id, blob) VALUES (?1, ?2, ?3)"
        };
        let mut stmt = self.conn.prepare_cached(sql).map_err(backend_err)?;
        stmt.execute(params![key.name, key.kek_id, key.blob])
            .map_err(|e| match e {
                rusqlite::Error::SqliteFailure(f, _)
                    if f.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    StoreError::Conflict {
                        rtype: "DataKey".into(),
                        id: key.name.clone(),
                        expected: "no key".into(),
                        found: "an existing key".into(),
                    }
                }
                e => backend_err(e),
            })?;
        Ok(())
    }

    fn erase_compartment(&mut self, patient_id: &str, key_name: &str) -> StoreResult<u64> {
        *self.main_dirty = true;
        let rows: Vec<(i64, Option<Vec<u8>>)> = {
            let mut stmt = self
                .conn
                .prepare_cached(
                    "SELECT rid, index_blob FROM current WHERE compartment = ?1 \
                     OR (rtype = 'Patient' AND id = ?1)",
                )
                .map_err(backend_err)?;
            let it = stmt
                .query_map(params![patient_id], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(backend_err)?;
            it.collect::<Result<Vec<_>, _>>().map_err(backend_err)?
        };
        for (rid, blob) in &rows {
            if let Some(old) = blob.as_deref().and_then(decode_index) {
                self.delete_index(*rid, &old)?;
            }
            self.conn
                .prepare_cached("UPDATE current SET state = 2, index_blob = NULL WHERE rid = ?1")
                .map_err(backend_err)?
                .execute(params![rid])
                .map_err(backend_err)?;
        }
        self.conn
            .prepare_cached("DELETE FROM data_keys WHERE name = ?1")
            .map_err(backend_err)?
            .execute(params![key_name])
            .map_err(backend_err)?;
        Ok(rows.len() as u64)
    }
}

impl SqliteTx<'_> {
    /// Rows of `(name, count)` from a `GROUP BY` query.
    fn grouped_counts(&self, sql: &str) -> StoreResult<Vec<(String, u64)>> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(backend_err)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })
            .map_err(backend_err)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(backend_err)
    }

    /// The common case of a create: the id is new. One insert instead of a
    /// probe and an insert; `false` (nothing written) when the id exists,
    /// and the general path decides.
    fn insert_new(&mut self, v: &NewVersion, index: &IndexEntries) -> StoreResult<bool> {
        let inserted = self
            .conn
            .prepare_cached(
                "INSERT INTO current (rtype, id, version, last_updated, state, compartment, index_blob) \
                 VALUES (?1, ?2, ?3, ?4, 0, ?5, ?6) ON CONFLICT (rtype, id) DO NOTHING",
            )
            .map_err(backend_err)?
            .execute(params![v.rtype, v.id, v.version, v.last_updated, v.compartment, encode_index(index)])
            .map_err(backend_err)?;
        if inserted == 0 {
            return Ok(false);
        }
        let rid = self.conn.last_insert_rowid();
        self.conn
            .prepare_cached(
                "INSERT INTO versions (rid, rtype, version, last_updated, state, key_name, body) \
                 VALUES (?1, ?2, ?3, ?4, 0, ?5, ?6)",
            )
            .map_err(backend_err)?
            .execute(params![
                rid,
                v.rtype,
                v.version,
                v.last_updated,
                v.key_name,
                v.body
            ])
            .map_err(backend_err)?;
        self.insert_index(rid, index)?;
        Ok(true)
    }

    fn insert_index(&mut self, rid: i64, index: &IndexEntries) -> StoreResult<()> {
        {
            let mut stmt = self
                .conn
                .prepare_cached("INSERT OR IGNORE INTO idx_token (token, rid) VALUES (?1, ?2)")
                .map_err(backend_err)?;
            for t in &index.tokens {
                stmt.execute(params![&t[..], rid]).map_err(backend_err)?;
            }
        }
        if index.ranges.is_empty() {
            return Ok(());
        }
        {
            let mut stmt = self
                .conn
                .prepare_cached(
                    "INSERT OR IGNORE INTO idx_range (pkey, lo, rid, hi) VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(backend_err)?;
            for r in &index.ranges {
                stmt.execute(params![r.pkey, r.lo, rid, r.hi])
                    .map_err(backend_err)?;
            }
        }
        let mut stmt = self
            .conn
            .prepare_cached(
                "INSERT INTO idx_sort (pkey, rid, min_lo, max_hi) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (pkey, rid) DO UPDATE SET min_lo = min(min_lo, excluded.min_lo), \
                 max_hi = max(max_hi, excluded.max_hi)",
            )
            .map_err(backend_err)?;
        for r in index.ranges.iter().filter(|r| r.sortable) {
            stmt.execute(params![r.pkey, rid, r.lo, r.hi])
                .map_err(backend_err)?;
        }
        Ok(())
    }

    fn delete_index(&mut self, rid: i64, index: &IndexEntries) -> StoreResult<()> {
        {
            let mut stmt = self
                .conn
                .prepare_cached("DELETE FROM idx_token WHERE token = ?1 AND rid = ?2")
                .map_err(backend_err)?;
            for t in &index.tokens {
                stmt.execute(params![&t[..], rid]).map_err(backend_err)?;
            }
        }
        let mut del_range = self
            .conn
            .prepare_cached(
                "DELETE FROM idx_range WHERE pkey = ?1 AND lo = ?2 AND rid = ?3 AND hi = ?4",
            )
            .map_err(backend_err)?;
        for r in &index.ranges {
            del_range
                .execute(params![r.pkey, r.lo, rid, r.hi])
                .map_err(backend_err)?;
        }
        drop(del_range);
        let mut del_sort = self
            .conn
            .prepare_cached("DELETE FROM idx_sort WHERE pkey = ?1 AND rid = ?2")
            .map_err(backend_err)?;
        for r in index.ranges.iter().filter(|r| r.sortable) {
            del_sort
                .execute(params![r.pkey, rid])
                .map_err(backend_err)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A commit waits for company only after a commit of several jobs, and
    /// never with the delay off.
    #[test]
    fn only_a_busy_writer_delays_its_commit() {
        let at = std::time::Instant::now();
        let delay = std::time::Duration::from_millis(2);
        assert_eq!(more_jobs_until((at, 0), delay), None);
        assert_eq!(more_jobs_until((at, DELAY_AFTER_JOBS - 1), delay), None);
        assert_eq!(
            more_jobs_until((at, DELAY_AFTER_JOBS), delay),
            Some(at + delay)
        );
        assert_eq!(more_jobs_until((at, 200), std::time::Duration::ZERO), None);
    }

    /// With an hour's delay, writes of one caller at a time (each commit
    /// holds one job) are still answered at once.
    #[tokio::test]
    async fn a_lone_write_is_never_held_back() {
        use crate::StoreExt;
        let dir = tempfile::tempdir().unwrap();
        let mut config = SqliteConfig::new(dir.path().join("t.db"));
        config.commit_delay = std::time::Duration::from_secs(3600);
        let store = Arc::new(SqliteStore::open(config).unwrap());
        let writes = async {
            for i in 0..20u64 {
                let n: u64 = store.write(move |_tx| Ok(i)).await.unwrap();
                assert_eq!(n, i);
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(300), writes)
            .await
            .expect("lone writes waited for the commit delay");
        let store2 = store.clone();
        tokio::task::spawn_blocking(move || store2.close())
            .await
            .unwrap();
    }

    /// The WAL hook marks exactly the files each commit wrote: the syncer
    /// syncs those before it answers, so a file it missed would leave
    /// acknowledged commits unsynced.
    #[test]
    fn the_wal_hook_marks_the_files_a_commit_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let config = SqliteConfig::new(dir.path().join("t.db"));
        let conn = open_connection(&config, false).unwrap();
        conn.execute_batch("CREATE TABLE main.m (x); CREATE TABLE audit.a (x);")
            .unwrap();
        conn.wal_hook(Some(note_wal_frames));
        let written = |sql: &str| {
            WAL_WRITTEN.with(|w| w.set(0));
            conn.execute_batch(&format!("BEGIN IMMEDIATE; {sql} COMMIT;"))
                .unwrap();
            WAL_WRITTEN.with(|w| w.replace(0))
        };
        assert_eq!(written("INSERT INTO main.m VALUES (1);"), 1);
        assert_eq!(written("INSERT INTO audit.a VALUES (1);"), 2);
        assert_eq!(
            written("INSERT INTO main.m VALUES (2); INSERT INTO audit.a VALUES (2);"),
            3
        );
        assert_eq!(
            written("SELECT count(*) FROM main.m;"),
            0,
            "nothing written"
        );
    }

    /// A cached statement with `LIMIT ?` runs again with another limit
    /// without being prepared again.
    #[test]
    fn a_bound_limit_does_not_prepare_the_statement_again() {
        let dir = tempfile::tempdir().unwrap();
        let config = SqliteConfig::new(dir.path().join("t.db"));
        let conn = open_connection(&config, false).unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        let sql = "SELECT rid FROM current WHERE rtype = ? ORDER BY rid LIMIT ?";
        for limit in [10, 11, 12, 10] {
            let mut stmt = conn.prepare_cached(sql).unwrap();
            let n = stmt
                .query_map(params!["Patient", limit], |r| r.get::<_, i64>(0))
                .unwrap()
                .count();
            assert_eq!(n, 0);
            assert_eq!(
                stmt.get_status(rusqlite::StatementStatus::RePrepare),
                0,
                "prepared again for LIMIT {limit}"
            );
        }
    }
}
