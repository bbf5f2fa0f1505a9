//! Each detector on crafted event sequences: a case it must raise and a
//! near miss it must not.
use custos_detect::facts::Labels;
use custos_detect::{
    Access, DetectConfig, Detector, Engine, Finding, Kind, MemoryFacts, Observed, PatientFacts,
    PersonFacts, RegistryEntry, StaffFacts, Written,
};

const HOUR: i64 = 3_600_000_000;
const DAY: i64 = 24 * HOUR;
const MIN: i64 = 60_000_000;
/// 2026-01-05 00:00 UTC, a Monday.
const T0: i64 = 1_767_571_200_000_000;

struct World {
    engine: Engine,
    facts: MemoryFacts,
    next: u64,
    found: Vec<Finding>,
}

fn person(family: u64, address: u64, phone: u64, identity: u64) -> PersonFacts {
    PersonFacts {
        family: Some(family),
        identity: Some(identity),
        addresses: vec![address],
        phones: vec![phone],
    }
}

impl World {
    fn new() -> World {
        let facts = MemoryFacts::default();
        facts.set_staff(
            "user:nurse",
            StaffFacts {
                person: person(1, 11, 111, 1111),
                department: Some("Organization/cardio".into()),
                patient: None,
            },
        );
        facts.set_staff(
            "user:clerk",
            StaffFacts {
                person: person(2, 22, 222, 2222),
                department: Some("Organization/front".into()),
                patient: Some("me".into()),
            },
        );
        for i in 0..2000 {
            facts.set_patient(
                &format!("p{i}"),
                PatientFacts {
                    person: person(1000 + i, 10_000 + i, 100_000 + i, 1_000_000 + i),
                    departments: vec!["Organization/cardio".into()],
                    ..PatientFacts::default()
                },
            );
        }
        World {
            engine: Engine::new(DetectConfig::default()),
            facts,
            next: 0,
            found: Vec::new(),
        }
    }

    fn feed(&mut self, mut ev: Observed) {
        ev.index = self.next;
        self.next += 1;
        self.engine.process(&ev, &self.facts, &mut self.found);
    }

    fn raised(&self, d: Detector) -> Vec<&Finding> {
        self.found.iter().filter(|f| f.detector == d).collect()
    }

    fn clear(&mut self) {
        self.found.clear();
    }
}

fn read(subject: &str, role: &str, at: i64, patient: &str, rule: &str) -> Observed {
    Observed {
        at,
        kind: Kind::Rest,
        subject: Some(subject.into()),
        username: Some(subject.trim_start_matches("user:").into()),
        role: Some(role.into()),
        network: Some("10.0.0.0/24".into()),
        interaction: "read".into(),
        status: 200,
        accesses: vec![Access {
            patient: patient.into(),
            allowed: true,
            rule: rule.into(),
        }],
        ..Observed::default()
    }
}

fn update(subject: &str, at: i64, patient: &str, high_entropy: bool) -> Observed {
    let mut ev = read(subject, "nurse", at, patient, "care-team");
    ev.interaction = "update".into();
    ev.writes = vec![Written {
        rtype: "Observation".into(),
        id: format!("o{at}"),
        version: 2,
        patient: Some(patient.into()),
        interaction: "update".into(),
        high_entropy,
        ..Written::default()
    }];
    ev
}

fn login(username: &str, network: &str, at: i64, rule: &str) -> Observed {
    Observed {
        at,
        kind: Kind::Login,
        subject: Some(format!("user:{username}")),
        username: Some(username.into()),
        role: Some("nurse".into()),
        network: Some(network.into()),
        interaction: "login".into(),
        status: 401,
        rules: vec![rule.into()],
        ..Observed::default()
    }
}

/// Days of ordinary work: the nurse opens `per_hour` of her patients each
/// hour from 08:00 to 16:00.
fn routine(w: &mut World, days: i64, per_hour: usize) {
    for d in 0..days {
        for h in 8..16 {
            for k in 0..per_hour {
                let p = format!("p{}", (d as usize * 7 + h as usize * 3 + k) % 40);
                let at = T0 + d * DAY + h * HOUR + (k as i64) * MIN * 5;
                w.feed(read("user:nurse", "nurse", at, &p, "care-team"));
            }
        }
    }
}

#[test]
fn unexplained_access() {
    let mut w = World::new();
    // The clerk's department has no encounter with p1.
    w.feed(read(
        "user:clerk",
        "registration-clerk",
        T0 + 9 * HOUR,
        "p1",
        "role-any-patient",
    ));
    let f = w.raised(Detector::UnexplainedAccess);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].patient.as_deref(), Some("p1"));
    assert_eq!(f[0].evidence, vec![0]);
    // Near miss: the nurse's department treats p1 (shared department), and
    // a care-team access is explained anyway.
    w.clear();
    w.feed(read(
        "user:nurse",
        "nurse",
        T0 + 9 * HOUR,
        "p1",
        "role-any-patient",
    ));
    w.feed(read(
        "user:nurse",
        "nurse",
        T0 + 9 * HOUR,
        "p2",
        "care-team",
    ));
    assert!(w.raised(Detector::UnexplainedAccess).is_empty());
}

/// `n` refusals of the nurse on distinct patients within the hour.
fn refused(n: i64) -> World {
    let mut w = World::new();
    for i in 0..n {
        let mut ev = read(
            "user:nurse",
            "nurse",
            T0 + 9 * HOUR + i * MIN,
            &format!("p{i}"),
            "no-relationship",
        );
        ev.accesses[0].allowed = false;
        ev.status = 403;
        w.feed(ev);
    }
    w
}

#[test]
fn probing_refusals() {
    assert_eq!(refused(3).raised(Detector::UnexplainedAccess).len(), 1);
    assert!(refused(2).raised(Detector::UnexplainedAccess).is_empty());
}

#[test]
fn snooping_on_family_coworkers_and_self() {
    let mut w = World::new();
    // p5 lives at the nurse's address.
    w.facts.set_patient(
        "p5",
        PatientFacts {
            person: person(1005, 11, 100_005, 1_000_005),
            ..PatientFacts::default()
        },
    );
    w.feed(read(
        "user:nurse",
        "nurse",
        T0 + 9 * HOUR,
        "p5",
        "care-team",
    ));
    let f = w.raised(Detector::Snooping);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].kind, "family");
    // Same surname, no care reason: raised.
    w.facts.set_patient(
        "p6",
        PatientFacts {
            person: person(1, 10_006, 100_006, 1_000_006),
            ..PatientFacts::default()
        },
    );
    w.clear();
    w.feed(read(
        "user:nurse",
        "nurse",
        T0 + 9 * HOUR,
        "p6",
        "break-glass",
    ));
    assert_eq!(w.raised(Detector::Snooping).len(), 1);
    // Near miss: same surname under a care relationship is ordinary (a common name).
    w.facts.set_patient(
        "p7",
        PatientFacts {
            person: person(1, 10_007, 100_007, 1_000_007),
            ..PatientFacts::default()
        },
    );
    w.clear();
    w.feed(read(
        "user:nurse",
        "nurse",
        T0 + 9 * HOUR,
        "p7",
        "care-team",
    ));
    assert!(w.raised(Detector::Snooping).is_empty());
    // A coworker: the patient is the clerk; the nurse has no care reason.
    w.facts.set_patient(
        "p8",
        PatientFacts {
            person: person(2, 33, 333, 2222),
            ..PatientFacts::default()
        },
    );
    w.clear();
    w.feed(read(
        "user:nurse",
        "nurse",
        T0 + 9 * HOUR,
        "p8",
        "role-any-patient",
    ));
    let f = w.raised(Detector::Snooping);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].kind, "coworker");
    // Self: the clerk opens her own record.
    w.facts.set_patient("me", PatientFacts::default());
    w.clear();
    w.feed(read(
        "user:clerk",
        "registration-clerk",
        T0 + 9 * HOUR,
        "me",
        "role-any-patient",
    ));
    let f = w.raised(Detector::Snooping);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].kind, "self");
}

#[test]
fn restricted_and_vip_records() {
    let mut w = World::new();
    w.facts.set_patient(
        "star",
        PatientFacts {
            labels: Labels {
                vip: true,
                restricted: false,
            },
            departments: vec!["Organization/cardio".into()],
            ..PatientFacts::default()
        },
    );
    // A clerk of another department opens a VIP record.
    w.feed(read(
        "user:clerk",
        "registration-clerk",
        T0 + 9 * HOUR,
        "star",
        "role:registration-clerk",
    ));
    let f = w.raised(Detector::RestrictedRecord);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].kind, "vip");
    // Near misses: the care team opens it; so does staff of the treating department.
    w.clear();
    w.feed(read(
        "user:nurse",
        "nurse",
        T0 + 9 * HOUR,
        "star",
        "care-team",
    ));
    w.feed(read(
        "user:nurse",
        "nurse",
        T0 + 10 * HOUR,
        "star",
        "role:nurse",
    ));
    assert!(w.raised(Detector::RestrictedRecord).is_empty());
}

#[test]
fn bulk_exfiltration_against_the_learned_baseline() {
    let mut w = World::new();
    routine(&mut w, 10, 6);
    assert!(
        w.raised(Detector::BulkExfiltration).is_empty(),
        "routine work raised bulk"
    );
    let day = T0 + 10 * DAY + 9 * HOUR;
    // Near miss: a busy hour, twice the usual.
    for i in 0..12 {
        w.feed(read(
            "user:nurse",
            "nurse",
            day + i * MIN,
            &format!("p{i}"),
            "care-team",
        ));
    }
    assert!(w.raised(Detector::BulkExfiltration).is_empty());
    // Far above: 45 distinct patients in the next hour.
    for i in 0..45 {
        w.feed(read(
            "user:nurse",
            "nurse",
            day + HOUR + i * MIN,
            &format!("p{}", 100 + i),
            "care-team",
        ));
    }
    let f = w.raised(Detector::BulkExfiltration);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].kind, "hourly-volume");
    assert!(f[0].baseline.contains("own baseline"), "{}", f[0].baseline);
    assert!(!f[0].evidence.is_empty());
}

#[test]
fn slow_exfiltration_is_caught_by_the_day() {
    let mut w = World::new();
    routine(&mut w, 10, 6);
    // 8 extra patients every hour for 16 hours: each hour stays under its
    // limit, the day does not.
    let day = T0 + 10 * DAY;
    let mut n = 0;
    for h in 4..20 {
        for k in 0..8 {
            n += 1;
            w.feed(read(
                "user:nurse",
                "nurse",
                day + h * HOUR + k * MIN,
                &format!("p{}", 100 + n),
                "care-team",
            ));
        }
    }
    let f = w.raised(Detector::BulkExfiltration);
    assert!(f.iter().any(|f| f.kind == "daily-volume"), "{f:?}");
    assert!(!f.iter().any(|f| f.kind == "hourly-volume"), "{f:?}");
}

#[test]
fn huge_search() {
    let mut w = World::new();
    let mut ev = read("user:nurse", "nurse", T0 + 9 * HOUR, "p1", "care-team");
    ev.interaction = "search-type".into();
    ev.results = 999;
    w.feed(ev.clone());
    assert!(w.raised(Detector::BulkExfiltration).is_empty());
    ev.results = 1000;
    w.feed(ev);
    assert_eq!(w.raised(Detector::BulkExfiltration)[0].kind, "huge-search");
}

#[test]
fn unusual_time_and_place() {
    let mut w = World::new();
    routine(&mut w, 7, 3);
    let day = T0 + 7 * DAY;
    w.feed(read(
        "user:nurse",
        "nurse",
        day + 10 * HOUR,
        "p1",
        "care-team",
    ));
    assert!(w.raised(Detector::UnusualTimePlace).is_empty());
    w.feed(read(
        "user:nurse",
        "nurse",
        day + 3 * HOUR + 20 * MIN,
        "p1",
        "care-team",
    ));
    let f = w.raised(Detector::UnusualTimePlace);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].kind, "unusual-hour");
    w.clear();
    let mut ev = read("user:nurse", "nurse", day + 11 * HOUR, "p1", "care-team");
    ev.network = Some("203.0.113.0/24".into());
    w.feed(ev.clone());
    let f = w.raised(Detector::UnusualTimePlace);
    assert_eq!(f.len(), 1);
    assert!(f[0].kind.starts_with("network:"));
    // Seen once, known since.
    w.clear();
    ev.at += MIN;
    w.feed(ev);
    assert!(w.raised(Detector::UnusualTimePlace).is_empty());
}

#[test]
fn new_users_are_not_judged_on_time_and_place() {
    let mut w = World::new();
    let mut ev = read("user:nurse", "nurse", T0 + 3 * HOUR, "p1", "care-team");
    ev.network = Some("203.0.113.0/24".into());
    w.feed(ev);
    assert!(w.raised(Detector::UnusualTimePlace).is_empty());
}

#[test]
fn password_guessing_spraying_and_totp() {
    let mut w = World::new();
    for i in 0..4 {
        w.feed(login(
            "ann",
            "198.51.100.0/24",
            T0 + i * MIN,
            "password-failed",
        ));
    }
    assert!(
        w.raised(Detector::CredentialAttack).is_empty(),
        "4 failures are a near miss"
    );
    w.feed(login(
        "ann",
        "198.51.100.0/24",
        T0 + 5 * MIN,
        "password-failed",
    ));
    let f = w.raised(Detector::CredentialAttack);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].kind, "password-guessing");

    let mut w = World::new();
    for (i, u) in ["a", "b", "c", "d"].iter().enumerate() {
        w.feed(login(
            u,
            "198.51.100.0/24",
            T0 + i as i64 * MIN,
            "password-failed",
        ));
    }
    assert!(w.raised(Detector::CredentialAttack).is_empty());
    w.feed(login(
        "e",
        "198.51.100.0/24",
        T0 + 5 * MIN,
        "password-failed",
    ));
    assert_eq!(
        w.raised(Detector::CredentialAttack)[0].kind,
        "password-spraying"
    );

    let mut w = World::new();
    w.feed(login("ann", "10.0.0.0/24", T0, "totp-failed"));
    w.feed(login("ann", "10.0.0.0/24", T0 + MIN, "totp-failed"));
    assert!(w.raised(Detector::CredentialAttack).is_empty());
    w.feed(login(
        "ann",
        "10.0.0.0/24",
        T0 + 2 * MIN,
        "totp-failed-locked",
    ));
    assert_eq!(
        w.raised(Detector::CredentialAttack)[0].kind,
        "totp-guessing"
    );

    // Failures spread over hours are not an attack.
    let mut w = World::new();
    for i in 0..6 {
        w.feed(login(
            "ann",
            "10.0.0.0/24",
            T0 + i * HOUR,
            "password-failed",
        ));
    }
    assert!(w.raised(Detector::CredentialAttack).is_empty());
}

#[test]
fn revoked_tokens_and_dormant_accounts() {
    let mut w = World::new();
    let mut ev = login("ann", "10.0.0.0/24", T0, "token-revoked");
    ev.kind = Kind::Rest;
    ev.subject = None;
    w.feed(ev);
    assert_eq!(
        w.raised(Detector::CredentialAttack)[0].kind,
        "revoked-token-reuse"
    );
    // An ordinary expired token is not reuse.
    let mut w = World::new();
    let mut ev = login("ann", "10.0.0.0/24", T0, "invalid-token");
    ev.kind = Kind::Rest;
    w.feed(ev);
    assert!(w.raised(Detector::CredentialAttack).is_empty());

    let mut w = World::new();
    w.feed(read("user:nurse", "nurse", T0, "p1", "care-team"));
    w.feed(read(
        "user:nurse",
        "nurse",
        T0 + 10 * DAY,
        "p1",
        "care-team",
    ));
    assert!(w.raised(Detector::CredentialAttack).is_empty());
    w.feed(read(
        "user:nurse",
        "nurse",
        T0 + 45 * DAY,
        "p1",
        "care-team",
    ));
    assert_eq!(
        w.raised(Detector::CredentialAttack)[0].kind,
        "dormant-account"
    );
}

#[test]
fn ransomware_bursts_and_high_entropy_rewrites() {
    let mut w = World::new();
    w.feed(update("user:nurse", T0, "p1", true));
    w.feed(update("user:nurse", T0 + 1_000_000, "p1", true));
    assert!(w.raised(Detector::Ransomware).is_empty());
    w.feed(update("user:nurse", T0 + 2_000_000, "p1", true));
    let f = w.raised(Detector::Ransomware);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].kind, "high-entropy-rewrite");

    let mut w = World::new();
    for i in 0..7 {
        w.feed(update("user:nurse", T0 + i * 5_000_000, "p1", false));
    }
    assert!(
        w.raised(Detector::Ransomware).is_empty(),
        "7 edits a minute are a near miss"
    );
    w.feed(update("user:nurse", T0 + 40_000_000, "p1", false));
    assert_eq!(w.raised(Detector::Ransomware)[0].kind, "write-burst");
}

#[test]
fn medical_identity_theft() {
    let mut w = World::new();
    let patient = |id: &str, identity: u64| registered(id, identity, 4242, T0);
    w.feed(patient("a", 1));
    let mut again = patient("a", 1);
    again.writes[0].interaction = "update".into();
    w.feed(again);
    assert!(w.raised(Detector::IdentityTheft).is_empty());
    w.feed(patient("b", 2));
    let f = w.raised(Detector::IdentityTheft);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].kind, "identifier-reused");

    let encounter = |site: &str, start: i64| {
        let mut ev = read(
            "user:clerk",
            "registration-clerk",
            start,
            "a",
            "role-any-patient",
        );
        ev.writes = vec![Written {
            rtype: "Encounter".into(),
            id: format!("e{start}"),
            version: 1,
            patient: Some("a".into()),
            interaction: "create".into(),
            site: Some(site.into()),
            site_at: Some(start),
            ..Written::default()
        }];
        ev
    };
    let mut w = World::new();
    w.feed(encounter("Organization/north", T0));
    w.feed(encounter("Organization/south", T0 + 3 * HOUR));
    assert!(w.raised(Detector::IdentityTheft).is_empty());
    w.feed(encounter("Organization/north", T0 + 3 * HOUR + 30 * MIN));
    assert_eq!(
        w.raised(Detector::IdentityTheft)[0].kind,
        "impossible-travel"
    );
}

/// A Patient created with one identifier and an identity token, by a clerk.
fn registered(id: &str, identity: u64, identifier: u64, at: i64) -> Observed {
    let mut ev = read("user:clerk", "registration-clerk", at, id, "new-patient");
    ev.interaction = "create".into();
    ev.writes = vec![Written {
        rtype: "Patient".into(),
        id: id.into(),
        version: 1,
        patient: Some(id.into()),
        interaction: "create".into(),
        identity: Some(identity),
        identifiers: vec![identifier],
        ..Written::default()
    }];
    ev
}

#[test]
fn the_patient_registry_is_saved_entry_by_entry_and_survives_a_restart() {
    let mut w = World::new();
    for i in 0..2_000u64 {
        w.feed(registered(&format!("p{i}"), i, 10_000 + i, T0 + i as i64));
    }
    let global = w.engine.global_state();
    // The global state does not grow with the patients: it holds none of them.
    assert!(
        global.len() < 4_096,
        "global state of {} bytes",
        global.len()
    );
    let users = w.engine.take_dirty();
    let facts = w.engine.take_dirty_registry();
    assert_eq!(facts.len(), 2_000);
    assert!(facts.contains(&RegistryEntry::Identifier {
        identifier: 10_007,
        identity: Some(7),
        patient: "p7".into(),
    }));
    // Taken once: only what changes afterwards is saved next time.
    assert!(w.engine.take_dirty_registry().is_empty());
    w.feed(registered("p2000", 2_000, 12_000, T0 + DAY));
    assert_eq!(w.engine.take_dirty_registry().len(), 1);

    let mut restarted = World::new();
    restarted.engine = Engine::restore(DetectConfig::default(), &global, users, facts).unwrap();
    restarted.next = w.next;
    assert!(restarted.engine.take_dirty_registry().is_empty());
    // p7's identifier, registered before the restart, on someone else.
    restarted.feed(registered("intruder", 99_999, 10_007, T0 + 2 * DAY));
    let f = restarted.raised(Detector::IdentityTheft);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].kind, "identifier-reused");
}

#[test]
fn a_global_state_that_still_holds_the_registry_is_restored_and_saved_anew() {
    // The shape an earlier release saved: identifiers and encounters inside.
    let old = serde_json::json!({
        "cursor": 5,
        "users": {}, "roles": {}, "failures": {}, "totp_failures": {},
        "network_failures": {}, "site_networks": {},
        "identifiers": { "4242": [1, "a"] },
        "encounters": { "a": ["Organization/north", T0] },
        "server_writes": [], "server_minute": null, "server_minute_start": 0,
        "server_minute_count": 0, "server_fired_until": 0, "credential_fired": {}
    });
    let bytes = serde_json::to_vec(&old).unwrap();
    let mut engine = Engine::restore(DetectConfig::default(), &bytes, [], []).unwrap();
    let mut facts = engine.take_dirty_registry();
    facts.sort_by_key(|f| matches!(f, RegistryEntry::Encounter { .. }));
    assert_eq!(
        facts,
        vec![
            RegistryEntry::Identifier {
                identifier: 4242,
                identity: Some(1),
                patient: "a".into()
            },
            RegistryEntry::Encounter {
                patient: "a".into(),
                site: "Organization/north".into(),
                start: T0
            },
        ]
    );
    let again = engine.global_state();
    assert!(!String::from_utf8(again).unwrap().contains("4242"));
}

#[test]
fn break_the_glass_is_always_raised_once() {
    let mut w = World::new();
    let mut ev = read("user:nurse", "nurse", T0 + 9 * HOUR, "p3", "break-glass");
    ev.break_glass = Some("patient unconscious in ED".into());
    w.feed(ev.clone());
    ev.at += MIN;
    w.feed(ev);
    let f = w.raised(Detector::BreakGlass);
    assert_eq!(f.len(), 1);
    assert!(f[0].summary.contains("unconscious"));
    w.clear();
    w.feed(read(
        "user:nurse",
        "nurse",
        T0 + 9 * HOUR,
        "p3",
        "care-team",
    ));
    assert!(w.raised(Detector::BreakGlass).is_empty());
}

#[test]
fn the_learned_baseline_names_its_features() {
    let mut w = World::new();
    routine(&mut w, 12, 6);
    let day = T0 + 12 * DAY;
    let mut out = Vec::new();
    w.engine.tick(day, &mut out);
    assert!(
        w.found
            .iter()
            .chain(&out)
            .all(|f| f.detector != Detector::Anomaly),
        "routine hours scored as anomalies: {:?}",
        w.found
            .iter()
            .chain(&out)
            .filter(|f| f.detector == Detector::Anomaly)
            .collect::<Vec<_>>()
    );
    // An hour of edits and refusals at 02:00, far from anything learned.
    for i in 0..6 {
        let mut ev = update(
            "user:nurse",
            day + 2 * HOUR + i * 5 * MIN,
            &format!("p{i}"),
            false,
        );
        ev.accesses.push(Access {
            patient: format!("p{}", 500 + i),
            allowed: false,
            rule: "no-relationship".into(),
        });
        w.feed(ev);
    }
    let mut out = Vec::new();
    w.engine.tick(day + 3 * HOUR, &mut out);
    let a: Vec<_> = out
        .iter()
        .filter(|f| f.detector == Detector::Anomaly)
        .collect();
    assert_eq!(a.len(), 1, "{out:?}");
    assert!(a[0].score.unwrap() >= 0.75);
    assert!(!a[0].features.is_empty());
}

#[test]
fn state_survives_a_restart() {
    let mut w = World::new();
    routine(&mut w, 3, 4);
    w.feed(login("ann", "10.0.0.0/24", T0 + 3 * DAY, "password-failed"));
    w.feed(login(
        "ann",
        "10.0.0.0/24",
        T0 + 3 * DAY + MIN,
        "password-failed",
    ));
    let global = w.engine.global_state();
    let users = w.engine.take_dirty();
    assert!(!users.is_empty());
    let mut restarted = World::new();
    let facts = w.engine.take_dirty_registry();
    restarted.engine = Engine::restore(DetectConfig::default(), &global, users, facts).unwrap();
    restarted.next = w.next;
    for i in 2..5 {
        restarted.feed(login(
            "ann",
            "10.0.0.0/24",
            T0 + 3 * DAY + i * MIN,
            "password-failed",
        ));
    }
    // The two failures before the restart count.
    assert_eq!(restarted.raised(Detector::CredentialAttack).len(), 1);
    assert_eq!(restarted.engine.state().cursor, restarted.next);
}

#[test]
fn dismissing_a_false_positive_teaches_the_baseline() {
    let mut w = World::new();
    w.feed(read(
        "user:clerk",
        "registration-clerk",
        T0 + 9 * HOUR,
        "p1",
        "role-any-patient",
    ));
    let f = w.raised(Detector::UnexplainedAccess)[0].clone();
    w.engine.dismissed(&f);
    w.clear();
    w.feed(read(
        "user:clerk",
        "registration-clerk",
        T0 + 2 * DAY + 9 * HOUR,
        "p1",
        "role-any-patient",
    ));
    assert!(w.raised(Detector::UnexplainedAccess).is_empty());
}
