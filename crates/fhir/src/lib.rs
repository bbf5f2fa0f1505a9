//! FHIR R4 JSON handling for Custos.
//!
//! This crate knows the FHIR data model and nothing about storage, keys or
//! HTTP. It answers: is this a valid resource, which search values does it
//! carry (driven by the official R4 SearchParameter FHIRPath expressions),
//! what does a search query mean, and does an opened resource match it.

pub mod compartment;
pub mod date;
pub mod error;
pub mod extract;
pub mod fhirpath;
pub mod normalize;
pub mod outcome;
pub mod params;
pub mod query;
pub mod types;
pub mod validate;

pub use error::{ErrorKind, FhirError};
pub use extract::IndexValue;
pub use params::{ParamKind, Registry, SearchParam, registry};
pub use query::{Clause, ClauseParam, Handling, SearchRequest, SearchValue};
