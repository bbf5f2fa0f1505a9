//! The shared directory: provider organizations, payers and practitioners.
//!
//! The directory is fixed (it depends neither on the seed nor on the number
//! of patients), so that bundles generated with different seeds can share
//! one server and every patient can reference any directory entry.

use std::collections::HashSet;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

use crate::codes::{NPI, ORG_TYPE, SYNTHEA};
use crate::names::{CITIES, STREET_SUFFIXES, STREETS};
use crate::time::Tz;
use crate::{Gender, pick, pick_person_name, rng_uuid};

/// Number of provider organizations (hospitals and clinics).
pub(crate) const PROVIDER_COUNT: usize = 16;
/// Number of practitioners.
pub(crate) const PRACTITIONER_COUNT: usize = 100;
/// Hospitals among the providers (the first ones).
const HOSPITAL_COUNT: usize = 6;

const DIRECTORY_SEED: u64 = 0x0C05_7051_D1EC_7021;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum OrgKind {
    Hospital,
    Clinic,
    Payer,
}

/// A postal address.
#[derive(Clone, Debug)]
pub(crate) struct Address {
    pub line: String,
    pub city: &'static str,
    pub state: &'static str,
    pub postal_code: String,
    /// Time zone of the city.
    pub tz: Tz,
}

impl Address {
    pub(crate) fn random(rng: &mut ChaCha8Rng) -> Address {
        let city = pick(rng, CITIES);
        Address {
            line: format!(
                "{} {} {}",
                rng.random_range(1..=9999u32),
                pick(rng, STREETS),
                pick(rng, STREET_SUFFIXES)
            ),
            city: city.name,
            state: city.state,
            postal_code: format!("{:03}{:02}", city.zip3, rng.random_range(0..100u32)),
            tz: city.tz,
        }
    }

    pub(crate) fn to_json(&self) -> Value {
        obj! {
            "line": [self.line.as_str()],
            "city": self.city,
            "state": self.state,
            "postalCode": self.postal_code.as_str(),
            "country": "US"
        }
    }
}

pub(crate) struct Organization {
    pub identifier: String,
    /// `Organization?identifier=…` conditional reference.
    pub reference: String,
    pub name: String,
    pub kind: OrgKind,
    pub address: Address,
    pub phone: String,
}

pub(crate) struct Practitioner {
    pub npi: String,
    /// `Practitioner?identifier=…` conditional reference.
    pub reference: String,
    /// `Dr. Given Family`.
    pub display: String,
    pub family: String,
    pub given: String,
    pub gender: Gender,
    pub email: String,
    /// Index into [`Directory::orgs`].
    pub org: usize,
}

pub(crate) struct Directory {
    pub orgs: Vec<Organization>,
    pub practitioners: Vec<Practitioner>,
    /// Practitioners working at hospitals (emergency and inpatient care).
    pub hospital_practitioners: Vec<usize>,
    /// Practitioners working at clinics (primary care).
    pub clinic_practitioners: Vec<usize>,
    pub medicare: usize,
    pub medicaid: usize,
    pub private_payers: Vec<usize>,
}

/// A 10-digit number in NPI format with a valid Luhn check digit (computed
/// over the `80840` prefix, as for real NPIs).
fn npi(rng: &mut ChaCha8Rng, used: &mut HashSet<String>) -> String {
    loop {
        let body: u32 = rng.random_range(100_000_000..300_000_000);
        let digits = format!("80840{body:09}");
        let mut sum = 0;
        for (i, c) in digits.bytes().rev().enumerate() {
            let mut d = u32::from(c - b'0');
            if i % 2 == 0 {
                d *= 2;
                if d > 9 {
                    d -= 9;
                }
            }
            sum += d;
        }
        let check = (10 - sum % 10) % 10;
        let value = format!("{body:09}{check}");
        if used.insert(value.clone()) {
            return value;
        }
    }
}

pub(crate) fn phone(rng: &mut ChaCha8Rng) -> String {
    format!(
        "555-{:03}-{:04}",
        rng.random_range(200..1000u32),
        rng.random_range(0..10_000u32)
    )
}

/// Lower-case ASCII approximation of a name, for e-mail addresses.
pub(crate) fn ascii_fold(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let mapped: &str = match c {
            'a'..='z' | '0'..='9' => {
                out.push(c);
                continue;
            }
            'A'..='Z' => {
                out.push(c.to_ascii_lowercase());
                continue;
            }
            'á' | 'à' | 'â' | 'ä' | 'ã' | 'å' | 'ā' | 'ă' | 'ạ' | 'ả' | 'ấ' | 'ầ' | 'ẩ' | 'ẫ'
            | 'ậ' | 'ắ' | 'ằ' | 'ẳ' | 'ẵ' | 'ặ' | 'Á' | 'À' | 'Â' | 'Ä' | 'Å' => {
                "a"
            }
            'é' | 'è' | 'ê' | 'ë' | 'ē' | 'ě' | 'ę' | 'ẹ' | 'ẻ' | 'ẽ' | 'ế' | 'ề' | 'ể' | 'ễ'
            | 'ệ' | 'É' | 'È' => "e",
            'í' | 'ì' | 'î' | 'ï' | 'ī' | 'ı' | 'ĩ' | 'ỉ' | 'ị' | 'Í' => "i",
            'ó' | 'ò' | 'ô' | 'ö' | 'õ' | 'ø' | 'ō' | 'ő' | 'ơ' | 'ọ' | 'ỏ' | 'ố' | 'ồ' | 'ổ'
            | 'ỗ' | 'ộ' | 'ớ' | 'ờ' | 'ở' | 'ỡ' | 'ợ' | 'Ó' | 'Ö' | 'Ø' | 'Ō' => {
                "o"
            }
            'ú' | 'ù' | 'û' | 'ü' | 'ū' | 'ů' | 'ű' | 'ư' | 'ũ' | 'ụ' | 'ủ' | 'ứ' | 'ừ' | 'ử'
            | 'ữ' | 'ự' | 'Ú' | 'Ü' => "u",
            'ý' | 'ÿ' | 'ỳ' | 'ỵ' | 'ỷ' | 'ỹ' => "y",
            'ñ' | 'ń' => "n",
            'ç' | 'č' | 'ć' | 'Č' => "c",
            'ł' | 'Ł' => "l",
            'ś' | 'š' | 'ş' | 'Ś' | 'Š' | 'Ş' => "s",
            'ź' | 'ż' | 'ž' | 'Ż' | 'Ž' => "z",
            'ř' => "r",
            'ğ' => "g",
            'đ' | 'Đ' => "d",
            'ß' => "ss",
            'æ' => "ae",
            _ => "",
        };
        out.push_str(mapped);
    }
    out
}

const SAINTS: &[&str] = &[
    "Mary's",
    "Joseph's",
    "Luke's",
    "Vincent's",
    "Elizabeth's",
    "Francis",
    "Anne's",
];

const PAYERS: &[&str] = &[
    "Medicare",
    "Medicaid",
    "Blue Cross Blue Shield",
    "Aetna",
    "UnitedHealthcare",
    "Cigna Health",
    "Humana",
];

fn provider_name(rng: &mut ChaCha8Rng, i: usize, city: &str) -> String {
    if i < HOSPITAL_COUNT {
        match i % 5 {
            0 => format!("{city} General Hospital"),
            1 => format!("Saint {} Medical Center", pick(rng, SAINTS)),
            2 => format!("{city} Memorial Hospital"),
            3 => format!("{city} Regional Medical Center"),
            _ => format!("University Hospital of {city}"),
        }
    } else {
        let (family, _) = pick_person_name(rng, Gender::Male);
        match i % 6 {
            0 => format!("{family} Family Practice"),
            1 => format!("{city} Community Health Center"),
            2 => format!("{} Primary Care", pick(rng, STREETS)),
            3 => format!("{family} Pediatrics"),
            4 => format!("{city} Internal Medicine Associates"),
            _ => format!("{} Street Medical Group", pick(rng, STREETS)),
        }
    }
}

impl Directory {
    pub(crate) fn new() -> Directory {
        let mut rng = ChaCha8Rng::seed_from_u64(DIRECTORY_SEED);
        let mut used = HashSet::new();
        let mut orgs = Vec::new();
        for i in 0..PROVIDER_COUNT + PAYERS.len() {
            let identifier = npi(&mut rng, &mut used);
            let address = Address::random(&mut rng);
            let (name, kind) = if i < PROVIDER_COUNT {
                let kind = if i < HOSPITAL_COUNT {
                    OrgKind::Hospital
                } else {
                    OrgKind::Clinic
                };
                (provider_name(&mut rng, i, address.city), kind)
            } else {
                (PAYERS[i - PROVIDER_COUNT].to_string(), OrgKind::Payer)
            };
            orgs.push(Organization {
                reference: format!("Organization?identifier={SYNTHEA}|{identifier}"),
                identifier,
                name,
                kind,
                address,
                phone: phone(&mut rng),
            });
        }
        let mut practitioners = Vec::with_capacity(PRACTITIONER_COUNT);
        let mut hospital_practitioners = Vec::new();
        let mut clinic_practitioners = Vec::new();
        for i in 0..PRACTITIONER_COUNT {
            let gender = if rng.random_bool(0.5) {
                Gender::Female
            } else {
                Gender::Male
            };
            let (family, given) = pick_person_name(&mut rng, gender);
            let npi = npi(&mut rng, &mut used);
            let org = i % PROVIDER_COUNT;
            if orgs[org].kind == OrgKind::Hospital {
                hospital_practitioners.push(i);
            } else {
                clinic_practitioners.push(i);
            }
            let mut email = format!("{}.{}", ascii_fold(given), ascii_fold(family));
            if email.len() < 3 {
                email = format!("practitioner{i}");
            }
            email.push_str("@example.com");
            practitioners.push(Practitioner {
                reference: format!("Practitioner?identifier={NPI}|{npi}"),
                display: format!("Dr. {given} {family}"),
                npi,
                family: family.to_string(),
                given: given.to_string(),
                gender,
                email,
                org,
            });
        }
        let payer = |name: &str| {
            orgs.iter()
                .position(|o| o.name == name)
                .expect("payer present")
        };
        let medicare = payer("Medicare");
        let medicaid = payer("Medicaid");
        let private_payers = (PROVIDER_COUNT + 2..orgs.len()).collect();
        Directory {
            medicare,
            medicaid,
            private_payers,
            orgs,
            practitioners,
            hospital_practitioners,
            clinic_practitioners,
        }
    }

    /// The transaction bundle that creates the directory.
    pub(crate) fn bundle(&self) -> Value {
        let mut rng = ChaCha8Rng::seed_from_u64(DIRECTORY_SEED ^ 0xB0B);
        let mut entries = Vec::with_capacity(self.orgs.len() + self.practitioners.len());
        for org in &self.orgs {
            let (code, display) = match org.kind {
                OrgKind::Payer => ("pay", "Payer"),
                _ => ("prov", "Healthcare Provider"),
            };
            let resource = obj! {
                "resourceType": "Organization",
                "identifier": [obj!{"system": SYNTHEA, "value": org.identifier.as_str()}],
                "active": true,
                "type": [obj!{
                    "coding": [obj!{"system": ORG_TYPE, "code": code, "display": display}],
                    "text": display
                }],
                "name": org.name.as_str(),
                "telecom": [obj!{"system": "phone", "value": org.phone.as_str(), "use": "work"}],
                "address": [org.address.to_json()]
            };
            entries.push(obj! {
                "fullUrl": format!("urn:uuid:{}", rng_uuid(&mut rng)),
                "resource": resource,
                "request": obj!{
                    "method": "POST",
                    "url": "Organization",
                    "ifNoneExist": format!("identifier={SYNTHEA}|{}", org.identifier)
                }
            });
        }
        for p in &self.practitioners {
            let org = &self.orgs[p.org];
            let resource = obj! {
                "resourceType": "Practitioner",
                "identifier": [obj!{"system": NPI, "value": p.npi.as_str()}],
                "active": true,
                "name": [obj!{
                    "use": "official",
                    "family": p.family.as_str(),
                    "given": [p.given.as_str()],
                    "prefix": ["Dr."]
                }],
                "telecom": [obj!{"system": "email", "value": p.email.as_str(), "use": "work"}],
                "address": [org.address.to_json()],
                "gender": p.gender.code()
            };
            entries.push(obj! {
                "fullUrl": format!("urn:uuid:{}", rng_uuid(&mut rng)),
                "resource": resource,
                "request": obj!{
                    "method": "POST",
                    "url": "Practitioner",
                    "ifNoneExist": format!("identifier={NPI}|{}", p.npi)
                }
            });
        }
        obj! {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    }
}
