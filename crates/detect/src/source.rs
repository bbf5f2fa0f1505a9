//! Where the detection pipeline reads committed audit events from.
//!
//! The embedded default reads the audit log in this process's own store
//! ([`Source::Log`]). A deployment of several nodes instead reads a stream
//! that every node's events reach (the JetStream audit stream of
//! `custos-stream`), through the small [`EventSource`] trait, so this crate
//! knows nothing of the transport.
use std::time::Duration;

/// One committed audit event as a source delivers it: the leaf index and the
/// sealed leaf exactly as the log stores it (never clear PHI).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedEvent {
    /// The leaf index in the audit log, from 0.
    pub index: u64,
    /// The sealed leaf bytes (opened with `AuditTrail::open_leaves`).
    pub leaf: Vec<u8>,
}

/// An error of an event source: one line, no PHI.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SourceError(pub String);

/// A source of committed audit events other than the local log.
///
/// The pipeline's saved state (its cursor, the next index to judge) is the
/// authority on what was judged: the pipeline asks for events from its
/// cursor on, and tells the source when a save has made everything below a
/// cursor durable. A source delivers at least once; the pipeline skips what
/// it already judged.
#[async_trait::async_trait]
pub trait EventSource: Send + 'static {
    /// The next events from index `from` on, at most `max`, in index order
    /// and without gaps (the first is `from`), waiting up to `wait` for the
    /// first. Empty when none arrived in time. A `from` other than where the
    /// last call stopped (after an error, or a restart) means: deliver again
    /// from `from`.
    async fn next(
        &mut self,
        from: u64,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<SealedEvent>, SourceError>;

    /// The judgement of every event below `cursor` is saved: the source may
    /// acknowledge them (they will not be asked for again, barring a crash
    /// before the next save).
    async fn saved(&mut self, cursor: u64) -> Result<(), SourceError>;
}

/// Where a pipeline reads committed events from.
pub enum Source {
    /// The audit log of this process's store, woken by the trail's commit
    /// signal (the embedded default).
    Log,
    /// Another source, such as the JetStream audit stream.
    External(Box<dyn EventSource>),
}

impl Source {
    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Source::Log => "audit log",
            Source::External(_) => "event source",
        }
    }
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How long the pipeline waits for an external source's next events before
/// it looks at its timers (ticks, saves, a stop).
pub(crate) const EXTERNAL_WAIT: Duration = Duration::from_millis(250);
