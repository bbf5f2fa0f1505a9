//! The Custos HTTP server: the FHIR R4 REST API.
//!
//! The only crate that knows HTTP. Handlers translate requests into calls
//! on [`custos_records::Records`] and results into FHIR JSON responses;
//! every error becomes an OperationOutcome with its HTTP status.

pub mod alerts;
pub mod audit;
pub mod auth;
mod error;
mod http;
pub mod ops;
mod routes;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use custos_records::Records;

pub use auth::{Access, Caller};
pub use error::ApiError;
pub use routes::router;

/// Settings of the HTTP server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// PEM certificate chain and private key; plain HTTP when `None`.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Largest request body accepted, in bytes.
    pub max_body: usize,
    /// The base URL clients use (`https://fhir.example.org`); derived from
    /// the Host header when `None`.
    pub base_url: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            tls: None,
            max_body: 16 * 1024 * 1024,
            base_url: None,
        }
    }
}

/// Shared state of the handlers: a handle to [`AppStateInner`].
///
/// One pointer, so that a clone is one reference-count increment: axum
/// clones the state for each `from_fn_with_state` layer and each `State`
/// extractor a request passes (the log layer, the authentication layer and
/// the handler for a FHIR read). A clone of the fields themselves touched
/// eight shared reference counts, cache lines that every request moved
/// between the cores.
///
/// A constructor and `Deref` to the fields: handlers read `s.records`
/// as before.
#[derive(Clone)]
pub struct AppState(Arc<AppStateInner>);

impl AppState {
    /// Share `inner` with the handlers.
    pub fn new(inner: AppStateInner) -> AppState {
        AppState(Arc::new(inner))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppStateInner;
    fn deref(&self) -> &AppStateInner {
        &self.0
    }
}

/// What every handler shares (behind [`AppState`]).
pub struct AppStateInner {
    /// The unrestricted record service; handlers use the caller's guarded handle.
    pub records: Records,
    pub access: Access,
    /// The audit trail every request is recorded in (`None` only in the
    /// benchmark's audit-off runs).
    pub audit: Option<custos_audit::AuditTrail>,
    /// Threat detection over the audit stream (its cases back the alert API).
    pub detection: Option<custos_detect::Detection>,
    pub config: Arc<ServerConfig>,
    /// Health, readiness and metrics.
    pub ops: Arc<ops::Ops>,
}

/// Serve on an already bound listener until `shutdown` completes.
pub async fn serve(
    listener: std::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = state.config.clone();
    let ops = state.ops.clone();
    let app = router(state);
    let handle = axum_server::Handle::new();
    let h2 = handle.clone();
    tokio::spawn(async move {
        shutdown.await;
        // Readiness fails first; in-flight requests (and their audit
        // appends, which complete before a response leaves) finish.
        ops.begin_shutdown();
        h2.graceful_shutdown(Some(std::time::Duration::from_secs(10)));
    });
    listener.set_nonblocking(true)?;
    let make = app.into_make_service_with_connect_info::<SocketAddr>();
    match &config.tls {
        Some((cert, key)) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let tls = axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key).await?;
            axum_server::from_tcp_rustls(listener, tls)?
                .handle(handle)
                .serve(make)
                .await?;
        }
        None => {
            axum_server::from_tcp(listener)?
                .handle(handle)
                .serve(make)
                .await?;
        }
    }
    Ok(())
}
