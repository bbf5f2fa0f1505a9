//! The record service: FHIR interactions over sealed storage.
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use custos_fhir::date::format_instant;
use custos_fhir::{ErrorKind, FhirError, compartment, registry, types, validate};
use custos_store::{
    Expect, HistoryQuery, HistoryScope, IndexEntries, NewVersion, ReadTx, RecordState, Store,
    StoreError, StoreExt, StoredVersion, WriteTx,
};
use serde_json::{Value, json};

use crate::access::{Guard, Interaction, Unrestricted, compartment_of_key};
use crate::index::index_resource;
use crate::keys::{KeyService, SHARED_KEY_NAME, patient_key_name, store_err};

/// Limits and defaults of the record service.
#[derive(Debug, Clone)]
pub struct RecordsConfig {
    /// `_count` when the client gives none.
    pub default_count: usize,
    /// Largest `_count` honoured.
    pub max_count: usize,
    /// Counting a total stops here; past it the Bundle carries no total.
    pub total_cap: u64,
    /// Totals that need confirming on opened resources are computed only up to this many candidates.
    pub confirm_cap: usize,
    /// Most candidates opened to fill one page of a confirmed search.
    pub scan_limit: usize,
    /// Refuse writes whose relative references point to no live resource (422).
    pub check_references: bool,
    /// Most entries accepted in one batch or transaction Bundle.
    pub max_bundle_entries: usize,
    /// Data keys kept unwrapped in memory.
    pub key_cache: usize,
}

impl Default for RecordsConfig {
    fn default() -> Self {
        RecordsConfig {
            default_count: 20,
            max_count: 1000,
            total_cap: 100_000,
            confirm_cap: 2_000,
            scan_limit: 20_000,
            check_references: true,
            max_bundle_entries: 20_000,
            key_cache: 65_536,
        }
    }
}

/// An opened (decrypted) resource version.
#[derive(Debug, Clone)]
pub struct Opened {
    pub rtype: String,
    pub id: String,
    pub version: i64,
    /// UTC microseconds.
    pub last_updated: i64,
    pub resource: Value,
    /// The data key that sealed it (`patient/{id}` or `shared`): tells the compartment.
    pub key_name: String,
    pub(crate) rid: i64,
    pub(crate) sort_key: Option<f64>,
    /// The stored JSON, when the resource was opened without parsing
    /// (`resource` is then `Null`); see [`Records::open_raw`].
    pub(crate) raw: Option<Box<serde_json::value::RawValue>>,
}

impl Opened {
    /// Move the body out (leaving `Null`) into a copy of the rest.
    pub(crate) fn take_body(&mut self) -> Opened {
        Opened {
            rtype: self.rtype.clone(),
            id: self.id.clone(),
            version: self.version,
            last_updated: self.last_updated,
            resource: std::mem::take(&mut self.resource),
            key_name: self.key_name.clone(),
            rid: self.rid,
            sort_key: self.sort_key,
            raw: self.raw.take(),
        }
    }

    #[cfg(test)]
    pub(crate) fn for_test(rtype: &str, id: &str, version: i64, resource: Value) -> Opened {
        Opened {
            rtype: rtype.into(),
            id: id.into(),
            version,
            last_updated: 0,
            resource,
            key_name: crate::keys::SHARED_KEY_NAME.into(),
            rid: 0,
            sort_key: None,
            raw: None,
        }
    }

    fn stored(
        sv: StoredVersion,
        resource: Value,
        raw: Option<Box<serde_json::value::RawValue>>,
    ) -> Opened {
        Opened {
            rtype: sv.rtype,
            id: sv.id,
            version: sv.version,
            last_updated: sv.last_updated,
            resource,
            key_name: sv.key_name,
            rid: sv.rid,
            sort_key: sv.sort_key,
            raw,
        }
    }

    /// The weak ETag of this version (`W/"3"`).
    pub fn etag(&self) -> String {
        format!("W/\"{}\"", self.version)
    }
    /// `meta.lastUpdated` as a FHIR instant.
    pub fn last_modified(&self) -> String {
        format_instant(self.last_updated)
    }
}

/// A resource version as its stored JSON bytes.
#[derive(Debug, Clone)]
pub struct RawVersion {
    pub rtype: String,
    pub id: String,
    pub version: i64,
    /// UTC microseconds.
    pub last_updated: i64,
    pub json: Vec<u8>,
}

impl RawVersion {
    /// The weak ETag of this version (`W/"3"`).
    pub fn etag(&self) -> String {
        format!("W/\"{}\"", self.version)
    }
}

/// A version stamped, indexed and serialized, ready to be sealed and stored.
pub(crate) struct Prepared {
    pub rtype: String,
    pub id: String,
    pub version: i64,
    pub at: i64,
    pub resource: Value,
    pub body: Vec<u8>,
    pub index: IndexEntries,
    pub key_name: String,
    pub compartment: Option<String>,
}

impl Prepared {
    pub(crate) fn into_opened(self) -> Opened {
        Opened {
            rtype: self.rtype,
            id: self.id,
            version: self.version,
            last_updated: self.at,
            resource: self.resource,
            key_name: self.key_name,
            rid: 0,
            sort_key: None,
            raw: None,
        }
    }
}

/// A version to write, before sealing.
pub(crate) struct Pending {
    pub rtype: String,
    pub id: String,
    pub version: i64,
    pub resource: Option<Value>,
    pub expect: Expect,
}

pub(crate) struct Inner {
    store: Arc<dyn Store>,
    keys: KeyService,
    config: RecordsConfig,
    clock: AtomicI64,
    relations_gen: AtomicU64,
    consents_gen: AtomicU64,
    /// Committed versions held for the in-process consumer of the audit log.
    written: crate::handover::WrittenBodies,
}

/// The record service; cheap to clone. Each handle carries the [`Guard`]
/// of its caller (see [`Records::guarded`]).
#[derive(Clone)]
pub struct Records {
    inner: Arc<Inner>,
    guard: Arc<dyn Guard>,
    audit: Option<Arc<dyn crate::access::WriteAudit>>,
}

/// Microseconds since the epoch, strictly increasing within this process.
fn now_micros(clock: &AtomicI64) -> i64 {
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    let mut prev = clock.load(Ordering::Relaxed);
    loop {
        let next = wall.max(prev + 1);
        match clock.compare_exchange_weak(prev, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(p) => prev = p,
        }
    }
}

/// The associated data binding a sealed body to its row.
pub(crate) fn aad(rtype: &str, id: &str, version: i64, key_name: &str) -> Vec<u8> {
    format!("custos-v1|{rtype}|{id}|{version}|{key_name}").into_bytes()
}

/// A version read found nothing: say which version is missing.
fn no_such_version(e: FhirError, rtype: &str, id: &str, version: i64) -> FhirError {
    match e.kind {
        ErrorKind::NotFound => {
            FhirError::not_found(format!("{rtype}/{id} has no version {version}"))
        }
        _ => e,
    }
}

/// A new, unguessable resource id (a random UUID: 122 random bits).
pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

impl Records {
    /// Build the service over a store, loading the blind-index key.
    pub async fn open(
        store: Arc<dyn Store>,
        provider: Arc<dyn custos_crypto::KekProvider>,
        sealer: Arc<dyn custos_crypto::Sealer>,
        config: RecordsConfig,
    ) -> Result<Records, FhirError> {
        let keys = KeyService::open(&store, provider, sealer, config.key_cache).await?;
        Ok(Records {
            inner: Arc::new(Inner {
                store,
                keys,
                config,
                clock: AtomicI64::new(0),
                relations_gen: AtomicU64::new(0),
                consents_gen: AtomicU64::new(0),
                written: Default::default(),
            }),
            guard: Arc::new(Unrestricted),
            audit: None,
        })
    }

    /// The same service acting for a caller: every interaction through the
    /// returned handle asks `guard` first. A freshly opened service is
    /// [`Unrestricted`] (for trusted in-process callers only).
    pub fn guarded(&self, guard: Arc<dyn Guard>) -> Records {
        Records {
            inner: self.inner.clone(),
            guard,
            audit: self.audit.clone(),
        }
    }

    /// The same service with every committed write recording its audit
    /// event through `audit`, inside the write's transaction.
    pub fn audited(&self, audit: Arc<dyn crate::access::WriteAudit>) -> Records {
        Records {
            inner: self.inner.clone(),
            guard: self.guard.clone(),
            audit: Some(audit),
        }
    }

    /// The write audit of this handle, if any.
    pub(crate) fn write_audit(&self) -> Option<&Arc<dyn crate::access::WriteAudit>> {
        self.audit.as_ref()
    }

    /// The guard of this handle.
    pub fn guard(&self) -> &dyn Guard {
        self.guard.as_ref()
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }
    pub fn keys(&self) -> &KeyService {
        &self.inner.keys
    }
    pub fn config(&self) -> &RecordsConfig {
        &self.inner.config
    }
    pub(crate) fn relations_gen(&self) -> &AtomicU64 {
        &self.inner.relations_gen
    }
    pub(crate) fn consents_gen(&self) -> &AtomicU64 {
        &self.inner.consents_gen
    }
    pub(crate) fn now(&self) -> i64 {
        now_micros(&self.inner.clock)
    }

    /// Open a stored version: check its state, unwrap its key, open and parse it.
    pub(crate) fn open_version(
        &self,
        tx: &mut dyn ReadTx,
        sv: StoredVersion,
    ) -> Result<Opened, FhirError> {
        let plain = self.open_bytes(tx, &sv)?;
        let resource: Value = serde_json::from_slice(&plain).map_err(|_| {
            FhirError::internal(format!("stored {}/{} does not decode", sv.rtype, sv.id))
        })?;
        Ok(Opened::stored(sv, resource, None))
    }

    /// Open a stored version without parsing it: the JSON is kept as it was
    /// stored, to be written into a response as it is.
    pub(crate) fn open_raw(
        &self,
        tx: &mut dyn ReadTx,
        sv: StoredVersion,
    ) -> Result<Opened, FhirError> {
        let bytes = self.open_bytes(tx, &sv)?;
        let text = String::from_utf8(bytes).map_err(|_| {
            FhirError::internal(format!("stored {}/{} is not UTF-8", sv.rtype, sv.id))
        })?;
        let raw = serde_json::value::RawValue::from_string(text).map_err(|_| {
            FhirError::internal(format!("stored {}/{} does not decode", sv.rtype, sv.id))
        })?;
        Ok(Opened::stored(sv, Value::Null, Some(raw)))
    }

    /// Open a live stored version to its JSON bytes (no parsing).
    fn open_bytes(&self, tx: &mut dyn ReadTx, sv: &StoredVersion) -> Result<Vec<u8>, FhirError> {
        check_live(sv)?;
        let Some(key) = self.keys().key_for_read(tx, &sv.key_name)? else {
            return Err(FhirError::new(
                ErrorKind::Gone,
                format!("{}/{} was erased", sv.rtype, sv.id),
            ));
        };
        let plain = self
            .keys()
            .sealer()
            .open(&key, &aad(&sv.rtype, &sv.id, sv.version, &sv.key_name), &sv.body)
            .map_err(|_| {
                tracing::error!(rtype = %sv.rtype, id = %sv.id, version = sv.version, "sealed body failed its integrity check");
                FhirError::internal(format!(
                    "integrity check failed for {}/{} version {}: the stored data was altered or moved",
                    sv.rtype, sv.id, sv.version
                ))
            })?;
        Ok(plain)
    }

    pub(crate) fn check_type(rtype: &str) -> Result<(), FhirError> {
        if types::is_resource_type(rtype) {
            Ok(())
        } else {
            Err(FhirError::not_found(format!(
                "unknown resource type '{rtype}'"
            )))
        }
    }

    pub(crate) fn check_id(id: &str) -> Result<(), FhirError> {
        if types::is_valid_id(id) {
            Ok(())
        } else {
            Err(FhirError::bad_request("invalid resource id"))
        }
    }

    /// Read the current version.
    pub async fn read(&self, rtype: &str, id: &str) -> Result<Opened, FhirError> {
        self.before_read(rtype, id).await?;
        let (this, t, i) = (self.clone(), rtype.to_string(), id.to_string());
        let found = self
            .store()
            .read(move |tx| {
                Ok(tx
                    .current(&t, &i)?
                    .map(|sv| (sv.key_name.clone(), this.open_version(tx, sv))))
            })
            .await
            .map_err(store_err)?;
        self.after_read(rtype, id, found).await
    }

    /// Read the current version as the stored JSON bytes, without parsing:
    /// the fast path for `GET /Type/id`.
    pub async fn read_raw(&self, rtype: &str, id: &str) -> Result<RawVersion, FhirError> {
        self.before_read(rtype, id).await?;
        let (this, t, i) = (self.clone(), rtype.to_string(), id.to_string());
        let found = self
            .store()
            .read_point(move |tx| {
                Ok(tx.current(&t, &i)?.map(|sv| {
                    let opened = this.open_bytes(tx, &sv).map(|json| RawVersion {
                        rtype: sv.rtype,
                        id: sv.id,
                        version: sv.version,
                        last_updated: sv.last_updated,
                        json,
                    });
                    (sv.key_name, opened)
                }))
            })
            .await
            .map_err(store_err)?;
        self.after_read(rtype, id, found).await
    }

    /// Read a specific version.
    pub async fn vread(&self, rtype: &str, id: &str, version: &str) -> Result<Opened, FhirError> {
        self.before_read(rtype, id).await?;
        let v: i64 = version
            .parse()
            .map_err(|_| FhirError::not_found(format!("no version '{version}'")))?;
        let (this, t, i) = (self.clone(), rtype.to_string(), id.to_string());
        let found = self
            .store()
            .read(move |tx| {
                Ok(tx
                    .version(&t, &i, v)?
                    .map(|sv| (sv.key_name.clone(), this.open_version(tx, sv))))
            })
            .await
            .map_err(store_err)?;
        self.after_read(rtype, id, found)
            .await
            .map_err(|e| no_such_version(e, rtype, id, v))
    }

    /// Hold, from now on, up to `capacity` of the versions that writes
    /// commit, opened, of the resource `types`, for the in-process consumer
    /// of the audit log (detection), which takes them with
    /// [`Records::take_written`] instead of reading them back. 0 stops and
    /// forgets what is held. See the `handover` module.
    pub fn hand_over_writes(&self, capacity: usize, types: &[&str]) {
        self.inner.written.configure(capacity, types);
    }

    /// Take the committed versions held for the consumer (see
    /// [`Records::hand_over_writes`]): each asked-for version that is held,
    /// once, as [`Records::vread`] would have opened it; `None` for the
    /// rest, which the caller reads. This handle's guard decides as for a read.
    pub async fn take_written(&self, wanted: &[(String, String, i64)]) -> Vec<Option<Opened>> {
        let taken = self.inner.written.take(wanted);
        let mut out = Vec::with_capacity(taken.len());
        for o in taken {
            out.push(match o {
                Some(o) => {
                    let (rtype, id, key_name) = (o.rtype.clone(), o.id.clone(), o.key_name.clone());
                    match self.before_read(&rtype, &id).await {
                        Ok(()) => self
                            .after_read(&rtype, &id, Some((key_name, Ok(o))))
                            .await
                            .ok(),
                        Err(_) => None,
                    }
                }
                None => None,
            });
        }
        out
    }

    /// Leave the versions a write committed for the consumer, if one asked
    /// for their types: moved out of `done` when the caller does not return
    /// bodies (`keep` false), copied otherwise.
    pub(crate) fn hand_over<'a>(
        &self,
        committed: impl Iterator<Item = &'a mut Opened>,
        keep: bool,
    ) {
        let w = &self.inner.written;
        // Asked once per commit, not once per version.
        let Some(types) = w.wanted_types() else {
            return;
        };
        let handed: Vec<Opened> = committed
            .filter(|o| types.contains(&o.rtype))
            .map(|o| if keep { o.clone() } else { o.take_body() })
            .collect();
        if !handed.is_empty() {
            w.keep(handed);
        }
    }

    /// Read several versions (`(type, id, version)`) in one store read:
    /// one trip to a reader thread instead of one per version, for a caller
    /// that needs many at once (detection enriching a Bundle's writes). Each
    /// answer is what [`Records::vread`] would have given, in order.
    pub async fn vread_many(
        &self,
        wanted: &[(String, String, i64)],
    ) -> Vec<Result<Opened, FhirError>> {
        let mut out: Vec<Option<Result<Opened, FhirError>>> = Vec::with_capacity(wanted.len());
        let mut ask = Vec::with_capacity(wanted.len());
        for (k, (t, i, v)) in wanted.iter().enumerate() {
            match self.before_read(t, i).await {
                Ok(()) => {
                    ask.push((k, t.clone(), i.clone(), *v));
                    out.push(None);
                }
                Err(e) => out.push(Some(Err(e))),
            }
        }
        if ask.is_empty() {
            // Nothing to read (the usual case for a read's event): no trip.
            return out.into_iter().flatten().collect();
        }
        let this = self.clone();
        let found = self
            .store()
            .read(move |tx| {
                let mut found = Vec::with_capacity(ask.len());
                for (k, t, i, v) in ask {
                    let f = tx
                        .version(&t, &i, v)?
                        .map(|sv| (sv.key_name.clone(), this.open_version(tx, sv)));
                    found.push((k, t, i, v, f));
                }
                Ok(found)
            })
            .await
            .map_err(store_err);
        match found {
            Ok(found) => {
                for (k, t, i, v, f) in found {
                    let answer = self.after_read(&t, &i, f).await;
                    out[k] = Some(answer.map_err(|e| no_such_version(e, &t, &i, v)));
                }
            }
            Err(e) => {
                for slot in out.iter_mut().filter(|o| o.is_none()) {
                    *slot = Some(Err(e.clone()));
                }
            }
        }
        out.into_iter()
            .map(|o| o.expect("every version answered"))
            .collect()
    }

    /// Checks before a read touches data: valid type and id, and the
    /// caller's right to read the type at all.
    async fn before_read(&self, rtype: &str, id: &str) -> Result<(), FhirError> {
        Self::check_type(rtype)?;
        Self::check_id(id)?;
        self.guard.check_type(Interaction::Read, rtype).await
    }

    /// The caller's right to the one resource found (by the compartment of
    /// its data key) decides before anything about it — even that it was
    /// deleted — is returned.
    pub(crate) async fn after_read<T>(
        &self,
        rtype: &str,
        id: &str,
        found: Option<(String, Result<T, FhirError>)>,
    ) -> Result<T, FhirError> {
        match found {
            None => Err(FhirError::not_found(format!("{rtype}/{id} is not known"))),
            Some((key_name, result)) => {
                self.guard
                    .check_resource(Interaction::Read, rtype, id, compartment_of_key(&key_name))
                    .await?;
                result
            }
        }
    }

    /// Stamp, seal, index and write one version inside a write transaction.
    pub(crate) fn write_pending(
        &self,
        tx: &mut dyn WriteTx,
        p: Pending,
        at: i64,
    ) -> Result<Option<Opened>, FhirError> {
        let Some(resource) = p.resource else {
            // A deletion: a tombstone under the key of the current version.
            let cur = tx.current(&p.rtype, &p.id).map_err(store_err)?;
            let (key_name, compartment) = match &cur {
                Some(sv) if sv.state == RecordState::Live => {
                    let opened = self.open_version(tx, sv.clone())?;
                    (
                        sv.key_name.clone(),
                        compartment::patient_of(&opened.resource),
                    )
                }
                _ => (SHARED_KEY_NAME.to_string(), None),
            };
            let nv = NewVersion {
                rtype: p.rtype,
                id: p.id,
                version: p.version,
                last_updated: at,
                deleted: true,
                key_name,
                compartment,
                body: Vec::new(),
            };
            tx.put(&nv, &IndexEntries::default(), p.expect)
                .map_err(store_err)?;
            return Ok(None);
        };
        let prepared = self.prepare(&p.rtype, &p.id, p.version, resource, at)?;
        self.commit_prepared(tx, &prepared, p.expect)
            .map_err(store_err)?;
        Ok(Some(prepared.into_opened()))
    }

    /// Stamp, index and serialize a version: the CPU work of a write, done
    /// before the write transaction so that the single writer only seals and stores.
    pub(crate) fn prepare(
        &self,
        rtype: &str,
        id: &str,
        version: i64,
        mut resource: Value,
        at: i64,
    ) -> Result<Prepared, FhirError> {
        let obj = resource
            .as_object_mut()
            .ok_or_else(|| FhirError::bad_request("resource must be a JSON object"))?;
        obj.insert("id".into(), Value::String(id.to_string()));
        let meta = obj.entry("meta").or_insert_with(|| json!({}));
        if let Some(m) = meta.as_object_mut() {
            m.insert("versionId".into(), Value::String(version.to_string()));
            m.insert("lastUpdated".into(), Value::String(format_instant(at)));
        }
        let compartment = if rtype == "Patient" {
            Some(id.to_string())
        } else {
            compartment::patient_of(&resource)
        };
        let key_name = compartment
            .as_deref()
            .map(patient_key_name)
            .unwrap_or_else(|| SHARED_KEY_NAME.to_string());
        let index = index_resource(
            self.keys().blind(),
            rtype,
            &resource,
            registry().for_type(rtype),
        );
        let body = serde_json::to_vec(&resource).map_err(|e| FhirError::internal(e.to_string()))?;
        Ok(Prepared {
            rtype: rtype.to_string(),
            id: id.to_string(),
            version,
            at,
            resource,
            body,
            index,
            key_name,
            compartment,
        })
    }

    /// Seal a prepared version under its data key and store it, inside the write transaction.
    pub(crate) fn commit_prepared(
        &self,
        tx: &mut dyn WriteTx,
        p: &Prepared,
        expect: Expect,
    ) -> Result<(), StoreError> {
        let key = self
            .keys()
            .key_for_write(tx, &p.key_name)
            .map_err(StoreError::abort)?;
        let sealed =
            self.keys()
                .sealer()
                .seal(&key, &aad(&p.rtype, &p.id, p.version, &p.key_name), &p.body);
        let nv = NewVersion {
            rtype: p.rtype.clone(),
            id: p.id.clone(),
            version: p.version,
            last_updated: p.at,
            deleted: false,
            key_name: p.key_name.clone(),
            compartment: p.compartment.clone(),
            body: sealed,
        };
        tx.put(&nv, &p.index, expect)
    }

    /// Refuse relative references to resources that do not exist (422).
    /// `known_live` holds `Type/id`s already known to be live in this
    /// transaction (written by it, or checked before); checked ones are added.
    pub(crate) fn check_references(
        &self,
        tx: &mut dyn ReadTx,
        resource: &Value,
        known_live: &mut std::collections::HashSet<String>,
    ) -> Result<(), FhirError> {
        if !self.config().check_references {
            return Ok(());
        }
        let mut refs = Vec::new();
        collect_references(resource, &mut refs);
        for r in refs {
            if r.starts_with('#') || r.contains("://") || known_live.contains(r) {
                continue;
            }
            if r.starts_with("urn:") {
                return Err(FhirError::unprocessable(format!(
                    "reference '{r}' cannot be resolved outside a transaction Bundle"
                )));
            }
            let mut parts = r.split('/');
            let (Some(t), Some(id)) = (parts.next(), parts.next()) else {
                return Err(FhirError::unprocessable(format!(
                    "reference '{r}' is not of the form Type/id"
                )));
            };
            if !types::is_resource_type(t) || !types::is_valid_id(id) {
                return Err(FhirError::unprocessable(format!(
                    "reference '{r}' is not of the form Type/id"
                )));
            }
            match head(tx, t, id)? {
                Some(sv) if sv.state == RecordState::Live => {
                    known_live.insert(r.to_string());
                }
                _ => {
                    return Err(FhirError::unprocessable(format!(
                        "reference '{t}/{id}' points to no existing resource"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Validate a body for `rtype` (and `id` when given in the URL).
    pub(crate) fn validate_body(
        rtype: &str,
        id: Option<&str>,
        body: &Value,
    ) -> Result<(), FhirError> {
        Self::check_type(rtype)?;
        let found = validate::validate_resource(body)?;
        if found != rtype {
            return Err(FhirError::bad_request(format!(
                "resource type '{found}' does not match the URL's '{rtype}'"
            )));
        }
        if let Some(id) = id {
            Self::check_id(id)?;
            match body.get("id").and_then(Value::as_str) {
                Some(b) if b == id => {}
                Some(_) => {
                    return Err(FhirError::bad_request(
                        "the resource id does not match the URL",
                    ));
                }
                None => {
                    return Err(FhirError::bad_request(
                        "an update must carry the resource id",
                    ));
                }
            }
        }
        Ok(())
    }

    /// Crypto-shredding: erase a patient's data key, making every version of
    /// every resource in their compartment unreadable. Returns the number of
    /// resources erased.
    pub async fn shred_patient(&self, patient_id: &str) -> Result<u64, FhirError> {
        Self::check_id(patient_id)?;
        self.relations_gen().fetch_add(1, Ordering::AcqRel);
        self.consents_gen().fetch_add(1, Ordering::AcqRel);
        let key_name = patient_key_name(patient_id);
        let (pid, kn) = (patient_id.to_string(), key_name.clone());
        let exists = self
            .store()
            .read(move |tx| tx.current("Patient", &pid))
            .await
            .map_err(store_err)?;
        if exists.is_none() {
            return Err(FhirError::not_found(format!(
                "Patient/{patient_id} is not known"
            )));
        }
        let pid = patient_id.to_string();
        let audit = self.audit.clone();
        let n = self
            .store()
            .write(move |tx| {
                let n = tx.erase_compartment(&pid, &kn)?;
                if let Some(a) = &audit {
                    a.record(
                        tx,
                        &[crate::access::Change {
                            interaction: "erase",
                            rtype: "Patient".into(),
                            id: pid.clone(),
                            version: 0,
                            patient: Some(pid.clone()),
                        }],
                    )?;
                }
                Ok(n)
            })
            .await
            .map_err(store_err)?;
        self.keys().forget(&key_name);
        self.inner.written.forget_key(&key_name);
        Ok(n)
    }

    /// History of an instance, a type, or the whole system; newest first.
    pub(crate) async fn history_rows(
        &self,
        q: HistoryQuery,
        want_total: bool,
    ) -> Result<(Vec<(StoredVersion, Option<Opened>)>, Option<u64>), FhirError> {
        match &q.scope {
            HistoryScope::Instance { rtype, .. } | HistoryScope::Type(rtype) => {
                Self::check_type(rtype)?
            }
            HistoryScope::System => {}
        }
        let this = self.clone();
        let cap = self.config().total_cap;
        self.store()
            .read(move |tx| {
                let r = (|| {
                    let rows = tx.history(&q).map_err(store_err)?;
                    let mut out = Vec::with_capacity(rows.len());
                    for sv in rows {
                        let opened = match sv.state {
                            RecordState::Live => Some(this.open_version(tx, sv.clone())?),
                            _ => None,
                        };
                        out.push((sv, opened));
                    }
                    let total = if want_total {
                        let n = tx.history_count(&q, cap).map_err(store_err)?;
                        if n >= cap { None } else { Some(n) }
                    } else {
                        None
                    };
                    Ok((out, total))
                })();
                Ok(r)
            })
            .await
            .map_err(store_err)?
    }

    /// Counts of live resources per type.
    pub async fn type_counts(&self) -> Result<Vec<(String, u64)>, FhirError> {
        self.store()
            .read(|tx| tx.type_counts())
            .await
            .map_err(store_err)
    }
}

/// Deleted and erased versions answer 410.
fn check_live(sv: &StoredVersion) -> Result<(), FhirError> {
    match sv.state {
        RecordState::Erased => {
            return Err(FhirError::new(
                ErrorKind::Gone,
                format!("{}/{} was erased", sv.rtype, sv.id),
            ));
        }
        RecordState::Deleted => {
            return Err(FhirError::new(
                ErrorKind::Gone,
                format!("{}/{} was deleted", sv.rtype, sv.id),
            ));
        }
        RecordState::Live => {}
    }
    Ok(())
}

/// The current version, state and compartment of a resource, without reading its body.
pub(crate) fn head(
    tx: &mut dyn ReadTx,
    rtype: &str,
    id: &str,
) -> Result<Option<custos_store::Head>, FhirError> {
    tx.head(rtype, id).map_err(store_err)
}

/// Every `reference` string in a resource.
pub(crate) fn collect_references<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == "reference" {
                    if let Value::String(s) = x {
                        out.push(s);
                    }
                } else if k != "contained" {
                    collect_references(x, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_references(x, out)),
        _ => {}
    }
}
