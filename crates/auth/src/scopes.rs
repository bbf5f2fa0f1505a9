//! SMART on FHIR scopes, v1 (`patient/*.read`) and v2 (`user/Observation.rs`).
use custos_records::Interaction;

/// Whose data a resource scope speaks of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Context {
    /// The launch patient's compartment only.
    Patient,
    /// Whatever the user may see.
    User,
    /// A backend system, no user.
    System,
}

/// One resource scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceScope {
    pub context: Context,
    /// `None` for `*`.
    pub rtype: Option<String>,
    /// The SMART v2 letters granted (subset of `cruds`).
    pub letters: String,
}

/// A parsed scope string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scopes {
    pub resources: Vec<ResourceScope>,
    pub openid: bool,
    pub fhir_user: bool,
    pub launch_patient: bool,
    pub offline_access: bool,
    pub online_access: bool,
    /// The scopes understood, normalized, as granted back to the client.
    pub granted: Vec<String>,
    /// Scopes not understood or not supported (dropped from the grant).
    pub dropped: Vec<String>,
}

fn letters_v1(s: &str) -> Option<&'static str> {
    match s {
        "read" => Some("rs"),
        "write" => Some("cud"),
        "*" => Some("cruds"),
        _ => None,
    }
}

/// SMART v2 letters must appear in `cruds` order, each at most once.
fn letters_v2(s: &str) -> Option<String> {
    if s.is_empty() {
        return None;
    }
    let order = "cruds";
    let mut last = None;
    for c in s.chars() {
        let pos = order.find(c)?;
        if last.is_some_and(|l| pos <= l) {
            return None;
        }
        last = Some(pos);
    }
    Some(s.to_string())
}

fn parse_resource_scope(s: &str) -> Option<ResourceScope> {
    let (ctx, rest) = s.split_once('/')?;
    let context = match ctx {
        "patient" => Context::Patient,
        "user" => Context::User,
        "system" => Context::System,
        _ => return None,
    };
    let (rtype, perm) = rest.rsplit_once('.')?;
    // v2 query restrictions (`?category=…`) are not supported: dropped.
    if perm.contains('?') {
        return None;
    }
    let rtype = match rtype {
        "*" => None,
        t if custos_fhir::types::is_resource_type(t) => Some(t.to_string()),
        _ => return None,
    };
    let letters = letters_v1(perm)
        .map(str::to_string)
        .or_else(|| letters_v2(perm))?;
    Some(ResourceScope {
        context,
        rtype,
        letters,
    })
}

impl Scopes {
    /// Parse a space-separated scope string.
    pub fn parse(s: &str) -> Scopes {
        let mut out = Scopes::default();
        for part in s.split_whitespace() {
            let known = match part {
                "openid" => {
                    out.openid = true;
                    true
                }
                "fhirUser" | "profile" => {
                    out.fhir_user = true;
                    true
                }
                "launch/patient" => {
                    out.launch_patient = true;
                    true
                }
                "offline_access" => {
                    out.offline_access = true;
                    true
                }
                "online_access" => {
                    out.online_access = true;
                    true
                }
                _ => match parse_resource_scope(part) {
                    Some(r) => {
                        out.resources.push(r);
                        true
                    }
                    None => false,
                },
            };
            if known {
                if !out.granted.iter().any(|g| g == part) {
                    out.granted.push(part.to_string());
                }
            } else {
                out.dropped.push(part.to_string());
            }
        }
        out
    }

    /// Keep only the resource scopes of the allowed contexts (a person
    /// never gets `system/`, a system never `user/` or `patient/`).
    pub fn restrict_contexts(mut self, allowed: &[Context]) -> Scopes {
        let (keep, drop): (Vec<_>, Vec<_>) = self
            .resources
            .into_iter()
            .partition(|r| allowed.contains(&r.context));
        self.resources = keep;
        for r in drop {
            let text = scope_text(&r);
            self.granted.retain(|g| !same_scope(g, &r));
            self.dropped.push(text);
        }
        self
    }

    /// The strongest context in which the scopes allow `interaction` on
    /// `rtype`: `User`/`System` beat `Patient` (which adds a restriction to
    /// the launch patient). `None`: no scope allows it.
    pub fn allows(&self, interaction: Interaction, rtype: &str) -> Option<Context> {
        self.resources
            .iter()
            .filter(|r| r.rtype.as_deref().is_none_or(|t| t == rtype))
            .filter(|r| r.letters.contains(interaction.letter()))
            .map(|r| r.context)
            .max()
    }

    /// Only the resource scopes that `limit` covers (same context, a type
    /// it names or `*`, a superset of the letters); other scopes stay as
    /// asked only if `limit` has them too.
    pub fn within(mut self, limit: &Scopes) -> Scopes {
        let covered = |r: &ResourceScope| {
            limit.resources.iter().any(|l| {
                l.context == r.context
                    && (l.rtype.is_none() || l.rtype == r.rtype)
                    && r.letters.chars().all(|c| l.letters.contains(c))
            })
        };
        let (keep, drop): (Vec<_>, Vec<_>) = self.resources.into_iter().partition(covered);
        self.resources = keep;
        for r in drop {
            self.granted.retain(|g| !same_scope(g, &r));
            self.dropped.push(scope_text(&r));
            // Narrow what is not covered whole to its overlap with each
            // registered scope (`system/*.cruds` asked, `system/Patient.rs`
            // registered: `system/Patient.rs` granted).
            for l in limit.resources.iter().filter(|l| l.context == r.context) {
                let rtype = match (&r.rtype, &l.rtype) {
                    (None, t) => t.clone(),
                    (Some(t), None) => Some(t.clone()),
                    (Some(a), Some(b)) if a == b => Some(a.clone()),
                    _ => continue,
                };
                let letters: String = "cruds"
                    .chars()
                    .filter(|c| r.letters.contains(*c) && l.letters.contains(*c))
                    .collect();
                if letters.is_empty() {
                    continue;
                }
                let narrowed = ResourceScope {
                    context: r.context,
                    rtype,
                    letters,
                };
                if !self.resources.contains(&narrowed) {
                    self.granted.push(scope_text(&narrowed));
                    self.resources.push(narrowed);
                }
            }
        }
        self.openid &= limit.openid;
        self.fhir_user &= limit.fhir_user;
        self.launch_patient &= limit.launch_patient;
        self.offline_access &= limit.offline_access;
        self.online_access &= limit.online_access || limit.offline_access;
        let flags = [
            ("openid", self.openid),
            ("fhirUser", self.fhir_user),
            ("profile", self.fhir_user),
            ("launch/patient", self.launch_patient),
            ("offline_access", self.offline_access),
            ("online_access", self.online_access),
        ];
        self.granted
            .retain(|g| flags.iter().all(|(name, on)| g != name || *on));
        self
    }

    /// The granted scope string.
    pub fn granted_string(&self) -> String {
        self.granted.join(" ")
    }
}

fn scope_text(r: &ResourceScope) -> String {
    let ctx = match r.context {
        Context::Patient => "patient",
        Context::User => "user",
        Context::System => "system",
    };
    format!("{ctx}/{}.{}", r.rtype.as_deref().unwrap_or("*"), r.letters)
}

fn same_scope(text: &str, r: &ResourceScope) -> bool {
    parse_resource_scope(text).as_ref() == Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_and_v2() {
        let s = Scopes::parse(
            "patient/*.read user/Observation.rs system/Patient.cruds launch/patient openid fhirUser offline_access",
        );
        assert_eq!(s.resources.len(), 3);
        assert!(s.launch_patient && s.openid && s.fhir_user && s.offline_access);
        assert_eq!(
            s.allows(Interaction::Read, "Condition"),
            Some(Context::Patient)
        );
        assert_eq!(
            s.allows(Interaction::Search, "Observation"),
            Some(Context::User)
        );
        assert_eq!(
            s.allows(Interaction::Delete, "Patient"),
            Some(Context::System)
        );
        assert_eq!(s.allows(Interaction::Create, "Condition"), None);
        assert!(s.dropped.is_empty());
    }

    #[test]
    fn malformed_scopes_are_dropped() {
        let s = Scopes::parse(
            "user/Observation.sr user/Nope.read user/Observation.rs?category=lab patient/*.write admin",
        );
        assert_eq!(s.resources.len(), 1);
        assert_eq!(s.dropped.len(), 4);
        assert_eq!(
            s.allows(Interaction::Update, "Condition"),
            Some(Context::Patient)
        );
        assert_eq!(s.allows(Interaction::Read, "Condition"), None);
    }

    #[test]
    fn requests_are_narrowed_to_the_registration() {
        let limit = Scopes::parse("system/Patient.rs system/Observation.cruds");
        let got = Scopes::parse("system/*.cruds system/Condition.r").within(&limit);
        assert_eq!(
            got.granted_string(),
            "system/Patient.rs system/Observation.cruds"
        );
        assert_eq!(got.allows(Interaction::Read, "Condition"), None);
        assert_eq!(got.allows(Interaction::Delete, "Patient"), None);
        assert_eq!(
            got.allows(Interaction::Delete, "Observation"),
            Some(Context::System)
        );
    }

    #[test]
    fn contexts_are_restricted() {
        let s = Scopes::parse("system/*.cruds user/*.rs").restrict_contexts(&[Context::User]);
        assert_eq!(s.allows(Interaction::Delete, "Patient"), None);
        assert_eq!(s.granted_string(), "user/*.rs");
        assert_eq!(s.dropped, vec!["system/*.cruds".to_string()]);
    }
}
