//! A Custos server running inside this process on an ephemeral loopback
//! port: what the demo and the benchmark talk to over real HTTP.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use custos_auth::{AuthConfig, AuthService};
use custos_detect::DetectConfig;
use custos_records::Records;
use custos_server::{Access, AppState, ServerConfig};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct EmbeddedServer {
    pub addr: SocketAddr,
    /// The identity service (absent only for the benchmark's no-authentication baseline).
    pub auth: Option<Arc<AuthService>>,
    /// The audit trail (absent only in the benchmark's audit-off runs).
    pub audit: Option<custos_audit::AuditTrail>,
    /// Threat detection (on whenever authentication is).
    pub detection: Option<custos_detect::Detection>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

/// A listener on 127.0.0.1 at a port the OS chooses, its address, and the
/// server settings that serve on it.
fn bind_loopback() -> anyhow::Result<(std::net::TcpListener, SocketAddr, ServerConfig)> {
    let listener = std::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .context("cannot bind a loopback port")?;
    let addr = listener.local_addr()?;
    let config = ServerConfig {
        listen: addr,
        ..ServerConfig::default()
    };
    Ok((listener, addr, config))
}

impl EmbeddedServer {
    /// Serve `records` on 127.0.0.1 (port chosen by the OS) with
    /// authentication and the audit trail; `None` serves without
    /// authentication, and without an audit trail unless `audit` is given
    /// (benchmark baselines only).
    pub async fn start(
        records: Records,
        auth: Option<AuthConfig>,
        audit: Option<custos_audit::AuditConfig>,
    ) -> anyhow::Result<EmbeddedServer> {
        Self::start_with(records, auth, audit, Some(DetectConfig::default())).await
    }

    /// [`EmbeddedServer::start`] with detection settings (`None`: no detection).
    pub async fn start_with(
        records: Records,
        auth: Option<AuthConfig>,
        audit: Option<custos_audit::AuditConfig>,
        detect: Option<DetectConfig>,
    ) -> anyhow::Result<EmbeddedServer> {
        Self::start_node(records, auth, audit, detect, None).await
    }

    /// [`EmbeddedServer::start_with`] naming `issuer` in its tokens instead
    /// of its own address: one node of several behind one public address.
    pub async fn start_node(
        records: Records,
        auth: Option<AuthConfig>,
        audit: Option<custos_audit::AuditConfig>,
        detect: Option<DetectConfig>,
        issuer: Option<String>,
    ) -> anyhow::Result<EmbeddedServer> {
        let (listener, addr, config) = bind_loopback()?;
        let audit = match (&auth, audit) {
            (Some(_), a) | (None, a @ Some(_)) => Some(
                custos_audit::AuditTrail::open(&records, a.unwrap_or_default())
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
            ),
            (None, None) => None,
        };
        let auth = match (auth, &audit) {
            (Some(c), Some(trail)) => Some(Arc::new(
                AuthService::open(
                    &records,
                    c,
                    &issuer.unwrap_or_else(|| format!("http://{addr}")),
                    trail.clone(),
                )
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?,
            )),
            _ => None,
        };
        let detection = match (&auth, detect) {
            (Some(a), Some(c)) if c.enabled => Some(
                custos_detect::Detection::start(records.clone(), a.clone(), c)
                    .await
                    .map_err(|e| anyhow::anyhow!("threat detection: {e}"))?,
            ),
            _ => None,
        };
        let state = custos_server::AppStateInner {
            detection: detection.clone(),
            audit: audit.clone(),
            records,
            access: match &auth {
                Some(a) => Access::Enforced(a.clone()),
                None => Access::OpenForBenchmark,
            },
            config: Arc::new(config),
            ops: Default::default(),
        };
        Ok(Self::serve(listener, addr, state, auth, audit, detection))
    }

    /// The benchmark's baseline beside this server: the same `records`
    /// served without authentication on another port, through this
    /// server's audit trail and watched by its detection. Its reads are
    /// then recorded and judged as this server's are (handed over to
    /// detection at commit); through an audit trail of its own, detection
    /// read each of its events back from the log and opened it, work the
    /// authenticated runs are spared, and the baseline ran slower than it
    /// should. Stopping the twin leaves the trail and detection running.
    pub fn unauthenticated_twin(&self, records: Records) -> anyhow::Result<EmbeddedServer> {
        let (listener, addr, config) = bind_loopback()?;
        let state = custos_server::AppStateInner {
            detection: self.detection.clone(),
            audit: self.audit.clone(),
            records,
            access: Access::OpenForBenchmark,
            config: Arc::new(config),
            ops: Default::default(),
        };
        Ok(Self::serve(listener, addr, state, None, None, None))
    }

    /// Serve `state` on `listener`; `audit` and `detection` are the ones
    /// this server owns (closed and stopped when it stops).
    fn serve(
        listener: std::net::TcpListener,
        addr: SocketAddr,
        state: custos_server::AppStateInner,
        auth: Option<Arc<AuthService>>,
        audit: Option<custos_audit::AuditTrail>,
        detection: Option<custos_detect::Detection>,
    ) -> EmbeddedServer {
        let state = AppState::new(state);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            custos_server::serve(listener, state, async move {
                let _ = stop_rx.await;
            })
            .await
        });
        EmbeddedServer {
            addr,
            auth,
            audit,
            detection,
            stop: Some(stop_tx),
            task,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stop gracefully (in-flight requests finish), waiting at most 15 s.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let r = match tokio::time::timeout(Duration::from_secs(15), &mut self.task).await {
            Ok(Ok(r)) => r.context("the server failed"),
            Ok(Err(e)) => Err(anyhow::anyhow!("the server task failed: {e}")),
            Err(_) => {
                self.task.abort();
                bail!("the server did not stop within 15 s")
            }
        };
        if let Some(d) = &self.detection
            && let Err(e) = d.stop().await
        {
            tracing::error!(error = %e, "the detection state could not be saved");
        }
        if let Some(a) = &self.audit {
            if let Err(e) = a.checkpoint().await {
                tracing::error!(error = %e, "the final audit checkpoint failed");
            }
            a.close().await;
        }
        r
    }
}
