//! The audit trail over HTTP: the event of every request (built here,
//! appended before the response leaves), the transparency endpoints
//! (checkpoint, proofs, entries), AuditEvent search, a patient's access
//! report, and the NDJSON export for SIEMs.
use std::net::SocketAddr;

use axum::Extension;
use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use custos_audit::{
    Agent, AuditError, AuditRecord, AuditTrail, Decision, Entity, EventKind, Position,
    RequestWrites, to_audit_event,
};
use custos_auth::{Principal, Role};
use custos_fhir::{ErrorKind, FhirError};
use custos_records::{Guard, Interaction};
use custos_store::AuditQuery;
use serde_json::{Value, json};

use crate::AppState;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::http::base_url;

type ApiResult = Result<Response, ApiError>;

/// What the audit event of a request records about the request itself.
#[derive(Debug, Clone)]
pub(crate) struct RequestMeta {
    method: Method,
    /// `GET /Patient/{id}`.
    action: String,
    interaction: Option<&'static str>,
    query: Option<String>,
    entity: Option<Entity>,
    pub(crate) source: Option<String>,
    pub(crate) user_agent: Option<String>,
    /// A create, update or delete of one resource (its event is written
    /// with the change itself).
    single_write: bool,
}

impl RequestMeta {
    pub(crate) fn of(req: &Request) -> RequestMeta {
        let peer = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0);
        let route = req
            .extensions()
            .get::<MatchedPath>()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "-".into());
        let method = req.method().clone();
        let interaction = interaction_of(&method, &route);
        let segments: Vec<&str> = req
            .uri()
            .path()
            .trim_start_matches('/')
            .split('/')
            .collect();
        let entity = match (route.as_str(), segments.as_slice()) {
            ("/{rtype}/{id}" | "/{rtype}/{id}/_history", [t, id, ..]) => Some(Entity {
                rtype: t.to_string(),
                id: id.to_string(),
                ..Entity::default()
            }),
            ("/{rtype}/{id}/_history/{vid}", [t, id, _, v]) => Some(Entity {
                rtype: t.to_string(),
                id: id.to_string(),
                version: v.parse().ok(),
                ..Entity::default()
            }),
            _ => None,
        };
        let single_write = matches!(
            (&method, route.as_str()),
            (&Method::POST, "/{rtype}") | (&Method::PUT | &Method::DELETE, "/{rtype}/{id}")
        );
        RequestMeta {
            action: format!("{method} {route}"),
            method,
            interaction,
            query: req.uri().query().map(|q| q.chars().take(8192).collect()),
            entity,
            source: peer.map(|p| p.ip().to_string()),
            user_agent: req
                .headers()
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .map(|s| s.chars().take(200).collect()),
            single_write,
        }
    }

    /// For `POST …/_search`, the form body is the query: read it (within
    /// `limit`), record it, and hand the request on with the same body.
    pub(crate) async fn with_search_form(
        mut self,
        req: Request,
        limit: usize,
    ) -> (RequestMeta, Result<Request, Response>) {
        if self.method != Method::POST || !self.action.ends_with("/_search") {
            return (self, Ok(req));
        }
        let (parts, body) = req.into_parts();
        match axum::body::to_bytes(body, limit).await {
            Ok(bytes) => {
                let form = String::from_utf8_lossy(&bytes).chars().take(8192).collect();
                self.query = Some(form);
                (self, Ok(Request::from_parts(parts, Body::from(bytes))))
            }
            Err(_) => (
                self,
                Err(ApiError(FhirError::new(
                    ErrorKind::PayloadTooLarge,
                    format!("the search form is larger than {limit} bytes or could not be read"),
                ))
                .into_response()),
            ),
        }
    }

    /// Whether the request can change data (so its event may be written
    /// with the change).
    pub(crate) fn may_write(&self) -> bool {
        !matches!(self.method, Method::GET | Method::HEAD)
    }

    /// The event of this request, before its outcome is known.
    pub(crate) fn record(&self, principal: Option<&Principal>) -> AuditRecord {
        let agent = match principal {
            Some(p) => Agent {
                subject: Some(p.subject()),
                username: p.username().map(str::to_string),
                role: Some(p.role.name().to_string()),
                client_id: Some(p.client_id.clone()),
                fhir_user: p
                    .practitioner
                    .as_ref()
                    .map(|x| format!("Practitioner/{x}"))
                    .or_else(|| p.patient.as_ref().map(|x| format!("Patient/{x}"))),
                source: self.source.clone(),
                user_agent: self.user_agent.clone(),
            },
            None => Agent {
                source: self.source.clone(),
                user_agent: self.user_agent.clone(),
                ..Agent::default()
            },
        };
        AuditRecord {
            kind: EventKind::Rest,
            action: self.action.clone(),
            interaction: self.interaction.map(str::to_string),
            agent,
            query: self.query.clone(),
            entities: self.entity.iter().cloned().collect(),
            ..AuditRecord::default()
        }
    }
}

/// The FHIR interaction of a route (AuditEvent.subtype).
fn interaction_of(method: &Method, route: &str) -> Option<&'static str> {
    Some(match (method.as_str(), route) {
        ("GET" | "HEAD", "/{rtype}/{id}") => "read",
        ("GET" | "HEAD", "/{rtype}/{id}/_history/{vid}") => "vread",
        ("GET" | "HEAD", "/{rtype}/{id}/_history") => "history-instance",
        ("GET" | "HEAD", "/{rtype}/_history") => "history-type",
        ("GET" | "HEAD", "/_history") => "history-system",
        ("GET" | "HEAD", "/{rtype}") | ("POST", "/{rtype}/_search") => "search-type",
        ("GET" | "HEAD", "/AuditEvent") => "search-type",
        ("GET" | "HEAD", "/AuditEvent/{id}") => "read",
        ("POST", "/{rtype}") => "create",
        ("PUT", "/{rtype}/{id}") => "update",
        ("DELETE", "/{rtype}/{id}") => "delete",
        ("POST", "/") => "transaction",
        ("GET" | "HEAD", "/metadata") => "capabilities",
        (_, r) if r.contains('$') => "operation",
        _ => return None,
    })
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// How many resources a response carried (recorded for the detection of bulk reads).
#[derive(Debug, Clone, Copy)]
pub struct ResultCount(pub u32);

impl ResultCount {
    /// The entries of a serialized Bundle: each carries one `"fullUrl"`
    /// (counted in the bytes, so the page is never parsed again).
    pub fn of_bundle(json: &[u8]) -> ResultCount {
        let needle = b"\"fullUrl\"";
        ResultCount(json.windows(needle.len()).filter(|w| w == needle).count() as u32)
    }
}

/// Set on a response whose whole request was recorded by the event its
/// write committed with (a transaction Bundle): no second event.
#[derive(Debug, Clone, Copy)]
pub struct CoveredByWrite;

/// The answer when an access could not be recorded: nothing else goes out.
fn withheld() -> Response {
    ApiError(FhirError::internal(
        "the access could not be recorded in the audit trail, so it was not completed",
    ))
    .into_response()
}

/// Append the request's event (unless its single write already recorded
/// it in its own transaction) before `resp` leaves; if the trail refuses,
/// the response is withheld (fail closed).
pub(crate) async fn finish(
    trail: &AuditTrail,
    meta: &RequestMeta,
    mut rec: AuditRecord,
    writes: Option<&RequestWrites>,
    decisions: Vec<Decision>,
    resp: Response,
) -> Response {
    let status = resp.status();
    let covered = meta.single_write || resp.extensions().get::<CoveredByWrite>().is_some();
    if covered && status.is_success() && writes.is_some_and(|w| !w.appended().is_empty()) {
        trail.signal_commit();
        return resp;
    }
    if writes.is_some_and(|w| !w.appended().is_empty()) {
        trail.signal_commit();
    }
    rec.at = now_micros();
    rec.status = status.as_u16();
    // A refusal brings its own decision (which rule refused); the guard's come after it.
    rec.decisions.extend(decisions);
    rec.results = resp.extensions().get::<ResultCount>().map(|c| c.0);
    if meta.method == Method::HEAD {
        rec.interaction = rec.interaction.or(Some("read".into()));
    }
    match trail.append(rec).await {
        Ok(_) => resp,
        Err(e) => {
            tracing::error!(error = %e, "a request could not be audited; its response was withheld");
            withheld()
        }
    }
}

/// Record a request that is refused before anyone is known (no or a bad
/// token). Returns the response to send: `resp`, or 500 if the trail refused.
pub(crate) async fn refusal(
    trail: &AuditTrail,
    meta: &RequestMeta,
    rule: &str,
    resp: Response,
) -> Response {
    refusal_by(trail, meta, rule, None, resp).await
}

/// [`refusal`] of a token whose signature held but which no longer counts
/// (revoked, its account locked): `who` is `(subject, username, role)`.
pub(crate) async fn refusal_by(
    trail: &AuditTrail,
    meta: &RequestMeta,
    rule: &str,
    who: Option<(String, Option<String>, String)>,
    resp: Response,
) -> Response {
    let mut rec = meta.record(None);
    if let Some((subject, username, role)) = who {
        rec.agent.subject = Some(subject);
        rec.agent.username = username;
        rec.agent.role = Some(role);
    }
    rec.decisions = vec![Decision {
        interaction: "authenticate".into(),
        rtype: None,
        id: None,
        patient: None,
        allowed: false,
        rule: rule.to_string().into(),
    }];
    finish(trail, meta, rec, None, Vec::new(), resp).await
}

/// The fallbacks (unknown endpoint, method not allowed): recorded too.
pub async fn audit_unrouted(s: &AppState, req: Request, resp: Response) -> Response {
    let Some(trail) = s.audit.clone() else {
        return resp;
    };
    let meta = RequestMeta::of(&req);
    let rec = meta.record(None);
    finish(&trail, &meta, rec, None, Vec::new(), resp).await
}

/// Middleware of endpoints anyone may call (metadata, discovery, the
/// transparency log): each request is an anonymous audit event.
pub async fn audit_public_request(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let Some(trail) = s.audit.clone() else {
        return next.run(req).await;
    };
    let meta = RequestMeta::of(&req);
    let rec = meta.record(None);
    let resp = next.run(req).await;
    finish(&trail, &meta, rec, None, Vec::new(), resp).await
}

// ------------------------------------------------------------ endpoints

fn trail(s: &AppState) -> Result<&AuditTrail, ApiError> {
    s.audit
        .as_ref()
        .ok_or_else(|| ApiError(FhirError::not_found("the audit trail is not enabled")))
}

fn audit_err(e: AuditError) -> ApiError {
    match e {
        AuditError::Invalid(m) => ApiError(FhirError::bad_request(m)),
        other => {
            tracing::error!(error = %other, "audit trail error");
            ApiError(FhirError::internal("the audit trail could not answer"))
        }
    }
}

fn text(body: impl Into<Body>) -> Response {
    let mut r = (StatusCode::OK, body.into()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn query_map(q: Option<String>) -> Vec<(String, String)> {
    q.map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

fn get<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn number(params: &[(String, String)], name: &str) -> Result<Option<u64>, ApiError> {
    match get(params, name) {
        None => Ok(None),
        Some(v) => v.parse::<u64>().map(Some).map_err(|_| {
            ApiError(FhirError::bad_request(format!(
                "{name} must be a non-negative integer"
            )))
        }),
    }
}

fn required(params: &[(String, String)], name: &str) -> Result<u64, ApiError> {
    number(params, name)?
        .ok_or_else(|| ApiError(FhirError::bad_request(format!("{name} is required"))))
}

/// `GET /audit/checkpoint`: the latest signed checkpoint (C2SP signed note);
/// also `GET /audit/tlog/checkpoint`, at the log's C2SP `tlog-tiles` prefix.
pub async fn checkpoint(State(s): State<AppState>) -> ApiResult {
    let c = trail(&s)?.latest().await.map_err(audit_err)?;
    Ok(text(c.note))
}

/// `GET /audit/checkpoints`: every checkpoint issued, oldest first, as a
/// JSON array of signed notes.
pub async fn checkpoints(State(s): State<AppState>) -> ApiResult {
    let all = trail(&s)?.checkpoints().await.map_err(audit_err)?;
    let notes: Vec<String> = all
        .into_iter()
        .map(|c| String::from_utf8_lossy(&c.note).into_owned())
        .collect();
    Ok(axum::Json(json!({ "checkpoints": notes })).into_response())
}

/// `GET /audit/public-key`: the signed-note verifier key of checkpoints.
pub async fn public_key(State(s): State<AppState>) -> ApiResult {
    Ok(text(trail(&s)?.verifier_key()))
}

/// `GET /audit/proof/inclusion?index=&size=`.
pub async fn inclusion_proof(State(s): State<AppState>, RawQuery(q): RawQuery) -> ApiResult {
    let p = query_map(q);
    let (index, size) = (required(&p, "index")?, required(&p, "size")?);
    let proof = trail(&s)?
        .inclusion_proof(index, size)
        .await
        .map_err(audit_err)?;
    Ok(axum::Json(json!({
        "index": index,
        "size": size,
        "proof": proof.iter().map(|h| B64.encode(h)).collect::<Vec<_>>(),
    }))
    .into_response())
}

/// `GET /audit/proof/consistency?from=&to=`.
pub async fn consistency_proof(State(s): State<AppState>, RawQuery(q): RawQuery) -> ApiResult {
    let p = query_map(q);
    let (from, to) = (required(&p, "from")?, required(&p, "to")?);
    let proof = trail(&s)?
        .consistency_proof(from, to)
        .await
        .map_err(audit_err)?;
    Ok(axum::Json(json!({
        "from": from,
        "to": to,
        "proof": proof.iter().map(|h| B64.encode(h)).collect::<Vec<_>>(),
    }))
    .into_response())
}

/// `GET /audit/tlog/tile/…`: the log as C2SP `tlog-tiles` (Merkle tiles and
/// entry bundles) for transparency-log tooling. Readers of the trail only:
/// entry bundles carry the sealed events with their times in clear.
pub async fn tlog_tile(
    State(s): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(rest): Path<String>,
) -> ApiResult {
    may_read_trail(&c).await?;
    let path = format!("tile/{rest}");
    let Some((data, full)) = trail(&s)?.tile(&path).await.map_err(audit_err)? else {
        return Err(ApiError(FhirError::not_found(format!(
            "{path} is not a tile of the log at its current size"
        ))));
    };
    let mut r = Response::new(Body::from(data));
    let headers = r.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    // Full tiles never change; a partial one grows into a wider tile.
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(if full {
            "private, max-age=31536000, immutable"
        } else {
            "no-store"
        }),
    );
    Ok(r)
}

/// May this caller read the audit trail? Auditors, security officers and
/// system clients whose scopes allow `AuditEvent` search.
async fn may_read_trail(c: &Caller) -> Result<(), ApiError> {
    let Some(guard) = &c.guard else {
        return Ok(()); // open benchmark mode
    };
    let role = guard.principal().role;
    if !matches!(role, Role::Auditor | Role::SecurityOfficer | Role::Service) {
        return Err(ApiError(FhirError::forbidden(
            "reading the audit trail needs the auditor or security-officer role",
        )));
    }
    guard
        .check_type(Interaction::Search, "AuditEvent")
        .await
        .map_err(ApiError)
}

const PAGE_MAX: usize = 1000;

/// `GET /audit/entries?start=&end=`: raw log entries as NDJSON
/// (`{"index":…,"leaf":base64}` per line), streamed; what `custos audit
/// verify --export` reads along with the checkpoints.
pub async fn entries(
    State(s): State<AppState>,
    Extension(c): Extension<Caller>,
    RawQuery(q): RawQuery,
) -> ApiResult {
    may_read_trail(&c).await?;
    let p = query_map(q);
    let trail = trail(&s)?.clone();
    let start = number(&p, "start")?.unwrap_or(0);
    let end = number(&p, "end")?.unwrap_or(u64::MAX);
    let stream = async_stream(trail, start, end);
    let mut r = Response::new(Body::from_stream(stream));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(r)
}

/// Stream entries page by page through a channel (bounded: a slow reader
/// holds at most a few pages in memory).
fn async_stream(
    trail: AuditTrail,
    start: u64,
    end: u64,
) -> impl futures_core::Stream<Item = Result<bytes::Bytes, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        let mut next = start;
        while next < end {
            let page = match trail.entries(next, end, PAGE_MAX).await {
                Ok(p) => p,
                Err(e) => {
                    let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                    return;
                }
            };
            let Some(last) = page.last() else { break };
            next = last.index + 1;
            let mut buf = Vec::with_capacity(page.len() * 400);
            for e in &page {
                let line = json!({"index": e.index, "leaf": B64.encode(&e.data)});
                let _ = serde_json::to_writer(&mut buf, &line);
                buf.push(b'\n');
            }
            if tx.send(Ok(bytes::Bytes::from(buf))).await.is_err() {
                return;
            }
        }
    });
    tokio_stream_from(rx)
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_core::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Parse the AuditEvent search parameters.
fn audit_query(
    trail: &AuditTrail,
    params: &[(String, String)],
) -> Result<(AuditQuery, usize), ApiError> {
    let mut q = AuditQuery::default();
    let mut count = 50usize;
    for (k, v) in params {
        match k.as_str() {
            "patient" | "entity" => {
                let id = v.strip_prefix("Patient/").unwrap_or(v);
                q.patient = Some(trail.patient_token(id));
            }
            "agent" => q.agent = Some(trail.agent_token(v)),
            "action" => {
                if !["C", "R", "U", "D", "E"].contains(&v.as_str()) {
                    return Err(ApiError(FhirError::bad_request(
                        "action must be one of C, R, U, D, E",
                    )));
                }
                q.action = Some(v.clone());
            }
            "outcome" => {
                q.outcome = Some(match v.as_str() {
                    "0" => 0,
                    "4" => 4,
                    "8" => 8,
                    "12" => 12,
                    _ => {
                        return Err(ApiError(FhirError::bad_request(
                            "outcome must be one of 0, 4, 8, 12",
                        )));
                    }
                })
            }
            "date" => {
                let (prefix, value) = match v.get(..2) {
                    Some(p @ ("ge" | "gt" | "le" | "lt" | "eq")) => (p, &v[2..]),
                    _ => ("eq", v.as_str()),
                };
                let range = custos_fhir::date::parse_range(value).ok_or_else(|| {
                    ApiError(FhirError::bad_request(format!(
                        "date: '{v}' is not a FHIR date"
                    )))
                })?;
                match prefix {
                    "ge" => q.from = Some(range.start),
                    "gt" => q.from = Some(range.end),
                    "le" => q.until = Some(range.end),
                    "lt" => q.until = Some(range.start),
                    _ => {
                        q.from = Some(range.start);
                        q.until = Some(range.end);
                    }
                }
            }
            "_count" => {
                count = v
                    .parse::<usize>()
                    .map_err(|_| ApiError(FhirError::bad_request("_count must be a number")))?
                    .clamp(1, PAGE_MAX)
            }
            "_before" => {
                q.before = Some(v.parse().map_err(|_| {
                    ApiError(FhirError::bad_request("_before must be an entry index"))
                })?)
            }
            "_format" | "_total" => {}
            other => {
                return Err(ApiError(FhirError::bad_request(format!(
                    "unknown AuditEvent search parameter '{other}' (supported: patient, agent, date, action, outcome, _count)"
                ))));
            }
        }
    }
    q.limit = count + 1;
    Ok((q, count))
}

fn fhir_response(v: &Value) -> Response {
    let mut r = (StatusCode::OK, v.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(crate::http::FHIR_JSON),
    );
    r
}

async fn search_bundle(
    trail: &AuditTrail,
    base: &str,
    self_path: &str,
    params: Vec<(String, String)>,
) -> Result<Value, ApiError> {
    let (q, count) = audit_query(trail, &params)?;
    let rows = trail.search(q).await.map_err(audit_err)?;
    let more = rows.len() > count;
    let shown = &rows[..rows.len().min(count)];
    let entries: Vec<Value> = shown
        .iter()
        .map(|(e, rec)| {
            let ev = to_audit_event(
                rec,
                &Position {
                    index: e.index,
                    leaf: &e.data,
                },
            );
            json!({"fullUrl": format!("{base}/AuditEvent/{}", e.index), "resource": ev, "search": {"mode": "match"}})
        })
        .collect();
    let encode = |extra: Option<(&str, String)>| {
        let mut s = form_urlencoded::Serializer::new(String::new());
        for (k, v) in params.iter().filter(|(k, _)| k != "_before") {
            s.append_pair(k, v);
        }
        if let Some((k, v)) = extra {
            s.append_pair(k, &v);
        }
        let qs = s.finish();
        if qs.is_empty() {
            format!("{base}{self_path}")
        } else {
            format!("{base}{self_path}?{qs}")
        }
    };
    let mut links = vec![json!({"relation": "self", "url": encode(None)})];
    if more && let Some((last, _)) = shown.last() {
        links.push(
            json!({"relation": "next", "url": encode(Some(("_before", last.index.to_string())))}),
        );
    }
    Ok(json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "link": links,
        "entry": entries,
    }))
}

/// `GET /AuditEvent?patient=&agent=&date=&action=&outcome=`: newest first.
pub async fn search(
    State(s): State<AppState>,
    Extension(c): Extension<Caller>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> ApiResult {
    may_read_trail(&c).await?;
    let trail = trail(&s)?;
    let base = base_url(&s, &headers);
    let bundle = search_bundle(trail, &base, "/AuditEvent", query_map(q)).await?;
    Ok(fhir_response(&bundle))
}

/// `POST /AuditEvent/_search` (form-encoded parameters).
pub async fn search_post(
    State(s): State<AppState>,
    Extension(c): Extension<Caller>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult {
    may_read_trail(&c).await?;
    let trail = trail(&s)?;
    let base = base_url(&s, &headers);
    let params: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
    let bundle = search_bundle(trail, &base, "/AuditEvent", params).await?;
    Ok(fhir_response(&bundle))
}

/// `GET /AuditEvent/{index}`.
pub async fn read(
    State(s): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult {
    may_read_trail(&c).await?;
    let trail = trail(&s)?;
    let index: u64 = id.parse().map_err(|_| {
        ApiError(FhirError::not_found(format!(
            "AuditEvent/{id} is not known"
        )))
    })?;
    let rows = trail
        .entries(index, index + 1, 1)
        .await
        .map_err(audit_err)?;
    let Some(e) = rows.into_iter().next() else {
        return Err(ApiError(FhirError::not_found(format!(
            "AuditEvent/{id} is not known"
        ))));
    };
    let rec = trail.open_leaf(e.data.clone()).await.map_err(audit_err)?;
    Ok(fhir_response(&to_audit_event(
        &rec,
        &Position {
            index: e.index,
            leaf: &e.data,
        },
    )))
}

/// Writes to AuditEvent: the trail is written by the server alone.
pub async fn read_only() -> ApiError {
    ApiError(FhirError::new(
        ErrorKind::MethodNotAllowed,
        "AuditEvents are written by the server itself and are never changed",
    ))
}

/// `GET /Patient/{id}/$access-report`: the accounting of disclosures
/// (HIPAA 45 CFR 164.528) — who opened the patient's record, when, with
/// what role and reason. The patient may ask for their own; auditors and
/// security officers for anyone's.
pub async fn access_report(
    State(s): State<AppState>,
    Extension(c): Extension<Caller>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult {
    if let Some(guard) = &c.guard {
        let p = guard.principal();
        let own = p.role == Role::Patient && p.patient.as_deref() == Some(id.as_str());
        if !own {
            may_read_trail(&c).await.map_err(|_| {
                ApiError(FhirError::forbidden(
                    "an access report is for the patient themselves, an auditor or a security officer",
                ))
            })?;
        }
    }
    let trail = trail(&s)?;
    let base = base_url(&s, &headers);
    let mut params: Vec<(String, String)> = query_map(q)
        .into_iter()
        .filter(|(k, _)| matches!(k.as_str(), "date" | "_count" | "_before"))
        .collect();
    params.push(("patient".into(), id.clone()));
    let (query, count) = audit_query(trail, &params)?;
    let rows = trail.search(query).await.map_err(audit_err)?;
    let more = rows.len() > count;
    let disclosures: Vec<Value> = rows
        .iter()
        .take(count)
        .map(|(e, rec)| {
            let mut d = json!({
                "index": e.index,
                "when": custos_audit::event::instant(rec.at),
                "action": rec.action_code(),
                "interaction": rec.interaction,
                "outcome": rec.outcome_code(),
                "who": rec.agent.username.clone().or(rec.agent.client_id.clone()).or(rec.agent.subject.clone()),
                "role": rec.agent.role,
                "fhirUser": rec.agent.fhir_user,
                "purpose": rec.purpose,
                "rule": rec.rules(),
                "leafHash": B64.encode(custos_audit::event::leaf_hash(&e.data)),
            });
            if let Some(r) = &rec.break_glass_reason {
                d["breakGlassReason"] = json!(r);
            }
            d
        })
        .collect();
    let mut report = json!({
        "resourceType": "Parameters",
        "parameter": [
            {"name": "patient", "valueReference": {"reference": format!("Patient/{id}")}},
            {"name": "generated", "valueInstant": custos_audit::event::instant(now_micros())},
            {"name": "disclosures", "valueString": serde_json::to_string(&disclosures).unwrap_or_default()},
        ],
    });
    if more && let Some((last, _)) = rows.get(count - 1) {
        report["parameter"]
            .as_array_mut()
            .expect("array")
            .push(json!({"name": "next", "valueUri": format!("{base}/Patient/{id}/$access-report?_before={}", last.index)}));
    }
    Ok(fhir_response(&report))
}

/// `GET /AuditEvent/$export`: every event (or those matching the search
/// parameters) as FHIR AuditEvents in NDJSON, oldest first, streamed.
pub async fn export(
    State(s): State<AppState>,
    Extension(c): Extension<Caller>,
    RawQuery(q): RawQuery,
) -> ApiResult {
    may_read_trail(&c).await?;
    let trail = trail(&s)?.clone();
    let params: Vec<(String, String)> = query_map(q)
        .into_iter()
        .filter(|(k, _)| k != "_count" && k != "_before")
        .collect();
    let (mut query, _) = audit_query(&trail, &params)?;
    query.ascending = true;
    query.limit = PAGE_MAX;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        loop {
            let page = match trail.search(query.clone()).await {
                Ok(p) => p,
                Err(e) => {
                    let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                    return;
                }
            };
            let Some((last, _)) = page.last() else { break };
            query.after = Some(last.index);
            let mut buf = Vec::with_capacity(page.len() * 1500);
            for (e, rec) in &page {
                let ev = to_audit_event(
                    rec,
                    &Position {
                        index: e.index,
                        leaf: &e.data,
                    },
                );
                let _ = serde_json::to_writer(&mut buf, &ev);
                buf.push(b'\n');
            }
            if tx.send(Ok(bytes::Bytes::from(buf))).await.is_err() {
                return;
            }
        }
    });
    let mut r = Response::new(Body::from_stream(tokio_stream_from(rx)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/fhir+ndjson"),
    );
    Ok(r)
}
