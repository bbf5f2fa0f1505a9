//! `custos audit …`: verify the audit log offline (a data dir or an
//! export, with only the public key), export it, issue a checkpoint, print
//! the public key.
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use clap::Subcommand;
use custos_audit::{AuditConfig, AuditRecord, AuditTrail, EventKind, Verifier};
use custos_crypto::GcmSealer;
use custos_store::{SqliteConfig, SqliteStore, Store, StoreExt};

use crate::DataArgs;

#[derive(Subcommand)]
pub enum AuditAction {
    /// Check the log offline: every leaf and node recomputed, every
    /// checkpoint's signature and consistency. Needs only the public key;
    /// on tampering, names the first bad entry index (exit status 1).
    Verify {
        /// A data directory to read the log from (the database only: no keys are read).
        #[arg(long, conflicts_with = "export")]
        data_dir: Option<PathBuf>,
        /// An export made by `custos audit export` (or `GET /audit/entries` plus checkpoints).
        #[arg(long)]
        export: Option<PathBuf>,
        /// The checkpoint verifier key (`custos audit public-key`), pinned somewhere the log's keeper cannot change.
        #[arg(long, conflicts_with = "public_key_file")]
        public_key: Option<String>,
        /// A file holding the verifier key.
        #[arg(long)]
        public_key_file: Option<PathBuf>,
        /// Checkpoints kept by a witness (the server's `audit.witness_file`), checked against the log too.
        #[arg(long)]
        witness: Option<PathBuf>,
        /// Also open every entry with the data keys (needs the data dir's key material).
        #[arg(long, requires = "data_dir")]
        decode: bool,
        /// Verify the log in this PostgreSQL database instead of the data dir's
        /// SQLite file (the data dir, if given, then only provides keys for `--decode`).
        #[arg(long, env = "CUSTOS_DATABASE_URL", conflicts_with = "export")]
        database_url: Option<String>,
        /// The database schema holding Custos's tables (`[storage] schema`).
        #[arg(long, requires = "database_url")]
        database_schema: Option<String>,
    },
    /// Write the log (entries and checkpoints) as NDJSON, verifiable offline;
    /// with `--fhir`, the events themselves as FHIR AuditEvents (for a SIEM).
    Export {
        #[command(flatten)]
        data: DataArgs,
        /// Output file (`-` for standard output).
        #[arg(long, default_value = "-")]
        out: PathBuf,
        /// Decoded FHIR AuditEvents instead of the sealed log.
        #[arg(long)]
        fhir: bool,
    },
    /// Sign a checkpoint of the log as it is now and print it.
    Checkpoint {
        #[command(flatten)]
        data: DataArgs,
    },
    /// Print the verifier key of the log's checkpoints.
    PublicKey {
        #[command(flatten)]
        data: DataArgs,
    },
}

pub async fn run(action: AuditAction) -> anyhow::Result<()> {
    match action {
        AuditAction::Verify {
            data_dir,
            export,
            public_key,
            public_key_file,
            witness,
            decode,
            database_url,
            database_schema,
        } => {
            let key = match (public_key, public_key_file) {
                (Some(k), _) => k,
                (None, Some(f)) => std::fs::read_to_string(&f)
                    .with_context(|| format!("cannot read {}", f.display()))?
                    .trim()
                    .to_string(),
                (None, None) => bail!(
                    "give the verifier key with --public-key or --public-key-file (print it once with `custos audit public-key` and keep it apart from the data)"
                ),
            };
            let mut witnessed = Vec::new();
            if let Some(w) = &witness {
                witnessed = read_witness(w)?;
            }
            let started = std::time::Instant::now();
            let report = match (data_dir, export) {
                (dir, None) if database_url.is_some() => {
                    let mut pc =
                        custos_store::PostgresConfig::new(database_url.clone().unwrap_or_default());
                    pc.schema = database_schema.clone();
                    pc.pool_size = 2;
                    let store =
                        tokio::task::spawn_blocking(move || custos_store::PostgresStore::open(pc))
                            .await?
                            .map_err(|e| anyhow::anyhow!("cannot open the database: {e}"))?;
                    let store: Arc<dyn Store> = Arc::new(store);
                    let keys = match dir {
                        Some(d) if decode => {
                            let file = crate::config::FileConfig {
                                storage: Some(crate::config::StorageConfig {
                                    url: database_url.clone(),
                                    schema: database_schema.clone(),
                                    ..Default::default()
                                }),
                                ..Default::default()
                            };
                            Some((d, file))
                        }
                        _ => None,
                    };
                    verify_store(store, keys, &key, witnessed).await?
                }
                (Some(dir), None) => verify_dir(&dir, &key, witnessed, decode).await?,
                (None, Some(file)) => verify_export(&file, &key, witnessed)?,
                _ => bail!("give either --data-dir or --export"),
            };
            let report = report.and_then(|r| {
                if r.entries > 0 && r.checkpoints == 0 {
                    Err(custos_audit::VerifyFailure {
                        first_bad_index: 0,
                        reason: "no signed checkpoint: nothing vouches for any entry (checkpoints removed?)".into(),
                    })
                } else {
                    Ok(r)
                }
            });
            match report {
                Ok(r) => {
                    let secs = started.elapsed().as_secs_f64().max(1e-9);
                    println!(
                        "audit log verified: {} entries, {} checkpoints, root {}, latest checkpoint at size {} ({:.0} entries/s)",
                        r.entries,
                        r.checkpoints,
                        B64.encode(r.root),
                        r.latest_checkpoint
                            .map(|s| s.to_string())
                            .unwrap_or_else(|| "-".into()),
                        r.entries as f64 / secs
                    );
                    if let Some(latest) = r.latest_checkpoint
                        && latest < r.entries
                    {
                        println!(
                            "note: entries {latest}..{} are not yet covered by a signed checkpoint",
                            r.entries
                        );
                    }
                    Ok(())
                }
                Err(f) => {
                    eprintln!("audit log verification FAILED: {f}");
                    std::process::exit(1);
                }
            }
        }
        AuditAction::Export { data, out, fhir } => export(&data, &out, fhir).await,
        AuditAction::Checkpoint { data } => {
            let (opened, trail) = open_trail(&data).await?;
            let c = trail
                .checkpoint()
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            opened.store.close();
            print!("{}", String::from_utf8_lossy(&c.note));
            Ok(())
        }
        AuditAction::PublicKey { data } => {
            let (opened, trail) = open_trail(&data).await?;
            println!("{}", trail.verifier_key());
            opened.store.close();
            Ok(())
        }
    }
}

/// Open a data directory's audit trail (needs its key material).
pub async fn open_trail(data: &DataArgs) -> anyhow::Result<(crate::Opened, AuditTrail)> {
    let (file, dir) = crate::resolve(data)?;
    let audit = file.audit.clone().unwrap_or_default();
    let opened = crate::open_data(file, dir, Arc::new(GcmSealer)).await?;
    let trail = AuditTrail::open(
        &opened.records,
        AuditConfig {
            checkpoint_secs: 0,
            ..audit
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((opened, trail))
}

/// Record an event of a command run on the data dir itself (no HTTP).
pub async fn record_command(
    trail: &AuditTrail,
    kind: EventKind,
    action: &str,
    detail: Option<String>,
    ok: bool,
) -> anyhow::Result<()> {
    let rec = AuditRecord {
        at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0),
        kind,
        action: format!("cli:{action}"),
        interaction: Some(action.to_string()),
        status: if ok { 200 } else { 500 },
        agent: custos_audit::Agent {
            subject: Some(format!("os-user:{}", os_user())),
            username: Some(os_user()),
            user_agent: Some(format!("custos-cli/{}", env!("CARGO_PKG_VERSION"))),
            ..Default::default()
        },
        detail,
        ..AuditRecord::default()
    };
    trail
        .append(rec)
        .await
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("the audit trail refused the event: {e}"))
}

fn os_user() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into())
}

fn read_witness(path: &Path) -> anyhow::Result<Vec<Vec<u8>>> {
    let text = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    // Notes are separated by an empty line after their signature lines.
    let mut notes = Vec::new();
    let mut current: Vec<u8> = Vec::new();
    let mut in_sigs = false;
    for line in text.split_inclusive(|b| *b == b'\n') {
        let bare = line.strip_suffix(b"\n").unwrap_or(line);
        if bare.is_empty() {
            if in_sigs {
                notes.push(std::mem::take(&mut current));
                in_sigs = false;
                continue;
            }
            in_sigs = true;
        }
        current.extend_from_slice(line);
    }
    if !current.is_empty() {
        notes.push(current);
    }
    Ok(notes)
}

pub type Outcome = Result<custos_audit::Report, custos_audit::VerifyFailure>;

pub async fn verify_dir(
    dir: &Path,
    key: &str,
    witnessed: Vec<Vec<u8>>,
    decode: bool,
) -> anyhow::Result<Outcome> {
    let db = dir.join("custos.db");
    if !db.is_file() {
        bail!("no database at {}", db.display());
    }
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(SqliteConfig::new(&db)).context("cannot open the database")?);
    let keys = decode.then(|| (dir.to_path_buf(), crate::config::FileConfig::default()));
    verify_store(store, keys, key, witnessed).await
}

/// Verify the log of an open store; with `decode_with` (a data dir whose
/// key material opens the entries), also check that every entry decodes.
pub async fn verify_store(
    store: Arc<dyn Store>,
    decode_with: Option<(PathBuf, crate::config::FileConfig)>,
    key: &str,
    witnessed: Vec<Vec<u8>>,
) -> anyhow::Result<Outcome> {
    let mut notes: Vec<Vec<u8>> = store
        .read(|tx| {
            let mut out = Vec::new();
            let mut after = 0;
            loop {
                let page = tx.log_read(custos_audit::trail::CHECKPOINT_LOG, after, 10_000)?;
                let Some(last) = page.last() else { break };
                after = last.seq;
                out.extend(page.into_iter().map(|e| e.value));
            }
            Ok(out)
        })
        .await?;
    if let Some(f) = rollback(key, &notes, "stored checkpoints") {
        return Ok(Err(f));
    }
    if let Some(f) = rollback(key, &witnessed, "the witness's checkpoints") {
        return Ok(Err(f));
    }
    notes.extend(witnessed);
    let mut v = match Verifier::new(key, notes) {
        Ok(v) => v,
        Err(f) => return Ok(Err(f)),
    };
    let opened = match decode_with {
        Some((dir, file)) => Some(crate::open_data(file, dir, Arc::new(GcmSealer)).await?),
        None => None,
    };
    let mut next = 0u64;
    loop {
        let start = next;
        let page = store
            .read(move |tx| {
                let rows = tx.audit_entries(start, u64::MAX, 10_000)?;
                // The leaf hashes the log stored, in one range scan (a page's
                // stored hashes are contiguous); a missing one is tampering.
                let hashes = match (rows.first(), rows.last()) {
                    (Some(f), Some(l)) => tx.audit_hash_range(
                        tlog_tiles::stored_hash_index(0, f.index),
                        tlog_tiles::stored_hash_index(0, l.index) + 1,
                    )?,
                    _ => Vec::new(),
                };
                Ok((rows, hashes))
            })
            .await?;
        let (rows, hashes) = page;
        let Some(last) = rows.last() else { break };
        next = last.index + 1;
        let stored: std::collections::HashMap<u64, [u8; 32]> = hashes.into_iter().collect();
        for row in &rows {
            let Some(claimed) = stored.get(&tlog_tiles::stored_hash_index(0, row.index)) else {
                return Ok(Err(custos_audit::VerifyFailure {
                    first_bad_index: row.index,
                    reason: "the log's stored leaf hash is missing".into(),
                }));
            };
            if let Err(f) = v.entry(row.index, &row.data, Some(*claimed)) {
                return Ok(Err(f));
            }
            if let Some(o) = &opened {
                let (r, data) = (o.records.clone(), row.data.clone());
                let decoded = o
                    .store
                    .as_ref()
                    .read(move |tx| Ok(custos_audit::trail::open_in(&r, tx, &data).map(|_| ())))
                    .await?;
                if let Err(e) = decoded {
                    return Ok(Err(custos_audit::VerifyFailure {
                        first_bad_index: row.index,
                        reason: format!("entry does not decode with the data keys: {e}"),
                    }));
                }
            }
        }
    }
    Ok(v.finish())
}

/// Checkpoints in the order they were issued must never shrink: a smaller
/// one after a larger one means the log was cut back and regrown.
fn rollback(key: &str, notes: &[Vec<u8>], what: &str) -> Option<custos_audit::VerifyFailure> {
    let mut max: Option<u64> = None;
    for note in notes {
        let Ok(c) = custos_audit::open_checkpoint(note, key) else {
            continue; // the verifier reports bad signatures itself
        };
        if let Some(m) = max
            && c.size < m
        {
            return Some(custos_audit::VerifyFailure {
                first_bad_index: c.size,
                reason: format!(
                    "{what}: a checkpoint of {} entries was issued after one of {m}: the log was cut back and rewritten",
                    c.size
                ),
            });
        }
        max = Some(max.map_or(c.size, |m| m.max(c.size)));
    }
    None
}

fn verify_export(file: &Path, key: &str, witnessed: Vec<Vec<u8>>) -> anyhow::Result<Outcome> {
    // Two passes: checkpoints first (they may come anywhere in the file).
    let open = || -> anyhow::Result<std::io::BufReader<std::fs::File>> {
        Ok(std::io::BufReader::new(
            std::fs::File::open(file).with_context(|| format!("cannot read {}", file.display()))?,
        ))
    };
    if let Some(f) = rollback(key, &witnessed, "the witness's checkpoints") {
        return Ok(Err(f));
    }
    let witnessed_count = witnessed.len();
    let mut notes = witnessed;
    for (n, line) in open()?.lines().enumerate() {
        let line = line.with_context(|| format!("line {}", n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("line {} of the export is not JSON", n + 1))?;
        if let Some(c) = v.get("checkpoint").and_then(|c| c.as_str()) {
            notes.push(c.as_bytes().to_vec());
        }
    }
    if let Some(f) = rollback(key, &notes[witnessed_count..], "the export's checkpoints") {
        return Ok(Err(f));
    }
    let mut v = match Verifier::new(key, notes) {
        Ok(v) => v,
        Err(f) => return Ok(Err(f)),
    };
    for (n, line) in open()?.lines().enumerate() {
        let line = line.with_context(|| format!("line {}", n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let j: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("line {} of the export is not JSON", n + 1))?;
        let (Some(index), Some(leaf)) = (
            j.get("index").and_then(|i| i.as_u64()),
            j.get("leaf").and_then(|l| l.as_str()),
        ) else {
            continue;
        };
        let data = B64
            .decode(leaf)
            .with_context(|| format!("line {}: leaf is not base64", n + 1))?;
        if let Err(f) = v.entry(index, &data, None) {
            return Ok(Err(f));
        }
    }
    Ok(v.finish())
}

async fn export(data: &DataArgs, out: &Path, fhir: bool) -> anyhow::Result<()> {
    let (opened, trail) = open_trail(data).await?;
    if !fhir {
        // Cover everything exported by a checkpoint.
        trail
            .checkpoint()
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let mut w: Box<dyn Write> = if out == Path::new("-") {
        Box::new(std::io::BufWriter::new(std::io::stdout().lock()))
    } else {
        Box::new(std::io::BufWriter::new(
            std::fs::File::create(out)
                .with_context(|| format!("cannot create {}", out.display()))?,
        ))
    };
    let mut n = 0u64;
    if fhir {
        let mut q = custos_store::AuditQuery {
            ascending: true,
            limit: 1000,
            ..Default::default()
        };
        loop {
            let page = trail
                .search(q.clone())
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let Some((last, _)) = page.last() else { break };
            q.after = Some(last.index);
            for (e, rec) in &page {
                let ev = custos_audit::to_audit_event(
                    rec,
                    &custos_audit::Position {
                        index: e.index,
                        leaf: &e.data,
                    },
                );
                serde_json::to_writer(&mut w, &ev)?;
                w.write_all(b"\n")?;
                n += 1;
            }
        }
    } else {
        for c in trail
            .checkpoints()
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?
        {
            serde_json::to_writer(
                &mut w,
                &serde_json::json!({"checkpoint": String::from_utf8_lossy(&c.note)}),
            )?;
            w.write_all(b"\n")?;
        }
        let mut next = 0u64;
        loop {
            let page = trail
                .entries(next, u64::MAX, 10_000)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let Some(last) = page.last() else { break };
            next = last.index + 1;
            for e in &page {
                serde_json::to_writer(
                    &mut w,
                    &serde_json::json!({"index": e.index, "leaf": B64.encode(&e.data)}),
                )?;
                w.write_all(b"\n")?;
                n += 1;
            }
        }
    }
    w.flush()?;
    drop(w);
    record_command(
        &trail,
        EventKind::Export,
        if fhir {
            "audit-export-fhir"
        } else {
            "audit-export"
        },
        Some(format!("{n} entries")),
        true,
    )
    .await?;
    // Cover the export's own event too.
    trail
        .checkpoint()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    opened.store.close();
    if out != Path::new("-") {
        eprintln!("exported {n} audit entries to {}", out.display());
    }
    Ok(())
}
