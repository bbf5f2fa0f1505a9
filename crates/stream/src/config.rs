//! Settings of the audit stream (`[stream]` in the TOML file) and the NATS
//! connection they describe.
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::StreamError;

/// Settings of the audit stream: where NATS is, which JetStream stream,
/// subject and durable consumer carry the audit events, and how to
/// authenticate. Its `Debug` hides the URL (it may carry credentials), the
/// token and the password.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct StreamConfig {
    /// The NATS server(s): `nats://host:4222`, `tls://host:4222`, or several
    /// separated by commas. Credentials in the URL are never logged.
    pub nats_url: String,
    /// The JetStream stream's name (default `CUSTOS_AUDIT`).
    pub stream: String,
    /// The subject audit events are published on (default `custos.audit`).
    pub subject: String,
    /// The durable consumer detection reads with (default `custos-detect`).
    pub consumer: String,
    /// Replicas of the stream in a JetStream cluster (1–5, default 1).
    pub replicas: usize,
    /// JetStream's de-duplication window in seconds (default 120): a
    /// republished audit index within it is stored once.
    pub duplicate_window_secs: u64,
    /// Seconds the server waits for an acknowledgement before it delivers
    /// again (default 300). Detection acknowledges after each save of its
    /// cursor (every `6 × detect.save_secs`), so keep it well above that.
    pub ack_wait_secs: u64,
    /// A NATS credentials file (JWT and NKey seed).
    pub credentials_file: Option<PathBuf>,
    /// A token (`auth_token` on the server).
    pub token: Option<String>,
    /// A user name, with `password`.
    pub user: Option<String>,
    /// The password of `user`.
    pub password: Option<String>,
    /// Require TLS even for `nats://` URLs.
    pub tls_required: bool,
    /// PEM file of the CA(s) that sign the server's certificate (instead of
    /// the system's roots).
    pub tls_ca_file: Option<PathBuf>,
    /// PEM file of a client certificate (mutual TLS), with `tls_client_key`.
    pub tls_client_cert: Option<PathBuf>,
    /// PEM file of the client certificate's key.
    pub tls_client_key: Option<PathBuf>,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            nats_url: String::new(),
            stream: "CUSTOS_AUDIT".into(),
            subject: "custos.audit".into(),
            consumer: "custos-detect".into(),
            replicas: 1,
            duplicate_window_secs: 120,
            ack_wait_secs: 300,
            credentials_file: None,
            token: None,
            user: None,
            password: None,
            tls_required: false,
            tls_ca_file: None,
            tls_client_cert: None,
            tls_client_key: None,
        }
    }
}

impl std::fmt::Debug for StreamConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |set: bool| if set { "<hidden>" } else { "<unset>" };
        f.debug_struct("StreamConfig")
            .field("nats_url", &hidden(!self.nats_url.is_empty()))
            .field("stream", &self.stream)
            .field("subject", &self.subject)
            .field("consumer", &self.consumer)
            .field("replicas", &self.replicas)
            .field("duplicate_window_secs", &self.duplicate_window_secs)
            .field("ack_wait_secs", &self.ack_wait_secs)
            .field("credentials_file", &self.credentials_file)
            .field("token", &hidden(self.token.is_some()))
            .field("user", &self.user)
            .field("password", &hidden(self.password.is_some()))
            .field("tls_required", &self.tls_required)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_client_cert", &self.tls_client_cert)
            .field("tls_client_key", &self.tls_client_key)
            .finish()
    }
}

/// A stream or consumer name: no whitespace, dots, wildcards or path
/// separators (JetStream's rule), at most 255 characters.
fn check_name(what: &str, name: &str) -> Result<(), StreamError> {
    if name.is_empty() {
        return Err(StreamError::Config(format!(
            "stream.{what} must not be empty"
        )));
    }
    if name.len() > 255 {
        return Err(StreamError::Config(format!(
            "stream.{what} is longer than 255 characters"
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
    {
        return Err(StreamError::Config(format!(
            "stream.{what} '{name}' must not contain {c:?} (no whitespace, '.', '*', '>', '/' or '\\\\')"
        )));
    }
    Ok(())
}

/// A literal subject: dot-separated non-empty tokens, no wildcards.
fn check_subject(subject: &str) -> Result<(), StreamError> {
    if subject.is_empty() {
        return Err(StreamError::Config(
            "stream.subject must not be empty".into(),
        ));
    }
    for token in subject.split('.') {
        if token.is_empty() {
            return Err(StreamError::Config(format!(
                "stream.subject '{subject}' has an empty token (leading, trailing or double '.')"
            )));
        }
        if token == "*" || token == ">" || token.contains(char::is_whitespace) {
            return Err(StreamError::Config(format!(
                "stream.subject '{subject}' must be a literal subject (no wildcards or whitespace)"
            )));
        }
    }
    Ok(())
}

impl StreamConfig {
    /// Check every setting; the error names the first bad one.
    pub fn validate(&self) -> Result<(), StreamError> {
        self.servers()?;
        check_name("stream", &self.stream)?;
        check_name("consumer", &self.consumer)?;
        check_subject(&self.subject)?;
        if self.subject.starts_with("$JS.") || self.subject.starts_with("_INBOX.") {
            return Err(StreamError::Config(format!(
                "stream.subject '{}' is reserved by NATS",
                self.subject
            )));
        }
        if !(1..=5).contains(&self.replicas) {
            return Err(StreamError::Config(format!(
                "stream.replicas must be 1 to 5, not {}",
                self.replicas
            )));
        }
        if !(1..=86_400).contains(&self.duplicate_window_secs) {
            return Err(StreamError::Config(format!(
                "stream.duplicate_window_secs must be 1 to 86400, not {}",
                self.duplicate_window_secs
            )));
        }
        if !(5..=86_400).contains(&self.ack_wait_secs) {
            return Err(StreamError::Config(format!(
                "stream.ack_wait_secs must be 5 to 86400, not {}",
                self.ack_wait_secs
            )));
        }
        let methods = [
            self.credentials_file.is_some(),
            self.token.is_some(),
            self.user.is_some(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            return Err(StreamError::Config(
                "stream: give one of credentials_file, token or user/password".into(),
            ));
        }
        if self.user.is_some() != self.password.is_some() {
            return Err(StreamError::Config(
                "stream.user and stream.password go together".into(),
            ));
        }
        if self.tls_client_cert.is_some() != self.tls_client_key.is_some() {
            return Err(StreamError::Config(
                "stream.tls_client_cert and stream.tls_client_key go together".into(),
            ));
        }
        for (what, path) in [
            ("credentials_file", &self.credentials_file),
            ("tls_ca_file", &self.tls_ca_file),
            ("tls_client_cert", &self.tls_client_cert),
            ("tls_client_key", &self.tls_client_key),
        ] {
            if let Some(p) = path
                && !p.is_file()
            {
                return Err(StreamError::Config(format!(
                    "stream.{what}: {} is not a readable file",
                    p.display()
                )));
            }
        }
        Ok(())
    }

    /// The server addresses of `nats_url`.
    fn servers(&self) -> Result<Vec<async_nats::ServerAddr>, StreamError> {
        let url = self.nats_url.trim();
        if url.is_empty() {
            return Err(StreamError::Config(
                "stream.nats_url is not set (or set CUSTOS_NATS_URL), e.g. nats://127.0.0.1:4222"
                    .into(),
            ));
        }
        url.split(',')
            .map(|one| {
                let one = one.trim();
                one.parse::<async_nats::ServerAddr>().map_err(|_| {
                    // The URL may carry credentials: name only its position.
                    StreamError::Config(
                        "stream.nats_url is not a NATS URL (nats://host:port, tls://host:port, comma-separated)"
                            .into(),
                    )
                })
            })
            .collect()
    }

    pub(crate) fn duplicate_window(&self) -> Duration {
        Duration::from_secs(self.duplicate_window_secs)
    }

    pub(crate) fn ack_wait(&self) -> Duration {
        Duration::from_secs(self.ack_wait_secs)
    }

    /// Connect to NATS. Returns at once: the client connects (and later
    /// reconnects) in the background, so an unreachable server delays
    /// nothing but the stream. Fails only on bad settings (a credentials
    /// file that does not load).
    pub(crate) async fn connect(&self, name: &str) -> Result<async_nats::Client, StreamError> {
        self.validate()?;
        let mut opts = async_nats::ConnectOptions::new()
            .name(name)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(5))
            .ping_interval(Duration::from_secs(10))
            // No callback spam: outages are logged once by the publisher and
            // the pipeline.
            .event_callback(|_| async {});
        if let Some(path) = &self.credentials_file {
            opts = opts.credentials_file(path).await.map_err(|e| {
                StreamError::Config(format!(
                    "stream.credentials_file {} does not load: {e}",
                    path.display()
                ))
            })?;
        }
        if let Some(token) = &self.token {
            opts = opts.token(token.clone());
        }
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            opts = opts.user_and_password(user.clone(), password.clone());
        }
        if self.tls_required {
            opts = opts.require_tls(true);
        }
        if let Some(ca) = &self.tls_ca_file {
            opts = opts.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&self.tls_client_cert, &self.tls_client_key) {
            opts = opts.add_client_certificate(cert.clone(), key.clone());
        }
        opts.connect(self.servers()?)
            .await
            .map_err(|e| StreamError::Nats(format!("cannot start the NATS client: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_url() -> StreamConfig {
        StreamConfig {
            nats_url: "nats://127.0.0.1:4222".into(),
            ..StreamConfig::default()
        }
    }

    #[test]
    fn defaults_validate_once_a_url_is_set() {
        assert!(StreamConfig::default().validate().is_err());
        with_url().validate().unwrap();
        let two = StreamConfig {
            nats_url: "nats://a:4222, tls://b:4222".into(),
            ..StreamConfig::default()
        };
        two.validate().unwrap();
    }

    #[test]
    fn bad_settings_are_one_line_errors() {
        let cases: Vec<(StreamConfig, &str)> = vec![
            (
                StreamConfig {
                    nats_url: "http://[bad".into(),
                    ..with_url()
                },
                "nats_url",
            ),
            (
                StreamConfig {
                    stream: "CUSTOS.AUDIT".into(),
                    ..with_url()
                },
                "stream.stream",
            ),
            (
                StreamConfig {
                    consumer: "a b".into(),
                    ..with_url()
                },
                "stream.consumer",
            ),
            (
                StreamConfig {
                    subject: "custos.*".into(),
                    ..with_url()
                },
                "literal subject",
            ),
            (
                StreamConfig {
                    subject: "custos..audit".into(),
                    ..with_url()
                },
                "empty token",
            ),
            (
                StreamConfig {
                    replicas: 0,
                    ..with_url()
                },
                "replicas",
            ),
            (
                StreamConfig {
                    user: Some("u".into()),
                    ..with_url()
                },
                "go together",
            ),
            (
                StreamConfig {
                    token: Some("t".into()),
                    user: Some("u".into()),
                    password: Some("p".into()),
                    ..with_url()
                },
                "one of",
            ),
            (
                StreamConfig {
                    tls_ca_file: Some("/no/such/ca.pem".into()),
                    ..with_url()
                },
                "tls_ca_file",
            ),
        ];
        for (config, needle) in cases {
            let e = config.validate().unwrap_err().to_string();
            assert!(e.contains(needle), "{e} should mention {needle}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn debug_hides_secrets() {
        let c = StreamConfig {
            nats_url: "nats://u:url-secret@127.0.0.1:4222".into(),
            token: Some("token-secret".into()),
            ..StreamConfig::default()
        };
        let shown = format!("{c:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("CUSTOS_AUDIT"));
    }

    #[test]
    fn a_url_with_credentials_is_not_echoed() {
        let c = StreamConfig {
            nats_url: "nats://user:secret@[::1:4222".into(),
            ..with_url()
        };
        if let Err(e) = c.validate() {
            assert!(!e.to_string().contains("secret"));
        }
    }

    #[test]
    fn toml_table_parses_and_rejects_unknown_keys() {
        let c: StreamConfig =
            toml::from_str("nats_url = \"nats://127.0.0.1:4222\"\nstream = \"S\"\n").unwrap();
        assert_eq!(c.stream, "S");
        assert_eq!(c.subject, "custos.audit");
        assert_eq!(c.consumer, "custos-detect");
        c.validate().unwrap();
        assert!(toml::from_str::<StreamConfig>("nats_url = \"x\"\nstrem = \"S\"\n").is_err());
    }
}
