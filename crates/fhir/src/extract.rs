//! Search values carried by a resource, per search parameter type.
use crate::date::DateRange;

/// One value a resource carries for one search parameter.
#[derive(Debug, Clone, PartialEq)]
pub enum IndexValue {
    /// token: `system` (if any) and `code` (Coding.code, Identifier.value,
    /// ContactPoint.value, a code, a boolean as "true"/"false").
    Token { system: Option<String>, code: String },
    /// string: the raw (un-normalized) text of one part (HumanName.family,
    /// each given, Address.line, city, postalCode …, or a plain string).
    String(String),
    /// date: the range a date, dateTime, instant or Period covers.
    Date(DateRange),
    /// reference: the literal reference. `target_type`/`target_id` are set when
    /// it has the form `Type/id` (relative, or absolute ending in `Type/id`,
    /// optionally `/_history/n`); `raw` is the reference text as written.
    Reference { target_type: Option<String>, target_id: Option<String>, raw: String },
    /// quantity: value with its unit system and code.
    Quantity { value: f64, system: Option<String>, code: Option<String> },
    /// number.
    Number(f64),
    /// uri / canonical / url.
    Uri(String),
}
