//! Errors as OperationOutcome responses.
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use custos_fhir::FhirError;

/// A FHIR error on its way to the client.
#[derive(Debug)]
pub struct ApiError(pub FhirError);

impl From<FhirError> for ApiError {
    fn from(e: FhirError) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.kind.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::error!(status = status.as_u16(), error = %self.0.message, "request failed");
        }
        let body = serde_json::to_vec(&self.0.to_outcome()).unwrap_or_default();
        let mut resp = (status, body).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(crate::http::FHIR_JSON),
        );
        resp
    }
}
