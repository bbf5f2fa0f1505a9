//! Synthetic patient data: realistic, deterministic FHIR R4 transaction
//! Bundles in the style Synthea writes them (`urn:uuid:` full URLs,
//! conditional references to practitioners and organizations, `POST`
//! entries), used by `custos synth`, the demo, the benchmarks and the threat
//! simulator. The same seed always gives the same data.
//!
//! * [`Synth::directory_bundle`] creates a fixed directory of 23
//!   Organizations (16 hospitals and clinics, 7 payers; identifier system
//!   `https://github.com/synthetichealth/synthea`) and 100 Practitioners
//!   (identifier system `http://hl7.org/fhir/sid/us-npi`), each entry with
//!   `ifNoneExist` on its identifier. It does not depend on the seed or on the
//!   number of patients, so it can be loaded once and shared.
//! * [`Synth::patient`] creates one patient's bundle. Entries reference each
//!   other by `urn:uuid:` and the directory by conditional references such
//!   as `Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|1234567893`.
//!   Medical record numbers and SSNs are unique for indexes below 10⁸ and
//!   10⁶ respectively.
use rand::{Rng, RngCore};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

/// Builds a JSON object, moving the values in (unlike `serde_json::json!`,
/// which serializes interpolated values, deep-copying any `Value`).
macro_rules! obj {
    ($($k:literal : $v:expr),* $(,)?) => {{
        let mut map = serde_json::Map::with_capacity(0 $(+ { let _ = $k; 1 })*);
        $( map.insert(String::from($k), serde_json::Value::from($v)); )*
        serde_json::Value::Object(map)
    }};
}

mod codes;
mod directory;
mod names;
mod patient;
mod time;

use directory::Directory;
use names::{ENGLISH, ORIGINS, Origin};

/// What to generate.
#[derive(Debug, Clone, Copy)]
pub struct SynthConfig {
    /// Number of patients (the number of patient bundles iteration yields).
    pub patients: usize,
    /// Seed of all randomness; the same seed gives the same data.
    pub seed: u64,
    /// Clinical detail per patient: `Full` (encounters, vitals, labs,
    /// conditions, medications, allergies, procedures, care team, coverage,
    /// device) or `DemographicsOnly` (the Patient alone, for search benchmarks at scale).
    pub detail: Detail,
}

/// How much to generate per patient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detail {
    /// The Patient and its clinical record (about 60 entries on average).
    Full,
    /// The Patient resource alone. The Patient is identical to the one
    /// `Full` generates for the same seed and index.
    DemographicsOnly,
}

/// The identifying facts of one generated patient, so that tests can look
/// for them (for example in the raw database files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatientFacts {
    /// Official family name (`name[0].family`).
    pub family: String,
    /// First given name (`name[0].given[0]`).
    pub given: String,
    /// Medical record number (identifier value).
    pub mrn: String,
    /// US SSN, `999-xx-xxxx` (never a real number).
    pub ssn: String,
    /// `YYYY-MM-DD`.
    pub birth_date: String,
    /// Phone number as written in `telecom`.
    pub phone: String,
    /// `address[0].postalCode` (5 digits).
    pub postal_code: String,
}

/// The generator. Iterating yields transaction Bundles: first one bundle of
/// the shared directory (Organizations and Practitioners, created with
/// `ifNoneExist` on their identifiers), then one bundle per patient whose
/// entries reference the directory conditionally
/// (`Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|…`) and each
/// other through `urn:uuid:` full URLs.
///
/// `Synth` is `Sync`: [`Synth::patient`] may be called from several threads.
pub struct Synth {
    config: SynthConfig,
    directory: Directory,
    /// Iteration cursor: 0 is the directory, `n + 1` is patient `n`.
    cursor: usize,
}

impl Synth {
    /// A generator for `config`.
    pub fn new(config: SynthConfig) -> Synth {
        Synth {
            config,
            directory: Directory::new(),
            cursor: 0,
        }
    }

    /// The configuration this generator was made with.
    pub fn config(&self) -> SynthConfig {
        self.config
    }

    /// The directory bundle (Organizations, Practitioners).
    pub fn directory_bundle(&self) -> Value {
        self.directory.bundle()
    }

    /// Patient number `index` (0-based): its transaction bundle and its facts.
    /// Deterministic in (seed, index), so patients can be generated in parallel.
    pub fn patient(&self, index: usize) -> (Value, PatientFacts) {
        patient::generate(&self.directory, self.config, index)
    }

    /// The bundles and facts of patients `0..config.patients`.
    pub fn patients(&self) -> impl Iterator<Item = (Value, PatientFacts)> + '_ {
        (0..self.config.patients).map(move |i| self.patient(i))
    }
}

impl Iterator for Synth {
    type Item = Value;

    /// The directory bundle first, then the patient bundles in index order.
    fn next(&mut self) -> Option<Value> {
        let cursor = self.cursor;
        if cursor > self.config.patients {
            return None;
        }
        self.cursor += 1;
        Some(if cursor == 0 {
            self.directory_bundle()
        } else {
            self.patient(cursor - 1).0
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = (self.config.patients + 1).saturating_sub(self.cursor);
        (left, Some(left))
    }
}

impl ExactSizeIterator for Synth {}

// --- Shared random helpers ----------------------------------------------------

/// Administrative gender (Synthea generates only these two).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Gender {
    Male,
    Female,
}

impl Gender {
    pub(crate) fn code(self) -> &'static str {
        match self {
            Gender::Male => "male",
            Gender::Female => "female",
        }
    }
}

/// A uniformly chosen element.
pub(crate) fn pick<'a, T>(rng: &mut ChaCha8Rng, items: &'a [T]) -> &'a T {
    &items[rng.random_range(0..items.len())]
}

/// A uniformly chosen name.
pub(crate) fn pick_str(rng: &mut ChaCha8Rng, items: &'static [&'static str]) -> &'static str {
    items[rng.random_range(0..items.len())]
}

/// A version-4 UUID drawn from the seeded generator.
pub(crate) fn rng_uuid(rng: &mut ChaCha8Rng) -> uuid::Uuid {
    let mut bytes = [0u8; 16];
    rng.fill_bytes(&mut bytes);
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}

/// An origin, chosen by weight.
pub(crate) fn pick_origin(rng: &mut ChaCha8Rng) -> &'static Origin {
    let total: u32 = ORIGINS.iter().map(|o| o.weight).sum();
    let mut r = rng.random_range(0..total);
    for origin in ORIGINS {
        if r < origin.weight {
            return origin;
        }
        r -= origin.weight;
    }
    &ORIGINS[0]
}

/// A given name from `origin` (or, sometimes, an English one).
pub(crate) fn pick_given(rng: &mut ChaCha8Rng, origin: &Origin, gender: Gender) -> &'static str {
    let origin = if origin.language != ENGLISH && rng.random_bool(0.15) {
        &ORIGINS[0]
    } else {
        origin
    };
    match gender {
        Gender::Male => pick_str(rng, origin.male),
        Gender::Female => pick_str(rng, origin.female),
    }
}

/// A (family, given) pair of a coherent origin.
pub(crate) fn pick_person_name(
    rng: &mut ChaCha8Rng,
    gender: Gender,
) -> (&'static str, &'static str) {
    let origin = pick_origin(rng);
    let family = *pick(rng, origin.family);
    (family, pick_given(rng, origin, gender))
}

/// A normally distributed number (Box–Muller).
pub(crate) fn gaussian(rng: &mut ChaCha8Rng, mean: f64, sd: f64) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    mean + sd * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// SplitMix64 finalizer: a fast, well-mixing bijection on `u64`.
pub(crate) const fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests;
