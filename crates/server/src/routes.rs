//! Routes and handlers of the FHIR REST API.
use std::time::Instant;

use axum::Extension;
use axum::Router;
use axum::body::Body;
use axum::extract::{MatchedPath, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use custos_fhir::{ErrorKind, FhirError};
use serde_json::Value;
use tower_http::catch_panic::CatchPanicLayer;

use crate::AppState;
use crate::audit;
use crate::auth::{self, Caller};
use crate::error::ApiError;
use crate::http::{
    FHIR_JSON, Return, base_url, fhir_json, if_match, json_body, negotiate, prefer_handling,
    prefer_return, resource_response, version_headers,
};

type ApiResult = Result<Response, ApiError>;

/// The router: the FHIR REST API (behind bearer-token authentication) and
/// the OAuth 2.0, SMART and administration endpoints.
pub fn router(state: AppState) -> Router {
    let fhir = Router::new()
        .route("/", post(bundle))
        .route("/_history", get(history_system))
        .route("/{rtype}", get(search_get).post(create))
        .route("/{rtype}/_search", post(search_post))
        .route("/{rtype}/_history", get(history_type))
        .route("/{rtype}/{id}", get(read).put(update).delete(delete))
        .route("/{rtype}/{id}/_history", get(history_instance))
        .route("/{rtype}/{id}/_history/{vid}", get(vread))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ));
    let audit_api = Router::new()
        .route("/AuditEvent", get(audit::search).post(audit::read_only))
        .route("/AuditEvent/_search", post(audit::search_post))
        .route("/AuditEvent/$export", get(audit::export))
        .route(
            "/AuditEvent/{id}",
            get(audit::read)
                .put(audit::read_only)
                .delete(audit::read_only),
        )
        .route("/Patient/{id}/$access-report", get(audit::access_report))
        .route("/audit/entries", get(audit::entries))
        .route("/audit/tlog/tile/{*rest}", get(audit::tlog_tile))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ));
    let public = Router::new()
        .route("/metadata", get(metadata))
        .route(
            "/.well-known/smart-configuration",
            get(auth::smart_configuration),
        )
        .route("/.well-known/jwks.json", get(auth::jwks))
        .route(
            "/auth/authorize",
            get(auth::authorize_get).post(auth::authorize_post),
        )
        .route("/audit/checkpoint", get(audit::checkpoint))
        .route("/audit/tlog/checkpoint", get(audit::checkpoint))
        .route("/audit/checkpoints", get(audit::checkpoints))
        .route("/audit/public-key", get(audit::public_key))
        .route("/audit/proof/inclusion", get(audit::inclusion_proof))
        .route("/audit/proof/consistency", get(audit::consistency_proof))
        .route("/auth/token", post(auth::token))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            audit::audit_public_request,
        ));
    let admin = Router::new()
        .route(
            "/admin/users",
            get(auth::admin_list_users).post(auth::admin_add_user),
        )
        .route(
            "/admin/users/{username}/{action}",
            post(auth::admin_user_action),
        )
        .route("/admin/read-only", post(auth::admin_read_only))
        .route(
            "/admin/clients",
            get(auth::admin_list_clients).post(auth::admin_register_client),
        )
        .route(
            "/admin/signing-key/rotate",
            post(auth::admin_rotate_signing_key),
        )
        .route("/admin/alerts", get(crate::alerts::list))
        .route(
            "/admin/alerts/{id}",
            get(crate::alerts::show).post(crate::alerts::update),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::audit_admin_request,
        ));
    // The token endpoint also records its own events (who, what was issued or refused).
    // Operations endpoints: no data, not audited (see `ops`).
    let ops = Router::new()
        .route("/healthz", get(crate::ops::healthz))
        .route("/readyz", get(crate::ops::readyz))
        .route("/metrics", get(crate::ops::metrics));
    Router::new()
        .merge(ops)
        .merge(public)
        .merge(audit_api)
        .merge(admin)
        .merge(fhir)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), log_requests))
        .layer(CatchPanicLayer::custom(panic_response))
        .with_state(state)
}

fn params(q: Option<String>) -> Vec<(String, String)> {
    q.map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

/// Logs method, route template, status and latency — never the query
/// string or the concrete path, which can carry identifying data.
async fn log_requests(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "-".into());
    let start = Instant::now();
    let resp = next.run(req).await;
    let took = start.elapsed();
    s.ops
        .observe(method.as_str(), &route, resp.status().as_u16(), took);
    tracing::info!(%method, route, status = resp.status().as_u16(), micros = took.as_micros() as u64, "request");
    resp
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError(FhirError::internal(
        "internal error; the request was not completed",
    ))
    .into_response()
}

async fn not_found(State(s): State<AppState>, req: Request) -> Response {
    let resp = ApiError(FhirError::not_found("no such endpoint")).into_response();
    audit::audit_unrouted(&s, req, resp).await
}

async fn method_not_allowed(State(s): State<AppState>, req: Request) -> Response {
    let resp = ApiError(FhirError::new(
        ErrorKind::MethodNotAllowed,
        "this interaction is not supported on this URL",
    ))
    .into_response();
    audit::audit_unrouted(&s, req, resp).await
}

async fn metadata(
    State(s): State<AppState>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> ApiResult {
    negotiate(&headers, &params(q))?;
    let now = custos_fhir::date::format_instant(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0),
    );
    let base = base_url(&s, &headers);
    let mut cs = custos_records::capability_statement(&base, env!("CARGO_PKG_VERSION"), &now);
    if let Some(auth) = s.access.service() {
        let issuer = auth.issuer();
        cs["rest"][0]["security"] = serde_json::json!({
            "cors": false,
            "service": [{
                "coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                    "code": "SMART-on-FHIR"
                }],
                "text": "OAuth2 using SMART-on-FHIR profile (see /.well-known/smart-configuration)"
            }],
            "extension": [{
                "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                "extension": [
                    { "url": "token", "valueUri": format!("{issuer}/auth/token") },
                    { "url": "authorize", "valueUri": format!("{issuer}/auth/authorize") }
                ]
            }],
            "description": "Every request needs a bearer token. Access follows SMART scopes, the caller's role, and the care relationship to the patient; a patient's Consent deny overrides; clinicians may break the glass with X-Break-Glass-Reason."
        });
    }
    Ok(fhir_json(StatusCode::OK, &cs))
}

async fn read(
    Extension(c): Extension<Caller>,
    headers: HeaderMap,
    Path((rtype, id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> ApiResult {
    negotiate(&headers, &params(q))?;
    let raw = c.records.read_raw(&rtype, &id).await?;
    if let Some(inm) = headers.get("if-none-match").and_then(|v| v.to_str().ok())
        && inm.trim() == raw.etag()
    {
        return Ok(StatusCode::NOT_MODIFIED.into_response());
    }
    // The stored JSON goes out as it is: no parse, no re-serialization.
    let mut resp = (StatusCode::OK, raw.json).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    version_headers(h, raw.version, raw.last_updated);
    Ok(resp)
}

async fn vread(
    State(s): State<AppState>,
    Extension(c): Extension<Caller>,
    headers: HeaderMap,
    Path((rtype, id, vid)): Path<(String, String, String)>,
    RawQuery(q): RawQuery,
) -> ApiResult {
    negotiate(&headers, &params(q))?;
    let o = c.records.vread(&rtype, &id, &vid).await?;
    Ok(resource_response(
        StatusCode::OK,
        &o,
        &base_url(&s, &headers),
        false,
        Return::Representation,
    ))
}

async fn create(
    State(s): State<AppState>,
    Extension(c): Extension<Caller>,
    headers: HeaderMap,
    Path(rtype): Path<String>,
    RawQuery(q): RawQuery,
    body: Body,
) -> ApiResult {
    negotiate(&headers, &params(q))?;
    let body = json_body(&s, &headers, body).await?;
    let cond = headers
        .get("if-none-exist")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let (o, created) = c.records.create(&rtype, body, cond).await?;
    Ok(written(&s, &headers, &o, created))
}

async fn update(
    State(s): State<AppState>,
    Extension(c): Extension<Caller>,
    headers: HeaderMap,
    Path((rtype, id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    body: Body,
) -> ApiResult {
    negotiate(&headers, &params(q))?;
    let body = json_body(&s, &headers, body).await?;
    let (o, created) = c
        .records
        .update(&rtype, &id, body, if_match(&headers)?)
        .await?;
    Ok(written(&s, &headers, &o, created))
}

/// The answer to a create or update: 201 or 200 with Location, ETag and
/// Last-Modified, and the body the client prefers.
fn written(
    s: &AppState,
    headers: &HeaderMap,
    o: &custos_records::Opened,
    created: bool,
) -> Response {
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    resource_response(
        status,
        o,
        &base_url(s, headers),
        true,
        prefer_return(headers),
    )
}

async fn delete(
    Extension(c): Extension<Caller>,
    Path((rtype, id)): Path<(String, String)>,
) -> ApiResult {
    c.records.delete(&rtype, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn search_get(
    State(s): State<AppState>,
    Extension(c): Extension<Caller>,
    headers: HeaderMap,
    Path(rtype): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult {
    let p = params(q);
    negotiate(&headers, &p)?;
    search(s, c, headers, rtype, p).await
}

async fn search_post(
    State(s): State<AppState>,
    Extension(c): Extension<Caller>,
    headers: HeaderMap,
    Path(rtype): Path<String>,
    RawQuery(q): RawQuery,
    body: Body,
) -> ApiResult {
    let mut p = params(q);
    negotiate(&headers, &p)?;
    let ct = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.starts_with("application/x-www-form-urlencoded") {
        return Err(FhirError::new(
            ErrorKind::UnsupportedMediaType,
            "_search takes application/x-www-form-urlencoded",
        )
        .into());
    }
    let bytes = axum::body::to_bytes(body, s.config.max_body)
        .await
        .map_err(|_| FhirError::new(ErrorKind::PayloadTooLarge, "the request body is too large"))?;
    p.extend(form_urlencoded::parse(&bytes).into_owned());
    search(s, c, headers, rtype, p).await
}

async fn search(
    s: AppState,
    c: Caller,
    headers: HeaderMap,
    rtype: String,
    p: Vec<(String, String)>,
) -> ApiResult {
    let base = base_url(&s, &headers);
    let bundle = c
        .records
        .search_json(&rtype, p, prefer_handling(&headers), &base)
        .await?;
    let returned = audit::ResultCount::of_bundle(&bundle);
    let mut resp = (StatusCode::OK, bundle).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    resp.extensions_mut().insert(returned);
    Ok(resp)
}

async fn bundle(
    State(s): State<AppState>,
    Extension(c): Extension<Caller>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
    body: Body,
) -> ApiResult {
    negotiate(&headers, &params(q))?;
    let body: Value = json_body(&s, &headers, body).await?;
    let base = base_url(&s, &headers);
    let representation =
        prefer_return(&headers) == Return::Representation && headers.get("prefer").is_some();
    let resp = c
        .records
        .process_bundle(body, &base, representation)
        .await?;
    let transaction = resp["type"] == "transaction-response";
    let mut out = fhir_json(StatusCode::OK, &resp);
    if transaction {
        // All-or-nothing: the event written with its commit covers the request.
        out.extensions_mut().insert(audit::CoveredByWrite);
    }
    Ok(out)
}

async fn history_system(
    State(s): State<AppState>,
    Extension(c): Extension<Caller>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> ApiResult {
    let p = params(q);
    negotiate(&headers, &p)?;
    let b = c
        .records
        .history(None, None, p, &base_url(&s, &headers))
        .await?;
    Ok(fhir_json(StatusCode::OK, &b))
}

async fn history_type(
    State(s): State<AppState>,
    Extension(c): Extension<Caller>,
    headers: HeaderMap,
    Path(rtype): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult {
    let p = params(q);
    negotiate(&headers, &p)?;
    let b = c
        .records
        .history(Some(&rtype), None, p, &base_url(&s, &headers))
        .await?;
    Ok(fhir_json(StatusCode::OK, &b))
}

async fn history_instance(
    State(s): State<AppState>,
    Extension(c): Extension<Caller>,
    headers: HeaderMap,
    Path((rtype, id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> ApiResult {
    let p = params(q);
    negotiate(&headers, &p)?;
    let b = c
        .records
        .history(Some(&rtype), Some(&id), p, &base_url(&s, &headers))
        .await?;
    Ok(fhir_json(StatusCode::OK, &b))
}
