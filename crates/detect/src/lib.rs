//! Custos threat detection.
//!
//! A source → transform → sink pipeline over the audit stream: committed
//! audit events are read back in order, from the Merkle log or from the
//! stream every node's events reach (`source.rs`, `live.rs`: the source),
//! distilled and enriched with what they wrote (`observe.rs`, `facts.rs`),
//! judged by the detectors and the learned baselines (`engine.rs`,
//! `hst.rs`), and their findings become cases, responses and signed webhook
//! calls (`alerts.rs`, `live.rs`, `webhook.rs`, the sinks). No HTTP server
//! here: the server crate exposes the cases through its admin API.

pub mod alerts;
pub mod config;
pub mod engine;
pub mod facts;
pub mod hst;
pub mod live;
pub mod observe;
pub mod source;
pub mod webhook;

pub use alerts::{Case, CaseStatus, Detector, Finding, Outcome, Severity};
pub use config::{Action, DetectConfig, ResponseRule};
pub use engine::{Engine, EngineState, RegistryEntry};
pub use facts::{Facts, MemoryFacts, PatientFacts, PersonFacts, StaffFacts, Tokenizer};
pub use live::{CaseUpdate, DetectError, Detection, Stats};
pub use observe::{Access, Kind, Observed, Written};
pub use source::{EventSource, SealedEvent, Source, SourceError};
