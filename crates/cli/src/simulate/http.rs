//! The HTTP drive: a Custos server in this process on a fresh data dir,
//! loaded with the simulated hospital as real FHIR resources (departments,
//! practitioners, patients with care teams, encounters and observations),
//! its staff as real accounts signing in with password and TOTP, a stretch
//! of ordinary work, then the attacks as real requests. Detection runs in
//! the server as in production; the scorecard reads its cases.
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use custos_auth::{NewUser, Role};
use custos_crypto::GcmSealer;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

use super::hospital::{BILLING, CLERK, Hospital, NURSE, PHYSICIAN};
use super::{AttackKind, Injected, Scorecard, SimulateArgs, score};
use crate::client::FhirClient;
use crate::config::FileConfig;

const BTG: (&str, &str) = ("x-break-glass-reason", "urgent review");

fn now_micros() -> i64 {
    custos_auth::now_micros()
}

/// Ids the server gave the hospital's resources.
struct Loaded {
    depts: Vec<String>,
    practitioners: Vec<String>,
    patients: Vec<String>,
    /// Observations per patient, as created.
    observations: Vec<Vec<Value>>,
}

struct Member {
    id: String,
    username: String,
    password: String,
    client: FhirClient,
}

fn location_id(entry: &Value) -> Option<String> {
    entry["response"]["location"]
        .as_str()
        .and_then(|l| l.split('/').nth(1))
        .map(str::to_string)
}

async fn load(h: &Hospital, loader: &FhirClient) -> anyhow::Result<Loaded> {
    // Departments and practitioners in one transaction.
    let mut entries = Vec::new();
    for d in &h.depts {
        entries.push(json!({
            "fullUrl": format!("urn:uuid:{}", uuid::Uuid::new_v4()),
            "resource": {"resourceType": "Organization", "name": d.name, "active": true},
            "request": {"method": "POST", "url": "Organization"}
        }));
    }
    for s in &h.staff {
        let mut r = s.person.fhir();
        r["resourceType"] = json!("Practitioner");
        r["active"] = json!(true);
        entries.push(json!({
            "fullUrl": format!("urn:uuid:{}", uuid::Uuid::new_v4()),
            "resource": r,
            "request": {"method": "POST", "url": "Practitioner"}
        }));
    }
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
    let (s, resp) = loader.json("POST", "/", Some(&bundle)).await?;
    if s != 200 {
        bail!("loading the directory failed with HTTP {s}: {resp}");
    }
    let ids: Vec<String> = resp["entry"]
        .as_array()
        .context("no entries")?
        .iter()
        .map(|e| location_id(e).unwrap_or_default())
        .collect();
    let depts = ids[..h.depts.len()].to_vec();
    let practitioners = ids[h.depts.len()..].to_vec();
    let mut patients = Vec::new();
    let mut observations = Vec::new();
    let start = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    let start = start
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    for p in &h.patients {
        let pu = format!("urn:uuid:{}", uuid::Uuid::new_v4());
        let mut pr = p.person.fhir();
        pr["resourceType"] = json!("Patient");
        pr["identifier"] = json!([{"system": "urn:custos:mrn", "value": p.mrn}]);
        if p.vip {
            pr["meta"] = json!({"security": [{
                "system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}],
                "tag": [{"code": "VIP"}]});
        }
        let team: Vec<Value> = p
            .team
            .iter()
            .map(
                |&s| json!({"member": {"reference": format!("Practitioner/{}", practitioners[s])}}),
            )
            .collect();
        let doctor = p.team.iter().find(|&&s| h.staff[s].role == PHYSICIAN);
        let mut entries = vec![
            json!({"fullUrl": pu, "resource": pr, "request": {"method": "POST", "url": "Patient"}}),
            json!({"resource": {"resourceType": "CareTeam", "status": "active",
                "subject": {"reference": pu}, "participant": team},
                "request": {"method": "POST", "url": "CareTeam"}}),
            json!({"resource": {"resourceType": "Encounter", "status": "finished",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                "subject": {"reference": pu},
                "serviceProvider": {"reference": format!("Organization/{}", depts[p.dept])},
                "participant": doctor.map(|&d| vec![json!({"individual": {"reference": format!("Practitioner/{}", practitioners[d])}})]).unwrap_or_default(),
                "period": {"start": start}},
                "request": {"method": "POST", "url": "Encounter"}}),
        ];
        for k in 0..3 {
            entries.push(
                json!({"resource": {"resourceType": "Observation", "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                "subject": {"reference": pu},
                "valueQuantity": {"value": 60 + k, "unit": "/min"},
                "note": [{"text": "Resting heart rate, patient comfortable."}]},
                "request": {"method": "POST", "url": "Observation"}}),
            );
        }
        let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
        let (s, resp) = loader.json("POST", "/", Some(&bundle)).await?;
        if s != 200 {
            bail!("loading a patient failed with HTTP {s}: {resp}");
        }
        let e = resp["entry"].as_array().context("no entries")?;
        let id = location_id(&e[0]).context("no Patient location")?;
        let mut obs = Vec::new();
        for oe in &e[3..] {
            let oid = location_id(oe).context("no Observation location")?;
            let (_, o) = loader
                .json("GET", &format!("Observation/{oid}"), None)
                .await?;
            obs.push(o);
        }
        patients.push(id);
        observations.push(obs);
    }
    Ok(Loaded {
        depts,
        practitioners,
        patients,
        observations,
    })
}

fn role_of(r: &str) -> Role {
    match r {
        PHYSICIAN => Role::Physician,
        NURSE => Role::Nurse,
        CLERK => Role::RegistrationClerk,
        _ => Role::Billing,
    }
}

async fn sign_in(
    anonymous: &FhirClient,
    username: &str,
    password: &str,
    secret: Option<&str>,
) -> anyhow::Result<FhirClient> {
    let code = secret
        .and_then(|s| custos_auth::users::totp_code_base32(s, custos_auth::now_secs() as u64));
    let t = crate::backend::password_grant(
        anonymous,
        username,
        password,
        code.as_deref(),
        "user/*.cruds",
        &[],
    )
    .await?;
    let token = t["access_token"]
        .as_str()
        .with_context(|| format!("{username} could not sign in: {t}"))?;
    Ok(anonymous.with_token(token))
}

/// Run the HTTP drive and score it.
pub async fn run(
    args: &SimulateArgs,
    detect: custos_detect::DetectConfig,
) -> anyhow::Result<Scorecard> {
    let h = Hospital::generate(args.seed, args.staff, args.patients);
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed ^ 0x4711);
    let dir = std::env::temp_dir().join(format!(
        "custos-simulate-{}-{}",
        std::process::id(),
        custos_auth::random_token(6)
    ));
    crate::init_dir(&dir, false)?;
    let opened = crate::open_data(FileConfig::default(), dir.clone(), Arc::new(GcmSealer)).await?;
    let server = crate::embedded::EmbeddedServer::start_with(
        opened.records.clone(),
        Some(custos_auth::AuthConfig::default()),
        None,
        Some(detect),
    )
    .await?;
    let result = drive(args, &h, &mut rng, &server).await;
    server.stop().await?;
    opened.store.close();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn drive(
    args: &SimulateArgs,
    h: &Hospital,
    rng: &mut ChaCha8Rng,
    server: &crate::embedded::EmbeddedServer,
) -> anyhow::Result<Scorecard> {
    let auth = server.auth.clone().context("authentication is on")?;
    let detection = server.detection.clone().context("detection is on")?;
    let anonymous = FhirClient::new(&server.url());
    let (loader, _) =
        crate::backend::sign_in_as_system(&auth, &anonymous, "simulator", "hospital simulator")
            .await?;
    let started = Instant::now();
    let loaded = load(h, &loader).await?;
    // Staff accounts, each signing in with password and TOTP.
    let mut staff: Vec<Member> = Vec::new();
    for (i, s) in h.staff.iter().enumerate() {
        let password = format!("sim-{}", custos_auth::random_token(12));
        let created = auth
            .add_user(NewUser {
                username: s.username.clone(),
                password: password.clone(),
                role: role_of(s.role),
                practitioner: Some(loaded.practitioners[i].clone()),
                patient: None,
                organization: Some(loaded.depts[s.dept].clone()),
            })
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let client = sign_in(
            &anonymous,
            &s.username,
            &password,
            created.totp_secret.as_deref(),
        )
        .await?;
        staff.push(Member {
            id: created.user.id,
            username: s.username.clone(),
            password,
            client,
        });
    }
    let pid = |p: usize| loaded.patients[p].clone();
    // Ordinary work: rounds of reads by everyone, notes by nurses.
    let rounds = (args.days * 3).min(12);
    for _ in 0..rounds {
        let mut work = Vec::new();
        for (i, s) in h.staff.iter().enumerate() {
            let c = staff[i].client.clone();
            let dept: Vec<usize> = (0..h.patients.len())
                .filter(|&p| h.patients[p].dept == s.dept)
                .collect();
            let mut picks: Vec<String> = Vec::new();
            for _ in 0..3 {
                let p = if s.clinical() {
                    s.care.choose(rng).copied()
                } else {
                    dept.choose(rng).copied()
                };
                if let Some(p) = p {
                    picks.push(pid(p));
                }
            }
            let note = (s.role == NURSE)
                .then(|| {
                    s.care
                        .choose(rng)
                        .map(|&p| loaded.observations[p][0].clone())
                })
                .flatten();
            work.push(async move {
                for p in picks {
                    let _ = c.json("GET", &format!("Patient/{p}"), None).await;
                    let _ = c
                        .json(
                            "GET",
                            &format!("Observation?subject=Patient/{p}&_count=5"),
                            None,
                        )
                        .await;
                }
                if let Some(mut o) = note {
                    let id = o["id"].as_str().unwrap_or_default().to_string();
                    if let Ok((200, cur)) = c.json("GET", &format!("Observation/{id}"), None).await
                    {
                        o = cur;
                        o["note"] = json!([{"text": "Reviewed on the ward round; no change."}]);
                        let _ = c.json("PUT", &format!("Observation/{id}"), Some(&o)).await;
                    }
                }
            });
        }
        futures_util::future::join_all(work).await;
    }

    // The attacks, each by a member of staff not used before.
    let mut used: HashSet<usize> = HashSet::new();
    let mut attacks: Vec<Injected> = Vec::new();
    let subject = |i: usize| format!("user:{}", staff[i].id);
    let pick = |used: &mut HashSet<usize>,
                rng: &mut ChaCha8Rng,
                roles: &[&str],
                not: &[usize]|
     -> Option<usize> {
        let c: Vec<usize> = (0..h.staff.len())
            .filter(|i| roles.contains(&h.staff[*i].role) && !used.contains(i) && !not.contains(i))
            .collect();
        let s = *c.choose(rng)?;
        used.insert(s);
        Some(s)
    };
    let injected = |kind: AttackKind, subject: Option<String>, patient: Option<String>| Injected {
        kind,
        start: now_micros(),
        end: now_micros() + 60_000_000,
        subject,
        patient,
        changed: None,
        restorable: None,
    };
    for k in 0..args.attacks {
        // Snooping on a relative, a coworker, oneself; a VIP; a curious break of the glass.
        let relatives: Vec<usize> = (0..h.patients.len())
            .filter(|&p| h.patients[p].relative_of.is_some())
            .collect();
        if let Some(&p) = relatives.get(k)
            && let Some(s) = h.patients[p].relative_of
            && used.insert(s)
        {
            let a = injected(AttackKind::SnoopingFamily, Some(subject(s)), Some(pid(p)));
            let hdr: &[(&str, &str)] = if h.staff[s].clinical() { &[BTG] } else { &[] };
            staff[s]
                .client
                .send_with("GET", &format!("Patient/{}", pid(p)), None, hdr)
                .await?;
            attacks.push(a);
        }
        let employees: Vec<usize> = (0..h.patients.len())
            .filter(|&p| h.patients[p].employee.is_some())
            .collect();
        if let Some(&p) = employees.get(k) {
            let e = h.patients[p].employee.expect("an employee");
            let mut not: Vec<usize> = (0..h.staff.len())
                .filter(|&i| h.staff[i].dept == h.patients[p].dept)
                .collect();
            not.push(e);
            if let Some(s) = pick(&mut used, rng, &[CLERK, BILLING], &not) {
                let a = injected(AttackKind::SnoopingCoworker, Some(subject(s)), Some(pid(p)));
                staff[s]
                    .client
                    .json("GET", &format!("Patient/{}", pid(p)), None)
                    .await?;
                attacks.push(a);
            }
            if used.insert(e) {
                let a = injected(AttackKind::SnoopingSelf, Some(subject(e)), Some(pid(p)));
                let hdr: &[(&str, &str)] = if h.staff[e].clinical() { &[BTG] } else { &[] };
                staff[e]
                    .client
                    .send_with("GET", &format!("Patient/{}", pid(p)), None, hdr)
                    .await?;
                attacks.push(a);
            }
        }
        let vips: Vec<usize> = (0..h.patients.len())
            .filter(|&p| h.patients[p].vip)
            .collect();
        if let Some(&p) = vips.get(k % vips.len().max(1))
            && let Some(s) = {
                // Someone of another department (the treating one is explained).
                let same: Vec<usize> = (0..h.staff.len())
                    .filter(|&i| h.staff[i].dept == h.patients[p].dept)
                    .collect();
                pick(&mut used, rng, &[CLERK, BILLING], &same)
            }
        {
            let a = injected(AttackKind::VipRecord, Some(subject(s)), Some(pid(p)));
            staff[s]
                .client
                .json("GET", &format!("Patient/{}", pid(p)), None)
                .await?;
            attacks.push(a);
        }
        if let Some(s) = pick(&mut used, rng, &[PHYSICIAN, NURSE], &[]) {
            let p = (0..h.patients.len())
                .find(|&p| {
                    !h.patients[p].team.contains(&s)
                        && h.patients[p].dept != h.staff[s].dept
                        && !h.patients[p].vip
                })
                .unwrap_or(0);
            let a = injected(AttackKind::BreakGlassMisuse, Some(subject(s)), Some(pid(p)));
            staff[s]
                .client
                .send_with("GET", &format!("Patient/{}", pid(p)), None, &[BTG])
                .await?;
            attacks.push(a);
        }
        // Bulk reading: a clerk pages through the whole hospital.
        if let Some(s) = pick(&mut used, rng, &[CLERK, BILLING], &[]) {
            let a = injected(AttackKind::BulkFast, Some(subject(s)), None);
            // (Ordinary patients only: a VIP or a relative among them would
            // be caught by its own detector first, and answered.)
            let plain: Vec<usize> = (0..h.patients.len())
                .filter(|&p| {
                    let pt = &h.patients[p];
                    !pt.vip && pt.relative_of.is_none() && pt.employee.is_none()
                })
                .take(80)
                .collect();
            for p in plain {
                staff[s]
                    .client
                    .json("GET", &format!("Patient/{}", pid(p)), None)
                    .await?;
            }
            attacks.push(a);
        }
        // Credential attacks.
        if let Some(s) = pick(&mut used, rng, &[NURSE, PHYSICIAN, CLERK, BILLING], &[]) {
            let a = injected(AttackKind::PasswordGuessing, Some(subject(s)), None);
            for i in 0..6 {
                let _ = crate::backend::password_grant(
                    &anonymous,
                    &staff[s].username,
                    &format!("guess-{i}-Winter2026!"),
                    None,
                    "user/*.rs",
                    &[],
                )
                .await;
            }
            attacks.push(a);
        }
        if let Some(s) = pick(&mut used, rng, &[NURSE, PHYSICIAN], &[]) {
            let a = injected(AttackKind::TotpGuessing, Some(subject(s)), None);
            for _ in 0..3 {
                let _ = crate::backend::password_grant(
                    &anonymous,
                    &staff[s].username,
                    &staff[s].password,
                    Some("000000"),
                    "user/*.rs",
                    &[],
                )
                .await;
            }
            attacks.push(a);
        }
        {
            let a = injected(AttackKind::PasswordSpraying, None, None);
            let names: Vec<String> = (0..6)
                .map(|i| staff[(k * 6 + i) % staff.len()].username.clone())
                .collect();
            for n in names {
                let _ = crate::backend::password_grant(
                    &anonymous,
                    &n,
                    "Spring2026!",
                    None,
                    "user/*.rs",
                    &[],
                )
                .await;
            }
            attacks.push(a);
        }
        if let Some(s) = pick(&mut used, rng, &[NURSE, PHYSICIAN, CLERK, BILLING], &[]) {
            // A stolen session is revoked; the thief keeps presenting it.
            auth.revoke_user_tokens(&staff[s].username)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let a = injected(AttackKind::RevokedToken, None, None);
            for _ in 0..2 {
                staff[s]
                    .client
                    .json("GET", &format!("Patient/{}", pid(0)), None)
                    .await?;
            }
            attacks.push(a);
        }
        // Ransomware: scramble, partly scramble, delete.
        for kind in [
            AttackKind::RansomwareFast,
            AttackKind::RansomwarePartial,
            AttackKind::RansomwareDeletes,
        ] {
            let Some(s) = pick(&mut used, rng, &[PHYSICIAN], &[]) else {
                continue;
            };
            let mut a = injected(kind, Some(subject(s)), None);
            let targets: Vec<Value> = h.staff[s]
                .care
                .iter()
                .flat_map(|&p| loaded.observations[p].iter().cloned())
                .collect();
            let (mut changed, mut restorable) = (0usize, 0usize);
            for (i, o) in targets.iter().enumerate().take(40) {
                let id = o["id"].as_str().unwrap_or_default().to_string();
                let (_, cur) = loader
                    .json("GET", &format!("Observation/{id}"), None)
                    .await?;
                let version = cur["meta"]["versionId"].as_str().unwrap_or("1").to_string();
                let status = if kind == AttackKind::RansomwareDeletes {
                    staff[s]
                        .client
                        .send("DELETE", &format!("Observation/{id}"), None)
                        .await?
                        .0
                } else {
                    let mut x = cur.clone();
                    let scramble = kind == AttackKind::RansomwareFast || i % 2 == 0;
                    if scramble {
                        x["note"] = json!([{"text": custos_auth::random_token(48)}]);
                    } else {
                        x["note"] = json!([{"text": "Reviewed."}]);
                    }
                    staff[s]
                        .client
                        .json("PUT", &format!("Observation/{id}"), Some(&x))
                        .await?
                        .0
                };
                if !(200..300).contains(&status) {
                    break;
                }
                changed += 1;
                let (vs, old) = loader
                    .json("GET", &format!("Observation/{id}/_history/{version}"), None)
                    .await?;
                if vs == 200 && old["note"] == cur["note"] {
                    restorable += 1;
                }
            }
            a.changed = Some(changed);
            a.restorable = Some(restorable);
            attacks.push(a);
        }
        // Medical identity theft: an MRN registered with other demographics;
        // one identity at two sites half an hour apart.
        if let Some(s) = pick(&mut used, rng, &[CLERK], &[]) {
            let victim = rng.random_range(0..h.patients.len());
            let mut forged = Hospital::generate(args.seed + 99 + k as u64, 12, 30).patients[0]
                .person
                .fhir();
            forged["resourceType"] = json!("Patient");
            forged["identifier"] =
                json!([{"system": "urn:custos:mrn", "value": h.patients[victim].mrn}]);
            let mut a = injected(AttackKind::IdentityReuse, None, None);
            let (mut st, mut created) = staff[s]
                .client
                .json("POST", "Patient", Some(&forged))
                .await?;
            if st == 403 {
                (st, created) = loader.json("POST", "Patient", Some(&forged)).await?;
            }
            if st == 201 {
                a.patient = created["id"].as_str().map(str::to_string);
                attacks.push(a);
            }
        }
        {
            let p = rng.random_range(0..h.patients.len());
            let here = h.patients[p].dept;
            let there = (0..h.depts.len())
                .find(|&d| h.depts[d].site != h.depts[here].site)
                .unwrap_or((here + 1) % h.depts.len());
            let a = injected(AttackKind::ImpossibleTravel, None, Some(pid(p)));
            for (d, ago) in [(here, 40), (there, 10)] {
                let start = (time::OffsetDateTime::now_utc() - time::Duration::minutes(ago))
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default();
                let enc = json!({"resourceType": "Encounter", "status": "in-progress",
                    "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "EMER"},
                    "subject": {"reference": format!("Patient/{}", pid(p))},
                    "serviceProvider": {"reference": format!("Organization/{}", loaded.depts[d])},
                    "period": {"start": start}});
                loader.json("POST", "Encounter", Some(&enc)).await?;
            }
            attacks.push(a);
        }
    }
    if !detection.caught_up(Duration::from_secs(60)).await {
        bail!("detection did not catch up with the audit log within a minute");
    }
    let stats = detection.stats();
    // The simulator's own loading client reads everything to set the
    // scene and check restores: the harness, not the hospital's work.
    let findings: Vec<custos_detect::Finding> = detection
        .cases(None, 100_000)
        .into_iter()
        .flat_map(|c| c.findings)
        .filter(|f| {
            !(f.subject.as_deref() == Some("client:simulator")
                && f.detector == custos_detect::Detector::BulkExfiltration)
        })
        .collect();
    let secs = started.elapsed().as_secs_f64();
    let mut card = score("http", args, &attacks, &findings, stats.processed, secs);
    card.alert_latency_p99_ms = Some(stats.alert_latency_p99_us as f64 / 1000.0);
    Ok(card)
}
