//! The audit stream on NATS JetStream.
//!
//! Committed audit events (sealed leaves, exactly as the Merkle log stores
//! them) are published, in index order, to one subject of a JetStream
//! stream by a [`Publisher`] that reads the log behind the requests: a
//! request only appends to the store, and an unreachable NATS delays the
//! stream, never a request. Each message carries its audit index as
//! `Nats-Msg-Id` (JetStream drops a re-publication within the
//! de-duplication window) and as `Custos-Audit-Index`; each publication
//! also states the subject's last sequence it expects, so the stream holds
//! the log's leaves in order without gaps even across reconnections and
//! restarts.
//!
//! Detection reads the stream through a durable pull consumer
//! ([`StreamSource`], an [`custos_detect::EventSource`]): every node's
//! events reach the one pipeline that runs, and acknowledgements follow the
//! pipeline's saves of its cursor, so a crash redelivers rather than loses.
//!
//! No HTTP here; the figures ([`PublisherStats`]) are for the metrics
//! endpoint.
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::stream::{DiscardPolicy, RetentionPolicy, StorageType};

mod config;
mod publisher;
mod source;

pub use config::StreamConfig;
pub use publisher::{Publisher, PublisherHandle, PublisherStats};
pub use source::StreamSource;

/// The header carrying a message's audit index (also its `Nats-Msg-Id`).
pub const INDEX_HEADER: &str = "Custos-Audit-Index";

/// How long a JetStream request or publish acknowledgement may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of the audit stream: one line each, never PHI.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// A bad setting.
    #[error("{0}")]
    Config(String),
    /// NATS or JetStream failed or is unreachable.
    #[error("audit stream: {0}")]
    Nats(String),
    /// The audit log could not be read.
    #[error("audit log: {0}")]
    Log(String),
}

pub(crate) fn nats(what: &str, e: impl std::fmt::Display) -> StreamError {
    StreamError::Nats(format!("{what}: {e}"))
}

/// The JetStream context over a client, with bounded request times.
pub(crate) fn context(client: async_nats::Client) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(REQUEST_TIMEOUT)
        .ack_timeout(REQUEST_TIMEOUT)
        .build(client)
}

/// The audit index a message carries, if it is one of ours.
pub(crate) fn index_of(headers: Option<&async_nats::HeaderMap>) -> Option<u64> {
    headers?.get(INDEX_HEADER)?.as_str().parse().ok()
}

/// Get the stream, creating it if needed: file storage, kept without limit
/// (the log is the record; the stream is its transport), the
/// de-duplication window of the settings.
pub(crate) async fn ensure_stream(
    js: &jetstream::Context,
    config: &StreamConfig,
) -> Result<jetstream::stream::Stream, StreamError> {
    let wanted = jetstream::stream::Config {
        name: config.stream.clone(),
        description: Some("Custos audit events: sealed leaves, one message per audit index".into()),
        subjects: vec![config.subject.clone()],
        storage: StorageType::File,
        retention: RetentionPolicy::Limits,
        discard: DiscardPolicy::Old,
        duplicate_window: config.duplicate_window(),
        num_replicas: config.replicas,
        ..Default::default()
    };
    let stream = js.get_or_create_stream(wanted).await.map_err(|e| {
        nats(
            &format!("cannot open or create stream {}", config.stream),
            e,
        )
    })?;
    let subjects = &stream.cached_info().config.subjects;
    if !subjects.contains(&config.subject) {
        return Err(StreamError::Config(format!(
            "stream {} exists but does not take subject {} (it takes {})",
            config.stream,
            config.subject,
            subjects.join(", ")
        )));
    }
    Ok(stream)
}
