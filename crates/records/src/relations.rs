//! The facts the access policy decides on: care relationships between a
//! practitioner and a patient, and patients' Consent resources. Answered
//! through the blind index (no resource opened) except Consents, which
//! must be read to be understood.
use std::sync::atomic::Ordering;

use custos_fhir::FhirError;
use custos_fhir::date::format_instant;
use custos_fhir::query::{Handling, parse_search};
use custos_store::{IndexQuery, StoreExt};
use serde_json::Value;

use crate::keys::store_err;
use crate::search::Plan;
use crate::service::Records;

/// Resource types whose writes can change a care relationship.
pub const RELATION_TYPES: [&str; 3] = ["CareTeam", "Encounter", "Patient"];
/// The resource type whose writes can change what a patient consents to.
pub const CONSENT_TYPE: &str = "Consent";

/// The kinds of care relationship, as the policy names them.
pub const CARE_TEAM: &str = "care-team";
pub const ENCOUNTER: &str = "encounter";
pub const GENERAL_PRACTITIONER: &str = "general-practitioner";

/// A relationship kind, the resource type that shows it, and the search that finds it.
type RelationSpec = (&'static str, &'static str, Vec<(String, String)>);

impl Records {
    fn relation_plans(
        &self,
        practitioner: &str,
        patient: Option<&str>,
        encounter_since: i64,
    ) -> Result<Vec<(&'static str, Plan)>, FhirError> {
        let who = format!("Practitioner/{practitioner}");
        let since = format!("ge{}", format_instant(encounter_since));
        let mut specs: Vec<RelationSpec> = vec![
            (
                CARE_TEAM,
                "CareTeam",
                vec![
                    ("participant".into(), who.clone()),
                    ("status".into(), "active".into()),
                ],
            ),
            (
                ENCOUNTER,
                "Encounter",
                vec![("participant".into(), who.clone()), ("date".into(), since)],
            ),
            (
                GENERAL_PRACTITIONER,
                "Patient",
                vec![("general-practitioner".into(), who)],
            ),
        ];
        if let Some(p) = patient {
            for (_, rtype, params) in specs.iter_mut() {
                if *rtype == "Patient" {
                    params.push(("_id".into(), p.to_string()));
                } else {
                    params.push(("patient".into(), format!("Patient/{p}")));
                }
            }
        }
        specs
            .into_iter()
            .map(|(kind, rtype, params)| {
                let req = parse_search(rtype, &params, Handling::Strict)?;
                Ok((kind, self.plan(&req)?))
            })
            .collect()
    }

    /// Why `practitioner` may open `patient`'s compartment: an active
    /// CareTeam with them as participant, one of the patient's encounters
    /// with them as participant that had not ended before
    /// `encounter_since` (UTC micros), or being the general practitioner.
    /// `None`: no relationship.
    pub async fn care_relation(
        &self,
        practitioner: &str,
        patient: &str,
        encounter_since: i64,
    ) -> Result<Option<&'static str>, FhirError> {
        let plans = self.relation_plans(practitioner, Some(patient), encounter_since)?;
        let this = self.clone();
        self.store()
            .read(move |tx| {
                Ok((|| {
                    for (kind, plan) in &plans {
                        if !this.matching_ids(tx, plan, 1)?.is_empty() {
                            return Ok(Some(*kind));
                        }
                    }
                    Ok(None)
                })())
            })
            .await
            .map_err(store_err)?
    }

    /// Every patient `practitioner` has a care relationship with (see
    /// [`Records::care_relation`]), at most `cap`.
    pub async fn related_patients(
        &self,
        practitioner: &str,
        encounter_since: i64,
        cap: usize,
    ) -> Result<Vec<String>, FhirError> {
        let plans = self.relation_plans(practitioner, None, encounter_since)?;
        let this = self.clone();
        self.store()
            .read(move |tx| {
                Ok((|| {
                    let mut out = std::collections::BTreeSet::new();
                    for (_, plan) in &plans {
                        if plan.confirm.is_empty() {
                            out.extend(tx.compartments(&plan.query, cap).map_err(store_err)?);
                        } else {
                            // Confirmed on the opened resources: their data
                            // keys tell their compartments.
                            let page = this.execute(tx, plan, None, false, cap, false)?;
                            out.extend(page.matches.iter().filter_map(|o| {
                                crate::access::compartment_of_key(&o.key_name).map(str::to_string)
                            }));
                        }
                    }
                    Ok(out.into_iter().take(cap).collect())
                })())
            })
            .await
            .map_err(store_err)?
    }

    /// The active Consent resources of one patient, or of every patient
    /// (`None`), at most `cap`.
    pub async fn active_consents(
        &self,
        patient: Option<&str>,
        cap: usize,
    ) -> Result<Vec<Value>, FhirError> {
        let mut params = vec![("status".to_string(), "active".to_string())];
        if let Some(p) = patient {
            params.push(("patient".into(), format!("Patient/{p}")));
        }
        let req = parse_search("Consent", &params, Handling::Strict)?;
        let mut plan = self.plan(&req)?;
        plan.query.limit = cap;
        let this = self.clone();
        self.store()
            .read(move |tx| {
                Ok((|| {
                    let q = IndexQuery {
                        filters: plan.query.filters.clone(),
                        ..IndexQuery::all("Consent", cap)
                    };
                    let mut out = Vec::new();
                    for sv in tx.search(&q).map_err(store_err)? {
                        out.push(this.open_version(tx, sv)?.resource);
                    }
                    Ok(out)
                })())
            })
            .await
            .map_err(store_err)?
    }

    /// Grows whenever a resource that can change a care relationship (see
    /// [`RELATION_TYPES`]) is written through this process.
    pub fn relations_generation(&self) -> u64 {
        self.relations_gen().load(Ordering::Acquire)
    }

    /// Grows whenever a Consent is written through this process.
    pub fn consents_generation(&self) -> u64 {
        self.consents_gen().load(Ordering::Acquire)
    }
}
