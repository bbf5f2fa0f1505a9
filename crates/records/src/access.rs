//! Access control, as seen from the record service.
//!
//! The record service does not decide who may see what; it asks a
//! [`Guard`] at every point where data would be touched or returned, and
//! pushes the answer for searches down into the index query (so that
//! totals, paging and `_include` never see what the caller may not). The
//! policy itself lives in `custos-auth`.
use custos_fhir::FhirError;

/// An interaction, grouped as SMART v2 scope letters group them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Interaction {
    /// `c`: create.
    Create,
    /// `r`: read, vread, instance history.
    Read,
    /// `u`: update.
    Update,
    /// `d`: delete.
    Delete,
    /// `s`: search, type and system history.
    Search,
}

impl Interaction {
    /// The SMART v2 scope letter.
    pub fn letter(self) -> char {
        match self {
            Interaction::Create => 'c',
            Interaction::Read => 'r',
            Interaction::Update => 'u',
            Interaction::Delete => 'd',
            Interaction::Search => 's',
        }
    }

    /// Every interaction, in scope-letter order.
    pub const ALL: [Interaction; 5] = [
        Interaction::Create,
        Interaction::Read,
        Interaction::Update,
        Interaction::Delete,
        Interaction::Search,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Interaction::Create => "create",
            Interaction::Read => "read",
            Interaction::Update => "update",
            Interaction::Delete => "delete",
            Interaction::Search => "search",
        }
    }
}

/// Which resources a search or history may return.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Visibility {
    /// Everything of the type.
    All,
    /// Only resources in these patients' compartments and, with `shared`,
    /// resources in no patient's compartment.
    Only { patients: Vec<String>, shared: bool },
    /// Everything except what lies in these patients' compartments.
    Except { patients: Vec<String> },
}

impl Visibility {
    /// The index filter that enforces this visibility, if any.
    pub fn filter(&self) -> Option<custos_store::Filter> {
        match self {
            Visibility::All => None,
            Visibility::Only { patients, shared } => Some(custos_store::Filter::Visible {
                patients: patients.clone(),
                shared: *shared,
            }),
            Visibility::Except { patients } => Some(custos_store::Filter::Hidden(patients.clone())),
        }
    }
}

/// The questions the record service asks before touching data. One guard
/// stands for one caller (and records the decisions it makes).
#[async_trait::async_trait]
pub trait Guard: Send + Sync {
    /// May the caller do `interaction` on resources of `rtype` at all?
    /// Asked before any data is read, so a refusal reveals nothing.
    async fn check_type(&self, interaction: Interaction, rtype: &str) -> Result<(), FhirError>;

    /// What a search (or a type history) of `rtype` may return; `None` is
    /// the whole system (system history). `focus` is the one patient the
    /// request names, if it names one (`Observation?patient=X`): a caller
    /// allowed to break the glass may be let into that compartment.
    async fn visibility(
        &self,
        interaction: Interaction,
        rtype: Option<&str>,
        focus: Option<&str>,
    ) -> Result<Visibility, FhirError>;

    /// May the caller do `interaction` on this one resource, which lies in
    /// `compartment`'s Patient compartment (`None`: in no patient's)?
    async fn check_resource(
        &self,
        interaction: Interaction,
        rtype: &str,
        id: &str,
        compartment: Option<&str>,
    ) -> Result<(), FhirError>;

    /// May this resource, which the request did not name (an `_include`
    /// target), be returned? Never widens access (no new break-the-glass).
    async fn may_include(&self, rtype: &str, id: &str, compartment: Option<&str>) -> bool {
        self.check_resource(Interaction::Read, rtype, id, compartment)
            .await
            .is_ok()
    }

    /// True if this guard never refuses (internal callers: the CLI, the demo loader).
    fn unrestricted(&self) -> bool {
        false
    }
}

/// The guard of trusted in-process callers: allows everything.
pub struct Unrestricted;

#[async_trait::async_trait]
impl Guard for Unrestricted {
    async fn check_type(&self, _: Interaction, _: &str) -> Result<(), FhirError> {
        Ok(())
    }
    async fn visibility(
        &self,
        _: Interaction,
        _: Option<&str>,
        _: Option<&str>,
    ) -> Result<Visibility, FhirError> {
        Ok(Visibility::All)
    }
    async fn check_resource(
        &self,
        _: Interaction,
        _: &str,
        _: &str,
        _: Option<&str>,
    ) -> Result<(), FhirError> {
        Ok(())
    }
    fn unrestricted(&self) -> bool {
        true
    }
}

/// The one patient a search names, if any: `Patient?_id=X`, or a
/// `patient`/`subject` parameter with a single `Patient/X` (or, for
/// `patient`, a bare `X`).
pub fn focus_patient(rtype: &str, params: &[(String, String)]) -> Option<String> {
    let single = |v: &str| (!v.contains(',')).then(|| v.to_string());
    for (k, v) in params {
        // A modified parameter (`patient:missing`, `subject:not`) names no one.
        if k.contains(':') {
            continue;
        }
        let name = k.as_str();
        match (rtype, name) {
            ("Patient", "_id") => return single(v),
            (_, "patient") | (_, "subject") => {
                if let Some(id) = v.strip_prefix("Patient/") {
                    return single(id);
                }
                if name == "patient" && !v.contains('/') {
                    return single(v);
                }
            }
            _ => {}
        }
    }
    None
}

/// The patient whose compartment a data key belongs to (`patient/{id}` → `id`).
pub fn compartment_of_key(key_name: &str) -> Option<&str> {
    key_name.strip_prefix("patient/")
}

/// A change a write committed, as the audit trail records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// `create`, `update`, `delete` or `erase`.
    pub interaction: &'static str,
    pub rtype: String,
    pub id: String,
    pub version: i64,
    /// The patient whose compartment the resource is in.
    pub patient: Option<String>,
}

/// Appends the audit event of a write inside the write's own transaction,
/// so that no change commits without its record: an error here fails the
/// write. Set on a handle with [`crate::Records::audited`].
pub trait WriteAudit: Send + Sync {
    fn record(
        &self,
        tx: &mut dyn custos_store::WriteTx,
        changes: &[Change],
    ) -> Result<(), custos_store::StoreError>;
}
