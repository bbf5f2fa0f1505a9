//! Shared helpers of the tests that run the real `custos` binary: a server
//! on a fresh data directory, the command line, HTTP, and tokens obtained
//! the way real clients obtain them (SMART Backend Services with an ES256
//! client assertion; password + TOTP for users).
//!
//! Each test file includes this with `mod support;`; not every file uses
//! every helper.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};

pub const BIN: &str = env!("CARGO_BIN_EXE_custos");
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The scope the tests' backend client registers and asks for.
pub const SYSTEM_SCOPE: &str = "system/*.cruds";
/// The client id of the tests' backend client.
pub const SYSTEM_CLIENT: &str = "test-system";
/// The public client of the command line (password grant).
pub const CLI_CLIENT: &str = "custos-cli";

/// Environment variables that would make a command ignore the given data dir.
const SERVER_ENV: &[&str] = &[
    "CUSTOS_KEK",
    "CUSTOS_DATABASE_URL",
    "CUSTOS_CONFIG",
    "CUSTOS_DATA_DIR",
    "CUSTOS_LISTEN",
    "CUSTOS_BASE_URL",
    "CUSTOS_TLS_CERT",
    "CUSTOS_TLS_KEY",
    "CUSTOS_MAX_BODY",
    "CUSTOS_PASSWORD",
    "CUSTOS_LOG_FORMAT",
    "CUSTOS_NATS_URL",
];

// ------------------------------------------------------------ command line

/// `custos` with a clean environment (quiet log, no inherited settings).
pub fn custos_cmd() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env("CUSTOS_LOG", "warn");
    for var in SERVER_ENV {
        cmd.env_remove(var);
    }
    cmd
}

/// Run `custos ARGS` to completion.
pub fn custos(args: &[&str]) -> Output {
    custos_cmd().args(args).output().expect("run custos")
}

/// Run `custos ARGS`, which must succeed; its standard output.
pub fn custos_ok(args: &[&str]) -> String {
    let out = custos(args);
    assert!(
        out.status.success(),
        "custos {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A fresh data directory made by `custos init`.
pub fn fresh_data_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    custos_ok(&["init", "--data-dir", dir.path().to_str().unwrap()]);
    dir
}

// ------------------------------------------------------------------ server

/// A running `custos serve`, killed (and waited for) when dropped, even if
/// the test panics. Its log (standard error) goes to a file outside the
/// data directory.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT` (or `https://…`): also the token issuer.
    pub base: String,
    pub dir: PathBuf,
    /// The data directory, when this server owns it.
    pub tmp: Option<tempfile::TempDir>,
    /// The bearer token helpers such as `e2e.rs`'s `send` act with.
    pub token: Option<String>,
    log: PathBuf,
    _log_dir: tempfile::TempDir,
    stopped: bool,
}

impl Server {
    /// `custos serve` on a fresh data directory.
    pub fn start() -> Server {
        Server::start_in(fresh_data_dir(), &[], &[])
    }

    /// `custos serve` on a fresh data directory with a configuration file.
    pub fn start_with_config(toml: &str) -> Server {
        let dir = fresh_data_dir();
        let cfg = dir.path().join("custos.toml");
        std::fs::write(&cfg, toml).unwrap();
        let cfg = cfg.to_str().unwrap().to_string();
        Server::start_in(dir, &["--config", &cfg], &[])
    }

    /// `custos serve` on a data directory this server then owns.
    pub fn start_in(dir: tempfile::TempDir, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let mut s = Server::serve(dir.path(), extra, env);
        s.tmp = Some(dir);
        s
    }

    /// `custos serve --data-dir DIR --listen 127.0.0.1:0 EXTRA…` on an
    /// existing data directory; `env` is added to the clean environment.
    pub fn serve(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let log_dir = tempfile::tempdir().expect("temp dir");
        let log = log_dir.path().join("serve.log");
        let log_file = std::fs::File::create(&log).expect("server log file");
        let mut cmd = custos_cmd();
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(dir)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn custos serve");
        // The first stdout line is `custos listening on URL`. Read it on a
        // thread so a server that never gets there fails the test instead
        // of hanging it; keep draining so the server never blocks.
        let stdout = child.stdout.take().expect("server stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            for _ in lines {}
        });
        let mut server = Server {
            child,
            base: String::new(),
            dir: dir.to_path_buf(),
            tmp: None,
            token: None,
            log,
            _log_dir: log_dir,
            stopped: false,
        };
        let line = match rx.recv_timeout(START_TIMEOUT) {
            Ok(Some(Ok(line))) => line,
            other => panic!(
                "custos serve did not announce its address ({other:?}); its log:\n{}",
                server.log_text()
            ),
        };
        let base = line
            .trim()
            .strip_prefix("custos listening on ")
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| {
                panic!(
                    "unexpected first line from custos serve: {line:?}; its log:\n{}",
                    server.log_text()
                )
            })
            .trim_end_matches('/')
            .to_string();
        assert!(
            base.starts_with("http://") || base.starts_with("https://"),
            "unexpected server URL {base:?}"
        );
        server.base = base;
        server
    }

    /// The data directory as a string (for command-line arguments).
    pub fn data(&self) -> String {
        self.dir.to_str().unwrap().to_string()
    }

    pub fn url(&self, path: &str) -> String {
        if path.starts_with("http://") || path.starts_with("https://") {
            path.to_string()
        } else {
            format!("{}/{}", self.base, path.trim_start_matches('/'))
        }
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with the server log if the server has exited.
    pub fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "custos serve exited ({status}); its log:\n{}",
                self.log_text()
            );
        }
    }

    /// Stop the server (the log stays readable until the value is dropped).
    pub fn stop(&mut self) {
        if !self.stopped {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.stopped = true;
        }
    }

    /// Register the tests' backend client (a fresh key pair each time; a
    /// registration replaces the previous one) with `custos client add`,
    /// get a `system/*.cruds` token, and keep it as this server's token.
    pub async fn sign_in_system(&mut self) -> String {
        let client = BackendClient::generate(SYSTEM_CLIENT);
        client.register(&self.dir, SYSTEM_SCOPE);
        let token = client.token(&self.base, SYSTEM_SCOPE).await;
        self.token = Some(token.clone());
        token
    }

    /// Add a user with `custos user add` (see [`add_user`]).
    pub fn add_user(&self, username: &str, role: &str, link: &[(&str, &str)]) -> User {
        add_user(&self.dir, username, role, link)
    }

    /// A request with an explicit token (or none).
    pub async fn call(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Resp {
        call(&http(), token, method, &self.url(path), body, headers).await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

// -------------------------------------------------------------------- HTTP

/// An HTTP client that does not follow redirects (the authorization
/// endpoint's redirect is under test).
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// An answer: status, body as JSON (`Null` if empty or not JSON), the
/// body as text, and the headers.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub body: Value,
    pub text: String,
    pub headers: reqwest::header::HeaderMap,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

async fn into_resp(resp: reqwest::Response) -> Resp {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await.unwrap();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or(Value::Null)
    };
    Resp {
        status,
        body,
        text,
        headers,
    }
}

/// One FHIR request: a JSON body is sent as `application/fhir+json`.
pub async fn call(
    http: &reqwest::Client,
    token: Option<&str>,
    method: &str,
    url: &str,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> Resp {
    let mut req = http.request(method.parse().unwrap(), url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req
            .header("content-type", "application/fhir+json")
            .body(serde_json::to_vec(&b).unwrap());
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    into_resp(req.send().await.unwrap()).await
}

/// A form POST (the OAuth endpoints).
pub async fn post_form(http: &reqwest::Client, url: &str, pairs: &[(&str, &str)]) -> Resp {
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    let resp = http
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    into_resp(resp).await
}

/// Whether a body is an OperationOutcome with a diagnostic.
pub fn is_outcome(v: &Value) -> bool {
    v["resourceType"] == "OperationOutcome" && v["issue"][0]["diagnostics"].is_string()
}

// ------------------------------------------------- SMART Backend Services

/// A SMART Backend Services client: an ES256 key pair made in the test,
/// its public JWK taken from the uncompressed point (as `custos` itself does
/// in `crates/cli/src/backend.rs`).
pub struct BackendClient {
    pub id: String,
    pub kid: String,
    encoding: EncodingKey,
    jwk: Value,
}

pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A random URL-safe string (ids, `jti`, PKCE verifiers, passwords).
pub fn random(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut b).unwrap();
    URL_SAFE_NO_PAD.encode(b)
}

impl BackendClient {
    pub fn generate(id: &str) -> BackendClient {
        let rng = SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, doc.as_ref(), &rng).unwrap();
        // Uncompressed point: 0x04 ‖ x (32 bytes) ‖ y (32 bytes).
        let public = pair.public_key().as_ref();
        let kid = random(9);
        BackendClient {
            id: id.to_string(),
            jwk: json!({
                "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
                "x": URL_SAFE_NO_PAD.encode(&public[1..33]),
                "y": URL_SAFE_NO_PAD.encode(&public[33..65]),
            }),
            kid,
            encoding: EncodingKey::from_ec_der(doc.as_ref()),
        }
    }

    /// The public key set to register.
    pub fn jwks(&self) -> Value {
        json!({ "keys": [self.jwk] })
    }

    /// `custos client add --data-dir D --id ID --jwks FILE --scope SCOPE`.
    pub fn register(&self, data_dir: &Path, scope: &str) {
        self.register_with(data_dir, scope, &[]);
    }

    /// [`BackendClient::register`] with more arguments (e.g. `--config FILE`).
    pub fn register_with(&self, data_dir: &Path, scope: &str, extra: &[&str]) {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), serde_json::to_vec(&self.jwks()).unwrap()).unwrap();
        let mut args = vec![
            "client",
            "add",
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--id",
            &self.id,
            "--jwks",
            file.path().to_str().unwrap(),
            "--scope",
            scope,
        ];
        args.extend_from_slice(extra);
        custos_ok(&args);
    }

    /// Sign any claims with this client's key (header `alg: ES256`, its `kid`).
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
    }

    /// The claims of a proper assertion for the token endpoint of `issuer`.
    pub fn claims(&self, issuer: &str) -> Value {
        let now = now_secs();
        json!({
            "iss": self.id, "sub": self.id, "aud": format!("{issuer}/auth/token"),
            "exp": now + 240, "iat": now, "jti": random(16),
        })
    }

    /// Exchange an assertion at `issuer`'s token endpoint; the raw answer.
    pub async fn exchange(
        &self,
        http: &reqwest::Client,
        url_base: &str,
        assertion: &str,
        scope: &str,
    ) -> Resp {
        post_form(
            http,
            &format!("{url_base}/auth/token"),
            &[
                ("grant_type", "client_credentials"),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", assertion),
                ("scope", scope),
            ],
        )
        .await
    }

    /// Ask for a token with a fresh assertion; the raw answer.
    pub async fn request_token(&self, base: &str, scope: &str) -> Resp {
        let assertion = self.sign(&self.claims(base));
        self.exchange(&http(), base, &assertion, scope).await
    }

    /// A token, which must be granted.
    pub async fn token(&self, base: &str, scope: &str) -> String {
        let r = self.request_token(base, scope).await;
        assert_eq!(r.status, 200, "client_credentials refused: {}", r.text);
        r.body["access_token"].as_str().unwrap().to_string()
    }
}

// ------------------------------------------------------------------- users

/// A user made with `custos user add`, with the password and the TOTP
/// enrollment secret, so the test can play the authenticator app.
pub struct User {
    pub username: String,
    pub password: String,
    pub id: String,
    pub totp_secret: Option<String>,
    /// The last TOTP time step this test used (a code is accepted once).
    last_step: Mutex<u64>,
}

/// `CUSTOS_PASSWORD=… custos user add --data-dir D --username U --role R
/// [--practitioner P | --patient P …] --json`.
pub fn add_user(data_dir: &Path, username: &str, role: &str, link: &[(&str, &str)]) -> User {
    add_user_with(data_dir, username, role, link, &[])
}

/// [`add_user`] with more arguments (e.g. `--config FILE`).
pub fn add_user_with(
    data_dir: &Path,
    username: &str,
    role: &str,
    link: &[(&str, &str)],
    extra: &[&str],
) -> User {
    let password = format!("pw-{}", random(12));
    let d = data_dir.to_str().unwrap();
    let mut cmd = custos_cmd();
    cmd.args([
        "user",
        "add",
        "--data-dir",
        d,
        "--username",
        username,
        "--role",
        role,
        "--json",
    ])
    .args(extra)
    .env("CUSTOS_PASSWORD", &password);
    for (flag, value) in link {
        cmd.args([*flag, *value]);
    }
    let out = cmd.output().expect("run custos user add");
    assert!(
        out.status.success(),
        "custos user add {username} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("user add --json prints JSON");
    User {
        username: username.to_string(),
        password,
        id: v["user"]["id"].as_str().unwrap_or_default().to_string(),
        totp_secret: v["totp_secret"].as_str().map(str::to_string),
        last_step: Mutex::new(0),
    }
}

impl User {
    /// A user the server does not know (for sign-in attempts).
    pub fn unknown(username: &str) -> User {
        User {
            username: username.to_string(),
            password: format!("pw-{}", random(12)),
            id: String::new(),
            totp_secret: None,
            last_step: Mutex::new(0),
        }
    }

    /// The code of a TOTP time step.
    pub fn code_at_step(&self, step: u64) -> String {
        let secret = self.totp_secret.as_deref().expect("a TOTP enrollment");
        custos_auth::users::totp_code_base32(secret, step * 30).unwrap()
    }

    /// A code not yet used by this test: the current step's, else the next
    /// step's (the server allows one step of clock skew), else wait.
    pub fn fresh_code(&self) -> String {
        let mut last = self.last_step.lock().unwrap();
        loop {
            let now = now_secs() as u64 / 30;
            let step = now.max(*last + 1);
            if step <= now + 1 {
                *last = step;
                return self.code_at_step(step);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// A six-digit code that is not valid around now.
    pub fn wrong_code(&self) -> String {
        let now = now_secs() as u64 / 30;
        let valid: Vec<String> = (now.saturating_sub(2)..=now + 2)
            .map(|s| self.code_at_step(s))
            .collect();
        (0..10)
            .map(|d| format!("{d}{d}{d}{d}{d}{d}"))
            .find(|c| !valid.contains(c))
            .unwrap()
    }

    /// The password grant with a fresh TOTP code and `extra` form fields; the raw answer.
    pub async fn sign_in(&self, base: &str, scope: &str, extra: &[(&str, &str)]) -> Resp {
        let code = self.totp_secret.as_ref().map(|_| self.fresh_code());
        self.password_grant(base, &self.password, code.as_deref(), scope, extra)
            .await
    }

    /// The password grant with the given password and code.
    pub async fn password_grant(
        &self,
        base: &str,
        password: &str,
        totp: Option<&str>,
        scope: &str,
        extra: &[(&str, &str)],
    ) -> Resp {
        let mut pairs = vec![
            ("grant_type", "password"),
            ("client_id", CLI_CLIENT),
            ("username", self.username.as_str()),
            ("password", password),
            ("scope", scope),
        ];
        if let Some(t) = totp {
            pairs.push(("totp", t));
        }
        pairs.extend_from_slice(extra);
        post_form(&http(), &format!("{base}/auth/token"), &pairs).await
    }

    /// An access token, which must be granted.
    pub async fn token(&self, base: &str, scope: &str) -> String {
        let r = self.sign_in(base, scope, &[]).await;
        assert_eq!(
            r.status, 200,
            "sign-in of {} refused: {}",
            self.username, r.text
        );
        r.body["access_token"].as_str().unwrap().to_string()
    }
}

// ------------------------------------------------------------- JWT pieces

/// Decode one base64url segment of a JWT as JSON.
pub fn jwt_part(token: &str, n: usize) -> Value {
    let seg = token.split('.').nth(n).expect("a JWT segment");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(seg).expect("base64url")).expect("JSON")
}

/// base64url (no padding) of JSON.
pub fn b64_json(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

// ------------------------------------------------------- graceful stopping

impl Server {
    /// Stop the server the way an operator does (SIGTERM): it finishes its
    /// requests, records its stop and signs a final audit checkpoint. Panics
    /// (with the server log) unless it exits cleanly within 30 seconds.
    pub fn terminate(&mut self) {
        if self.stopped {
            return;
        }
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(
            sent.is_ok_and(|s| s.success()),
            "could not send SIGTERM to custos serve ({pid})"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.stopped = true;
                    assert!(
                        status.success(),
                        "custos serve exited with {status} on SIGTERM; its log:\n{}",
                        self.log_text()
                    );
                    return;
                }
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                _ => {
                    self.stop();
                    panic!(
                        "custos serve did not stop within 30 s of SIGTERM; its log:\n{}",
                        self.log_text()
                    );
                }
            }
        }
    }
}
