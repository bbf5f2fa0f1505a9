//! `custos demo`: the system working, end to end, on the embedded default.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use custos_crypto::GcmSealer;
use serde_json::Value;

use crate::client::FhirClient;
use crate::config::FileConfig;

/// Count occurrences of `needle` in the store's files (database and WAL).
pub fn scan_files(files: &[PathBuf], needle: &str) -> usize {
    let n = needle.as_bytes();
    files
        .iter()
        .filter_map(|f| std::fs::read(f).ok())
        .map(|bytes| bytes.windows(n.len()).filter(|w| *w == n).count())
        .sum()
}

pub async fn run(
    data_dir: Option<PathBuf>,
    patients: usize,
    seed: u64,
    keep_running: bool,
) -> anyhow::Result<()> {
    let (dir, _tmp) = match data_dir {
        Some(d) => (d, None),
        None => {
            let t = std::env::temp_dir().join(format!("custos-demo-{}", std::process::id()));
            (t.clone(), Some(t))
        }
    };
    if dir.join("keys.json").exists() {
        bail!(
            "{} already holds a Custos data dir; the demo needs a fresh one",
            dir.display()
        );
    }
    crate::init_dir(&dir, false)?;
    println!("== Custos demo ==");
    println!(
        "data dir   {} (key file keys.json, mode 0600)",
        dir.display()
    );
    let opened = crate::open_data(FileConfig::default(), dir.clone(), Arc::new(GcmSealer)).await?;
    let store = opened.store.clone();
    let server = crate::embedded::EmbeddedServer::start(opened.records.clone()).await?;
    let addr = server.addr;
    let c = FhirClient::new(&format!("http://{addr}"));
    println!("server     http://{addr}  (FHIR R4, application/fhir+json)");

    // 1. Load synthetic patients as transaction Bundles.
    let synth = custos_synth::Synth::new(custos_synth::SynthConfig {
        patients,
        seed,
        detail: custos_synth::Detail::Full,
    });
    let t = Instant::now();
    let (s, _) = c.json("POST", "/", Some(&synth.directory_bundle())).await?;
    if s != 200 {
        bail!("loading the directory bundle failed with HTTP {s}");
    }
    let mut resources = 0usize;
    let mut facts = Vec::new();
    let mut first_patient = None;
    for i in 0..patients {
        let (bundle, f) = synth.patient(i);
        resources += bundle["entry"].as_array().map(|a| a.len()).unwrap_or(0);
        let (s, resp) = c.json("POST", "/", Some(&bundle)).await?;
        if s != 200 {
            bail!("loading patient bundle {i} failed with HTTP {s}: {resp}");
        }
        if first_patient.is_none() {
            first_patient = resp["entry"][0]["response"]["location"]
                .as_str()
                .map(|l| l.split('/').take(2).collect::<Vec<_>>().join("/"));
        }
        facts.push(f);
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "loaded     {patients} patients, {resources} resources in transaction Bundles ({:.0} resources/s)",
        resources as f64 / secs
    );

    // 2. Reads and searches.
    let f0 = &facts[0];
    let pref = first_patient.context("no patient location returned")?;
    let (s, p) = c.json("GET", &pref, None).await?;
    println!(
        "read       GET /{pref} -> {s}, {} {} born {}",
        first(&p["name"][0]["given"]),
        p["name"][0]["family"].as_str().unwrap_or("?"),
        p["birthDate"].as_str().unwrap_or("?")
    );
    let searches = [
        format!("Patient?family={}", f0.family),
        format!("Patient?identifier={}", f0.mrn),
        format!("Patient?birthdate={}", f0.birth_date),
        format!("Observation?patient={pref}&code=http://loinc.org|8867-4&_sort=-date&_count=3"),
        format!("Encounter?subject={pref}&_count=5"),
        format!("Condition?patient={pref}"),
    ];
    for q in &searches {
        let (s, b) = c.json("GET", q, None).await?;
        let n = b["entry"].as_array().map(|a| a.len()).unwrap_or(0);
        println!(
            "search     GET /{q} -> {s}, total {}, {n} on this page",
            b["total"]
        );
    }
    let (s, h) = c.json("GET", &format!("{pref}/_history"), None).await?;
    println!(
        "history    GET /{pref}/_history -> {s}, {} version(s)",
        h["total"]
    );
    let (s, oo) = c.json("GET", "Patient/does-not-exist", None).await?;
    println!(
        "error      GET /Patient/does-not-exist -> {s} {}",
        oo["issue"][0]["diagnostics"].as_str().unwrap_or("")
    );

    // 3. What the database holds: ciphertext and blind indexes only.
    server_checkpoint(&store).await;
    let files = custos_store::Store::files(store.as_ref());
    let mut found = 0;
    let mut looked = 0;
    for f in facts.iter().take(10) {
        for needle in [&f.family, &f.given, &f.mrn, &f.ssn, &f.birth_date, &f.phone] {
            looked += 1;
            found += scan_files(&files, needle);
        }
    }
    println!(
        "at rest    scanned {} (+WAL) for {looked} names, MRNs, SSNs, birth dates and phone numbers: {found} found in clear",
        files[0].display()
    );

    // 4. Crypto-shredding.
    let pid = pref.trim_start_matches("Patient/");
    let n = opened
        .records
        .shred_patient(pid)
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    let (s, _) = c.json("GET", &pref, None).await?;
    println!(
        "shred      erased the data key of {pref}: {n} resources unreadable, read now answers {s}"
    );
    if found != 0 {
        bail!("clear PHI found in the database files");
    }
    if keep_running {
        println!("serving on http://{addr} until Ctrl-C");
        crate::shutdown_signal().await;
    }
    server.stop().await?;
    store.close();
    println!("done.      data dir kept at {}", dir.display());
    Ok(())
}

fn first(v: &Value) -> &str {
    v.get(0).and_then(Value::as_str).unwrap_or("?")
}

/// Let the writer settle so the files reflect every commit.
async fn server_checkpoint(_store: &Arc<custos_store::SqliteStore>) {
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
}
