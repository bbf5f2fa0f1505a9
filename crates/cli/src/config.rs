//! Configuration: a TOML file, overridden by environment variables and flags.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

/// The TOML configuration file (every key optional).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub base_url: Option<String>,
    pub max_body_bytes: Option<usize>,
    pub tls: Option<TlsConfig>,
    pub storage: Option<StorageConfig>,
    pub search: Option<SearchConfig>,
    /// Identity, tokens and the access policy.
    pub auth: Option<custos_auth::AuthConfig>,
    /// The audit trail: checkpoint interval, witnesses.
    pub audit: Option<custos_audit::AuditConfig>,
    /// Threat detection: thresholds, baselines, responses, the webhook.
    pub detect: Option<custos_detect::DetectConfig>,
    /// The audit stream on NATS JetStream (several nodes; absent: the
    /// embedded default, detection reads the local log).
    pub stream: Option<custos_stream::StreamConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// A `postgres://` URL selects the PostgreSQL backend (environment:
    /// `CUSTOS_DATABASE_URL`); absent, the embedded SQLite file in the data dir.
    pub url: Option<String>,
    /// SQLite: `full` (default) or `normal`.
    pub synchronous: Option<String>,
    /// SQLite: page cache in MiB.
    pub cache_mib: Option<u32>,
    /// SQLite: under concurrent writes, how long after a commit the next
    /// one waits for more jobs, in microseconds (default 1,500; 0: never).
    pub commit_delay_us: Option<u64>,
    /// Data keys kept unwrapped in memory, one per patient compartment
    /// (default 65,536); a read outside the cache unwraps its key again.
    pub key_cache: Option<usize>,
    /// PostgreSQL: a schema for the tables (default `public`).
    pub schema: Option<String>,
    /// PostgreSQL: read connections per node (default 16).
    pub pool_size: Option<u32>,
    /// PostgreSQL: statements running longer are cancelled (default 30).
    pub statement_timeout_secs: Option<u64>,
    /// PostgreSQL: CA certificates (PEM) for `sslmode=require` (default: the Mozilla roots).
    pub ca_file: Option<PathBuf>,
}

impl StorageConfig {
    /// The database URL in force: `CUSTOS_DATABASE_URL`, else `url`.
    pub fn database_url(this: Option<&StorageConfig>) -> Option<String> {
        std::env::var("CUSTOS_DATABASE_URL")
            .ok()
            .filter(|u| !u.is_empty())
            .or_else(|| this.and_then(|s| s.url.clone()))
    }
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchConfig {
    pub default_count: Option<usize>,
    pub max_count: Option<usize>,
    pub total_cap: Option<u64>,
}

impl FileConfig {
    /// Read a config file; a missing file given explicitly is an error.
    pub fn load(path: &Path) -> anyhow::Result<FileConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "invalid config file {}: {}",
                path.display(),
                toml_error_line(&text, &e)
            )
        })
    }
}

/// A TOML error on one line: where, then what (its own display draws the
/// line with a caret over several lines).
fn toml_error_line(text: &str, e: &toml::de::Error) -> String {
    let what = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            // A byte offset; never sliced off a character boundary.
            let mut start = span.start.min(text.len());
            while !text.is_char_boundary(start) {
                start -= 1;
            }
            let before = &text[..start];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: {what}")
        }
        None => what,
    }
}

/// The audit stream's settings: the `[stream]` table, with `CUSTOS_NATS_URL`
/// (`env_url`) overriding its `nats_url` (and enough alone to turn the
/// stream on, with the defaults). `None`: no stream.
pub fn stream_settings(
    file: Option<custos_stream::StreamConfig>,
    env_url: Option<String>,
) -> anyhow::Result<Option<custos_stream::StreamConfig>> {
    let env_url = env_url.filter(|u| !u.trim().is_empty());
    if file.is_none() && env_url.is_none() {
        return Ok(None);
    }
    let mut c = file.unwrap_or_default();
    if let Some(url) = env_url {
        c.nats_url = url;
    }
    c.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Some(c))
}

/// Parse `full` / `normal`.
pub fn synchronous(s: &str) -> anyhow::Result<custos_store::Synchronous> {
    match s.to_ascii_lowercase().as_str() {
        "full" => Ok(custos_store::Synchronous::Full),
        "normal" => Ok(custos_store::Synchronous::Normal),
        other => bail!("storage.synchronous must be 'full' or 'normal', not '{other}'"),
    }
}

/// `storage.commit_delay_us`, at most 100 ms (a larger delay would only
/// hold every request back).
pub fn commit_delay(us: u64) -> anyhow::Result<std::time::Duration> {
    if us > 100_000 {
        bail!("storage.commit_delay_us must be at most 100000 (100 ms), not {us}");
    }
    Ok(std::time::Duration::from_micros(us))
}

/// `storage.key_cache`: from 1 to 16,777,216 keys (a few hundred bytes
/// each, unwrapped key material: no more than the patients served).
pub fn key_cache(n: usize) -> anyhow::Result<usize> {
    if !(1..=KEY_CACHE_MAX).contains(&n) {
        bail!("storage.key_cache must be from 1 to {KEY_CACHE_MAX}, not {n}");
    }
    Ok(n)
}

const KEY_CACHE_MAX: usize = 1 << 24;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_cache_is_bounded() {
        assert_eq!(key_cache(1).unwrap(), 1);
        assert_eq!(key_cache(250_000).unwrap(), 250_000);
        for bad in [0, KEY_CACHE_MAX + 1] {
            let e = key_cache(bad).unwrap_err().to_string();
            assert!(e.contains("storage.key_cache must be from 1"), "{e}");
        }
        let file: FileConfig = toml::from_str("[storage]\nkey_cache = 200000\n").unwrap();
        assert_eq!(file.storage.unwrap().key_cache, Some(200_000));
    }

    #[test]
    fn a_bad_config_file_is_reported_on_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("custos.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:8080\"\n[storage]\n  keycache = 1\n",
        )
        .unwrap();
        let e = format!("{:#}", FileConfig::load(&path).unwrap_err());
        assert!(!e.contains('\n'), "{e}");
        assert!(
            e.contains("line 3, column 3: unknown field `keycache`"),
            "{e}"
        );
        std::fs::write(&path, "listen = \n").unwrap();
        let e = format!("{:#}", FileConfig::load(&path).unwrap_err());
        assert!(!e.contains('\n') && e.contains("line 1"), "{e}");
    }

    #[test]
    fn the_commit_delay_is_bounded() {
        assert_eq!(commit_delay(0).unwrap(), std::time::Duration::ZERO);
        assert_eq!(commit_delay(1500).unwrap().as_micros(), 1500);
        let e = commit_delay(100_001).unwrap_err().to_string();
        assert!(e.contains("at most 100000"), "{e}");
    }

    #[test]
    fn the_stream_is_on_with_a_table_or_the_environment() {
        assert!(stream_settings(None, None).unwrap().is_none());
        assert!(stream_settings(None, Some(" ".into())).unwrap().is_none());
        let on = stream_settings(None, Some("nats://127.0.0.1:4222".into()))
            .unwrap()
            .unwrap();
        assert_eq!(on.stream, "CUSTOS_AUDIT");
        let file: FileConfig =
            toml::from_str("[stream]\nnats_url = \"nats://a:4222\"\nconsumer = \"c\"\n").unwrap();
        let c = stream_settings(file.stream.clone(), Some("nats://b:4222".into()))
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.nats_url.as_str(), c.consumer.as_str()),
            ("nats://b:4222", "c")
        );
        let e = stream_settings(Some(Default::default()), None).unwrap_err();
        assert!(e.to_string().contains("nats_url"), "{e}");
    }
}
