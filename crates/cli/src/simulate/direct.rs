//! The direct drive: a hospital's days as distilled audit events, in
//! simulated time, straight into the detection engine, with the response
//! policy applied as the server would (a locked account's events stop, a
//! read-only one's writes are refused).
use std::collections::{HashMap, HashSet};
use std::time::Instant;

use custos_detect::facts::Labels;
use custos_detect::{
    Access, Action, DetectConfig, Engine, Finding, Kind, MemoryFacts, Observed, PatientFacts,
    StaffFacts, Tokenizer, Written,
};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use super::hospital::{BILLING, CLERK, Hospital, NURSE, PHYSICIAN, Staff};
use super::{AttackKind, Injected, Scorecard, SimulateArgs, score};

const HOUR: i64 = 3_600_000_000;
const DAY: i64 = 24 * HOUR;
const MIN: i64 = 60_000_000;
const SEC: i64 = 1_000_000;
/// 2026-01-05 00:00 UTC, a Monday.
pub const T0: i64 = 1_767_571_200_000_000;

fn poisson(rng: &mut ChaCha8Rng, lambda: f64) -> usize {
    // Knuth's method: fine for the small rates of a working hour.
    let l = (-lambda).exp();
    let (mut k, mut p) = (0usize, 1.0f64);
    loop {
        p *= rng.random::<f64>();
        if p <= l {
            return k;
        }
        k += 1;
    }
}

fn subject(s: &Staff) -> String {
    format!("user:{}", s.username)
}

fn pid(p: usize) -> String {
    format!("pt-{p}")
}

fn event(s: &Staff, at: i64, interaction: &str) -> Observed {
    Observed {
        at,
        kind: Kind::Rest,
        subject: Some(subject(s)),
        username: Some(s.username.clone()),
        role: Some(s.role.to_string()),
        network: Some(s.network.clone()),
        interaction: interaction.into(),
        status: 200,
        ..Observed::default()
    }
}

fn read(s: &Staff, at: i64, patient: &str, rule: &str) -> Observed {
    let mut e = event(s, at, "read");
    e.accesses = vec![Access {
        patient: patient.to_string(),
        allowed: true,
        rule: rule.to_string(),
    }];
    if rule == "break-glass" {
        e.break_glass = Some("emergency".into());
    }
    e
}

fn write(s: &Staff, at: i64, patient: &str, interaction: &str, high_entropy: bool) -> Observed {
    let mut e = read(s, at, patient, "care-team");
    e.interaction = interaction.into();
    e.writes = vec![Written {
        rtype: "Observation".into(),
        id: format!("obs-{at}"),
        version: 2,
        patient: Some(patient.to_string()),
        interaction: interaction.into(),
        high_entropy,
        ..Written::default()
    }];
    e
}

fn login(s: &Staff, at: i64, rule: &str, network: &str) -> Observed {
    Observed {
        at,
        kind: Kind::Login,
        subject: Some(subject(s)),
        username: Some(s.username.clone()),
        role: Some(s.role.to_string()),
        network: Some(network.to_string()),
        interaction: "login".into(),
        status: if rule == "credentials" { 200 } else { 401 },
        rules: vec![rule.to_string()],
        ..Observed::default()
    }
}

/// The policy rule a member of staff reads a patient under.
fn rule_for(h: &Hospital, s: usize, p: usize) -> String {
    let st = &h.staff[s];
    if st.clinical() {
        if h.patients[p].team.contains(&s) {
            "care-team".into()
        } else if h.patients[p].dept == st.dept {
            "encounter".into()
        } else {
            "break-glass".into()
        }
    } else {
        format!("role:{}", st.role)
    }
}

struct Sim {
    h: Hospital,
    rng: ChaCha8Rng,
    tok: Tokenizer,
    dept_patients: Vec<Vec<usize>>,
    dormant: HashSet<usize>,
    /// Attackers so far (each attack gets a fresh one where the hospital has enough).
    attackers: HashSet<usize>,
}

impl Sim {
    fn facts(&self) -> MemoryFacts {
        let facts = MemoryFacts::default();
        for s in &self.h.staff {
            facts.set_staff(
                &subject(s),
                StaffFacts {
                    person: self.tok.person(&s.person.fhir()),
                    department: Some(self.h.depts[s.dept].name.clone()),
                    patient: s.patient.map(pid),
                },
            );
        }
        for (i, p) in self.h.patients.iter().enumerate() {
            let mut pf: PatientFacts = self.tok.patient(&self.patient_json(i));
            pf.labels = Labels {
                vip: p.vip,
                restricted: false,
            };
            pf.departments = vec![self.h.depts[p.dept].name.clone()];
            facts.set_patient(&pid(i), pf);
        }
        facts
    }

    fn patient_json(&self, i: usize) -> serde_json::Value {
        let p = &self.h.patients[i];
        let mut v = p.person.fhir();
        v["identifier"] = json!([{"system": "urn:custos:mrn", "value": p.mrn}]);
        v
    }

    /// The initial load: every patient registered by the integration engine.
    fn registrations(&self) -> Vec<Observed> {
        (0..self.h.patients.len())
            .map(|i| {
                let pj = self.patient_json(i);
                Observed {
                    at: T0 - 41 * DAY + i as i64 * 1000,
                    kind: Kind::Rest,
                    subject: Some("client:loader".into()),
                    role: Some("service".into()),
                    network: Some("10.250.0.0/24".into()),
                    interaction: "transaction".into(),
                    status: 200,
                    writes: vec![Written {
                        rtype: "Patient".into(),
                        id: pid(i),
                        version: 1,
                        patient: Some(pid(i)),
                        interaction: "create".into(),
                        identity: self.tok.person(&pj).identity,
                        identifiers: self.tok.identifiers(&pj),
                        ..Written::default()
                    }],
                    ..Observed::default()
                }
            })
            .collect()
    }

    /// One hour of ordinary work.
    fn normal_hour(&mut self, day: u32, hour: u32, out: &mut Vec<Observed>) {
        let base = T0 + day as i64 * DAY + hour as i64 * HOUR;
        for si in 0..self.h.staff.len() {
            if self.dormant.contains(&si) || !self.h.staff[si].works(day, hour) {
                continue;
            }
            let s = self.h.staff[si].clone();
            let at = |rng: &mut ChaCha8Rng| base + rng.random_range(0..HOUR);
            if hour == s.shift % 24 {
                let t = base + self.rng.random_range(0..5 * MIN);
                if self.rng.random_bool(0.03) {
                    out.push(login(&s, t - MIN, "password-failed", &s.network));
                }
                if self.rng.random_bool(0.01) {
                    out.push(login(&s, t - 30 * SEC, "totp-failed", &s.network));
                }
                out.push(login(&s, t, "credentials", &s.network));
            }
            let dept = &self.dept_patients[s.dept];
            let (reads, writes) = match s.role {
                PHYSICIAN => (6.0, 0.6),
                NURSE => (9.0, 1.5),
                CLERK => (5.0, 0.0),
                BILLING => (4.0, 0.0),
                _ => (2.0, 0.0),
            };
            for _ in 0..poisson(&mut self.rng, reads) {
                let p = if s.clinical() && (!s.care.is_empty() && self.rng.random_bool(0.85)) {
                    *s.care.choose(&mut self.rng).expect("non-empty")
                } else {
                    match dept.choose(&mut self.rng) {
                        Some(&p) => p,
                        None => continue,
                    }
                };
                let rule = rule_for(&self.h, si, p);
                // Staff hand over the records of their own family and themselves.
                let tie = self.h.patients[p].relative_of == Some(si)
                    || self.h.patients[p].employee == Some(si);
                if rule == "break-glass" || tie {
                    continue;
                }
                let mut e = read(&s, at(&mut self.rng), &pid(p), &rule);
                if self.rng.random_bool(0.1) {
                    e.interaction = "search-type".into();
                    e.results = poisson(&mut self.rng, 15.0) as u32;
                }
                out.push(e);
            }
            if s.clinical() && !s.care.is_empty() {
                for _ in 0..poisson(&mut self.rng, writes) {
                    let p = *s.care.choose(&mut self.rng).expect("non-empty");
                    out.push(write(&s, at(&mut self.rng), &pid(p), "update", false));
                }
                // Now and then a genuine emergency.
                if self.rng.random_bool(0.0004) {
                    let p = self.rng.random_range(0..self.h.patients.len());
                    let pt = &self.h.patients[p];
                    if rule_for(&self.h, si, p) == "break-glass"
                        && pt.relative_of.is_none()
                        && pt.employee.is_none()
                    {
                        out.push(read(&s, at(&mut self.rng), &pid(p), "break-glass"));
                    }
                }
            }
            if s.role == CLERK {
                // Admissions: an encounter at the department's site.
                for _ in 0..poisson(&mut self.rng, 0.8) {
                    let Some(&p) = dept.choose(&mut self.rng) else {
                        continue;
                    };
                    if self.h.patients[p].relative_of == Some(si)
                        || self.h.patients[p].employee == Some(si)
                    {
                        continue;
                    }
                    let t = at(&mut self.rng);
                    let mut e = event(&s, t, "create");
                    e.accesses = vec![Access {
                        patient: pid(p),
                        allowed: true,
                        rule: format!("role:{CLERK}"),
                    }];
                    e.writes = vec![Written {
                        rtype: "Encounter".into(),
                        id: format!("enc-{t}"),
                        version: 1,
                        patient: Some(pid(p)),
                        interaction: "create".into(),
                        site: Some(format!(
                            "site-{}",
                            self.h.depts[self.h.patients[p].dept].site
                        )),
                        site_at: Some(t),
                        ..Written::default()
                    }];
                    out.push(e);
                }
            }
        }
    }

    fn pick_staff(&mut self, roles: &[&str]) -> usize {
        let c: Vec<usize> = (0..self.h.staff.len())
            .filter(|&i| roles.contains(&self.h.staff[i].role) && !self.dormant.contains(&i))
            .collect();
        let fresh: Vec<usize> = c
            .iter()
            .copied()
            .filter(|i| !self.attackers.contains(i))
            .collect();
        let s = *fresh
            .choose(&mut self.rng)
            .or_else(|| c.choose(&mut self.rng))
            .expect("the hospital has every role");
        self.attackers.insert(s);
        s
    }

    /// A time within the member of staff's shift on `day`.
    fn in_shift(&mut self, s: usize, day: u32) -> i64 {
        let st = &self.h.staff[s];
        let mut d = day;
        while st.workdays & (1 << (d % 7)) == 0 {
            d += 1;
        }
        T0 + d as i64 * DAY + st.shift as i64 * HOUR + self.rng.random_range(HOUR..5 * HOUR)
    }

    fn other_patient(&mut self, s: usize) -> usize {
        loop {
            let p = self.rng.random_range(0..self.h.patients.len());
            let pt = &self.h.patients[p];
            if pt.dept != self.h.staff[s].dept
                && !pt.team.contains(&s)
                && pt.relative_of.is_none()
                && pt.employee.is_none()
                && !pt.vip
            {
                return p;
            }
        }
    }

    /// Events of one attack starting on `day`.
    fn attack(&mut self, kind: AttackKind, day: u32, k: usize) -> (Injected, Vec<Observed>) {
        use AttackKind::*;
        let mut ev = Vec::new();
        let inj = |start: i64, subject: Option<String>, patient: Option<String>| Injected {
            kind,
            start,
            end: start,
            subject,
            patient,
            changed: None,
            restorable: None,
        };
        match kind {
            SnoopingFamily | SnoopingCoworker | SnoopingSelf | VipRecord | BreakGlassMisuse => {
                let (s, p) = match kind {
                    SnoopingFamily => {
                        let rel: Vec<usize> = (0..self.h.patients.len())
                            .filter(|&p| self.h.patients[p].relative_of.is_some())
                            .collect();
                        let p = *rel.choose(&mut self.rng).expect("relatives exist");
                        (self.h.patients[p].relative_of.expect("a relative"), p)
                    }
                    SnoopingCoworker => {
                        let emp: Vec<usize> = (0..self.h.patients.len())
                            .filter(|&p| self.h.patients[p].employee.is_some())
                            .collect();
                        let p = *emp.choose(&mut self.rng).expect("employees exist");
                        let e = self.h.patients[p].employee.expect("an employee");
                        let mut s = self.pick_staff(&[CLERK, BILLING, NURSE, PHYSICIAN]);
                        while s == e
                            || self.h.patients[p].team.contains(&s)
                            || self.h.staff[s].dept == self.h.patients[p].dept
                        {
                            s = self.pick_staff(&[CLERK, BILLING, NURSE, PHYSICIAN]);
                        }
                        (s, p)
                    }
                    SnoopingSelf => {
                        let emp: Vec<usize> = (0..self.h.staff.len())
                            .filter(|&s| {
                                self.h.staff[s].patient.is_some() && !self.dormant.contains(&s)
                            })
                            .collect();
                        let s = *emp.choose(&mut self.rng).expect("employees exist");
                        (s, self.h.staff[s].patient.expect("a patient"))
                    }
                    VipRecord => {
                        let vips: Vec<usize> = (0..self.h.patients.len())
                            .filter(|&p| self.h.patients[p].vip)
                            .collect();
                        let p = *vips.choose(&mut self.rng).expect("VIPs exist");
                        let mut s = self.pick_staff(&[CLERK, BILLING, NURSE, PHYSICIAN]);
                        while self.h.patients[p].team.contains(&s)
                            || self.h.staff[s].dept == self.h.patients[p].dept
                        {
                            s = self.pick_staff(&[CLERK, BILLING, NURSE, PHYSICIAN]);
                        }
                        (s, p)
                    }
                    _ => {
                        let s = self.pick_staff(&[NURSE, PHYSICIAN]);
                        (s, self.other_patient(s))
                    }
                };
                let t = self.in_shift(s, day);
                let mut rule = rule_for(&self.h, s, p);
                if kind == SnoopingSelf && !self.h.staff[s].clinical() {
                    rule = format!("role:{}", self.h.staff[s].role);
                }
                ev.push(read(&self.h.staff[s], t, &pid(p), &rule));
                (inj(t, Some(subject(&self.h.staff[s])), Some(pid(p))), ev)
            }
            SnoopingSlow => {
                let s = self.pick_staff(&[CLERK, BILLING]);
                let t0 = self.in_shift(s, day);
                for i in 0..5 {
                    let p = self.other_patient(s);
                    let t = t0 + i * 3 * DAY;
                    ev.push(read(
                        &self.h.staff[s],
                        t,
                        &pid(p),
                        &format!("role:{}", self.h.staff[s].role),
                    ));
                }
                (inj(t0, Some(subject(&self.h.staff[s])), None), ev)
            }
            BulkFast | BulkSlow => {
                let s = self.pick_staff(&[CLERK, BILLING]);
                let dept = self.dept_patients[self.h.staff[s].dept].clone();
                let t0 = self.in_shift(s, day);
                let st = self.h.staff[s].clone();
                let rule = format!("role:{}", st.role);
                if kind == BulkFast {
                    // 250 patients of the whole hospital in under an hour.
                    for i in 0..250 {
                        let p = self.rng.random_range(0..self.h.patients.len());
                        let mut e = read(&st, t0 + i * 12 * SEC, &pid(p), &rule);
                        e.interaction = "search-type".into();
                        e.results = 20;
                        ev.push(e);
                    }
                } else {
                    // Slow: within the department (so every access is
                    // explained), a dozen extra patients every shift hour
                    // for three days, each hour under a fixed limit.
                    for d in 0..3 {
                        for hr in 0..7 {
                            for i in 0..12 {
                                let p = *dept.choose(&mut self.rng).unwrap_or(&0);
                                let t = t0 - t0.rem_euclid(DAY)
                                    + d * DAY
                                    + (st.shift as i64 + hr) * HOUR
                                    + i * 4 * MIN;
                                ev.push(read(&st, t, &pid(p), &rule));
                            }
                        }
                    }
                }
                (inj(t0, Some(subject(&st)), None), ev)
            }
            UnusualTimePlace => {
                let s = self.pick_staff(&[NURSE, PHYSICIAN]);
                let st = self.h.staff[s].clone();
                let t = T0 + day as i64 * DAY + ((st.shift as i64 + 12) % 24) * HOUR + 20 * MIN;
                let mut e = login(&st, t, "credentials", "203.0.113.0/24");
                ev.push(e.clone());
                for i in 0..6 {
                    let p = *st.care.choose(&mut self.rng).unwrap_or(&0);
                    e = read(&st, t + (i + 1) * MIN, &pid(p), &rule_for(&self.h, s, p));
                    e.network = Some("203.0.113.0/24".into());
                    ev.push(e);
                }
                (inj(t, Some(subject(&st)), None), ev)
            }
            PasswordGuessing | TotpGuessing => {
                let s = self.pick_staff(&[NURSE, PHYSICIAN, CLERK, BILLING]);
                let st = self.h.staff[s].clone();
                let t = self.in_shift(s, day);
                let (n, rule) = if kind == PasswordGuessing {
                    (8, "password-failed")
                } else {
                    (4, "totp-failed")
                };
                for i in 0..n {
                    ev.push(login(&st, t + i * 30 * SEC, rule, "198.51.100.0/24"));
                }
                (inj(t, Some(subject(&st)), None), ev)
            }
            PasswordSpraying => {
                let t = T0 + day as i64 * DAY + self.rng.random_range(0..20) * HOUR;
                let net = format!("192.0.2.{k}");
                for i in 0..15 {
                    let s = self.pick_staff(&[NURSE, PHYSICIAN, CLERK, BILLING]);
                    let st = self.h.staff[s].clone();
                    ev.push(login(&st, t + i * 40 * SEC, "password-failed", &net));
                }
                (inj(t, None, None), ev)
            }
            RevokedToken => {
                let t = T0 + day as i64 * DAY + self.rng.random_range(0..20) * HOUR;
                for i in 0..3 {
                    ev.push(Observed {
                        at: t + i * MIN,
                        kind: Kind::Rest,
                        network: Some(format!("198.18.{k}.0/24")),
                        interaction: "read".into(),
                        status: 401,
                        rules: vec!["token-revoked".into()],
                        ..Observed::default()
                    });
                }
                (inj(t, None, None), ev)
            }
            DormantAccount => {
                let s = *self
                    .dormant
                    .iter()
                    .nth(k % self.dormant.len().max(1))
                    .expect("dormant accounts were set aside");
                let st = self.h.staff[s].clone();
                let t = T0 + day as i64 * DAY + 10 * HOUR + k as i64 * MIN;
                ev.push(login(&st, t, "credentials", &st.network));
                for i in 0..4 {
                    let p = *self.dept_patients[st.dept]
                        .choose(&mut self.rng)
                        .unwrap_or(&0);
                    ev.push(read(
                        &st,
                        t + (i + 1) * MIN,
                        &pid(p),
                        &rule_for(&self.h, s, p),
                    ));
                }
                (inj(t, Some(subject(&st)), None), ev)
            }
            RansomwareFast | RansomwarePartial | RansomwareDeletes => {
                let s = self.pick_staff(&[NURSE, PHYSICIAN]);
                let st = self.h.staff[s].clone();
                let t0 = self.in_shift(s, day);
                for i in 0..80 {
                    let p = *st.care.choose(&mut self.rng).unwrap_or(&0);
                    let e = match kind {
                        RansomwareFast => write(&st, t0 + i * SEC / 2, &pid(p), "update", true),
                        RansomwarePartial => {
                            write(&st, t0 + i * 3 * SEC, &pid(p), "update", i % 2 == 0)
                        }
                        _ => write(&st, t0 + i * SEC, &pid(p), "delete", false),
                    };
                    ev.push(e);
                }
                let mut i = inj(t0, Some(subject(&st)), None);
                i.changed = Some(0);
                (i, ev)
            }
            IdentityReuse => {
                let s = self.pick_staff(&[CLERK]);
                let st = self.h.staff[s].clone();
                let t = self.in_shift(s, day);
                let victim = self.rng.random_range(0..self.h.patients.len());
                let mut forged = super::hospital::Hospital::generate(t as u64, 12, 30).patients[0]
                    .person
                    .fhir();
                forged["identifier"] =
                    json!([{"system": "urn:custos:mrn", "value": self.h.patients[victim].mrn}]);
                let id = format!("forged-{k}-{t}");
                let mut e = event(&st, t, "create");
                e.writes = vec![Written {
                    rtype: "Patient".into(),
                    id: id.clone(),
                    version: 1,
                    patient: Some(id.clone()),
                    interaction: "create".into(),
                    identity: self.tok.person(&forged).identity,
                    identifiers: self.tok.identifiers(&forged),
                    ..Written::default()
                }];
                ev.push(e);
                (inj(t, None, Some(id)), ev)
            }
            ImpossibleTravel => {
                let p = self.rng.random_range(0..self.h.patients.len());
                let here = self.h.depts[self.h.patients[p].dept].site;
                let there = (here + 1) % self.h.sites;
                let a = self.pick_staff(&[CLERK]);
                let t = self.in_shift(a, day);
                for (i, site) in [here, there].into_iter().enumerate() {
                    let st = self.h.staff[a].clone();
                    let at = t + i as i64 * 30 * MIN;
                    let mut e = event(&st, at, "create");
                    e.writes = vec![Written {
                        rtype: "Encounter".into(),
                        id: format!("enc-x-{k}-{i}-{day}"),
                        version: 1,
                        patient: Some(pid(p)),
                        interaction: "create".into(),
                        site: Some(format!("site-{site}")),
                        site_at: Some(at),
                        ..Written::default()
                    }];
                    ev.push(e);
                }
                (inj(t + 30 * MIN, None, Some(pid(p))), ev)
            }
        }
    }
}

/// Run the direct drive and score it.
pub fn run(args: &SimulateArgs, config: DetectConfig) -> anyhow::Result<Scorecard> {
    let mut h = Hospital::generate(args.seed, args.staff, args.patients);
    // Enough VIPs for the VIP attacks.
    for k in 0..args.attacks.max(1) {
        let p = (k * 37 + 11) % h.patients.len();
        if h.patients[p].relative_of.is_none() && h.patients[p].employee.is_none() {
            h.patients[p].vip = true;
        }
    }
    let dept_patients = (0..h.depts.len()).map(|d| h.dept_patients(d)).collect();
    let mut sim = Sim {
        rng: ChaCha8Rng::seed_from_u64(args.seed ^ 0x5eed),
        tok: Tokenizer::for_tests(),
        dept_patients,
        dormant: HashSet::new(),
        attackers: HashSet::new(),
        h,
    };
    // Accounts that fell silent before the simulation began.
    let dormant_n = args.attacks.max(1).min(args.staff / 10);
    while sim.dormant.len() < dormant_n {
        let s = sim.rng.random_range(0..sim.h.staff.len());
        if sim.h.staff[s].patient.is_none() {
            sim.dormant.insert(s);
        }
    }
    let facts = sim.facts();
    let mut engine = Engine::new(config.clone());
    let mut findings: Vec<Finding> = Vec::new();
    let mut index = 0u64;
    let mut events = 0u64;
    let started = Instant::now();
    let mut feed = |engine: &mut Engine, mut e: Observed, findings: &mut Vec<Finding>| {
        e.index = index;
        index += 1;
        engine.process(&e, &facts, findings);
    };
    for e in sim.registrations() {
        feed(&mut engine, e, &mut findings);
        events += 1;
    }
    let pre: Vec<usize> = sim.dormant.iter().copied().collect();
    for s in pre {
        let st = sim.h.staff[s].clone();
        feed(
            &mut engine,
            login(&st, T0 - 40 * DAY, "credentials", &st.network),
            &mut findings,
        );
        events += 1;
    }
    findings.clear();

    // The attack plan: each kind `attacks` times, at random days after a warm-up.
    let warm = 7.min(args.days.saturating_sub(1));
    let mut plan: Vec<(Injected, Vec<Observed>)> = Vec::new();
    for kind in AttackKind::ALL {
        for k in 0..args.attacks {
            let day = sim.rng.random_range(warm..args.days.max(warm + 1));
            plan.push(sim.attack(kind, day, k));
        }
    }
    let mut attacks: Vec<Injected> = plan
        .iter()
        .map(|(i, evs)| Injected {
            start: evs
                .iter()
                .map(|e| e.at)
                .min()
                .unwrap_or(i.start)
                .min(i.start),
            end: evs.iter().map(|e| e.at).max().unwrap_or(i.start),
            ..i.clone()
        })
        .collect();
    let mut attack_events: Vec<(i64, usize, Observed)> = Vec::new();
    for (n, (_, evs)) in plan.into_iter().enumerate() {
        for e in evs {
            attack_events.push((e.at, n, e));
        }
    }
    attack_events.sort_by_key(|(t, n, _)| (*t, *n));
    let mut next_attack = 0usize;

    let mut locked: HashSet<String> = HashSet::new();
    let mut read_only: HashSet<String> = HashSet::new();
    let mut by_subject_attack: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, a) in attacks.iter().enumerate() {
        if let Some(s) = &a.subject {
            by_subject_attack.entry(s.clone()).or_default().push(i);
        }
    }
    let horizon = T0 + args.days as i64 * DAY + 4 * DAY;
    let mut hour_events: Vec<(i64, Option<usize>, Observed)> = Vec::new();
    let mut day = 0u32;
    let mut hour = 0u32;
    loop {
        let base = T0 + day as i64 * DAY + hour as i64 * HOUR;
        if base >= horizon {
            break;
        }
        hour_events.clear();
        if day < args.days {
            let mut normal = Vec::new();
            sim.normal_hour(day, hour, &mut normal);
            hour_events.extend(normal.into_iter().map(|e| (e.at, None, e)));
        }
        while next_attack < attack_events.len() && attack_events[next_attack].0 < base + HOUR {
            let (t, n, e) = attack_events[next_attack].clone();
            hour_events.push((t, Some(n), e));
            next_attack += 1;
        }
        hour_events.sort_by_key(|(t, _, _)| *t);
        for (_, from_attack, mut e) in hour_events.drain(..) {
            let subj = e.subject.clone().unwrap_or_default();
            if locked.contains(&subj) {
                continue;
            }
            if !e.writes.is_empty() && read_only.contains(&subj) {
                e.status = 403;
                e.writes.clear();
            }
            if let Some(n) = from_attack
                && !e.writes.is_empty()
                && let Some(c) = attacks[n].changed.as_mut()
            {
                *c += e.writes.len();
            }
            let before = findings.len();
            feed(&mut engine, e, &mut findings);
            events += 1;
            for f in &findings[before..] {
                let Some(s) = &f.subject else { continue };
                for a in config.actions_for(f.detector, &f.kind, f.severity) {
                    match a {
                        Action::Lock => {
                            locked.insert(s.clone());
                        }
                        Action::ReadOnly => {
                            read_only.insert(s.clone());
                        }
                        _ => {}
                    }
                }
            }
        }
        engine.tick(base + HOUR, &mut findings);
        hour += 1;
        if hour == 24 {
            hour = 0;
            day += 1;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    for a in attacks.iter_mut() {
        // Versions are never destroyed by an update: every changed record
        // is restorable (the HTTP drive checks it against the server).
        a.restorable = a.changed;
    }
    let _ = by_subject_attack;
    Ok(score("direct", args, &attacks, &findings, events, secs))
}

/// A hospital's ordinary work for `days`, as the engine sees it (for the
/// benchmark): the facts and the events, in time order.
pub fn normal_events(
    seed: u64,
    staff: usize,
    patients: usize,
    days: u32,
) -> (MemoryFacts, Vec<Observed>) {
    let h = Hospital::generate(seed, staff, patients);
    let dept_patients = (0..h.depts.len()).map(|d| h.dept_patients(d)).collect();
    let mut sim = Sim {
        rng: ChaCha8Rng::seed_from_u64(seed ^ 0x5eed),
        tok: Tokenizer::for_tests(),
        dept_patients,
        dormant: HashSet::new(),
        attackers: HashSet::new(),
        h,
    };
    let facts = sim.facts();
    let mut events = sim.registrations();
    for day in 0..days {
        for hour in 0..24 {
            let mut e = Vec::new();
            sim.normal_hour(day, hour, &mut e);
            e.sort_by_key(|e| e.at);
            events.extend(e);
        }
    }
    for (i, e) in events.iter_mut().enumerate() {
        e.index = i as u64;
    }
    (facts, events)
}
