//! From a resource to its index rows, and from a search value to the rows
//! it looks for. Both directions go through the same token functions, so a
//! query can never ask for a token the indexer does not write.
//!
//! What the database learns:
//! * **Blind tokens** (HMAC under the index key) for tokens, strings,
//!   references, URIs and the dates of people (birth and death dates):
//!   equality of values is visible, the values are not.
//! * **String prefixes**: each string part is indexed by the tokens of its
//!   normalized prefixes of 1 to [`PREFIX_MAX`] characters, so R4 prefix
//!   search needs no clear text. This reveals which values share a prefix —
//!   the price of prefix search over blind indexes; longer queries are
//!   confirmed on the opened resource.
//! * **Clear ranges** for clinical dates, numbers and quantities, which
//!   need ordering and range comparison. They carry no identity (the
//!   resource they belong to is a random id and its body is sealed).
use custos_crypto::BlindIndexer;
use custos_fhir::IndexValue;
use custos_fhir::date::DateRange;
use custos_fhir::normalize::search_string;
use custos_fhir::params::SearchParam;
use custos_store::{IndexEntries, RangeEntry, Token};
use serde_json::Value;

/// Longest string prefix indexed, in characters.
pub const PREFIX_MAX: usize = 12;

/// Resource types whose date parameters identify a person (birth, death)
/// and are therefore blind-indexed instead of stored as clear ranges.
const PERSON_TYPES: &[&str] = &["Patient", "Person", "Practitioner", "RelatedPerson"];

/// Whether a date parameter of `rtype` is blind-indexed.
pub fn blind_date(rtype: &str) -> bool {
    PERSON_TYPES.contains(&rtype)
}

/// The stable key of a range parameter (optionally qualified by a unit).
/// FNV-1a: not a secret, only a compact stable id for `(type, param, unit)`.
pub fn range_pkey(rtype: &str, code: &str, unit: Option<&str>) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    };
    feed(rtype.as_bytes());
    feed(code.as_bytes());
    if let Some(u) = unit {
        feed(u.as_bytes());
    }
    h as i64
}

/// Token derivation for one (type, parameter).
pub struct Tokens<'a> {
    blind: &'a BlindIndexer,
    rtype: &'a str,
    code: &'a str,
}

impl<'a> Tokens<'a> {
    pub fn new(blind: &'a BlindIndexer, rtype: &'a str, code: &'a str) -> Tokens<'a> {
        Tokens { blind, rtype, code }
    }
    fn t(&self, kind: &[u8], parts: &[&[u8]]) -> Token {
        let mut all: Vec<&[u8]> = Vec::with_capacity(3 + parts.len());
        all.push(self.rtype.as_bytes());
        all.push(self.code.as_bytes());
        all.push(kind);
        all.extend_from_slice(parts);
        self.blind.token(&all)
    }
    /// Token code in any system.
    pub fn code(&self, code: &str) -> Token {
        self.t(b"c", &[code.as_bytes()])
    }
    /// Token `system|code`.
    pub fn system_code(&self, system: &str, code: &str) -> Token {
        self.t(b"sc", &[system.as_bytes(), code.as_bytes()])
    }
    /// A normalized string prefix (at most [`PREFIX_MAX`] characters).
    pub fn prefix(&self, normalized_prefix: &str) -> Token {
        self.t(b"p", &[normalized_prefix.as_bytes()])
    }
    /// The exact, un-normalized string (`:exact`).
    pub fn exact(&self, raw: &str) -> Token {
        self.t(b"x", &[raw.as_bytes()])
    }
    /// A reference to `Type/id`.
    pub fn reference(&self, rtype: &str, id: &str) -> Token {
        self.t(b"r", &[rtype.as_bytes(), id.as_bytes()])
    }
    /// A URI, or a reference kept as written (absolute URL, canonical).
    pub fn uri(&self, uri: &str) -> Token {
        self.t(b"u", &[uri.as_bytes()])
    }
    /// A blind date at a precision: `y` (YYYY), `m` (YYYY-MM) or `d` (YYYY-MM-DD).
    pub fn date(&self, precision: &[u8], text: &str) -> Token {
        self.t(precision, &[text.as_bytes()])
    }
}

/// The first `n` characters of `s`.
pub fn char_prefix(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Year, month and day of a UTC-micros instant.
pub fn ymd(micros: i64) -> Option<(i32, u8, u8)> {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(micros as i128 * 1000).ok()?;
    Some((t.year(), t.month() as u8, t.day()))
}

/// Compute the index rows of `resource` (of type `rtype`).
pub fn index_resource(
    blind: &BlindIndexer,
    rtype: &str,
    resource: &Value,
    params: &[SearchParam],
) -> IndexEntries {
    let mut out = IndexEntries::default();
    for p in params {
        // `_id` and `_lastUpdated` are answered by the current-row columns.
        if !p.supported() || p.code == "_id" || p.code == "_lastUpdated" {
            continue;
        }
        let values = p.extract(resource);
        if values.is_empty() {
            continue;
        }
        let tk = Tokens::new(blind, rtype, &p.code);
        for v in &values {
            index_value(&tk, rtype, p, v, &mut out);
        }
    }
    out.tokens.sort_unstable();
    out.tokens.dedup();
    out
}

/// The rows of one value. Kept lean on purpose (every row is a B-tree
/// insert on the ingest path): rarer query forms (`system|` alone, `|code`,
/// a quantity by code alone, `:missing`) are answered through a coarser row
/// and confirmed on the opened resource.
fn index_value(
    tk: &Tokens<'_>,
    rtype: &str,
    p: &SearchParam,
    v: &IndexValue,
    out: &mut IndexEntries,
) {
    match v {
        IndexValue::Token { system, code } => {
            out.tokens.push(tk.code(code));
            if let Some(s) = system {
                out.tokens.push(tk.system_code(s, code));
            }
        }
        IndexValue::String(raw) => {
            out.tokens.push(tk.exact(raw));
            let n = search_string(raw);
            for (count, (i, c)) in n.char_indices().enumerate() {
                if count >= PREFIX_MAX {
                    break;
                }
                out.tokens.push(tk.prefix(&n[..i + c.len_utf8()]));
            }
        }
        IndexValue::Date(range) if blind_date(rtype) => {
            for (precision, text) in blind_date_texts(range) {
                out.tokens.push(tk.date(precision, &text));
            }
        }
        IndexValue::Date(range) => out.ranges.push(RangeEntry {
            pkey: range_pkey(rtype, &p.code, None),
            lo: clamp_micros(range.start),
            hi: clamp_micros(range.end),
            sortable: true,
        }),
        IndexValue::Reference {
            target_type: Some(t),
            target_id: Some(id),
            ..
        } => {
            out.tokens.push(tk.reference(t, id));
        }
        IndexValue::Reference { raw, .. } => out.tokens.push(tk.uri(raw)),
        IndexValue::Quantity {
            value,
            system,
            code,
        } => {
            let plain = RangeEntry {
                pkey: range_pkey(rtype, &p.code, None),
                lo: *value,
                hi: *value,
                sortable: false,
            };
            out.ranges.push(plain);
            if let Some(unit) = quantity_unit(system.as_deref(), code.as_deref()) {
                out.ranges.push(RangeEntry {
                    pkey: range_pkey(rtype, &p.code, Some(&unit)),
                    ..plain
                });
            }
        }
        IndexValue::Number(x) => out.ranges.push(RangeEntry {
            pkey: range_pkey(rtype, &p.code, None),
            lo: *x,
            hi: *x,
            sortable: false,
        }),
        IndexValue::Uri(u) => out.tokens.push(tk.uri(u)),
    }
}

/// The unit key of a quantity: `system|code` when both are known.
pub fn quantity_unit(system: Option<&str>, code: Option<&str>) -> Option<String> {
    match (system, code) {
        (Some(s), Some(c)) => Some(format!("{s}|{c}")),
        _ => None,
    }
}

/// Micros as f64, clamped to the span where f64 is exact (about ±285 years
/// from 1970 at microsecond precision; beyond it precision degrades gracefully).
pub fn clamp_micros(m: i64) -> f64 {
    m.clamp(-(1i64 << 62), 1i64 << 62) as f64
}

/// The blind texts of a person's date: year, month and day of its start.
pub fn blind_date_texts(range: &DateRange) -> Vec<(&'static [u8], String)> {
    let Some((y, m, d)) = ymd(range.start) else {
        return Vec::new();
    };
    let mut out = vec![(&b"y"[..], format!("{y:04}"))];
    let width = range.end.saturating_sub(range.start);
    const DAY: i64 = 86_400_000_000;
    if width <= 31 * DAY {
        out.push((&b"m"[..], format!("{y:04}-{m:02}")));
    }
    if width <= DAY {
        out.push((&b"d"[..], format!("{y:04}-{m:02}-{d:02}")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_char_based() {
        assert_eq!(char_prefix("zoë", 2), "zo");
        assert_eq!(char_prefix("zoë", 3), "zoë");
        assert_eq!(char_prefix("ab", 5), "ab");
    }

    #[test]
    fn pkeys_are_stable_and_distinct() {
        assert_eq!(
            range_pkey("Observation", "date", None),
            range_pkey("Observation", "date", None)
        );
        assert_ne!(
            range_pkey("Observation", "date", None),
            range_pkey("Encounter", "date", None)
        );
        assert_ne!(
            range_pkey("Observation", "value-quantity", None),
            range_pkey("Observation", "value-quantity", Some("kg"))
        );
        assert_ne!(range_pkey("ab", "c", None), range_pkey("a", "bc", None));
    }
}
