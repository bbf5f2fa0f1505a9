//! Search and history Bundles, with paging links and cursors.
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use custos_fhir::date::format_instant;
use custos_fhir::query::{Handling, SearchRequest, TotalMode, parse_search};
use custos_fhir::{FhirError, outcome, registry};
use custos_store::{
    Filter, HistoryQuery, HistoryScope, IndexQuery, Keyset, StoreExt, StoredVersion,
};
use serde_json::{Value, json};

use crate::access::{Interaction, Visibility, compartment_of_key};
use crate::index::Tokens;
use crate::keys::store_err;
use crate::keys::{SHARED_KEY_NAME, patient_key_name};
use crate::search::Plan;
use crate::service::{Opened, Records, new_id};

/// A paging position, opaque to clients.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Cursor {
    backwards: bool,
    keyset: Keyset,
}

impl Cursor {
    fn encode(&self) -> String {
        let raw = format!(
            "{}.{:x}.{}",
            u8::from(self.backwards),
            self.keyset.sort_key.to_bits(),
            self.keyset.rid
        );
        URL_SAFE_NO_PAD.encode(raw)
    }
    fn decode(s: &str) -> Result<Cursor, FhirError> {
        let bad = || FhirError::bad_request("invalid _cursor");
        let raw = URL_SAFE_NO_PAD.decode(s).map_err(|_| bad())?;
        let raw = String::from_utf8(raw).map_err(|_| bad())?;
        let mut it = raw.split('.');
        let b = it.next().ok_or_else(bad)?;
        let k = u64::from_str_radix(it.next().ok_or_else(bad)?, 16).map_err(|_| bad())?;
        let r: i64 = it.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        Ok(Cursor {
            backwards: b == "1",
            keyset: Keyset {
                sort_key: f64::from_bits(k),
                rid: r,
            },
        })
    }
}

fn query_string(params: &[(String, String)], extra: &[(&str, String)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        if k != "_cursor" {
            s.append_pair(k, v);
        }
    }
    for (k, v) in extra {
        s.append_pair(k, v);
    }
    s.finish()
}

fn link(relation: &str, url: String) -> Value {
    json!({ "relation": relation, "url": url })
}

fn url_with(path: &str, qs: &str) -> String {
    if qs.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{qs}")
    }
}

/// A searchset Bundle, serialized with raw resources.
#[derive(serde::Serialize)]
struct SearchBundle<'a> {
    #[serde(rename = "resourceType")]
    resource_type: &'static str,
    id: String,
    meta: Meta,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    total: Option<u64>,
    link: Vec<Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    entry: Vec<EntryOut<'a>>,
}

#[derive(serde::Serialize)]
struct Meta {
    #[serde(rename = "lastUpdated")]
    last_updated: String,
}

#[derive(serde::Serialize)]
struct EntryOut<'a> {
    #[serde(rename = "fullUrl", skip_serializing_if = "Option::is_none")]
    full_url: Option<String>,
    resource: Res<'a>,
    search: Mode,
}

#[derive(serde::Serialize)]
struct Mode {
    mode: &'static str,
}

/// A resource as stored JSON or as a parsed value.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum Res<'a> {
    Raw(&'a serde_json::value::RawValue),
    Value(&'a Value),
}

impl<'a> EntryOut<'a> {
    fn of(base: &str, o: &'a Opened, mode: &'static str) -> EntryOut<'a> {
        EntryOut {
            full_url: Some(format!("{base}/{}/{}", o.rtype, o.id)),
            resource: o
                .raw
                .as_deref()
                .map(Res::Raw)
                .unwrap_or(Res::Value(&o.resource)),
            search: Mode { mode },
        }
    }
}

/// A Bundle entry for a resource.
pub(crate) fn entry(base: &str, o: &Opened, mode: Option<&str>) -> Value {
    let mut e =
        json!({ "fullUrl": format!("{base}/{}/{}", o.rtype, o.id), "resource": o.resource });
    if let Some(m) = mode {
        e["search"] = json!({ "mode": m });
    }
    e
}

impl Records {
    /// Parse and plan a conditional query (`If-None-Exist`, conditional references).
    pub(crate) fn plan_conditional(&self, rtype: &str, query: &str) -> Result<Plan, FhirError> {
        let params: Vec<(String, String)> =
            form_urlencoded::parse(query.trim_start_matches('?').as_bytes())
                .into_owned()
                .collect();
        if params.is_empty() {
            return Err(FhirError::bad_request(
                "a conditional operation needs search criteria",
            ));
        }
        let req = parse_search(rtype, &params, Handling::Strict)?;
        self.plan(&req)
    }

    /// Search `rtype` with the query `params`; `base` is the server's base URL
    /// and `path` the URL of the search (for links).
    pub async fn search(
        &self,
        rtype: &str,
        params: Vec<(String, String)>,
        handling: Handling,
        base: &str,
    ) -> Result<Value, FhirError> {
        let bytes = self.search_json(rtype, params, handling, base).await?;
        serde_json::from_slice(&bytes).map_err(|e| FhirError::internal(e.to_string()))
    }

    /// [`Records::search`], serialized: the searchset Bundle as JSON bytes,
    /// with matched resources written as they were stored (never re-parsed).
    pub async fn search_json(
        &self,
        rtype: &str,
        params: Vec<(String, String)>,
        handling: Handling,
        base: &str,
    ) -> Result<Vec<u8>, FhirError> {
        if !custos_fhir::types::is_resource_type(rtype) {
            return Err(FhirError::not_found(format!(
                "unknown resource type '{rtype}'"
            )));
        }
        self.guard().check_type(Interaction::Search, rtype).await?;
        let req = parse_search(rtype, &params, handling)?;
        // Links carry only the parameters the search actually used (R4: the self link states them).
        let params: Vec<(String, String)> = params
            .into_iter()
            .filter(|(k, _)| !req.ignored.contains(k))
            .collect();
        let mut plan = self.plan(&req)?;
        // What the caller may not see is filtered in the index query itself,
        // so pages, links and totals never count it.
        let focus = crate::access::focus_patient(rtype, &params);
        if let Some(f) = self
            .guard()
            .visibility(Interaction::Search, Some(rtype), focus.as_deref())
            .await?
            .filter()
        {
            plan.query.filters.push(f);
        }
        let count = req
            .count
            .unwrap_or(self.config().default_count)
            .min(self.config().max_count);
        let cursor = req.cursor.as_deref().map(Cursor::decode).transpose()?;
        let want_total = req.total != TotalMode::None || req.summary_count || count == 0;
        // Resources go out as stored unless `_include` needs them parsed.
        let raw = req.include.is_empty();
        let this = self.clone();
        let req2 = req.clone();
        let (page, total, included) = self
            .store()
            .read(move |tx| {
                let r = (|| {
                    let page = if req2.summary_count || count == 0 {
                        None
                    } else {
                        Some(this.execute(
                            tx,
                            &plan,
                            cursor.map(|c| c.keyset),
                            cursor.is_some_and(|c| c.backwards),
                            count,
                            raw,
                        )?)
                    };
                    let total = if want_total {
                        this.total(tx, &plan)?
                    } else {
                        None
                    };
                    let included = match &page {
                        Some(p) => this.includes(tx, &req2, &p.matches)?,
                        None => Vec::new(),
                    };
                    Ok((page, total, included))
                })();
                Ok(r)
            })
            .await
            .map_err(store_err)??;
        let mut included = included;
        if !self.guard().unrestricted() {
            let mut visible = Vec::with_capacity(included.len());
            for o in included {
                let allowed = self
                    .guard()
                    .may_include(&o.rtype, &o.id, compartment_of_key(&o.key_name))
                    .await;
                if allowed {
                    visible.push(o);
                }
            }
            included = visible;
        }
        let path = format!("{base}/{rtype}");
        let mut links = vec![link("self", url_with(&path, &query_string(&params, &[])))];
        let mut entries: Vec<EntryOut<'_>> = Vec::new();
        let mut outcome_resource = None;
        if let Some(page) = &page {
            let backwards = cursor.is_some_and(|c| c.backwards);
            let (first, last) = (page.matches.first(), page.matches.last());
            let key = |o: &Opened| Keyset {
                sort_key: o.sort_key.unwrap_or(0.0),
                rid: o.rid,
            };
            // Forward: "next" exists when more follow; "previous" when we started after something.
            let has_next = if backwards {
                cursor.is_some()
            } else {
                page.more
            };
            let has_prev = if backwards {
                page.more
            } else {
                cursor.is_some()
            };
            if let (true, Some(l)) = (has_next, last) {
                let c = Cursor {
                    backwards: false,
                    keyset: key(l),
                };
                links.push(link(
                    "next",
                    url_with(&path, &query_string(&params, &[("_cursor", c.encode())])),
                ));
            }
            if let (true, Some(f)) = (has_prev, first) {
                let c = Cursor {
                    backwards: true,
                    keyset: key(f),
                };
                links.push(link(
                    "previous",
                    url_with(&path, &query_string(&params, &[("_cursor", c.encode())])),
                ));
            }
            entries.extend(page.matches.iter().map(|o| EntryOut::of(base, o, "match")));
        }
        entries.extend(included.iter().map(|o| EntryOut::of(base, o, "include")));
        if !req.ignored.is_empty() {
            let oo = outcome::operation_outcome(
                "warning",
                "not-supported",
                &format!("parameters ignored: {}", req.ignored.join(", ")),
            );
            outcome_resource = Some(oo);
        }
        if let Some(oo) = &outcome_resource {
            entries.push(EntryOut {
                full_url: None,
                resource: Res::Value(oo),
                search: Mode { mode: "outcome" },
            });
        }
        let bundle = SearchBundle {
            resource_type: "Bundle",
            id: new_id(),
            meta: Meta {
                last_updated: format_instant(self.now()),
            },
            kind: "searchset",
            total,
            link: links,
            entry: entries,
        };
        serde_json::to_vec(&bundle).map_err(|e| FhirError::internal(e.to_string()))
    }

    /// `_include` and `_revinclude` targets of a page (live resources only, de-duplicated).
    fn includes(
        &self,
        tx: &mut dyn custos_store::ReadTx,
        req: &SearchRequest,
        page: &[Opened],
    ) -> Result<Vec<Opened>, FhirError> {
        let mut out: Vec<Opened> = Vec::new();
        let mut seen: std::collections::HashSet<(String, String)> = page
            .iter()
            .map(|o| (o.rtype.clone(), o.id.clone()))
            .collect();
        for inc in &req.include {
            if inc.source_type != req.resource_type {
                continue;
            }
            let params: Vec<&custos_fhir::SearchParam> = registry()
                .for_type(&inc.source_type)
                .iter()
                .filter(|p| {
                    p.kind == custos_fhir::ParamKind::Reference
                        && (inc.param == "*" || p.code == inc.param)
                })
                .collect();
            for o in page {
                for p in &params {
                    for v in p.extract(&o.resource) {
                        if let custos_fhir::IndexValue::Reference {
                            target_type: Some(t),
                            target_id: Some(id),
                            ..
                        } = v
                        {
                            if inc.target_type.as_deref().is_some_and(|want| want != t) {
                                continue;
                            }
                            if !seen.insert((t.clone(), id.clone())) {
                                continue;
                            }
                            if let Some(sv) = tx.current(&t, &id).map_err(store_err)?
                                && let Ok(opened) = self.open_version(tx, sv)
                            {
                                out.push(opened);
                            }
                        }
                    }
                }
            }
        }
        for inc in &req.revinclude {
            if page.is_empty() {
                break;
            }
            let tk = Tokens::new(self.keys().blind(), &inc.source_type, &inc.param);
            let tokens = page.iter().map(|o| tk.reference(&o.rtype, &o.id)).collect();
            let q = IndexQuery {
                filters: vec![Filter::AnyToken(tokens)],
                ..IndexQuery::all(&inc.source_type, self.config().max_count)
            };
            for sv in tx.search(&q).map_err(store_err)? {
                if seen.insert((sv.rtype.clone(), sv.id.clone())) {
                    out.push(self.open_version(tx, sv)?);
                }
            }
        }
        Ok(out)
    }

    /// History Bundle for an instance (`rtype` and `id`), a type, or the system.
    pub async fn history(
        &self,
        rtype: Option<&str>,
        id: Option<&str>,
        params: Vec<(String, String)>,
        base: &str,
    ) -> Result<Value, FhirError> {
        let scope = match (rtype, id) {
            (Some(t), Some(i)) => HistoryScope::Instance {
                rtype: t.into(),
                id: i.into(),
            },
            (Some(t), None) => HistoryScope::Type(t.into()),
            _ => HistoryScope::System,
        };
        let mut since = None;
        let mut before = None;
        let mut seq_below = None;
        let mut count = self.config().default_count;
        for (k, v) in &params {
            match k.as_str() {
                "_since" => since = Some(parse_instant(v, "_since")?.start),
                "_at" => {
                    let r = parse_instant(v, "_at")?;
                    before = Some(r.end);
                }
                "_count" => {
                    count = v
                        .parse::<usize>()
                        .map_err(|_| FhirError::bad_request("_count must be a whole number"))?
                }
                "_cursor" => {
                    seq_below = Some(
                        v.parse::<i64>()
                            .map_err(|_| FhirError::bad_request("invalid _cursor"))?,
                    )
                }
                "_format" | "_pretty" | "_total" => {}
                other => {
                    return Err(FhirError::bad_request(format!(
                        "unknown history parameter '{other}'"
                    )));
                }
            }
        }
        let count = count.min(self.config().max_count);
        let visibility = match &scope {
            HistoryScope::Instance { rtype, id } => {
                Records::check_type(rtype)?;
                self.guard().check_type(Interaction::Read, rtype).await?;
                // An unknown instance is 404, not an empty history; a
                // forbidden one is refused as a read would be.
                let (t, i) = (rtype.clone(), id.clone());
                let head = self
                    .store()
                    .read(move |tx| tx.head(&t, &i))
                    .await
                    .map_err(store_err)?;
                let focus = head.as_ref().and_then(|h| h.compartment.clone());
                let found = head.map(|h| {
                    let key = h
                        .compartment
                        .as_deref()
                        .map(patient_key_name)
                        .unwrap_or_else(|| SHARED_KEY_NAME.to_string());
                    (key, Ok(()))
                });
                self.after_read(rtype, id, found).await?;
                self.guard()
                    .visibility(Interaction::Read, Some(rtype), focus.as_deref())
                    .await?
            }
            HistoryScope::Type(rtype) => {
                Records::check_type(rtype)?;
                self.guard().check_type(Interaction::Search, rtype).await?;
                self.guard()
                    .visibility(Interaction::Search, Some(rtype), None)
                    .await?
            }
            HistoryScope::System => {
                self.guard()
                    .visibility(Interaction::Search, None, None)
                    .await?
            }
        };
        let (key_names, exclude_keys) = match visibility {
            Visibility::All => (None, Vec::new()),
            Visibility::Only { patients, shared } => {
                let mut keys: Vec<String> = patients.iter().map(|p| patient_key_name(p)).collect();
                if shared {
                    keys.push(SHARED_KEY_NAME.to_string());
                }
                (Some(keys), Vec::new())
            }
            Visibility::Except { patients } => {
                (None, patients.iter().map(|p| patient_key_name(p)).collect())
            }
        };
        let q = HistoryQuery {
            scope: scope.clone(),
            since,
            before,
            seq_below,
            key_names,
            exclude_keys,
            limit: count + 1,
        };
        let (mut rows, total) = self.history_rows(q, true).await?;
        let more = rows.len() > count;
        rows.truncate(count);
        let path = match (rtype, id) {
            (Some(t), Some(i)) => format!("{base}/{t}/{i}/_history"),
            (Some(t), None) => format!("{base}/{t}/_history"),
            _ => format!("{base}/_history"),
        };
        let mut links = vec![link("self", url_with(&path, &query_string(&params, &[])))];
        if more && let Some((last, _)) = rows.last() {
            links.push(link(
                "next",
                url_with(
                    &path,
                    &query_string(&params, &[("_cursor", last.seq.to_string())]),
                ),
            ));
        }
        let entries: Vec<Value> = rows
            .iter()
            .map(|(sv, opened)| history_entry(base, sv, opened.as_ref()))
            .collect();
        let mut bundle = json!({
            "resourceType": "Bundle",
            "id": new_id(),
            "meta": { "lastUpdated": format_instant(self.now()) },
            "type": "history",
        });
        if let Some(t) = total {
            bundle["total"] = json!(t);
        }
        bundle["link"] = Value::Array(links);
        if !entries.is_empty() {
            bundle["entry"] = Value::Array(entries);
        }
        Ok(bundle)
    }
}

fn parse_instant(v: &str, name: &str) -> Result<custos_fhir::date::DateRange, FhirError> {
    custos_fhir::date::parse_range(v)
        .ok_or_else(|| FhirError::bad_request(format!("{name} must be a FHIR instant")))
}

fn history_entry(base: &str, sv: &StoredVersion, opened: Option<&Opened>) -> Value {
    let url = format!("{}/{}", sv.rtype, sv.id);
    let (method, status) = match (sv.state, sv.version) {
        (custos_store::RecordState::Deleted, _) => ("DELETE", "204 No Content"),
        (_, 1) => ("POST", "201 Created"),
        _ => ("PUT", "200 OK"),
    };
    let req_url = if method == "POST" {
        sv.rtype.clone()
    } else {
        url.clone()
    };
    let mut e = json!({
        "fullUrl": format!("{base}/{url}"),
        "request": { "method": method, "url": req_url },
        "response": {
            "status": status,
            "etag": format!("W/\"{}\"", sv.version),
            "lastModified": format_instant(sv.last_updated),
        },
    });
    if let Some(o) = opened {
        e["resource"] = o.resource.clone();
    }
    e
}
