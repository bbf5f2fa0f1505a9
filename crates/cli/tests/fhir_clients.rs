//! Third-party FHIR clients against the real `custos` binary.
//!
//! Each test starts `custos serve` on a fresh data directory and runs one
//! client scenario from `tests/clients/` against it:
//!
//! - `CUSTOS_PYTHON=/path/to/python` (with `tests/clients/python/requirements.txt`
//!   installed): `python -m pytest -q tests/clients/python` (fhirpy).
//! - `CUSTOS_NODE_CLIENTS=1` (after `npm ci --prefix tests/clients/js`):
//!   `node --test tests/clients/js/fhirkit_scenario.test.mjs` (fhir-kit-client).
//!
//! Without those variables the tests print why they skip and pass, unless
//! `CUSTOS_REQUIRE_CLIENTS=1` (set by `.ci/run`), which turns a skip into a failure.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_custos");
const START_TIMEOUT: Duration = Duration::from_secs(60);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(600);

/// Environment variables that would make the server ignore the temp data dir.
const SERVER_ENV: &[&str] = &[
    "CUSTOS_KEK",
    "CUSTOS_CONFIG",
    "CUSTOS_DATA_DIR",
    "CUSTOS_LISTEN",
    "CUSTOS_BASE_URL",
    "CUSTOS_TLS_CERT",
    "CUSTOS_TLS_KEY",
    "CUSTOS_MAX_BODY",
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

/// A `custos serve` on a fresh data directory; killed when dropped, even if the test panics.
struct Server {
    child: Child,
    url: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        let out = custos_cmd()
            .arg("init")
            .arg("--data-dir")
            .arg(&data)
            .output()
            .expect("run custos init");
        assert!(
            out.status.success(),
            "custos init failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );

        let log = dir.path().join("serve.log");
        let log_file = std::fs::File::create(&log).expect("server log file");
        let mut child = custos_cmd()
            .arg("serve")
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .expect("spawn custos serve");

        // The first stdout line is `custos listening on http://ADDR`. Read it on a
        // thread so a server that never gets there fails the test instead of hanging it.
        let stdout = child.stdout.take().expect("server stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next();
            let _ = tx.send(first);
            // Keep draining so the server never blocks on a full pipe.
            for _ in lines {}
        });
        let mut server = Server {
            child,
            url: String::new(),
            log,
            _dir: dir,
        };
        let line = match rx.recv_timeout(START_TIMEOUT) {
            Ok(Some(Ok(line))) => line,
            other => panic!(
                "custos serve did not announce its address ({other:?}); its log:\n{}",
                server.log_text()
            ),
        };
        let url = line
            .trim()
            .strip_prefix("custos listening on ")
            .unwrap_or_else(|| {
                panic!(
                    "unexpected first line from custos serve: {line:?}; its log:\n{}",
                    server.log_text()
                )
            })
            .trim_end_matches('/')
            .to_string();
        assert!(url.starts_with("http://"), "unexpected server URL {url:?}");
        server.url = url;
        server
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with the server log if the server has exited.
    fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "custos serve exited ({status}); its log:\n{}",
                self.log_text()
            );
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn custos_cmd() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env("CUSTOS_LOG", "warn");
    for var in SERVER_ENV {
        cmd.env_remove(var);
    }
    cmd
}

/// Whether a missing client setup fails the test rather than skipping it.
fn clients_required() -> bool {
    std::env::var("CUSTOS_REQUIRE_CLIENTS").is_ok_and(|v| v == "1")
}

fn skip(what: &str, how: &str) {
    let msg = format!("skipping the {what} client scenario: {how} (see .ci/run)");
    if clients_required() {
        panic!("CUSTOS_REQUIRE_CLIENTS=1 but {msg}");
    }
    eprintln!("{msg}");
    println!("{msg}");
}

/// Run `cmd` to completion (or until `timeout`), returning its status and combined output.
fn run(mut cmd: Command, timeout: Duration) -> (ExitStatus, String) {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for client") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{shown} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = format!(
        "{}{}",
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default()
    );
    (status, output)
}

fn run_scenario(name: &str, mut cmd: Command) {
    let mut server = Server::start();
    cmd.current_dir(repo_root())
        .env("CUSTOS_FHIR_URL", &server.url);
    let (status, output) = run(cmd, CLIENT_TIMEOUT);
    println!("--- {name} against {} ---\n{output}", server.url);
    server.assert_alive();
    assert!(
        status.success(),
        "{name} scenario failed ({status}); output above. Server log:\n{}",
        server.log_text()
    );
}

#[test]
fn python_fhirpy_scenario() {
    let python = match std::env::var_os("CUSTOS_PYTHON") {
        Some(p) if !p.is_empty() => p,
        _ => {
            return skip(
                "Python (fhirpy)",
                "set CUSTOS_PYTHON to a python with tests/clients/python/requirements.txt installed",
            );
        }
    };
    let mut cmd = Command::new(python);
    cmd.args([
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests/clients/python",
    ])
    .env("PYTHONDONTWRITEBYTECODE", "1");
    run_scenario("fhirpy (pytest)", cmd);
}

#[test]
fn node_fhir_kit_client_scenario() {
    if !std::env::var("CUSTOS_NODE_CLIENTS").is_ok_and(|v| v == "1") {
        return skip(
            "JavaScript (fhir-kit-client)",
            "set CUSTOS_NODE_CLIENTS=1 after `npm ci --prefix tests/clients/js`",
        );
    }
    let modules = repo_root().join("tests/clients/js/node_modules/fhir-kit-client");
    assert!(
        modules.is_dir(),
        "{} is missing: run `npm ci --prefix tests/clients/js` first",
        modules.display()
    );
    let mut cmd = Command::new(std::env::var_os("CUSTOS_NODE").unwrap_or_else(|| "node".into()));
    cmd.args(["--test", "tests/clients/js/fhirkit_scenario.test.mjs"]);
    run_scenario("fhir-kit-client (node --test)", cmd);
}
