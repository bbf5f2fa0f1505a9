//! Synthetic patient data: realistic, deterministic FHIR R4 transaction
//! Bundles in the style Synthea writes them (`urn:uuid:` full URLs,
//! conditional references to practitioners and organizations, `POST`
//! entries), used by `custos synth`, the demo, the benchmarks and the threat
//! simulator. The same seed always gives the same data.
use serde_json::Value;

/// What to generate.
#[derive(Debug, Clone, Copy)]
pub struct SynthConfig {
    pub patients: usize,
    pub seed: u64,
    /// Clinical detail per patient: `Full` (encounters, vitals, labs,
    /// conditions, medications, allergies, procedures, care team, coverage,
    /// device) or `DemographicsOnly` (the Patient alone, for search benchmarks at scale).
    pub detail: Detail,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detail {
    Full,
    DemographicsOnly,
}

/// The identifying facts of one generated patient, so that tests can look
/// for them (for example in the raw database files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatientFacts {
    pub family: String,
    pub given: String,
    /// Medical record number (identifier value).
    pub mrn: String,
    /// US SSN, `999-xx-xxxx` (never a real number).
    pub ssn: String,
    /// `YYYY-MM-DD`.
    pub birth_date: String,
    /// Phone number as written in `telecom`.
    pub phone: String,
    pub postal_code: String,
}

/// The generator. Iterating yields transaction Bundles: first one bundle of
/// the shared directory (Organizations and Practitioners, created with
/// `ifNoneExist` on their identifiers), then one bundle per patient whose
/// entries reference the directory conditionally
/// (`Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|…`) and each
/// other through `urn:uuid:` full URLs.
pub struct Synth {
    _private: (),
}

impl Synth {
    pub fn new(config: SynthConfig) -> Synth {
        let _ = config;
        todo!("HELPER")
    }

    /// The directory bundle (Organizations, Practitioners).
    pub fn directory_bundle(&self) -> Value {
        todo!("HELPER")
    }

    /// Patient number `index` (0-based): its transaction bundle and its facts.
    /// Deterministic in (seed, index), so patients can be generated in parallel.
    pub fn patient(&self, index: usize) -> (Value, PatientFacts) {
        let _ = index;
        todo!("HELPER")
    }
}
