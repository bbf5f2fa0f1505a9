//! Custos audit trail: every request becomes an AuditEvent, sealed, and a
//! leaf of an append-only RFC 6962 Merkle log with signed C2SP checkpoints
//! that anyone holding the public key can verify. No HTTP here.

pub mod checkpoint;
pub mod merkle;
pub mod tiles;
pub mod verify;

pub use checkpoint::{CheckpointError, LogSigner, SignedCheckpoint, open_checkpoint};
pub use merkle::{Frontier, Hash32, MerkleError, NodeSource};
pub use verify::{Report, Verifier, VerifyFailure};

pub mod event;
pub mod trail;

pub use event::{Agent, AuditRecord, Decision, Entity, EventKind, Leaf, Position, to_audit_event};
pub use trail::{AuditConfig, AuditError, AuditTrail, Issued, RequestWrites};
