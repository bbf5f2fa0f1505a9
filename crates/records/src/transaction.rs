//! `batch` and `transaction` Bundles.
//!
//! A transaction is prepared in a read snapshot and committed as one write
//! job that re-verifies what the preparation assumed, so it commits whole or
//! not at all (see [`Records::run_entries`]). Single creates, updates and
//! deletes are one-entry transactions. A batch runs each entry on its own.
use std::collections::HashMap;

use custos_fhir::date::format_instant;
use custos_fhir::{ErrorKind, FhirError, types};
use custos_store::{Expect, ReadTx, RecordState, StoreError, StoreExt, WriteTx};
use serde_json::{Value, json};

use crate::access::{Interaction, Visibility, compartment_of_key};
use crate::bundles::entry;
use crate::keys::store_err;
use crate::search::Plan;
use crate::service::{Opened, Pending, Prepared, Records, head, new_id};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Method {
    Delete,
    Post,
    Put,
    Get,
}

#[derive(Debug, Clone)]
struct Entry {
    index: usize,
    full_url: Option<String>,
    method: Method,
    /// Resource type of the URL.
    rtype: String,
    /// `Type/id` target, if the URL names one.
    id: Option<String>,
    /// Conditional query (`Type?…`) or `ifNoneExist`.
    condition: Option<String>,
    if_match: Option<i64>,
    resource: Option<Value>,
    /// The raw URL (for GET).
    url: String,
    /// For GET entries: what the caller was allowed to see, decided before the commit.
    seen: Option<GetAccess>,
}

/// The access decision a GET entry carries into the commit.
#[derive(Debug, Clone)]
enum GetAccess {
    /// A read: only a version sealed under this data key may be returned.
    Key(String),
    /// A search: the visibility filter of the caller.
    Search(Visibility),
}

/// One access question of a prepared transaction, asked before it commits.
struct AccessCheck {
    pos: usize,
    interaction: Interaction,
    rtype: String,
    id: String,
    compartment: Option<String>,
}

impl Method {
    fn interaction(self, url: &str) -> Interaction {
        match self {
            Method::Post => Interaction::Create,
            Method::Put => Interaction::Update,
            Method::Delete => Interaction::Delete,
            Method::Get => {
                let path = url.split('?').next().unwrap_or_default();
                if path.split('/').filter(|s| !s.is_empty()).count() > 1 {
                    Interaction::Read
                } else {
                    Interaction::Search
                }
            }
        }
    }
}

fn parse_etag(s: &str) -> Option<i64> {
    s.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .parse()
        .ok()
}

fn strip_base<'a>(url: &'a str, base: &str) -> &'a str {
    url.strip_prefix(base)
        .map(|u| u.trim_start_matches('/'))
        .unwrap_or(url)
}

fn parse_entry(i: usize, e: &Value, base: &str) -> Result<Entry, FhirError> {
    let at = |msg: String| FhirError::bad_request(format!("Bundle.entry[{i}]: {msg}"));
    let request = e
        .get("request")
        .ok_or_else(|| at("missing request".into()))?;
    let method = match request.get("method").and_then(Value::as_str) {
        Some("POST") => Method::Post,
        Some("PUT") => Method::Put,
        Some("DELETE") => Method::Delete,
        Some("GET") | Some("HEAD") => Method::Get,
        Some(m) => return Err(at(format!("method {m} is not supported in Bundles"))),
        None => return Err(at("request.method is required".into())),
    };
    let url = request
        .get("url")
        .and_then(Value::as_str)
        .ok_or_else(|| at("request.url is required".into()))?;
    let url = strip_base(url, base).to_string();
    let (path, query) = match url.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (url.clone(), None),
    };
    let mut segs = path.split('/').filter(|s| !s.is_empty());
    let rtype = segs.next().unwrap_or_default().to_string();
    if !types::is_resource_type(&rtype) {
        return Err(at(format!("unknown resource type in url '{url}'")));
    }
    let id = segs.next().map(str::to_string);
    if let Some(id) = &id
        && !types::is_valid_id(id)
        && method != Method::Get
    {
        return Err(at("invalid id in url".into()));
    }
    let resource = e.get("resource").cloned();
    if matches!(method, Method::Post | Method::Put) {
        let r = resource
            .as_ref()
            .ok_or_else(|| at("a POST or PUT entry needs a resource".into()))?;
        Records::validate_body(
            &rtype,
            if method == Method::Put {
                id.as_deref()
            } else {
                None
            },
            r,
        )
        .map_err(|e| FhirError::new(e.kind, format!("Bundle.entry[{i}]: {}", e.message)))?;
    }
    let condition = match method {
        Method::Post => request
            .get("ifNoneExist")
            .and_then(Value::as_str)
            .map(str::to_string),
        Method::Put | Method::Delete if id.is_none() => Some(
            query
                .clone()
                .ok_or_else(|| at("PUT and DELETE need Type/id or search criteria".into()))?,
        ),
        _ => None,
    };
    let if_match = match request.get("ifMatch").and_then(Value::as_str) {
        Some(s) => {
            Some(parse_etag(s).ok_or_else(|| at("ifMatch must be an ETag like W/\"3\"".into()))?)
        }
        None => None,
    };
    Ok(Entry {
        index: i,
        full_url: e.get("fullUrl").and_then(Value::as_str).map(str::to_string),
        method,
        rtype,
        id,
        condition,
        if_match,
        resource,
        url,
        seen: None,
    })
}

/// Why a commit gave up: a lost race (prepare again) or a real error.
#[derive(Debug)]
enum CommitError {
    Retry,
    Fhir(FhirError),
}

impl std::fmt::Display for CommitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommitError::Retry => f.write_str("retry"),
            CommitError::Fhir(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for CommitError {}

/// One prepared write of a transaction.
struct TxWrite {
    pos: usize,
    prepared: Prepared,
    expect: Expect,
    created: bool,
}

/// What the prepare phase decided, for the commit phase to carry out.
#[derive(Default)]
struct TxPlan {
    entries: Vec<Entry>,
    done: Vec<Option<Done>>,
    /// Conditional queries and the ids they must still resolve to.
    checks: Vec<(Plan, Vec<String>)>,
    writes: Vec<TxWrite>,
    /// (position, type, id, current version) of live resources to delete.
    deletes: Vec<(usize, String, String, i64)>,
    /// What the caller's guard must allow before the commit.
    access: Vec<AccessCheck>,
}

/// An error of entry `index`; single interactions keep the bare message.
fn entry_error(index: usize, err: FhirError, single: bool) -> FhirError {
    if single {
        err
    } else {
        FhirError::new(err.kind, format!("Bundle.entry[{index}]: {}", err.message))
    }
}

impl Entry {
    fn single(
        method: Method,
        rtype: &str,
        id: Option<String>,
        condition: Option<String>,
        if_match: Option<i64>,
        resource: Option<Value>,
    ) -> Entry {
        Entry {
            index: 0,
            full_url: None,
            method,
            rtype: rtype.to_string(),
            url: match &id {
                Some(i) => format!("{rtype}/{i}"),
                None => rtype.to_string(),
            },
            id,
            condition,
            if_match,
            resource,
            seen: None,
        }
    }
}

/// The outcome of one entry.
struct Done {
    status: &'static str,
    opened: Option<Opened>,
    location: Option<String>,
    body: Option<Value>,
}

fn response_entry(base: &str, d: &Done, representation: bool) -> Value {
    let mut response = json!({ "status": d.status });
    if let Some(o) = &d.opened {
        response["location"] = json!(format!("{}/{}/_history/{}", o.rtype, o.id, o.version));
        response["etag"] = json!(o.etag());
        response["lastModified"] = json!(o.last_modified());
    } else if let Some(l) = &d.location {
        response["location"] = json!(l);
    }
    let mut e = match (&d.opened, &d.body) {
        (Some(o), _) if representation => entry(base, o, None),
        (Some(o), _) => json!({ "fullUrl": format!("{base}/{}/{}", o.rtype, o.id) }),
        (None, Some(b)) => json!({ "resource": b }),
        _ => json!({}),
    };
    e["response"] = response;
    e
}

impl Records {
    /// Process a `batch` or `transaction` Bundle and return its response Bundle.
    pub async fn process_bundle(
        &self,
        bundle: Value,
        base: &str,
        representation: bool,
    ) -> Result<Value, FhirError> {
        if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
            return Err(FhirError::bad_request(
                "POST to the base URL takes a Bundle",
            ));
        }
        let kind = bundle
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let empty = Vec::new();
        let raw_entries = match bundle.get("entry") {
            None => &empty,
            Some(Value::Array(a)) => a,
            Some(_) => return Err(FhirError::bad_request("Bundle.entry must be an array")),
        };
        if raw_entries.len() > self.config().max_bundle_entries {
            return Err(FhirError::new(
                ErrorKind::PayloadTooLarge,
                format!(
                    "a Bundle may hold at most {} entries",
                    self.config().max_bundle_entries
                ),
            ));
        }
        match kind.as_str() {
            "transaction" => {
                let entries = raw_entries
                    .iter()
                    .enumerate()
                    .map(|(i, e)| parse_entry(i, e, base))
                    .collect::<Result<Vec<_>, _>>()?;
                self.transaction(entries, base, representation).await
            }
            "batch" => self.batch(raw_entries, base, representation).await,
            other => Err(FhirError::bad_request(format!(
                "Bundle type '{other}' cannot be processed; use batch or transaction"
            ))),
        }
    }

    async fn batch(
        &self,
        raw: &[Value],
        base: &str,
        representation: bool,
    ) -> Result<Value, FhirError> {
        let mut out = Vec::with_capacity(raw.len());
        for (i, e) in raw.iter().enumerate() {
            let result = match parse_entry(i, e, base) {
                Ok(entry) => self.transaction(vec![entry], base, representation).await,
                Err(e) => Err(e),
            };
            out.push(match result {
                Ok(mut b) => b["entry"][0].take(),
                Err(e) => json!({
                    "response": { "status": format!("{}", e.kind.status()), "outcome": e.to_outcome() }
                }),
            });
        }
        Ok(json!({
            "resourceType": "Bundle",
            "id": new_id(),
            "type": "batch-response",
            "meta": { "lastUpdated": format_instant(self.now()) },
            "entry": out,
        }))
    }

    async fn transaction(
        &self,
        entries: Vec<Entry>,
        base: &str,
        representation: bool,
    ) -> Result<Value, FhirError> {
        let done = self
            .run_entries(entries, base, false, representation)
            .await?;
        let entries: Vec<Value> = done
            .iter()
            .map(|d| response_entry(base, d, representation))
            .collect();
        Ok(json!({
            "resourceType": "Bundle",
            "id": new_id(),
            "type": "transaction-response",
            "meta": { "lastUpdated": format_instant(self.now()) },
            "entry": entries,
        }))
    }

    /// Run entries as one all-or-nothing transaction, in two phases:
    ///
    /// 1. **prepare**, in a read snapshot on the blocking pool (in parallel
    ///    with other requests): resolve conditional creates and references,
    ///    rewrite `urn:uuid:` references, decide versions, stamp, index and
    ///    serialize every resource;
    /// 2. **commit**, on the single writer: re-run each conditional query and
    ///    require the same answer, write every version under its expected
    ///    current version, seal, and check every reference.
    ///
    /// If another write got in between (a conditional answers differently,
    /// a version moved), the commit rolls back and the whole transaction is
    /// prepared again, a few times at most.
    ///
    /// `bodies`: whether the caller returns the resources written (otherwise
    /// the versions handed over to detection are moved out of the result,
    /// not copied).
    async fn run_entries(
        &self,
        entries: Vec<Entry>,
        base: &str,
        single: bool,
        bodies: bool,
    ) -> Result<Vec<Done>, FhirError> {
        const ATTEMPTS: usize = 4;
        for e in &entries {
            self.guard()
                .check_type(e.method.interaction(&e.url), &e.rtype)
                .await
                .map_err(|err| entry_error(e.index, err, single))?;
        }
        // Conditional criteria are searches: they see only what the caller may see.
        let seen = std::sync::Arc::new(self.conditional_visibility(&entries, single).await?);
        for _ in 0..ATTEMPTS {
            let (this, attempt, seen) = (self.clone(), entries.clone(), seen.clone());
            let at = self.now();
            let mut plan = self
                .store()
                .read(move |tx| Ok(this.prepare_entries(tx, attempt, at, single, &seen)))
                .await
                .map_err(store_err)??;
            self.check_plan_access(&mut plan, single).await?;
            let (this, base) = (self.clone(), base.to_string());
            let committed = self
                .store()
                .write(move |tx| {
                    let (done, changes) = this
                        .commit_entries(tx, plan, &base, single)
                        .map_err(StoreError::abort)?;
                    if let Some(audit) = this.write_audit()
                        && !changes.is_empty()
                    {
                        audit.record(tx, &changes)?;
                    }
                    Ok(done)
                })
                .await;
            match committed {
                Ok(mut done) => {
                    self.hand_over(done.iter_mut().filter_map(|d| d.opened.as_mut()), bodies);
                    let writes = entries.iter().filter(|e| e.method != Method::Get);
                    let (mut relations, mut consents) = (false, false);
                    for e in writes {
                        relations |= crate::relations::RELATION_TYPES.contains(&e.rtype.as_str());
                        consents |= e.rtype == crate::relations::CONSENT_TYPE;
                    }
                    if relations {
                        self.relations_gen()
                            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                    }
                    if consents {
                        self.consents_gen()
                            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                    }
                    return Ok(done);
                }
                Err(e) => match e.into_aborted::<CommitError>() {
                    Ok(CommitError::Retry) => {
                        tracing::debug!(
                            "a concurrent write changed what the transaction depends on; preparing again"
                        );
                        continue;
                    }
                    Ok(CommitError::Fhir(f)) => return Err(f),
                    Err(other) => return Err(store_err(other)),
                },
            }
        }
        Err(FhirError::conflict(
            "concurrent writes kept changing what this request depends on; retry it",
        ))
    }

    /// Phase 1: everything that needs no write lock.
    fn prepare_entries(
        &self,
        tx: &mut dyn ReadTx,
        mut entries: Vec<Entry>,
        at: i64,
        single: bool,
        seen: &HashMap<String, Visibility>,
    ) -> Result<TxPlan, FhirError> {
        let guarded_plan = |rtype: &str, q: &str| {
            let mut plan = self.plan_conditional(rtype, q)?;
            match seen.get(rtype) {
                Some(v) => plan.query.filters.extend(v.filter()),
                None if self.guard().unrestricted() => {}
                None => return Err(FhirError::forbidden("access denied")),
            }
            Ok(plan)
        };
        let n = entries.len();
        let mut plan = TxPlan {
            done: (0..n).map(|_| None).collect(),
            ..TxPlan::default()
        };
        let fail = |index: usize, err: FhirError| entry_error(index, err, single);
        // Decide every target id; map full URLs to their targets.
        let mut map: HashMap<String, String> = HashMap::new();
        for (pos, e) in entries.iter_mut().enumerate() {
            let needs_resolution = match e.method {
                Method::Post => e.condition.is_some(),
                Method::Put | Method::Delete => e.id.is_none(),
                Method::Get => false,
            };
            if needs_resolution {
                let cond = e.condition.clone().unwrap_or_default();
                let query = guarded_plan(&e.rtype, &cond).map_err(|err| fail(e.index, err))?;
                let ids = self.matching_ids(tx, &query, 2)?;
                plan.checks.push((query, ids.clone()));
                match (e.method, ids.len()) {
                    (_, n) if n > 1 => {
                        return Err(fail(
                            e.index,
                            FhirError::new(
                                ErrorKind::PreconditionFailed,
                                "the conditional criteria match several resources",
                            ),
                        ));
                    }
                    (Method::Post, 1) => {
                        // The existing match is returned: the caller must be able to read it.
                        let h = head(tx, &e.rtype, &ids[0])?;
                        plan.access.push(AccessCheck {
                            pos,
                            interaction: Interaction::Read,
                            rtype: e.rtype.clone(),
                            id: ids[0].clone(),
                            compartment: h.and_then(|h| h.compartment),
                        });
                        e.method = Method::Get;
                        e.resource = None;
                        e.url = format!("{}/{}", e.rtype, ids[0]);
                        plan.done[pos] = Some(Done {
                            status: "200 OK",
                            opened: None,
                            location: Some(e.url.clone()),
                            body: None,
                        });
                        e.id = Some(ids[0].clone());
                    }
                    (Method::Delete, 0) => {
                        plan.done[pos] = Some(Done {
                            status: "204 No Content",
                            opened: None,
                            location: None,
                            body: None,
                        });
                    }
                    (_, 0) => e.id = Some(new_id()),
                    (_, _) => e.id = Some(ids[0].clone()),
                }
            } else if e.method == Method::Post {
                e.id = Some(new_id());
            }
            if let (Some(full), Some(id)) = (&e.full_url, &e.id) {
                map.insert(full.clone(), format!("{}/{}", e.rtype, id));
            }
        }
        // Rewrite references: entries' full URLs, then conditional references.
        let mut conditional: HashMap<String, String> = HashMap::new();
        for e in entries.iter_mut() {
            let Some(res) = e.resource.as_mut() else {
                continue;
            };
            let mut failure = None;
            rewrite_references(res, &mut |r: &str| {
                if let Some(t) = map.get(r).or_else(|| conditional.get(r)) {
                    return Some(t.clone());
                }
                let (rtype, q) = r.split_once('?')?;
                if !types::is_resource_type(rtype) {
                    return None;
                }
                let resolved = guarded_plan(rtype, q)
                    .and_then(|query| self.matching_ids(tx, &query, 2).map(|ids| (query, ids)));
                match resolved {
                    Ok((query, ids)) if ids.len() == 1 => {
                        let t = format!("{rtype}/{}", ids[0]);
                        plan.checks.push((query, ids));
                        conditional.insert(r.to_string(), t.clone());
                        Some(t)
                    }
                    Ok((_, ids)) => {
                        failure.get_or_insert_with(|| {
                            FhirError::new(
                                ErrorKind::PreconditionFailed,
                                format!(
                                    "conditional reference '{rtype}?…' {}",
                                    if ids.is_empty() {
                                        "matches no resource"
                                    } else {
                                        "matches more than one resource"
                                    }
                                ),
                            )
                        });
                        None
                    }
                    Err(err) => {
                        failure.get_or_insert(err);
                        None
                    }
                }
            });
            if let Some(f) = failure {
                return Err(fail(e.index, f));
            }
        }
        // Versions from the snapshot; the commit re-checks them.
        for (pos, e) in entries.iter_mut().enumerate() {
            if plan.done[pos].is_some() {
                continue;
            }
            match e.method {
                Method::Delete => {
                    let id = e.id.clone().expect("delete target resolved");
                    match head(tx, &e.rtype, &id)? {
                        Some(h) if h.state == RecordState::Live => {
                            plan.access.push(AccessCheck {
                                pos,
                                interaction: Interaction::Delete,
                                rtype: e.rtype.clone(),
                                id: id.clone(),
                                compartment: h.compartment.clone(),
                            });
                            plan.deletes.push((pos, e.rtype.clone(), id, h.version));
                        }
                        _ => {
                            plan.done[pos] = Some(Done {
                                status: "204 No Content",
                                opened: None,
                                location: None,
                                body: None,
                            })
                        }
                    }
                }
                Method::Post | Method::Put => {
                    let id = e.id.clone().expect("target resolved");
                    let cur = head(tx, &e.rtype, &id)?;
                    let (version, expect, created) = match (&cur, e.if_match) {
                        (Some(h), _) if h.state == RecordState::Erased => {
                            return Err(fail(
                                e.index,
                                FhirError::new(
                                    ErrorKind::Gone,
                                    format!("{}/{id} was erased", e.rtype),
                                ),
                            ));
                        }
                        (Some(h), Some(m)) if h.version != m || h.state != RecordState::Live => {
                            return Err(fail(
                                e.index,
                                FhirError::new(
                                    ErrorKind::PreconditionFailed,
                                    format!(
                                        "If-Match version {m} is not the current version {}",
                                        h.version
                                    ),
                                ),
                            ));
                        }
                        (None, Some(_)) => {
                            return Err(fail(
                                e.index,
                                FhirError::new(
                                    ErrorKind::PreconditionFailed,
                                    format!("{}/{id} does not exist", e.rtype),
                                ),
                            ));
                        }
                        (Some(h), _) if h.state == RecordState::Deleted => {
                            (h.version + 1, Expect::Absent, true)
                        }
                        (Some(h), _) => (h.version + 1, Expect::Version(h.version), false),
                        (None, None) => (1, Expect::Absent, true),
                    };
                    let resource = e.resource.take().expect("validated");
                    let prepared = self
                        .prepare(&e.rtype, &id, version, resource, at)
                        .map_err(|err| fail(e.index, err))?;
                    // An update must be allowed where the resource was and
                    // where it goes (a changed subject moves it).
                    if let Some(h) = &cur
                        && h.state == RecordState::Live
                    {
                        plan.access.push(AccessCheck {
                            pos,
                            interaction: Interaction::Update,
                            rtype: e.rtype.clone(),
                            id: id.clone(),
                            compartment: h.compartment.clone(),
                        });
                    }
                    plan.access.push(AccessCheck {
                        pos,
                        interaction: if created {
                            Interaction::Create
                        } else {
                            Interaction::Update
                        },
                        rtype: e.rtype.clone(),
                        id: id.clone(),
                        compartment: prepared.compartment.clone(),
                    });
                    plan.writes.push(TxWrite {
                        pos,
                        prepared,
                        expect,
                        created,
                    });
                }
                Method::Get => {}
            }
        }
        // GET entries run after the writes, inside the commit: decide now
        // which version a read may return (the compartment it will have).
        let written: HashMap<(String, String), String> = plan
            .writes
            .iter()
            .map(|w| {
                (
                    (w.prepared.rtype.clone(), w.prepared.id.clone()),
                    w.prepared.key_name.clone(),
                )
            })
            .collect();
        for (pos, e) in entries.iter_mut().enumerate() {
            if e.method != Method::Get || plan.done[pos].is_some() {
                continue;
            }
            let path = e.url.split('?').next().unwrap_or_default();
            let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
            if let [t, id, ..] = segs.as_slice() {
                let key = match written.get(&(t.to_string(), id.to_string())) {
                    Some(k) => Some(k.clone()),
                    None => head(tx, t, id)?.map(|h| match h.compartment {
                        Some(p) => crate::keys::patient_key_name(&p),
                        None => crate::keys::SHARED_KEY_NAME.to_string(),
                    }),
                };
                if let Some(key) = key {
                    plan.access.push(AccessCheck {
                        pos,
                        interaction: Interaction::Read,
                        rtype: t.to_string(),
                        id: id.to_string(),
                        compartment: compartment_of_key(&key).map(str::to_string),
                    });
                    e.seen = Some(GetAccess::Key(key));
                }
            }
        }
        plan.entries = entries;
        Ok(plan)
    }

    /// Phase 2: on the writer, inside one store transaction.
    fn commit_entries(
        &self,
        tx: &mut dyn WriteTx,
        plan: TxPlan,
        base: &str,
        single: bool,
    ) -> Result<(Vec<Done>, Vec<crate::access::Change>), CommitError> {
        let TxPlan {
            entries,
            mut done,
            checks,
            writes,
            deletes,
            access,
        } = plan;
        let mut changes = Vec::with_capacity(writes.len() + deletes.len());
        let fail = |pos: usize, err: FhirError| {
            CommitError::Fhir(entry_error(entries[pos].index, err, single))
        };
        for (query, ids) in &checks {
            if &self.matching_ids(tx, query, 2).map_err(CommitError::Fhir)? != ids {
                return Err(CommitError::Retry);
            }
        }
        let at = writes
            .first()
            .map(|w| w.prepared.at)
            .unwrap_or_else(|| self.now());
        for (pos, rtype, id, version) in deletes {
            changes.push(crate::access::Change {
                interaction: "delete",
                rtype: rtype.clone(),
                id: id.clone(),
                version: version + 1,
                patient: access
                    .iter()
                    .find(|a| a.pos == pos)
                    .and_then(|a| a.compartment.clone()),
            });
            let p = Pending {
                rtype,
                id,
                version: version + 1,
                resource: None,
                expect: Expect::Version(version),
            };
            match self.write_pending(tx, p, at) {
                Ok(_) => {}
                Err(e) if e.kind == ErrorKind::Conflict => return Err(CommitError::Retry),
                Err(e) => return Err(fail(pos, e)),
            }
            done[pos] = Some(Done {
                status: "204 No Content",
                opened: None,
                location: None,
                body: None,
            });
        }
        let mut written = Vec::with_capacity(writes.len());
        for w in writes {
            match self.commit_prepared(tx, &w.prepared, w.expect) {
                Ok(()) => {}
                Err(StoreError::Conflict { .. }) => return Err(CommitError::Retry),
                Err(e) => return Err(fail(w.pos, store_err(e))),
            }
            let status = if w.created { "201 Created" } else { "200 OK" };
            changes.push(crate::access::Change {
                interaction: if w.created { "create" } else { "update" },
                rtype: w.prepared.rtype.clone(),
                id: w.prepared.id.clone(),
                version: w.prepared.version,
                patient: w.prepared.compartment.clone(),
            });
            done[w.pos] = Some(Done {
                status,
                opened: Some(w.prepared.into_opened()),
                location: None,
                body: None,
            });
            written.push(w.pos);
        }
        // Every reference must resolve. What this transaction wrote is live
        // (deletes ran first), and a target checked once stays live until the
        // commit: each is looked up at most once.
        let mut known_live: std::collections::HashSet<String> = written
            .iter()
            .filter_map(|&pos| done[pos].as_ref().and_then(|d| d.opened.as_ref()))
            .map(|o| format!("{}/{}", o.rtype, o.id))
            .collect();
        for pos in written {
            if let Some(Done {
                opened: Some(o), ..
            }) = &done[pos]
            {
                self.check_references(tx, &o.resource, &mut known_live)
                    .map_err(|e| fail(pos, e))?;
            }
        }
        for (pos, e) in entries.iter().enumerate() {
            if e.method == Method::Get && done[pos].is_none() {
                let body = self.get_in(tx, e, base).map_err(|err| fail(pos, err))?;
                done[pos] = Some(Done {
                    status: "200 OK",
                    opened: None,
                    location: None,
                    body: Some(body),
                });
            }
        }
        Ok((
            done.into_iter()
                .map(|d| d.expect("every entry processed"))
                .collect(),
            changes,
        ))
    }

    /// Create (POST) through the transaction machinery: with `if_none_exist`
    /// an existing single match is returned instead (`created == false`).
    pub async fn create(
        &self,
        rtype: &str,
        body: Value,
        if_none_exist: Option<String>,
    ) -> Result<(Opened, bool), FhirError> {
        Records::validate_body(rtype, None, &body)?;
        let e = Entry::single(Method::Post, rtype, None, if_none_exist, None, Some(body));
        let done = self
            .run_entries(vec![e], "", true, true)
            .await?
            .pop()
            .expect("one entry");
        match done.opened {
            Some(o) => Ok((o, true)),
            None => {
                let id = done
                    .location
                    .as_deref()
                    .and_then(|l| l.split('/').nth(1))
                    .unwrap_or_default()
                    .to_string();
                Ok((self.read(rtype, &id).await?, false))
            }
        }
    }

    /// Update (PUT), creating the resource with the client's id if absent.
    /// `if_match` is the version the client last saw; a stale one is 412.
    pub async fn update(
        &self,
        rtype: &str,
        id: &str,
        body: Value,
        if_match: Option<i64>,
    ) -> Result<(Opened, bool), FhirError> {
        Records::validate_body(rtype, Some(id), &body)?;
        let e = Entry::single(
            Method::Put,
            rtype,
            Some(id.to_string()),
            None,
            if_match,
            Some(body),
        );
        let done = self
            .run_entries(vec![e], "", true, true)
            .await?
            .pop()
            .expect("one entry");
        let created = done.status.starts_with("201");
        Ok((done.opened.expect("written"), created))
    }

    /// Delete: a tombstone version. Deleting a deleted resource succeeds;
    /// an unknown one is 404.
    pub async fn delete(&self, rtype: &str, id: &str) -> Result<(), FhirError> {
        Records::check_type(rtype)?;
        Records::check_id(id)?;
        self.guard().check_type(Interaction::Delete, rtype).await?;
        let (t, i) = (rtype.to_string(), id.to_string());
        if self
            .store()
            .read(move |tx| tx.head(&t, &i))
            .await
            .map_err(store_err)?
            .is_none()
        {
            return Err(FhirError::not_found(format!("{rtype}/{id} is not known")));
        }
        let e = Entry::single(
            Method::Delete,
            rtype,
            Some(id.to_string()),
            None,
            None,
            None,
        );
        self.run_entries(vec![e], "", true, true).await?;
        Ok(())
    }

    /// The caller's visibility for every type searched by a conditional
    /// operation or a conditional reference of `entries`.
    async fn conditional_visibility(
        &self,
        entries: &[Entry],
        single: bool,
    ) -> Result<HashMap<String, Visibility>, FhirError> {
        let mut out = HashMap::new();
        if self.guard().unrestricted() {
            return Ok(out);
        }
        let mut wanted: Vec<(usize, String)> = Vec::new();
        for e in entries {
            if e.condition.is_some() {
                wanted.push((e.index, e.rtype.clone()));
            }
            if let Some(r) = &e.resource {
                let mut refs = Vec::new();
                crate::service::collect_references(r, &mut refs);
                for r in refs {
                    if let Some((t, _)) = r.split_once('?')
                        && types::is_resource_type(t)
                    {
                        wanted.push((e.index, t.to_string()));
                    }
                }
            }
        }
        for (index, rtype) in wanted {
            if out.contains_key(&rtype) {
                continue;
            }
            let v = self
                .guard()
                .visibility(Interaction::Search, Some(&rtype), None)
                .await
                .map_err(|err| entry_error(index, err, single))?;
            out.insert(rtype, v);
        }
        Ok(out)
    }

    /// Ask the guard every question the prepared plan raised; any refusal
    /// fails the whole transaction before anything is written.
    async fn check_plan_access(&self, plan: &mut TxPlan, single: bool) -> Result<(), FhirError> {
        if self.guard().unrestricted() {
            return Ok(());
        }
        for c in &plan.access {
            self.guard()
                .check_resource(c.interaction, &c.rtype, &c.id, c.compartment.as_deref())
                .await
                .map_err(|err| entry_error(plan.entries[c.pos].index, err, single))?;
        }
        for (pos, e) in plan.entries.iter_mut().enumerate() {
            if e.method == Method::Get
                && plan.done[pos].is_none()
                && e.method.interaction(&e.url) == Interaction::Search
            {
                let query: Vec<(String, String)> = e
                    .url
                    .split_once('?')
                    .map(|(_, q)| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
                    .unwrap_or_default();
                let focus = crate::access::focus_patient(&e.rtype, &query);
                let v = self
                    .guard()
                    .visibility(Interaction::Search, Some(&e.rtype), focus.as_deref())
                    .await
                    .map_err(|err| entry_error(e.index, err, single))?;
                e.seen = Some(GetAccess::Search(v));
            }
        }
        Ok(())
    }

    /// A GET entry inside a transaction: a read, vread or search.
    fn get_in(&self, tx: &mut dyn WriteTx, e: &Entry, base: &str) -> Result<Value, FhirError> {
        let (path, query) = e.url.split_once('?').unwrap_or((&e.url, ""));
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        match segs.as_slice() {
            [t, id] => {
                let sv = tx
                    .current(t, id)
                    .map_err(store_err)?
                    .ok_or_else(|| FhirError::not_found(format!("{t}/{id} is not known")))?;
                self.check_seen(e, &sv.key_name)?;
                Ok(self.open_version(tx, sv)?.resource)
            }
            [t, id, "_history", v] => {
                let v: i64 = v
                    .parse()
                    .map_err(|_| FhirError::not_found("no such version"))?;
                let sv = tx
                    .version(t, id, v)
                    .map_err(store_err)?
                    .ok_or_else(|| FhirError::not_found("no such version"))?;
                self.check_seen(e, &sv.key_name)?;
                Ok(self.open_version(tx, sv)?.resource)
            }
            [t] => {
                let mut plan = if query.is_empty() {
                    crate::search::Plan {
                        query: custos_store::IndexQuery::all(t, 0),
                        confirm: Vec::new(),
                    }
                } else {
                    self.plan_conditional(t, query)?
                };
                match &e.seen {
                    Some(GetAccess::Search(v)) => plan.query.filters.extend(v.filter()),
                    _ if self.guard().unrestricted() => {}
                    _ => return Err(FhirError::forbidden("access denied")),
                }
                let page =
                    self.execute(tx, &plan, None, false, self.config().default_count, false)?;
                let entries: Vec<Value> = page
                    .matches
                    .iter()
                    .map(|o| entry(base, o, Some("match")))
                    .collect();
                Ok(json!({ "resourceType": "Bundle", "type": "searchset", "entry": entries }))
            }
            _ => Err(FhirError::bad_request(format!(
                "cannot GET '{}' in a Bundle",
                e.url
            ))),
        }
    }
}

impl Records {
    /// A GET entry may return only a version under the data key its access check saw.
    fn check_seen(&self, e: &Entry, key_name: &str) -> Result<(), FhirError> {
        match &e.seen {
            Some(GetAccess::Key(k)) if k == key_name => Ok(()),
            _ if self.guard().unrestricted() => Ok(()),
            _ => Err(FhirError::forbidden("access denied")),
        }
    }
}

/// Replace every `reference` string for which `f` gives a new value.
fn rewrite_references(v: &mut Value, f: &mut dyn FnMut(&str) -> Option<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if k == "reference" {
                    if let Value::String(s) = x
                        && let Some(new) = f(s)
                    {
                        *s = new;
                    }
                } else {
                    rewrite_references(x, f);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| rewrite_references(x, f)),
        _ => {}
    }
}
