//! Search queries: parsing the R4 search syntax and matching an opened
//! resource against it.
use serde_json::Value;

use crate::date::{DateRange, parse_range};
use crate::error::{FhirError, Result};
use crate::extract::IndexValue;
use crate::normalize::search_string;
use crate::params::{ParamKind, SearchParam, registry};
use crate::types::{is_resource_type, is_valid_id};

/// What to do with unknown or unsupported parameters (the `Prefer: handling=` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Handling {
    /// Reject with 400.
    Strict,
    /// Ignore, and report them in [`SearchRequest::ignored`].
    #[default]
    Lenient,
}

/// A comparison prefix (`eq`, `ne`, `gt`, `lt`, `ge`, `le`, `sa`, `eb`, `ap`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prefix {
    /// `eq` (the default): the resource value lies within the query range.
    #[default]
    Eq,
    /// `ne`: not `eq`.
    Ne,
    /// `gt`: the resource value extends above the query value.
    Gt,
    /// `lt`: the resource value extends below the query value.
    Lt,
    /// `ge`: `gt` or `eq`.
    Ge,
    /// `le`: `lt` or `eq`.
    Le,
    /// `sa`: starts after the query value.
    Sa,
    /// `eb`: ends before the query value.
    Eb,
    /// `ap`: approximately equal.
    Ap,
}

/// A search modifier (`:exact`, `:missing=true` …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Modifier {
    /// `:exact` (string): exact, case- and accent-sensitive equality.
    Exact,
    /// `:contains` (string): normalized substring.
    Contains,
    /// `:missing` (any type): values are [`SearchValue::Missing`].
    Missing,
    /// `:not` (token, `_id`): no value matches.
    Not,
    /// `:text` (token): normalized prefix of the text or display.
    Text,
    /// `:above` (not supported).
    Above,
    /// `:below` (not supported).
    Below,
    /// `:in` (not supported).
    In,
    /// `:not-in` (not supported).
    NotIn,
    /// `:of-type` (not supported).
    OfType,
    /// `:identifier` (reference): matches `Reference.identifier`; values are tokens.
    Identifier,
    /// `:Patient` on a reference parameter.
    Type(String),
}

/// The system part of a token query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSystem {
    /// `code`: any system.
    Any,
    /// `|code`: no system.
    None,
    /// `system|code` or `system|`.
    Is(String),
}

/// One alternative value of a clause (values separated by `,` are OR-ed).
#[derive(Debug, Clone, PartialEq)]
pub enum SearchValue {
    /// `code` is `None` for `system|` (any code in the system).
    Token {
        /// The system constraint.
        system: TokenSystem,
        /// The code, or `None` for any code in the system.
        code: Option<String>,
    },
    /// The raw query text (normalize with [`crate::normalize::search_string`] unless `:exact`).
    String(String),
    /// A date with its prefix, as the range it covers.
    Date {
        /// The comparison.
        prefix: Prefix,
        /// The range the query date covers.
        range: DateRange,
    },
    /// `Type/id`, a bare `id` (type from the modifier or the parameter's single
    /// target), or an absolute URL kept in `id` with `target_type: None`.
    Reference {
        /// The target type, when known.
        target_type: Option<String>,
        /// The id, or the absolute URL when `target_type` is `None` and it contains `:`.
        id: String,
    },
    /// `[prefix]value[|system|code]`.
    Quantity {
        /// The comparison.
        prefix: Prefix,
        /// The number.
        value: f64,
        /// The unit system, if given.
        system: Option<String>,
        /// The unit code, if given.
        code: Option<String>,
    },
    /// `[prefix]value`.
    Number {
        /// The comparison.
        prefix: Prefix,
        /// The number.
        value: f64,
    },
    /// A uri, compared exactly.
    Uri(String),
    /// The `true`/`false` of `:missing`.
    Missing(bool),
}

/// What a clause searches on.
#[derive(Debug, Clone)]
pub enum ClauseParam {
    /// `_id`: values are [`SearchValue::Token`] with `system: Any`.
    Id,
    /// `_lastUpdated`: values are [`SearchValue::Date`].
    LastUpdated,
    /// A registry parameter.
    Param(&'static SearchParam),
}

/// One `name[:modifier]=v1,v2` of a query. Clauses are AND-ed.
#[derive(Debug, Clone)]
pub struct Clause {
    /// The parameter searched on.
    pub param: ClauseParam,
    /// The modifier after the colon, if any.
    pub modifier: Option<Modifier>,
    /// The alternatives (OR-ed); never empty.
    pub values: Vec<SearchValue>,
}

/// A sort key from `_sort` (`-date` is descending).
#[derive(Debug, Clone)]
pub struct SortKey {
    /// The parameter sorted on.
    pub param: ClauseParam,
    /// `-name`: descending.
    pub descending: bool,
}

/// `_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TotalMode {
    /// `none`: no total.
    None,
    /// `estimate`: an estimate is enough.
    Estimate,
    /// `accurate` (the default): an exact total.
    #[default]
    Accurate,
}

/// `_include` / `_revinclude` (`Type:param[:target]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Include {
    /// The resource type holding the reference.
    pub source_type: String,
    /// The reference parameter's code, or `*` for all of them.
    pub param: String,
    /// Only references to this type, if given.
    pub target_type: Option<String>,
}

/// A parsed search on one resource type.
#[derive(Debug, Clone, Default)]
pub struct SearchRequest {
    /// The resource type searched.
    pub resource_type: String,
    /// The search criteria, AND-ed.
    pub clauses: Vec<Clause>,
    /// `_sort` keys, most significant first.
    pub sort: Vec<SortKey>,
    /// `_count` (`None`: the server default).
    pub count: Option<usize>,
    /// `_total`.
    pub total: TotalMode,
    /// `_include`s.
    pub include: Vec<Include>,
    /// `_revinclude`s.
    pub revinclude: Vec<Include>,
    /// `_summary=count` asks for the total only.
    pub summary_count: bool,
    /// Opaque paging cursor (`_cursor`), produced by the server in `next`/`previous` links.
    pub cursor: Option<String>,
    /// Parameters ignored under lenient handling (reported back in the Bundle).
    pub ignored: Vec<String>,
}

impl Prefix {
    /// The prefix written as its two-letter code (`"ge"`).
    pub fn code(self) -> &'static str {
        match self {
            Prefix::Eq => "eq",
            Prefix::Ne => "ne",
            Prefix::Gt => "gt",
            Prefix::Lt => "lt",
            Prefix::Ge => "ge",
            Prefix::Le => "le",
            Prefix::Sa => "sa",
            Prefix::Eb => "eb",
            Prefix::Ap => "ap",
        }
    }

    fn from_code(code: &str) -> Option<Prefix> {
        Some(match code {
            "eq" => Prefix::Eq,
            "ne" => Prefix::Ne,
            "gt" => Prefix::Gt,
            "lt" => Prefix::Lt,
            "ge" => Prefix::Ge,
            "le" => Prefix::Le,
            "sa" => Prefix::Sa,
            "eb" => Prefix::Eb,
            "ap" => Prefix::Ap,
            _ => return None,
        })
    }
}

impl Modifier {
    /// The modifier as written after the colon (`"exact"`, `"Patient"`).
    pub fn code(&self) -> &str {
        match self {
            Modifier::Exact => "exact",
            Modifier::Contains => "contains",
            Modifier::Missing => "missing",
            Modifier::Not => "not",
            Modifier::Text => "text",
            Modifier::Above => "above",
            Modifier::Below => "below",
            Modifier::In => "in",
            Modifier::NotIn => "not-in",
            Modifier::OfType => "of-type",
            Modifier::Identifier => "identifier",
            Modifier::Type(t) => t,
        }
    }
}

impl ClauseParam {
    /// The name of the parameter in a query (`_id`, `_lastUpdated`, `family`).
    pub fn name(&self) -> &str {
        match self {
            ClauseParam::Id => "_id",
            ClauseParam::LastUpdated => "_lastUpdated",
            ClauseParam::Param(p) => &p.code,
        }
    }
}

/// Parse the query `params` (already URL-decoded name/value pairs, repeated
/// names allowed) of a search on `resource_type`. Result parameters
/// (`_count`, `_sort`, `_total`, `_include`, `_revinclude`, `_summary`,
/// `_elements`, `_format`, `_pretty`, `_cursor`) are taken apart; every
/// other name must be `_id`, `_lastUpdated` or a supported registry parameter
/// with a modifier valid for its type, else 400 under strict handling or an
/// entry in `ignored` under lenient. Malformed values (a bad date, a
/// non-number quantity, an unknown prefix) are always 400.
///
/// Details:
/// * A parameter with an empty value (`name=`) is ignored, as R4 says.
/// * Values are split on unescaped commas into alternatives; `\,`, `\|`,
///   `\$` and `\\` are the R4 escapes.
/// * Modifiers: `:missing` on every type; `:exact` and `:contains` on
///   strings; `:not` and `:text` on tokens (and `:not` on `_id`); `:Type`
///   and `:identifier` on references. Any other modifier of a known
///   parameter is a 400 whatever the handling (an explicit request that
///   cannot be honoured). Chained parameters (`subject.name`) and `_has`
///   count as unknown parameters.
/// * Values of `:text` are [`SearchValue::String`]; values of
///   `:identifier` are [`SearchValue::Token`].
/// * A reference value `Type/id` whose type is not a target of the
///   parameter is accepted and simply matches nothing.
/// * `_sort` accepts `_id`, `_lastUpdated` and supported parameters (with
///   `-` for descending); `_include`/`_revinclude` take
///   `Type:param[:target]` where `param` is a reference parameter of `Type`
///   or `*`; `_summary` must be one of `true`, `false`, `text`, `data`,
///   `count`. Errors in these are 400 regardless of handling.
/// * An unknown `resource_type` is a 404.
pub fn parse_search(
    resource_type: &str,
    params: &[(String, String)],
    handling: Handling,
) -> Result<SearchRequest> {
    if !is_resource_type(resource_type) {
        return Err(FhirError::not_found(format!(
            "unknown resource type {}",
            printable(resource_type)
        )));
    }
    let mut req = SearchRequest {
        resource_type: resource_type.to_string(),
        ..SearchRequest::default()
    };
    for (name, value) in params {
        if value.is_empty() {
            continue;
        }
        let (base, modifier) = match name.split_once(':') {
            Some((b, m)) => (b, Some(m)),
            None => (name.as_str(), None),
        };
        let no_modifier = || match modifier {
            Some(m) => Err(FhirError::bad_request(format!(
                "modifier ':{}' is not supported on '{}'",
                printable(m),
                printable(base)
            ))),
            None => Ok(()),
        };
        match base {
            "_count" => {
                no_modifier()?;
                let n = value
                    .bytes()
                    .all(|b| b.is_ascii_digit())
                    .then(|| value.parse::<usize>().ok())
                    .flatten()
                    .ok_or_else(|| {
                        FhirError::bad_request("_count must be a non-negative integer")
                    })?;
                req.count = Some(n);
            }
            "_sort" => {
                no_modifier()?;
                for key in value.split(',').map(str::trim).filter(|k| !k.is_empty()) {
                    req.sort.push(parse_sort_key(resource_type, key)?);
                }
            }
            "_total" => {
                no_modifier()?;
                req.total = match value.as_str() {
                    "none" => TotalMode::None,
                    "estimate" => TotalMode::Estimate,
                    "accurate" => TotalMode::Accurate,
                    _ => {
                        return Err(FhirError::bad_request(
                            "_total must be none, estimate or accurate",
                        ));
                    }
                };
            }
            "_include" | "_revinclude" => {
                no_modifier()?;
                let include = parse_include(base, value)?;
                if base == "_include" {
                    req.include.push(include);
                } else {
                    req.revinclude.push(include);
                }
            }
            "_summary" => {
                no_modifier()?;
                match value.as_str() {
                    "count" => req.summary_count = true,
                    "true" | "false" | "text" | "data" => {}
                    _ => {
                        return Err(FhirError::bad_request(
                            "_summary must be true, false, text, data or count",
                        ));
                    }
                }
            }
            // Presentation parameters, handled (or not) by the server.
            "_elements" | "_format" | "_pretty" => {}
            "_cursor" => {
                no_modifier()?;
                req.cursor = Some(value.clone());
            }
            "_id" => {
                let modifier = match modifier {
                    None => None,
                    Some("not") => Some(Modifier::Not),
                    Some("missing") => Some(Modifier::Missing),
                    Some(m) => return Err(unsupported_modifier(base, m)),
                };
                let values = if modifier == Some(Modifier::Missing) {
                    vec![parse_missing(base, value)?]
                } else {
                    // `_id` is a token parameter: `id` and `|id` (ids have no system).
                    split_alternatives(value)
                        .into_iter()
                        .map(|v| parse_token(base, v))
                        .collect::<Result<Vec<_>>>()?
                };
                push_clause(&mut req, ClauseParam::Id, modifier, values);
            }
            "_lastUpdated" => {
                let modifier = match modifier {
                    None => None,
                    Some("missing") => Some(Modifier::Missing),
                    Some(m) => return Err(unsupported_modifier(base, m)),
                };
                let values = if modifier.is_some() {
                    vec![parse_missing(base, value)?]
                } else {
                    split_alternatives(value)
                        .into_iter()
                        .map(|v| parse_date_value(base, &unescape(v)))
                        .collect::<Result<Vec<_>>>()?
                };
                push_clause(&mut req, ClauseParam::LastUpdated, modifier, values);
            }
            _ => {
                let param = if name.contains('.') {
                    Err(format!(
                        "chained search parameter '{}' is not supported",
                        printable(name)
                    ))
                } else {
                    match registry().lookup(resource_type, base) {
                        Some(p) if p.supported() => Ok(p),
                        Some(_) => Err(format!(
                            "search parameter '{}' is not supported on {resource_type}",
                            printable(base)
                        )),
                        None => Err(format!(
                            "unknown search parameter '{}' on {resource_type}",
                            printable(base)
                        )),
                    }
                };
                let param = match param {
                    Ok(p) => p,
                    Err(message) => match handling {
                        Handling::Strict => return Err(FhirError::bad_request(message)),
                        Handling::Lenient => {
                            req.ignored.push(name.clone());
                            continue;
                        }
                    },
                };
                let modifier = modifier.map(|m| parse_modifier(param, m)).transpose()?;
                let values = parse_values(param, modifier.as_ref(), value)?;
                push_clause(&mut req, ClauseParam::Param(param), modifier, values);
            }
        }
    }
    Ok(req)
}

/// A client-supplied name for an error message: itself when short and
/// plain, otherwise a neutral placeholder (messages must not echo data).
fn printable(s: &str) -> String {
    if s.len() <= 100 && s.bytes().all(|b| b.is_ascii_graphic()) {
        s.to_string()
    } else {
        "(unprintable)".to_string()
    }
}

fn unsupported_modifier(param: &str, modifier: &str) -> FhirError {
    FhirError::bad_request(format!(
        "modifier ':{}' is not supported on '{}'",
        printable(modifier),
        printable(param)
    ))
}

/// Add a clause unless every alternative was empty (then the parameter is ignored).
fn push_clause(
    req: &mut SearchRequest,
    param: ClauseParam,
    modifier: Option<Modifier>,
    values: Vec<SearchValue>,
) {
    if !values.is_empty() {
        req.clauses.push(Clause {
            param,
            modifier,
            values,
        });
    }
}

fn parse_sort_key(resource_type: &str, key: &str) -> Result<SortKey> {
    let (descending, name) = match key.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, key),
    };
    let param = match name {
        "_id" => ClauseParam::Id,
        "_lastUpdated" => ClauseParam::LastUpdated,
        _ => match registry().lookup(resource_type, name) {
            Some(p) if p.supported() => ClauseParam::Param(p),
            _ => {
                return Err(FhirError::bad_request(format!(
                    "cannot sort {resource_type} by '{}'",
                    printable(name)
                )));
            }
        },
    };
    Ok(SortKey { param, descending })
}

fn parse_include(name: &str, value: &str) -> Result<Include> {
    let bad = |why: &str| FhirError::bad_request(format!("invalid {name} value: {why}"));
    let mut parts = value.split(':');
    let (Some(source), Some(param), target, None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("expected Type:parameter[:targetType]"));
    };
    if !is_resource_type(source) {
        return Err(bad(&format!(
            "unknown resource type '{}'",
            printable(source)
        )));
    }
    let target_type = match target {
        None => None,
        Some(t) if is_resource_type(t) => Some(t.to_string()),
        Some(t) => return Err(bad(&format!("unknown resource type '{}'", printable(t)))),
    };
    if param != "*" {
        match registry().lookup(source, param) {
            Some(p) if p.supported() && p.kind == ParamKind::Reference => {
                if let Some(t) = &target_type
                    && !p.targets.is_empty()
                    && !p.targets.contains(t)
                {
                    return Err(bad(&format!("{t} is not a target of {source}:{param}")));
                }
            }
            _ => {
                return Err(bad(&format!(
                    "'{}' is not a reference parameter of {source}",
                    printable(param)
                )));
            }
        }
    }
    Ok(Include {
        source_type: source.to_string(),
        param: param.to_string(),
        target_type,
    })
}

fn parse_modifier(param: &SearchParam, m: &str) -> Result<Modifier> {
    let modifier = match m {
        "missing" => return Ok(Modifier::Missing),
        "exact" => Modifier::Exact,
        "contains" => Modifier::Contains,
        "not" => Modifier::Not,
        "text" => Modifier::Text,
        "above" => Modifier::Above,
        "below" => Modifier::Below,
        "in" => Modifier::In,
        "not-in" => Modifier::NotIn,
        "of-type" => Modifier::OfType,
        "identifier" => Modifier::Identifier,
        t if is_resource_type(t) => Modifier::Type(t.to_string()),
        _ => {
            return Err(FhirError::bad_request(format!(
                "unknown modifier ':{}' on '{}'",
                printable(m),
                param.code
            )));
        }
    };
    let ok = match (&modifier, param.kind) {
        (Modifier::Exact | Modifier::Contains, ParamKind::String) => true,
        (Modifier::Not | Modifier::Text, ParamKind::Token) => true,
        (Modifier::Identifier, ParamKind::Reference) => true,
        (Modifier::Type(t), ParamKind::Reference) => {
            if !param.targets.is_empty() && !param.targets.contains(t) {
                return Err(FhirError::bad_request(format!(
                    "{t} is not a target type of '{}'",
                    param.code
                )));
            }
            true
        }
        _ => false,
    };
    if ok {
        Ok(modifier)
    } else {
        Err(FhirError::bad_request(format!(
            "modifier ':{}' is not supported on {} parameter '{}'",
            modifier.code(),
            param.kind.code(),
            param.code
        )))
    }
}

fn parse_missing(name: &str, value: &str) -> Result<SearchValue> {
    match value {
        "true" => Ok(SearchValue::Missing(true)),
        "false" => Ok(SearchValue::Missing(false)),
        _ => Err(FhirError::bad_request(format!(
            "{name}:missing must be true or false"
        ))),
    }
}

fn parse_values(
    param: &SearchParam,
    modifier: Option<&Modifier>,
    value: &str,
) -> Result<Vec<SearchValue>> {
    let name = param.code.as_str();
    if modifier == Some(&Modifier::Missing) {
        return Ok(vec![parse_missing(name, value)?]);
    }
    let mut out = Vec::new();
    for alt in split_alternatives(value) {
        let v = match (param.kind, modifier) {
            (ParamKind::Token, Some(Modifier::Text)) => SearchValue::String(unescape(alt)),
            (ParamKind::Token, _) | (ParamKind::Reference, Some(Modifier::Identifier)) => {
                parse_token(name, alt)?
            }
            (ParamKind::String, _) => SearchValue::String(unescape(alt)),
            (ParamKind::Date, _) => parse_date_value(name, &unescape(alt))?,
            (ParamKind::Number, _) => {
                let raw = unescape(alt);
                let (prefix, rest) = split_prefix(&raw);
                SearchValue::Number {
                    prefix,
                    value: parse_decimal(name, rest)?,
                }
            }
            (ParamKind::Quantity, _) => parse_quantity(name, alt)?,
            (ParamKind::Reference, m) => parse_reference(param, m, &unescape(alt))?,
            (ParamKind::Uri, _) => SearchValue::Uri(unescape(alt)),
            (ParamKind::Composite | ParamKind::Special, _) => {
                return Err(FhirError::bad_request(format!(
                    "search parameter '{name}' is not supported"
                )));
            }
        };
        out.push(v);
    }
    Ok(out)
}

/// Split on unescaped commas, keeping escapes (dropping empty alternatives).
fn split_alternatives(value: &str) -> Vec<&str> {
    split_unescaped(value, ',')
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect()
}

/// Split on unescaped `sep`, leaving escape sequences in the parts.
fn split_unescaped(value: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (i, c) in value.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            parts.push(&value[start..i]);
            start = i + c.len_utf8();
        }
    }
    parts.push(&value[start..]);
    parts
}

/// Resolve the R4 escapes `\,` `\|` `\$` `\\`; other backslashes are literal.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\'
            && let Some(&next @ (',' | '|' | '$' | '\\')) = chars.peek()
        {
            out.push(next);
            chars.next();
            continue;
        }
        out.push(c);
    }
    out
}

fn parse_token(name: &str, alt: &str) -> Result<SearchValue> {
    let parts = split_unescaped(alt, '|');
    let bad = || {
        FhirError::bad_request(format!(
            "invalid token value for '{name}' (expected [system|]code)"
        ))
    };
    match parts.as_slice() {
        [code] => Ok(SearchValue::Token {
            system: TokenSystem::Any,
            code: Some(unescape(code)),
        }),
        ["", ""] => Err(bad()),
        ["", code] => Ok(SearchValue::Token {
            system: TokenSystem::None,
            code: Some(unescape(code)),
        }),
        [system, ""] => Ok(SearchValue::Token {
            system: TokenSystem::Is(unescape(system)),
            code: None,
        }),
        [system, code] => Ok(SearchValue::Token {
            system: TokenSystem::Is(unescape(system)),
            code: Some(unescape(code)),
        }),
        _ => Err(bad()),
    }
}

/// A two-letter prefix followed by something, else `eq` and the whole text.
fn split_prefix(s: &str) -> (Prefix, &str) {
    if s.len() > 2
        && s.is_char_boundary(2)
        && let Some(p) = Prefix::from_code(&s[..2])
    {
        return (p, &s[2..]);
    }
    (Prefix::Eq, s)
}

fn parse_date_value(name: &str, s: &str) -> Result<SearchValue> {
    let (prefix, rest) = split_prefix(s);
    match parse_range(rest) {
        Some(range) => Ok(SearchValue::Date { prefix, range }),
        None => Err(FhirError::bad_request(format!(
            "invalid date for '{name}' (expected [prefix]YYYY[-MM[-DD[Thh:mm[:ss[.fff]][Z|(+|-)hh:mm]]]])"
        ))),
    }
}

/// A decimal as FHIR writes it: `-?digits[.digits][e[+-]digits]`.
fn parse_decimal(name: &str, s: &str) -> Result<f64> {
    let bad = || FhirError::bad_request(format!("invalid number for '{name}'"));
    let b = s.as_bytes();
    let mut i = usize::from(matches!(b.first(), Some(b'-' | b'+')));
    let int_start = i;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    if i == int_start {
        return Err(bad());
    }
    if i < b.len() && b[i] == b'.' {
        i += 1;
        let frac_start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == frac_start {
            return Err(bad());
        }
    }
    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
        i += 1;
        if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
            i += 1;
        }
        let exp_start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == exp_start {
            return Err(bad());
        }
    }
    if i != b.len() {
        return Err(bad());
    }
    s.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
        .ok_or_else(bad)
}

fn parse_quantity(name: &str, alt: &str) -> Result<SearchValue> {
    let parts = split_unescaped(alt, '|');
    let (number, system, code) = match parts.as_slice() {
        [n] => (*n, None, None),
        [n, s, c] => {
            let opt = |x: &str| {
                if x.is_empty() {
                    None
                } else {
                    Some(unescape(x))
                }
            };
            (*n, opt(s), opt(c))
        }
        _ => {
            return Err(FhirError::bad_request(format!(
                "invalid quantity for '{name}' (expected [prefix]number[|system|code])"
            )));
        }
    };
    let number = unescape(number);
    let (prefix, rest) = split_prefix(&number);
    Ok(SearchValue::Quantity {
        prefix,
        value: parse_decimal(name, rest)?,
        system,
        code,
    })
}

fn parse_reference(
    param: &SearchParam,
    modifier: Option<&Modifier>,
    value: &str,
) -> Result<SearchValue> {
    let bad = || FhirError::bad_request(format!("invalid reference for '{}'", param.code));
    let forced = match modifier {
        Some(Modifier::Type(t)) => Some(t.as_str()),
        _ => None,
    };
    if value.contains(':') {
        // Absolute URL or URN: compared as written.
        if forced.is_some() {
            return Err(bad());
        }
        return Ok(SearchValue::Reference {
            target_type: None,
            id: value.to_string(),
        });
    }
    let segs: Vec<&str> = value.split('/').collect();
    let (ty, id) = match segs.as_slice() {
        [id] => (None, *id),
        [ty, id] | [ty, id, "_history", _] => (Some(*ty), *id),
        _ => return Err(bad()),
    };
    if !is_valid_id(id) || ty.is_some_and(|t| !is_resource_type(t)) {
        return Err(bad());
    }
    let target_type = match (ty, forced) {
        (Some(t), Some(f)) if t != f => return Err(bad()),
        (Some(t), _) | (None, Some(t)) => Some(t.to_string()),
        (None, None) if param.targets.len() == 1 => Some(param.targets[0].clone()),
        (None, None) => None,
    };
    Ok(SearchValue::Reference {
        target_type,
        id: id.to_string(),
    })
}

// ---------------------------------------------------------------------------
// Matching

impl Clause {
    /// Whether an opened resource satisfies this clause, by the R4 semantics
    /// of its type and modifier. `last_updated` is the stored
    /// `meta.lastUpdated` (UTC micros) for `_lastUpdated` clauses.
    /// Used to confirm candidates found through blind indexes.
    ///
    /// Semantics (any resource value matching any alternative satisfies the
    /// clause, except `:not`, satisfied when none does):
    /// * string: normalized prefix; `:exact` exact; `:contains` normalized substring.
    /// * token: case-sensitive code, system per the `system|code` form;
    ///   `:text` is a normalized prefix of CodeableConcept.text or a
    ///   Coding.display.
    /// * date: R4 prefix semantics on ranges (`eq`: the resource range lies
    ///   within the query range; `gt`: it ends after the query range;
    ///   `lt`: it starts before; `ge`/`le`: `gt`/`lt` or `eq`; `sa`: starts
    ///   at or after the end; `eb`: ends at or before the start; `ap`: the
    ///   ranges overlap once the query range is widened on both sides by
    ///   10% of its distance from now).
    /// * number / quantity: `eq`/`ne` use the implicit precision of the query
    ///   value (`100` is `[99.5, 100.5)`; the precision is the one of the
    ///   shortest decimal form of the parsed value, so trailing zeros are not
    ///   significant), other prefixes compare exactly, `ap` is within 10%;
    ///   a quantity's system and code must equal the query's when given.
    /// * reference: same id and (if the query names one) type; an absolute
    ///   URL or URN query equals the reference text; `:identifier` matches
    ///   `Reference.identifier`.
    /// * uri: exact.
    /// * `:missing=true`: no value; `false`: some value.
    pub fn matches(&self, resource: &Value, last_updated: i64) -> bool {
        match &self.param {
            ClauseParam::Id => {
                let id = resource.get("id").and_then(Value::as_str);
                if let Some(m) = self.missing() {
                    return m != id.is_some();
                }
                let hit = id.is_some_and(|id| {
                    self.values
                        .iter()
                        .any(|v| matches!(v, SearchValue::Token { system: TokenSystem::Any | TokenSystem::None, code: Some(c) } if c == id))
                });
                if self.modifier == Some(Modifier::Not) {
                    !hit
                } else {
                    hit
                }
            }
            ClauseParam::LastUpdated => {
                if let Some(m) = self.missing() {
                    return !m;
                }
                let r = DateRange::instant(last_updated);
                self.values.iter().any(|v| match v {
                    SearchValue::Date { prefix, range } => date_matches(*prefix, &r, range),
                    _ => false,
                })
            }
            ClauseParam::Param(p) => self.matches_param(p, resource),
        }
    }

    /// `Some(b)` for a `:missing=b` clause.
    fn missing(&self) -> Option<bool> {
        self.values.iter().find_map(|v| match v {
            SearchValue::Missing(b) => Some(*b),
            _ => None,
        })
    }

    fn matches_param(&self, p: &SearchParam, resource: &Value) -> bool {
        if let Some(m) = self.missing() {
            return m == p.extract(resource).is_empty();
        }
        match (&self.modifier, p.kind) {
            (Some(Modifier::Text), ParamKind::Token) => {
                let queries: Vec<String> = self.string_queries();
                let mut texts = Vec::new();
                for node in p.nodes(resource) {
                    collect_texts(node.value, &mut texts);
                }
                texts.iter().any(|t| {
                    let t = search_string(t);
                    queries.iter().any(|q| t.starts_with(q.as_str()))
                })
            }
            (Some(Modifier::Identifier), ParamKind::Reference) => {
                p.nodes(resource).iter().any(|node| {
                    let Some(ident) = node.value.get("identifier") else {
                        return false;
                    };
                    let mut tokens = Vec::new();
                    crate::extract::nodes_to_values(
                        ParamKind::Token,
                        &[crate::fhirpath::Node {
                            value: ident,
                            choice_type: None,
                        }],
                        &mut tokens,
                    );
                    tokens
                        .iter()
                        .any(|t| self.values.iter().any(|q| token_matches(t, q)))
                })
            }
            (Some(Modifier::Not), _) => {
                let values = p.extract(resource);
                !values
                    .iter()
                    .any(|v| self.values.iter().any(|q| self.value_matches(v, q)))
            }
            _ => {
                let values = p.extract(resource);
                if values.is_empty() {
                    return false;
                }
                match p.kind {
                    ParamKind::String if self.modifier != Some(Modifier::Exact) => {
                        // Normalize each side once.
                        let queries = self.string_queries();
                        let contains = self.modifier == Some(Modifier::Contains);
                        values.iter().any(|v| match v {
                            IndexValue::String(s) => {
                                let s = search_string(s);
                                queries.iter().any(|q| {
                                    if contains {
                                        s.contains(q.as_str())
                                    } else {
                                        s.starts_with(q.as_str())
                                    }
                                })
                            }
                            _ => false,
                        })
                    }
                    _ => values
                        .iter()
                        .any(|v| self.values.iter().any(|q| self.value_matches(v, q))),
                }
            }
        }
    }

    /// The normalized text of the clause's string values.
    fn string_queries(&self) -> Vec<String> {
        self.values
            .iter()
            .filter_map(|v| match v {
                SearchValue::String(s) => Some(search_string(s)),
                _ => None,
            })
            .collect()
    }

    fn value_matches(&self, v: &IndexValue, q: &SearchValue) -> bool {
        match (v, q) {
            (IndexValue::String(s), SearchValue::String(qs)) => match self.modifier {
                Some(Modifier::Exact) => s == qs,
                Some(Modifier::Contains) => search_string(s).contains(search_string(qs).as_str()),
                _ => search_string(s).starts_with(search_string(qs).as_str()),
            },
            (IndexValue::Token { .. }, SearchValue::Token { .. }) => token_matches(v, q),
            (IndexValue::Date(r), SearchValue::Date { prefix, range }) => {
                date_matches(*prefix, r, range)
            }
            (
                IndexValue::Reference {
                    target_type,
                    target_id,
                    raw,
                },
                SearchValue::Reference {
                    target_type: qt,
                    id,
                },
            ) => {
                if qt.is_none() && id.contains(':') {
                    raw == id
                } else {
                    target_id.as_deref() == Some(id.as_str())
                        && (qt.is_none() || target_type.as_deref() == qt.as_deref())
                }
            }
            (
                IndexValue::Quantity {
                    value,
                    system,
                    code,
                },
                SearchValue::Quantity {
                    prefix,
                    value: qv,
                    system: qs,
                    code: qc,
                },
            ) => {
                number_matches(*prefix, *value, *qv)
                    && qs.as_ref().is_none_or(|s| system.as_ref() == Some(s))
                    && qc.as_ref().is_none_or(|c| code.as_ref() == Some(c))
            }
            (IndexValue::Number(n), SearchValue::Number { prefix, value }) => {
                number_matches(*prefix, *n, *value)
            }
            (IndexValue::Uri(u), SearchValue::Uri(q)) => u == q,
            _ => false,
        }
    }
}

fn token_matches(v: &IndexValue, q: &SearchValue) -> bool {
    let (
        IndexValue::Token { system, code },
        SearchValue::Token {
            system: qs,
            code: qc,
        },
    ) = (v, q)
    else {
        return false;
    };
    let system_ok = match qs {
        TokenSystem::Any => true,
        TokenSystem::None => system.is_none(),
        TokenSystem::Is(s) => system.as_deref() == Some(s.as_str()),
    };
    system_ok && qc.as_ref().is_none_or(|c| c == code)
}

/// CodeableConcept.text and Coding.display of a node, for `:text`.
fn collect_texts<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    let Value::Object(map) = v else { return };
    if let Some(t) = map.get("text").and_then(Value::as_str) {
        out.push(t);
    }
    if let Some(d) = map.get("display").and_then(Value::as_str) {
        out.push(d);
    }
    if let Some(Value::Array(codings)) = map.get("coding") {
        for c in codings {
            if let Some(d) = c.get("display").and_then(Value::as_str) {
                out.push(d);
            }
        }
    }
    // Identifier.type.text
    if let Some(t) = map
        .get("type")
        .and_then(|t| t.get("text"))
        .and_then(Value::as_str)
    {
        out.push(t);
    }
}

fn now_micros() -> i64 {
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
    }
}

/// R4 prefix semantics of a resource range `r` against a query range `q`
/// (see [`Clause::matches`]), `ap` anchored at the current time.
fn date_matches(prefix: Prefix, r: &DateRange, q: &DateRange) -> bool {
    let now = if prefix == Prefix::Ap {
        now_micros()
    } else {
        0
    };
    date_matches_at(prefix, r, q, now)
}

/// [`date_matches`] with `now` (UTC micros) anchoring `ap`.
fn date_matches_at(prefix: Prefix, r: &DateRange, q: &DateRange, now: i64) -> bool {
    let contained = q.start <= r.start && r.end <= q.end;
    match prefix {
        Prefix::Eq => contained,
        Prefix::Ne => !contained,
        Prefix::Gt => r.end > q.end,
        Prefix::Lt => r.start < q.start,
        Prefix::Ge => r.end > q.end || contained,
        Prefix::Le => r.start < q.start || contained,
        Prefix::Sa => r.start >= q.end,
        Prefix::Eb => r.end <= q.start,
        Prefix::Ap => {
            let gap = (i128::from(now) - i128::from(q.start)).abs() / 10;
            let lo = i128::from(q.start) - gap;
            let hi = i128::from(q.end) + gap;
            i128::from(r.start) < hi && lo < i128::from(r.end)
        }
    }
}

/// Half the width of the last significant digit of `q` as written in its
/// shortest decimal form (`100` → 0.5, `1.25` → 0.005).
fn implicit_half_width(q: f64) -> f64 {
    let text = format!("{q}");
    let decimals = text.split_once('.').map_or(0, |(_, frac)| frac.len());
    0.5 * 10f64.powi(-(decimals.min(300) as i32))
}

/// R4 prefix semantics of a number `v` against a query value `q`.
fn number_matches(prefix: Prefix, v: f64, q: f64) -> bool {
    let half = implicit_half_width(q);
    let in_range = q - half <= v && v < q + half;
    match prefix {
        Prefix::Eq => in_range,
        Prefix::Ne => !in_range,
        Prefix::Gt | Prefix::Sa => v > q,
        Prefix::Lt | Prefix::Eb => v < q,
        Prefix::Ge => v >= q,
        Prefix::Le => v <= q,
        Prefix::Ap => (v - q).abs() <= (q.abs() * 0.1).max(half),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    fn parse(ty: &str, pairs: &[(&str, &str)]) -> Result<SearchRequest> {
        parse_search(ty, &q(pairs), Handling::Strict)
    }

    fn clause(ty: &str, name: &str, value: &str) -> Clause {
        let mut req = parse(ty, &[(name, value)]).unwrap_or_else(|e| panic!("{name}={value}: {e}"));
        assert_eq!(req.clauses.len(), 1, "{name}={value}");
        req.clauses.remove(0)
    }

    fn hit(resource: &Value, name: &str, value: &str) -> bool {
        let ty = resource["resourceType"].as_str().unwrap();
        clause(ty, name, value).matches(resource, 0)
    }

    fn bad(ty: &str, pairs: &[(&str, &str)]) -> String {
        let e = parse(ty, pairs).expect_err("should fail");
        assert_eq!(e.kind.status(), 400, "{pairs:?}: {}", e.message);
        e.message
    }

    fn range(s: &str) -> DateRange {
        parse_range(s).unwrap()
    }

    fn patient() -> Value {
        json!({
            "resourceType": "Patient",
            "id": "pat1",
            "identifier": [{"system": "urn:oid:1.2.3", "value": "MRN-1"}, {"value": "no-system"}],
            "active": true,
            "name": [{"family": "Dvořák", "given": ["Zoë", "Anne-Marie"]}, {"family": "Smith,Jones", "given": ["Ann|e"]}],
            "telecom": [{"system": "phone", "value": "555-1234"}, {"system": "email", "value": "zoe@example.org"}],
            "gender": "female",
            "birthDate": "1980-05-17",
            "address": [{"line": ["12 Rue de la Paix"], "city": "Paris", "postalCode": "75002", "country": "FR"}],
            "generalPractitioner": [
                {"reference": "Practitioner/dr1"},
                {"reference": "http://other.example.org/fhir/Organization/o9"},
                {"identifier": {"system": "urn:npi", "value": "999"}}
            ],
            "managingOrganization": {"reference": "Organization/org1"}
        })
    }

    fn observation() -> Value {
        json!({
            "resourceType": "Observation",
            "id": "obs1",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7", "display": "Body weight"}], "text": "Weight"},
            "subject": {"reference": "Patient/pat1"},
            "effectivePeriod": {"start": "2020-03-10T08:00:00Z", "end": "2020-03-10T09:00:00Z"},
            "issued": "2020-03-10T09:30:00.000Z",
            "valueQuantity": {"value": 100, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"}
        })
    }

    #[test]
    fn unknown_resource_type_is_404() {
        let e = parse_search("Nope", &[], Handling::Strict).unwrap_err();
        assert_eq!(e.kind.status(), 404);
        assert_eq!(e.message, "unknown resource type Nope");
    }

    #[test]
    fn result_parameters() {
        let req = parse(
            "Observation",
            &[
                ("_count", "25"),
                ("_sort", "-date,_lastUpdated,-_id"),
                ("_total", "estimate"),
                ("_include", "Observation:subject"),
                ("_include", "Observation:performer:Practitioner"),
                ("_revinclude", "Provenance:target"),
                ("_revinclude", "DiagnosticReport:*"),
                ("_summary", "count"),
                ("_elements", "id,status"),
                ("_format", "json"),
                ("_pretty", "true"),
                ("_cursor", "abc123"),
            ],
        )
        .unwrap();
        assert_eq!(req.resource_type, "Observation");
        assert_eq!(req.count, Some(25));
        assert_eq!(req.sort.len(), 3);
        assert_eq!(req.sort[0].param.name(), "date");
        assert!(req.sort[0].descending);
        assert!(matches!(req.sort[1].param, ClauseParam::LastUpdated));
        assert!(!req.sort[1].descending);
        assert!(matches!(req.sort[2].param, ClauseParam::Id));
        assert!(req.sort[2].descending);
        assert_eq!(req.total, TotalMode::Estimate);
        assert_eq!(
            req.include,
            vec![
                Include {
                    source_type: "Observation".into(),
                    param: "subject".into(),
                    target_type: None
                },
                Include {
                    source_type: "Observation".into(),
                    param: "performer".into(),
                    target_type: Some("Practitioner".into())
                },
            ]
        );
        assert_eq!(req.revinclude[1].param, "*");
        assert!(req.summary_count);
        assert_eq!(req.cursor.as_deref(), Some("abc123"));
        assert!(req.clauses.is_empty());
        assert!(req.ignored.is_empty());

        let req = parse("Patient", &[("_count", "0"), ("_summary", "true")]).unwrap();
        assert_eq!(req.count, Some(0));
        assert!(!req.summary_count);
        assert_eq!(req.total, TotalMode::Accurate);
    }

    #[test]
    fn result_parameter_errors() {
        assert!(bad("Patient", &[("_count", "-1")]).contains("_count"));
        assert!(bad("Patient", &[("_count", "ten")]).contains("_count"));
        assert!(bad("Patient", &[("_count", "1.5")]).contains("_count"));
        assert!(bad("Patient", &[("_count", "99999999999999999999999")]).contains("_count"));
        assert!(bad("Patient", &[("_sort", "nope")]).contains("nope"));
        assert!(bad("Patient", &[("_sort", "-_text")]).contains("_text"));
        assert!(bad("Patient", &[("_total", "all")]).contains("_total"));
        assert!(bad("Patient", &[("_summary", "everything")]).contains("_summary"));
        assert!(bad("Patient", &[("_include", "Patient")]).contains("_include"));
        assert!(bad("Patient", &[("_include", "Nope:subject")]).contains("Nope"));
        assert!(bad("Patient", &[("_include", "Patient:family")]).contains("family"));
        assert!(
            bad(
                "Patient",
                &[("_include", "Patient:general-practitioner:Nope")]
            )
            .contains("Nope")
        );
        assert!(
            bad(
                "Patient",
                &[("_include", "Patient:general-practitioner:Patient")]
            )
            .contains("target")
        );
        assert!(bad("Patient", &[("_include", "a:b:c:d")]).contains("_include"));
        assert!(bad("Patient", &[("_include:iterate", "Patient:link")]).contains("iterate"));
        assert!(bad("Patient", &[("_count:exact", "1")]).contains("not supported"));
    }

    #[test]
    fn unknown_and_unsupported_parameters() {
        for name in [
            "nope",
            "_has:Observation:patient:code",
            "general-practitioner.name",
            "_text",
            "_content",
            "_query",
            "_list",
            "_type",
        ] {
            let msg = bad("Patient", &[(name, "x")]);
            assert!(
                msg.contains("not supported") || msg.contains("unknown"),
                "{name}: {msg}"
            );
            let req = parse_search(
                "Patient",
                &q(&[(name, "x"), ("family", "x")]),
                Handling::Lenient,
            )
            .unwrap();
            assert_eq!(req.ignored, vec![name.to_string()]);
            assert_eq!(req.clauses.len(), 1);
        }
        // Composite parameters are known but not supported.
        assert!(bad("Observation", &[("code-value-quantity", "x$5")]).contains("not supported"));
        // The default handling is lenient.
        assert_eq!(Handling::default(), Handling::Lenient);
    }

    #[test]
    fn empty_values_are_ignored() {
        let req = parse(
            "Patient",
            &[
                ("family", ""),
                ("birthdate", ""),
                ("nope", ""),
                ("_count", ""),
            ],
        )
        .unwrap();
        assert!(req.clauses.is_empty());
        assert!(req.count.is_none());
        let req = parse("Patient", &[("family", ",,")]).unwrap();
        assert!(req.clauses.is_empty());
    }

    #[test]
    fn token_syntax_and_escapes() {
        let c = clause(
            "Patient",
            "identifier",
            "urn:oid:1.2.3|MRN-1,|no-system,urn:x|,plain",
        );
        assert!(matches!(c.param, ClauseParam::Param(p) if p.code == "identifier"));
        assert_eq!(
            c.values,
            vec![
                SearchValue::Token {
                    system: TokenSystem::Is("urn:oid:1.2.3".into()),
                    code: Some("MRN-1".into())
                },
                SearchValue::Token {
                    system: TokenSystem::None,
                    code: Some("no-system".into())
                },
                SearchValue::Token {
                    system: TokenSystem::Is("urn:x".into()),
                    code: None
                },
                SearchValue::Token {
                    system: TokenSystem::Any,
                    code: Some("plain".into())
                },
            ]
        );
        let c = clause("Patient", "identifier", r"a\,b,c\|d,s|e\\f,g\$h");
        assert_eq!(
            c.values,
            vec![
                SearchValue::Token {
                    system: TokenSystem::Any,
                    code: Some("a,b".into())
                },
                SearchValue::Token {
                    system: TokenSystem::Any,
                    code: Some("c|d".into())
                },
                SearchValue::Token {
                    system: TokenSystem::Is("s".into()),
                    code: Some(r"e\f".into())
                },
                SearchValue::Token {
                    system: TokenSystem::Any,
                    code: Some("g$h".into())
                },
            ]
        );
        assert!(bad("Patient", &[("identifier", "|")]).contains("invalid token"));
        assert!(bad("Patient", &[("identifier", "a|b|c")]).contains("invalid token"));
    }

    #[test]
    fn string_values_and_escapes() {
        let c = clause("Patient", "family", r"Smith\,Jones,Doe");
        assert_eq!(
            c.values,
            vec![
                SearchValue::String("Smith,Jones".into()),
                SearchValue::String("Doe".into())
            ]
        );
        assert_eq!(c.modifier, None);
        assert_eq!(
            clause("Patient", "family:exact", "X").modifier,
            Some(Modifier::Exact)
        );
        assert_eq!(
            clause("Patient", "family:contains", "X").modifier,
            Some(Modifier::Contains)
        );
    }

    #[test]
    fn modifiers_are_checked_per_kind() {
        assert!(
            bad("Patient", &[("family:not", "x")])
                .contains("':not' is not supported on string parameter 'family'")
        );
        assert!(bad("Patient", &[("gender:exact", "x")]).contains("not supported"));
        assert!(bad("Patient", &[("gender:below", "x")]).contains("not supported"));
        assert!(bad("Patient", &[("gender:in", "x")]).contains("not supported"));
        assert!(bad("Patient", &[("identifier:of-type", "a|b|c")]).contains("not supported"));
        assert!(bad("Patient", &[("birthdate:exact", "2020")]).contains("not supported"));
        assert!(bad("Patient", &[("family:bogus", "x")]).contains("unknown modifier"));
        assert!(bad("Patient", &[("general-practitioner:Patient", "x")]).contains("not a target"));
        assert!(bad("Patient", &[("gender:Patient", "x")]).contains("not supported"));
        assert!(bad("Patient", &[("family:missing", "maybe")]).contains("true or false"));
        // Lenient handling does not excuse a bad modifier.
        assert!(parse_search("Patient", &q(&[("family:not", "x")]), Handling::Lenient).is_err());
        assert_eq!(
            clause("Patient", "gender:not", "male").modifier,
            Some(Modifier::Not)
        );
        assert_eq!(
            clause("Patient", "gender:text", "fem").values,
            vec![SearchValue::String("fem".into())]
        );
        assert_eq!(
            clause("Patient", "birthdate:missing", "true").values,
            vec![SearchValue::Missing(true)]
        );
        assert_eq!(
            clause("Patient", "general-practitioner:Practitioner", "dr1").values,
            vec![SearchValue::Reference {
                target_type: Some("Practitioner".into()),
                id: "dr1".into()
            }]
        );
        assert_eq!(
            clause("Patient", "general-practitioner:identifier", "urn:npi|999").values,
            vec![SearchValue::Token {
                system: TokenSystem::Is("urn:npi".into()),
                code: Some("999".into())
            }]
        );
    }

    #[test]
    fn date_values() {
        let c = clause(
            "Patient",
            "birthdate",
            "ge2020-01,lt2021,2020-05-05T10:00:00Z,sa2020,eb2020,ap2020,ne2020,gt2020,le2020,eq2020",
        );
        let prefixes: Vec<Prefix> = c
            .values
            .iter()
            .map(|v| match v {
                SearchValue::Date { prefix, .. } => *prefix,
                other => panic!("{other:?}"),
            })
            .collect();
        use Prefix::*;
        assert_eq!(prefixes, vec![Ge, Lt, Eq, Sa, Eb, Ap, Ne, Gt, Le, Eq]);
        assert_eq!(
            c.values[0],
            SearchValue::Date {
                prefix: Ge,
                range: range("2020-01")
            }
        );
        assert!(bad("Patient", &[("birthdate", "2020-13-01")]).contains("invalid date"));
        assert!(bad("Patient", &[("birthdate", "xx2020")]).contains("invalid date"));
        assert!(bad("Patient", &[("birthdate", "ge")]).contains("invalid date"));
        assert!(bad("Patient", &[("birthdate", "yesterday")]).contains("invalid date"));
        assert!(!bad("Patient", &[("birthdate", "Jane Doe's birthday")]).contains("Jane"));
    }

    #[test]
    fn number_and_quantity_values() {
        assert_eq!(
            clause("RiskAssessment", "probability", "gt0.5").values,
            vec![SearchValue::Number {
                prefix: Prefix::Gt,
                value: 0.5
            }]
        );
        assert_eq!(
            clause("RiskAssessment", "probability", "1e-2").values,
            vec![SearchValue::Number {
                prefix: Prefix::Eq,
                value: 0.01
            }]
        );
        assert!(bad("RiskAssessment", &[("probability", "abc")]).contains("invalid number"));
        assert!(bad("RiskAssessment", &[("probability", "1.")]).contains("invalid number"));
        assert!(bad("RiskAssessment", &[("probability", "NaN")]).contains("invalid number"));
        assert!(bad("RiskAssessment", &[("probability", "xx5")]).contains("invalid number"));
        assert!(bad("RiskAssessment", &[("probability", "1e999")]).contains("invalid number"));
        let c = clause(
            "Observation",
            "value-quantity",
            "le5.4|http://unitsofmeasure.org|mg,5.4||mg,100",
        );
        assert_eq!(
            c.values,
            vec![
                SearchValue::Quantity {
                    prefix: Prefix::Le,
                    value: 5.4,
                    system: Some("http://unitsofmeasure.org".into()),
                    code: Some("mg".into())
                },
                SearchValue::Quantity {
                    prefix: Prefix::Eq,
                    value: 5.4,
                    system: None,
                    code: Some("mg".into())
                },
                SearchValue::Quantity {
                    prefix: Prefix::Eq,
                    value: 100.0,
                    system: None,
                    code: None
                },
            ]
        );
        assert!(bad("Observation", &[("value-quantity", "5.4|mg")]).contains("invalid quantity"));
        assert!(bad("Observation", &[("value-quantity", "heavy||kg")]).contains("invalid number"));
    }

    #[test]
    fn reference_values() {
        let c = clause(
            "Observation",
            "subject",
            "Patient/p1,p2,http://example.org/fhir/Patient/p3,Patient/p4/_history/2",
        );
        assert_eq!(
            c.values,
            vec![
                SearchValue::Reference {
                    target_type: Some("Patient".into()),
                    id: "p1".into()
                },
                SearchValue::Reference {
                    target_type: None,
                    id: "p2".into()
                },
                SearchValue::Reference {
                    target_type: None,
                    id: "http://example.org/fhir/Patient/p3".into()
                },
                SearchValue::Reference {
                    target_type: Some("Patient".into()),
                    id: "p4".into()
                },
            ]
        );
        // A single-target parameter types a bare id; a multi-target one does not.
        assert_eq!(
            clause("Account", "patient", "p1").values,
            vec![SearchValue::Reference {
                target_type: Some("Patient".into()),
                id: "p1".into()
            }]
        );
        assert_eq!(
            clause("Observation", "patient", "p1").values,
            vec![SearchValue::Reference {
                target_type: None,
                id: "p1".into()
            }]
        );
        assert!(bad("Observation", &[("subject", "Nope/1")]).contains("invalid reference"));
        assert!(bad("Observation", &[("subject", "a/b/c")]).contains("invalid reference"));
        assert!(bad("Observation", &[("subject", "bad id")]).contains("invalid reference"));
        assert!(
            bad("Observation", &[("subject:Patient", "Group/1")]).contains("invalid reference")
        );
    }

    #[test]
    fn id_and_last_updated() {
        let c = clause("Patient", "_id", "a,b");
        assert!(matches!(c.param, ClauseParam::Id));
        assert_eq!(
            c.values,
            vec![
                SearchValue::Token {
                    system: TokenSystem::Any,
                    code: Some("a".into())
                },
                SearchValue::Token {
                    system: TokenSystem::Any,
                    code: Some("b".into())
                },
            ]
        );
        let p = patient();
        assert!(!c.matches(&p, 0));
        assert!(hit(&p, "_id", "x,pat1"));
        assert!(!hit(&p, "_id:not", "pat1"));
        assert!(hit(&p, "_id:not", "pat2"));
        assert!(!hit(&p, "_id:missing", "true"));
        assert!(bad("Patient", &[("_id:exact", "a")]).contains("not supported"));

        let c = clause("Patient", "_lastUpdated", "ge2024-01-01");
        assert!(matches!(c.param, ClauseParam::LastUpdated));
        let t = range("2024-03-01T12:00:00.123456Z").start;
        assert!(c.matches(&p, t));
        assert!(!c.matches(&p, range("2023-12-31T23:59:59.999999Z").start));
        assert!(clause("Patient", "_lastUpdated", "2024-03-01T12:00:00.123456Z").matches(&p, t));
        assert!(clause("Patient", "_lastUpdated", "2024-03-01").matches(&p, t));
        assert!(!clause("Patient", "_lastUpdated", "2024-03-01T12:00:00.123457Z").matches(&p, t));
        assert!(clause("Patient", "_lastUpdated", "lt2024-03-01T12:00:00.123457Z").matches(&p, t));
        assert!(!clause("Patient", "_lastUpdated:missing", "true").matches(&p, t));
        assert!(bad("Patient", &[("_lastUpdated", "soon")]).contains("invalid date"));
        assert!(bad("Patient", &[("_lastUpdated:exact", "2020")]).contains("not supported"));
    }

    #[test]
    fn string_matching() {
        let p = patient();
        assert!(hit(&p, "family", "dvo"));
        assert!(hit(&p, "family", "DVOŘÁK"));
        assert!(hit(&p, "family", "dvorak"));
        assert!(hit(&p, "family", "  dvořa  "));
        assert!(!hit(&p, "family", "rak"));
        assert!(hit(&p, "family:contains", "ŘÁ"));
        assert!(hit(&p, "family:contains", "rak"));
        assert!(hit(&p, "family:exact", "Dvořák"));
        assert!(!hit(&p, "family:exact", "dvorak"));
        assert!(!hit(&p, "family:exact", "Dvořá"));
        assert!(hit(&p, "given", "zoe"));
        assert!(hit(&p, "given", "anne-m"));
        assert!(hit(&p, "name", "paris,zoe"));
        assert!(!hit(&p, "name", "paris"));
        assert!(hit(&p, "family", r"smith\,j"));
        assert!(hit(&p, "given:exact", "Ann|e"));
        assert!(hit(&p, "address", "12 rue de"));
        assert!(!hit(&p, "address", "rue de"));
        assert!(hit(&p, "address:contains", "rue de"));
        assert!(hit(&p, "address-postalcode", "750"));
        assert!(hit(&p, "address-city", "pa"));
        assert!(!hit(&p, "address-city", "lyon"));
        assert!(hit(&p, "family:missing", "false"));
        assert!(!hit(&p, "family:missing", "true"));
        assert!(hit(&p, "address-state:missing", "true"));
    }

    #[test]
    fn token_matching() {
        let p = patient();
        assert!(hit(&p, "gender", "female"));
        assert!(!hit(&p, "gender", "FEMALE"));
        assert!(!hit(&p, "gender", "male"));
        assert!(hit(&p, "gender", "male,female"));
        assert!(hit(&p, "gender:not", "male"));
        assert!(!hit(&p, "gender:not", "female"));
        assert!(hit(&p, "active", "true"));
        assert!(!hit(&p, "active", "false"));
        assert!(hit(&p, "identifier", "MRN-1"));
        assert!(hit(&p, "identifier", "urn:oid:1.2.3|MRN-1"));
        assert!(!hit(&p, "identifier", "urn:oid:9|MRN-1"));
        assert!(hit(&p, "identifier", "urn:oid:1.2.3|"));
        assert!(!hit(&p, "identifier", "|MRN-1"));
        assert!(hit(&p, "identifier", "|no-system"));
        assert!(hit(&p, "phone", "555-1234"));
        assert!(!hit(&p, "phone", "zoe@example.org"));
        assert!(hit(&p, "email", "zoe@example.org"));
        assert!(hit(&p, "telecom", "555-1234"));
        // Resources without the element match :not.
        let bare = json!({"resourceType": "Patient", "id": "b"});
        assert!(hit(&bare, "gender:not", "male"));
        assert!(!hit(&bare, "gender", "male"));
        assert!(hit(&bare, "gender:missing", "true"));
        let o = observation();
        assert!(hit(&o, "code", "http://loinc.org|29463-7"));
        assert!(hit(&o, "code", "29463-7"));
        assert!(!hit(&o, "code", "http://snomed.info/sct|29463-7"));
        assert!(hit(&o, "code:text", "body"));
        assert!(hit(&o, "code:text", "WEIGHT"));
        assert!(!hit(&o, "code:text", "height"));
    }

    #[test]
    fn reference_matching() {
        let o = observation();
        assert!(hit(&o, "subject", "Patient/pat1"));
        assert!(hit(&o, "subject", "pat1"));
        assert!(hit(&o, "subject:Patient", "pat1"));
        assert!(!hit(&o, "subject:Group", "pat1"));
        assert!(!hit(&o, "subject", "Group/pat1"));
        assert!(!hit(&o, "subject", "Patient/pat2"));
        assert!(hit(&o, "patient", "pat1"));
        assert!(hit(&o, "subject:missing", "false"));
        assert!(hit(&o, "encounter:missing", "true"));
        let p = patient();
        assert!(hit(&p, "general-practitioner", "dr1"));
        assert!(hit(&p, "general-practitioner", "Organization/o9"));
        assert!(hit(
            &p,
            "general-practitioner",
            "http://other.example.org/fhir/Organization/o9"
        ));
        assert!(!hit(
            &p,
            "general-practitioner",
            "http://example.org/fhir/Organization/o9"
        ));
        assert!(hit(&p, "general-practitioner:identifier", "urn:npi|999"));
        assert!(hit(&p, "general-practitioner:identifier", "999"));
        assert!(!hit(&p, "general-practitioner:identifier", "urn:other|999"));
        assert!(hit(&p, "organization", "org1"));
    }

    #[test]
    fn date_matching_per_prefix() {
        // The patient was born on 1980-05-17 (a whole day).
        let p = patient();
        let cases: &[(&str, bool)] = &[
            ("1980-05-17", true),
            ("1980-05", true),
            ("1980", true),
            ("1980-05-17T10:00:00Z", false), // the day is not within that second
            ("eq1980-05-18", false),
            ("ne1980-05-18", true),
            ("ne1980", false),
            ("gt1980-05-16", true),
            ("gt1980-05-17", false),
            ("gt1980-05-17T12:00:00Z", true), // the day extends past noon
            ("lt1980-05-18", true),
            ("lt1980-05-17", false),
            ("lt1980-05-17T12:00:00Z", true),
            ("ge1980-05-17", true),
            ("ge1980-05-18", false),
            ("ge1980", true),
            ("le1980-05-17", true),
            ("le1980-05-16", false),
            ("sa1980-05-16", true),
            ("sa1980-05-17", false),
            ("sa1980-05-17T12:00:00Z", false),
            ("eb1980-05-18", true),
            ("eb1980-05-17", false),
            ("ap1980-05-17", true),
            ("ap1981-01-01", true), // ~45 years ago: 10% is ~4.5 years
            ("ap2020-01-01", false),
        ];
        for (value, want) in cases {
            assert_eq!(hit(&p, "birthdate", value), *want, "birthdate={value}");
        }
        // A Period: 2020-03-10 08:00–09:00Z.
        let o = observation();
        let cases: &[(&str, bool)] = &[
            ("2020-03-10", true),
            ("2020-03-10T08:00:00Z", false),
            ("gt2020-03-10T08:30:00Z", true),
            ("lt2020-03-10T08:30:00Z", true),
            ("sa2020-03-10T08:30:00Z", false),
            ("sa2020-03-09", true),
            ("eb2020-03-11", true),
            ("eb2020-03-10", false),
            ("ge2020-03-11", false),
            ("le2020-03-09", false),
            ("ne2020-03-10", false),
        ];
        for (value, want) in cases {
            assert_eq!(hit(&o, "date", value), *want, "date={value}");
        }
        // Open-ended periods.
        let open = json!({"resourceType": "Encounter", "period": {"start": "2020-01-01"}});
        assert!(hit(&open, "date", "gt2030"));
        assert!(!hit(&open, "date", "lt2019"));
        assert!(!hit(&open, "date", "2020"));
        assert!(hit(&open, "date", "ap2020-06-01"));
    }

    #[test]
    fn date_semantics_table() {
        let q = DateRange {
            start: 100,
            end: 200,
        };
        let now = 1_000;
        let r = |s, e| DateRange { start: s, end: e };
        use Prefix::*;
        assert!(date_matches_at(Eq, &r(100, 200), &q, now));
        assert!(date_matches_at(Eq, &r(120, 130), &q, now));
        assert!(!date_matches_at(Eq, &r(90, 130), &q, now));
        assert!(date_matches_at(Gt, &r(150, 201), &q, now));
        assert!(!date_matches_at(Gt, &r(150, 200), &q, now));
        assert!(date_matches_at(Lt, &r(99, 110), &q, now));
        assert!(!date_matches_at(Lt, &r(100, 110), &q, now));
        assert!(date_matches_at(Sa, &r(200, 210), &q, now));
        assert!(!date_matches_at(Sa, &r(199, 210), &q, now));
        assert!(date_matches_at(Eb, &r(0, 100), &q, now));
        assert!(!date_matches_at(Eb, &r(0, 101), &q, now));
        // ap: widened by 10% of the distance from now (|1000-100|/10 = 90).
        assert!(date_matches_at(Ap, &r(280, 300), &q, now));
        assert!(!date_matches_at(Ap, &r(290, 300), &q, now));
        assert!(date_matches_at(Ap, &r(i64::MIN, i64::MAX), &q, now));
        assert!(date_matches_at(
            Ap,
            &r(0, 1),
            &DateRange {
                start: i64::MIN,
                end: i64::MAX
            },
            i64::MAX
        ));
    }

    #[test]
    fn quantity_and_number_matching() {
        let o = observation();
        assert!(hit(&o, "value-quantity", "100"));
        assert!(hit(&o, "value-quantity", "1e2"));
        assert!(hit(&o, "value-quantity", "100.0")); // trailing zeros are not significant here
        assert!(!hit(&o, "value-quantity", "100.4")); // [100.35, 100.45)
        assert!(!hit(&o, "value-quantity", "99.6"));
        let mut o2 = o.clone();
        o2["valueQuantity"]["value"] = json!(100.4);
        assert!(hit(&o2, "value-quantity", "100")); // [99.5, 100.5)
        assert!(hit(&o2, "value-quantity", "100.4"));
        assert!(!hit(&o2, "value-quantity", "100.3"));
        assert!(!hit(&o2, "value-quantity", "101"));
        assert!(hit(
            &o,
            "value-quantity",
            "100|http://unitsofmeasure.org|kg"
        ));
        assert!(hit(&o, "value-quantity", "100||kg"));
        assert!(!hit(&o, "value-quantity", "100||g"));
        assert!(!hit(&o, "value-quantity", "100|http://other|kg"));
        assert!(hit(&o, "value-quantity", "gt99"));
        assert!(!hit(&o, "value-quantity", "gt100"));
        assert!(hit(&o, "value-quantity", "ge100"));
        assert!(hit(&o, "value-quantity", "lt101"));
        assert!(!hit(&o, "value-quantity", "lt100"));
        assert!(hit(&o, "value-quantity", "le100"));
        assert!(hit(&o, "value-quantity", "ne101"));
        assert!(!hit(&o, "value-quantity", "ne100"));
        assert!(hit(&o, "value-quantity", "sa99"));
        assert!(hit(&o, "value-quantity", "eb101"));
        assert!(hit(&o, "value-quantity", "ap109"));
        assert!(!hit(&o, "value-quantity", "ap120"));
        let r =
            json!({"resourceType": "RiskAssessment", "prediction": [{"probabilityDecimal": 0.25}]});
        assert!(hit(&r, "probability", "0.25"));
        assert!(hit(&r, "probability", "0.3")); // [0.25, 0.35)
        assert!(!hit(&r, "probability", "0.2")); // [0.15, 0.25)
        assert!(hit(&r, "probability", "gt0.2"));
        assert!(hit(&r, "probability", "lt1"));
        assert!(hit(&r, "probability:missing", "false"));
        assert_eq!(implicit_half_width(100.0), 0.5);
        assert_eq!(implicit_half_width(1.25), 0.005);
    }

    #[test]
    fn uri_matching() {
        let v = json!({"resourceType": "ValueSet", "url": "http://example.org/vs/1"});
        assert!(hit(&v, "url", "http://example.org/vs/1"));
        assert!(!hit(&v, "url", "http://example.org/vs"));
        assert!(bad("ValueSet", &[("url:below", "http://example.org")]).contains("not supported"));
    }

    #[test]
    fn clauses_from_a_full_query_and_names() {
        let req = parse(
            "Patient",
            &[
                ("family", "smith"),
                ("family", "jo"),
                ("birthdate", "ge1970"),
                ("gender:not", "male"),
            ],
        )
        .unwrap();
        assert_eq!(req.clauses.len(), 4);
        let names: Vec<&str> = req.clauses.iter().map(|c| c.param.name()).collect();
        assert_eq!(names, ["family", "family", "birthdate", "gender"]);
        assert_eq!(Prefix::Ge.code(), "ge");
        assert_eq!(Modifier::Type("Patient".into()).code(), "Patient");
        assert_eq!(Modifier::NotIn.code(), "not-in");
    }
}
