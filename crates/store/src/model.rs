//! The data model of the store: what is kept, what is asked.

/// A blind index token (an HMAC output computed by `custos-crypto`).
///
/// Contract: a token stands for one (resource type, parameter, value) —
/// callers domain-separate tokens by resource type — so that a token's index
/// rows alone can answer a search of that type.
pub type Token = [u8; 16];

/// Errors of a storage backend.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An optimistic-locking precondition did not hold.
    #[error("version conflict on {rtype}/{id}: expected {expected}, found {found}")]
    Conflict {
        rtype: String,
        id: String,
        expected: String,
        found: String,
    },
    /// The job itself decided to abort (its error is carried back to the caller).
    #[error("aborted: {0}")]
    Aborted(Box<dyn std::error::Error + Send + Sync>),
    /// The backend failed (I/O, corruption, connection). Never contains PHI.
    #[error("storage backend: {0}")]
    Backend(String),
}

impl StoreError {
    /// Wrap a job's own error so that it can be recovered with [`StoreError::into_aborted`].
    pub fn abort<E: std::error::Error + Send + Sync + 'static>(e: E) -> StoreError {
        StoreError::Aborted(Box::new(e))
    }
    /// Recover the job's own error of type `E`, if this is one.
    pub fn into_aborted<E: std::error::Error + 'static>(self) -> Result<E, StoreError> {
        match self {
            StoreError::Aborted(b) => match b.downcast::<E>() {
                Ok(e) => Ok(*e),
                Err(b) => Err(StoreError::Aborted(b)),
            },
            other => Err(other),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// One stored version of a resource, as the store holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredVersion {
    /// The store's internal row id of the resource (stable across versions).
    pub rid: i64,
    pub rtype: String,
    pub id: String,
    pub version: i64,
    /// UTC microseconds since the epoch.
    pub last_updated: i64,
    pub state: RecordState,
    /// The name of the data key that sealed `body` (`patient/{id}` or `shared`).
    pub key_name: String,
    /// The sealed body (empty for a deletion tombstone).
    pub body: Vec<u8>,
    /// The value the query was ordered by, for paging cursors.
    pub sort_key: Option<f64>,
    /// The write sequence number of this version (monotonic across the store).
    pub seq: i64,
}

/// Whether a version is live, a deletion, or erased by crypto-shredding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordState {
    Live = 0,
    Deleted = 1,
    Erased = 2,
}

impl RecordState {
    pub(crate) fn from_i64(v: i64) -> RecordState {
        match v {
            0 => RecordState::Live,
            1 => RecordState::Deleted,
            _ => RecordState::Erased,
        }
    }
}

/// A new version to write.
#[derive(Debug, Clone)]
pub struct NewVersion {
    pub rtype: String,
    pub id: String,
    pub version: i64,
    pub last_updated: i64,
    /// True for a deletion tombstone (`body` empty).
    pub deleted: bool,
    pub key_name: String,
    /// The patient whose compartment this resource belongs to, if any
    /// (a random id, never PHI); used for erasure and access control.
    pub compartment: Option<String>,
    pub body: Vec<u8>,
}

/// What the current version must be for a write to proceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The resource must not exist (or only as a deleted tombstone).
    Absent,
    /// The current version must be exactly this one.
    Version(i64),
}

/// A range row: a search value that is compared, not matched
/// (clinical dates in UTC micros, numbers and quantities).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RangeEntry {
    /// Identifies (resource type, parameter[, unit]); see `custos-records`.
    pub pkey: i64,
    pub lo: f64,
    pub hi: f64,
    /// Whether results may be ordered by this parameter (dates); only such
    /// rows get a sort row.
    pub sortable: bool,
}

/// The index rows of one resource version.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IndexEntries {
    pub tokens: Vec<Token>,
    pub ranges: Vec<RangeEntry>,
}

/// A condition on a range row; every bound given must hold.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RangeCond {
    pub lo_ge: Option<f64>,
    pub lo_lt: Option<f64>,
    pub hi_gt: Option<f64>,
    pub hi_le: Option<f64>,
}

/// One AND-ed filter of an index query.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    /// The resource has an index row with one of these tokens.
    AnyToken(Vec<Token>),
    /// The resource has no index row with any of these tokens.
    NoToken(Vec<Token>),
    /// The resource has a range row of `pkey` meeting one of the conditions.
    AnyRange { pkey: i64, any: Vec<RangeCond> },
    /// The resource id is one of these.
    Ids(Vec<String>),
    /// `last_updated` meets one of the conditions (lo = hi = last_updated).
    LastUpdated(Vec<RangeCond>),
    /// The resource is in this patient's compartment.
    Compartment(String),
    /// Access control: the resource is in one of these patients'
    /// compartments, or (with `shared`) in no patient's compartment.
    Visible { patients: Vec<String>, shared: bool },
    /// Access control: the resource is in none of these patients' compartments.
    Hidden(Vec<String>),
}

/// How results are ordered (always followed by the row id for a total order).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Order {
    /// Insertion order.
    Rid,
    LastUpdated,
    /// By the smallest `lo` (ascending) or largest `hi` (descending) of a range parameter;
    /// resources without a value sort last.
    Range(i64),
}

/// A keyset position: results strictly after (or before) this one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Keyset {
    pub sort_key: f64,
    pub rid: i64,
}

/// A search over the current, live versions of one resource type.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexQuery {
    pub rtype: String,
    pub filters: Vec<Filter>,
    pub order: Order,
    pub descending: bool,
    /// Start strictly after this position in the ordering.
    pub after: Option<Keyset>,
    /// Walk the ordering backwards from `after` (for `previous` links);
    /// results still come back in forward order.
    pub backwards: bool,
    pub limit: usize,
}

impl IndexQuery {
    /// All live resources of a type in insertion order.
    pub fn all(rtype: &str, limit: usize) -> IndexQuery {
        IndexQuery {
            rtype: rtype.to_string(),
            filters: Vec::new(),
            order: Order::Rid,
            descending: false,
            after: None,
            backwards: false,
            limit,
        }
    }
}

/// Which history to read.
#[derive(Debug, Clone, PartialEq)]
pub enum HistoryScope {
    Instance { rtype: String, id: String },
    Type(String),
    System,
}

/// A history query: newest first.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryQuery {
    pub scope: HistoryScope,
    /// Only versions updated at or after (UTC micros).
    pub since: Option<i64>,
    /// Only versions updated before (UTC micros), `_at`-style upper bound.
    pub before: Option<i64>,
    /// Only versions with a sequence number below this (paging).
    pub seq_below: Option<i64>,
    /// Access control: only versions sealed under one of these data keys.
    pub key_names: Option<Vec<String>>,
    /// Access control: no version sealed under one of these data keys.
    pub exclude_keys: Vec<String>,
    pub limit: usize,
}

/// The current version of a resource, without its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub version: i64,
    pub state: RecordState,
    /// The patient whose compartment the resource is in, if any.
    pub compartment: Option<String>,
}

/// A system record: server state that is not a FHIR resource (users,
/// clients, tokens, signing keys, settings). Values are opaque bytes —
/// callers seal whatever is secret before it reaches the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysRecord {
    pub kind: String,
    pub key: String,
    /// Starts at 1 and grows by one with every write (optimistic locking).
    pub version: i64,
    pub value: Vec<u8>,
}

/// One entry of an append-only system log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// Position in the log (monotonic across all logs of the store).
    pub seq: i64,
    pub log: String,
    /// UTC microseconds.
    pub at: i64,
    pub value: Vec<u8>,
}

/// One event to append to the audit log. `data` is the leaf: opaque bytes
/// (sealed by the caller) whose RFC 6962 leaf hash enters the Merkle tree.
/// The other fields only serve search and are never part of the proof.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditAppend<'a> {
    /// UTC microseconds.
    pub at: i64,
    /// `C`, `R`, `U`, `D` or `E` (FHIR AuditEvent.action).
    pub action: &'a str,
    /// 0 success, 4 minor failure, 8 serious failure, 12 major failure.
    pub outcome: u8,
    /// Blind token of the acting principal, if known.
    pub agent: Option<&'a str>,
    /// Blind tokens of the patients concerned.
    pub patients: &'a [String],
    pub data: &'a [u8],
}

/// One stored audit log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// The leaf index, from 0.
    pub index: u64,
    pub at: i64,
    pub data: Vec<u8>,
}

/// A search of the audit log: every given field must match. Newest first
/// unless `ascending`; `before`/`after` are exclusive leaf-index bounds (keyset paging).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    pub patient: Option<String>,
    pub agent: Option<String>,
    pub action: Option<String>,
    pub outcome: Option<u8>,
    /// Inclusive lower bound on `at` (µs).
    pub from: Option<i64>,
    /// Exclusive upper bound on `at` (µs).
    pub until: Option<i64>,
    pub before: Option<u64>,
    pub after: Option<u64>,
    pub ascending: bool,
    pub limit: usize,
}

/// A wrapped data key as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub name: String,
    pub kek_id: String,
    pub blob: Vec<u8>,
}

/// Read operations of a transaction.
pub trait ReadTx {
    /// The current version (live, deleted or erased) of a resource.
    fn current(&mut self, rtype: &str, id: &str) -> StoreResult<Option<StoredVersion>>;
    /// The current version number, state and compartment of a resource, without its body.
    fn head(&mut self, rtype: &str, id: &str) -> StoreResult<Option<Head>>;
    /// A specific version.
    fn version(
        &mut self,
        rtype: &str,
        id: &str,
        version: i64,
    ) -> StoreResult<Option<StoredVersion>>;
    /// Search current live versions.
    fn search(&mut self, q: &IndexQuery) -> StoreResult<Vec<StoredVersion>>;
    /// The ids of the matches of `q` (same order and limit as [`ReadTx::search`]), without bodies.
    fn search_ids(&mut self, q: &IndexQuery) -> StoreResult<Vec<String>>;
    /// The distinct patient compartments of the matches of `q` (ignoring
    /// order, keyset and limit), at most `cap` of them.
    fn compartments(&mut self, q: &IndexQuery, cap: usize) -> StoreResult<Vec<String>>;
    /// Count matches of `q` (ignoring order, keyset and limit), counting at most `cap`.
    fn count(&mut self, q: &IndexQuery, cap: u64) -> StoreResult<u64>;
    /// Versions, newest first.
    fn history(&mut self, q: &HistoryQuery) -> StoreResult<Vec<StoredVersion>>;
    /// Count versions of a history query, at most `cap`.
    fn history_count(&mut self, q: &HistoryQuery, cap: u64) -> StoreResult<u64>;
    /// A wrapped data key by name.
    fn data_key(&mut self, name: &str) -> StoreResult<Option<KeyRecord>>;
    /// Up to `limit` data keys not wrapped under `kek_id` (for rotation).
    fn data_keys_not_under(&mut self, kek_id: &str, limit: usize) -> StoreResult<Vec<KeyRecord>>;
    /// How many data keys each KEK wraps.
    fn data_key_counts(&mut self) -> StoreResult<Vec<(String, u64)>>;
    /// Counts of live resources per type.
    fn type_counts(&mut self) -> StoreResult<Vec<(String, u64)>>;
    /// A system record.
    fn sys_get(&mut self, kind: &str, key: &str) -> StoreResult<Option<SysRecord>>;
    /// Every system record of a kind, ordered by key.
    fn sys_list(&mut self, kind: &str) -> StoreResult<Vec<SysRecord>>;
    /// Entries of a system log with `seq > after`, oldest first, at most `limit`.
    fn log_read(&mut self, log: &str, after: i64, limit: usize) -> StoreResult<Vec<LogEntry>>;
    /// The number of entries in the audit log (its tree size).
    fn audit_size(&mut self) -> StoreResult<u64>;
    /// Audit entries with `start <= index < end`, oldest first, at most `limit`.
    fn audit_entries(&mut self, start: u64, end: u64, limit: usize)
    -> StoreResult<Vec<AuditEntry>>;
    /// Stored Merkle hashes of the audit log by their tlog stored-hash index
    /// (leaf and interior nodes, see `tlog_tiles::stored_hash_index`), in the
    /// order asked. A missing hash is an error.
    fn audit_hashes(&mut self, indexes: &[u64]) -> StoreResult<Vec<[u8; 32]>>;
    /// Every stored Merkle hash with `lo <= index < hi` (stored-hash
    /// indexes), in order: one range scan, for verifying a whole log.
    fn audit_hash_range(&mut self, lo: u64, hi: u64) -> StoreResult<Vec<(u64, [u8; 32])>>;
    /// Audit entries matching `q`.
    fn audit_search(&mut self, q: &AuditQuery) -> StoreResult<Vec<AuditEntry>>;
}

/// Write operations of a transaction.
pub trait WriteTx: ReadTx {
    /// Write a new version and replace the resource's index rows with `index`.
    fn put(&mut self, v: &NewVersion, index: &IndexEntries, expect: Expect) -> StoreResult<()>;
    /// Insert a wrapped data key; `replace` allows overwriting (re-wrapping).
    fn put_data_key(&mut self, key: &KeyRecord, replace: bool) -> StoreResult<()>;
    /// Crypto-shredding: delete the named data key, mark every resource of
    /// the patient's compartment erased and drop their index rows. Returns
    /// the number of resources erased.
    fn erase_compartment(&mut self, patient_id: &str, key_name: &str) -> StoreResult<u64>;
    /// Write a system record. With `expect`, the current version must be
    /// exactly that (`0`: the record must not exist) or the write fails
    /// with [`StoreError::Conflict`]. Returns the new version.
    fn sys_put(
        &mut self,
        kind: &str,
        key: &str,
        value: &[u8],
        expect: Option<i64>,
    ) -> StoreResult<i64>;
    /// Delete a system record; true if it existed.
    fn sys_delete(&mut self, kind: &str, key: &str) -> StoreResult<bool>;
    /// Append to a system log; returns the entry's sequence number.
    fn log_append(&mut self, log: &str, at: i64, value: &[u8]) -> StoreResult<i64>;
    /// Append an entry to the audit log and its RFC 6962 hashes to the
    /// Merkle tree, in this transaction; returns the entry's leaf index.
    fn audit_append(&mut self, e: &AuditAppend<'_>) -> StoreResult<u64>;
}

/// The audit log's stored Merkle hashes, read through a transaction, as
/// `tlog_tiles` asks for them (roots, inclusion and consistency proofs).
pub struct AuditTreeHashes<'a>(pub std::cell::RefCell<&'a mut dyn ReadTx>);

impl<'a> AuditTreeHashes<'a> {
    pub fn new(tx: &'a mut dyn ReadTx) -> Self {
        AuditTreeHashes(std::cell::RefCell::new(tx))
    }
}

impl tlog_tiles::HashReader for AuditTreeHashes<'_> {
    fn read_hashes(
        &self,
        indexes: &[u64],
    ) -> Result<Vec<tlog_tiles::Hash>, tlog_tiles::tlog::Error> {
        let hashes = self
            .0
            .borrow_mut()
            .audit_hashes(indexes)
            .map_err(|_| tlog_tiles::tlog::Error::IndexesNotInTree)?;
        // tlog_tiles asserts on a short answer: refuse it here instead.
        if hashes.len() != indexes.len() {
            return Err(tlog_tiles::tlog::Error::IndexesNotInTree);
        }
        Ok(hashes.into_iter().map(tlog_tiles::Hash).collect())
    }
}

/// The RFC 6962 root of the first `size` entries of the audit log.
pub fn audit_root(tx: &mut dyn ReadTx, size: u64) -> StoreResult<[u8; 32]> {
    tlog_tiles::tree_hash(size, &AuditTreeHashes::new(tx))
        .map(|h| h.0)
        .map_err(|e| StoreError::Backend(format!("audit tree: {e}")))
}
