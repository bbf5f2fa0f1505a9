//! What only the node that leads runs, started and stopped as leadership
//! comes and goes: the audit stream's publisher and the detection pipeline.
//!
//! Every `custos serve` campaigns for the audit trail's leader role (a
//! PostgreSQL advisory lock on a shared database; always won on the
//! embedded store). The winner signs checkpoints (`custos-audit`) and runs
//! these duties; the others serve requests and answer the alert API from
//! the cases the leader stores. When the leader dies, its database session
//! ends, the lock is free, and the next campaign (within a second) hands
//! the duties to another node, which resumes detection from the saved
//! state and the publisher from the stream's last message.
use std::sync::Arc;

use custos_audit::AuditTrail;
use custos_detect::{Detection, Source};
use custos_stream::{PublisherHandle, StreamConfig};

/// The duties of this node and the task that follows leadership.
pub struct Duties {
    state: Arc<tokio::sync::Mutex<State>>,
    follow: tokio::task::JoinHandle<()>,
}

struct State {
    trail: AuditTrail,
    detection: Option<Detection>,
    stream: Option<StreamConfig>,
    publisher: Option<PublisherHandle>,
    leading: bool,
    /// Set at shutdown: leadership changes no longer start anything.
    closed: bool,
}

impl State {
    async fn lead(&mut self) {
        if self.leading || self.closed {
            return;
        }
        self.leading = true;
        if let Some(c) = &self.stream {
            match custos_stream::Publisher::start(self.trail.clone(), c.clone()).await {
                Ok(p) => self.publisher = Some(p),
                Err(e) => tracing::error!(error = %e, "the audit stream publisher did not start"),
            }
        }
        if let Some(d) = &self.detection {
            let source = match &self.stream {
                Some(c) => {
                    match custos_stream::StreamSource::open(self.trail.clone(), c.clone()).await {
                        Ok(s) => Source::External(Box::new(s)),
                        Err(e) => {
                            // The log holds every event too: judge from it
                            // rather than not at all.
                            tracing::error!(error = %e, "the audit stream cannot be read; detection reads the audit log");
                            Source::Log
                        }
                    }
                }
                None => Source::Log,
            };
            match d.resume(source).await {
                Ok(()) => tracing::info!("this node runs threat detection"),
                Err(e) => tracing::error!(error = %e, "threat detection did not start"),
            }
        }
    }

    async fn resign(&mut self) {
        if !self.leading {
            return;
        }
        self.leading = false;
        if let Some(d) = &self.detection
            && let Err(e) = d.stop().await
        {
            tracing::error!(error = %e, "the detection state could not be saved");
        }
        if let Some(p) = self.publisher.take() {
            p.stop().await;
        }
        tracing::warn!("this node no longer leads: detection and the audit stream stopped here");
    }
}

impl Duties {
    /// Follow the trail's leadership: run the duties while this node leads.
    /// `detection` is the (passive) instance the alert API also uses.
    pub async fn follow(
        trail: AuditTrail,
        detection: Option<Detection>,
        stream: Option<StreamConfig>,
    ) -> Duties {
        if stream.is_some() {
            tracing::info!(
                "audit events are published to the JetStream audit stream by the leader; its detection reads the stream"
            );
        }
        let mut leadership = trail.leadership();
        let state = Arc::new(tokio::sync::Mutex::new(State {
            trail,
            detection,
            stream,
            publisher: None,
            leading: false,
            closed: false,
        }));
        let s = state.clone();
        let follow = tokio::spawn(async move {
            loop {
                let leading = *leadership.borrow_and_update();
                {
                    let mut st = s.lock().await;
                    if leading {
                        st.lead().await;
                    } else {
                        st.resign().await;
                    }
                }
                if leadership.changed().await.is_err() {
                    break;
                }
            }
        });
        Duties { state, follow }
    }

    /// At shutdown, first: stop following leadership and stop detection
    /// (its state saved, the stream acknowledged), after it caught up.
    pub async fn stop_detection(&self) {
        self.follow.abort();
        let mut st = self.state.lock().await;
        st.closed = true;
        if let Some(d) = &st.detection
            && d.is_running()
        {
            if !d.caught_up(std::time::Duration::from_secs(5)).await {
                tracing::warn!(
                    "detection had not judged every event at shutdown; it resumes on start"
                );
            }
            if let Err(e) = d.stop().await {
                tracing::error!(error = %e, "the detection state could not be saved");
            }
        }
    }

    /// At shutdown, last (after the final events are committed): stop the publisher.
    pub async fn stop_publisher(&self) {
        let publisher = self.state.lock().await.publisher.take();
        if let Some(p) = publisher {
            p.stop().await;
        }
    }
}
