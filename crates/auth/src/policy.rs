//! The access policy: a request is allowed only if its scopes allow it,
//! the caller's role allows it, and the caller's relationship to the
//! patient allows it; an applicable Consent deny overrides all of that;
//! a clinician may break the glass with a stated reason.
//!
//! [`RequestGuard`] is the policy applied to one request: the record
//! service asks it before touching data (see [`custos_records::Guard`]),
//! and it keeps every answer as a [`Decision`].
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Arc;

use custos_fhir::{ErrorKind, FhirError};
use custos_records::{Guard, Interaction, Records, Visibility};
use custos_store::StoreExt;
use lru::LruCache;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::AuthConfig;
use crate::roles::{Permissions, Relationship, Role, is_directory_type};
use crate::scopes::{Context, Scopes};
use crate::state::Snapshot;
use crate::vault::Vault;
use crate::{AuthError, now_secs};
use custos_audit::Decision;

/// Who the caller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrincipalKind {
    /// A local user account.
    User { id: String, username: String },
    /// A registered system client (SMART Backend Services).
    Client { id: String },
    /// A user of an external OpenID Connect provider.
    External { issuer: String, subject: String },
}

/// An authenticated caller, as a verified token describes it.
#[derive(Debug, Clone)]
pub struct Principal {
    pub kind: PrincipalKind,
    pub role: Role,
    pub practitioner: Option<String>,
    pub patient: Option<String>,
    pub organization: Option<String>,
    pub scopes: Scopes,
    /// The launch patient of `patient/` scopes.
    pub launch_patient: Option<String>,
    pub client_id: String,
    /// A break-the-glass reason carried by the token.
    pub token_break_glass: Option<String>,
    /// The account may only read (a response to a threat).
    pub read_only: bool,
    /// Every access to a patient needs a break-the-glass reason (a response to a threat).
    pub require_break_glass: bool,
}

impl Principal {
    /// A stable subject string: `user:{id}`, `client:{id}`, `oidc:{iss}#{sub}`.
    pub fn subject(&self) -> String {
        match &self.kind {
            PrincipalKind::User { id, .. } => format!("user:{id}"),
            PrincipalKind::Client { id } => format!("client:{id}"),
            PrincipalKind::External { issuer, subject } => format!("oidc:{issuer}#{subject}"),
        }
    }

    pub fn username(&self) -> Option<&str> {
        match &self.kind {
            PrincipalKind::User { username, .. } => Some(username),
            _ => None,
        }
    }

    pub fn user_id(&self) -> Option<&str> {
        match &self.kind {
            PrincipalKind::User { id, .. } => Some(id),
            _ => None,
        }
    }
}

/// A break-the-glass grant: one user, one patient, until a time.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BreakGlassGrant {
    pub subject: String,
    pub patient: String,
    pub reason: String,
    pub granted: i64,
    pub until: i64,
}

pub const BREAK_GLASS_KIND: &str = "break-glass";

/// A deny rule distilled from an active Consent.
#[derive(Debug, Clone, PartialEq)]
struct DenyRule {
    /// `Practitioner/x`, `Organization/y` …; empty: everyone.
    actors: Vec<String>,
    /// PurposeOfUse codes; empty: every purpose.
    purposes: Vec<String>,
    /// Nested permits that carve exceptions out of the deny.
    exceptions: Vec<DenyRule>,
    /// Period of the provision, UTC micros.
    period: Option<(Option<i64>, Option<i64>)>,
}

fn period_of(v: &Value) -> Option<(Option<i64>, Option<i64>)> {
    let p = v.get("period")?;
    let bound = |k: &str| {
        p.get(k)
            .and_then(Value::as_str)
            .and_then(custos_fhir::date::parse_range)
    };
    Some((bound("start").map(|r| r.start), bound("end").map(|r| r.end)))
}

/// The strings at `pointer` in each element of the array `key` of `v`.
fn strings_in(v: &Value, key: &str, pointer: &str) -> Vec<String> {
    v.get(key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.pointer(pointer).and_then(Value::as_str))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn provision_rule(p: &Value) -> DenyRule {
    DenyRule {
        actors: strings_in(p, "actor", "/reference/reference"),
        purposes: strings_in(p, "purpose", "/code"),
        exceptions: Vec::new(),
        period: period_of(p),
    }
}

/// The deny rules of one Consent: a top-level `deny` provision (with its
/// nested `permit` exceptions), or nested `deny` provisions under a
/// top-level `permit`.
fn deny_rules(consent: &Value) -> Vec<DenyRule> {
    let Some(top) = consent.get("provision") else {
        return Vec::new();
    };
    let nested: Vec<&Value> = top
        .get("provision")
        .and_then(Value::as_array)
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    match top.get("type").and_then(Value::as_str) {
        Some("deny") => {
            let mut rule = provision_rule(top);
            rule.exceptions = nested
                .iter()
                .filter(|p| p.get("type").and_then(Value::as_str) == Some("permit"))
                .map(|p| provision_rule(p))
                .collect();
            vec![rule]
        }
        _ => nested
            .iter()
            .filter(|p| p.get("type").and_then(Value::as_str) == Some("deny"))
            .map(|p| provision_rule(p))
            .collect(),
    }
}

impl DenyRule {
    fn covers(&self, actors: &[String], purpose: &str, now_micros: i64) -> bool {
        if let Some((start, end)) = self.period
            && (start.is_some_and(|s| now_micros < s) || end.is_some_and(|e| now_micros >= e))
        {
            return false;
        }
        let actor_ok = self.actors.is_empty() || self.actors.iter().any(|a| actors.contains(a));
        let purpose_ok = self.purposes.is_empty() || self.purposes.iter().any(|p| p == purpose);
        actor_ok && purpose_ok
    }

    fn denies(&self, actors: &[String], purpose: &str, now_micros: i64) -> bool {
        self.covers(actors, purpose, now_micros)
            && !self
                .exceptions
                .iter()
                .any(|e| e.covers(actors, purpose, now_micros))
    }
}

/// A care relationship kind (`care-team`, `encounter`, …), or none.
type Relation = Option<&'static str>;
/// Every patient's Consent deny rules (see [`Policy::all_deny_rules`]).
type DenyRulesByPatient = Arc<AllDenyRules>;

/// The deny rules of all active Consents, by patient.
struct AllDenyRules {
    /// False when there were more active Consents than could be read at once.
    complete: bool,
    by_patient: HashMap<String, Arc<Vec<DenyRule>>>,
}

/// Most active Consents read into the global view.
const GLOBAL_CONSENT_CAP: usize = 100_000;
/// Which rule lets a caller into a compartment (`Ok`), or why not (`Err`).
type RelationshipAnswer = Result<Result<String, String>, FhirError>;

struct Cached<T> {
    generation: u64,
    until: i64,
    value: T,
}

impl<T: Clone> Cached<T> {
    /// The value, if nothing was written since (`generation` is the current
    /// one) and it has not outlived its time.
    fn fresh(&self, generation: u64) -> Option<T> {
        (self.generation == generation && self.until > now_secs()).then(|| self.value.clone())
    }
}

/// The policy, shared by all requests: configuration, permission table,
/// and caches of relationships and consents.
pub struct Policy {
    config: AuthConfig,
    permissions: Permissions,
    records: Records,
    vault: Vault,
    relations: Mutex<LruCache<(String, String), Cached<Relation>>>,
    related_sets: Mutex<LruCache<String, Cached<Arc<Vec<String>>>>>,
    consents: Mutex<LruCache<String, Cached<Arc<Vec<DenyRule>>>>>,
    all_consents: Mutex<Option<Cached<DenyRulesByPatient>>>,
    grants: Mutex<HashMap<(String, String), BreakGlassGrant>>,
}

/// Most patients a clinician's searches are narrowed to at once.
const RELATED_CAP: usize = 20_000;

fn cache<K: std::hash::Hash + Eq, V>(n: usize) -> Mutex<LruCache<K, V>> {
    Mutex::new(LruCache::new(NonZeroUsize::new(n).expect("non-zero")))
}

impl Policy {
    /// `records` must be an unrestricted handle (the policy reads facts).
    pub async fn new(
        config: AuthConfig,
        permissions: Permissions,
        records: Records,
        vault: Vault,
    ) -> Result<Policy, AuthError> {
        let p = Policy {
            config,
            permissions,
            records,
            vault,
            relations: cache(65_536),
            related_sets: cache(4_096),
            consents: cache(65_536),
            all_consents: Mutex::new(None),
            grants: Mutex::new(HashMap::new()),
        };
        let now = now_secs();
        let stored: Vec<(String, i64, BreakGlassGrant)> = p.vault.list(BREAK_GLASS_KIND).await?;
        let mut g = p.grants.lock();
        for (_, _, grant) in stored {
            if grant.until > now {
                g.insert((grant.subject.clone(), grant.patient.clone()), grant);
            }
        }
        drop(g);
        Ok(p)
    }

    pub fn permissions(&self) -> &Permissions {
        &self.permissions
    }

    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    /// Cache `value`, read after generation `generation` (of relationships
    /// or of consents, taken before the read: a change during it makes the
    /// entry stale).
    fn stamp<T>(&self, generation: u64, value: T) -> Cached<T> {
        Cached {
            generation,
            until: now_secs() + self.config.relationship_cache_secs,
            value,
        }
    }

    fn encounter_since(&self) -> i64 {
        (now_secs() - self.config.encounter_window_days * 86_400) * 1_000_000
    }

    /// The care relationship of a practitioner with a patient (cached).
    pub async fn care_relation(
        &self,
        practitioner: &str,
        patient: &str,
    ) -> Result<Option<&'static str>, FhirError> {
        let key = (practitioner.to_string(), patient.to_string());
        if let Some(c) = self.relations.lock().get(&key)
            && let Some(v) = c.fresh(self.records.relations_generation())
        {
            return Ok(v);
        }
        let generation = self.records.relations_generation();
        let v = self
            .records
            .care_relation(practitioner, patient, self.encounter_since())
            .await?;
        self.relations.lock().put(key, self.stamp(generation, v));
        Ok(v)
    }

    /// Every patient a practitioner cares for (cached).
    async fn related_patients(&self, practitioner: &str) -> Result<Arc<Vec<String>>, FhirError> {
        if let Some(c) = self.related_sets.lock().get(practitioner)
            && let Some(v) = c.fresh(self.records.relations_generation())
        {
            return Ok(v);
        }
        let generation = self.records.relations_generation();
        let v = Arc::new(
            self.records
                .related_patients(practitioner, self.encounter_since(), RELATED_CAP)
                .await?,
        );
        self.related_sets
            .lock()
            .put(practitioner.to_string(), self.stamp(generation, v.clone()));
        Ok(v)
    }

    async fn deny_rules_of(&self, patient: &str) -> Result<Arc<Vec<DenyRule>>, FhirError> {
        // Usually every active Consent fits in the global view: one query
        // per change of Consents, not one per patient (a bulk load of new
        // patients would otherwise ask once for each).
        let all = self.all_deny_rules().await?;
        if all.complete {
            return Ok(all.by_patient.get(patient).cloned().unwrap_or_default());
        }
        if let Some(c) = self.consents.lock().get(patient)
            && let Some(v) = c.fresh(self.records.consents_generation())
        {
            return Ok(v);
        }
        let generation = self.records.consents_generation();
        let consents = self.records.active_consents(Some(patient), 1_000).await?;
        let v = Arc::new(consents.iter().flat_map(deny_rules).collect::<Vec<_>>());
        self.consents
            .lock()
            .put(patient.to_string(), self.stamp(generation, v.clone()));
        Ok(v)
    }

    /// Deny rules of every patient who has any: the whole view when there
    /// are at most [`GLOBAL_CONSENT_CAP`] active Consents.
    async fn all_deny_rules(&self) -> Result<DenyRulesByPatient, FhirError> {
        if let Some(c) = self.all_consents.lock().as_ref()
            && let Some(v) = c.fresh(self.records.consents_generation())
        {
            return Ok(v);
        }
        let generation = self.records.consents_generation();
        let consents = self
            .records
            .active_consents(None, GLOBAL_CONSENT_CAP + 1)
            .await?;
        let mut map: HashMap<String, Vec<DenyRule>> = HashMap::new();
        for c in consents.iter().take(GLOBAL_CONSENT_CAP) {
            let rules = deny_rules(c);
            if rules.is_empty() {
                continue;
            }
            if let Some(p) = custos_fhir::compartment::patient_of(c) {
                map.entry(p).or_default().extend(rules);
            }
        }
        let v = Arc::new(AllDenyRules {
            complete: consents.len() <= GLOBAL_CONSENT_CAP,
            by_patient: map.into_iter().map(|(k, v)| (k, Arc::new(v))).collect(),
        });
        *self.all_consents.lock() = Some(self.stamp(generation, v.clone()));
        Ok(v)
    }

    fn active_grant(&self, subject: &str, patient: &str) -> Option<BreakGlassGrant> {
        let now = now_secs();
        let mut g = self.grants.lock();
        let key = (subject.to_string(), patient.to_string());
        match g.get(&key) {
            Some(grant) if grant.until > now => Some(grant.clone()),
            Some(_) => {
                g.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Patients with an active break-the-glass grant for `subject`.
    fn granted_patients(&self, subject: &str) -> Vec<String> {
        let now = now_secs();
        self.grants
            .lock()
            .values()
            .filter(|g| g.subject == subject && g.until > now)
            .map(|g| g.patient.clone())
            .collect()
    }

    async fn grant_break_glass(
        &self,
        subject: &str,
        patient: &str,
        reason: &str,
    ) -> Result<BreakGlassGrant, FhirError> {
        let now = now_secs();
        let grant = BreakGlassGrant {
            subject: subject.to_string(),
            patient: patient.to_string(),
            reason: reason.to_string(),
            granted: now,
            until: now + self.config.break_glass_minutes * 60,
        };
        let key = format!("{subject}|{patient}");
        self.vault
            .put(BREAK_GLASS_KIND, &key, &grant, None)
            .await
            .map_err(|e| FhirError::internal(e.to_string()))?;
        self.grants
            .lock()
            .insert((subject.to_string(), patient.to_string()), grant.clone());
        tracing::warn!("break-the-glass access granted");
        Ok(grant)
    }
}

/// The policy applied to one request. Implements the record service's
/// [`Guard`] and keeps every decision it makes.
pub struct RequestGuard {
    policy: Arc<Policy>,
    principal: Arc<Principal>,
    snapshot: Arc<Snapshot>,
    /// The PurposeOfUse of this request.
    purpose: String,
    /// A break-the-glass reason stated on this request (header) or its token.
    break_glass: Option<String>,
    decisions: Mutex<Vec<Decision>>,
    /// Facts already established for this request (a transaction asks
    /// about the same patient for each of its entries).
    consent_memo: Mutex<HashMap<String, bool>>,
    relationship_memo: Mutex<HashMap<(Context, String), Result<String, String>>>,
}

/// A refusal that reveals nothing about the data.
fn refuse(message: impl Into<String>) -> FhirError {
    FhirError::forbidden(message)
}

impl RequestGuard {
    pub fn new(
        policy: Arc<Policy>,
        principal: Arc<Principal>,
        snapshot: Arc<Snapshot>,
        purpose: Option<String>,
        break_glass: Option<String>,
    ) -> RequestGuard {
        let break_glass = break_glass
            .or_else(|| principal.token_break_glass.clone())
            .map(|r| r.trim().chars().take(500).collect::<String>())
            .filter(|r| !r.is_empty());
        let purpose = match (&break_glass, purpose) {
            (_, Some(p)) if !p.trim().is_empty() => p.trim().to_string(),
            (Some(_), _) => "ETREAT".to_string(),
            _ => principal.role.default_purpose().to_string(),
        };
        RequestGuard {
            policy,
            principal,
            snapshot,
            purpose,
            break_glass,
            decisions: Mutex::new(Vec::new()),
            consent_memo: Mutex::new(HashMap::new()),
            relationship_memo: Mutex::new(HashMap::new()),
        }
    }

    pub fn principal(&self) -> &Principal {
        &self.principal
    }

    pub fn purpose(&self) -> &str {
        &self.purpose
    }

    pub fn break_glass_reason(&self) -> Option<&str> {
        self.break_glass.as_deref()
    }

    /// A copy of the decisions made so far.
    pub fn decisions(&self) -> Vec<Decision> {
        self.decisions.lock().clone()
    }

    /// The decisions made so far.
    pub fn take_decisions(&self) -> Vec<Decision> {
        std::mem::take(&mut *self.decisions.lock())
    }

    fn record(
        &self,
        interaction: Interaction,
        rtype: Option<&str>,
        id: Option<&str>,
        patient: Option<&str>,
        allowed: bool,
        rule: &str,
    ) {
        self.decisions.lock().push(Decision {
            interaction: interaction.name().into(),
            rtype: rtype.map(str::to_string),
            id: id.map(str::to_string),
            patient: patient.map(str::to_string),
            allowed,
            rule: rule.to_string().into(),
        });
    }

    fn deny(
        &self,
        interaction: Interaction,
        rtype: Option<&str>,
        id: Option<&str>,
        patient: Option<&str>,
        rule: &str,
        err: FhirError,
    ) -> Result<(), FhirError> {
        self.record(interaction, rtype, id, patient, false, rule);
        Err(err)
    }

    fn role_policy(&self) -> &crate::roles::RolePolicy {
        self.policy.permissions.of(self.principal.role)
    }

    /// The identities a Consent provision may name for this caller.
    fn actor_refs(&self) -> Vec<String> {
        let p = &self.principal;
        let mut out = Vec::new();
        if let Some(x) = &p.practitioner {
            out.push(format!("Practitioner/{x}"));
        }
        if let Some(x) = &p.organization {
            out.push(format!("Organization/{x}"));
        }
        if let Some(x) = &p.patient {
            out.push(format!("Patient/{x}"));
        }
        out
    }

    /// Whether `patient`'s consent denies this caller (their own record never).
    async fn consent_denies(&self, patient: &str) -> Result<bool, FhirError> {
        if self.principal.patient.as_deref() == Some(patient) {
            return Ok(false);
        }
        if let Some(v) = self.consent_memo.lock().get(patient) {
            return Ok(*v);
        }
        let rules = self.policy.deny_rules_of(patient).await?;
        if rules.is_empty() {
            // Most patients have no deny rule: nothing to remember either.
            return Ok(false);
        }
        let now = now_secs() * 1_000_000;
        let actors = self.actor_refs();
        let denied = rules.iter().any(|r| r.denies(&actors, &self.purpose, now));
        self.consent_memo.lock().insert(patient.to_string(), denied);
        Ok(denied)
    }

    /// The scope context that allows this, if any.
    fn scope_context(&self, interaction: Interaction, rtype: &str) -> Option<Context> {
        self.principal.scopes.allows(interaction, rtype)
    }

    /// Read-only switches, then scope, then role.
    fn check_type_sync(&self, interaction: Interaction, rtype: &str) -> Result<Context, FhirError> {
        let writes = matches!(
            interaction,
            Interaction::Create | Interaction::Update | Interaction::Delete
        );
        if writes && self.snapshot.read_only.on {
            self.record(
                interaction,
                Some(rtype),
                None,
                None,
                false,
                "server-read-only",
            );
            return Err(FhirError::new(
                ErrorKind::Unavailable,
                "the server is in read-only mode; writes are refused",
            ));
        }
        if writes && self.principal.read_only {
            self.record(
                interaction,
                Some(rtype),
                None,
                None,
                false,
                "account-read-only",
            );
            return Err(refuse("this account may only read"));
        }
        let Some(ctx) = self.scope_context(interaction, rtype) else {
            self.record(interaction, Some(rtype), None, None, false, "scope");
            return Err(refuse(format!(
                "the token's scopes do not allow {} on {rtype}",
                interaction.name()
            )));
        };
        if !self.role_policy().allows(interaction, rtype) {
            self.record(interaction, Some(rtype), None, None, false, "role");
            return Err(refuse(format!(
                "the role {} may not {} {rtype}",
                self.principal.role,
                interaction.name()
            )));
        }
        if ctx == Context::Patient && self.principal.launch_patient.is_none() {
            self.record(interaction, Some(rtype), None, None, false, "scope");
            return Err(refuse("patient scopes need a launch patient"));
        }
        Ok(ctx)
    }

    /// Patients whose compartment this caller may search, or `None` for any.
    async fn reachable_patients(
        &self,
        interaction: Interaction,
        rtype: Option<&str>,
    ) -> Result<Option<Vec<String>>, FhirError> {
        let ctx = match rtype {
            Some(t) => self.check_type_sync(interaction, t)?,
            None => {
                // System-wide: the role and the scopes must allow every type.
                let all = custos_fhir::types::RESOURCE_TYPES.iter().all(|t| {
                    self.role_policy().allows(interaction, t)
                        && self.scope_context(interaction, t).is_some()
                });
                if !all {
                    self.record(interaction, None, None, None, false, "role");
                    return Err(refuse(
                        "system-wide history needs access to every resource type",
                    ));
                }
                // The narrowest context any type is allowed in decides.
                custos_fhir::types::RESOURCE_TYPES
                    .iter()
                    .filter_map(|t| self.scope_context(interaction, t))
                    .min()
                    .unwrap_or(Context::Patient)
            }
        };
        if ctx == Context::Patient {
            // The launch patient only — and only if the role reaches them.
            let mut out = Vec::new();
            if let Some(lp) = &self.principal.launch_patient {
                let reached = self.relationship(Context::User, lp).await?.is_ok()
                    || self
                        .policy
                        .active_grant(&self.principal.subject(), lp)
                        .is_some();
                if reached {
                    out.push(lp.clone());
                }
            }
            return Ok(Some(out));
        }
        if self.principal.require_break_glass && self.principal.role != Role::Patient {
            // Only patients reached by breaking the glass (see `relationship_uncached`).
            return Ok(Some(
                self.policy.granted_patients(&self.principal.subject()),
            ));
        }
        match self.role_policy().relationship {
            Relationship::Any => Ok(None),
            Relationship::OwnRecord => Ok(Some(self.principal.patient.iter().cloned().collect())),
            Relationship::Care => {
                let mut set: Vec<String> = match &self.principal.practitioner {
                    Some(p) => self.policy.related_patients(p).await?.to_vec(),
                    None => Vec::new(),
                };
                set.extend(self.policy.granted_patients(&self.principal.subject()));
                Ok(Some(set))
            }
        }
    }

    /// The relationship rule that lets this caller into `patient`'s
    /// compartment, or why not.
    fn relationship<'a>(
        &'a self,
        ctx: Context,
        patient: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = RelationshipAnswer> + Send + 'a>> {
        Box::pin(self.relationship_inner(ctx, patient))
    }

    async fn relationship_inner(&self, ctx: Context, patient: &str) -> RelationshipAnswer {
        let key = (ctx, patient.to_string());
        if let Some(v) = self.relationship_memo.lock().get(&key) {
            return Ok(v.clone());
        }
        let answer = self.relationship_uncached(ctx, patient).await?;
        self.relationship_memo.lock().insert(key, answer.clone());
        Ok(answer)
    }

    async fn relationship_uncached(&self, ctx: Context, patient: &str) -> RelationshipAnswer {
        if ctx == Context::Patient && self.principal.launch_patient.as_deref() != Some(patient) {
            return Ok(Err("outside the launch patient".into()));
        }
        if self.principal.require_break_glass && self.principal.role != Role::Patient {
            // A response to an alert: no relationship counts until the
            // caller breaks the glass with a stated reason.
            return Ok(Err("break-the-glass required".into()));
        }
        Ok(match self.role_policy().relationship {
            Relationship::Any => Ok(format!("role:{}", self.principal.role)),
            Relationship::OwnRecord => {
                if self.principal.patient.as_deref() == Some(patient) {
                    Ok("own-record".into())
                } else {
                    Err("not the patient's own record".into())
                }
            }
            Relationship::Care => {
                let rel = match &self.principal.practitioner {
                    Some(p) => self.policy.care_relation(p, patient).await?,
                    None => None,
                };
                match rel {
                    Some(kind) => Ok(kind.to_string()),
                    None => Err("no care relationship".into()),
                }
            }
        })
    }
}

#[async_trait::async_trait]
impl Guard for RequestGuard {
    async fn check_type(&self, interaction: Interaction, rtype: &str) -> Result<(), FhirError> {
        self.check_type_sync(interaction, rtype).map(|_| ())
    }

    async fn visibility(
        &self,
        interaction: Interaction,
        rtype: Option<&str>,
        focus: Option<&str>,
    ) -> Result<Visibility, FhirError> {
        let reachable = self.reachable_patients(interaction, rtype).await?;
        let consent_exempt = self.break_glass.is_some()
            && self.role_policy().break_glass
            && self.policy.config.break_glass_overrides_consent;
        let out = match reachable {
            None => {
                // Any patient, except those whose consent denies this caller.
                let all = self.policy.all_deny_rules().await?;
                if !all.complete {
                    // Fail closed: a search cannot be narrowed by consents it cannot see.
                    self.record(interaction, rtype, None, None, false, "consent-unknown");
                    return Err(FhirError::new(
                        custos_fhir::ErrorKind::Unavailable,
                        "too many active Consents to enforce on a search across patients; search one patient's records",
                    ));
                }
                let now = now_secs() * 1_000_000;
                let actors = self.actor_refs();
                let denied: Vec<String> = all
                    .by_patient
                    .iter()
                    .filter(|(_, rules)| {
                        !consent_exempt
                            && rules.iter().any(|r| r.denies(&actors, &self.purpose, now))
                    })
                    .map(|(p, _)| p.clone())
                    .collect();
                if denied.is_empty() {
                    Visibility::All
                } else {
                    Visibility::Except { patients: denied }
                }
            }
            Some(mut patients) => {
                // A search that names one patient outside the caller's care,
                // with a break-the-glass reason, opens that compartment.
                if let (Some(p), Some(t)) = (focus, rtype)
                    && !patients.iter().any(|x| x == p)
                    && self.break_glass.is_some()
                    && self.decide(interaction, t, p, Some(p), true).await.is_ok()
                {
                    patients.push(p.to_string());
                }
                let mut keep = Vec::with_capacity(patients.len());
                for p in patients {
                    if consent_exempt || !self.consent_denies(&p).await? {
                        keep.push(p);
                    }
                }
                // Outside any compartment only directory resources are
                // visible to such a caller (see `decide`).
                Visibility::Only {
                    patients: keep,
                    shared: rtype.is_some_and(is_directory_type),
                }
            }
        };
        self.record(interaction, rtype, None, None, true, "visibility");
        Ok(out)
    }

    async fn check_resource(
        &self,
        interaction: Interaction,
        rtype: &str,
        id: &str,
        compartment: Option<&str>,
    ) -> Result<(), FhirError> {
        self.decide(interaction, rtype, id, compartment, true).await
    }

    async fn may_include(&self, rtype: &str, id: &str, compartment: Option<&str>) -> bool {
        self.decide(Interaction::Read, rtype, id, compartment, false)
            .await
            .is_ok()
    }
}

impl RequestGuard {
    /// The decision on one resource. `may_grant`: whether a stated
    /// break-the-glass reason may open a new grant (only for what the
    /// request names itself, never for `_include` targets).
    async fn decide(
        &self,
        interaction: Interaction,
        rtype: &str,
        id: &str,
        compartment: Option<&str>,
        may_grant: bool,
    ) -> Result<(), FhirError> {
        let ctx = self.check_type_sync(interaction, rtype)?;
        let Some(patient) = compartment else {
            // In no patient's compartment: a directory or definition
            // resource is open to every role the type table lets in; any
            // other (it may hold patient data nobody's compartment claims)
            // only to roles that reach every patient.
            if is_directory_type(rtype) {
                self.record(interaction, Some(rtype), Some(id), None, true, "directory");
                return Ok(());
            }
            if ctx != Context::Patient && self.role_policy().relationship == Relationship::Any {
                self.record(
                    interaction,
                    Some(rtype),
                    Some(id),
                    None,
                    true,
                    "role-any-patient",
                );
                return Ok(());
            }
            let err = if self.principal.role == Role::Patient || ctx == Context::Patient {
                FhirError::not_found(format!("{rtype}/{id} is not known"))
            } else {
                refuse("this resource belongs to no patient in your care")
            };
            return self.deny(interaction, Some(rtype), Some(id), None, "unassigned", err);
        };
        // Patients and patient-scoped apps must not learn that other
        // patients' records exist; nothing (not even breaking the glass)
        // takes a patient-scoped token outside its launch patient.
        let hidden = || FhirError::not_found(format!("{rtype}/{id} is not known"));
        if ctx == Context::Patient && self.principal.launch_patient.as_deref() != Some(patient) {
            return self.deny(
                interaction,
                Some(rtype),
                Some(id),
                Some(patient),
                "outside-launch-patient",
                hidden(),
            );
        }
        // The relationship first: a caller who may not reach the patient
        // learns nothing of their Consents.
        let relationship = self.relationship(ctx, patient).await?;
        let may_break_glass = self.role_policy().break_glass;
        let overrides_consent = self.policy.config.break_glass_overrides_consent;
        let consent_refusal = || refuse("the patient's consent does not allow this access");
        match relationship {
            Ok(rule) => {
                if self.consent_denies(patient).await?
                    && !(self.break_glass.is_some() && may_break_glass && overrides_consent)
                {
                    return self.deny(
                        interaction,
                        Some(rtype),
                        Some(id),
                        Some(patient),
                        "consent-deny",
                        consent_refusal(),
                    );
                }
                self.record(
                    interaction,
                    Some(rtype),
                    Some(id),
                    Some(patient),
                    true,
                    &rule,
                );
                Ok(())
            }
            Err(why) => {
                // A new Patient opens a compartment that holds nothing yet
                // (asked only when no relationship answered: it costs a read).
                if interaction == Interaction::Create && rtype == "Patient" && patient == id {
                    let (t, i) = (rtype.to_string(), id.to_string());
                    let exists = self
                        .policy
                        .records
                        .store()
                        .read(move |tx| tx.head(&t, &i))
                        .await
                        .map_err(|e| FhirError::internal(e.to_string()))?
                        .is_some();
                    if !exists {
                        self.record(
                            interaction,
                            Some(rtype),
                            Some(id),
                            Some(patient),
                            true,
                            "new-patient",
                        );
                        return Ok(());
                    }
                }
                if may_break_glass
                    && (self.break_glass.is_some()
                        || self
                            .policy
                            .active_grant(&self.principal.subject(), patient)
                            .is_some())
                {
                    if !overrides_consent && self.consent_denies(patient).await? {
                        return self.deny(
                            interaction,
                            Some(rtype),
                            Some(id),
                            Some(patient),
                            "consent-deny",
                            consent_refusal(),
                        );
                    }
                    // Emergency access must not turn itself into a lasting
                    // care relationship.
                    let writes = !matches!(interaction, Interaction::Read | Interaction::Search);
                    if writes && custos_records::RELATION_TYPES.contains(&rtype) {
                        return self.deny(
                            interaction,
                            Some(rtype),
                            Some(id),
                            Some(patient),
                            "break-glass-no-relationship-writes",
                            refuse(format!(
                                "breaking the glass does not allow writing a {rtype}: it would create a lasting care relationship"
                            )),
                        );
                    }
                }
                let subject = self.principal.subject();
                if may_break_glass {
                    if self.policy.active_grant(&subject, patient).is_some() {
                        self.record(
                            interaction,
                            Some(rtype),
                            Some(id),
                            Some(patient),
                            true,
                            "break-glass",
                        );
                        return Ok(());
                    }
                    if let (Some(reason), true) = (&self.break_glass, may_grant) {
                        self.policy
                            .grant_break_glass(&subject, patient, reason)
                            .await?;
                        self.record(
                            interaction,
                            Some(rtype),
                            Some(id),
                            Some(patient),
                            true,
                            "break-glass",
                        );
                        return Ok(());
                    }
                    return self.deny(
                        interaction,
                        Some(rtype),
                        Some(id),
                        Some(patient),
                        "no-relationship",
                        refuse(
                            "no care relationship with this patient; in an emergency, state a reason in the X-Break-Glass-Reason header",
                        ),
                    );
                }
                let err = if self.principal.role == Role::Patient {
                    hidden()
                } else {
                    refuse("access to this patient's records is not allowed")
                };
                self.deny(interaction, Some(rtype), Some(id), Some(patient), &why, err)
            }
        }
    }
}
