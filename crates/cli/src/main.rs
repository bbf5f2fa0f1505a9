//! The `custos` command line: serve, init, demo, synth, keys, patient,
//! user, client, read-only, login, bench.
mod admin;
mod audit_cmd;
mod backend;
mod bench;
mod client;
mod config;
mod demo;
mod embedded;
mod leader;
mod loadgen;
mod simulate;
mod sqlite_malloc;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use custos_crypto::{EnvKekProvider, FileKekProvider, GcmSealer, KekProvider, Sealer};
use custos_records::{Records, RecordsConfig};
use custos_server::ServerConfig;
use custos_store::{SqliteConfig, SqliteStore, Store};

use crate::config::FileConfig;

/// mimalloc: many small JSON allocations on every request; glibc malloc showed up at a fifth of the profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "custos",
    version,
    about = "Custos: the patient-data server that guards itself"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the data lives and how to open it.
#[derive(clap::Args, Clone)]
pub struct DataArgs {
    /// The data directory (database and key file).
    #[arg(long, env = "CUSTOS_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// A TOML configuration file.
    #[arg(long, env = "CUSTOS_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Create a data directory with fresh key material (owner-only permissions).
    Init {
        #[command(flatten)]
        data: DataArgs,
        /// Also create a self-signed TLS certificate for localhost (development only).
        #[arg(long)]
        dev_tls: bool,
    },
    /// Apply pending database schema migrations and list those applied
    /// (`custos serve` applies them too, on start).
    Migrate {
        #[command(flatten)]
        data: DataArgs,
    },
    /// Run the FHIR server.
    Serve {
        #[command(flatten)]
        data: DataArgs,
        /// Listen address (default 127.0.0.1:8080).
        #[arg(long, env = "CUSTOS_LISTEN")]
        listen: Option<std::net::SocketAddr>,
        /// Public base URL used in links.
        #[arg(long, env = "CUSTOS_BASE_URL")]
        base_url: Option<String>,
        /// TLS certificate chain (PEM).
        #[arg(long, env = "CUSTOS_TLS_CERT", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// TLS private key (PEM).
        #[arg(long, env = "CUSTOS_TLS_KEY", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Largest request body in bytes (default 16 MiB).
        #[arg(long, env = "CUSTOS_MAX_BODY")]
        max_body: Option<usize>,
    },
    /// Start an embedded server on a fresh data dir, load synthetic patients, and show it working.
    Demo {
        /// Data directory (default: a new temporary directory).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long, default_value_t = 25)]
        patients: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Keep serving after the demo (Ctrl-C to stop).
        #[arg(long)]
        keep_running: bool,
    },
    /// Write synthetic transaction Bundles (one JSON document per line).
    Synth {
        #[arg(long, default_value_t = 10)]
        patients: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Output file (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Only Patient resources (for large search data sets).
        #[arg(long)]
        demographics_only: bool,
    },
    /// Key management.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Patient-level operations.
    Patient {
        #[command(subcommand)]
        action: PatientAction,
    },
    /// User accounts: add, list, lock, unlock, set-role, revoke, read-only.
    User {
        #[command(subcommand)]
        action: admin::UserAction,
    },
    /// OAuth clients: SMART Backend Services and SMART apps.
    Client {
        #[command(subcommand)]
        action: admin::ClientAction,
    },
    /// Switch the whole server (every node) to read-only (`on`) or back (`off`).
    ReadOnly {
        #[command(flatten)]
        data: DataArgs,
        /// on or off
        state: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Sign in to a running server (password from CUSTOS_PASSWORD or a prompt, plus a TOTP code); prints the token.
    Login {
        /// The server's base URL.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        #[arg(long)]
        username: String,
        /// The current code of the authenticator app.
        #[arg(long)]
        totp: Option<String>,
        #[arg(long, default_value = "user/*.cruds offline_access")]
        scope: String,
        /// Launch patient for patient/ scopes.
        #[arg(long)]
        patient: Option<String>,
    },
    /// The audit trail: verify, export, checkpoint, public key.
    Audit {
        #[command(subcommand)]
        action: audit_cmd::AuditAction,
    },
    /// Measure ingest, reads, searches and the cost of sealing on this machine.
    Bench(bench::BenchArgs),
    /// Run a simulated hospital with labelled attacks against detection and print a scorecard.
    Simulate(simulate::SimulateArgs),
    /// Work the alert cases of a running server (security officer).
    Alerts {
        #[command(subcommand)]
        action: admin::AlertsAction,
    },
}

#[derive(Subcommand)]
enum KeysAction {
    /// Re-wrap every data key under a new key-encryption key (online; the server may keep running).
    Rotate {
        #[command(flatten)]
        data: DataArgs,
        /// Keep the retired KEK in the key file (default: remove it once nothing uses it).
        #[arg(long)]
        keep_retired: bool,
    },
    /// Show the KEKs and how many data keys each wraps.
    Status {
        #[command(flatten)]
        data: DataArgs,
    },
    /// Start signing access tokens with a new key (the old one keeps verifying until its tokens expire).
    RotateSigning {
        #[command(flatten)]
        data: DataArgs,
    },
}

#[derive(Subcommand)]
enum PatientAction {
    /// Crypto-shred a patient: erase their data key so every version of every record in their compartment becomes unreadable.
    Shred {
        #[command(flatten)]
        data: DataArgs,
        /// The Patient id.
        id: String,
        /// Confirm the irreversible erasure.
        #[arg(long)]
        yes: bool,
    },
}

/// `mi_option_purge_delay` in mimalloc's `mi_option_e` (the same index in its v2 and v3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() {
    // Return freed memory to the OS only after it stayed unused for a second:
    // with mimalloc's 10 ms default, request bursts kept re-faulting fresh
    // zeroed pages (about a tenth of ingest CPU in the profile).
    // SAFETY: sets a process-wide allocator option before any threads start.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 1000) };
    // Before anything opens SQLite.
    let sqlite_malloc = sqlite_malloc::install();
    let cli = Cli::parse();
    // The demo and the benchmark print their own story; keep the log to warnings there.
    let default_filter = match cli.command {
        // (Alerts and break-the-glass grants are shown by the story itself.)
        Command::Demo { .. } | Command::Bench(_) | Command::Simulate(_) => {
            "warn,custos_detect=error,custos_auth::policy=error,custos_auth::service=error"
        }
        // The NATS client reports every reconnection attempt at info; the
        // audit stream logs its outages itself, once each.
        _ => "info,async_nats=warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CUSTOS_LOG")
        .unwrap_or_else(|_| default_filter.into());
    // `CUSTOS_LOG_FORMAT=json`: one JSON object per line, for log shippers and SIEMs.
    let log = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("CUSTOS_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        log.json().init();
    } else {
        log.init();
    }
    if let Err(e) = sqlite_malloc {
        tracing::warn!("SQLite keeps its own allocator: {e:#}");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(run(cli)) {
        eprintln!("custos: error: {}", one_line(&e));
        std::process::exit(1);
    }
}

fn one_line(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

/// The resolved settings of one data directory.
pub struct Opened {
    pub records: Records,
    pub store: Arc<dyn Store>,
    pub file: FileConfig,
    pub data_dir: PathBuf,
}

/// The public base URL: configured, or derived from the listen address.
pub fn issuer(file: &FileConfig, bound: Option<std::net::SocketAddr>) -> String {
    if let Some(b) = &file.base_url {
        return b.trim_end_matches('/').to_string();
    }
    let addr = bound
        .or(file.listen)
        .unwrap_or_else(|| ServerConfig::default().listen);
    let scheme = if file.tls.is_some() { "https" } else { "http" };
    format!("{scheme}://{addr}")
}

pub fn resolve(data: &DataArgs) -> anyhow::Result<(FileConfig, PathBuf)> {
    let file = match &data.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let dir = data
        .data_dir
        .clone()
        .or_else(|| file.data_dir.clone())
        .unwrap_or_else(|| PathBuf::from("./data"));
    Ok((file, dir))
}

pub fn key_file(dir: &Path) -> PathBuf {
    dir.join("keys.json")
}

fn kek_provider(dir: &Path) -> anyhow::Result<Arc<dyn KekProvider>> {
    if std::env::var_os("CUSTOS_KEK").is_some() {
        return Ok(Arc::new(EnvKekProvider::from_env("CUSTOS_KEK")?));
    }
    let path = key_file(dir);
    if !path.exists() {
        bail!(
            "no key file at {}; run `custos init --data-dir {}` first (or set CUSTOS_KEK)",
            path.display(),
            dir.display()
        );
    }
    Ok(Arc::new(FileKekProvider::open(&path)?))
}

/// Open the configured store: PostgreSQL when a `postgres://` URL is set
/// (`[storage] url` or `CUSTOS_DATABASE_URL`), else the data dir's SQLite
/// file. Pending schema migrations are applied.
pub async fn open_store(file: &FileConfig, dir: &Path) -> anyhow::Result<Arc<dyn Store>> {
    let storage = file.storage.as_ref();
    if let Some(url) = config::StorageConfig::database_url(storage) {
        if !custos_store::is_postgres_url(&url) {
            bail!("storage.url must be a postgres:// URL (the embedded default needs no URL)");
        }
        let mut pc = custos_store::PostgresConfig::new(url);
        if let Some(s) = storage {
            pc.schema = s.schema.clone();
            if let Some(n) = s.pool_size {
                pc.pool_size = n;
            }
            if let Some(t) = s.statement_timeout_secs {
                pc.statement_timeout = std::time::Duration::from_secs(t.max(1));
            }
            pc.ca_file = s.ca_file.clone();
        }
        let store = tokio::task::spawn_blocking(move || custos_store::PostgresStore::open(pc))
            .await
            .context("the database task failed")?
            .map_err(|e| anyhow::anyhow!("cannot open the database: {e}"))?;
        return Ok(Arc::new(store));
    }
    let mut sc = SqliteConfig::new(dir.join("custos.db"));
    if let Some(s) = storage {
        if let Some(sync) = &s.synchronous {
            sc.synchronous = config::synchronous(sync)?;
        }
        if let Some(c) = s.cache_mib {
            sc.cache_mib = c;
        }
        if let Some(us) = s.commit_delay_us {
            sc.commit_delay = config::commit_delay(us)?;
        }
    }
    Ok(Arc::new(
        SqliteStore::open(sc).context("cannot open the database")?,
    ))
}

/// Open a data directory's store and record service.
pub async fn open_data(
    file: FileConfig,
    dir: PathBuf,
    sealer: Arc<dyn Sealer>,
) -> anyhow::Result<Opened> {
    if !dir.is_dir() {
        bail!(
            "data directory {} does not exist; run `custos init` first",
            dir.display()
        );
    }
    let provider = kek_provider(&dir)?;
    let store = open_store(&file, &dir).await?;
    let mut rc = RecordsConfig::default();
    if let Some(n) = file.storage.as_ref().and_then(|s| s.key_cache) {
        rc.key_cache = config::key_cache(n)?;
    }
    if let Some(s) = &file.search {
        rc.default_count = s.default_count.unwrap_or(rc.default_count);
        rc.max_count = s.max_count.unwrap_or(rc.max_count);
        rc.total_cap = s.total_cap.unwrap_or(rc.total_cap);
    }
    let records = Records::open(store.clone(), provider, sealer, rc)
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    Ok(Opened {
        records,
        store,
        file,
        data_dir: dir,
    })
}

/// Create a data directory with key material.
pub fn init_dir(dir: &Path, dev_tls: bool) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let kf = key_file(dir);
    if kf.exists() {
        bail!(
            "{} already exists; refusing to overwrite key material",
            kf.display()
        );
    }
    FileKekProvider::create(&kf)?;
    if dev_tls {
        let tls = dir.join("tls");
        std::fs::create_dir_all(&tls)?;
        let cert =
            rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])?;
        std::fs::write(tls.join("cert.pem"), cert.cert.pem())?;
        write_private(
            &tls.join("key.pem"),
            cert.signing_key.serialize_pem().as_bytes(),
        )?;
    }
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes)?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init { data, dev_tls } => {
            let (_, dir) = resolve(&data)?;
            init_dir(&dir, dev_tls)?;
            println!(
                "initialized {} (key file {}, mode 0600)",
                dir.display(),
                key_file(&dir).display()
            );
            if dev_tls {
                println!(
                    "self-signed TLS pair in {}/tls (development only)",
                    dir.display()
                );
            }
        }
        Command::Migrate { data } => {
            let (file, dir) = resolve(&data)?;
            let store = open_store(&file, &dir).await?;
            println!("{}", store.describe());
            let applied = store
                .migrations()
                .await
                .map_err(|e| anyhow::anyhow!("cannot read the schema version: {e}"))?;
            for (version, name) in &applied {
                println!("  migration {version}: {name}");
            }
            println!(
                "schema is current (version {})",
                applied.last().map(|m| m.0).unwrap_or(0)
            );
            store.close();
        }
        Command::Serve {
            data,
            listen,
            base_url,
            tls_cert,
            tls_key,
            max_body,
        } => {
            let (file, dir) = resolve(&data)?;
            let mut sc = ServerConfig::default();
            sc.listen = listen.or(file.listen).unwrap_or(sc.listen);
            sc.base_url = base_url.or_else(|| file.base_url.clone());
            sc.max_body = max_body.or(file.max_body_bytes).unwrap_or(sc.max_body);
            sc.tls = match (tls_cert, tls_key, &file.tls) {
                (Some(c), Some(k), _) => Some((c, k)),
                (_, _, Some(t)) => Some((t.cert.clone(), t.key.clone())),
                _ => None,
            };
            let tls = sc.tls.is_some();
            let listener = std::net::TcpListener::bind(sc.listen)
                .with_context(|| format!("cannot listen on {}", sc.listen))?;
            let addr = listener.local_addr()?;
            let scheme = if tls { "https" } else { "http" };
            if sc.base_url.is_none() && addr.ip().is_unspecified() {
                bail!(
                    "listening on {addr} needs --base-url (CUSTOS_BASE_URL): tokens name the server's public address"
                );
            }
            let issuer = sc
                .base_url
                .clone()
                .map(|b| b.trim_end_matches('/').to_string())
                .unwrap_or_else(|| format!("{scheme}://{addr}"));
            let auth_config = file.auth.clone().unwrap_or_default();
            let audit_config = file.audit.clone().unwrap_or_default();
            let detect_config = file.detect.clone().unwrap_or_default();
            let stream_config = config::stream_settings(
                file.stream.clone(),
                std::env::var("CUSTOS_NATS_URL").ok(),
            )?;
            let opened = open_data(file, dir, Arc::new(GcmSealer)).await?;
            let trail = custos_audit::AuditTrail::open(&opened.records, audit_config)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            // One node of those sharing the store leads (signs checkpoints,
            // runs detection); every node campaigns, so a dead leader is
            // replaced within about a second.
            trail.lead().await;
            trail.spawn_campaign();
            let auth = Arc::new(
                custos_auth::AuthService::open(
                    &opened.records,
                    auth_config,
                    &issuer,
                    trail.clone(),
                )
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?,
            );
            audit_cmd::record_command(
                &trail,
                custos_audit::EventKind::Config,
                "serve-start",
                Some(format!("listening on {scheme}://{addr}")),
                true,
            )
            .await?;
            // Detection runs where leadership is (see `leader`); every node
            // answers the alert API.
            let detection = if detect_config.enabled {
                Some(
                    custos_detect::Detection::passive(
                        opened.records.clone(),
                        auth.clone(),
                        detect_config,
                    )
                    .await
                    .map_err(|e| anyhow::anyhow!("threat detection: {e}"))?,
                )
            } else {
                None
            };
            let duties =
                leader::Duties::follow(trail.clone(), detection.clone(), stream_config.clone())
                    .await;
            let state = custos_server::AppState::new(custos_server::AppStateInner {
                records: opened.records.clone(),
                access: custos_server::Access::Enforced(auth.clone()),
                audit: Some(trail.clone()),
                detection: detection.clone(),
                config: Arc::new(sc),
                ops: Default::default(),
            });
            tracing::info!(%addr, tls, issuer, "custos listening");
            println!("custos listening on {scheme}://{addr}");
            custos_server::serve(listener, state, shutdown_signal()).await?;
            duties.stop_detection().await;
            audit_cmd::record_command(
                &trail,
                custos_audit::EventKind::Config,
                "serve-stop",
                None,
                true,
            )
            .await?;
            // Last, so the stream gets the serve-stop event too.
            duties.stop_publisher().await;
            if let Err(e) = trail.checkpoint().await {
                tracing::error!(error = %e, "the final audit checkpoint failed");
            }
            trail.close().await;
            opened.store.close();
        }
        Command::Demo {
            data_dir,
            patients,
            seed,
            keep_running,
        } => demo::run(data_dir, patients, seed, keep_running).await?,
        Command::Synth {
            patients,
            seed,
            out,
            demographics_only,
        } => synth(patients, seed, out, demographics_only)?,
        Command::Keys {
            action: KeysAction::Rotate { data, keep_retired },
        } => rotate(&data, keep_retired).await?,
        Command::Keys {
            action: KeysAction::Status { data },
        } => {
            let (file, dir) = resolve(&data)?;
            let opened = open_data(file, dir.clone(), Arc::new(GcmSealer)).await?;
            let counts = opened.records.store().as_ref().read_key_counts().await?;
            if let Ok(f) = FileKekProvider::open(&key_file(&dir)) {
                for (id, state) in f.list() {
                    let n = counts
                        .iter()
                        .find(|(k, _)| *k == id)
                        .map(|(_, n)| *n)
                        .unwrap_or(0);
                    println!("{id}  {state:?}  wraps {n} data keys");
                }
            } else {
                for (id, n) in counts {
                    println!("{id}  wraps {n} data keys");
                }
            }
        }
        Command::Patient {
            action: PatientAction::Shred { data, id, yes },
        } => {
            if !yes {
                bail!("crypto-shredding is irreversible; repeat with --yes to erase Patient/{id}");
            }
            let (opened, trail) = audit_cmd::open_trail(&data).await?;
            let mut template = custos_audit::AuditRecord {
                action: "cli:patient-shred".into(),
                ..Default::default()
            };
            template.agent.username = std::env::var("USER").ok();
            let n = opened
                .records
                .audited(trail.for_writes(template, None))
                .shred_patient(&id)
                .await
                .map_err(|e| anyhow::anyhow!("{}", e.message))?;
            let _ = trail.checkpoint().await;
            opened.store.close();
            println!(
                "erased Patient/{id}: its data key is destroyed; {n} resources (every version) are now unreadable"
            );
        }
        Command::Keys {
            action: KeysAction::RotateSigning { data },
        } => {
            let (opened, auth) = admin::open_auth(&data).await?;
            let kid = auth
                .rotate_signing_key()
                .await
                .map_err(|e| anyhow::anyhow!("{e}"));
            let _ = auth.audit().checkpoint().await;
            opened.store.close();
            println!("access tokens are now signed with key {}", kid?);
        }
        Command::User { action } => admin::user(action).await?,
        Command::Client { action } => admin::client(action).await?,
        Command::ReadOnly {
            data,
            state,
            reason,
        } => admin::server_read_only(data, state, reason).await?,
        Command::Login {
            url,
            username,
            totp,
            scope,
            patient,
        } => admin::login(url, username, totp, scope, patient).await?,
        Command::Audit { action } => audit_cmd::run(action).await?,
        Command::Bench(args) => bench::run(args).await?,
        Command::Simulate(args) => simulate::run(args).await?,
        Command::Alerts { action } => admin::alerts(action).await?,
    }
    Ok(())
}

/// Small typed reads used by the CLI.
#[async_trait::async_trait]
trait StoreReads {
    async fn read_key_counts(&self) -> anyhow::Result<Vec<(String, u64)>>;
}

#[async_trait::async_trait]
impl StoreReads for dyn Store {
    async fn read_key_counts(&self) -> anyhow::Result<Vec<(String, u64)>> {
        use custos_store::StoreExt;
        Ok(self.read(|tx| tx.data_key_counts()).await?)
    }
}

async fn rotate(data: &DataArgs, keep_retired: bool) -> anyhow::Result<()> {
    let (file, dir) = resolve(data)?;
    if std::env::var_os("CUSTOS_KEK").is_some() {
        bail!(
            "keys rotate works on a key file; with CUSTOS_KEK, put the new KEK first in the variable and run `custos keys rotate` against a key file, or re-deploy"
        );
    }
    let kf = FileKekProvider::open(&key_file(&dir))?;
    let new_id = kf.add_primary()?;
    let retired: Vec<String> = kf
        .list()
        .into_iter()
        .filter(|(id, _)| *id != new_id)
        .map(|(id, _)| id)
        .collect();
    let opened = open_data(file, dir.clone(), Arc::new(GcmSealer)).await?;
    let total: u64 = opened
        .records
        .store()
        .as_ref()
        .read_key_counts()
        .await?
        .iter()
        .map(|(_, n)| n)
        .sum();
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "re-wrapping data keys {bar:40} {pos}/{len} ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    loop {
        let n = opened
            .records
            .keys()
            .rewrap_batch(opened.records.store(), 500)
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        if n == 0 {
            break;
        }
        bar.inc(n as u64);
    }
    bar.finish();
    let counts = opened.records.store().as_ref().read_key_counts().await?;
    let still: Vec<&String> = counts
        .iter()
        .filter(|(id, n)| *id != new_id && *n > 0)
        .map(|(id, _)| id)
        .collect();
    if !still.is_empty() {
        bail!("some data keys are still wrapped under retired KEKs; run rotate again");
    }
    if !keep_retired {
        kf.remove_retired(&retired)?;
    }
    let trail = custos_audit::AuditTrail::open(
        &opened.records,
        custos_audit::AuditConfig {
            checkpoint_secs: 0,
            ..opened.file.audit.clone().unwrap_or_default()
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    audit_cmd::record_command(
        &trail,
        custos_audit::EventKind::KeyRotation,
        "kek-rotate",
        Some(format!(
            "every data key re-wrapped under KEK {new_id}; retired: {}{}",
            retired.join(", "),
            if keep_retired {
                " (kept)"
            } else {
                " (removed)"
            }
        )),
        true,
    )
    .await?;
    if let Err(e) = trail.checkpoint().await {
        tracing::error!(error = %e, "the audit checkpoint failed");
    }
    opened.store.close();
    println!(
        "rotation complete: every data key is wrapped under {new_id}{}",
        if keep_retired {
            "; retired KEKs kept"
        } else {
            "; retired KEKs removed"
        }
    );
    Ok(())
}

fn synth(
    patients: usize,
    seed: u64,
    out: Option<PathBuf>,
    demographics_only: bool,
) -> anyhow::Result<()> {
    use std::io::Write;
    let detail = if demographics_only {
        custos_synth::Detail::DemographicsOnly
    } else {
        custos_synth::Detail::Full
    };
    let s = custos_synth::Synth::new(custos_synth::SynthConfig {
        patients,
        seed,
        detail,
    });
    let mut w: Box<dyn Write> = match out {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(&p).with_context(|| format!("cannot create {}", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    serde_json::to_writer(&mut w, &s.directory_bundle())?;
    writeln!(w)?;
    for i in 0..patients {
        serde_json::to_writer(&mut w, &s.patient(i).0)?;
        writeln!(w)?;
    }
    w.flush()?;
    Ok(())
}
