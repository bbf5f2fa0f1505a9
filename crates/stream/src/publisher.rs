//! The publisher: reads committed leaves from the audit log and publishes
//! them, in index order, to the JetStream stream.
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::jetstream;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use bytes::Bytes;
use custos_audit::AuditTrail;
use parking_lot::Mutex;
use serde::Serialize;

use crate::{StreamConfig, StreamError, ensure_stream, index_of, nats};

/// Leaves read from the log and published before their acknowledgements are
/// awaited (in order).
const WINDOW: usize = 128;
/// How often the publisher looks at the log without a commit signal.
const POLL: Duration = Duration::from_millis(500);
/// Retry delays after an error: doubling from the first to the last.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long a stopping publisher keeps trying to publish what is committed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Figures of the publisher (for the metrics endpoint).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PublisherStats {
    /// The next audit index to publish: every index below it is stored in
    /// the stream (acknowledged by JetStream).
    pub published: u64,
    /// The size of the audit log when the publisher last looked.
    pub log_size: u64,
    /// Whether the NATS client is connected now.
    pub connected: bool,
    /// Outages (runs of failed attempts) since the start.
    pub outages: u64,
    /// The last error, one line; `None` once publishing works again.
    pub last_error: Option<String>,
}

/// Starts the publisher (see [`Publisher::start`]).
pub struct Publisher;

/// A running publisher. Dropping it stops the task too, without the final
/// catch-up of [`PublisherHandle::stop`].
pub struct PublisherHandle {
    stop: tokio::sync::watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
    stats: Arc<Mutex<PublisherStats>>,
    client: async_nats::Client,
}

impl Publisher {
    /// Start publishing `trail`'s committed leaves to the stream of
    /// `config`, from where the stream stops (its last message's audit
    /// index + 1; 0 for an empty stream). Returns at once: the connection
    /// is made, and remade, in the background. Fails only on bad settings.
    pub async fn start(
        trail: AuditTrail,
        config: StreamConfig,
    ) -> Result<PublisherHandle, StreamError> {
        let client = config.connect("custos-audit-publisher").await?;
        let stats = Arc::new(Mutex::new(PublisherStats::default()));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let run = Run {
            trail,
            js: crate::context(client.clone()),
            client: client.clone(),
            config,
            stats: stats.clone(),
            at: None,
            ahead_warned: false,
        };
        let task = tokio::spawn(run.run(stopped));
        Ok(PublisherHandle {
            stop,
            task: Some(task),
            stats,
            client,
        })
    }
}

impl PublisherHandle {
    /// The publisher's figures now.
    pub fn stats(&self) -> PublisherStats {
        let mut s = self.stats.lock().clone();
        s.connected = self.client.connection_state() == State::Connected;
        s
    }

    /// Stop: publish what is committed (for a few seconds at most, if NATS
    /// answers), then end. Whatever is left is published by the next
    /// publisher to start, from the stream's last message.
    pub async fn stop(mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take()
            && task.await.is_err()
        {
            tracing::error!("the audit stream publisher ended abnormally");
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.flush()).await;
    }
}

impl Drop for PublisherHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Where the stream stops: the next index to publish, and the sequence of
/// the subject's last message (what the next publication expects).
#[derive(Debug, Clone, Copy)]
struct Position {
    next: u64,
    last_seq: u64,
}

enum Step {
    /// Published a window of leaves; there may be more.
    Published,
    /// Nothing to publish now.
    Idle,
}

struct Run {
    trail: AuditTrail,
    js: jetstream::Context,
    client: async_nats::Client,
    config: StreamConfig,
    stats: Arc<Mutex<PublisherStats>>,
    /// `None`: read where the stream stops before publishing (at the start
    /// and after any error).
    at: Option<Position>,
    ahead_warned: bool,
}

impl Run {
    async fn run(mut self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let signal = self.trail.commit_signal();
        let mut backoff = BACKOFF_MIN;
        let mut outage = false;
        let mut deadline: Option<Instant> = None;
        loop {
            if deadline.is_none() && *stop.borrow() {
                if self.client.connection_state() != State::Connected {
                    // Nothing would get through: leave it to the next one.
                    break;
                }
                deadline = Some(Instant::now() + STOP_GRACE);
            }
            let step = match deadline {
                Some(d) => {
                    match tokio::time::timeout(
                        d.saturating_duration_since(Instant::now()),
                        self.step(),
                    )
                    .await
                    {
                        Ok(s) => s,
                        Err(_) => break,
                    }
                }
                None => self.step().await,
            };
            match step {
                Ok(step) => {
                    if outage {
                        outage = false;
                        let published = self.stats.lock().published;
                        tracing::info!(
                            published,
                            "the audit stream is reachable again; publishing resumes from the log"
                        );
                    }
                    self.stats.lock().last_error = None;
                    backoff = BACKOFF_MIN;
                    if matches!(step, Step::Published) {
                        continue;
                    }
                    if deadline.is_some() {
                        break;
                    }
                    tokio::select! {
                        _ = signal.notified() => {}
                        _ = tokio::time::sleep(POLL) => {}
                        _ = stop.changed() => {}
                    }
                }
                Err(e) => {
                    self.at = None;
                    {
                        let mut s = self.stats.lock();
                        s.last_error = Some(e.to_string());
                        if !outage {
                            s.outages += 1;
                        }
                    }
                    if deadline.is_some() {
                        tracing::warn!(error = %e, "the audit stream publisher stopped before publishing everything; the next one resumes");
                        break;
                    }
                    if outage {
                        tracing::debug!(error = %e, "the audit stream is still unavailable");
                    } else {
                        outage = true;
                        tracing::warn!(error = %e, "the audit stream is unavailable; requests go on, and events are published from the log when it returns");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// Publish the next window of committed leaves, if any.
    async fn step(&mut self) -> Result<Step, StreamError> {
        let mut pos = match self.at {
            Some(p) => p,
            None => {
                let p = self.resume_point().await?;
                self.at = Some(p);
                self.stats.lock().published = p.next;
                p
            }
        };
        let size = self
            .trail
            .size()
            .await
            .map_err(|e| StreamError::Log(e.to_string()))?;
        self.stats.lock().log_size = size;
        if pos.next >= size {
            if pos.next > size && !self.ahead_warned {
                self.ahead_warned = true;
                tracing::warn!(
                    stream = pos.next,
                    log = size,
                    "the audit stream is ahead of the audit log (another data directory's stream?); waiting for the log to reach it"
                );
            }
            return Ok(Step::Idle);
        }
        let entries = self
            .trail
            .entries(pos.next, size, WINDOW)
            .await
            .map_err(|e| StreamError::Log(e.to_string()))?;
        if entries.is_empty() {
            return Ok(Step::Idle);
        }
        // Send the window, each publication expecting the one before it as
        // the subject's last message; then take the acknowledgements in
        // order. A lost or refused publication fails every later one of the
        // window (their expectation no longer holds), so the stream never
        // holds a leaf before the one ahead of it.
        let mut pending = Vec::with_capacity(entries.len());
        let mut expect = pos.last_seq;
        for (i, e) in entries.into_iter().enumerate() {
            if e.index != pos.next + i as u64 {
                return Err(StreamError::Log(format!(
                    "the audit log returned index {} where {} was expected",
                    e.index,
                    pos.next + i as u64
                )));
            }
            let id = e.index.to_string();
            let message = PublishMessage::build()
                .payload(Bytes::from(e.data))
                .message_id(&id)
                .header(crate::INDEX_HEADER, id.as_str())
                .expected_last_subject_sequence(expect);
            let ack = self
                .js
                .send_publish(self.config.subject.clone(), message)
                .await
                .map_err(|err| nats(&format!("cannot publish audit index {}", e.index), err))?;
            expect += 1;
            pending.push((e.index, expect, ack));
        }
        for (index, seq, ack) in pending {
            let ack = ack.await.map_err(|err| match err.kind() {
                PublishErrorKind::WrongLastSequence => StreamError::Nats(format!(
                    "audit index {index} was refused: the stream's subject moved on (another publisher?); resynchronizing"
                )),
                _ => nats(&format!("publishing audit index {index} was not acknowledged"), err),
            })?;
            if ack.sequence != seq {
                return Err(StreamError::Nats(format!(
                    "audit index {index} is at stream sequence {} where {seq} was expected; resynchronizing",
                    ack.sequence
                )));
            }
            pos = Position {
                next: index + 1,
                last_seq: seq,
            };
            self.at = Some(pos);
            self.stats.lock().published = pos.next;
        }
        Ok(Step::Published)
    }

    /// Where the stream stops: after its subject's last message (its audit
    /// index + 1), or at 0 when the subject holds none.
    async fn resume_point(&self) -> Result<Position, StreamError> {
        let stream = ensure_stream(&self.js, &self.config).await?;
        match stream
            .get_last_raw_message_by_subject(&self.config.subject)
            .await
        {
            Ok(m) => {
                let index = index_of(Some(&m.headers)).ok_or_else(|| {
                    StreamError::Config(format!(
                        "the last message on {} (stream sequence {}) has no {} header: is the subject used by something else?",
                        self.config.subject,
                        m.sequence,
                        crate::INDEX_HEADER
                    ))
                })?;
                Ok(Position {
                    next: index + 1,
                    last_seq: m.sequence,
                })
            }
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(Position {
                next: 0,
                last_seq: 0,
            }),
            Err(e) => Err(nats(
                &format!(
                    "cannot read the last message of stream {}",
                    self.config.stream
                ),
                e,
            )),
        }
    }
}
