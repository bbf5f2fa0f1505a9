//! The simulated hospital: departments on sites, staff with roles and
//! shifts, patients in the care of teams, and the ties that make snooping
//! possible (relatives, employees who are patients, VIPs). Deterministic
//! from a seed.
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const FAMILIES: [&str; 48] = [
    "Okafor",
    "Lindqvist",
    "Moreau",
    "Tanaka",
    "Haddad",
    "Kowalski",
    "Ferreira",
    "Nguyen",
    "Schmidt",
    "Rossi",
    "Mensah",
    "Ivanova",
    "Dubois",
    "Kaur",
    "Oduya",
    "Yamamoto",
    "Garcia",
    "Novak",
    "Petrov",
    "Jensen",
    "Costa",
    "Ahmed",
    "Brennan",
    "Castillo",
    "Dimitrov",
    "Eriksen",
    "Fontaine",
    "Gallo",
    "Horvat",
    "Ishikawa",
    "Jovanovic",
    "Keller",
    "Laine",
    "Mbeki",
    "Nakamura",
    "Olsen",
    "Popescu",
    "Quintana",
    "Ramos",
    "Sato",
    "Torres",
    "Uchenna",
    "Varga",
    "Weber",
    "Xu",
    "Yilmaz",
    "Zanetti",
    "Abara",
];
const GIVENS: [&str; 32] = [
    "Ada", "Bram", "Chioma", "Dev", "Elif", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kemi",
    "Lars", "Mina", "Nils", "Oona", "Pavel", "Qiu", "Rosa", "Sami", "Tove", "Uma", "Viktor", "Wen",
    "Ximena", "Yara", "Zeno", "Amara", "Bo", "Cyra", "Dario", "Esme", "Femi",
];
const STREETS: [&str; 16] = [
    "Elm", "Harbor", "Mill", "Orchard", "Quarry", "River", "Station", "Tanner", "Union", "Vale",
    "Willow", "Beacon", "Cedar", "Dock", "Forge", "Garden",
];

/// Demographics in clear (the HTTP drive writes them into real resources;
/// the direct drive tokenizes them as the live pipeline would).
#[derive(Debug, Clone, PartialEq)]
pub struct Person {
    pub family: String,
    pub given: String,
    pub birth: String,
    pub line: String,
    pub postal: String,
    pub phone: String,
}

impl Person {
    fn random(rng: &mut ChaCha8Rng) -> Person {
        Person {
            family: FAMILIES.choose(rng).expect("non-empty").to_string(),
            given: GIVENS.choose(rng).expect("non-empty").to_string(),
            birth: format!(
                "{}-{:02}-{:02}",
                rng.random_range(1940..2005),
                rng.random_range(1..13),
                rng.random_range(1..29)
            ),
            line: format!(
                "{} {} St",
                rng.random_range(1..999),
                STREETS.choose(rng).expect("non-empty")
            ),
            postal: format!("{:05}", rng.random_range(10_000..99_999)),
            phone: format!("555{:07}", rng.random_range(0..10_000_000)),
        }
    }

    /// As FHIR JSON members (name, birthDate, address, telecom).
    pub fn fhir(&self) -> serde_json::Value {
        serde_json::json!({
            "name": [{"family": self.family, "given": [self.given]}],
            "birthDate": self.birth,
            "address": [{"line": [self.line], "postalCode": self.postal}],
            "telecom": [{"system": "phone", "value": self.phone}],
        })
    }
}

/// A department, on a site.
#[derive(Debug, Clone)]
pub struct Dept {
    pub name: String,
    pub site: usize,
}

/// Roles of simulated staff (Custos role names).
pub const PHYSICIAN: &str = "physician";
pub const NURSE: &str = "nurse";
pub const CLERK: &str = "registration-clerk";
pub const BILLING: &str = "billing";

/// A member of staff.
#[derive(Debug, Clone)]
pub struct Staff {
    pub username: String,
    pub role: &'static str,
    pub dept: usize,
    /// First hour (UTC) of their 8-hour shift.
    pub shift: u32,
    /// Days of the week they work (bit 0 = Monday).
    pub workdays: u8,
    pub network: String,
    pub person: Person,
    /// Patients in their care (care team).
    pub care: Vec<usize>,
    /// The patient record that is this person.
    pub patient: Option<usize>,
}

impl Staff {
    pub fn clinical(&self) -> bool {
        self.role == PHYSICIAN || self.role == NURSE
    }
    pub fn works(&self, day: u32, hour: u32) -> bool {
        // Shifts may run past midnight: the shift belongs to the day it starts.
        let (d, h) = if hour < self.shift && self.shift + 8 > 24 {
            (day.wrapping_sub(1), hour + 24)
        } else {
            (day, hour)
        };
        self.workdays & (1 << (d % 7)) != 0 && h >= self.shift && h < self.shift + 8
    }
}

/// A patient.
#[derive(Debug, Clone)]
pub struct Patient {
    pub person: Person,
    pub dept: usize,
    pub vip: bool,
    pub mrn: String,
    /// The member of staff whose relative this is.
    pub relative_of: Option<usize>,
    /// The member of staff this patient is.
    pub employee: Option<usize>,
    /// Care team members.
    pub team: Vec<usize>,
}

/// The whole hospital.
#[derive(Debug, Clone)]
pub struct Hospital {
    pub sites: usize,
    pub depts: Vec<Dept>,
    pub staff: Vec<Staff>,
    pub patients: Vec<Patient>,
}

impl Hospital {
    pub fn generate(seed: u64, staff: usize, patients: usize) -> Hospital {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let ndepts = (staff / 12).clamp(2, 40);
        let sites = (ndepts / 4).clamp(2, 6);
        let depts: Vec<Dept> = (0..ndepts)
            .map(|i| Dept {
                name: format!("dept-{i}"),
                site: i % sites,
            })
            .collect();
        let mut members: Vec<Staff> = (0..staff)
            .map(|i| {
                let role = match i % 20 {
                    0..=4 => PHYSICIAN,
                    5..=13 => NURSE,
                    14..=16 => CLERK,
                    _ => BILLING,
                };
                let dept = i % ndepts;
                let shift = if role == NURSE {
                    [7, 15, 23][rng.random_range(0..3)]
                } else {
                    [7, 8, 9][rng.random_range(0..3)]
                };
                // Five days a week, starting on a random day.
                let off = rng.random_range(0..7);
                let workdays = (0..5).fold(0u8, |m, k| m | 1 << ((off + k) % 7));
                Staff {
                    username: format!("{}{}", role.chars().next().unwrap_or('s'), i),
                    role,
                    dept,
                    shift,
                    workdays,
                    network: format!("10.{}.{}.0/24", depts[dept].site, dept),
                    person: Person::random(&mut rng),
                    care: Vec::new(),
                    patient: None,
                }
            })
            .collect();
        let mut list: Vec<Patient> = (0..patients)
            .map(|_| Patient {
                person: Person::random(&mut rng),
                dept: rng.random_range(0..ndepts),
                vip: rng.random_bool(0.01),
                mrn: format!("MRN{:08}", rng.random_range(0..100_000_000u32)),
                relative_of: None,
                employee: None,
                team: Vec::new(),
            })
            .collect();
        // Care teams: physicians and nurses of the patient's department.
        for (p, patient) in list.iter_mut().enumerate() {
            let of = |role: &str| -> Vec<usize> {
                members
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.role == role && s.dept == patient.dept)
                    .map(|(i, _)| i)
                    .collect()
            };
            let (docs, nurses) = (of(PHYSICIAN), of(NURSE));
            let mut team: Vec<usize> = docs.choose_multiple(&mut rng, 2).copied().collect();
            team.extend(nurses.choose_multiple(&mut rng, 3).copied());
            for &s in &team {
                members[s].care.push(p);
            }
            patient.team = team;
        }
        // Ties: relatives of staff (same family and address), and staff who are patients.
        let ties = (patients / 25).max(2).min(staff);
        for k in 0..ties {
            let s = (k * 7919) % staff;
            let p = (k * 104_729 + 13) % patients;
            if list[p].relative_of.is_some() || list[p].employee.is_some() {
                continue;
            }
            list[p].person.family = members[s].person.family.clone();
            list[p].person.line = members[s].person.line.clone();
            list[p].person.postal = members[s].person.postal.clone();
            list[p].relative_of = Some(s);
            // Staff do not treat their own family.
            list[p].team.retain(|&t| t != s);
            members[s].care.retain(|&c| c != p);
        }
        for k in 0..ties {
            let s = (k * 31 + 5) % staff;
            let p = (k * 7_727 + 101) % patients;
            if list[p].relative_of.is_some()
                || list[p].employee.is_some()
                || members[s].patient.is_some()
            {
                continue;
            }
            list[p].person = members[s].person.clone();
            list[p].employee = Some(s);
            members[s].patient = Some(p);
            list[p].team.retain(|&t| t != s);
            members[s].care.retain(|&c| c != p);
        }
        // A few VIPs in every hospital, whatever the dice said.
        for k in 0..3 {
            let p = (k * 37 + 11) % patients;
            if list[p].relative_of.is_none() && list[p].employee.is_none() {
                list[p].vip = true;
            }
        }
        Hospital {
            sites,
            depts,
            staff: members,
            patients: list,
        }
    }

    /// Patients of a department.
    pub fn dept_patients(&self, dept: usize) -> Vec<usize> {
        (0..self.patients.len())
            .filter(|&p| self.patients[p].dept == dept)
            .collect()
    }
}
