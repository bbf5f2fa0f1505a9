//! Roles and their permission table: which interactions on which resource
//! types a role allows, and which relationship to the patient it requires.
use std::collections::BTreeMap;

use custos_fhir::compartment;
use custos_records::Interaction;
use serde::{Deserialize, Serialize};

/// The roles of people (and systems) that use Custos.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Admin,
    SecurityOfficer,
    Physician,
    Nurse,
    RegistrationClerk,
    Billing,
    Researcher,
    Auditor,
    Patient,
    /// A system (SMART Backend Services client), never a person.
    Service,
}

impl Role {
    pub const ALL: [Role; 10] = [
        Role::Admin,
        Role::SecurityOfficer,
        Role::Physician,
        Role::Nurse,
        Role::RegistrationClerk,
        Role::Billing,
        Role::Researcher,
        Role::Auditor,
        Role::Patient,
        Role::Service,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::SecurityOfficer => "security-officer",
            Role::Physician => "physician",
            Role::Nurse => "nurse",
            Role::RegistrationClerk => "registration-clerk",
            Role::Billing => "billing",
            Role::Researcher => "researcher",
            Role::Auditor => "auditor",
            Role::Patient => "patient",
            Role::Service => "service",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        let s = s.trim().to_ascii_lowercase().replace('_', "-");
        Role::ALL.into_iter().find(|r| r.name() == s)
    }

    /// Whether the role is held by a clinician who must be linked to a Practitioner.
    pub fn is_clinical(self) -> bool {
        matches!(self, Role::Physician | Role::Nurse)
    }

    /// The HL7 v3 PurposeOfUse a request of this role carries when the
    /// client states none.
    pub fn default_purpose(self) -> &'static str {
        match self {
            Role::Physician | Role::Nurse => "TREAT",
            Role::RegistrationClerk | Role::Admin | Role::SecurityOfficer | Role::Service => {
                "HOPERAT"
            }
            Role::Billing => "HPAYMT",
            Role::Researcher => "HRESCH",
            Role::Auditor => "HOPERAT",
            Role::Patient => "PATRQT",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which patients a role may reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Relationship {
    /// Any patient (registration, billing, systems): what the type table allows.
    Any,
    /// Only patients the user cares for: an active CareTeam, a recent
    /// Encounter, or as general practitioner.
    Care,
    /// Only the user's own Patient compartment.
    OwnRecord,
}

/// Administrative rights, outside FHIR data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdminRight {
    /// Add users, change roles, register clients.
    ManageUsers,
    /// Lock, unlock, revoke tokens, switch read-only.
    Respond,
}

/// What one role may do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolePolicy {
    pub relationship: Relationship,
    /// Resource-type selector → SMART v2 letters (`cruds`). Selectors: a
    /// resource type, `*` (every type), `@compartment` (types of the
    /// Patient compartment, with Patient), `@shared` (all other types).
    /// The most specific selector that names a type decides for it.
    #[serde(default)]
    pub allow: BTreeMap<String, String>,
    /// May break the glass (emergency access without a relationship).
    #[serde(default)]
    pub break_glass: bool,
    /// Whether multi-factor authentication is required.
    #[serde(default = "yes")]
    pub mfa: bool,
    #[serde(default)]
    pub admin: Vec<AdminRight>,
}

fn yes() -> bool {
    true
}

/// Resource types that hold no patient's data: the directory (who and
/// where), definitions and terminology. Only these are "shared": a
/// resource of any other type that lies in no patient's compartment (a
/// Task, a Binary, a document Bundle, or an Observation whose subject is
/// not a Patient reference) may hold patient data, and only roles that
/// reach every patient may touch it.
pub const DIRECTORY_TYPES: &[&str] = &[
    "ActivityDefinition",
    "CapabilityStatement",
    "CodeSystem",
    "CompartmentDefinition",
    "ConceptMap",
    "Endpoint",
    "HealthcareService",
    "ImplementationGuide",
    "InsurancePlan",
    "Library",
    "Location",
    "Measure",
    "Medication",
    "MedicationKnowledge",
    "NamingSystem",
    "ObservationDefinition",
    "OperationDefinition",
    "Organization",
    "OrganizationAffiliation",
    "PlanDefinition",
    "Practitioner",
    "PractitionerRole",
    "Questionnaire",
    "SearchParameter",
    "SpecimenDefinition",
    "StructureDefinition",
    "StructureMap",
    "Substance",
    "SubstanceSpecification",
    "TerminologyCapabilities",
    "ValueSet",
];

/// Whether a resource type is a directory or definition type (see [`DIRECTORY_TYPES`]).
pub fn is_directory_type(rtype: &str) -> bool {
    DIRECTORY_TYPES.contains(&rtype)
}

/// Whether a resource type lies in the Patient compartment (Patient included).
pub fn in_patient_compartment(rtype: &str) -> bool {
    rtype == "Patient" || compartment::patient_params(rtype).is_some_and(|p| !p.is_empty())
}

impl RolePolicy {
    /// The letters allowed on `rtype`, by the most specific selector.
    pub fn letters(&self, rtype: &str) -> &str {
        if let Some(l) = self.allow.get(rtype) {
            return l;
        }
        let group = if in_patient_compartment(rtype) {
            "@compartment"
        } else {
            "@shared"
        };
        if let Some(l) = self.allow.get(group) {
            return l;
        }
        self.allow.get("*").map(String::as_str).unwrap_or("")
    }

    pub fn allows(&self, interaction: Interaction, rtype: &str) -> bool {
        self.letters(rtype).contains(interaction.letter())
    }

    /// Whether the role may search every type (system-wide history).
    pub fn allows_everything(&self, interaction: Interaction) -> bool {
        custos_fhir::types::RESOURCE_TYPES
            .iter()
            .all(|t| self.allows(interaction, t))
    }

    pub fn has(&self, right: AdminRight) -> bool {
        self.admin.contains(&right)
    }
}

fn table(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
    entries
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The default permission table (every entry can be replaced in the
/// configuration, `[access.roles.<role>]`).
pub fn default_policy(role: Role) -> RolePolicy {
    let p =
        |relationship, allow: &[(&str, &str)], break_glass, mfa, admin: &[AdminRight]| RolePolicy {
            relationship,
            allow: table(allow),
            break_glass,
            mfa,
            admin: admin.to_vec(),
        };
    use Relationship::*;
    match role {
        Role::Admin => p(Any, &[], false, true, &[AdminRight::ManageUsers]),
        Role::SecurityOfficer => p(Any, &[], false, true, &[AdminRight::Respond]),
        Role::Physician => p(Care, &[("*", "cruds")], true, true, &[]),
        Role::Nurse => p(
            Care,
            &[("@compartment", "crus"), ("@shared", "rs")],
            true,
            true,
            &[],
        ),
        Role::RegistrationClerk => p(
            Any,
            &[
                ("Patient", "crus"),
                ("Coverage", "crus"),
                ("Encounter", "crus"),
                ("Appointment", "crus"),
                ("RelatedPerson", "crus"),
                ("CareTeam", "crus"),
                ("@shared", "rs"),
            ],
            false,
            true,
            &[],
        ),
        Role::Billing => p(
            Any,
            &[
                ("Patient", "rs"),
                ("Coverage", "rs"),
                ("Encounter", "rs"),
                ("Procedure", "rs"),
                ("Condition", "rs"),
                ("Claim", "crus"),
                ("ClaimResponse", "rs"),
                ("ExplanationOfBenefit", "rs"),
                ("Account", "rs"),
                ("ChargeItem", "rs"),
                ("Invoice", "crus"),
                ("@shared", "rs"),
            ],
            false,
            true,
            &[],
        ),
        // De-identified data only: the export that serves it comes later.
        Role::Researcher => p(Any, &[], false, true, &[]),
        Role::Auditor => p(Any, &[("AuditEvent", "rs")], false, true, &[]),
        Role::Patient => p(
            OwnRecord,
            &[("@compartment", "rs"), ("@shared", "rs")],
            false,
            true,
            &[],
        ),
        Role::Service => p(Any, &[("*", "cruds")], false, false, &[]),
    }
}

/// The permission table in force: defaults, with configured replacements.
#[derive(Debug, Clone)]
pub struct Permissions {
    roles: BTreeMap<Role, RolePolicy>,
}

impl Permissions {
    /// Defaults, with `overrides` (role name → policy) replacing whole entries.
    pub fn new(overrides: &BTreeMap<String, RolePolicy>) -> Result<Permissions, String> {
        let mut roles: BTreeMap<Role, RolePolicy> =
            Role::ALL.iter().map(|&r| (r, default_policy(r))).collect();
        for (name, policy) in overrides {
            let role = Role::parse(name).ok_or_else(|| format!("unknown role '{name}'"))?;
            for (selector, letters) in &policy.allow {
                let ok_selector = selector == "*"
                    || selector == "@compartment"
                    || selector == "@shared"
                    || custos_fhir::types::is_resource_type(selector);
                if !ok_selector {
                    return Err(format!(
                        "role {name}: '{selector}' is not a resource type, '*', '@compartment' or '@shared'"
                    ));
                }
                if letters.chars().any(|c| !"cruds".contains(c)) {
                    return Err(format!(
                        "role {name}: '{letters}' must use only the letters c, r, u, d, s"
                    ));
                }
            }
            if role.is_clinical() && !policy.mfa {
                return Err(format!(
                    "role {name} reads clinical data: multi-factor authentication cannot be turned off"
                ));
            }
            roles.insert(role, policy.clone());
        }
        Ok(Permissions { roles })
    }

    pub fn of(&self, role: Role) -> &RolePolicy {
        &self.roles[&role]
    }
}

impl Default for Permissions {
    fn default() -> Self {
        Permissions::new(&BTreeMap::new()).expect("defaults are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_specific_selector_decides() {
        let nurse = default_policy(Role::Nurse);
        assert!(nurse.allows(Interaction::Create, "Observation"));
        assert!(!nurse.allows(Interaction::Delete, "Observation"));
        assert!(nurse.allows(Interaction::Read, "Practitioner"));
        assert!(!nurse.allows(Interaction::Create, "Practitioner"));
        let clerk = default_policy(Role::RegistrationClerk);
        assert!(clerk.allows(Interaction::Update, "Patient"));
        assert!(!clerk.allows(Interaction::Read, "Observation"));
        assert!(default_policy(Role::Physician).allows_everything(Interaction::Search));
        assert!(!default_policy(Role::Researcher).allows(Interaction::Read, "Patient"));
    }

    #[test]
    fn overrides_are_checked() {
        let mut o = BTreeMap::new();
        o.insert(
            "nurse".to_string(),
            RolePolicy {
                relationship: Relationship::Care,
                allow: table(&[("Observatio", "r")]),
                break_glass: false,
                mfa: true,
                admin: vec![],
            },
        );
        assert!(Permissions::new(&o).is_err());
        o.get_mut("nurse").unwrap().allow = table(&[("Observation", "rx")]);
        assert!(Permissions::new(&o).is_err());
        o.get_mut("nurse").unwrap().allow = table(&[("Observation", "r")]);
        o.get_mut("nurse").unwrap().mfa = false;
        assert!(Permissions::new(&o).is_err());
        o.get_mut("nurse").unwrap().mfa = true;
        let p = Permissions::new(&o).unwrap();
        assert!(!p.of(Role::Nurse).allows(Interaction::Read, "Condition"));
    }
}
