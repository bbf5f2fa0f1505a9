//! One patient: demographics, then (with [`Detail::Full`]) a clinical record
//! of encounters with vitals and labs, conditions, medications, allergies,
//! procedures, a care team, a coverage and sometimes a device.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Map, Value};

use crate::codes::*;
use crate::directory::{Address, Directory, OrgKind, phone};
use crate::names::{ENGLISH, PREFIX_FEMALE, PREFIX_MALE, PREFIX_MARRIED};
use crate::time::{DAY, Tz, date, date_time, days_from_civil, instant};
use crate::{
    Detail, Gender, PatientFacts, SynthConfig, gaussian, mix64, pick, pick_given, pick_origin,
    rng_uuid,
};

/// "Today" for the generated records (fixed, for determinism).
const REF_DAY: i64 = days_from_civil(2025, 6, 30);
const BIRTH_MIN: i64 = days_from_civil(1930, 1, 1);
const BIRTH_MAX: i64 = days_from_civil(2022, 12, 31);
/// How far back clinical histories go.
const HISTORY_DAYS: i64 = 10 * 365;

/// Seed of patient `index`'s generator.
fn patient_seed(seed: u64, index: usize) -> u64 {
    mix64(seed ^ mix64((index as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93)))
}

/// Medical record number: a bijection of `index` on 8 digits.
pub(crate) fn mrn(seed: u64, index: usize) -> String {
    const N: u64 = 100_000_000;
    let v = ((index as u64 % N) * 73_939_133 + mix64(seed ^ 0x004D_524E) % N) % N;
    format!("{v:08}")
}

/// SSN `999-xx-xxxx`: a bijection of `index` on 6 digits.
pub(crate) fn ssn(seed: u64, index: usize) -> String {
    const N: u64 = 1_000_000;
    let v = ((index as u64 % N) * 387_329 + mix64(seed ^ 0x0053_534E) % N) % N;
    format!("999-{:02}-{:04}", v / 10_000, v % 10_000)
}

fn reference(r: &str) -> Value {
    obj! { "reference": r }
}

fn reference_display(r: &str, display: &str) -> Value {
    obj! { "reference": r, "display": display }
}

fn entry(full_url: &str, resource_type: &str, resource: Value) -> Value {
    obj! {
        "fullUrl": full_url,
        "resource": resource,
        "request": obj!{"method": "POST", "url": resource_type}
    }
}

fn new_urn(rng: &mut ChaCha8Rng) -> String {
    format!("urn:uuid:{}", rng_uuid(rng))
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn quantity(value: Value, unit: &str) -> Value {
    obj! {"value": value, "unit": unit, "system": UCUM, "code": unit}
}

fn decimal(x: f64) -> Value {
    Value::from(round1(x))
}

fn integer(x: f64) -> Value {
    Value::from(x.round() as i64)
}

/// Generate patient `index`.
pub(crate) fn generate(
    dir: &Directory,
    config: SynthConfig,
    index: usize,
) -> (Value, PatientFacts) {
    let mut rng = ChaCha8Rng::seed_from_u64(patient_seed(config.seed, index));
    let demo = Demographics::generate(&mut rng, dir, config.seed, index);
    let patient = demo.resource(dir);
    let facts = demo.facts();
    let mut entries = Vec::with_capacity(if config.detail == Detail::Full { 96 } else { 1 });
    entries.push(entry(&demo.urn, "Patient", patient));
    if config.detail == Detail::Full {
        Clinical::new(&mut rng, dir, &demo, &mut entries).generate();
    }
    let bundle = obj! {"resourceType": "Bundle", "type": "transaction", "entry": entries};
    (bundle, facts)
}

// --- Demographics -------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Marital {
    Married,
    Single,
    Divorced,
    Widowed,
}

impl Marital {
    fn coding(self) -> (&'static str, &'static str) {
        match self {
            Marital::Married => ("M", "Married"),
            Marital::Single => ("S", "Never Married"),
            Marital::Divorced => ("D", "Divorced"),
            Marital::Widowed => ("W", "Widowed"),
        }
    }
}

struct Demographics {
    urn: String,
    uuid: String,
    gender: Gender,
    family: &'static str,
    maiden: Option<&'static str>,
    given: &'static str,
    middle: Option<&'static str>,
    prefix: Option<&'static str>,
    birth_day: i64,
    birth_date: String,
    marital: Marital,
    mrn: String,
    ssn: String,
    drivers_license: Option<String>,
    phone: String,
    address: Address,
    apartment: Option<String>,
    language: (&'static str, &'static str),
    gp: usize,
}

impl Demographics {
    fn generate(rng: &mut ChaCha8Rng, dir: &Directory, seed: u64, index: usize) -> Demographics {
        let uuid = rng_uuid(rng);
        let gender = if rng.random_bool(0.5) {
            Gender::Female
        } else {
            Gender::Male
        };
        let origin = pick_origin(rng);
        let birth_family = *pick(rng, origin.family);
        let given = pick_given(rng, origin, gender);
        let middle = if rng.random_bool(0.3) {
            Some(pick_given(rng, origin, gender)).filter(|m| *m != given)
        } else {
            None
        };
        let birth_day = rng.random_range(BIRTH_MIN..=BIRTH_MAX);
        let age = (REF_DAY - birth_day) / 365;
        let marital = if age < 18 {
            Marital::Single
        } else {
            let r: f64 = rng.random();
            let widowed = if age >= 65 { 0.15 } else { 0.02 };
            if r < 0.5 {
                Marital::Married
            } else if r < 0.5 + widowed {
                Marital::Widowed
            } else if r < 0.62 + widowed {
                Marital::Divorced
            } else {
                Marital::Single
            }
        };
        let (family, maiden) =
            if gender == Gender::Female && marital != Marital::Single && rng.random_bool(0.6) {
                // Took a spouse's name, most often of the same origin.
                let spouse_origin = if rng.random_bool(0.7) {
                    origin
                } else {
                    pick_origin(rng)
                };
                let married = *pick(rng, spouse_origin.family);
                if married == birth_family {
                    (birth_family, None)
                } else {
                    (married, Some(birth_family))
                }
            } else {
                (birth_family, None)
            };
        let prefix = if age >= 18 && rng.random_bool(0.7) {
            Some(match (gender, marital) {
                (Gender::Male, _) => PREFIX_MALE,
                (Gender::Female, Marital::Married | Marital::Widowed) => PREFIX_MARRIED,
                (Gender::Female, _) => PREFIX_FEMALE,
            })
        } else {
            None
        };
        let drivers_license = if age >= 16 && rng.random_bool(0.8) {
            Some(format!("S99{:07}", rng.random_range(0..10_000_000u32)))
        } else {
            None
        };
        let phone = phone(rng);
        let address = Address::random(rng);
        let apartment = if rng.random_bool(0.2) {
            Some(format!(
                "{} {}",
                if rng.random_bool(0.5) { "Apt" } else { "Unit" },
                rng.random_range(1..=40u32)
            ))
        } else {
            None
        };
        let language = if origin.language != ENGLISH && rng.random_bool(0.4) {
            origin.language
        } else {
            ENGLISH
        };
        let gp = *pick(rng, &dir.clinic_practitioners);
        let uuid = uuid.to_string();
        Demographics {
            urn: format!("urn:uuid:{uuid}"),
            uuid,
            gender,
            family,
            maiden,
            given,
            middle,
            prefix,
            birth_day,
            birth_date: date(birth_day),
            marital,
            mrn: mrn(seed, index),
            ssn: ssn(seed, index),
            drivers_license,
            phone,
            address,
            apartment,
            language,
            gp,
        }
    }

    fn human_name(&self, use_: &str, family: &str) -> Value {
        let mut name = Map::with_capacity(4);
        name.insert("use".into(), use_.into());
        name.insert("family".into(), family.into());
        let given = match self.middle {
            Some(m) => Value::from([self.given, m]),
            None => Value::from([self.given]),
        };
        name.insert("given".into(), given);
        if let Some(prefix) = self.prefix {
            name.insert("prefix".into(), Value::from([prefix]));
        }
        Value::Object(name)
    }

    fn resource(&self, dir: &Directory) -> Value {
        let mut identifiers = vec![
            obj! {"system": SYNTHEA, "value": self.uuid.as_str()},
            obj! {
                "type": obj!{
                    "coding": [obj!{"system": V2_0203, "code": "MR", "display": "Medical Record Number"}],
                    "text": "Medical Record Number"
                },
                "system": MRN,
                "value": self.mrn.as_str()
            },
            obj! {
                "type": obj!{
                    "coding": [obj!{"system": V2_0203, "code": "SS", "display": "Social Security Number"}],
                    "text": "Social Security Number"
                },
                "system": SSN,
                "value": self.ssn.as_str()
            },
        ];
        if let Some(dl) = &self.drivers_license {
            identifiers.push(obj!{
                "type": obj!{
                    "coding": [obj!{"system": V2_0203, "code": "DL", "display": "Driver's license number"}],
                    "text": "Driver's license number"
                },
                "system": DRIVERS_LICENSE,
                "value": dl.as_str()
            });
        }
        let mut names = vec![self.human_name("official", self.family)];
        if let Some(maiden) = self.maiden {
            names.push(self.human_name("maiden", maiden));
        }
        let line = match &self.apartment {
            Some(apt) => Value::from([self.address.line.as_str(), apt.as_str()]),
            None => Value::from([self.address.line.as_str()]),
        };
        let (marital_code, marital_display) = self.marital.coding();
        let gp = &dir.practitioners[self.gp];
        let org = &dir.orgs[gp.org];
        obj! {
            "resourceType": "Patient",
            "extension": [obj!{
                "url": BIRTH_SEX,
                "valueCode": if self.gender == Gender::Male { "M" } else { "F" }
            }],
            "identifier": identifiers,
            "active": true,
            "name": names,
            "telecom": [obj!{"system": "phone", "value": self.phone.as_str(), "use": "home"}],
            "gender": self.gender.code(),
            "birthDate": self.birth_date.as_str(),
            "address": [obj!{
                "use": "home",
                "line": line,
                "city": self.address.city,
                "state": self.address.state,
                "postalCode": self.address.postal_code.as_str(),
                "country": "US"
            }],
            "maritalStatus": obj!{
                "coding": [obj!{"system": MARITAL, "code": marital_code, "display": marital_display}],
                "text": marital_display
            },
            "communication": [obj!{
                "language": obj!{
                    "coding": [obj!{
                        "system": "urn:ietf:bcp:47",
                        "code": self.language.0,
                        "display": self.language.1
                    }],
                    "text": self.language.1
                }
            }],
            "generalPractitioner": [reference_display(&gp.reference, &gp.display)],
            "managingOrganization": reference_display(&org.reference, &org.name)
        }
    }

    fn facts(&self) -> PatientFacts {
        PatientFacts {
            family: self.family.to_string(),
            given: self.given.to_string(),
            mrn: self.mrn.clone(),
            ssn: self.ssn.clone(),
            birth_date: self.birth_date.clone(),
            phone: self.phone.clone(),
            postal_code: self.address.postal_code.clone(),
        }
    }
}

// --- Clinical record ------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Ambulatory,
    Emergency,
    Inpatient,
}

impl Class {
    fn coding(self) -> (&'static str, &'static str) {
        match self {
            Class::Ambulatory => ("AMB", "ambulatory"),
            Class::Emergency => ("EMER", "emergency"),
            Class::Inpatient => ("IMP", "inpatient encounter"),
        }
    }
}

struct Encounter {
    urn: String,
    class: Class,
    kind: Code,
    /// Local minutes since the epoch.
    start: i64,
    end: i64,
    practitioner: usize,
    /// Conditions diagnosed at this encounter.
    diagnoses: Vec<usize>,
}

struct Diagnosis {
    urn: String,
    def: &'static ConditionDef,
    encounter: usize,
}

struct Clinical<'a> {
    rng: &'a mut ChaCha8Rng,
    dir: &'a Directory,
    demo: &'a Demographics,
    entries: &'a mut Vec<Value>,
    tz: Tz,
    encounters: Vec<Encounter>,
    diagnoses: Vec<Diagnosis>,
    /// Adult height (cm) and habitual body-mass index.
    adult_height: f64,
    bmi: f64,
    systolic: f64,
    diastolic: f64,
}

impl<'a> Clinical<'a> {
    fn new(
        rng: &'a mut ChaCha8Rng,
        dir: &'a Directory,
        demo: &'a Demographics,
        entries: &'a mut Vec<Value>,
    ) -> Clinical<'a> {
        let male = demo.gender == Gender::Male;
        let adult_height = gaussian(rng, if male { 176.0 } else { 162.5 }, 7.0).clamp(145.0, 205.0);
        let bmi = gaussian(rng, 27.5, 5.0).clamp(17.0, 48.0);
        let systolic = gaussian(rng, 118.0, 9.0);
        let diastolic = gaussian(rng, 76.0, 6.0);
        Clinical {
            rng,
            dir,
            demo,
            entries,
            tz: demo.address.tz,
            encounters: Vec::new(),
            diagnoses: Vec::new(),
            adult_height,
            bmi,
            systolic,
            diastolic,
        }
    }

    fn age_at(&self, minutes: i64) -> f64 {
        (minutes.div_euclid(DAY) - self.demo.birth_day) as f64 / 365.25
    }

    fn has(&self, def: &ConditionDef) -> bool {
        self.diagnoses
            .iter()
            .any(|d| d.def.code.code == def.code.code)
    }

    fn generate(mut self) {
        self.plan_encounters();
        self.plan_conditions();
        let penicillin_allergy = self.allergies();
        for i in 0..self.encounters.len() {
            self.encounter(i);
            for d in 0..self.encounters[i].diagnoses.len() {
                self.condition(self.encounters[i].diagnoses[d]);
            }
            self.vitals(i);
            self.labs(i);
        }
        self.medications(penicillin_allergy);
        self.procedures();
        self.care_team();
        self.coverage();
        self.device();
    }

    fn plan_encounters(&mut self) {
        let rng = &mut *self.rng;
        let first = (self.demo.birth_day + 1).max(REF_DAY - HISTORY_DAYS);
        let n = rng.random_range(3..=8usize);
        let mut days: Vec<i64> = (0..n).map(|_| rng.random_range(first..REF_DAY)).collect();
        days.sort_unstable();
        let child = |day: i64| (day - self.demo.birth_day) < 18 * 365;
        for day in days {
            let r: f64 = rng.random();
            let class = if r < 0.78 {
                Class::Ambulatory
            } else if r < 0.92 {
                Class::Emergency
            } else {
                Class::Inpatient
            };
            let (kind, start, duration, practitioner) = match class {
                Class::Ambulatory => {
                    let kind = if child(day) && rng.random_bool(0.6) {
                        WELL_CHILD
                    } else {
                        *pick(rng, &[CHECK_UP, CHECK_UP, GENERAL_EXAM, FOLLOW_UP])
                    };
                    let practitioner = if rng.random_bool(0.7) {
                        self.demo.gp
                    } else {
                        *pick(rng, &self.dir.clinic_practitioners)
                    };
                    let start = 8 * 60 + 15 * rng.random_range(0..36i64);
                    (kind, start, 15 * rng.random_range(1..=3i64), practitioner)
                }
                Class::Emergency => (
                    EMERGENCY,
                    5 * rng.random_range(0..288i64),
                    rng.random_range(60..=360i64),
                    *pick(rng, &self.dir.hospital_practitioners),
                ),
                Class::Inpatient => (
                    ADMISSION,
                    6 * 60 + 5 * rng.random_range(0..192i64),
                    rng.random_range(1..=5i64) * DAY + rng.random_range(0..600i64),
                    *pick(rng, &self.dir.hospital_practitioners),
                ),
            };
            let start = day * DAY + start;
            self.encounters.push(Encounter {
                urn: new_urn(rng),
                class,
                kind,
                start,
                end: start + duration,
                practitioner,
                diagnoses: Vec::new(),
            });
        }
    }

    fn plan_conditions(&mut self) {
        let age = self.age_at(REF_DAY * DAY);
        let obese = age >= 18.0 && self.bmi >= 30.0;
        let rng = &mut *self.rng;
        let mut defs: Vec<&'static ConditionDef> = Vec::with_capacity(6);
        if obese {
            defs.push(&OBESITY);
        }
        if age >= 30.0
            && rng.random_bool(0.06 + 0.002 * (age - 30.0) + if obese { 0.1 } else { 0.0 })
        {
            defs.push(&DIABETES);
        } else if age >= 18.0 && rng.random_bool(0.18) {
            defs.push(&PREDIABETES);
        }
        if age >= 30.0
            && rng
                .random_bool((0.08 + 0.006 * (age - 30.0) + if obese { 0.1 } else { 0.0 }).min(0.7))
        {
            defs.push(&HYPERTENSION);
        }
        if age >= 40.0 && rng.random_bool(0.2) {
            defs.push(&HYPERLIPIDEMIA);
        }
        if age >= 2.0 && rng.random_bool(0.07) {
            defs.push(&ASTHMA);
        }
        if rng.random_bool(0.04) {
            defs.push(&ANEMIA);
        }
        if age >= 18.0 && rng.random_bool(0.03) {
            defs.push(&CHRONIC_SINUSITIS);
        }
        let acute = rng
            .random_range(0..=2usize)
            .max(usize::from(defs.is_empty()));
        for _ in 0..acute {
            let def = pick(rng, ACUTE);
            if !defs.iter().any(|d| d.code.code == def.code.code) {
                defs.push(def);
            }
        }
        defs.truncate(4);
        for def in defs {
            let encounter = rng.random_range(0..self.encounters.len());
            let enc = &mut self.encounters[encounter];
            if !def.chronic && enc.class == Class::Ambulatory {
                enc.kind = SYMPTOM;
            }
            enc.diagnoses.push(self.diagnoses.len());
            self.diagnoses.push(Diagnosis {
                urn: new_urn(rng),
                def,
                encounter,
            });
        }
    }

    fn push(&mut self, urn: String, resource_type: &str, resource: Value) {
        self.entries.push(entry(&urn, resource_type, resource));
    }

    fn encounter(&mut self, i: usize) {
        let enc = &self.encounters[i];
        let prac = &self.dir.practitioners[enc.practitioner];
        let org = &self.dir.orgs[prac.org];
        let (class_code, class_display) = enc.class.coding();
        let period = obj! {
            "start": date_time(enc.start, self.tz),
            "end": date_time(enc.end, self.tz)
        };
        let mut resource = obj! {
            "resourceType": "Encounter",
            "status": "finished",
            "class": obj!{"system": ACT_CODE, "code": class_code, "display": class_display},
            "type": [enc.kind.concept()],
            "subject": reference(&self.demo.urn),
            "participant": [obj!{
                "type": [obj!{
                    "coding": [obj!{"system": PARTICIPATION, "code": "PPRF", "display": "primary performer"}],
                    "text": "primary performer"
                }],
                "period": period.clone(),
                "individual": reference_display(&prac.reference, &prac.display)
            }],
            "period": period
        };
        let map = resource.as_object_mut().expect("object");
        if !enc.diagnoses.is_empty() {
            let reasons: Vec<Value> = enc
                .diagnoses
                .iter()
                .map(|&d| self.diagnoses[d].def.code.concept())
                .collect();
            map.insert("reasonCode".into(), Value::Array(reasons));
        }
        if enc.class == Class::Inpatient {
            map.insert(
                "hospitalization".into(),
                obj! {"dischargeDisposition": obj!{
                    "coding": [obj!{
                        "system": "http://terminology.hl7.org/CodeSystem/discharge-disposition",
                        "code": "home",
                        "display": "Home"
                    }],
                    "text": "Home"
                }},
            );
        }
        map.insert(
            "serviceProvider".into(),
            reference_display(&org.reference, &org.name),
        );
        let urn = enc.urn.clone();
        self.push(urn, "Encounter", resource);
    }

    fn condition(&mut self, d: usize) {
        let diag = &self.diagnoses[d];
        let enc = &self.encounters[diag.encounter];
        let onset = date_time(enc.start, self.tz);
        let mut resource = obj! {
            "resourceType": "Condition",
            "clinicalStatus": status_concept(COND_CLINICAL, "active"),
            "verificationStatus": status_concept(COND_VER, "confirmed"),
            "category": [obj!{
                "coding": [obj!{"system": COND_CATEGORY, "code": "encounter-diagnosis", "display": "Encounter Diagnosis"}]
            }],
            "code": diag.def.code.concept(),
            "subject": reference(&self.demo.urn),
            "encounter": reference(&enc.urn),
            "onsetDateTime": onset.clone()
        };
        let map = resource.as_object_mut().expect("object");
        if !diag.def.chronic {
            let abatement = enc.start + self.rng.random_range(7..=28i64) * DAY;
            if abatement < REF_DAY * DAY {
                map.insert(
                    "clinicalStatus".into(),
                    status_concept(COND_CLINICAL, "resolved"),
                );
                map.insert(
                    "abatementDateTime".into(),
                    date_time(abatement, self.tz).into(),
                );
            }
        }
        map.insert("recordedDate".into(), onset.into());
        let urn = diag.urn.clone();
        self.push(urn, "Condition", resource);
    }

    fn observation(
        &mut self,
        laboratory: bool,
        code: &Code,
        enc: usize,
        at: i64,
        issued: i64,
        value: Value,
    ) {
        let (cat, cat_display) = if laboratory {
            ("laboratory", "Laboratory")
        } else {
            ("vital-signs", "Vital signs")
        };
        let mut resource = obj! {
            "resourceType": "Observation",
            "status": "final",
            "category": [obj!{"coding": [obj!{"system": OBS_CATEGORY, "code": cat, "display": cat_display}]}],
            "code": code.concept(),
            "subject": reference(&self.demo.urn),
            "encounter": reference(&self.encounters[enc].urn),
            "effectiveDateTime": date_time(at, self.tz),
            "issued": instant(issued, self.tz)
        };
        let map = resource.as_object_mut().expect("object");
        match value {
            Value::Array(components) => {
                map.insert("component".into(), Value::Array(components));
            }
            quantity => {
                map.insert("valueQuantity".into(), quantity);
            }
        }
        let urn = new_urn(self.rng);
        self.push(urn, "Observation", resource);
    }

    fn height_at(&self, age: f64) -> f64 {
        let mean = if self.demo.gender == Gender::Male {
            176.0
        } else {
            162.5
        };
        let child = if age < 1.0 {
            50.0 + 25.0 * age
        } else if age < 2.0 {
            75.0 + 12.0 * (age - 1.0)
        } else {
            87.0 + 6.5 * (age - 2.0)
        };
        (child * self.adult_height / mean).min(self.adult_height)
    }

    fn bmi_at(&self, age: f64) -> f64 {
        if age < 2.0 {
            17.0
        } else if age < 18.0 {
            16.0 + (self.bmi - 16.0) * (age - 2.0) / 16.0
        } else {
            self.bmi
        }
    }

    fn vitals(&mut self, i: usize) {
        let (start, class) = (self.encounters[i].start, self.encounters[i].class);
        let at = start + 5;
        let age = self.age_at(start);
        let height = self.height_at(age);
        let weight = self.bmi_at(age) * (height / 100.0).powi(2) * gaussian(self.rng, 1.0, 0.02);
        if class != Class::Emergency {
            self.observation(false, &HEIGHT, i, at, at, quantity(decimal(height), "cm"));
        }
        self.observation(false, &WEIGHT, i, at, at, quantity(decimal(weight), "kg"));
        if class != Class::Emergency && age >= 2.0 {
            let bmi = weight / (height / 100.0).powi(2);
            self.observation(false, &BMI, i, at, at, quantity(decimal(bmi), "kg/m2"));
        }
        let base_hr = if age < 12.0 { 110.0 - 3.5 * age } else { 72.0 };
        let hr = gaussian(self.rng, base_hr, 8.0).clamp(45.0, 170.0);
        self.observation(false, &HEART_RATE, i, at, at, quantity(integer(hr), "/min"));
        let base_rr = if age < 12.0 { 30.0 - 1.2 * age } else { 15.0 };
        let rr = gaussian(self.rng, base_rr, 2.0).clamp(10.0, 45.0);
        self.observation(false, &RESP_RATE, i, at, at, quantity(integer(rr), "/min"));
        let fever = class == Class::Emergency && self.rng.random_bool(0.3);
        let temp = if fever {
            self.rng.random_range(38.0..39.8)
        } else {
            gaussian(self.rng, 36.8, 0.25)
        };
        self.observation(false, &BODY_TEMP, i, at, at, quantity(decimal(temp), "Cel"));
        if age >= 3.0 {
            let hypertensive = self.has(&HYPERTENSION);
            let lift = 0.35 * (age - 30.0).max(0.0) + if hypertensive { 22.0 } else { 0.0 };
            let child = if age < 18.0 { (18.0 - age) * 2.0 } else { 0.0 };
            let sys = gaussian(self.rng, self.systolic + lift - child, 6.0).clamp(80.0, 210.0);
            let dia = gaussian(self.rng, self.diastolic + lift * 0.4 - child * 0.6, 4.0)
                .clamp(45.0, 130.0);
            let components = Value::from([
                obj! {"code": SYSTOLIC.concept(), "valueQuantity": quantity(integer(sys), "mm[Hg]")},
                obj! {"code": DIASTOLIC.concept(), "valueQuantity": quantity(integer(dia), "mm[Hg]")},
            ]);
            self.observation(false, &BP_PANEL, i, at, at, components);
        }
        if class != Class::Ambulatory || self.has(&ASTHMA) {
            let spo2 = self.rng.random_range(93.0..100.0f64);
            self.observation(
                false,
                &OXYGEN_SATURATION,
                i,
                at,
                at,
                quantity(decimal(spo2), "%"),
            );
        }
        if age >= 12.0 && class != Class::Inpatient {
            let acute = !self.encounters[i].diagnoses.is_empty() || class == Class::Emergency;
            let pain = if acute {
                self.rng.random_range(2..=9i64)
            } else {
                self.rng.random_range(0..=3i64)
            };
            self.observation(false, &PAIN, i, at, at, quantity(pain.into(), "{score}"));
        }
    }

    fn labs(&mut self, i: usize) {
        let enc = &self.encounters[i];
        let (start, class) = (enc.start, enc.class);
        let age = self.age_at(start);
        let diagnosed: Vec<&'static str> = enc
            .diagnoses
            .iter()
            .map(|&d| self.diagnoses[d].def.code.code)
            .collect();
        let diagnosed_here = |def: &ConditionDef| diagnosed.contains(&def.code.code);
        let at = start + 10;
        let issued = at + self.rng.random_range(60..=240i64);
        if age < 18.0 {
            if self.rng.random_bool(0.08) || diagnosed_here(&ANEMIA) {
                self.hemoglobin(i, at, issued);
            }
            return;
        }
        let routine = class == Class::Inpatient || self.rng.random_bool(0.35);
        let diabetes = self.has(&DIABETES);
        let prediabetes = self.has(&PREDIABETES);
        if diagnosed_here(&DIABETES)
            || diagnosed_here(&PREDIABETES)
            || (routine && (diabetes || self.rng.random_bool(0.6)))
        {
            let (glucose, a1c) = if diabetes {
                (
                    self.rng.random_range(126.0..260.0),
                    self.rng.random_range(6.5..10.5),
                )
            } else if prediabetes {
                (
                    self.rng.random_range(100.0..126.0),
                    self.rng.random_range(5.7..6.5),
                )
            } else {
                (
                    self.rng.random_range(70.0..100.0),
                    self.rng.random_range(4.4..5.7),
                )
            };
            self.observation(
                true,
                &GLUCOSE,
                i,
                at,
                issued,
                quantity(decimal(glucose), "mg/dL"),
            );
            self.observation(true, &HBA1C, i, at, issued, quantity(decimal(a1c), "%"));
        }
        let lipid = self.has(&HYPERLIPIDEMIA);
        if diagnosed_here(&HYPERLIPIDEMIA) || (routine && (lipid || self.rng.random_bool(0.4))) {
            let total = if lipid {
                self.rng.random_range(220.0..300.0)
            } else {
                self.rng.random_range(140.0..220.0)
            };
            let hdl = self.rng.random_range(35.0..80.0);
            let tg = self
                .rng
                .random_range(60.0..if lipid { 350.0 } else { 180.0 });
            self.observation(
                true,
                &CHOLESTEROL,
                i,
                at,
                issued,
                quantity(decimal(total), "mg/dL"),
            );
            self.observation(true, &HDL, i, at, issued, quantity(decimal(hdl), "mg/dL"));
            self.observation(
                true,
                &TRIGLYCERIDES,
                i,
                at,
                issued,
                quantity(decimal(tg), "mg/dL"),
            );
        }
        if diagnosed_here(&ANEMIA) || (routine && self.rng.random_bool(0.3)) {
            self.hemoglobin(i, at, issued);
            let creatinine = self.rng.random_range(0.6..1.3);
            self.observation(
                true,
                &CREATININE,
                i,
                at,
                issued,
                quantity(decimal(creatinine), "mg/dL"),
            );
        }
    }

    fn hemoglobin(&mut self, i: usize, at: i64, issued: i64) {
        let value = if self.has(&ANEMIA) {
            self.rng.random_range(8.5..11.5)
        } else if self.demo.gender == Gender::Male {
            self.rng.random_range(13.5..17.5)
        } else {
            self.rng.random_range(12.0..15.5)
        };
        self.observation(
            true,
            &HEMOGLOBIN,
            i,
            at,
            issued,
            quantity(decimal(value), "g/dL"),
        );
    }

    /// 0–2 allergies; returns whether one of them is to a penicillin.
    fn allergies(&mut self) -> bool {
        let r: f64 = self.rng.random();
        let n = if r < 0.65 {
            0
        } else if r < 0.9 {
            1
        } else {
            2
        };
        let mut chosen: Vec<&AllergyDef> = Vec::with_capacity(n);
        while chosen.len() < n {
            let a = pick(self.rng, ALLERGIES);
            if !chosen.iter().any(|c| c.code.code == a.code.code) {
                chosen.push(a);
            }
        }
        let recorded = date_time(self.encounters[0].start, self.tz);
        let mut penicillin = false;
        for a in chosen {
            penicillin |= a.category == "medication";
            let severe = a.reaction.code == "39579001";
            let severity = if severe {
                "severe"
            } else {
                *pick(self.rng, &["mild", "mild", "moderate"])
            };
            let resource = obj! {
                "resourceType": "AllergyIntolerance",
                "clinicalStatus": status_concept(ALLERGY_CLINICAL, "active"),
                "verificationStatus": status_concept(ALLERGY_VER, "confirmed"),
                "type": "allergy",
                "category": [a.category],
                "criticality": if severe { "high" } else { "low" },
                "code": a.code.concept(),
                "patient": reference(&self.demo.urn),
                "recordedDate": recorded.as_str(),
                "reaction": [obj!{
                    "manifestation": [a.reaction.concept()],
                    "severity": severity
                }]
            };
            let urn = new_urn(self.rng);
            self.push(urn, "AllergyIntolerance", resource);
        }
        penicillin
    }

    fn medications(&mut self, penicillin_allergy: bool) {
        let mut count = 0;
        for d in 0..self.diagnoses.len() {
            if count == 3 {
                break;
            }
            let def = self.diagnoses[d].def;
            let treated = if def.chronic { 0.8 } else { 0.75 };
            let Some(med) = def
                .meds
                .iter()
                .find(|m| {
                    !(penicillin_allergy
                        && [AMOXICILLIN.code, AMOX_CLAV.code, PENICILLIN_V.code].contains(&m.code))
                })
                .copied()
            else {
                continue;
            };
            if !self.rng.random_bool(treated) {
                continue;
            }
            count += 1;
            let diag = &self.diagnoses[d];
            let enc = &self.encounters[diag.encounter];
            let prac = &self.dir.practitioners[enc.practitioner];
            let as_needed = med.code == ACETAMINOPHEN.code || med.code == ALBUTEROL.code;
            let dosage = if as_needed {
                obj! {"sequence": 1, "text": "Take as needed.", "asNeededBoolean": true}
            } else {
                let frequency = if def.chronic { 1 } else { 2 };
                obj! {
                    "sequence": 1,
                    "timing": obj!{"repeat": obj!{"frequency": frequency, "period": 1, "periodUnit": "d"}},
                    "asNeededBoolean": false,
                    "doseAndRate": [obj!{"doseQuantity": obj!{"value": 1}}]
                }
            };
            let resource = obj! {
                "resourceType": "MedicationRequest",
                "status": if def.chronic { "active" } else { "completed" },
                "intent": "order",
                "medicationCodeableConcept": med.concept(),
                "subject": reference(&self.demo.urn),
                "encounter": reference(&enc.urn),
                "authoredOn": date_time(enc.start, self.tz),
                "requester": reference_display(&prac.reference, &prac.display),
                "reasonReference": [reference(&diag.urn)],
                "dosageInstruction": [dosage]
            };
            let urn = new_urn(self.rng);
            self.push(urn, "MedicationRequest", resource);
        }
    }

    fn procedures(&mut self) {
        let r: f64 = self.rng.random();
        let n = if r < 0.3 {
            0
        } else if r < 0.65 {
            1
        } else if r < 0.85 {
            2
        } else {
            3
        };
        for _ in 0..n {
            let i = self.rng.random_range(0..self.encounters.len());
            let enc = &self.encounters[i];
            let code = if self.age_at(enc.start) < 18.0 && self.rng.random_bool(0.5) {
                &PROCEDURES[7]
            } else {
                pick(self.rng, &PROCEDURES[..7])
            };
            let start = enc.start + self.rng.random_range(5..=15i64);
            let end = start + self.rng.random_range(10..=30i64);
            let prac = &self.dir.practitioners[enc.practitioner];
            let resource = obj! {
                "resourceType": "Procedure",
                "status": "completed",
                "code": code.concept(),
                "subject": reference(&self.demo.urn),
                "encounter": reference(&enc.urn),
                "performedPeriod": obj!{
                    "start": date_time(start, self.tz),
                    "end": date_time(end, self.tz)
                },
                "performer": [obj!{"actor": reference_display(&prac.reference, &prac.display)}]
            };
            let urn = new_urn(self.rng);
            self.push(urn, "Procedure", resource);
        }
    }

    fn care_team(&mut self) {
        let gp = &self.dir.practitioners[self.demo.gp];
        let org = &self.dir.orgs[gp.org];
        let mut participants = vec![obj! {
            "role": [ROLE_PCP.concept()],
            "member": reference_display(&gp.reference, &gp.display)
        }];
        let mut members = vec![self.demo.gp];
        for enc in &self.encounters {
            if members.len() == 3 {
                break;
            }
            if !members.contains(&enc.practitioner) {
                members.push(enc.practitioner);
                let p = &self.dir.practitioners[enc.practitioner];
                participants.push(obj! {
                    "role": [ROLE_PROFESSIONAL.concept()],
                    "member": reference_display(&p.reference, &p.display)
                });
            }
        }
        participants.push(obj! {
            "role": [ROLE_SERVICES.concept()],
            "member": reference_display(&org.reference, &org.name)
        });
        let first = &self.encounters[0];
        let mut resource = obj! {
            "resourceType": "CareTeam",
            "status": "active",
            "name": format!("Primary care team of {} {}", self.demo.given, self.demo.family),
            "subject": reference(&self.demo.urn),
            "encounter": reference(&first.urn),
            "period": obj!{"start": date_time(first.start, self.tz)},
            "participant": participants,
            "managingOrganization": [reference_display(&org.reference, &org.name)]
        };
        let chronic: Vec<Value> = self
            .diagnoses
            .iter()
            .filter(|d| d.def.chronic)
            .map(|d| d.def.code.concept())
            .collect();
        if !chronic.is_empty() {
            resource
                .as_object_mut()
                .expect("object")
                .insert("reasonCode".into(), Value::Array(chronic));
        }
        let urn = new_urn(self.rng);
        self.push(urn, "CareTeam", resource);
    }

    fn coverage(&mut self) {
        let age = self.age_at(REF_DAY * DAY);
        let payer = if age >= 65.0 && self.rng.random_bool(0.9) {
            self.dir.medicare
        } else if self.rng.random_bool(0.15) {
            self.dir.medicaid
        } else {
            *pick(self.rng, &self.dir.private_payers)
        };
        let org = &self.dir.orgs[payer];
        debug_assert_eq!(org.kind, OrgKind::Payer);
        let plan = if payer == self.dir.medicare || payer == self.dir.medicaid {
            PLAN_PUBLIC
        } else {
            PLAN_PRIVATE
        };
        let member = format!("MBR{:09}", self.rng.random_range(0..1_000_000_000u32));
        let since = (REF_DAY - self.rng.random_range(365..=15 * 365)).max(self.demo.birth_day);
        let relationship = if age < 18.0 { "child" } else { "self" };
        let resource = obj! {
            "resourceType": "Coverage",
            "identifier": [obj!{"system": MEMBER_ID, "value": member.clone()}],
            "status": "active",
            "type": plan.concept(),
            "subscriberId": member,
            "beneficiary": reference(&self.demo.urn),
            "relationship": status_concept(SUBSCRIBER_REL, relationship),
            "period": obj!{"start": date(since)},
            "payor": [reference_display(&org.reference, &org.name)]
        };
        let urn = new_urn(self.rng);
        self.push(urn, "Coverage", resource);
    }

    fn device(&mut self) {
        let age = self.age_at(REF_DAY * DAY);
        let (code, since) = if let Some(d) = self
            .diagnoses
            .iter()
            .find(|d| d.def.code.code == DIABETES.code.code)
        {
            if !self.rng.random_bool(0.85) {
                return;
            }
            (GLUCOSE_METER, self.encounters[d.encounter].start)
        } else if age >= 50.0 && self.rng.random_bool(0.05) {
            let i = self.rng.random_range(0..self.encounters.len());
            (*pick(self.rng, OTHER_DEVICES), self.encounters[i].start)
        } else {
            return;
        };
        let made = since.div_euclid(DAY) - self.rng.random_range(30..=365i64);
        let expires = made + 5 * 365;
        let di = format!("{:014}", self.rng.random_range(0..100_000_000_000_000u64));
        let lot = format!("{:06}", self.rng.random_range(0..1_000_000u32));
        let serial = format!("{:010}", self.rng.random_range(0..10_000_000_000u64));
        let (made_date, expires_date) = (date(made), date(expires));
        let yymmdd = |d: &str| format!("{}{}{}", &d[2..4], &d[5..7], &d[8..10]);
        let hrf = format!(
            "(01){di}(11){}(17){}(10){lot}(21){serial}",
            yymmdd(&made_date),
            yymmdd(&expires_date)
        );
        let resource = obj! {
            "resourceType": "Device",
            "identifier": [obj!{"system": DEVICE_SERIAL, "value": serial.clone()}],
            "udiCarrier": [obj!{"deviceIdentifier": di.clone(), "carrierHRF": hrf}],
            "status": "active",
            "distinctIdentifier": di,
            "manufactureDate": made_date,
            "expirationDate": expires_date,
            "lotNumber": lot,
            "serialNumber": serial,
            "deviceName": [obj!{"name": code.display, "type": "user-friendly-name"}],
            "type": code.concept(),
            "patient": reference(&self.demo.urn)
        };
        let urn = new_urn(self.rng);
        self.push(urn, "Device", resource);
    }
}
