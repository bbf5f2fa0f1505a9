//! The registry of R4 search parameters, compiled from the official
//! SearchParameter definitions shipped in `data/`.
use serde_json::Value;

use crate::extract::IndexValue;
use crate::fhirpath::Expr;

/// The type of a search parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamKind {
    Number,
    Date,
    String,
    Token,
    Reference,
    Composite,
    Quantity,
    Uri,
    Special,
}

/// One search parameter as it applies to one resource type.
#[derive(Debug, Clone)]
pub struct SearchParam {
    /// The code used in queries (`family`, `birthdate`, `patient`).
    pub code: String,
    /// The canonical URL of the definition.
    pub url: String,
    pub kind: ParamKind,
    /// The FHIRPath expression from the definition.
    pub expression: String,
    /// Allowed target types for reference parameters.
    pub targets: Vec<String>,
    /// The compiled expression; `None` when the expression uses FHIRPath that
    /// Custos does not evaluate (such parameters are not indexed and are not
    /// advertised in the CapabilityStatement).
    pub program: Option<Expr>,
}

impl SearchParam {
    /// Whether Custos can index and search this parameter.
    pub fn supported(&self) -> bool {
        self.program.is_some() && !matches!(self.kind, ParamKind::Composite | ParamKind::Special)
    }

    /// The values `resource` carries for this parameter (empty if unsupported).
    pub fn extract(&self, resource: &Value) -> Vec<IndexValue> {
        let _ = resource;
        todo!("HELPER")
    }
}

/// All R4 search parameters, per resource type.
pub struct Registry {
    _private: (),
}

impl Registry {
    /// The parameter `code` on `resource_type` (including parameters defined
    /// on Resource / DomainResource, such as `_id`'s siblings `_profile`,
    /// `_tag`, `_security`, `_source`). `None` if R4 defines no such parameter.
    pub fn lookup(&self, resource_type: &str, code: &str) -> Option<&SearchParam> {
        let _ = (resource_type, code);
        todo!("HELPER")
    }

    /// Every parameter of `resource_type`, supported or not, sorted by code.
    pub fn for_type(&self, resource_type: &str) -> &[SearchParam] {
        let _ = resource_type;
        todo!("HELPER")
    }
}

/// The process-wide registry, built on first use.
pub fn registry() -> &'static Registry {
    todo!("HELPER")
}
