//! The security officer's alert API: cases raised by detection, and their workflow.
//!
//! - `GET /admin/alerts?status=open&_count=50`: cases, most recent first, with the pipeline's figures.
//! - `GET /admin/alerts/{id}`: one case with its findings (each naming the
//!   audit indexes that prove it) and the responses taken.
//! - `POST /admin/alerts/{id}`: `{"status", "assignee", "note", "outcome"}`.
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use custos_auth::roles::AdminRight;
use custos_detect::{CaseStatus, CaseUpdate, DetectError, Detection};
use custos_fhir::{ErrorKind, FhirError};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{ApiError, AppState};

/// The detection service. Cases are read fresh from the store (on a
/// cluster, the leader's pipeline raises them and any node's officer works
/// them), so every node answers alike.
async fn detection(s: &AppState) -> Result<&Detection, ApiError> {
    s.detection
        .as_ref()
        .ok_or_else(|| ApiError(FhirError::not_found("threat detection is not enabled")))
}

fn detect_err(e: DetectError) -> ApiError {
    ApiError(match e {
        DetectError::NotFound(m) => FhirError::not_found(m),
        DetectError::Invalid(m) => FhirError::bad_request(m),
        DetectError::Store(m) | DetectError::Source(m) => FhirError::internal(m),
    })
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    status: Option<String>,
    #[serde(rename = "_count")]
    count: Option<usize>,
}

pub async fn list(
    State(s): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    crate::auth::admin(&s, &headers, AdminRight::Respond).await?;
    let d = detection(&s).await?;
    let status = q
        .status
        .as_deref()
        .map(|st| {
            CaseStatus::parse(st).ok_or_else(|| {
                ApiError(FhirError::bad_request(format!(
                    "unknown status '{st}' (open, investigating, confirmed, dismissed)"
                )))
            })
        })
        .transpose()?;
    let cases = d
        .cases_fresh(status, q.count.unwrap_or(100).min(1000))
        .await
        .map_err(detect_err)?;
    Ok(Json(json!({ "cases": cases, "stats": d.stats() })))
}

pub async fn show(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    crate::auth::admin(&s, &headers, AdminRight::Respond).await?;
    let d = detection(&s).await?;
    let case = d
        .case_fresh(&id)
        .await
        .map_err(detect_err)?
        .ok_or_else(|| ApiError(FhirError::new(ErrorKind::NotFound, format!("no case {id}"))))?;
    Ok(Json(json!(case)))
}

pub async fn update(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Json(u): Json<CaseUpdate>,
) -> Result<Json<Value>, ApiError> {
    let (_, who) = crate::auth::admin(&s, &headers, AdminRight::Respond).await?;
    let d = detection(&s).await?;
    let by = who
        .username()
        .map(str::to_string)
        .unwrap_or_else(|| who.subject());
    let case = d.update_case(&id, u, &by).await.map_err(detect_err)?;
    Ok(Json(json!(case)))
}
