//! The detection pipeline's source on the audit stream: a durable pull
//! consumer whose acknowledgements follow the pipeline's saves.
use std::collections::VecDeque;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy};
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use custos_audit::AuditTrail;
use custos_detect::{EventSource, SealedEvent, SourceError};
use futures_util::{FutureExt, StreamExt};

use crate::{StreamConfig, StreamError, ensure_stream, index_of, nats};

/// Messages asked for per pull request.
const PULL_BATCH: usize = 512;
/// The server's idle heartbeat on a waiting pull request (a silent
/// connection is noticed after two missed ones).
const HEARTBEAT: Duration = Duration::from_secs(5);
/// How long one pull request waits on the server.
const PULL_EXPIRES: Duration = Duration::from_secs(30);

/// Reads the audit stream for the detection pipeline, through the durable
/// consumer of the settings.
///
/// The consumer acknowledges with [`AckPolicy::All`]: the pipeline judges
/// strictly in index order and saves a cursor (a high-water mark), so one
/// acknowledgement of the last message below the saved cursor covers every
/// message before it; explicit acknowledgements would keep a handle per
/// message until each save for no gain. Acknowledgements come only after a
/// save (every `6 × detect.save_secs`), so `max_ack_pending` is unlimited
/// (a long pause between acknowledgements never stops delivery) and
/// `ack_wait` is long (`stream.ack_wait_secs`; a redelivery after it is
/// harmless, being below the cursor, and skipped).
///
/// The pipeline's cursor is the authority on what was judged: when asked
/// from an index other than where the last delivery stopped (at the start,
/// after an error, after a lost connection), the source positions the
/// consumer at that index's stream sequence at once, rather than waiting
/// `ack_wait` for the server to redeliver what a lost connection dropped.
/// Indexes the stream lacks (a stream purged or recreated) are read from
/// the audit log, with a warning.
pub struct StreamSource {
    trail: AuditTrail,
    config: StreamConfig,
    js: jetstream::Context,
    messages: Option<pull::Stream>,
    /// The next index to deliver, where the last delivery stopped.
    position: Option<u64>,
    /// The consumer must be positioned again before the next delivery.
    reposition: bool,
    /// A gap was seen at this index; if it is still there after
    /// repositioning, the stream lacks those indexes.
    gap_at: Option<u64>,
    /// Indexes from `position` up to this one come from the log.
    log_until: Option<u64>,
    /// The last message of each delivery (its payload dropped), to
    /// acknowledge once the pipeline saves past it.
    unacked: VecDeque<(u64, jetstream::Message)>,
}

impl StreamSource {
    /// A source over the stream of `config`, opening leaves' gaps from
    /// `trail`. Returns at once: the connection is made, and remade, in the
    /// background. Fails only on bad settings.
    pub async fn open(
        trail: AuditTrail,
        config: StreamConfig,
    ) -> Result<StreamSource, StreamError> {
        let client = config.connect("custos-detect").await?;
        Ok(StreamSource {
            trail,
            js: crate::context(client),
            config,
            messages: None,
            position: None,
            reposition: true,
            gap_at: None,
            log_until: None,
            unacked: VecDeque::new(),
        })
    }

    /// The next events from `from` on (see [`EventSource::next`]).
    pub async fn next_events(
        &mut self,
        from: u64,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<SealedEvent>, StreamError> {
        let max = max.max(1);
        if self.position != Some(from) {
            self.reposition = true;
            self.log_until = None;
        }
        if let Some(end) = self.log_until {
            if from < end {
                return self.read_log(from, end, max).await;
            }
            self.log_until = None;
            self.reposition = true;
        }
        if self.reposition || self.messages.is_none() {
            self.position_consumer(from).await?;
        }
        let Some(messages) = self.messages.as_mut() else {
            return Err(StreamError::Nats("the consumer is not open".into()));
        };
        let deadline = tokio::time::Instant::now() + wait;
        let mut out: Vec<SealedEvent> = Vec::new();
        let mut last: Option<(u64, jetstream::Message)> = None;
        let mut failure = None;
        let mut gap = false;
        while out.len() < max {
            // Wait for the first; then take only what is already here.
            let item = if out.is_empty() && last.is_none() {
                match tokio::time::timeout_at(deadline, messages.next()).await {
                    Ok(item) => item,
                    Err(_) => break,
                }
            } else {
                match messages.next().now_or_never() {
                    Some(item) => item,
                    None => break,
                }
            };
            let mut message = match item {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    failure = Some(nats("reading the consumer", e));
                    break;
                }
                None => {
                    failure = Some(StreamError::Nats("the consumer's delivery ended".into()));
                    break;
                }
            };
            let Some(index) = index_of(message.message.headers.as_ref()) else {
                tracing::warn!(
                    subject = %message.message.subject,
                    "a message without an audit index on the audit stream was skipped"
                );
                continue;
            };
            let expected = from + out.len() as u64;
            if index > expected {
                gap = true;
                if self.gap_at == Some(expected) {
                    // Still missing after repositioning: the stream lacks
                    // them. They come from the log, then the stream again.
                    tracing::warn!(
                        from = expected,
                        to = index,
                        "the audit stream lacks these audit indexes; they are read from the audit log"
                    );
                    self.gap_at = None;
                    self.log_until = Some(index);
                } else {
                    self.gap_at = Some(expected);
                    self.reposition = true;
                }
                break;
            }
            if index == expected {
                out.push(SealedEvent {
                    index,
                    leaf: message.message.payload.to_vec(),
                });
            }
            // Below `expected`: delivered again; skipped, but acknowledged
            // with the rest.
            message.message.payload = bytes::Bytes::new();
            message.message.headers = None;
            last = Some((index, message));
        }
        if let Some(l) = last {
            self.unacked.push_back(l);
        }
        if !out.is_empty() && !gap {
            self.gap_at = None;
        }
        self.position = Some(from + out.len() as u64);
        if let Some(e) = failure {
            self.messages = None;
            self.reposition = true;
            if out.is_empty() {
                return Err(e);
            }
            tracing::debug!(error = %e, "the audit stream consumer stopped; it is positioned again");
        }
        Ok(out)
    }

    /// Everything below `cursor` is saved: acknowledge the last delivered
    /// message below it (and so, with [`AckPolicy::All`], all before it).
    pub async fn acknowledge(&mut self, cursor: u64) -> Result<(), StreamError> {
        let mut best = None;
        while self.unacked.front().is_some_and(|(i, _)| *i < cursor) {
            best = self.unacked.pop_front();
        }
        if let Some((_, m)) = best {
            m.ack()
                .await
                .map_err(|e| nats("cannot acknowledge the audit stream", e))?;
        }
        Ok(())
    }

    /// Serve `from..end` (at most `max`) from the audit log.
    async fn read_log(
        &mut self,
        from: u64,
        end: u64,
        max: usize,
    ) -> Result<Vec<SealedEvent>, StreamError> {
        let rows = self
            .trail
            .entries(from, end, max)
            .await
            .map_err(|e| StreamError::Log(e.to_string()))?;
        let mut out = Vec::with_capacity(rows.len());
        for (i, row) in rows.into_iter().enumerate() {
            if row.index != from + i as u64 {
                break;
            }
            out.push(SealedEvent {
                index: row.index,
                leaf: row.data,
            });
        }
        if out.is_empty() {
            return Err(StreamError::Log(format!(
                "audit index {from} is neither in the audit stream nor in the audit log"
            )));
        }
        self.position = Some(from + out.len() as u64);
        Ok(out)
    }

    /// The stream sequence to deliver from for index `from`, as a delivery
    /// policy. The stream holds consecutive indexes (each publication
    /// expects the previous one), so it is computed from the last message
    /// and checked; if the check fails, delivery starts at the beginning
    /// and what was judged is skipped.
    async fn start_for(
        &self,
        stream: &jetstream::stream::Stream,
        from: u64,
    ) -> Result<(DeliverPolicy, u64), StreamError> {
        let last = match stream
            .get_last_raw_message_by_subject(&self.config.subject)
            .await
        {
            Ok(m) => m,
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {
                return Ok((DeliverPolicy::All, 1));
            }
            Err(e) => return Err(nats("cannot read the stream's last message", e)),
        };
        let Some(last_index) = index_of(Some(&last.headers)) else {
            return Ok((DeliverPolicy::All, 1));
        };
        let at = |seq: u64| {
            (
                DeliverPolicy::ByStartSequence {
                    start_sequence: seq,
                },
                seq,
            )
        };
        if from > last_index {
            return Ok(at(last.sequence + 1));
        }
        let back = last_index - from;
        if back < last.sequence {
            let seq = last.sequence - back;
            if let Ok(m) = stream.get_raw_message(seq).await
                && index_of(Some(&m.headers)) == Some(from)
            {
                return Ok(at(seq));
            }
        }
        Ok((DeliverPolicy::All, 1))
    }

    /// Position the durable consumer to deliver index `from` next: kept if
    /// it already would (nothing outstanding, next delivery there), else
    /// made again there.
    async fn position_consumer(&mut self, from: u64) -> Result<(), StreamError> {
        self.messages = None;
        self.unacked.clear();
        let stream = ensure_stream(&self.js, &self.config).await?;
        let (deliver_policy, start) = self.start_for(&stream, from).await?;
        let name = self.config.consumer.as_str();
        let keep = match stream.consumer_info(name).await {
            Ok(info) => {
                let keep = info.num_ack_pending == 0
                    && info.delivered.stream_sequence + 1 == start
                    && info.config.ack_policy == AckPolicy::All
                    && info.config.filter_subject == self.config.subject
                    && info.config.ack_wait == self.config.ack_wait()
                    && info.config.max_ack_pending == -1;
                if !keep {
                    stream
                        .delete_consumer(name)
                        .await
                        .map_err(|e| nats(&format!("cannot reposition consumer {name}"), e))?;
                }
                keep
            }
            Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => false,
            Err(e) => return Err(nats(&format!("cannot read consumer {name}"), e)),
        };
        let consumer: jetstream::consumer::PullConsumer = if keep {
            stream
                .get_consumer(name)
                .await
                .map_err(|e| nats(&format!("cannot open consumer {name}"), e))?
        } else {
            stream
                .create_consumer(pull::Config {
                    durable_name: Some(name.to_string()),
                    description: Some("Custos detection: the pipeline's cursor leads; acknowledged after each save".into()),
                    filter_subject: self.config.subject.clone(),
                    deliver_policy,
                    ack_policy: AckPolicy::All,
                    ack_wait: self.config.ack_wait(),
                    max_deliver: -1,
                    max_ack_pending: -1,
                    ..Default::default()
                })
                .await
                .map_err(|e| nats(&format!("cannot create consumer {name}"), e))?
        };
        let messages = consumer
            .stream()
            .max_messages_per_batch(PULL_BATCH)
            .heartbeat(HEARTBEAT)
            .expires(PULL_EXPIRES)
            .messages()
            .await
            .map_err(|e| nats(&format!("cannot read consumer {name}"), e))?;
        self.messages = Some(messages);
        self.position = Some(from);
        self.reposition = false;
        Ok(())
    }
}

#[async_trait::async_trait]
impl EventSource for StreamSource {
    async fn next(
        &mut self,
        from: u64,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<SealedEvent>, SourceError> {
        self.next_events(from, max, wait)
            .await
            .map_err(|e| SourceError(e.to_string()))
    }

    async fn saved(&mut self, cursor: u64) -> Result<(), SourceError> {
        self.acknowledge(cursor)
            .await
            .map_err(|e| SourceError(e.to_string()))
    }
}
