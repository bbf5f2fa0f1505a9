//! Search: from a parsed FHIR search to an index query, and its execution
//! with confirmation on opened resources where the index is only a coarse
//! filter (long string prefixes, person dates compared by range,
//! quantities, `:contains`, `ne`/`ap`).
use custos_fhir::date::DateRange;
use custos_fhir::normalize::search_string;
use custos_fhir::params::ParamKind;
use custos_fhir::query::{Clause, ClauseParam, Modifier, Prefix, SearchRequest, TokenSystem};
use custos_fhir::{FhirError, SearchValue};
use custos_store::{Filter, IndexQuery, Keyset, Order, RangeCond, ReadTx, Token};

use crate::index::{
    PREFIX_MAX, Tokens, blind_date, blind_date_texts, char_prefix, clamp_micros, quantity_unit,
    range_pkey, ymd,
};
use crate::keys::store_err;
use crate::service::{Opened, Records};

/// A planned search: the index query and the clauses to confirm.
#[derive(Debug, Clone)]
pub struct Plan {
    pub query: IndexQuery,
    pub confirm: Vec<Clause>,
}

/// One page of matches.
pub struct Page {
    pub matches: Vec<Opened>,
    /// Whether more matches follow in the walking direction.
    pub more: bool,
}

enum ClausePlan {
    /// The index answers exactly.
    Exact(Filter),
    /// The index narrows; the clause is confirmed on the resource.
    Coarse(Filter),
    /// No index help: every resource of the type is a candidate.
    ConfirmOnly,
}

fn range_conds(prefix: Prefix, q: &DateRange) -> (Option<RangeCond>, bool) {
    let (qs, qe) = (clamp_micros(q.start), clamp_micros(q.end));
    let c = RangeCond::default();
    match prefix {
        Prefix::Eq => (
            Some(RangeCond {
                lo_ge: Some(qs),
                hi_le: Some(qe),
                ..c
            }),
            true,
        ),
        Prefix::Gt => (
            Some(RangeCond {
                hi_gt: Some(qe),
                ..c
            }),
            true,
        ),
        Prefix::Lt => (
            Some(RangeCond {
                lo_lt: Some(qs),
                ..c
            }),
            true,
        ),
        Prefix::Sa => (
            Some(RangeCond {
                lo_ge: Some(qe),
                ..c
            }),
            true,
        ),
        Prefix::Eb => (
            Some(RangeCond {
                hi_le: Some(qs),
                ..c
            }),
            true,
        ),
        Prefix::Ge => (
            Some(RangeCond {
                hi_gt: Some(qs),
                ..c
            }),
            false,
        ),
        Prefix::Le => (
            Some(RangeCond {
                lo_lt: Some(qe),
                ..c
            }),
            false,
        ),
        Prefix::Ne | Prefix::Ap => (None, false),
    }
}

/// A conservative superset filter for number and quantity comparisons.
fn number_cond(prefix: Prefix, v: f64) -> Option<RangeCond> {
    let slack = (v.abs() * 0.1).max(1.0);
    let c = RangeCond::default();
    match prefix {
        Prefix::Eq => Some(RangeCond {
            lo_ge: Some(v - slack),
            hi_le: Some(v + slack),
            ..c
        }),
        Prefix::Ap => Some(RangeCond {
            lo_ge: Some(v - 2.0 * slack),
            hi_le: Some(v + 2.0 * slack),
            ..c
        }),
        Prefix::Gt | Prefix::Ge | Prefix::Sa => Some(RangeCond {
            hi_gt: Some(v - slack),
            ..c
        }),
        Prefix::Lt | Prefix::Le | Prefix::Eb => Some(RangeCond {
            lo_lt: Some(v + slack),
            ..c
        }),
        Prefix::Ne => None,
    }
}

fn combine(parts: Vec<ClausePlan>, make: impl Fn(Vec<Token>) -> Filter) -> ClausePlan {
    // All parts are token filters here (or ConfirmOnly); OR them.
    let mut tokens = Vec::new();
    let mut exact = true;
    for p in parts {
        match p {
            ClausePlan::Exact(Filter::AnyToken(t)) => tokens.extend(t),
            ClausePlan::Coarse(Filter::AnyToken(t)) => {
                exact = false;
                tokens.extend(t)
            }
            _ => return ClausePlan::ConfirmOnly,
        }
    }
    if exact {
        ClausePlan::Exact(make(tokens))
    } else {
        ClausePlan::Coarse(make(tokens))
    }
}

impl Records {
    /// Plan a search.
    pub fn plan(&self, req: &SearchRequest) -> Result<Plan, FhirError> {
        let rtype = req.resource_type.as_str();
        let mut query = IndexQuery::all(rtype, 0);
        let mut confirm = Vec::new();
        for clause in &req.clauses {
            match self.plan_clause(rtype, clause)? {
                ClausePlan::Exact(f) => query.filters.push(f),
                ClausePlan::Coarse(f) => {
                    query.filters.push(f);
                    confirm.push(clause.clone());
                }
                ClausePlan::ConfirmOnly => confirm.push(clause.clone()),
            }
        }
        if let Some(sort) = req.sort.first() {
            query.descending = sort.descending;
            query.order = match &sort.param {
                ClauseParam::LastUpdated => Order::LastUpdated,
                ClauseParam::Id => Order::Rid,
                ClauseParam::Param(p) if p.kind == ParamKind::Date && !blind_date(rtype) => {
                    Order::Range(range_pkey(rtype, &p.code, None))
                }
                ClauseParam::Param(p) => {
                    return Err(FhirError::bad_request(format!(
                        "sorting by '{}' is not supported; sort by _lastUpdated or a clinical date parameter",
                        p.code
                    )));
                }
            };
        }
        Ok(Plan { query, confirm })
    }

    fn plan_clause(&self, rtype: &str, clause: &Clause) -> Result<ClausePlan, FhirError> {
        let blind = self.keys().blind();
        let p = match &clause.param {
            ClauseParam::Id => {
                let ids = clause
                    .values
                    .iter()
                    .filter_map(|v| match v {
                        // An id has no system: `id` or `|id`; `system|id` matches nothing.
                        SearchValue::Token {
                            system: TokenSystem::Any | TokenSystem::None,
                            code: Some(c),
                        } => Some(c.clone()),
                        _ => None,
                    })
                    .collect();
                return Ok(if clause.modifier.is_some() {
                    ClausePlan::ConfirmOnly
                } else {
                    ClausePlan::Exact(Filter::Ids(ids))
                });
            }
            ClauseParam::LastUpdated => {
                let mut conds = Vec::new();
                for v in &clause.values {
                    let SearchValue::Date { prefix, range } = v else {
                        return Ok(ClausePlan::ConfirmOnly);
                    };
                    // lastUpdated is an instant: its range is a single point.
                    let point = DateRange {
                        start: range.start,
                        end: range.end,
                    };
                    match range_conds(*prefix, &point).0 {
                        Some(mut c) => {
                            // The store keeps one column, `last_updated` (lu); the
                            // instant covers [lu, lu + 1µs). Rewrite conditions on
                            // the range end for integers: lu + 1 > x ⟺ lu ≥ x,
                            // lu + 1 ≤ x ⟺ lu < x.
                            if let Some(x) = c.hi_le.take() {
                                c.lo_lt = Some(c.lo_lt.map_or(x, |y| y.min(x)));
                            }
                            if let Some(x) = c.hi_gt.take() {
                                c.lo_ge = Some(c.lo_ge.map_or(x, |y| y.max(x)));
                            }
                            conds.push(c)
                        }
                        None => return Ok(ClausePlan::ConfirmOnly),
                    }
                }
                return Ok(ClausePlan::Coarse(Filter::LastUpdated(conds)));
            }
            ClauseParam::Param(p) => *p,
        };
        let tk = Tokens::new(blind, rtype, &p.code);
        if matches!(
            clause.modifier,
            Some(Modifier::Missing | Modifier::Text | Modifier::Identifier)
        ) {
            // Presence, the display text of a token and the identifier of a
            // reference are not indexed: answer from the opened resources.
            return Ok(ClausePlan::ConfirmOnly);
        }
        let not = clause.modifier == Some(Modifier::Not);
        let mut parts = Vec::new();
        let mut ranges = Vec::new();
        let mut range_exact = true;
        let mut range_pk = range_pkey(rtype, &p.code, None);
        for v in &clause.values {
            match v {
                SearchValue::Token { system, code } => {
                    parts.push(match (system, code) {
                        (TokenSystem::Any, Some(c)) => {
                            ClausePlan::Exact(Filter::AnyToken(vec![tk.code(c)]))
                        }
                        // `|code`: the code's token, then check that it has no system.
                        (TokenSystem::None, Some(c)) => {
                            ClausePlan::Coarse(Filter::AnyToken(vec![tk.code(c)]))
                        }
                        (TokenSystem::Is(s), Some(c)) => {
                            ClausePlan::Exact(Filter::AnyToken(vec![tk.system_code(s, c)]))
                        }
                        (_, None) => return Ok(ClausePlan::ConfirmOnly),
                    });
                }
                SearchValue::String(raw) => match clause.modifier {
                    Some(Modifier::Exact) => {
                        parts.push(ClausePlan::Exact(Filter::AnyToken(vec![tk.exact(raw)])))
                    }
                    Some(Modifier::Contains) => parts.push(ClausePlan::ConfirmOnly),
                    _ => {
                        let n = search_string(raw);
                        let len = n.chars().count();
                        if len == 0 {
                            parts.push(ClausePlan::ConfirmOnly);
                        } else {
                            let t = tk.prefix(char_prefix(&n, PREFIX_MAX));
                            parts.push(if len <= PREFIX_MAX {
                                ClausePlan::Exact(Filter::AnyToken(vec![t]))
                            } else {
                                ClausePlan::Coarse(Filter::AnyToken(vec![t]))
                            });
                        }
                    }
                },
                SearchValue::Reference { target_type, id } => {
                    let tokens = match (target_type, &clause.modifier) {
                        (_, Some(Modifier::Type(t))) => vec![tk.reference(t, id)],
                        (Some(t), _) => vec![tk.reference(t, id)],
                        (None, _) if id.contains("://") || id.starts_with("urn:") => {
                            vec![tk.uri(id)]
                        }
                        // A bare id: any of the parameter's target types.
                        (None, _) if !p.targets.is_empty() => {
                            p.targets.iter().map(|t| tk.reference(t, id)).collect()
                        }
                        (None, _) => return Ok(ClausePlan::ConfirmOnly),
                    };
                    parts.push(ClausePlan::Exact(Filter::AnyToken(tokens)));
                }
                SearchValue::Uri(u) => {
                    parts.push(ClausePlan::Exact(Filter::AnyToken(vec![tk.uri(u)])))
                }
                SearchValue::Date { prefix, range } if blind_date(rtype) => {
                    parts.push(plan_blind_date(&tk, *prefix, range));
                }
                SearchValue::Date { prefix, range } => match range_conds(*prefix, range) {
                    (Some(c), exact) => {
                        ranges.push(c);
                        range_exact &= exact;
                    }
                    (None, _) => return Ok(ClausePlan::ConfirmOnly),
                },
                SearchValue::Quantity {
                    prefix,
                    value,
                    system,
                    code,
                } => {
                    let unit = quantity_unit(system.as_deref(), code.as_deref());
                    let pk = range_pkey(rtype, &p.code, unit.as_deref());
                    if !ranges.is_empty() && pk != range_pk {
                        return Ok(ClausePlan::ConfirmOnly);
                    }
                    range_pk = pk;
                    match number_cond(*prefix, *value) {
                        Some(c) => ranges.push(c),
                        None => return Ok(ClausePlan::ConfirmOnly),
                    }
                    range_exact = false;
                }
                SearchValue::Number { prefix, value } => {
                    match number_cond(*prefix, *value) {
                        Some(c) => ranges.push(c),
                        None => return Ok(ClausePlan::ConfirmOnly),
                    }
                    range_exact = false;
                }
                SearchValue::Missing(_) => return Ok(ClausePlan::ConfirmOnly),
            }
        }
        if !ranges.is_empty() {
            if not {
                return Ok(ClausePlan::ConfirmOnly);
            }
            let f = Filter::AnyRange {
                pkey: range_pk,
                any: ranges,
            };
            return Ok(if range_exact {
                ClausePlan::Exact(f)
            } else {
                ClausePlan::Coarse(f)
            });
        }
        if not {
            // :not — no value matches: the complement of the token set, exact for tokens.
            return Ok(match combine(parts, Filter::AnyToken) {
                ClausePlan::Exact(Filter::AnyToken(t)) => ClausePlan::Exact(Filter::NoToken(t)),
                _ => ClausePlan::ConfirmOnly,
            });
        }
        Ok(combine(parts, Filter::AnyToken))
    }

    /// Run a planned search for one page, walking from `after` (backwards
    /// for `previous` links). Confirmed clauses are checked on each opened
    /// candidate until the page is full.
    /// With `raw`, pages that need no confirmation keep each resource as its
    /// stored JSON (see [`Records::open_raw`]) instead of parsing it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn execute(
        &self,
        tx: &mut dyn ReadTx,
        plan: &Plan,
        after: Option<Keyset>,
        backwards: bool,
        count: usize,
        raw: bool,
    ) -> Result<Page, FhirError> {
        let mut q = plan.query.clone();
        q.after = after;
        q.backwards = backwards;
        if plan.confirm.is_empty() {
            q.limit = count + 1;
            let mut rows = tx.search(&q).map_err(store_err)?;
            let more = rows.len() > count;
            if more {
                if backwards {
                    rows.remove(0);
                } else {
                    rows.truncate(count);
                }
            }
            let mut matches = Vec::with_capacity(rows.len());
            for row in rows {
                matches.push(if raw {
                    self.open_raw(tx, row)?
                } else {
                    self.open_version(tx, row)?
                });
            }
            return Ok(Page { matches, more });
        }
        let batch = (count * 2).clamp(32, 512);
        q.limit = batch;
        let mut matches: Vec<Opened> = Vec::new();
        let mut scanned = 0usize;
        loop {
            let rows = tx.search(&q).map_err(store_err)?;
            let exhausted = rows.len() < batch;
            let ordered: Box<dyn Iterator<Item = _>> = if backwards {
                Box::new(rows.into_iter().rev())
            } else {
                Box::new(rows.into_iter())
            };
            for row in ordered {
                scanned += 1;
                q.after = Some(Keyset {
                    sort_key: row.sort_key.unwrap_or(0.0),
                    rid: row.rid,
                });
                let opened = self.open_version(tx, row)?;
                if plan
                    .confirm
                    .iter()
                    .all(|c| c.matches(&opened.resource, opened.last_updated))
                {
                    if matches.len() == count {
                        if backwards {
                            matches.reverse();
                        }
                        return Ok(Page {
                            matches,
                            more: true,
                        });
                    }
                    matches.push(opened);
                }
            }
            if exhausted {
                break;
            }
            if scanned >= self.config().scan_limit {
                // Never a silently short page: say why and how to fix it.
                return Err(FhirError::bad_request(format!(
                    "this search needs more than {} candidates checked one by one (a parameter the index \
                     answers only coarsely: :missing, :contains, :text, system| alone, ne/ap, long strings); \
                     add a more selective parameter",
                    self.config().scan_limit
                )));
            }
        }
        if backwards {
            matches.reverse();
        }
        Ok(Page {
            matches,
            more: false,
        })
    }

    /// The ids of up to `limit` matches. Without clauses to confirm, the
    /// index answers alone and nothing is opened (conditional references
    /// and creates resolve this way on the ingest path).
    pub(crate) fn matching_ids(
        &self,
        tx: &mut dyn ReadTx,
        plan: &Plan,
        limit: usize,
    ) -> Result<Vec<String>, FhirError> {
        if plan.confirm.is_empty() {
            let mut q = plan.query.clone();
            q.limit = limit;
            return tx.search_ids(&q).map_err(store_err);
        }
        Ok(self
            .execute(tx, plan, None, false, limit, false)?
            .matches
            .into_iter()
            .map(|o| o.id)
            .collect())
    }

    /// The number of matches, or `None` when counting would cost more than
    /// the configured caps allow (the Bundle then carries no total).
    pub(crate) fn total(&self, tx: &mut dyn ReadTx, plan: &Plan) -> Result<Option<u64>, FhirError> {
        let cap = self.config().total_cap;
        if plan.confirm.is_empty() {
            let n = tx.count(&plan.query, cap).map_err(store_err)?;
            return Ok(if n >= cap { None } else { Some(n) });
        }
        let candidates = tx
            .count(&plan.query, self.config().confirm_cap as u64 + 1)
            .map_err(store_err)?;
        if candidates > self.config().confirm_cap as u64 {
            return Ok(None);
        }
        let mut q = plan.query.clone();
        q.limit = candidates as usize;
        let rows = tx.search(&q).map_err(store_err)?;
        let mut n = 0;
        for row in rows {
            let opened = self.open_version(tx, row)?;
            if plan
                .confirm
                .iter()
                .all(|c| c.matches(&opened.resource, opened.last_updated))
            {
                n += 1;
            }
        }
        Ok(Some(n))
    }
}

fn plan_blind_date(tk: &Tokens<'_>, prefix: Prefix, range: &DateRange) -> ClausePlan {
    if prefix == Prefix::Eq
        && let Some((precision, text)) = blind_date_texts(range).pop()
    {
        // Exact only when the query range is exactly that calendar unit.
        if aligned(range, precision) {
            return ClausePlan::Exact(Filter::AnyToken(vec![tk.date(precision, &text)]));
        }
    }
    let (Some((y0, _, _)), Some((y1, _, _))) = (ymd(range.start), ymd(range.end.saturating_sub(1)))
    else {
        return ClausePlan::ConfirmOnly;
    };
    let (from, to) = match prefix {
        Prefix::Eq | Prefix::Ap => (y0, y1),
        Prefix::Gt | Prefix::Ge | Prefix::Sa => (y0, 2200),
        Prefix::Lt | Prefix::Le | Prefix::Eb => (1800, y1),
        Prefix::Ne => return ClausePlan::ConfirmOnly,
    };
    let (from, to) = (from.max(1800), to.min(2200));
    if from > to {
        return ClausePlan::Coarse(Filter::AnyToken(Vec::new()));
    }
    let tokens = (from..=to)
        .map(|y| tk.date(b"y", &format!("{y:04}")))
        .collect();
    ClausePlan::Coarse(Filter::AnyToken(tokens))
}

/// Whether `range` is exactly one calendar year, month or day (UTC).
fn aligned(range: &DateRange, precision: &[u8]) -> bool {
    let Some(start) =
        time::OffsetDateTime::from_unix_timestamp_nanos(range.start as i128 * 1000).ok()
    else {
        return false;
    };
    let midnight = start.time() == time::Time::MIDNIGHT;
    let next = match precision {
        b"y" if start.month() == time::Month::January && start.day() == 1 && midnight => {
            start.replace_year(start.year() + 1).ok()
        }
        b"m" if start.day() == 1 && midnight => {
            let (y, m) = if start.month() == time::Month::December {
                (start.year() + 1, time::Month::January)
            } else {
                (start.year(), start.month().next())
            };
            start
                .replace_year(y)
                .ok()
                .and_then(|t| t.replace_month(m).ok())
        }
        b"d" if midnight => Some(start + time::Duration::days(1)),
        _ => None,
    };
    next.map(|n| (n.unix_timestamp_nanos() / 1000) as i64 == range.end)
        .unwrap_or(false)
}
