//! A client written in another language from `docs/PROTOCOL.md` alone drives
//! a node: `tests/python/drive.py` (with `tests/python/mpreg_client.py`, on
//! the `websockets` package) runs the page's reference examples, kwargs,
//! datasets, every client-visible error, 50 requests in flight on one
//! connection and token authentication against nodes started here; and,
//! sending flat requests without mpreg's marker as the original project's
//! later client does, checks every reply against that client's reply model
//! as the page describes it (integer error codes, level-by-level
//! intermediate results, the execution summary).
//!
//! The test makes a Python virtual environment with `websockets` under the
//! cargo target directory the first time (from PyPI) and reuses it after.
//! Without `python3` it is skipped, loudly, unless `MPREG_REQUIRE_PYTHON=1`.

mod common;

use std::ffi::OsStr;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{builder, start_node};
use mpreg::{Args, Function, Param, RpcError};
use serde_json::{Map, Value};
use tokio::process::Command;

/// The `websockets` release the client is tested with.
const WEBSOCKETS: &str = "websockets==17.4";
/// The token of the node that requires one.
const TOKEN: &str = "py-secret-token";
/// A dataset the open node has.
const DATASET: &str = "model-py";

/// Bounds on the child processes: hang guards, not performance assertions.
const VENV_TIMEOUT: Duration = Duration::from_secs(180);
const PIP_TIMEOUT: Duration = Duration::from_secs(600);
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);
const DRIVE_TIMEOUT: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_written_from_the_protocol_page_drives_a_node() {
    let Some(python) = python_with_websockets().await else {
        return;
    };
    let open = start_node(
        builder()
            .name("py-node")
            .datasets([DATASET])
            .function(greet())
            .function(delay_echo()),
    )
    .await;
    let guarded = start_node(builder().name("py-auth").client_tokens([TOKEN])).await;
    let url = open.url().expect("the node listens");
    let auth_url = guarded.url().expect("the node listens");

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/drive.py");
    let mut drive = Command::new(&python);
    drive
        .arg(&script)
        .arg(&url)
        .args(["--dataset", DATASET])
        .args([OsStr::new("--auth-url"), OsStr::new(&auth_url)])
        .args(["--token", TOKEN])
        // No `__pycache__` in the source tree.
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1");
    let out = run("drive.py", &mut drive, DRIVE_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let shown = show(&out);
    assert!(
        out.status.success(),
        "drive.py failed ({}):\n{shown}",
        out.status
    );
    // The script ran its checks (not, say, an early exit with status 0).
    assert!(shown.contains("checks ok"), "{shown}");
    assert!(
        shown.contains("ok    auth: token in first auth message"),
        "{shown}"
    );
    assert!(
        shown.contains("ok    later client: every error has an integer code"),
        "{shown}"
    );
    println!("{shown}");

    open.shutdown().await;
    guarded.shutdown().await;
}

/// `greet(name: String, greeting: Option<String>) -> String`: a function
/// with named parameters, checking its arguments itself.
fn greet() -> Function {
    const PARAMS: &[Param] = &[
        Param::new("name", "String"),
        Param::new("greeting", "Option<String>"),
    ];
    Function::new("greet", |args: Args| async move {
        let (positional, named) = args.into_parts();
        let [name, greeting] = bind(PARAMS, positional, named)?;
        let name = match name {
            Some(Value::String(name)) => name,
            Some(other) => {
                return Err(RpcError::bad_arguments(format!(
                    "argument `name` is not a valid `String`: {other}"
                )));
            }
            None => return Err(RpcError::bad_arguments("missing argument `name`")),
        };
        let greeting = match greeting {
            None | Some(Value::Null) => "hello".to_owned(),
            Some(Value::String(g)) => g,
            Some(other) => {
                return Err(RpcError::bad_arguments(format!(
                    "argument `greeting` is not a valid `Option<String>`: {other}"
                )));
            }
        };
        Ok(Value::String(format!("{greeting}, {name}!")))
    })
    .params(PARAMS, "String")
    .doc("Greets `name` with `greeting` (default: hello).")
}

/// `delay_echo(value, ms: u64)`: returns `value` after `ms` milliseconds.
fn delay_echo() -> Function {
    const PARAMS: &[Param] = &[Param::new("value", "Value"), Param::new("ms", "u64")];
    Function::new("delay_echo", |args: Args| async move {
        let (positional, named) = args.into_parts();
        let [value, ms] = bind(PARAMS, positional, named)?;
        let Some(ms) = ms.as_ref().and_then(Value::as_u64) else {
            return Err(RpcError::bad_arguments(format!(
                "argument `ms` is not a valid `u64`: {ms:?}"
            )));
        };
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(value.unwrap_or(Value::Null))
    })
    .params(PARAMS, "Value")
    .doc("Returns `value` after `ms` milliseconds.")
}

/// Binds positional and named arguments to `N` parameters: `bad_arguments`
/// for too many, an unknown name, or a parameter given twice.
fn bind<const N: usize>(
    params: &[Param],
    positional: Vec<Value>,
    mut named: Map<String, Value>,
) -> Result<[Option<Value>; N], RpcError> {
    if positional.len() > N {
        return Err(RpcError::bad_arguments(format!(
            "expected at most {N} argument(s), got {}",
            positional.len()
        )));
    }
    let mut out: [Option<Value>; N] = std::array::from_fn(|_| None);
    for (slot, value) in out.iter_mut().zip(positional) {
        *slot = Some(value);
    }
    for (slot, param) in out.iter_mut().zip(params) {
        if let Some(value) = named.remove(param.name) {
            if slot.is_some() {
                return Err(RpcError::bad_arguments(format!(
                    "argument `{}` given both by position and by name",
                    param.name
                )));
            }
            *slot = Some(value);
        }
    }
    if let Some(unknown) = named.keys().next() {
        return Err(RpcError::bad_arguments(format!(
            "unknown argument `{unknown}`"
        )));
    }
    Ok(out)
}

/// The virtual environment's Python, with [`WEBSOCKETS`] installed (made on
/// first use); `None` when `python3` is missing and not required.
async fn python_with_websockets() -> Option<PathBuf> {
    let mut version = Command::new("python3");
    version.arg("--version");
    match run("python3 --version", &mut version, PROBE_TIMEOUT).await {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!("python3 --version failed:\n{}", show(&out)),
        Err(RunError::Spawn { source, .. }) if source.kind() == ErrorKind::NotFound => {
            if std::env::var("MPREG_REQUIRE_PYTHON").is_ok_and(|v| v == "1") {
                panic!("python3 not found, and MPREG_REQUIRE_PYTHON=1 requires it");
            }
            // Straight to the process's stderr: the test harness captures
            // `eprintln!`, and a skip must be seen.
            let _ = std::io::stderr().write_all(
                b"\n*** python_client skipped: python3 not found (MPREG_REQUIRE_PYTHON=1 makes this a failure) ***\n\n",
            );
            return None;
        }
        Err(e) => panic!("{e}"),
    }
    let venv = target_dir().join("py-venv");
    if has_websockets(&venv).await {
        return Some(venv_python(&venv));
    }
    // Build the environment beside the final place and move it there in one
    // rename, so a test process racing this one sees either no environment
    // or a complete one.
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let staging = target_dir().join(format!("py-venv.tmp-{}-{stamp}", std::process::id()));
    let mut create = Command::new("python3");
    create.args([OsStr::new("-m"), OsStr::new("venv"), staging.as_os_str()]);
    check(
        "python3 -m venv (on Debian, install python3-venv)",
        &mut create,
        VENV_TIMEOUT,
    )
    .await;
    let mut pip = Command::new(venv_python(&staging));
    pip.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-input",
        WEBSOCKETS,
    ]);
    check("pip install websockets", &mut pip, PIP_TIMEOUT).await;
    if venv.exists() {
        // Broken or outdated (another Python, another pin): replace it. A
        // racing process may have just put a good one there; the rename
        // below then fails and that one is used.
        if !has_websockets(&venv).await {
            let _ = std::fs::remove_dir_all(&venv);
        }
    }
    if let Err(e) = std::fs::rename(&staging, &venv) {
        let _ = std::fs::remove_dir_all(&staging);
        assert!(
            has_websockets(&venv).await,
            "cannot move the new environment to {}: {e}",
            venv.display()
        );
    }
    Some(venv_python(&venv))
}

/// Whether the environment at `venv` runs and has the pinned `websockets`.
async fn has_websockets(venv: &Path) -> bool {
    let python = venv_python(venv);
    if !python.exists() {
        return false;
    }
    let want = WEBSOCKETS.trim_start_matches("websockets==");
    let mut probe = Command::new(python);
    probe.args([
        "-c",
        &format!("import sys, websockets; sys.exit(websockets.__version__ != {want:?})"),
    ]);
    matches!(run("probe websockets", &mut probe, PROBE_TIMEOUT).await, Ok(out) if out.status.success())
}

fn venv_python(venv: &Path) -> PathBuf {
    if cfg!(windows) {
        venv.join("Scripts").join("python.exe")
    } else {
        venv.join("bin").join("python")
    }
}

/// The cargo target directory (the parent of `CARGO_TARGET_TMPDIR`).
fn target_dir() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(tmp).to_owned()
}

/// Runs `cmd` to completion and panics, showing its output, unless it
/// succeeds.
async fn check(what: &str, cmd: &mut Command, limit: Duration) {
    let out = run(what, cmd, limit)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}",
        out.status,
        show(&out)
    );
}

#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error("cannot start {what}: {source}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error("{what} did not finish within {limit:?} (killed)")]
    Timeout { what: String, limit: Duration },
    #[error("{what}: {source}")]
    Wait {
        what: String,
        source: std::io::Error,
    },
}

/// Runs `cmd` with its output captured, killed after `limit`.
async fn run(what: &str, cmd: &mut Command, limit: Duration) -> Result<Output, RunError> {
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| RunError::Spawn {
            what: what.to_owned(),
            source,
        })?;
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(source)) => Err(RunError::Wait {
            what: what.to_owned(),
            source,
        }),
        Err(_) => Err(RunError::Timeout {
            what: what.to_owned(),
            limit,
        }),
    }
}

fn show(out: &Output) -> String {
    format!(
        "--- stdout ---\n{}--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
