//! Search values carried by a resource, per search parameter type.
use serde_json::{Map, Value};

use crate::date::{DateRange, parse_range};
use crate::fhirpath::Node;
use crate::params::ParamKind;
use crate::types::{is_resource_type, is_valid_id};

/// One value a resource carries for one search parameter.
#[derive(Debug, Clone, PartialEq)]
pub enum IndexValue {
    /// token: `system` (if any) and `code` (Coding.code, Identifier.value,
    /// ContactPoint.value, a code, a boolean as "true"/"false").
    Token {
        /// The code system, if any.
        system: Option<String>,
        /// The code (never empty).
        code: String,
    },
    /// string: the raw (un-normalized) text of one part (HumanName.family,
    /// each given, Address.line, city, postalCode …, or a plain string).
    String(String),
    /// date: the range a date, dateTime, instant or Period covers.
    Date(DateRange),
    /// reference: the literal reference. `target_type`/`target_id` are set when
    /// it has the form `Type/id` (relative, or absolute ending in `Type/id`,
    /// optionally `/_history/n`); `raw` is the reference text as written.
    Reference {
        /// The target resource type, when the text names one.
        target_type: Option<String>,
        /// The target id, when the text names one.
        target_id: Option<String>,
        /// The reference text as written.
        raw: String,
    },
    /// quantity: value with its unit system and code.
    Quantity {
        /// The number.
        value: f64,
        /// The unit system (`urn:iso:std:iso:4217` for Money).
        system: Option<String>,
        /// The unit code (the human unit when no code is given; the currency for Money).
        code: Option<String>,
    },
    /// number.
    Number(f64),
    /// uri / canonical / url.
    Uri(String),
}

/// The resource type and id a literal reference points to: `Type/id`,
/// `Type/id/_history/n`, or an absolute `http(s)://…/Type/id[/_history/n]`,
/// where `Type` is an R4 resource type and `id` a valid id. `None` for
/// contained (`#id`), `urn:uuid:`/`urn:oid:` and anything else.
pub fn reference_target(raw: &str) -> Option<(&str, &str)> {
    if raw.starts_with('#') || raw.starts_with("urn:") {
        return None;
    }
    let path = if let Some(rest) = raw
        .strip_prefix("http://")
        .or_else(|| raw.strip_prefix("https://"))
    {
        // Drop the authority, any query or fragment.
        let rest = rest.split(['?', '#']).next().unwrap_or("");
        let slash = rest.find('/')?;
        &rest[slash + 1..]
    } else if raw.contains(':') {
        return None;
    } else {
        raw
    };
    let path = path.trim_end_matches('/');
    let mut segs: Vec<&str> = path.split('/').collect();
    if segs.len() >= 4 && segs[segs.len() - 2] == "_history" {
        segs.truncate(segs.len() - 2);
    }
    let relative = !raw.contains("://");
    if relative && segs.len() != 2 {
        return None;
    }
    match segs.as_slice() {
        [.., ty, id] if is_resource_type(ty) && is_valid_id(id) => Some((ty, id)),
        _ => None,
    }
}

/// The reference value of a literal reference string.
pub(crate) fn reference_value(raw: &str) -> IndexValue {
    let (target_type, target_id) = match reference_target(raw) {
        Some((t, id)) => (Some(t.to_string()), Some(id.to_string())),
        None => (None, None),
    };
    IndexValue::Reference {
        target_type,
        target_id,
        raw: raw.to_string(),
    }
}

/// Convert the nodes a search parameter's expression reached into index
/// values of the parameter's kind, appending to `out`.
pub(crate) fn nodes_to_values(kind: ParamKind, nodes: &[Node<'_>], out: &mut Vec<IndexValue>) {
    for node in nodes {
        match kind {
            ParamKind::Token => token_values(node.value, out),
            ParamKind::String => string_values(node.value, out),
            ParamKind::Date => date_values(node.value, out),
            ParamKind::Reference => reference_values(node.value, out),
            ParamKind::Quantity => quantity_values(node.value, out),
            ParamKind::Number => {
                if let Some(n) = node.value.as_f64().filter(|n| n.is_finite()) {
                    out.push(IndexValue::Number(n));
                }
            }
            ParamKind::Uri => {
                if let Some(s) = non_empty_str(node.value) {
                    out.push(IndexValue::Uri(s.to_string()));
                }
            }
            ParamKind::Composite | ParamKind::Special => {}
        }
    }
}

fn non_empty_str(v: &Value) -> Option<&str> {
    v.as_str().filter(|s| !s.is_empty())
}

fn str_field<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    map.get(key).and_then(non_empty_str)
}

const CONTACT_POINT_SYSTEMS: &[&str] = &["phone", "fax", "email", "pager", "url", "sms", "other"];

fn push_token(out: &mut Vec<IndexValue>, system: Option<&str>, code: &str) {
    if !code.is_empty() {
        out.push(IndexValue::Token {
            system: system.map(str::to_string),
            code: code.to_string(),
        });
    }
}

fn token_values(v: &Value, out: &mut Vec<IndexValue>) {
    match v {
        Value::String(s) => push_token(out, None, s),
        Value::Bool(b) => push_token(out, None, if *b { "true" } else { "false" }),
        Value::Number(n) if n.is_i64() || n.is_u64() => push_token(out, None, &n.to_string()),
        Value::Object(map) => {
            if let Some(Value::Array(codings)) = map.get("coding") {
                // CodeableConcept: each coding.
                for coding in codings {
                    if let Some(c) = coding.as_object()
                        && let Some(code) = str_field(c, "code")
                    {
                        push_token(out, str_field(c, "system"), code);
                    }
                }
            } else if let Some(code) = str_field(map, "code") {
                // Coding, Quantity and other coded objects.
                push_token(out, str_field(map, "system"), code);
            } else if let Some(value) = str_field(map, "value") {
                let system = str_field(map, "system");
                if system.is_some_and(|s| CONTACT_POINT_SYSTEMS.contains(&s))
                    || map.contains_key("rank")
                {
                    // ContactPoint: searched by value alone.
                    push_token(out, None, value);
                } else {
                    // Identifier.
                    push_token(out, system, value);
                }
            }
        }
        _ => {}
    }
}

const NAME_PARTS: &[&str] = &["family", "given", "prefix", "suffix"];
const ADDRESS_PARTS: &[&str] = &["line", "city", "district", "state", "postalCode", "country"];

fn string_values(v: &Value, out: &mut Vec<IndexValue>) {
    match v {
        Value::String(s) if !s.is_empty() => out.push(IndexValue::String(s.clone())),
        Value::Object(map) => {
            let is_name = NAME_PARTS.iter().any(|k| map.contains_key(*k));
            let is_address = ADDRESS_PARTS.iter().any(|k| map.contains_key(*k));
            let text_only = !is_name
                && !is_address
                && map.contains_key("text")
                && map.keys().all(|k| {
                    matches!(
                        k.as_str(),
                        "text" | "use" | "type" | "period" | "id" | "extension"
                    )
                });
            if !(is_name || is_address || text_only) {
                return;
            }
            let parts: &[&str] = if is_name { NAME_PARTS } else { ADDRESS_PARTS };
            for key in parts.iter().chain(std::iter::once(&"text")) {
                match map.get(*key) {
                    Some(Value::String(s)) if !s.is_empty() => {
                        out.push(IndexValue::String(s.clone()))
                    }
                    Some(Value::Array(items)) => {
                        for s in items.iter().filter_map(non_empty_str) {
                            out.push(IndexValue::String(s.to_string()));
                        }
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

fn date_values(v: &Value, out: &mut Vec<IndexValue>) {
    match v {
        Value::String(s) => {
            if let Some(r) = parse_range(s) {
                out.push(IndexValue::Date(r));
            }
        }
        Value::Object(map) => {
            if map.contains_key("start") || map.contains_key("end") {
                // Period: open ends extend to the end of time.
                let start = match map.get("start") {
                    None => Some(i64::MIN),
                    Some(s) => s.as_str().and_then(parse_range).map(|r| r.start),
                };
                let end = match map.get("end") {
                    None => Some(i64::MAX),
                    Some(s) => s.as_str().and_then(parse_range).map(|r| r.end),
                };
                if let (Some(start), Some(end)) = (start, end)
                    && start < end
                {
                    out.push(IndexValue::Date(DateRange { start, end }));
                }
            } else if let Some(Value::Array(events)) = map.get("event") {
                // Timing: each event.
                for r in events
                    .iter()
                    .filter_map(Value::as_str)
                    .filter_map(parse_range)
                {
                    out.push(IndexValue::Date(r));
                }
            }
        }
        _ => {}
    }
}

fn reference_values(v: &Value, out: &mut Vec<IndexValue>) {
    match v {
        Value::Object(map) => {
            if let Some(raw) = str_field(map, "reference") {
                out.push(reference_value(raw));
            }
        }
        // canonical / uri: kept as written.
        Value::String(s) if !s.is_empty() => out.push(IndexValue::Reference {
            target_type: None,
            target_id: None,
            raw: s.clone(),
        }),
        _ => {}
    }
}

fn quantity_values(v: &Value, out: &mut Vec<IndexValue>) {
    let Value::Object(map) = v else { return };
    let Some(value) = map
        .get("value")
        .and_then(Value::as_f64)
        .filter(|n| n.is_finite())
    else {
        return;
    };
    if let Some(currency) = str_field(map, "currency") {
        // Money.
        out.push(IndexValue::Quantity {
            value,
            system: Some("urn:iso:std:iso:4217".to_string()),
            code: Some(currency.to_string()),
        });
        return;
    }
    let code = str_field(map, "code");
    let system = str_field(map, "system");
    let (system, code) = match code {
        Some(c) => (system, Some(c)),
        // No coded unit: the human unit stands in, in no system.
        None => (None, str_field(map, "unit")),
    };
    out.push(IndexValue::Quantity {
        value,
        system: system.map(str::to_string),
        code: code.map(str::to_string),
    });
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn values(kind: ParamKind, v: Value) -> Vec<IndexValue> {
        let mut out = Vec::new();
        nodes_to_values(
            kind,
            &[Node {
                value: &v,
                choice_type: None,
            }],
            &mut out,
        );
        out
    }

    fn tok(system: Option<&str>, code: &str) -> IndexValue {
        IndexValue::Token {
            system: system.map(str::to_string),
            code: code.to_string(),
        }
    }

    #[test]
    fn reference_targets() {
        assert_eq!(reference_target("Patient/123"), Some(("Patient", "123")));
        assert_eq!(
            reference_target("Patient/123/_history/2"),
            Some(("Patient", "123"))
        );
        assert_eq!(
            reference_target("http://example.org/fhir/Patient/123"),
            Some(("Patient", "123"))
        );
        assert_eq!(
            reference_target("https://example.org/Patient/a.b-c/_history/7"),
            Some(("Patient", "a.b-c"))
        );
        assert_eq!(
            reference_target("https://example.org/Patient/1?x=y"),
            Some(("Patient", "1"))
        );
        assert_eq!(reference_target("Patient/"), None);
        assert_eq!(reference_target("Patient"), None);
        assert_eq!(reference_target("Foo/1"), None);
        assert_eq!(reference_target("a/Patient/1"), None);
        assert_eq!(reference_target("Patient/1/2"), None);
        assert_eq!(reference_target("Patient/bad id"), None);
        assert_eq!(reference_target("#p1"), None);
        assert_eq!(
            reference_target("urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0"),
            None
        );
        assert_eq!(reference_target("urn:oid:1.2.3"), None);
        assert_eq!(reference_target("http://example.org"), None);
        assert_eq!(
            reference_target("http://example.org/fhir/StructureDefinition"),
            None
        );
    }

    #[test]
    fn tokens() {
        assert_eq!(
            values(ParamKind::Token, json!("male")),
            vec![tok(None, "male")]
        );
        assert_eq!(
            values(ParamKind::Token, json!(true)),
            vec![tok(None, "true")]
        );
        assert_eq!(
            values(ParamKind::Token, json!(false)),
            vec![tok(None, "false")]
        );
        assert_eq!(values(ParamKind::Token, json!("")), vec![]);
        assert_eq!(
            values(
                ParamKind::Token,
                json!({"coding": [{"system": "http://loinc.org", "code": "1"}, {"code": "2"}, {"display": "x"}], "text": "t"})
            ),
            vec![tok(Some("http://loinc.org"), "1"), tok(None, "2")]
        );
        assert_eq!(
            values(
                ParamKind::Token,
                json!({"system": "s", "code": "c", "display": "d"})
            ),
            vec![tok(Some("s"), "c")]
        );
        assert_eq!(
            values(
                ParamKind::Token,
                json!({"system": "urn:oid:1.2.36", "value": "12345", "use": "usual"})
            ),
            vec![tok(Some("urn:oid:1.2.36"), "12345")]
        );
        assert_eq!(
            values(ParamKind::Token, json!({"system": "phone", "value": "555"})),
            vec![tok(None, "555")]
        );
        assert_eq!(
            values(ParamKind::Token, json!({"value": "x@y"})),
            vec![tok(None, "x@y")]
        );
        assert_eq!(
            values(
                ParamKind::Token,
                json!({"value": 5, "system": "http://unitsofmeasure.org", "code": "mg"})
            ),
            vec![tok(Some("http://unitsofmeasure.org"), "mg")]
        );
        assert_eq!(
            values(ParamKind::Token, json!({"reference": "Patient/1"})),
            vec![]
        );
    }

    #[test]
    fn strings() {
        assert_eq!(
            values(ParamKind::String, json!("abc")),
            vec![IndexValue::String("abc".into())]
        );
        let name = json!({"use": "official", "family": "Chalmers", "given": ["Peter", "James"], "prefix": ["Mr"], "suffix": ["Jr"], "text": "Peter Chalmers"});
        let got: Vec<String> = values(ParamKind::String, name)
            .into_iter()
            .map(|v| match v {
                IndexValue::String(s) => s,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            got,
            ["Chalmers", "Peter", "James", "Mr", "Jr", "Peter Chalmers"]
        );
        let addr = json!({"line": ["1 Main St", "Apt 2"], "city": "Springfield", "district": "D", "state": "IL", "postalCode": "62701", "country": "US", "text": "T"});
        assert_eq!(values(ParamKind::String, addr).len(), 8);
        assert_eq!(
            values(ParamKind::String, json!({"text": "only text"})),
            vec![IndexValue::String("only text".into())]
        );
        assert_eq!(
            values(ParamKind::String, json!({"coding": [{"code": "x"}]})),
            vec![]
        );
        assert_eq!(values(ParamKind::String, json!(5)), vec![]);
    }

    #[test]
    fn dates() {
        let d = parse_range("2020-01-02").unwrap();
        assert_eq!(
            values(ParamKind::Date, json!("2020-01-02")),
            vec![IndexValue::Date(d)]
        );
        assert_eq!(values(ParamKind::Date, json!("not a date")), vec![]);
        let p = values(
            ParamKind::Date,
            json!({"start": "2020-01-01", "end": "2020-01-31"}),
        );
        assert_eq!(
            p,
            vec![IndexValue::Date(DateRange {
                start: parse_range("2020-01-01").unwrap().start,
                end: parse_range("2020-01-31").unwrap().end
            })]
        );
        let open = values(ParamKind::Date, json!({"start": "2020-01-01"}));
        assert_eq!(
            open,
            vec![IndexValue::Date(DateRange {
                start: parse_range("2020-01-01").unwrap().start,
                end: i64::MAX
            })]
        );
        let open = values(ParamKind::Date, json!({"end": "2020-01-01"}));
        assert_eq!(
            open,
            vec![IndexValue::Date(DateRange {
                start: i64::MIN,
                end: parse_range("2020-01-01").unwrap().end
            })]
        );
        assert_eq!(values(ParamKind::Date, json!({"start": "garbage"})), vec![]);
        assert_eq!(
            values(
                ParamKind::Date,
                json!({"start": "2021-01-01", "end": "2020-01-01"})
            ),
            vec![]
        );
        let timing = values(
            ParamKind::Date,
            json!({"event": ["2020-01-01", "bad", "2020-02-01T10:00:00Z"]}),
        );
        assert_eq!(timing.len(), 2);
    }

    #[test]
    fn references() {
        assert_eq!(
            values(
                ParamKind::Reference,
                json!({"reference": "Patient/1", "display": "x"})
            ),
            vec![IndexValue::Reference {
                target_type: Some("Patient".into()),
                target_id: Some("1".into()),
                raw: "Patient/1".into()
            }]
        );
        assert_eq!(
            values(ParamKind::Reference, json!({"reference": "urn:uuid:abc"})),
            vec![IndexValue::Reference {
                target_type: None,
                target_id: None,
                raw: "urn:uuid:abc".into()
            }]
        );
        assert_eq!(
            values(
                ParamKind::Reference,
                json!("http://example.org/Questionnaire/q")
            ),
            vec![IndexValue::Reference {
                target_type: None,
                target_id: None,
                raw: "http://example.org/Questionnaire/q".into()
            }]
        );
        assert_eq!(
            values(ParamKind::Reference, json!({"identifier": {"value": "x"}})),
            vec![]
        );
    }

    #[test]
    fn quantities_numbers_uris() {
        assert_eq!(
            values(
                ParamKind::Quantity,
                json!({"value": 5.4, "unit": "mg", "system": "http://unitsofmeasure.org", "code": "mg"})
            ),
            vec![IndexValue::Quantity {
                value: 5.4,
                system: Some("http://unitsofmeasure.org".into()),
                code: Some("mg".into())
            }]
        );
        assert_eq!(
            values(ParamKind::Quantity, json!({"value": 5, "unit": "tablets"})),
            vec![IndexValue::Quantity {
                value: 5.0,
                system: None,
                code: Some("tablets".into())
            }]
        );
        assert_eq!(
            values(
                ParamKind::Quantity,
                json!({"value": 12.5, "currency": "EUR"})
            ),
            vec![IndexValue::Quantity {
                value: 12.5,
                system: Some("urn:iso:std:iso:4217".into()),
                code: Some("EUR".into())
            }]
        );
        assert_eq!(
            values(ParamKind::Quantity, json!({"low": {"value": 1}})),
            vec![]
        );
        assert_eq!(
            values(ParamKind::Number, json!(3)),
            vec![IndexValue::Number(3.0)]
        );
        assert_eq!(values(ParamKind::Number, json!("3")), vec![]);
        assert_eq!(
            values(ParamKind::Uri, json!("http://x")),
            vec![IndexValue::Uri("http://x".into())]
        );
        assert_eq!(values(ParamKind::Composite, json!("x")), vec![]);
    }
}
