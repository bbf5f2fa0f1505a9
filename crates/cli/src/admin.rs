//! `custos user`, `custos client`, `custos read-only`, `custos login`:
//! identity administration on a data directory (the store is shared with a
//! running server, so changes take effect there on its next request), and
//! signing in to a running server.
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Subcommand;
use custos_auth::service::Client;
use custos_auth::{AuthService, NewUser, Role};
use custos_crypto::GcmSealer;

use crate::DataArgs;

#[derive(Subcommand)]
pub enum UserAction {
    /// Create a user. The password comes from CUSTOS_PASSWORD or a prompt;
    /// roles that read clinical data get a TOTP enrollment, printed once.
    Add {
        #[command(flatten)]
        data: DataArgs,
        #[arg(long)]
        username: String,
        /// admin, security-officer, physician, nurse, registration-clerk, billing, researcher, auditor, patient.
        #[arg(long)]
        role: String,
        /// The Practitioner id of a clinician.
        #[arg(long)]
        practitioner: Option<String>,
        /// The Patient id of a patient user.
        #[arg(long)]
        patient: Option<String>,
        /// The Organization id the user works for.
        #[arg(long)]
        organization: Option<String>,
        /// Print the result as JSON (with the TOTP secret).
        #[arg(long)]
        json: bool,
    },
    /// List users.
    List {
        #[command(flatten)]
        data: DataArgs,
        #[arg(long)]
        json: bool,
    },
    /// Lock an account: sign-in and all its tokens are refused at once.
    Lock {
        #[command(flatten)]
        data: DataArgs,
        username: String,
        #[arg(long, default_value = "locked by an administrator")]
        reason: String,
    },
    /// Unlock an account (also clears a lockout after failed sign-ins).
    Unlock {
        #[command(flatten)]
        data: DataArgs,
        username: String,
    },
    /// Change a user's role.
    SetRole {
        #[command(flatten)]
        data: DataArgs,
        username: String,
        role: String,
    },
    /// Revoke every token the user holds.
    Revoke {
        #[command(flatten)]
        data: DataArgs,
        username: String,
    },
    /// Restrict a user to reading (`on`) or lift it (`off`).
    ReadOnly {
        #[command(flatten)]
        data: DataArgs,
        username: String,
        /// on or off
        state: String,
    },
    /// Require (`on`) a stated break-the-glass reason for every access of
    /// the user to a patient, or lift it (`off`, after a review).
    RequireBreakGlass {
        #[command(flatten)]
        data: DataArgs,
        username: String,
        /// on or off
        state: String,
    },
}

#[derive(Subcommand)]
pub enum ClientAction {
    /// Register a client: a backend service (--jwks) or a SMART app (--redirect-uri).
    Add {
        #[command(flatten)]
        data: DataArgs,
        #[arg(long)]
        id: String,
        #[arg(long)]
        name: Option<String>,
        /// A JWK Set file with the client's public keys (SMART Backend Services).
        #[arg(long)]
        jwks: Option<PathBuf>,
        /// Redirect URIs of a SMART app (repeatable).
        #[arg(long = "redirect-uri")]
        redirect_uris: Vec<String>,
        /// The most the client may be granted, e.g. "system/*.rs".
        #[arg(long)]
        scope: String,
        /// The role a backend service acts with (default service).
        #[arg(long)]
        role: Option<String>,
    },
    /// List registered clients.
    List {
        #[command(flatten)]
        data: DataArgs,
    },
}

fn on_off(s: &str) -> anyhow::Result<bool> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        other => bail!("expected 'on' or 'off', not '{other}'"),
    }
}

fn role(s: &str) -> anyhow::Result<Role> {
    Role::parse(s).with_context(|| {
        format!(
            "unknown role '{s}'; one of: {}",
            Role::ALL
                .iter()
                .filter(|r| **r != Role::Service)
                .map(|r| r.name())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

fn auth_err(e: custos_auth::AuthError) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

/// Open a data directory's identity service.
pub async fn open_auth(data: &DataArgs) -> anyhow::Result<(crate::Opened, AuthService)> {
    let (file, dir) = crate::resolve(data)?;
    let issuer = crate::issuer(&file, None);
    let auth_config = file.auth.clone().unwrap_or_default();
    let audit_config = file.audit.clone().unwrap_or_default();
    let opened = crate::open_data(file, dir, Arc::new(GcmSealer)).await?;
    let trail = custos_audit::AuditTrail::open(
        &opened.records,
        custos_audit::AuditConfig {
            checkpoint_secs: 0,
            ..audit_config
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let auth = AuthService::open(&opened.records, auth_config, &issuer, trail)
        .await
        .map_err(auth_err)?;
    Ok((opened, auth))
}

/// Switch a response control of a user on or off (`state`), and say so.
async fn switch(
    data: &DataArgs,
    username: &str,
    state: &str,
    label: &str,
    set: impl AsyncFn(&AuthService, &str, bool) -> Result<(), custos_auth::AuthError>,
) -> anyhow::Result<()> {
    let on = on_off(state)?;
    let (opened, auth) = open_auth(data).await?;
    let r = set(&auth, username, on).await.map_err(auth_err);
    finish(opened, auth).await;
    r?;
    println!("{username} {label}: {state}");
    Ok(())
}

async fn finish(opened: crate::Opened, auth: AuthService) {
    // Cover what this command recorded by a signed checkpoint.
    if let Err(e) = auth.audit().checkpoint().await {
        tracing::error!(error = %e, "the audit checkpoint failed");
    }
    opened.store.close();
}

fn password_from_env_or_prompt() -> anyhow::Result<String> {
    if let Ok(p) = std::env::var("CUSTOS_PASSWORD") {
        return Ok(p);
    }
    let p = rpassword::prompt_password("password: ").context("cannot read the password")?;
    let again = rpassword::prompt_password("again: ").context("cannot read the password")?;
    if p != again {
        bail!("the passwords differ");
    }
    Ok(p)
}

pub async fn user(action: UserAction) -> anyhow::Result<()> {
    match action {
        UserAction::Add {
            data,
            username,
            role: r,
            practitioner,
            patient,
            organization,
            json,
        } => {
            let role = role(&r)?;
            if role == Role::Service {
                bail!("systems are clients, not users: use `custos client add --jwks`");
            }
            let password = password_from_env_or_prompt()?;
            let (opened, auth) = open_auth(&data).await?;
            let created = auth
                .add_user(NewUser {
                    username,
                    password,
                    role,
                    practitioner,
                    patient,
                    organization,
                })
                .await
                .map_err(auth_err);
            finish(opened, auth).await;
            let created = created?;
            if json {
                println!("{}", serde_json::to_string_pretty(&created)?);
            } else {
                println!(
                    "created {} ({}), id {}",
                    created.user.username, created.user.role, created.user.id
                );
                if let (Some(url), Some(secret)) = (&created.totp_url, &created.totp_secret) {
                    println!("multi-factor enrollment (shown once; give it to the user):");
                    println!("  authenticator URL  {url}");
                    println!("  secret (base32)    {secret}");
                }
            }
        }
        UserAction::List { data, json } => {
            let (opened, auth) = open_auth(&data).await?;
            let users = auth.list_users().await.map_err(auth_err);
            finish(opened, auth).await;
            let users = users?;
            if json {
                println!("{}", serde_json::to_string_pretty(&users)?);
            } else {
                for u in users {
                    let mut flags = Vec::new();
                    if u.locked {
                        flags.push("LOCKED".to_string());
                    }
                    if u.locked_until.is_some() {
                        flags.push("LOCKED-OUT".to_string());
                    }
                    if u.read_only {
                        flags.push("READ-ONLY".to_string());
                    }
                    if u.mfa {
                        flags.push("mfa".to_string());
                    }
                    println!(
                        "{:<24} {:<20} {}",
                        u.username,
                        u.role.name(),
                        flags.join(" ")
                    );
                }
            }
        }
        UserAction::Lock {
            data,
            username,
            reason,
        } => {
            let (opened, auth) = open_auth(&data).await?;
            let r = auth.lock_user(&username, &reason).await.map_err(auth_err);
            finish(opened, auth).await;
            r?;
            println!("locked {username}: sign-in and every token refused");
        }
        UserAction::Unlock { data, username } => {
            let (opened, auth) = open_auth(&data).await?;
            let r = auth.unlock_user(&username).await.map_err(auth_err);
            finish(opened, auth).await;
            r?;
            println!("unlocked {username}");
        }
        UserAction::SetRole {
            data,
            username,
            role: r,
        } => {
            let role = role(&r)?;
            let (opened, auth) = open_auth(&data).await?;
            let res = auth.set_role(&username, role).await.map_err(auth_err);
            finish(opened, auth).await;
            res?;
            println!("{username} is now {role}");
        }
        UserAction::Revoke { data, username } => {
            let (opened, auth) = open_auth(&data).await?;
            let r = auth.revoke_user_tokens(&username).await.map_err(auth_err);
            finish(opened, auth).await;
            r?;
            println!("revoked every token of {username}");
        }
        UserAction::ReadOnly {
            data,
            username,
            state,
        } => {
            switch(&data, &username, &state, "read-only", async |a, u, on| {
                a.set_user_read_only(u, on).await
            })
            .await?
        }
        UserAction::RequireBreakGlass {
            data,
            username,
            state,
        } => {
            switch(
                &data,
                &username,
                &state,
                "must break the glass",
                async |a, u, on| a.set_user_require_break_glass(u, on).await,
            )
            .await?
        }
    }
    Ok(())
}

pub async fn client(action: ClientAction) -> anyhow::Result<()> {
    match action {
        ClientAction::Add {
            data,
            id,
            name,
            jwks,
            redirect_uris,
            scope,
            role: r,
        } => {
            let jwks = match jwks {
                Some(p) => Some(
                    serde_json::from_str(
                        &std::fs::read_to_string(&p)
                            .with_context(|| format!("cannot read {}", p.display()))?,
                    )
                    .with_context(|| format!("{} is not JSON", p.display()))?,
                ),
                None => None,
            };
            let role = r.as_deref().map(role).transpose()?;
            let (opened, auth) = open_auth(&data).await?;
            let c = auth
                .register_client(Client {
                    name: name.unwrap_or_else(|| id.clone()),
                    id,
                    jwks,
                    redirect_uris,
                    role,
                    scope,
                    disabled: false,
                    created: 0,
                })
                .await
                .map_err(auth_err);
            finish(opened, auth).await;
            let c = c?;
            println!("registered client {} (scope {})", c.id, c.scope);
        }
        ClientAction::List { data } => {
            let (opened, auth) = open_auth(&data).await?;
            let clients = auth.list_clients().await.map_err(auth_err);
            finish(opened, auth).await;
            for c in clients? {
                let kind = if c.jwks.is_some() {
                    "backend service"
                } else if c.redirect_uris.is_empty() {
                    "public (command line)"
                } else {
                    "SMART app"
                };
                println!("{:<24} {:<22} {}", c.id, kind, c.scope);
            }
        }
    }
    Ok(())
}

/// `custos read-only on|off`: the whole server, every node.
pub async fn server_read_only(
    data: DataArgs,
    state: String,
    reason: Option<String>,
) -> anyhow::Result<()> {
    let on = on_off(&state)?;
    let (opened, auth) = open_auth(&data).await?;
    let r = auth
        .set_server_read_only(on, reason)
        .await
        .map_err(auth_err);
    finish(opened, auth).await;
    r?;
    println!("server read-only: {state}");
    Ok(())
}

/// `custos login`: the password + TOTP grant against a running server;
/// prints the token answer as JSON.
pub async fn login(
    url: String,
    username: String,
    totp: Option<String>,
    scope: String,
    patient: Option<String>,
) -> anyhow::Result<()> {
    let password = match std::env::var("CUSTOS_PASSWORD") {
        Ok(p) => p,
        Err(_) => rpassword::prompt_password("password: ").context("cannot read the password")?,
    };
    let c = crate::client::FhirClient::new(&url);
    let mut extra = Vec::new();
    if let Some(p) = &patient {
        extra.push(("patient", p.as_str()));
    }
    let v =
        crate::backend::password_grant(&c, &username, &password, totp.as_deref(), &scope, &extra)
            .await?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

/// `custos alerts`: the security officer's cases on a running server,
/// through its admin API, with a token of `custos login` (CUSTOS_TOKEN).
#[derive(Subcommand)]
pub enum AlertsAction {
    /// Cases, most recently updated first.
    List {
        #[command(flatten)]
        server: ServerArgs,
        /// open, investigating, confirmed or dismissed.
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 50)]
        count: usize,
        #[arg(long)]
        json: bool,
    },
    /// One case: its findings (with the audit entries that prove them) and responses.
    Show {
        #[command(flatten)]
        server: ServerArgs,
        id: String,
    },
    /// Work a case: status, assignee, a note, the outcome.
    Update {
        #[command(flatten)]
        server: ServerArgs,
        id: String,
        /// open, investigating, confirmed, dismissed (a false positive: the baseline learns it).
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        assignee: Option<String>,
        #[arg(long)]
        note: Option<String>,
        /// educated, sanctioned, reported, no-action.
        #[arg(long)]
        outcome: Option<String>,
    },
}

/// Where the server is and the bearer token to use.
#[derive(clap::Args)]
pub struct ServerArgs {
    /// The server's base URL.
    #[arg(long, env = "CUSTOS_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// An access token of `custos login` (a security officer or admin).
    #[arg(long, env = "CUSTOS_TOKEN", hide_env_values = true)]
    pub token: String,
}

async fn admin_call(
    server: &ServerArgs,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    let c = crate::client::FhirClient::new(&server.url).with_token(&server.token);
    let (status, v) = c.json(method, path, body).await?;
    if !(200..300).contains(&status) {
        let why = v["issue"][0]["diagnostics"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| v.to_string());
        bail!("the server answered HTTP {status}: {why}");
    }
    Ok(v)
}

pub async fn alerts(action: AlertsAction) -> anyhow::Result<()> {
    match action {
        AlertsAction::List {
            server,
            status,
            count,
            json,
        } => {
            let mut path = format!("admin/alerts?_count={count}");
            if let Some(s) = status {
                path.push_str(&format!("&status={s}"));
            }
            let v = admin_call(&server, "GET", &path, None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let cases = v["cases"].as_array().cloned().unwrap_or_default();
            println!(
                "{:<36} {:<9} {:<13} {:<20} {:>5}  summary",
                "case", "severity", "status", "detector", "count"
            );
            for c in &cases {
                let summary = c["findings"]
                    .as_array()
                    .and_then(|f| f.last())
                    .and_then(|f| f["summary"].as_str())
                    .unwrap_or("");
                println!(
                    "{:<36} {:<9} {:<13} {:<20} {:>5}  {}",
                    c["id"].as_str().unwrap_or(""),
                    c["severity"].as_str().unwrap_or(""),
                    c["status"].as_str().unwrap_or(""),
                    c["detector"].as_str().unwrap_or(""),
                    c["count"],
                    summary
                );
            }
            println!(
                "{} case(s); pipeline: {} events judged, commit-to-alert p99 {} µs",
                cases.len(),
                v["stats"]["processed"],
                v["stats"]["alert_latency_p99_us"]
            );
        }
        AlertsAction::Show { server, id } => {
            let v = admin_call(&server, "GET", &format!("admin/alerts/{id}"), None).await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        AlertsAction::Update {
            server,
            id,
            status,
            assignee,
            note,
            outcome,
        } => {
            let body = serde_json::json!({
                "status": status, "assignee": assignee, "note": note, "outcome": outcome,
            });
            let v = admin_call(&server, "POST", &format!("admin/alerts/{id}"), Some(&body)).await?;
            println!(
                "case {} is {}{}",
                v["id"].as_str().unwrap_or(&id),
                v["status"].as_str().unwrap_or("?"),
                v["outcome"]
                    .as_str()
                    .map(|o| format!(" (outcome: {o})"))
                    .unwrap_or_default()
            );
        }
    }
    Ok(())
}
