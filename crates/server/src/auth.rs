//! Authentication over HTTP: the bearer-token middleware in front of the
//! FHIR API, the OAuth 2.0 endpoints (token, authorize with its login page,
//! JWKS, SMART configuration) and the administration API.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::extract::{ConnectInfo, Form, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use custos_auth::roles::AdminRight;
use custos_auth::service::{AuthorizeRequest, Client, LoginStep, Origin};
use custos_auth::{AuthError, AuthService, Grant, NewUser, Principal, RequestGuard, Role};
use custos_fhir::{ErrorKind, FhirError};
use custos_records::Records;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::audit::RequestMeta;
use crate::error::ApiError;

/// Who is calling, as the FHIR handlers see it: the record service acting
/// for them (every interaction asks their guard).
#[derive(Clone)]
pub struct Caller {
    pub records: Records,
    pub guard: Option<Arc<RequestGuard>>,
}

/// How the server treats requests.
#[derive(Clone)]
pub enum Access {
    /// Every FHIR request needs a bearer token and passes the policy.
    Enforced(Arc<AuthService>),
    /// No authentication at all. Only the benchmark builds this, to
    /// measure what authentication costs; it cannot be configured.
    OpenForBenchmark,
}

impl Access {
    pub fn service(&self) -> Option<&Arc<AuthService>> {
        match self {
            Access::Enforced(a) => Some(a),
            Access::OpenForBenchmark => None,
        }
    }
}

fn origin(headers: &HeaderMap, peer: Option<SocketAddr>) -> Origin {
    Origin {
        source: peer.map(|p| p.ip().to_string()),
        user_agent: headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(200).collect()),
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// 401 with an OperationOutcome and the `WWW-Authenticate` challenge.
fn unauthorized(message: &str) -> Response {
    let mut resp = ApiError(FhirError::unauthorized(message)).into_response();
    let challenge = if message.contains("no bearer token") {
        "Bearer realm=\"custos\"".to_string()
    } else {
        "Bearer realm=\"custos\", error=\"invalid_token\"".to_string()
    };
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    resp
}

fn auth_to_fhir(e: &AuthError) -> FhirError {
    match e {
        AuthError::InvalidToken(m) | AuthError::InvalidGrant(m) | AuthError::InvalidClient(m) => {
            FhirError::unauthorized(m.clone())
        }
        AuthError::Locked => FhirError::unauthorized("account locked"),
        AuthError::Forbidden(m) => FhirError::forbidden(m.clone()),
        AuthError::InvalidRequest(m) => FhirError::bad_request(m.clone()),
        AuthError::NotFound(m) => FhirError::not_found(m.clone()),
        AuthError::Conflict => FhirError::conflict("a concurrent change won; retry"),
        AuthError::Internal(m) => FhirError::internal(m.clone()),
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        ApiError(auth_to_fhir(&e))
    }
}

/// The middleware in front of the FHIR API: authenticate the bearer token
/// (401 otherwise), put the caller's guard on the request, and record the
/// request — who, what, every decision made for it — in the audit trail
/// before the response leaves (a write records it in its own transaction).
pub async fn authenticate(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let (meta, req) = RequestMeta::of(&req)
        .with_search_form(req, s.config.max_body)
        .await;
    let mut req = match req {
        Ok(r) => r,
        Err(refused) => {
            return match &s.audit {
                Some(trail) => crate::audit::refusal(trail, &meta, "body-too-large", refused).await,
                None => refused,
            };
        }
    };
    let Access::Enforced(auth) = &s.access else {
        let Some(trail) = s.audit.clone() else {
            req.extensions_mut().insert(Caller {
                records: s.records.clone(),
                guard: None,
            });
            return next.run(req).await;
        };
        let rec = meta.record(None);
        let writes = meta
            .may_write()
            .then(|| trail.for_writes(rec.clone(), None));
        let records = match &writes {
            Some(w) => s.records.audited(w.clone()),
            None => s.records.clone(),
        };
        req.extensions_mut().insert(Caller {
            records,
            guard: None,
        });
        let resp = next.run(req).await;
        return crate::audit::finish(&trail, &meta, rec, writes.as_deref(), Vec::new(), resp).await;
    };
    let trail = auth.audit().clone();
    let started = Instant::now();
    let Some(token) = bearer(req.headers()).map(str::to_string) else {
        let resp = unauthorized("no bearer token: authenticate at /auth/token");
        return crate::audit::refusal(&trail, &meta, "no-token", resp).await;
    };
    let (principal, snapshot) = match auth.authenticate(&token).await {
        Ok(p) => p,
        Err(e) => {
            // A genuine token presented after its revocation or its
            // account's lock is a signal for detection: name it.
            let rule = match &e {
                AuthError::InvalidToken(m) if m.contains("revoked") => "token-revoked",
                AuthError::InvalidToken(m) if m.contains("locked") => "account-locked",
                _ => "invalid-token",
            };
            let resp = match e {
                AuthError::Internal(_) => ApiError(auth_to_fhir(&e)).into_response(),
                other => unauthorized(&other.to_string()),
            };
            // Its signature held, so who presented it is known.
            let who = (rule != "invalid-token")
                .then(|| auth.verified_subject(&token))
                .flatten();
            return crate::audit::refusal_by(&trail, &meta, rule, who, resp).await;
        }
    };
    let (purpose, break_glass) = {
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        (header("x-purpose-of-use"), header("x-break-glass-reason"))
    };
    let guard = auth.guard(principal.clone(), snapshot, purpose, break_glass);
    let mut rec = meta.record(Some(&principal));
    rec.purpose = Some(guard.purpose().to_string());
    rec.break_glass_reason = guard.break_glass_reason().map(str::to_string);
    // Only a request that can write needs its event ready for the write's transaction.
    let mut records = s.records.guarded(guard.clone());
    let writes = meta.may_write().then(|| {
        let g = guard.clone();
        trail.for_writes(rec.clone(), Some(Box::new(move || g.decisions())))
    });
    if let Some(w) = &writes {
        records = records.audited(w.clone());
    }
    req.extensions_mut().insert(Caller {
        records,
        guard: Some(guard.clone()),
    });
    let resp = next.run(req).await;
    let decisions = guard.take_decisions();
    let resp = crate::audit::finish(&trail, &meta, rec, writes.as_deref(), decisions, resp).await;
    tracing::debug!(
        micros = started.elapsed().as_micros() as u64,
        "authorized request"
    );
    resp
}

fn service(s: &AppState) -> Result<&Arc<AuthService>, ApiError> {
    s.access
        .service()
        .ok_or_else(|| ApiError(FhirError::not_found("authentication is not enabled")))
}

// ------------------------------------------------------------ OAuth 2.0

/// An OAuth error response (RFC 6749 §5.2).
fn oauth_error(e: &AuthError) -> Response {
    let (status, code) = match e {
        AuthError::InvalidClient(_) => (StatusCode::UNAUTHORIZED, "invalid_client"),
        AuthError::InvalidGrant(_) | AuthError::Locked => {
            (StatusCode::BAD_REQUEST, "invalid_grant")
        }
        AuthError::InvalidRequest(_) | AuthError::NotFound(_) => {
            (StatusCode::BAD_REQUEST, "invalid_request")
        }
        AuthError::Forbidden(_) | AuthError::InvalidToken(_) => {
            (StatusCode::BAD_REQUEST, "invalid_scope")
        }
        AuthError::Conflict => (StatusCode::CONFLICT, "temporarily_unavailable"),
        AuthError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
    };
    let description = match e {
        AuthError::Internal(_) => "internal error".to_string(),
        other => other.to_string(),
    };
    let mut resp = (
        status,
        Json(json!({ "error": code, "error_description": description })),
    )
        .into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// `POST /auth/token` (form-encoded).
pub async fn token(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(f): Form<std::collections::HashMap<String, String>>,
) -> Response {
    let Ok(auth) = service(&s) else {
        return oauth_error(&AuthError::InvalidRequest(
            "authentication is not enabled".into(),
        ));
    };
    let get = |k: &str| f.get(k).cloned();
    let need = |k: &str| {
        get(k)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| AuthError::InvalidRequest(format!("{k} is required")))
    };
    let grant = (|| -> Result<Grant, AuthError> {
        Ok(match get("grant_type").as_deref() {
            Some("password") => Grant::Password {
                username: need("username")?,
                password: need("password")?,
                totp: get("totp"),
                scope: get("scope").unwrap_or_default(),
                patient: get("patient"),
                break_glass: get("break_glass_reason"),
            },
            Some("client_credentials") => Grant::ClientCredentials {
                assertion_type: need("client_assertion_type")?,
                assertion: need("client_assertion")?,
                scope: get("scope").unwrap_or_default(),
            },
            Some("authorization_code") => Grant::AuthorizationCode {
                code: need("code")?,
                redirect_uri: need("redirect_uri")?,
                code_verifier: need("code_verifier")?,
                client_id: need("client_id")?,
            },
            Some("refresh_token") => Grant::RefreshToken {
                refresh_token: need("refresh_token")?,
                scope: get("scope"),
            },
            Some(other) => {
                return Err(AuthError::InvalidRequest(format!(
                    "unsupported grant_type '{other}'"
                )));
            }
            None => return Err(AuthError::InvalidRequest("grant_type is required".into())),
        })
    })();
    let grant = match grant {
        Ok(g) => g,
        Err(e) => return oauth_error(&e),
    };
    match auth.token(grant, &origin(&headers, Some(peer))).await {
        Ok(t) => {
            let mut resp = Json(t).into_response();
            resp.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            resp
        }
        Err(e) => oauth_error(&e),
    }
}

/// `GET /.well-known/jwks.json`.
pub async fn jwks(State(s): State<AppState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(service(&s)?.jwks()))
}

/// `GET /.well-known/smart-configuration`.
pub async fn smart_configuration(State(s): State<AppState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(service(&s)?.smart_configuration()))
}

#[derive(Debug, Deserialize)]
pub struct AuthorizeQuery {
    response_type: Option<String>,
    client_id: Option<String>,
    redirect_uri: Option<String>,
    scope: Option<String>,
    state: Option<String>,
    aud: Option<String>,
    code_challenge: Option<String>,
    code_challenge_method: Option<String>,
}

fn authorize_request(q: &AuthorizeQuery) -> Result<AuthorizeRequest, AuthError> {
    if q.response_type.as_deref() != Some("code") {
        return Err(AuthError::InvalidRequest(
            "response_type must be code".into(),
        ));
    }
    let need = |v: &Option<String>, k: &str| {
        v.clone()
            .filter(|v| !v.is_empty())
            .ok_or_else(|| AuthError::InvalidRequest(format!("{k} is required")))
    };
    Ok(AuthorizeRequest {
        client_id: need(&q.client_id, "client_id")?,
        redirect_uri: need(&q.redirect_uri, "redirect_uri")?,
        scope: q.scope.clone().unwrap_or_default(),
        state: q.state.clone(),
        code_challenge: need(&q.code_challenge, "code_challenge")?,
        code_challenge_method: q.code_challenge_method.clone().unwrap_or_default(),
        aud: q.aud.clone(),
        patient: None,
    })
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// The login page: password, then the TOTP code, both on one minimal form.
fn login_page(req: &AuthorizeRequest, client_name: &str, error: Option<&str>) -> Response {
    let hidden = [
        ("response_type", "code"),
        ("client_id", req.client_id.as_str()),
        ("redirect_uri", req.redirect_uri.as_str()),
        ("scope", req.scope.as_str()),
        ("state", req.state.as_deref().unwrap_or("")),
        ("aud", req.aud.as_deref().unwrap_or("")),
        ("code_challenge", req.code_challenge.as_str()),
        ("code_challenge_method", req.code_challenge_method.as_str()),
    ]
    .iter()
    .map(|(k, v)| {
        format!(
            "<input type=\"hidden\" name=\"{k}\" value=\"{}\">",
            escape(v)
        )
    })
    .collect::<String>();
    let error = error
        .map(|e| format!("<p role=\"alert\" class=\"error\">{}</p>", escape(e)))
        .unwrap_or_default();
    let html = format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Custos sign-in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:system-ui,sans-serif;max-width:26rem;margin:4rem auto;padding:0 1rem}}label{{display:block;margin:.8rem 0 .2rem}}input{{width:100%;padding:.5rem;box-sizing:border-box}}button{{margin-top:1.2rem;padding:.6rem 1.2rem}}.error{{color:#a00}}</style></head>
<body><h1>Sign in to Custos</h1><p><strong>{client}</strong> asks for access: <code>{scope}</code></p>{error}
<form method="post" action="/auth/authorize" autocomplete="off">{hidden}
<label for="username">Username</label><input id="username" name="username" required autofocus>
<label for="password">Password</label><input id="password" name="password" type="password" required>
<label for="patient">Patient id (optional, for patient-context apps)</label><input id="patient" name="patient">
<button type="submit">Continue</button></form></body></html>"#,
        client = escape(client_name),
        scope = escape(&req.scope),
    );
    page(html)
}

/// The TOTP step of the login page.
fn totp_page(ticket: &str, client_name: &str, error: Option<&str>) -> Response {
    let error = error
        .map(|e| format!("<p role=\"alert\" class=\"error\">{}</p>", escape(e)))
        .unwrap_or_default();
    let html = format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Custos sign-in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:system-ui,sans-serif;max-width:26rem;margin:4rem auto;padding:0 1rem}}label{{display:block;margin:.8rem 0 .2rem}}input{{width:100%;padding:.5rem;box-sizing:border-box}}button{{margin-top:1.2rem;padding:.6rem 1.2rem}}.error{{color:#a00}}</style></head>
<body><h1>Sign in to Custos</h1><p>Second step for <strong>{client}</strong>: the code your authenticator app shows now.</p>{error}
<form method="post" action="/auth/authorize" autocomplete="off"><input type="hidden" name="ticket" value="{ticket}">
<label for="totp">Authenticator code (TOTP)</label><input id="totp" name="totp" inputmode="numeric" pattern="[0-9]{{6}}" maxlength="6" required autofocus>
<button type="submit">Sign in</button></form></body></html>"#,
        client = escape(client_name),
        ticket = escape(ticket),
    );
    page(html)
}

/// An HTML page that is never cached, framed or given scripts.
fn page(html: String) -> Response {
    let mut resp = Html(html).into_response();
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        "content-security-policy",
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    resp
}

fn bad_authorize(e: &AuthError) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Html(format!(
            "<!doctype html><title>Custos</title><h1>Cannot sign in</h1><p>{}</p>",
            escape(&e.to_string())
        )),
    )
        .into_response()
}

/// `GET /auth/authorize`: check the request, show the login page. An
/// unknown client or unregistered redirect never redirects.
pub async fn authorize_get(State(s): State<AppState>, Query(q): Query<AuthorizeQuery>) -> Response {
    let Ok(auth) = service(&s) else {
        return bad_authorize(&AuthError::InvalidRequest(
            "authentication is not enabled".into(),
        ));
    };
    let req = match authorize_request(&q) {
        Ok(r) => r,
        Err(e) => return bad_authorize(&e),
    };
    match auth.check_authorize(&req).await {
        Ok(client) => login_page(&req, &client.name, None),
        Err(e) => bad_authorize(&e),
    }
}

/// `POST /auth/authorize`: the login form. On success, redirect with the code.
pub async fn authorize_post(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(f): Form<std::collections::HashMap<String, String>>,
) -> Response {
    let Ok(auth) = service(&s) else {
        return bad_authorize(&AuthError::InvalidRequest(
            "authentication is not enabled".into(),
        ));
    };
    let get = |k: &str| f.get(k).cloned().filter(|v| !v.is_empty());
    let from = origin(&headers, Some(peer));
    if let Some(ticket) = get("ticket") {
        let totp = get("totp").unwrap_or_default();
        return match auth.login_second_factor(&ticket, &totp, &from).await {
            Ok((req, code)) => redirect_with_code(&req, &code),
            Err(AuthError::Internal(_)) => {
                bad_authorize(&AuthError::Internal("internal error".into()))
            }
            // A wrong code: the same step again (each failure counts
            // towards the account's lockout).
            Err(e @ AuthError::InvalidGrant(_)) if e.to_string().contains("TOTP") => {
                totp_page(&ticket, "the application", Some(&e.to_string()))
            }
            Err(e) => bad_authorize(&e),
        };
    }
    let q = AuthorizeQuery {
        response_type: get("response_type"),
        client_id: get("client_id"),
        redirect_uri: get("redirect_uri"),
        scope: get("scope"),
        state: get("state"),
        aud: get("aud"),
        code_challenge: get("code_challenge"),
        code_challenge_method: get("code_challenge_method"),
    };
    let mut req = match authorize_request(&q) {
        Ok(r) => r,
        Err(e) => return bad_authorize(&e),
    };
    req.patient = get("patient");
    let client = match auth.check_authorize(&req).await {
        Ok(c) => c,
        Err(e) => return bad_authorize(&e),
    };
    let username = get("username").unwrap_or_default();
    let password = get("password").unwrap_or_default();
    let totp = get("totp");
    match auth
        .login_password(&req, &username, &password, totp.as_deref(), &from)
        .await
    {
        Ok(LoginStep::Code(code)) => redirect_with_code(&req, &code),
        Ok(LoginStep::SecondFactor(ticket)) => totp_page(&ticket, &client.name, None),
        Err(AuthError::Internal(_)) => bad_authorize(&AuthError::Internal("internal error".into())),
        Err(e) => login_page(&req, &client.name, Some(&e.to_string())),
    }
}

/// `303 See Other` to the app's redirect URI with the code and its state.
fn redirect_with_code(req: &AuthorizeRequest, code: &str) -> Response {
    let mut url = url_with_query(&req.redirect_uri, &[("code", code)]);
    if let Some(state) = &req.state {
        url = url_with_query(&url, &[("state", state)]);
    }
    Redirect::to(&url).into_response()
}

fn url_with_query(base: &str, pairs: &[(&str, &str)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}{}", s.finish())
}

// --------------------------------------------------------- administration

/// Middleware of the admin API: records who asked for what and the outcome
/// (the service records what changed) before the answer leaves.
pub async fn audit_admin_request(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let Access::Enforced(auth) = &s.access else {
        return next.run(req).await;
    };
    let auth = auth.clone();
    let meta = RequestMeta::of(&req);
    let principal = match bearer(req.headers()) {
        Some(t) => auth.authenticate(t).await.ok().map(|(p, _)| p),
        None => None,
    };
    let mut rec = meta.record(principal.as_deref());
    rec.kind = custos_audit::EventKind::Admin;
    let resp = next.run(req).await;
    let decisions = vec![custos_auth::Decision {
        interaction: "admin".into(),
        rtype: None,
        id: None,
        patient: None,
        allowed: resp.status().is_success(),
        rule: rec.action.clone().into(),
    }];
    crate::audit::finish(auth.audit(), &meta, rec, None, decisions, resp).await
}

/// An authenticated caller of the admin API holding `right`.
pub(crate) async fn admin(
    s: &AppState,
    headers: &HeaderMap,
    right: AdminRight,
) -> Result<(Arc<AuthService>, Arc<Principal>), ApiError> {
    let auth = service(s)?.clone();
    let token =
        bearer(headers).ok_or_else(|| ApiError(FhirError::unauthorized("no bearer token")))?;
    let (principal, _) = auth.authenticate(token).await?;
    // Administration only with a token of the Custos command-line client:
    // never with one a third-party app obtained for its own purposes.
    if principal.client_id != custos_auth::service::CLI_CLIENT {
        return Err(ApiError(FhirError::forbidden(
            "administration needs a token of the custos command line (custos login)",
        )));
    }
    if !auth.has_right(&principal, right) {
        return Err(ApiError(FhirError::forbidden(format!(
            "the role {} may not do this",
            principal.role
        ))));
    }
    Ok((auth, principal))
}

pub async fn admin_list_users(
    State(s): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let (auth, _) = match admin(&s, &headers, AdminRight::ManageUsers).await {
        Ok(a) => a,
        Err(_) => admin(&s, &headers, AdminRight::Respond).await?,
    };
    Ok(Json(json!(auth.list_users().await?)))
}

pub async fn admin_add_user(
    State(s): State<AppState>,
    headers: HeaderMap,
    Json(new): Json<NewUser>,
) -> Result<Response, ApiError> {
    let (auth, _) = admin(&s, &headers, AdminRight::ManageUsers).await?;
    let created = auth.add_user(new).await?;
    Ok((StatusCode::CREATED, Json(json!(created))).into_response())
}

#[derive(Debug, Deserialize)]
pub struct UserAction {
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    on: Option<bool>,
}

/// `POST /admin/users/{username}/{action}`: lock, unlock, revoke, role,
/// read-only, require-break-glass.
pub async fn admin_user_action(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path((username, action)): Path<(String, String)>,
    body: Option<Json<UserAction>>,
) -> Result<Json<Value>, ApiError> {
    let body = body.map(|b| b.0).unwrap_or(UserAction {
        reason: None,
        role: None,
        on: None,
    });
    let right = if action == "role" {
        AdminRight::ManageUsers
    } else {
        AdminRight::Respond
    };
    let (auth, who) = admin(&s, &headers, right).await?;
    let reason = body
        .reason
        .unwrap_or_else(|| format!("by {}", who.username().unwrap_or("an administrator")));
    match action.as_str() {
        "lock" => auth.lock_user(&username, &reason).await?,
        "unlock" => auth.unlock_user(&username).await?,
        "revoke" => auth.revoke_user_tokens(&username).await?,
        "read-only" => {
            auth.set_user_read_only(&username, body.on.unwrap_or(true))
                .await?
        }
        "require-break-glass" => {
            auth.set_user_require_break_glass(&username, body.on.unwrap_or(true))
                .await?
        }
        "role" => {
            let role = body
                .role
                .as_deref()
                .and_then(Role::parse)
                .ok_or_else(|| ApiError(FhirError::bad_request("give a valid \"role\"")))?;
            auth.set_role(&username, role).await?
        }
        other => {
            return Err(ApiError(FhirError::new(
                ErrorKind::NotFound,
                format!("unknown action '{other}'"),
            )));
        }
    }
    Ok(Json(json!(auth.user(&username).await?)))
}

#[derive(Debug, Deserialize)]
pub struct ReadOnlyBody {
    on: bool,
    #[serde(default)]
    reason: Option<String>,
}

/// `POST /admin/read-only`: the whole server.
pub async fn admin_read_only(
    State(s): State<AppState>,
    headers: HeaderMap,
    Json(b): Json<ReadOnlyBody>,
) -> Result<Json<Value>, ApiError> {
    let (auth, _) = admin(&s, &headers, AdminRight::Respond).await?;
    auth.set_server_read_only(b.on, b.reason).await?;
    Ok(Json(json!({ "readOnly": b.on })))
}

pub async fn admin_register_client(
    State(s): State<AppState>,
    headers: HeaderMap,
    Json(c): Json<Client>,
) -> Result<Response, ApiError> {
    let (auth, _) = admin(&s, &headers, AdminRight::ManageUsers).await?;
    let c = auth.register_client(c).await?;
    Ok((StatusCode::CREATED, Json(json!(c))).into_response())
}

pub async fn admin_list_clients(
    State(s): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let (auth, _) = admin(&s, &headers, AdminRight::ManageUsers).await?;
    Ok(Json(json!(auth.list_clients().await?)))
}

pub async fn admin_rotate_signing_key(
    State(s): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let (auth, _) = admin(&s, &headers, AdminRight::ManageUsers).await?;
    Ok(Json(json!({ "kid": auth.rotate_signing_key().await? })))
}
