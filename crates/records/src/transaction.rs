//! `batch` and `transaction` Bundles.
//!
//! A transaction runs as one write job: conditional creates and conditional
//! references are resolved, `urn:uuid:` references rewritten, every entry
//! written and every reference checked inside a single store transaction,
//! so it commits whole or not at all. A batch runs each entry on its own.
use std::collections::HashMap;

use custos_fhir::date::format_instant;
use custos_fhir::{ErrorKind, FhirError, types};
use custos_store::{Expect, RecordState, StoreError, StoreExt, WriteTx};
use serde_json::{Value, json};

use crate::bundles::entry;
use crate::keys::store_err;
use crate::service::{Opened, Pending, Records, head, new_id};

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
    })
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
        let this = self.clone();
        let base_owned = base.to_string();
        let done = self
            .store()
            .write(move |tx| {
                this.transaction_in(tx, entries, &base_owned)
                    .map_err(StoreError::abort)
            })
            .await
            .map_err(store_err)?;
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

    fn resolve_condition(
        &self,
        tx: &mut dyn WriteTx,
        rtype: &str,
        query: &str,
    ) -> Result<Vec<String>, FhirError> {
        let plan = self.plan_conditional(rtype, query)?;
        self.matching_ids(tx, &plan, 2)
    }

    fn transaction_in(
        &self,
        tx: &mut dyn WriteTx,
        mut entries: Vec<Entry>,
        base: &str,
    ) -> Result<Vec<Done>, FhirError> {
        let n = entries.len();
        let mut done: Vec<Option<Done>> = (0..n).map(|_| None).collect();
        // 1. Decide every target id; map full URLs to their targets.
        let mut map: HashMap<String, String> = HashMap::new();
        for (pos, e) in entries.iter_mut().enumerate() {
            match e.method {
                Method::Post => {
                    let mut existing = None;
                    if let Some(cond) = &e.condition {
                        let ids = self.resolve_condition(tx, &e.rtype, cond)?;
                        match ids.len() {
                            0 => {}
                            1 => existing = Some(ids[0].clone()),
                            _ => {
                                return Err(FhirError::new(
                                    ErrorKind::PreconditionFailed,
                                    format!(
                                        "Bundle.entry[{}]: ifNoneExist matches several resources",
                                        e.index
                                    ),
                                ));
                            }
                        }
                    }
                    let id = existing.clone().unwrap_or_else(new_id);
                    if existing.is_some() {
                        e.method = Method::Get;
                        e.resource = None;
                        e.url = format!("{}/{}", e.rtype, id);
                        done[pos] = Some(Done {
                            status: "200 OK",
                            opened: None,
                            location: Some(e.url.clone()),
                            body: None,
                        });
                    }
                    e.id = Some(id);
                }
                Method::Put | Method::Delete if e.id.is_none() => {
                    let cond = e.condition.clone().unwrap_or_default();
                    let ids = self.resolve_condition(tx, &e.rtype, &cond)?;
                    match (e.method, ids.len()) {
                        (_, 0) if e.method == Method::Put => e.id = Some(new_id()),
                        (_, 0) => {
                            done[pos] = Some(Done {
                                status: "204 No Content",
                                opened: None,
                                location: None,
                                body: None,
                            });
                        }
                        (_, 1) => e.id = Some(ids[0].clone()),
                        _ => {
                            return Err(FhirError::new(
                                ErrorKind::PreconditionFailed,
                                format!(
                                    "Bundle.entry[{}]: criteria match several resources",
                                    e.index
                                ),
                            ));
                        }
                    }
                }
                _ => {}
            }
            if let (Some(full), Some(id)) = (&e.full_url, &e.id) {
                map.insert(full.clone(), format!("{}/{}", e.rtype, id));
            }
        }
        // 2. Rewrite references: urn:uuid / full URLs of entries, then conditional references.
        let mut conditional: HashMap<String, String> = HashMap::new();
        for e in entries.iter_mut() {
            let Some(res) = e.resource.as_mut() else {
                continue;
            };
            let mut failure = None;
            rewrite_references(res, &mut |r: &str| {
                if let Some(t) = map.get(r) {
                    return Some(t.clone());
                }
                if let Some(t) = conditional.get(r) {
                    return Some(t.clone());
                }
                let (rtype, q) = r.split_once('?')?;
                if !types::is_resource_type(rtype) {
                    return None;
                }
                match self.resolve_condition(tx, rtype, q) {
                    Ok(ids) if ids.len() == 1 => {
                        let t = format!("{rtype}/{}", ids[0]);
                        conditional.insert(r.to_string(), t.clone());
                        Some(t)
                    }
                    Ok(ids) => {
                        failure.get_or_insert_with(|| {
                            FhirError::new(
                                ErrorKind::PreconditionFailed,
                                format!("conditional reference '{rtype}?…' matches {} resources, not one", ids.len()),
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
                return Err(FhirError::new(
                    f.kind,
                    format!("Bundle.entry[{}]: {}", e.index, f.message),
                ));
            }
        }
        // 3. Write in R4 order: DELETE, POST, PUT, then GET.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| (entries[i].method, i));
        let at = self.now();
        let mut written: Vec<usize> = Vec::new();
        for &i in &order {
            let e = &entries[i];
            if done[i].is_some() && e.method != Method::Get {
                continue;
            }
            let fail = |err: FhirError| {
                FhirError::new(
                    err.kind,
                    format!("Bundle.entry[{}]: {}", e.index, err.message),
                )
            };
            match e.method {
                Method::Delete => {
                    let id = e.id.clone().expect("delete target resolved");
                    let cur = head(tx, &e.rtype, &id)?;
                    if let Some(sv) = cur.filter(|sv| sv.state == RecordState::Live) {
                        let p = Pending {
                            rtype: e.rtype.clone(),
                            id,
                            version: sv.version + 1,
                            resource: None,
                            expect: Expect::Version(sv.version),
                        };
                        self.write_pending(tx, p, at).map_err(fail)?;
                    }
                    done[i] = Some(Done {
                        status: "204 No Content",
                        opened: None,
                        location: None,
                        body: None,
                    });
                }
                Method::Post | Method::Put => {
                    let id = e.id.clone().expect("target resolved");
                    let cur = head(tx, &e.rtype, &id)?;
                    let (version, expect, created) = match &cur {
                        Some(sv) if sv.state == RecordState::Erased => {
                            return Err(fail(FhirError::new(
                                ErrorKind::Gone,
                                "the resource was erased",
                            )));
                        }
                        Some(sv) if e.if_match.is_some_and(|m| m != sv.version) => {
                            return Err(fail(FhirError::new(
                                ErrorKind::PreconditionFailed,
                                "ifMatch is not the current version",
                            )));
                        }
                        Some(sv) if sv.state == RecordState::Deleted => {
                            (sv.version + 1, Expect::Absent, true)
                        }
                        Some(sv) => (sv.version + 1, Expect::Version(sv.version), false),
                        None if e.if_match.is_some() => {
                            return Err(fail(FhirError::new(
                                ErrorKind::PreconditionFailed,
                                "ifMatch on a missing resource",
                            )));
                        }
                        None => (1, Expect::Absent, true),
                    };
                    let mut resource = e.resource.clone().expect("validated");
                    if e.method == Method::Post {
                        resource
                            .as_object_mut()
                            .map(|o| o.insert("id".into(), Value::String(id.clone())));
                    }
                    let p = Pending {
                        rtype: e.rtype.clone(),
                        id,
                        version,
                        resource: Some(resource),
                        expect,
                    };
                    let opened = self
                        .write_pending(tx, p, at)
                        .map_err(fail)?
                        .expect("written");
                    let status = if created { "201 Created" } else { "200 OK" };
                    done[i] = Some(Done {
                        status,
                        opened: Some(opened),
                        location: None,
                        body: None,
                    });
                    written.push(i);
                }
                Method::Get => {
                    if done[i].is_some() {
                        continue;
                    }
                    let body = self.get_in(tx, e, base).map_err(fail)?;
                    done[i] = Some(Done {
                        status: "200 OK",
                        opened: None,
                        location: None,
                        body: Some(body),
                    });
                }
            }
        }
        // 4. Every reference of every written resource must now resolve.
        for i in written {
            if let Some(Done {
                opened: Some(o), ..
            }) = &done[i]
            {
                let at = entries[i].index;
                self.check_references(tx, &o.resource).map_err(|err| {
                    FhirError::new(err.kind, format!("Bundle.entry[{at}]: {}", err.message))
                })?;
            }
        }
        Ok(done
            .into_iter()
            .map(|d| d.expect("every entry processed"))
            .collect())
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
                Ok(self.open_version(tx, sv)?.resource)
            }
            [t] => {
                let plan = if query.is_empty() {
                    crate::search::Plan {
                        query: custos_store::IndexQuery::all(t, 0),
                        confirm: Vec::new(),
                    }
                } else {
                    self.plan_conditional(t, query)?
                };
                let page = self.execute(tx, &plan, None, false, self.config().default_count)?;
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
