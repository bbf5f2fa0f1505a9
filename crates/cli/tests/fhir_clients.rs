//! Third-party FHIR clients against the real `custos` binary.
//!
//! Each test starts `custos serve` on a fresh data directory and runs one
//! client scenario from `tests/clients/` against it, with `CUSTOS_FHIR_URL`
//! and a bearer token in `CUSTOS_TOKEN` (the test gets it as a SMART Backend
//! Services client with `system/*.cruds`, registered through the CLI):
//!
//! - `CUSTOS_PYTHON=/path/to/python` (with `tests/clients/python/requirements.txt`
//!   installed): `python -m pytest -q tests/clients/python` (fhirpy).
//! - `CUSTOS_NODE_CLIENTS=1` (after `npm ci --prefix tests/clients/js`):
//!   `node --test tests/clients/js/fhirkit_scenario.test.mjs` (fhir-kit-client).
//!
//! Without those variables the tests print why they skip and pass, unless
//! `CUSTOS_REQUIRE_CLIENTS=1` (set by `.ci/run`), which turns a skip into a failure.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

mod support;
use support::Server;

const CLIENT_TIMEOUT: Duration = Duration::from_secs(600);

/// Access tokens outlive the longest scenario run (the default is five minutes).
const SERVER_CONFIG: &str = "[auth]\naccess_token_secs = 3600\n";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
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

/// Start a server, get a `system/*.cruds` token as a SMART Backend Services
/// client, and run the scenario with `CUSTOS_FHIR_URL` and `CUSTOS_TOKEN`.
fn run_scenario(name: &str, mut cmd: Command) {
    let mut server = Server::start_with_config(SERVER_CONFIG);
    let token = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(server.sign_in_system());
    cmd.current_dir(repo_root())
        .env("CUSTOS_FHIR_URL", &server.base)
        .env("CUSTOS_TOKEN", token);
    let (status, output) = run(cmd, CLIENT_TIMEOUT);
    println!("--- {name} against {} ---\n{output}", server.base);
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
