//! A Custos server running inside this process on an ephemeral loopback
//! port: what the demo and the benchmark talk to over real HTTP.
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use custos_records::Records;
use custos_server::ServerConfig;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct EmbeddedServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl EmbeddedServer {
    /// Serve `records` on 127.0.0.1 (port chosen by the OS).
    pub async fn start(records: Records) -> anyhow::Result<EmbeddedServer> {
        let config = ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..ServerConfig::default()
        };
        let (bound_tx, bound_rx) = oneshot::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let on_bound = move |a| {
                let _ = bound_tx.send(a);
            };
            custos_server::serve(records, config, on_bound, async move {
                let _ = stop_rx.await;
            })
            .await
        });
        let addr = match bound_rx.await {
            Ok(a) => a,
            Err(_) => {
                return Err(match task.await {
                    Ok(Err(e)) => e.context("the server did not start"),
                    _ => anyhow::anyhow!("the server did not start"),
                });
            }
        };
        Ok(EmbeddedServer {
            addr,
            stop: Some(stop_tx),
            task,
        })
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
        match tokio::time::timeout(Duration::from_secs(15), &mut self.task).await {
            Ok(Ok(r)) => r.context("the server failed"),
            Ok(Err(e)) => Err(anyhow::anyhow!("the server task failed: {e}")),
            Err(_) => {
                self.task.abort();
                bail!("the server did not stop within 15 s")
            }
        }
    }
}
