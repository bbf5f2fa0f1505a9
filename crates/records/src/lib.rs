//! The Custos record service: FHIR R4 interactions over sealed storage.
//!
//! Every write passes through here: validate, stamp `meta`, derive the
//! patient compartment (which decides the data key), compute blind index
//! rows, seal the body with AES-256-GCM (associated data binds type, id,
//! version and key name) and hand sealed bytes to the store. Every read
//! comes back through here to be opened. This crate knows FHIR, keys and
//! the store; it knows nothing of HTTP.

mod access;
mod bundles;
mod capability;
mod handover;
mod index;
mod keys;
mod relations;
mod search;
mod service;
mod transaction;

pub use access::{
    Change, Guard, Interaction, Unrestricted, Visibility, WriteAudit, compartment_of_key,
    focus_patient,
};
pub use capability::capability_statement;
pub use index::{PREFIX_MAX, blind_date, range_pkey};
pub use keys::{KeyService, SHARED_KEY_NAME, patient_key_name};
pub use relations::{CARE_TEAM, CONSENT_TYPE, ENCOUNTER, GENERAL_PRACTITIONER, RELATION_TYPES};
pub use service::{Opened, RawVersion, Records, RecordsConfig, new_id};
