//! The PostgreSQL backend: several Custos nodes on one database.
//!
//! The same contract as the embedded SQLite store (the conformance suite
//! runs on both), with what a shared database adds:
//!
//! - **Writes, one order for the whole cluster.** Each node has one writer
//!   thread that group-commits its queued jobs in one transaction (each job
//!   in a savepoint, as on SQLite). Every write transaction first takes a
//!   transaction-scoped advisory lock, so write batches of all nodes run one
//!   at a time. That is what gives the audit log a single order without a
//!   separate sequencer: an event's leaf index is the log's size inside the
//!   locked transaction, dense and gap-free (a database `SEQUENCE` would
//!   leave gaps on rollback, and a Merkle log has no holes), and it commits
//!   atomically with the change it describes. Optimistic locking holds
//!   across nodes for the same reason, and row ids and version sequence
//!   numbers grow in commit order, which keeps keyset paging stable.
//! - **Reads** run in `REPEATABLE READ READ ONLY` transactions (one
//!   snapshot per job) on pooled connections (`r2d2`), on Tokio's blocking
//!   pool.
//! - **Leadership** ([`Store::campaign`]): a session-level advisory lock held
//!   on a dedicated connection. PostgreSQL releases it the moment the
//!   holder's connection ends, so when a node dies another takes over at
//!   its next attempt (every second).
//! - **Migrations** are versioned ([`MIGRATIONS`]) and applied at open under
//!   an advisory lock, so that nodes starting together do not race.
//! - Every connection has a `statement_timeout`; TLS to the database uses
//!   rustls (`sslmode=require` in the URL, roots from `ca_file` or the
//!   Mozilla set).
//!
//! Like every backend, it only ever receives ciphertext, keyed hashes and
//! non-identifying ranges.
use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row, Statement};

use crate::model::*;
use crate::{Lease, ReadJob, Store, StoreStats, WriteJob};

/// Settings of the PostgreSQL backend.
#[derive(Debug, Clone)]
pub struct PostgresConfig {
    /// A `postgres://` (or `postgresql://`) URL; `sslmode=require` asks for TLS.
    pub url: String,
    /// A schema to keep the tables in (created if missing); `None` is the
    /// connection's default (`public`). Lets one database hold several
    /// independent stores (tests, tenants).
    pub schema: Option<String>,
    /// Connections in the read pool of this node.
    pub pool_size: u32,
    /// Any statement running longer is cancelled by the server.
    pub statement_timeout: Duration,
    /// How long to wait for a connection (to the server, or from the pool).
    pub connect_timeout: Duration,
    /// PEM file of the CA certificates trusted for TLS to the database
    /// (default: the Mozilla root set).
    pub ca_file: Option<std::path::PathBuf>,
}

impl PostgresConfig {
    /// Defaults for the database at `url`.
    pub fn new(url: impl Into<String>) -> PostgresConfig {
        PostgresConfig {
            url: url.into(),
            schema: None,
            pool_size: 16,
            statement_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            ca_file: None,
        }
    }
}

/// Whether `url` names a PostgreSQL database.
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// One versioned schema migration.
pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

/// The schema, as the ordered list of migrations that build it. A released
/// migration is never edited: changes come as new entries.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "records, index, keys, system records, audit log",
    sql: r#"
CREATE TABLE current (
    rid BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rtype TEXT NOT NULL,
    id TEXT NOT NULL,
    version BIGINT NOT NULL,
    last_updated BIGINT NOT NULL,
    state BIGINT NOT NULL,
    compartment TEXT,
    index_blob BYTEA,
    UNIQUE (rtype, id)
);
CREATE INDEX current_type_updated ON current (rtype, last_updated);
CREATE INDEX current_type_rid ON current (rtype, rid) WHERE state = 0;
CREATE INDEX current_compartment ON current (compartment) WHERE compartment IS NOT NULL;
CREATE TABLE versions (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rid BIGINT NOT NULL,
    rtype TEXT NOT NULL,
    version BIGINT NOT NULL,
    last_updated BIGINT NOT NULL,
    state BIGINT NOT NULL,
    key_name TEXT NOT NULL,
    body BYTEA NOT NULL
);
CREATE UNIQUE INDEX versions_rid ON versions (rid, version);
CREATE INDEX versions_type ON versions (rtype, seq);
CREATE TABLE idx_token (
    token BYTEA NOT NULL,
    rid BIGINT NOT NULL,
    PRIMARY KEY (token, rid)
);
CREATE TABLE idx_range (
    pkey BIGINT NOT NULL,
    lo DOUBLE PRECISION NOT NULL,
    rid BIGINT NOT NULL,
    hi DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (pkey, lo, rid, hi)
);
CREATE TABLE idx_sort (
    pkey BIGINT NOT NULL,
    rid BIGINT NOT NULL,
    min_lo DOUBLE PRECISION NOT NULL,
    max_hi DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (pkey, rid)
);
CREATE TABLE data_keys (
    name TEXT PRIMARY KEY,
    kek_id TEXT NOT NULL,
    blob BYTEA NOT NULL
);
CREATE TABLE sys (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    version BIGINT NOT NULL,
    value BYTEA NOT NULL,
    PRIMARY KEY (kind, key)
);
CREATE TABLE sys_log (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    log TEXT NOT NULL,
    at BIGINT NOT NULL,
    value BYTEA NOT NULL
);
CREATE INDEX sys_log_by_log ON sys_log (log, seq);
CREATE TABLE audit_log (
    idx BIGINT PRIMARY KEY,
    at BIGINT NOT NULL,
    action TEXT NOT NULL,
    outcome BIGINT NOT NULL,
    agent TEXT,
    data BYTEA NOT NULL
);
CREATE INDEX audit_log_at ON audit_log (at);
CREATE INDEX audit_log_agent ON audit_log (agent, idx) WHERE agent IS NOT NULL;
CREATE TABLE audit_patient (
    patient TEXT NOT NULL,
    idx BIGINT NOT NULL,
    PRIMARY KEY (patient, idx)
);
CREATE TABLE audit_hash (
    n BIGINT PRIMARY KEY,
    hash BYTEA NOT NULL
);
"#,
}];

fn backend_err(e: tokio_postgres::Error) -> StoreError {
    // The server's message (constraint names, SQL state), never parameters.
    match e.as_db_error() {
        Some(db) => {
            StoreError::Backend(format!("postgres: {} ({})", db.message(), db.code().code()))
        }
        None => StoreError::Backend(format!("postgres: {e}")),
    }
}

/// How connections are made: TLS or not, per the URL's `sslmode`.
#[derive(Clone)]
enum Connector {
    Plain,
    Tls(tokio_postgres_rustls::MakeRustlsConnect),
}

fn connector(config: &PostgresConfig, pg: &tokio_postgres::Config) -> StoreResult<Connector> {
    // TLS only when asked for: `prefer` (the default) against a server with
    // a self-signed certificate would otherwise fail instead of falling back.
    if pg.get_ssl_mode() != tokio_postgres::config::SslMode::Require {
        return Ok(Connector::Plain);
    }
    let mut roots = rustls::RootCertStore::empty();
    match &config.ca_file {
        Some(path) => {
            use rustls::pki_types::pem::PemObject;
            let certs = rustls::pki_types::CertificateDer::pem_file_iter(path).map_err(|e| {
                StoreError::Backend(format!("database CA file {}: {e}", path.display()))
            })?;
            for cert in certs {
                let cert = cert.map_err(|e| {
                    StoreError::Backend(format!("database CA file {}: {e}", path.display()))
                })?;
                roots.add(cert).map_err(|e| {
                    StoreError::Backend(format!("database CA file {}: {e}", path.display()))
                })?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| StoreError::Backend(format!("database TLS: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Connector::Tls(
        tokio_postgres_rustls::MakeRustlsConnect::new(tls),
    ))
}

/// A connection with its prepared statements.
///
/// The client is `tokio-postgres`, driven from the synchronous store jobs
/// with [`Handle::block_on`]: every method here runs on a blocking thread
/// (Tokio's blocking pool, the writer thread, a lease thread), never on an
/// async worker. (The blocking `postgres` crate would be simpler to call,
/// but it runs a runtime per client and panics when one is dropped on an
/// async thread.)
pub(crate) struct PgConn {
    client: Client,
    handle: Handle,
    stmts: HashMap<String, Statement>,
}

type Args = Vec<Box<dyn ToSql + Sync + Send>>;

fn refs(args: &Args) -> Vec<&(dyn ToSql + Sync)> {
    args.iter()
        .map(|a| a.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

/// Number the `?` placeholders of `sql` as `$1, $2, …` (the SQL built here
/// contains no other `?`).
fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

impl PgConn {
    fn stmt(&mut self, sql: &str) -> StoreResult<Statement> {
        if let Some(s) = self.stmts.get(sql) {
            return Ok(s.clone());
        }
        if self.stmts.len() >= 512 {
            self.stmts.clear();
        }
        let s = self
            .handle
            .block_on(self.client.prepare(sql))
            .map_err(backend_err)?;
        self.stmts.insert(sql.to_string(), s.clone());
        Ok(s)
    }

    fn query(&mut self, sql: &str, args: &[&(dyn ToSql + Sync)]) -> StoreResult<Vec<Row>> {
        let s = self.stmt(sql)?;
        self.handle
            .block_on(self.client.query(&s, args))
            .map_err(backend_err)
    }

    fn query_opt(&mut self, sql: &str, args: &[&(dyn ToSql + Sync)]) -> StoreResult<Option<Row>> {
        let s = self.stmt(sql)?;
        self.handle
            .block_on(self.client.query_opt(&s, args))
            .map_err(backend_err)
    }

    fn query_one(&mut self, sql: &str, args: &[&(dyn ToSql + Sync)]) -> StoreResult<Row> {
        let s = self.stmt(sql)?;
        self.handle
            .block_on(self.client.query_one(&s, args))
            .map_err(backend_err)
    }

    fn execute(&mut self, sql: &str, args: &[&(dyn ToSql + Sync)]) -> StoreResult<u64> {
        let s = self.stmt(sql)?;
        self.handle
            .block_on(self.client.execute(&s, args))
            .map_err(backend_err)
    }

    fn batch(&mut self, sql: &str) -> StoreResult<()> {
        self.handle
            .block_on(self.client.batch_execute(sql))
            .map_err(backend_err)
    }

    /// A round trip that proves the session is alive.
    fn ping(&mut self) -> bool {
        self.handle.block_on(self.client.simple_query("")).is_ok()
    }
}

/// Makes pooled connections (r2d2 does the pooling, health checks and limits).
#[derive(Clone)]
struct Manager {
    pg: tokio_postgres::Config,
    connector: Connector,
    handle: Handle,
}

impl Manager {
    fn connect_client(&self) -> Result<Client, tokio_postgres::Error> {
        let pg = self.pg.clone();
        let connector = self.connector.clone();
        let rt = self.handle.clone();
        self.handle.block_on(async move {
            // The connection drives the socket; it ends when the client is dropped.
            match connector {
                Connector::Plain => {
                    let (client, conn) = pg.connect(NoTls).await?;
                    rt.spawn(async move {
                        let _ = conn.await;
                    });
                    Ok(client)
                }
                Connector::Tls(t) => {
                    let (client, conn) = pg.connect(t).await?;
                    rt.spawn(async move {
                        let _ = conn.await;
                    });
                    Ok(client)
                }
            }
        })
    }
}

impl r2d2::ManageConnection for Manager {
    type Connection = PgConn;
    type Error = tokio_postgres::Error;

    fn connect(&self) -> Result<PgConn, tokio_postgres::Error> {
        Ok(PgConn {
            client: self.connect_client()?,
            handle: self.handle.clone(),
            stmts: HashMap::new(),
        })
    }

    fn is_valid(&self, conn: &mut PgConn) -> Result<(), tokio_postgres::Error> {
        let h = conn.handle.clone();
        h.block_on(conn.client.simple_query("")).map(|_| ())
    }

    fn has_broken(&self, conn: &mut PgConn) -> bool {
        conn.client.is_closed()
    }
}

type Reply = crate::WriteReply;

/// The PostgreSQL store of one node.
pub struct PostgresStore {
    pool: r2d2::Pool<Manager>,
    /// For connections outside the pool (leases).
    manager: Manager,
    writer: Mutex<Option<mpsc::Sender<(WriteJob, Reply)>>>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Advisory-lock keys of this store (derived from its schema).
    lock_base: i64,
    description: String,
}

/// Lock namespaces (added to the store's base key).
const LOCK_WRITE: i64 = 1;
const LOCK_MIGRATE: i64 = 2;
const LOCK_ROLES: i64 = 16;

fn lock_base(schema: &str) -> i64 {
    // A stable 48-bit value per schema, leaving room for the namespaces above.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in schema.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    ((h >> 16) << 8) as i64
}

fn role_key(base: i64, role: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in role.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    base + LOCK_ROLES + (h % 200) as i64
}

fn valid_schema(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !s.as_bytes()[0].is_ascii_digit()
}

impl PostgresStore {
    /// Connect, apply pending migrations and start the writer thread. Blocks:
    /// call it inside a Tokio runtime but off its async workers (in
    /// `spawn_blocking`).
    pub fn open(config: PostgresConfig) -> StoreResult<PostgresStore> {
        let handle = Handle::try_current().map_err(|_| {
            StoreError::Backend("the PostgreSQL store must be opened inside a Tokio runtime".into())
        })?;
        let mut pg: tokio_postgres::Config = config
            .url
            .parse()
            .map_err(|e| StoreError::Backend(format!("database URL: {e}")))?;
        if let Some(s) = &config.schema
            && !valid_schema(s)
        {
            return Err(StoreError::Backend(format!(
                "database schema {s:?}: use lowercase letters, digits and _ (at most 63)"
            )));
        }
        let mut options = pg.get_options().unwrap_or("").to_string();
        options.push_str(&format!(
            " -c statement_timeout={} -c lock_timeout={} -c idle_in_transaction_session_timeout={}",
            config.statement_timeout.as_millis(),
            config.statement_timeout.as_millis(),
            (config.statement_timeout * 2).as_millis()
        ));
        if let Some(s) = &config.schema {
            options.push_str(&format!(" -c search_path={s}"));
        }
        pg.options(options.trim());
        pg.connect_timeout(config.connect_timeout);
        pg.application_name("custos");
        let host = pg
            .get_hosts()
            .first()
            .map(|h| match h {
                tokio_postgres::config::Host::Tcp(h) => h.clone(),
                #[cfg(unix)]
                tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
            })
            .unwrap_or_default();
        let description = format!(
            "postgres {}/{}{}",
            host,
            pg.get_dbname().unwrap_or(""),
            config
                .schema
                .as_ref()
                .map(|s| format!(" schema {s}"))
                .unwrap_or_default()
        );
        let manager = Manager {
            connector: connector(&config, &pg)?,
            pg,
            handle,
        };
        let schema = config.schema.clone().unwrap_or_else(|| "public".into());
        let base = lock_base(&schema);
        {
            let mut setup = r2d2::ManageConnection::connect(&manager).map_err(backend_err)?;
            if let Some(s) = &config.schema {
                setup.batch(&format!("CREATE SCHEMA IF NOT EXISTS {s}"))?;
            }
            migrate(&mut setup, base)?;
        }
        let pool = r2d2::Pool::builder()
            .max_size(config.pool_size.max(1))
            .min_idle(Some(1))
            .connection_timeout(config.connect_timeout)
            .build(manager.clone())
            .map_err(|e| StoreError::Backend(format!("database pool: {e}")))?;
        let conn = pool
            .get()
            .map_err(|e| StoreError::Backend(format!("database pool: {e}")))?;
        let (tx, rx) = mpsc::channel::<(WriteJob, Reply)>();
        let writer_pool = pool.clone();
        let handle = std::thread::Builder::new()
            .name("custos-pg-writer".into())
            .spawn(move || writer_loop(conn, writer_pool, rx, base + LOCK_WRITE))
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        Ok(PostgresStore {
            pool,
            manager,
            writer: Mutex::new(Some(tx)),
            writer_thread: Mutex::new(Some(handle)),
            lock_base: base,
            description,
        })
    }

    /// Drop a schema and every table in it (tests; `custos` never calls it).
    pub async fn drop_schema(url: &str, schema: &str) -> StoreResult<()> {
        if !valid_schema(schema) {
            return Err(StoreError::Backend(format!("database schema {schema:?}")));
        }
        let (c, conn) = tokio_postgres::connect(url, NoTls)
            .await
            .map_err(backend_err)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        c.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .await
            .map_err(backend_err)
    }

    /// The applied migrations, oldest first: (version, name).
    pub async fn migrations(&self) -> StoreResult<Vec<(i64, String)>> {
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = pool
                .get()
                .map_err(|e| StoreError::Backend(format!("database pool: {e}")))?;
            let rows = c.query(
                "SELECT version, name FROM custos_migrations ORDER BY version",
                &[],
            )?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
        .await
        .map_err(|e| StoreError::Backend(format!("database task failed: {e}")))?
    }

    /// Stop accepting writes; the writer thread finishes the queued jobs
    /// (whose callers still wait for them) and ends. It is not joined: it
    /// needs the runtime to reach the database, and this may be called on
    /// the runtime's only thread.
    pub fn close(&self) {
        self.writer.lock().take();
        self.writer_thread.lock().take();
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        self.close();
    }
}

/// Apply the migrations this binary knows and the database lacks, under an
/// advisory lock; refuse a database migrated by a newer Custos.
fn migrate(c: &mut PgConn, base: i64) -> StoreResult<()> {
    c.query("SELECT pg_advisory_lock($1)", &[&(base + LOCK_MIGRATE)])?;
    let result = (|| {
        c.batch(
            "CREATE TABLE IF NOT EXISTS custos_migrations (
                version BIGINT PRIMARY KEY,
                name TEXT NOT NULL,
                applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
            )",
        )?;
        let applied: i64 = c
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM custos_migrations",
                &[],
            )?
            .get(0);
        let known = MIGRATIONS.last().map(|m| m.version).unwrap_or(0);
        if applied > known {
            return Err(StoreError::Backend(format!(
                "the database schema is at version {applied}, newer than this Custos knows ({known}); upgrade Custos"
            )));
        }
        for m in MIGRATIONS.iter().filter(|m| m.version > applied) {
            c.batch("BEGIN")?;
            let step = c.batch(m.sql).and_then(|()| {
                c.execute(
                    "INSERT INTO custos_migrations (version, name) VALUES ($1, $2)",
                    &[&m.version, &m.name],
                )
                .map(|_| ())
            });
            match step {
                Ok(()) => c.batch("COMMIT")?,
                Err(e) => {
                    let _ = c.batch("ROLLBACK");
                    return Err(StoreError::Backend(format!(
                        "migration {} ({}) failed: {e}",
                        m.version, m.name
                    )));
                }
            }
            tracing::info!(
                version = m.version,
                name = m.name,
                "database migration applied"
            );
        }
        Ok(())
    })();
    let _ = c.query("SELECT pg_advisory_unlock($1)", &[&(base + LOCK_MIGRATE)]);
    result
}

/// Jobs per group commit.
const GROUP_MAX: usize = 256;

fn writer_loop(
    mut conn: r2d2::PooledConnection<Manager>,
    pool: r2d2::Pool<Manager>,
    rx: mpsc::Receiver<(WriteJob, Reply)>,
    write_lock: i64,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < GROUP_MAX {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        // A broken connection (database restarted, network cut) is replaced
        // before the batch; if none can be had, the batch fails cleanly.
        if conn.client.is_closed() {
            match pool.get() {
                Ok(c) => conn = c,
                Err(e) => {
                    for (_, reply) in batch {
                        reply.send(Err(StoreError::Backend(format!("database pool: {e}"))));
                    }
                    continue;
                }
            }
        }
        let begin = conn.batch("BEGIN").and_then(|()| {
            conn.query("SELECT pg_advisory_xact_lock($1)", &[&write_lock])
                .map(|_| ())
        });
        if let Err(e) = begin {
            let _ = conn.batch("ROLLBACK");
            for (_, reply) in batch {
                reply.send(Err(StoreError::Backend(e.to_string())));
            }
            continue;
        }
        let mut cache = AppendCache::default();
        let mut results = Vec::with_capacity(batch.len());
        for (job, reply) in batch {
            results.push((run_in_savepoint(&mut conn, &mut cache, job), reply));
        }
        if let Err(e) = conn.batch("COMMIT") {
            let _ = conn.batch("ROLLBACK");
            for (_, reply) in results {
                reply.send(Err(StoreError::Backend(e.to_string())));
            }
            continue;
        }
        for (result, reply) in results {
            reply.send(result);
        }
    }
}

fn run_in_savepoint(
    conn: &mut PgConn,
    cache: &mut AppendCache,
    job: WriteJob,
) -> StoreResult<Box<dyn Any + Send>> {
    conn.batch("SAVEPOINT job")?;
    let saved = cache.clone();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut tx = PgTx {
            conn: &mut *conn,
            cache: &mut *cache,
        };
        job(&mut tx)
    }));
    let mut result = match outcome {
        Ok(r) => r,
        Err(_) => Err(StoreError::Backend(
            "write job panicked; its changes were rolled back".into(),
        )),
    };
    if result.is_ok()
        && let Err(e) = flush_audit(conn, cache)
    {
        result = Err(e);
    }
    if result.is_err() {
        *cache = saved;
        conn.batch("ROLLBACK TO SAVEPOINT job")?;
    }
    conn.batch("RELEASE SAVEPOINT job")?;
    result
}

/// Run a read job on a pooled connection: in one snapshot transaction, or
/// (a point lookup, `snapshot` false) in autocommit, which saves the two
/// round trips of BEGIN and COMMIT (each statement still sees a consistent
/// snapshot; a lookup by key needs no more).
fn read_on(
    pool: &r2d2::Pool<Manager>,
    job: ReadJob,
    snapshot: bool,
) -> StoreResult<Box<dyn Any + Send>> {
    let mut conn = pool
        .get()
        .map_err(|e| StoreError::Backend(format!("database pool: {e}")))?;
    if snapshot {
        conn.batch("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")?;
    }
    let mut cache = AppendCache::default();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut tx = PgTx {
            conn: &mut conn,
            cache: &mut cache,
        };
        job(&mut tx)
    }));
    if snapshot {
        let _ = conn.batch("COMMIT");
    }
    match result {
        Ok(r) => r,
        Err(_) => Err(StoreError::Backend("read job panicked".into())),
    }
}

/// A session-level advisory lock on a connection of its own, checked every
/// second by a thread; lost when the connection fails.
struct PgLease {
    held: Arc<AtomicBool>,
    stop: Mutex<Option<mpsc::Sender<()>>>,
}

impl Lease for PgLease {
    fn held(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }
}

impl Drop for PgLease {
    fn drop(&mut self) {
        // The keeper thread ends, its connection closes and PostgreSQL
        // releases the lock.
        self.stop.lock().take();
    }
}

#[async_trait::async_trait]
impl Store for PostgresStore {
    async fn run_read(&self, job: ReadJob) -> StoreResult<Box<dyn Any + Send>> {
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || read_on(&pool, job, true))
            .await
            .map_err(|e| StoreError::Backend(format!("read task failed: {e}")))?
    }

    async fn run_read_point(&self, job: ReadJob) -> StoreResult<Box<dyn Any + Send>> {
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || read_on(&pool, job, false))
            .await
            .map_err(|e| StoreError::Backend(format!("read task failed: {e}")))?
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

    async fn migrations(&self) -> StoreResult<Vec<(i64, String)>> {
        PostgresStore::migrations(self).await
    }

    async fn sys_version(&self, kind: &str, key: &str) -> StoreResult<i64> {
        // Asked on every request (the security epoch): one autocommit
        // statement, no transaction around it. Never cached, so a lock or
        // revocation made on any node counts at the next request here.
        let (pool, kind, key) = (self.pool.clone(), kind.to_string(), key.to_string());
        tokio::task::spawn_blocking(move || {
            let mut c = pool
                .get()
                .map_err(|e| StoreError::Backend(format!("database pool: {e}")))?;
            Ok(c.query_opt(
                "SELECT version FROM sys WHERE kind = $1 AND key = $2",
                &[&kind, &key],
            )?
            .map(|r| r.get(0))
            .unwrap_or(0))
        })
        .await
        .map_err(|e| StoreError::Backend(format!("database task failed: {e}")))?
    }

    async fn campaign(&self, role: &str) -> StoreResult<Option<Arc<dyn Lease>>> {
        let key = role_key(self.lock_base, role);
        let manager = self.manager.clone();
        tokio::task::spawn_blocking(move || {
            // A connection of its own, outside the pool: the lock lives and
            // dies with it.
            let mut conn = r2d2::ManageConnection::connect(&manager).map_err(backend_err)?;
            let got: bool = conn
                .query_one("SELECT pg_try_advisory_lock($1)", &[&key])?
                .get(0);
            if !got {
                return Ok(None);
            }
            let held = Arc::new(AtomicBool::new(true));
            let (stop, stopped) = mpsc::channel::<()>();
            let flag = held.clone();
            std::thread::Builder::new()
                .name("custos-pg-lease".into())
                .spawn(move || {
                    // Until the lease is dropped (the sender goes) or the
                    // session fails.
                    while let Err(mpsc::RecvTimeoutError::Timeout) =
                        stopped.recv_timeout(Duration::from_secs(1))
                    {
                        if !conn.ping() {
                            break;
                        }
                    }
                    flag.store(false, Ordering::Release);
                })
                .map_err(|e| StoreError::Backend(e.to_string()))?;
            Ok(Some(Arc::new(PgLease {
                held,
                stop: Mutex::new(Some(stop)),
            }) as Arc<dyn Lease>))
        })
        .await
        .map_err(|e| StoreError::Backend(format!("campaign task failed: {e}")))?
    }

    fn stats(&self) -> StoreStats {
        let s = self.pool.state();
        StoreStats {
            pool_size: Some(s.connections as u64),
            pool_idle: Some(s.idle_connections as u64),
            pool_max: Some(self.pool.max_size() as u64),
        }
    }

    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn describe(&self) -> String {
        self.description.clone()
    }

    fn close(&self) {
        PostgresStore::close(self)
    }
}

/// A transaction on one connection (read or write).
struct PgTx<'c> {
    conn: &'c mut PgConn,
    cache: &'c mut AppendCache,
}

const VERSION_COLUMNS: &str = "c.rid, c.rtype, c.id, v.version, v.last_updated, \
     CASE WHEN c.state = 2 THEN 2 ELSE v.state END, v.key_name, v.body, v.seq";

fn row_to_version(row: &Row, sort_col: Option<usize>) -> StoredVersion {
    StoredVersion {
        rid: row.get(0),
        rtype: row.get(1),
        id: row.get(2),
        version: row.get(3),
        last_updated: row.get(4),
        state: RecordState::from_i64(row.get(5)),
        key_name: row.get(6),
        body: row.get(7),
        seq: row.get(8),
        sort_key: sort_col.map(|i| row.get(i)),
    }
}

/// Large finite stand-ins for "no value" in sort keys.
const SORT_LAST_ASC: f64 = 1e308;
const SORT_LAST_DESC: f64 = -1e308;

fn push_range_cond(sql: &mut String, args: &mut Args, lo: &str, hi: &str, c: &RangeCond) {
    let mut parts = Vec::new();
    if let Some(x) = c.lo_ge {
        parts.push(format!("{lo} >= ?"));
        args.push(Box::new(x));
    }
    if let Some(x) = c.lo_lt {
        parts.push(format!("{lo} < ?"));
        args.push(Box::new(x));
    }
    if let Some(x) = c.hi_gt {
        parts.push(format!("{hi} > ?"));
        args.push(Box::new(x));
    }
    if let Some(x) = c.hi_le {
        parts.push(format!("{hi} <= ?"));
        args.push(Box::new(x));
    }
    if parts.is_empty() {
        sql.push_str("TRUE");
    } else {
        sql.push('(');
        sql.push_str(&parts.join(" AND "));
        sql.push(')');
    }
}

fn push_any_range(sql: &mut String, args: &mut Args, lo: &str, hi: &str, any: &[RangeCond]) {
    sql.push('(');
    if any.is_empty() {
        sql.push_str("FALSE");
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

fn push_filters(sql: &mut String, args: &mut Args, filters: &[Filter]) {
    for f in filters {
        sql.push_str(" AND ");
        match f {
            Filter::AnyToken(tokens) | Filter::NoToken(tokens) => {
                let any = matches!(f, Filter::AnyToken(_));
                if tokens.is_empty() {
                    sql.push_str(if any { "FALSE" } else { "TRUE" });
                    continue;
                }
                let not = if any { "" } else { "NOT " };
                sql.push_str(&format!(
                    "c.rid {not}IN (SELECT rid FROM idx_token WHERE token IN ("
                ));
                push_placeholders(sql, tokens.len());
                sql.push_str("))");
                args.extend(
                    tokens
                        .iter()
                        .map(|t| Box::new(t.to_vec()) as Box<dyn ToSql + Sync + Send>),
                );
            }
            Filter::AnyRange { pkey, any } => {
                sql.push_str("c.rid IN (SELECT rid FROM idx_range WHERE pkey = ? AND ");
                args.push(Box::new(*pkey));
                push_any_range(sql, args, "lo", "hi", any);
                sql.push(')');
            }
            Filter::Ids(ids) => {
                if ids.is_empty() {
                    sql.push_str("FALSE");
                    continue;
                }
                sql.push_str("c.id IN (");
                push_placeholders(sql, ids.len());
                sql.push(')');
                args.extend(
                    ids.iter()
                        .map(|i| Box::new(i.clone()) as Box<dyn ToSql + Sync + Send>),
                );
            }
            Filter::LastUpdated(any) => push_any_range(
                sql,
                args,
                "c.last_updated::float8",
                "c.last_updated::float8",
                any,
            ),
            Filter::Compartment(p) => {
                sql.push_str("c.compartment = ?");
                args.push(Box::new(p.clone()));
            }
            Filter::Visible { patients, shared } => {
                sql.push('(');
                if patients.is_empty() {
                    sql.push_str("FALSE");
                } else {
                    sql.push_str("c.compartment IN (");
                    push_placeholders(sql, patients.len());
                    sql.push(')');
                    args.extend(
                        patients
                            .iter()
                            .map(|p| Box::new(p.clone()) as Box<dyn ToSql + Sync + Send>),
                    );
                }
                if *shared {
                    sql.push_str(" OR c.compartment IS NULL");
                }
                sql.push(')');
            }
            Filter::Hidden(patients) => {
                if patients.is_empty() {
                    sql.push_str("TRUE");
                    continue;
                }
                sql.push_str("(c.compartment IS NULL OR c.compartment NOT IN (");
                push_placeholders(sql, patients.len());
                sql.push_str("))");
                args.extend(
                    patients
                        .iter()
                        .map(|p| Box::new(p.clone()) as Box<dyn ToSql + Sync + Send>),
                );
            }
        }
    }
}

fn history_sql(q: &HistoryQuery, select: &str) -> (String, Args) {
    let mut sql =
        format!("SELECT {select} FROM versions v JOIN current c ON c.rid = v.rid WHERE TRUE");
    let mut args: Args = Vec::new();
    match &q.scope {
        HistoryScope::Instance { rtype, id } => {
            sql.push_str(" AND c.rtype = ? AND c.id = ?");
            args.push(Box::new(rtype.clone()));
            args.push(Box::new(id.clone()));
        }
        HistoryScope::Type(rtype) => {
            sql.push_str(" AND v.rtype = ?");
            args.push(Box::new(rtype.clone()));
        }
        HistoryScope::System => {}
    }
    if let Some(since) = q.since {
        sql.push_str(" AND v.last_updated >= ?");
        args.push(Box::new(since));
    }
    if let Some(before) = q.before {
        sql.push_str(" AND v.last_updated < ?");
        args.push(Box::new(before));
    }
    if let Some(seq) = q.seq_below {
        sql.push_str(" AND v.seq < ?");
        args.push(Box::new(seq));
    }
    if let Some(keys) = &q.key_names {
        if keys.is_empty() {
            sql.push_str(" AND FALSE");
        } else {
            sql.push_str(" AND v.key_name IN (");
            push_placeholders(&mut sql, keys.len());
            sql.push(')');
            args.extend(
                keys.iter()
                    .map(|k| Box::new(k.clone()) as Box<dyn ToSql + Sync + Send>),
            );
        }
    }
    if !q.exclude_keys.is_empty() {
        sql.push_str(" AND v.key_name NOT IN (");
        push_placeholders(&mut sql, q.exclude_keys.len());
        sql.push(')');
        args.extend(
            q.exclude_keys
                .iter()
                .map(|k| Box::new(k.clone()) as Box<dyn ToSql + Sync + Send>),
        );
    }
    (sql, args)
}

/// The fast path of one blind token in insertion order (see the SQLite backend).
fn single_token_sql(q: &IndexQuery, count_only: bool) -> Option<(String, Args)> {
    let [Filter::AnyToken(tokens)] = q.filters.as_slice() else {
        return None;
    };
    let [token] = tokens.as_slice() else {
        return None;
    };
    if q.order != Order::Rid {
        return None;
    }
    let mut args: Args = vec![Box::new(token.to_vec())];
    if count_only {
        return Some((
            "SELECT 1 FROM idx_token t WHERE t.token = ?".to_string(),
            args,
        ));
    }
    let desc = q.descending != q.backwards;
    let mut inner =
        "SELECT t.rid AS rid, t.rid::float8 AS sk FROM idx_token t WHERE t.token = ?".to_string();
    if let Some(k) = q.after {
        inner.push_str(if desc {
            " AND t.rid < ?"
        } else {
            " AND t.rid > ?"
        });
        args.push(Box::new(k.rid));
    }
    let dir = if desc { "DESC" } else { "ASC" };
    inner.push_str(&format!(" ORDER BY t.rid {dir} LIMIT ?"));
    args.push(Box::new(q.limit.min(i64::MAX as usize) as i64));
    Some((
        format!(
            "SELECT {VERSION_COLUMNS}, p.sk FROM ({inner}) p JOIN current c ON c.rid = p.rid \
             JOIN versions v ON v.rid = c.rid AND v.version = c.version ORDER BY p.sk {dir}, p.rid {dir}"
        ),
        args,
    ))
}

fn search_sql(q: &IndexQuery, count_only: bool) -> (String, Args) {
    if let Some(fast) = single_token_sql(q, count_only) {
        return fast;
    }
    let mut args: Args = Vec::new();
    let desc = q.descending != q.backwards;
    let (sort_expr, join) = match q.order {
        Order::Rid => ("c.rid::float8".to_string(), String::new()),
        Order::LastUpdated => ("c.last_updated::float8".to_string(), String::new()),
        Order::Range(pkey) => {
            let (col, missing) = if q.descending {
                ("s.max_hi", SORT_LAST_DESC)
            } else {
                ("s.min_lo", SORT_LAST_ASC)
            };
            (
                format!("COALESCE({col}, {missing:e}::float8)"),
                format!(" LEFT JOIN idx_sort s ON s.pkey = {pkey} AND s.rid = c.rid"),
            )
        }
    };
    let mut sql = if count_only {
        "SELECT 1 FROM current c WHERE c.rtype = ? AND c.state = 0".to_string()
    } else {
        format!(
            "SELECT c.rid AS rid, {sort_expr} AS sk FROM current c{join} \
             WHERE c.rtype = ? AND c.state = 0"
        )
    };
    args.push(Box::new(q.rtype.clone()));
    push_filters(&mut sql, &mut args, &q.filters);
    if count_only {
        return (sql, args);
    }
    if let Some(k) = q.after {
        let op = if desc { "<" } else { ">" };
        sql.push_str(&format!(
            " AND ({sort_expr} {op} ? OR ({sort_expr} = ? AND c.rid {op} ?))"
        ));
        args.push(Box::new(k.sort_key));
        args.push(Box::new(k.sort_key));
        args.push(Box::new(k.rid));
    }
    let dir = if desc { "DESC" } else { "ASC" };
    sql.push_str(&format!(" ORDER BY sk {dir}, c.rid {dir} LIMIT ?"));
    args.push(Box::new(q.limit.min(i64::MAX as usize) as i64));
    let sql = format!(
        "SELECT {VERSION_COLUMNS}, p.sk FROM ({sql}) p JOIN current c ON c.rid = p.rid \
         JOIN versions v ON v.rid = c.rid AND v.version = c.version ORDER BY p.sk {dir}, p.rid {dir}"
    );
    (sql, args)
}

impl PgTx<'_> {
    fn run(&mut self, sql: &str, args: &Args) -> StoreResult<Vec<Row>> {
        let sql = numbered(sql);
        self.conn.query(&sql, &refs(args))
    }

    fn count_of(&mut self, sql: &str, args: &Args) -> StoreResult<u64> {
        let rows = self.run(sql, args)?;
        Ok(rows.first().map(|r| r.get::<_, i64>(0)).unwrap_or(0) as u64)
    }

    fn grouped_counts(&mut self, sql: &str) -> StoreResult<Vec<(String, u64)>> {
        let rows = self.conn.query(sql, &[])?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u64))
            .collect())
    }

    fn audit_rows(&mut self, sql: &str, args: &Args) -> StoreResult<Vec<AuditEntry>> {
        let rows = self.run(sql, args)?;
        Ok(rows
            .iter()
            .map(|r| AuditEntry {
                index: r.get::<_, i64>(0) as u64,
                at: r.get(1),
                data: r.get(2),
            })
            .collect())
    }
}

fn clamp(x: u64) -> i64 {
    x.min(i64::MAX as u64) as i64
}

impl ReadTx for PgTx<'_> {
    fn current(&mut self, rtype: &str, id: &str) -> StoreResult<Option<StoredVersion>> {
        let sql = format!(
            "SELECT {VERSION_COLUMNS} FROM current c JOIN versions v ON v.rid = c.rid AND v.version = c.version \
             WHERE c.rtype = $1 AND c.id = $2"
        );
        Ok(self
            .conn
            .query_opt(&sql, &[&rtype, &id])?
            .map(|r| row_to_version(&r, None)))
    }

    fn head(&mut self, rtype: &str, id: &str) -> StoreResult<Option<Head>> {
        Ok(self
            .conn
            .query_opt(
                "SELECT version, state, compartment FROM current WHERE rtype = $1 AND id = $2",
                &[&rtype, &id],
            )?
            .map(|r| Head {
                version: r.get(0),
                state: RecordState::from_i64(r.get(1)),
                compartment: r.get(2),
            }))
    }

    fn version(
        &mut self,
        rtype: &str,
        id: &str,
        version: i64,
    ) -> StoreResult<Option<StoredVersion>> {
        let sql = format!(
            "SELECT {VERSION_COLUMNS} FROM current c JOIN versions v ON v.rid = c.rid \
             WHERE c.rtype = $1 AND c.id = $2 AND v.version = $3"
        );
        Ok(self
            .conn
            .query_opt(&sql, &[&rtype, &id, &version])?
            .map(|r| row_to_version(&r, None)))
    }

    fn search(&mut self, q: &IndexQuery) -> StoreResult<Vec<StoredVersion>> {
        let (sql, args) = search_sql(q, false);
        let mut rows: Vec<StoredVersion> = self
            .run(&sql, &args)?
            .iter()
            .map(|r| row_to_version(r, Some(9)))
            .collect();
        if q.backwards {
            rows.reverse();
        }
        Ok(rows)
    }

    fn search_ids(&mut self, q: &IndexQuery) -> StoreResult<Vec<String>> {
        let (sql, args) = search_sql(q, false);
        let sql = sql.replacen(VERSION_COLUMNS, "c.id", 1);
        let mut ids: Vec<String> = self.run(&sql, &args)?.iter().map(|r| r.get(0)).collect();
        if q.backwards {
            ids.reverse();
        }
        Ok(ids)
    }

    fn compartments(&mut self, q: &IndexQuery, cap: usize) -> StoreResult<Vec<String>> {
        let (inner, mut args) = search_sql(q, true);
        let inner = if let Some(rest) = inner.strip_prefix("SELECT 1 FROM idx_token t ") {
            format!(
                "SELECT c.compartment AS compartment FROM idx_token t \
                 JOIN current c ON c.rid = t.rid {rest}"
            )
        } else {
            inner.replacen("SELECT 1 ", "SELECT c.compartment AS compartment ", 1)
        };
        let sql = format!(
            "SELECT DISTINCT compartment FROM ({inner}) q WHERE compartment IS NOT NULL LIMIT ?"
        );
        args.push(Box::new(cap.min(i64::MAX as usize) as i64));
        Ok(self.run(&sql, &args)?.iter().map(|r| r.get(0)).collect())
    }

    fn count(&mut self, q: &IndexQuery, cap: u64) -> StoreResult<u64> {
        let (inner, mut args) = search_sql(q, true);
        let sql = format!("SELECT count(*) FROM ({inner} LIMIT ?) q");
        args.push(Box::new(clamp(cap)));
        self.count_of(&sql, &args)
    }

    fn history(&mut self, q: &HistoryQuery) -> StoreResult<Vec<StoredVersion>> {
        let (mut sql, mut args) = history_sql(q, VERSION_COLUMNS);
        sql.push_str(" ORDER BY v.seq DESC LIMIT ?");
        args.push(Box::new(q.limit.min(i64::MAX as usize) as i64));
        Ok(self
            .run(&sql, &args)?
            .iter()
            .map(|r| row_to_version(r, None))
            .collect())
    }

    fn history_count(&mut self, q: &HistoryQuery, cap: u64) -> StoreResult<u64> {
        let (inner, mut args) = history_sql(q, "1");
        let sql = format!("SELECT count(*) FROM ({inner} LIMIT ?) q");
        args.push(Box::new(clamp(cap)));
        self.count_of(&sql, &args)
    }

    fn data_key(&mut self, name: &str) -> StoreResult<Option<KeyRecord>> {
        Ok(self
            .conn
            .query_opt(
                "SELECT name, kek_id, blob FROM data_keys WHERE name = $1",
                &[&name],
            )?
            .map(|r| KeyRecord {
                name: r.get(0),
                kek_id: r.get(1),
                blob: r.get(2),
            }))
    }

    fn data_keys_not_under(&mut self, kek_id: &str, limit: usize) -> StoreResult<Vec<KeyRecord>> {
        Ok(self
            .conn
            .query(
                "SELECT name, kek_id, blob FROM data_keys WHERE kek_id <> $1 ORDER BY name LIMIT $2",
                &[&kek_id, &(limit.min(i64::MAX as usize) as i64)],
            )?
            .iter()
            .map(|r| KeyRecord {
                name: r.get(0),
                kek_id: r.get(1),
                blob: r.get(2),
            })
            .collect())
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
        Ok(self
            .conn
            .query_opt(
                "SELECT version, value FROM sys WHERE kind = $1 AND key = $2",
                &[&kind, &key],
            )?
            .map(|r| SysRecord {
                kind: kind.to_string(),
                key: key.to_string(),
                version: r.get(0),
                value: r.get(1),
            }))
    }

    fn sys_list(&mut self, kind: &str) -> StoreResult<Vec<SysRecord>> {
        Ok(self
            .conn
            .query(
                "SELECT key, version, value FROM sys WHERE kind = $1 ORDER BY key",
                &[&kind],
            )?
            .iter()
            .map(|r| SysRecord {
                kind: kind.to_string(),
                key: r.get(0),
                version: r.get(1),
                value: r.get(2),
            })
            .collect())
    }

    fn log_read(&mut self, log: &str, after: i64, limit: usize) -> StoreResult<Vec<LogEntry>> {
        Ok(self
            .conn
            .query(
                "SELECT seq, at, value FROM sys_log WHERE log = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                &[&log, &after, &(limit.min(i64::MAX as usize) as i64)],
            )?
            .iter()
            .map(|r| LogEntry {
                seq: r.get(0),
                log: log.to_string(),
                at: r.get(1),
                value: r.get(2),
            })
            .collect())
    }

    fn audit_size(&mut self) -> StoreResult<u64> {
        if let Some(n) = self.cache.next {
            return Ok(n);
        }
        audit_size_of(self.conn)
    }

    fn audit_entries(
        &mut self,
        start: u64,
        end: u64,
        limit: usize,
    ) -> StoreResult<Vec<AuditEntry>> {
        flush_audit(self.conn, self.cache)?;
        let args: Args = vec![
            Box::new(clamp(start)),
            Box::new(clamp(end)),
            Box::new(limit.min(i64::MAX as usize) as i64),
        ];
        self.audit_rows(
            "SELECT idx, at, data FROM audit_log WHERE idx >= ? AND idx < ? ORDER BY idx LIMIT ?",
            &args,
        )
    }

    fn audit_hashes(&mut self, indexes: &[u64]) -> StoreResult<Vec<[u8; 32]>> {
        flush_audit(self.conn, self.cache)?;
        read_audit_hashes(self.conn, self.cache, indexes)
    }

    fn audit_hash_range(&mut self, lo: u64, hi: u64) -> StoreResult<Vec<(u64, [u8; 32])>> {
        flush_audit(self.conn, self.cache)?;
        let rows = self.conn.query(
            "SELECT n, hash FROM audit_hash WHERE n >= $1 AND n < $2 ORDER BY n",
            &[&clamp(lo), &clamp(hi)],
        )?;
        rows.iter()
            .map(|r| {
                let n = r.get::<_, i64>(0) as u64;
                let blob: Vec<u8> = r.get(1);
                let hash = <[u8; 32]>::try_from(blob.as_slice())
                    .map_err(|_| StoreError::Backend(format!("audit hash {n} is malformed")))?;
                Ok((n, hash))
            })
            .collect()
    }

    fn audit_search(&mut self, q: &AuditQuery) -> StoreResult<Vec<AuditEntry>> {
        flush_audit(self.conn, self.cache)?;
        let mut sql = String::from("SELECT a.idx, a.at, a.data FROM audit_log a");
        let mut args: Args = Vec::new();
        let mut conds: Vec<String> = Vec::new();
        if let Some(p) = &q.patient {
            sql.push_str(" JOIN audit_patient p ON p.idx = a.idx");
            args.push(Box::new(p.clone()));
            conds.push("p.patient = ?".into());
        }
        let mut cond = |c: &str, v: Box<dyn ToSql + Sync + Send>, args: &mut Args| {
            args.push(v);
            conds.push(format!("{c} ?"));
        };
        if let Some(a) = &q.agent {
            cond("a.agent =", Box::new(a.clone()), &mut args);
        }
        if let Some(a) = &q.action {
            cond("a.action =", Box::new(a.clone()), &mut args);
        }
        if let Some(o) = q.outcome {
            cond("a.outcome =", Box::new(o as i64), &mut args);
        }
        if let Some(f) = q.from {
            cond("a.at >=", Box::new(f), &mut args);
        }
        if let Some(u) = q.until {
            cond("a.at <", Box::new(u), &mut args);
        }
        if let Some(b) = q.before {
            cond("a.idx <", Box::new(clamp(b)), &mut args);
        }
        if let Some(b) = q.after {
            cond("a.idx >", Box::new(clamp(b)), &mut args);
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
        sql.push_str(" LIMIT ?");
        args.push(Box::new(q.limit.min(i64::MAX as usize) as i64));
        self.audit_rows(&sql, &args)
    }
}

/// What this batch appended so far: the next leaf index and the latest
/// stored hashes (the next appends read mostly those).
#[derive(Default, Clone)]
struct AppendCache {
    next: Option<u64>,
    hashes: std::collections::VecDeque<(u64, [u8; 32])>,
    /// Appended rows not yet sent: written in a few multi-row statements
    /// (every [`AppendCache::FLUSH`] events, before any audit read, and at
    /// the end of the job) instead of three statements per event.
    unsent: Unsent,
}

#[derive(Default, Clone)]
struct Unsent {
    idx: Vec<i64>,
    at: Vec<i64>,
    action: Vec<String>,
    outcome: Vec<i64>,
    agent: Vec<Option<String>>,
    data: Vec<Vec<u8>>,
    hash_n: Vec<i64>,
    hash: Vec<Vec<u8>>,
    patient: Vec<String>,
    patient_idx: Vec<i64>,
}

impl AppendCache {
    const KEEP: usize = 256;
    /// Events per flush: their hashes (about two per event) stay within
    /// the `KEEP` hashes held here until they reach the database.
    const FLUSH: usize = 64;

    fn hash(&self, n: u64) -> Option<[u8; 32]> {
        self.hashes
            .iter()
            .rev()
            .find(|(k, _)| *k == n)
            .map(|(_, h)| *h)
    }
}

/// Send the buffered appends (see [`AppendCache::unsent`]).
fn flush_audit(conn: &mut PgConn, cache: &mut AppendCache) -> StoreResult<()> {
    let u = std::mem::take(&mut cache.unsent);
    if u.idx.is_empty() {
        return Ok(());
    }
    conn.execute(
        "INSERT INTO audit_log (idx, at, action, outcome, agent, data) \
         SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::bigint[], $5::text[], $6::bytea[])",
        &[&u.idx, &u.at, &u.action, &u.outcome, &u.agent, &u.data],
    )?;
    conn.execute(
        "INSERT INTO audit_hash (n, hash) SELECT * FROM unnest($1::bigint[], $2::bytea[])",
        &[&u.hash_n, &u.hash],
    )?;
    if !u.patient.is_empty() {
        conn.execute(
            "INSERT INTO audit_patient (patient, idx) SELECT * FROM unnest($1::text[], $2::bigint[]) \
             ON CONFLICT DO NOTHING",
            &[&u.patient, &u.patient_idx],
        )?;
    }
    Ok(())
}

fn audit_size_of(conn: &mut PgConn) -> StoreResult<u64> {
    let r = conn.query_one("SELECT COALESCE(MAX(idx) + 1, 0) FROM audit_log", &[])?;
    Ok(r.get::<_, i64>(0) as u64)
}

fn read_audit_hashes(
    conn: &mut PgConn,
    cache: &AppendCache,
    indexes: &[u64],
) -> StoreResult<Vec<[u8; 32]>> {
    let mut out = Vec::with_capacity(indexes.len());
    let mut missing: Vec<i64> = Vec::new();
    for &n in indexes {
        if cache.hash(n).is_none() {
            missing.push(clamp(n));
        }
    }
    let mut found: HashMap<u64, [u8; 32]> = HashMap::new();
    if !missing.is_empty() {
        let rows = conn.query(
            "SELECT n, hash FROM audit_hash WHERE n = ANY($1)",
            &[&missing],
        )?;
        for r in rows {
            let n = r.get::<_, i64>(0) as u64;
            let blob: Vec<u8> = r.get(1);
            if let Ok(h) = <[u8; 32]>::try_from(blob.as_slice()) {
                found.insert(n, h);
            }
        }
    }
    for &n in indexes {
        let h = cache
            .hash(n)
            .or_else(|| found.get(&n).copied())
            .ok_or_else(|| {
                StoreError::Backend(format!("audit hash {n} is missing or malformed"))
            })?;
        out.push(h);
    }
    Ok(out)
}

/// Reads stored hashes through the transaction (so a batch sees its own appends).
struct TxHashes<'c>(std::cell::RefCell<&'c mut PgConn>, &'c AppendCache);

impl tlog_tiles::HashReader for TxHashes<'_> {
    fn read_hashes(
        &self,
        indexes: &[u64],
    ) -> Result<Vec<tlog_tiles::Hash>, tlog_tiles::tlog::Error> {
        let hashes = read_audit_hashes(&mut self.0.borrow_mut(), self.1, indexes)
            .map_err(|_| tlog_tiles::tlog::Error::IndexesNotInTree)?;
        Ok(hashes.into_iter().map(tlog_tiles::Hash).collect())
    }
}

impl WriteTx for PgTx<'_> {
    fn put(&mut self, v: &NewVersion, index: &IndexEntries, expect: Expect) -> StoreResult<()> {
        if expect == Expect::Absent && !v.deleted && self.insert_new(v, index)? {
            return Ok(());
        }
        let existing = self.conn.query_opt(
            "SELECT rid, version, state, index_blob FROM current WHERE rtype = $1 AND id = $2 FOR UPDATE",
            &[&v.rtype, &v.id],
        )?;
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
        let rid: i64 = match existing {
            None => {
                if let Expect::Version(n) = expect {
                    return Err(conflict(format!("version {n}"), "no resource".into()));
                }
                self.conn
                    .query_one(
                        "INSERT INTO current (rtype, id, version, last_updated, state, compartment, index_blob) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING rid",
                        &[&v.rtype, &v.id, &v.version, &v.last_updated, &state, &v.compartment, &blob],
                    )?
                    .get(0)
            }
            Some(row) => {
                let rid: i64 = row.get(0);
                let cur_version: i64 = row.get(1);
                let cur_state: i64 = row.get(2);
                let old_blob: Option<Vec<u8>> = row.get(3);
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
                self.conn.execute(
                    "UPDATE current SET version = $2, last_updated = $3, state = $4, compartment = $5, \
                     index_blob = $6 WHERE rid = $1",
                    &[&rid, &v.version, &v.last_updated, &state, &v.compartment, &blob],
                )?;
                rid
            }
        };
        self.conn.execute(
            "INSERT INTO versions (rid, rtype, version, last_updated, state, key_name, body) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &rid,
                &v.rtype,
                &v.version,
                &v.last_updated,
                &state,
                &v.key_name,
                &v.body,
            ],
        )?;
        if !v.deleted {
            self.insert_index(rid, index)?;
        }
        Ok(())
    }

    fn put_data_key(&mut self, key: &KeyRecord, replace: bool) -> StoreResult<()> {
        let sql = if replace {
            "INSERT INTO data_keys (name, kek_id, blob) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET kek_id = excluded.kek_id, blob = excluded.blob"
        } else {
            "INSERT INTO data_keys (name, kek_id, blob) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING"
        };
        let n = self
            .conn
            .execute(sql, &[&key.name, &key.kek_id, &key.blob])?;
        if n == 0 {
            return Err(StoreError::Conflict {
                rtype: "DataKey".into(),
                id: key.name.clone(),
                expected: "no key".into(),
                found: "an existing key".into(),
            });
        }
        Ok(())
    }

    fn erase_compartment(&mut self, patient_id: &str, key_name: &str) -> StoreResult<u64> {
        let rows = self.conn.query(
            "SELECT rid, index_blob FROM current WHERE compartment = $1 \
             OR (rtype = 'Patient' AND id = $1) FOR UPDATE",
            &[&patient_id],
        )?;
        for r in &rows {
            let rid: i64 = r.get(0);
            let blob: Option<Vec<u8>> = r.get(1);
            if let Some(old) = blob.as_deref().and_then(decode_index) {
                self.delete_index(rid, &old)?;
            }
            self.conn.execute(
                "UPDATE current SET state = 2, index_blob = NULL WHERE rid = $1",
                &[&rid],
            )?;
        }
        self.conn
            .execute("DELETE FROM data_keys WHERE name = $1", &[&key_name])?;
        Ok(rows.len() as u64)
    }

    fn sys_put(
        &mut self,
        kind: &str,
        key: &str,
        value: &[u8],
        expect: Option<i64>,
    ) -> StoreResult<i64> {
        let found: i64 = self
            .conn
            .query_opt(
                "SELECT version FROM sys WHERE kind = $1 AND key = $2 FOR UPDATE",
                &[&kind, &key],
            )?
            .map(|r| r.get(0))
            .unwrap_or(0);
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
        self.conn.execute(
            "INSERT INTO sys (kind, key, version, value) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (kind, key) DO UPDATE SET version = excluded.version, value = excluded.value",
            &[&kind, &key, &version, &value],
        )?;
        Ok(version)
    }

    fn sys_delete(&mut self, kind: &str, key: &str) -> StoreResult<bool> {
        let n = self.conn.execute(
            "DELETE FROM sys WHERE kind = $1 AND key = $2",
            &[&kind, &key],
        )?;
        Ok(n > 0)
    }

    fn log_append(&mut self, log: &str, at: i64, value: &[u8]) -> StoreResult<i64> {
        Ok(self
            .conn
            .query_one(
                "INSERT INTO sys_log (log, at, value) VALUES ($1, $2, $3) RETURNING seq",
                &[&log, &at, &value],
            )?
            .get(0))
    }

    fn audit_append(&mut self, e: &AuditAppend<'_>) -> StoreResult<u64> {
        // The batch holds the cluster's write lock (see the module docs), so
        // the size read here is the log's size for every node.
        let n = match self.cache.next {
            Some(n) => n,
            None => audit_size_of(self.conn)?,
        };
        let leaf = tlog_tiles::record_hash(e.data);
        let hashes = {
            let reader = TxHashes(std::cell::RefCell::new(&mut *self.conn), &*self.cache);
            tlog_tiles::stored_hashes_for_record_hash(n, leaf, &reader)
                .map_err(|err| StoreError::Backend(format!("audit tree: {err}")))?
        };
        let first = tlog_tiles::stored_hash_index(0, n);
        let u = &mut self.cache.unsent;
        u.idx.push(clamp(n));
        u.at.push(e.at);
        u.action.push(e.action.to_string());
        u.outcome.push(e.outcome as i64);
        u.agent.push(e.agent.map(str::to_string));
        u.data.push(e.data.to_vec());
        for (i, h) in hashes.iter().enumerate() {
            u.hash_n.push(clamp(first + i as u64));
            u.hash.push(h.0.to_vec());
        }
        for p in e.patients {
            u.patient.push(p.clone());
            u.patient_idx.push(clamp(n));
        }
        for (i, h) in hashes.iter().enumerate() {
            self.cache.hashes.push_back((first + i as u64, h.0));
        }
        while self.cache.hashes.len() > AppendCache::KEEP {
            self.cache.hashes.pop_front();
        }
        self.cache.next = Some(n + 1);
        if self.cache.unsent.idx.len() >= AppendCache::FLUSH {
            flush_audit(self.conn, self.cache)?;
        }
        Ok(n)
    }
}

impl PgTx<'_> {
    fn insert_new(&mut self, v: &NewVersion, index: &IndexEntries) -> StoreResult<bool> {
        let blob = encode_index(index);
        let row = self.conn.query_opt(
            "INSERT INTO current (rtype, id, version, last_updated, state, compartment, index_blob) \
             VALUES ($1, $2, $3, $4, 0, $5, $6) ON CONFLICT (rtype, id) DO NOTHING RETURNING rid",
            &[&v.rtype, &v.id, &v.version, &v.last_updated, &v.compartment, &blob],
        )?;
        let Some(row) = row else {
            return Ok(false);
        };
        let rid: i64 = row.get(0);
        self.conn.execute(
            "INSERT INTO versions (rid, rtype, version, last_updated, state, key_name, body) \
             VALUES ($1, $2, $3, $4, 0, $5, $6)",
            &[
                &rid,
                &v.rtype,
                &v.version,
                &v.last_updated,
                &v.key_name,
                &v.body,
            ],
        )?;
        self.insert_index(rid, index)?;
        Ok(true)
    }

    fn insert_index(&mut self, rid: i64, index: &IndexEntries) -> StoreResult<()> {
        if !index.tokens.is_empty() {
            let tokens: Vec<Vec<u8>> = index.tokens.iter().map(|t| t.to_vec()).collect();
            self.conn.execute(
                "INSERT INTO idx_token (token, rid) SELECT t, $2::bigint FROM unnest($1::bytea[]) t \
                 ON CONFLICT DO NOTHING",
                &[&tokens, &rid],
            )?;
        }
        if index.ranges.is_empty() {
            return Ok(());
        }
        let pkeys: Vec<i64> = index.ranges.iter().map(|r| r.pkey).collect();
        let los: Vec<f64> = index.ranges.iter().map(|r| r.lo).collect();
        let his: Vec<f64> = index.ranges.iter().map(|r| r.hi).collect();
        self.conn.execute(
            "INSERT INTO idx_range (pkey, lo, rid, hi) \
             SELECT p, l, $4::bigint, h FROM unnest($1::bigint[], $2::float8[], $3::float8[]) AS u(p, l, h) \
             ON CONFLICT DO NOTHING",
            &[&pkeys, &los, &his, &rid],
        )?;
        for r in index.ranges.iter().filter(|r| r.sortable) {
            self.conn.execute(
                "INSERT INTO idx_sort (pkey, rid, min_lo, max_hi) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (pkey, rid) DO UPDATE SET min_lo = LEAST(idx_sort.min_lo, excluded.min_lo), \
                 max_hi = GREATEST(idx_sort.max_hi, excluded.max_hi)",
                &[&r.pkey, &rid, &r.lo, &r.hi],
            )?;
        }
        Ok(())
    }

    fn delete_index(&mut self, rid: i64, index: &IndexEntries) -> StoreResult<()> {
        if !index.tokens.is_empty() {
            let tokens: Vec<Vec<u8>> = index.tokens.iter().map(|t| t.to_vec()).collect();
            self.conn.execute(
                "DELETE FROM idx_token WHERE rid = $2 AND token = ANY($1)",
                &[&tokens, &rid],
            )?;
        }
        if !index.ranges.is_empty() {
            let pkeys: Vec<i64> = index.ranges.iter().map(|r| r.pkey).collect();
            let los: Vec<f64> = index.ranges.iter().map(|r| r.lo).collect();
            let his: Vec<f64> = index.ranges.iter().map(|r| r.hi).collect();
            // Exact rows, so that the primary key (pkey, lo, rid, hi) finds them.
            self.conn.execute(
                "DELETE FROM idx_range r USING unnest($1::bigint[], $2::float8[], $3::float8[]) AS u(p, l, h) \
                 WHERE r.pkey = u.p AND r.lo = u.l AND r.hi = u.h AND r.rid = $4",
                &[&pkeys, &los, &his, &rid],
            )?;
            self.conn.execute(
                "DELETE FROM idx_sort WHERE rid = $1 AND pkey = ANY($2)",
                &[&rid, &pkeys],
            )?;
        }
        Ok(())
    }
}

// The index blob format is shared with the SQLite backend.
use crate::sqlite::{decode_index, encode_index};
