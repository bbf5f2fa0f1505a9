//! HTTP plumbing: content negotiation, bodies, headers.
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use custos_fhir::query::Handling;
use custos_fhir::{ErrorKind, FhirError};
use custos_records::Opened;
use serde_json::Value;

use crate::AppState;
use crate::error::ApiError;

pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

/// Refuse clients that accept no JSON (406), via `Accept` or `_format`.
pub fn negotiate(headers: &HeaderMap, params: &[(String, String)]) -> Result<(), ApiError> {
    if let Some((_, f)) = params.iter().find(|(k, _)| k == "_format") {
        let f = f.to_ascii_lowercase();
        if !(f == "json" || f.contains("json")) {
            return Err(FhirError::new(
                ErrorKind::NotAcceptable,
                format!("_format '{f}' is not supported; only JSON"),
            )
            .into());
        }
        return Ok(());
    }
    if let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) {
        let ok = accept.split(',').any(|part| {
            let m = part
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            m.is_empty() || m == "*/*" || m == "application/*" || m.contains("json")
        });
        if !ok {
            return Err(FhirError::new(
                ErrorKind::NotAcceptable,
                "only application/fhir+json is produced",
            )
            .into());
        }
    }
    Ok(())
}

/// Read and parse a JSON request body under the size limit.
pub async fn json_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Value, ApiError> {
    if let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        let m = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if !(m == "application/fhir+json"
            || m == "application/json"
            || m == "application/json+fhir")
        {
            return Err(FhirError::new(
                ErrorKind::UnsupportedMediaType,
                format!("content type '{m}' is not supported; send application/fhir+json"),
            )
            .into());
        }
    }
    let limit = state.config.max_body;
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        && len > limit
    {
        return Err(too_large(limit));
    }
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| too_large(limit))?;
    if bytes.is_empty() {
        return Err(FhirError::bad_request("the request body is empty").into());
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        FhirError::bad_request(format!(
            "the body is not valid JSON (line {}, column {})",
            e.line(),
            e.column()
        ))
        .into()
    })
}

fn too_large(limit: usize) -> ApiError {
    FhirError::new(
        ErrorKind::PayloadTooLarge,
        format!("the request body exceeds the limit of {limit} bytes"),
    )
    .into()
}

/// The base URL for links and `fullUrl`s.
pub fn base_url(state: &AppState, headers: &HeaderMap) -> String {
    if let Some(b) = &state.config.base_url {
        return b.trim_end_matches('/').to_string();
    }
    let scheme = if state.config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .map(str::to_string)
        .unwrap_or_else(|| state.config.listen.to_string());
    format!("{scheme}://{host}")
}

/// What the client prefers back (`Prefer: return=…`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Return {
    Minimal,
    Representation,
    OperationOutcome,
}

pub fn prefer_return(headers: &HeaderMap) -> Return {
    let prefer = headers
        .get("prefer")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if prefer.contains("return=minimal") {
        Return::Minimal
    } else if prefer.contains("return=OperationOutcome") {
        Return::OperationOutcome
    } else {
        Return::Representation
    }
}

pub fn prefer_handling(headers: &HeaderMap) -> Handling {
    let prefer = headers
        .get("prefer")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if prefer.contains("handling=strict") {
        Handling::Strict
    } else {
        Handling::Lenient
    }
}

/// `If-Match: W/"3"` → 3.
pub fn if_match(headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    match headers.get(header::IF_MATCH).and_then(|v| v.to_str().ok()) {
        None => Ok(None),
        Some(s) => s
            .trim()
            .trim_start_matches("W/")
            .trim_matches('"')
            .parse()
            .map(Some)
            .map_err(|_| FhirError::bad_request("If-Match must be an ETag like W/\"3\"").into()),
    }
}

/// An RFC 7231 IMF-fixdate for `Last-Modified`.
pub fn http_date(micros: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(micros / 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let fmt = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    t.format(&fmt).unwrap_or_default()
}

/// A JSON response with the FHIR content type.
pub fn fhir_json(status: StatusCode, body: &Value) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = (status, bytes).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    resp
}

/// `ETag` (weak, the version id) and `Last-Modified` of a resource version.
pub fn version_headers(h: &mut HeaderMap, version: i64, last_updated: i64) {
    if let Ok(v) = HeaderValue::from_str(&format!("W/\"{version}\"")) {
        h.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&http_date(last_updated)) {
        h.insert(header::LAST_MODIFIED, v);
    }
}

/// A resource response with ETag, Last-Modified and (for creates) Location.
pub fn resource_response(
    status: StatusCode,
    o: &Opened,
    base: &str,
    location: bool,
    ret: Return,
) -> Response {
    let mut resp = match ret {
        Return::Representation => fhir_json(status, &o.resource),
        Return::Minimal => status.into_response(),
        Return::OperationOutcome => fhir_json(
            status,
            &custos_fhir::outcome::information(&format!(
                "{}/{} version {}",
                o.rtype, o.id, o.version
            )),
        ),
    };
    let h = resp.headers_mut();
    version_headers(h, o.version, o.last_updated);
    if location
        && let Ok(v) = HeaderValue::from_str(&format!(
            "{base}/{}/{}/_history/{}",
            o.rtype, o.id, o.version
        ))
    {
        h.insert(header::LOCATION, v.clone());
        h.insert(header::CONTENT_LOCATION, v);
    }
    resp
}
