//! The one error type of FHIR processing, mapped to an HTTP status by the server.

/// What went wrong, in FHIR terms; each kind has one HTTP status (see [`ErrorKind::status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// 400: malformed request, bad JSON, bad search parameter.
    BadRequest,
    /// 401: no or bad credentials.
    Unauthorized,
    /// 403: authenticated but not allowed.
    Forbidden,
    /// 404: unknown resource type or id.
    NotFound,
    /// 405: interaction not supported on this path.
    MethodNotAllowed,
    /// 406: the client asked for a format we do not produce.
    NotAcceptable,
    /// 409: version conflict or duplicate.
    Conflict,
    /// 410: the resource was deleted (or erased).
    Gone,
    /// 412: `If-Match` did not match, or a conditional matched too many.
    PreconditionFailed,
    /// 413: body over the configured limit.
    PayloadTooLarge,
    /// 415: body not FHIR JSON.
    UnsupportedMediaType,
    /// 422: well-formed but semantically invalid (broken reference, bad resource content).
    Unprocessable,
    /// 500: our fault.
    Internal,
    /// 503: temporarily unavailable (for example read-only mode).
    Unavailable,
}

impl ErrorKind {
    /// The HTTP status code for this kind.
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::BadRequest => 400,
            ErrorKind::Unauthorized => 401,
            ErrorKind::Forbidden => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::MethodNotAllowed => 405,
            ErrorKind::NotAcceptable => 406,
            ErrorKind::Conflict => 409,
            ErrorKind::Gone => 410,
            ErrorKind::PreconditionFailed => 412,
            ErrorKind::PayloadTooLarge => 413,
            ErrorKind::UnsupportedMediaType => 415,
            ErrorKind::Unprocessable => 422,
            ErrorKind::Internal => 500,
            ErrorKind::Unavailable => 503,
        }
    }

    /// The FHIR `IssueType` code (<http://hl7.org/fhir/issue-type>) for this kind.
    pub fn issue_code(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "invalid",
            ErrorKind::Unauthorized => "login",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::NotFound => "not-found",
            ErrorKind::MethodNotAllowed => "not-supported",
            ErrorKind::NotAcceptable => "not-supported",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Gone => "deleted",
            ErrorKind::PreconditionFailed => "conflict",
            ErrorKind::PayloadTooLarge => "too-costly",
            ErrorKind::UnsupportedMediaType => "not-supported",
            ErrorKind::Unprocessable => "processing",
            ErrorKind::Internal => "exception",
            ErrorKind::Unavailable => "transient",
        }
    }
}

/// A FHIR processing error: a kind and a message safe to show the client
/// (it must never contain PHI or key material).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct FhirError {
    /// What went wrong (decides the HTTP status).
    pub kind: ErrorKind,
    /// The client-safe explanation.
    pub message: String,
}

impl FhirError {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        FhirError {
            kind,
            message: message.into(),
        }
    }
    /// 400 Bad Request.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, message)
    }
    /// 401 Unauthorized.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unauthorized, message)
    }
    /// 403 Forbidden.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Forbidden, message)
    }
    /// 404 Not Found.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    /// 422 Unprocessable Entity.
    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unprocessable, message)
    }
    /// 409 Conflict.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, message)
    }
    /// 500 Internal Server Error.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
    /// This error as a FHIR OperationOutcome resource.
    pub fn to_outcome(&self) -> serde_json::Value {
        crate::outcome::operation_outcome("error", self.kind.issue_code(), &self.message)
    }
}

/// The result of FHIR processing.
pub type Result<T, E = FhirError> = std::result::Result<T, E>;
