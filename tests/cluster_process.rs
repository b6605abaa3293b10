//! A cluster of separate `mpreg server` processes on loopback: routing by
//! datasets through a balancer, a node killed with SIGKILL mid-call and
//! restarted on the same port, a graceful SIGTERM, a link busy with large
//! messages, and the `mpreg cluster` command.
//!
//! Every wait polls with a short interval under a generous hang guard; no
//! sleep is a readiness signal and nothing asserts on timing.
//!
//! Set `MPREG_PROCESS_TEST_LOGS=DIR` to keep each server's stderr (its
//! tracing log, filtered by `RUST_LOG`, default `info,mpreg=debug`) in
//! `DIR/<test>-<node>-<n>.log`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use mpreg::{Client, Command, ErrorCode, Request};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;

const BIN: &str = env!("CARGO_BIN_EXE_mpreg");
/// The longest any single wait may take: a hang guard, not a timing check.
const GUARD: Duration = Duration::from_secs(60);
/// How often a polled condition is checked again.
const POLL: Duration = Duration::from_millis(25);

/// Fast failure detection, so crashes are noticed in well under a second.
const FAST_CONFIG: &str = "probe_interval_ms = 100\nsuspect_timeout_ms = 500\n";

/// Runs `fut`, panicking (instead of hanging) after [`GUARD`].
async fn guard<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(GUARD, fut).await {
        Ok(out) => out,
        Err(_) => panic!("hang guard: {what} did not finish within {GUARD:?}"),
    }
}

/// A temporary directory for one test (config file, logs), removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "mpreg-cluster-process-{}-{test}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }

    /// Writes the fast failure detection config; returns its path.
    fn config(&self) -> PathBuf {
        let path = self.0.join("node.toml");
        std::fs::write(&path, FAST_CONFIG).expect("write config");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One `mpreg server` process.
struct Server {
    name: String,
    url: String,
    child: Child,
}

impl Server {
    /// The process id (while it runs).
    fn pid(&self) -> String {
        self.child.id().expect("server is running").to_string()
    }

    /// The `HOST:PORT` it listens on.
    fn addr(&self) -> &str {
        self.url.strip_prefix("ws://").expect("ws:// URL")
    }

    /// Sends `signal` (`KILL`, `TERM`) and waits for the process to exit.
    async fn signal_and_wait(mut self, signal: &str) -> std::process::ExitStatus {
        let status = std::process::Command::new("kill")
            .args([format!("-{signal}"), self.pid()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {}", self.name);
        guard(
            &format!("{} exits after SIG{signal}", self.name),
            self.child.wait(),
        )
        .await
        .expect("wait for server")
    }
}

/// Starts `mpreg server --name NAME --config CONFIG ARGS..`, listening on
/// `listen`; returns once it printed its URL.
async fn spawn_server(
    dir: &TempDir,
    test: &str,
    name: &str,
    listen: &str,
    args: &[&str],
) -> Server {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let config = dir.config();
    let stderr = match std::env::var_os("MPREG_PROCESS_TEST_LOGS") {
        Some(logs) => {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = Path::new(&logs).join(format!("{test}-{name}-{n}.log"));
            Stdio::from(std::fs::File::create(path).expect("create log file"))
        }
        None => Stdio::null(),
    };
    let mut child = tokio::process::Command::new(BIN)
        .arg("server")
        .args(["--listen", listen, "--name", name])
        .arg("--config")
        .arg(&config)
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info,mpreg=debug".to_owned()),
        )
        .stdout(Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn mpreg server");
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut lines = BufReader::new(stdout).lines();
    let line = guard(&format!("{name} prints its URL"), lines.next_line())
        .await
        .expect("read stdout")
        .unwrap_or_else(|| panic!("{name} exited before printing its URL"));
    let url = line
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line from {name}: {line:?}"))
        .to_owned();
    // Keep reading stdout, so the server never writes to a closed pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Server {
        name: name.to_owned(),
        url,
        child,
    }
}

async fn connect(server: &Server) -> Client {
    guard("connect", Client::connect(&server.url))
        .await
        .unwrap_or_else(|e| panic!("connect to {}: {e}", server.name))
}

/// The node's own view of the cluster (`mpreg.cluster`), checked to come
/// from the node the client is connected to.
async fn view(client: &Client, expected_self: &str) -> Value {
    let view: Value = guard("mpreg.cluster", client.call("mpreg.cluster", ()))
        .await
        .expect("mpreg.cluster answers");
    assert_eq!(
        view["self"], expected_self,
        "mpreg.cluster ran on the node asked: {view}"
    );
    view
}

/// The sorted names of the nodes in a view (the node itself included).
fn names(view: &Value) -> Vec<String> {
    let mut names: Vec<String> = view["nodes"]
        .as_array()
        .expect("nodes list")
        .iter()
        .map(|n| n["name"].as_str().expect("node name").to_owned())
        .collect();
    names.sort();
    names
}

/// The entry for `name` in a view.
fn entry<'v>(view: &'v Value, name: &str) -> Option<&'v Value> {
    view["nodes"]
        .as_array()
        .expect("nodes list")
        .iter()
        .find(|n| n["name"] == name)
}

/// Polls the view of the node behind `client` until `ready` holds for it;
/// returns that view.
async fn wait_view(
    client: &Client,
    node: &str,
    what: &str,
    mut ready: impl FnMut(&Value) -> bool,
) -> Value {
    let mut last = Value::Null;
    let waited = tokio::time::timeout(GUARD, async {
        loop {
            last = view(client, node).await;
            if ready(&last) {
                return last.clone();
            }
            tokio::time::sleep(POLL).await;
        }
    })
    .await;
    waited.unwrap_or_else(|_| panic!("hang guard: {node} never saw {what}; last view {last}"))
}

/// Waits until the node behind `client` sees exactly the nodes `want`.
async fn converge(client: &Client, node: &str, want: &[&str]) -> Value {
    let mut want: Vec<String> = want.iter().map(|s| (*s).to_owned()).collect();
    want.sort();
    wait_view(client, node, &format!("exactly {want:?}"), |v| {
        names(v) == want
    })
    .await
}

async fn whoami(client: &Client, locs: &[&str]) -> Result<String, mpreg::Error> {
    guard(
        "whoami",
        client.call_command(Command::new("w", "mpreg.whoami").datasets(locs.iter().copied())),
    )
    .await
}

/// Asserts `result` is an rpc error with `code`; returns it.
fn rpc_error<T: std::fmt::Debug>(
    result: Result<T, mpreg::Error>,
    code: ErrorCode,
) -> mpreg::RpcError {
    match result {
        Err(mpreg::Error::Rpc(e)) => {
            assert_eq!(e.code, code, "{e}");
            e
        }
        other => panic!("expected an rpc error {code:?}, got {other:?}"),
    }
}

/// Runs `mpreg ARGS..`; returns (success, stdout, stderr).
async fn run_cli(args: &[&str]) -> (bool, String, String) {
    let out = guard(
        "mpreg command",
        tokio::process::Command::new(BIN).args(args).output(),
    )
    .await
    .expect("run mpreg");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A (balancer, no datasets), B (model-a, model-b) and C (model-c), B and C
/// told only about A; returns once A sees all three.
async fn three(dir: &TempDir, test: &str) -> (Server, Server, Server, Client) {
    let a = spawn_server(dir, test, "A", "127.0.0.1:0", &[]).await;
    let b = spawn_server(
        dir,
        test,
        "B",
        "127.0.0.1:0",
        &[
            "--dataset",
            "model-a",
            "--dataset",
            "model-b",
            "--peer",
            &a.url,
        ],
    )
    .await;
    let c = spawn_server(
        dir,
        test,
        "C",
        "127.0.0.1:0",
        &["--dataset", "model-c", "--peer", &a.url],
    )
    .await;
    let client = connect(&a).await;
    converge(&client, "A", &["A", "B", "C"]).await;
    (a, b, c, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_route_by_dataset() {
    let test = "route";
    let dir = TempDir::new(test);
    let (a, b, c, client) = three(&dir, test).await;

    assert_eq!(whoami(&client, &["model-a"]).await.expect("B runs it"), "B");
    assert_eq!(whoami(&client, &["model-c"]).await.expect("C runs it"), "C");
    let e = rpc_error(
        whoami(&client, &["model-a", "model-c"]).await,
        ErrorCode::NoNodeForDatasets,
    );
    assert_eq!(e.command.as_deref(), Some("w"));

    for (i, example) in mpreg::demo::reference_examples().into_iter().enumerate() {
        let results = guard("reference example", client.send(example.request))
            .await
            .unwrap_or_else(|e| panic!("reference example {}: {e}", i + 1));
        assert_eq!(
            Value::Object(results.into_map()),
            example.expected,
            "reference example {}",
            i + 1
        );
    }

    // One command on B, one on C, and a final one that gathers both.
    let mixed = Request::new()
        .cmd(Command::new("on_b", "mpreg.whoami").dataset("model-a"))
        .cmd(Command::new("on_c", "mpreg.whoami").dataset("model-c"))
        .cmd(Command::new("both", "echos").arg("on_b").arg("on_c"));
    let results = guard("mixed request", client.send(mixed))
        .await
        .expect("mixed request runs");
    assert_eq!(
        Value::Object(results.into_map()),
        json!({"both": ["B", "C"]}),
        "only the sink comes back, through A"
    );

    // `mpreg cluster` shows A's view as a table...
    let (ok, out, err) = run_cli(&["cluster", &a.url]).await;
    assert!(ok, "mpreg cluster succeeds: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines.first(),
        Some(&"cluster as seen by A (3 nodes)"),
        "{out}"
    );
    let header = lines.get(1).copied().unwrap_or_default();
    for column in ["NAME", "ADDR", "STATUS", "LOAD", "JOBS SENT", "FUNCTIONS"] {
        assert!(header.contains(column), "header has {column}: {out}");
    }
    let row = |name: &str| {
        lines
            .iter()
            .find(|l| l.split_whitespace().next() == Some(name))
            .copied()
            .unwrap_or_else(|| panic!("no row for {name}: {out}"))
    };
    let (row_a, row_b, row_c) = (row("A"), row("B"), row("C"));
    assert_eq!(lines.len(), 5, "title, header and three rows: {out}");
    assert!(
        row_a.contains(a.addr()) && row_a.contains(" self "),
        "{row_a}"
    );
    assert!(
        row_a.contains("echo, echos, mpreg.cluster, mpreg.describe, mpreg.functions, mpreg.whoami"),
        "{row_a}"
    );
    assert!(
        row_b.contains(b.addr()) && row_b.contains(" up "),
        "{row_b}"
    );
    assert!(row_b.contains("mpreg.whoami[model-a,model-b]"), "{row_b}");
    assert!(
        row_c.contains(c.addr()) && row_c.contains("mpreg.whoami[model-c]"),
        "{row_c}"
    );
    assert!(out.contains("model-a"));

    // ... or as JSON.
    let (ok, out, err) = run_cli(&["cluster", &a.url, "--json"]).await;
    assert!(ok, "mpreg cluster --json succeeds: {err}");
    let shown: Value = serde_json::from_str(&out).expect("--json prints JSON");
    assert_eq!(shown["self"], "A");
    assert_eq!(names(&shown), ["A", "B", "C"]);

    // Against nothing, it fails with the error.
    let (ok, _, err) = run_cli(&["cluster", "ws://127.0.0.1:1"]).await;
    assert!(!ok, "mpreg cluster fails on an unreachable node");
    assert!(err.contains("cannot connect"), "{err}");

    for server in [c, b, a] {
        let exit = server.signal_and_wait("TERM").await;
        assert!(exit.success(), "clean exit: {exit:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_call_gives_node_lost_then_restart_is_routable() {
    let test = "sigkill";
    let dir = TempDir::new(test);
    let a = spawn_server(&dir, test, "A", "127.0.0.1:0", &[]).await;
    let b_args = ["--diagnostics", "--dataset", "model-a", "--peer", &a.url];
    let b = spawn_server(&dir, test, "B", "127.0.0.1:0", &b_args).await;
    let b_addr = b.addr().to_owned();
    let client = connect(&a).await;
    let before = converge(&client, "A", &["A", "B"]).await;
    let first_generation = entry(&before, "B").expect("B")["generation"].clone();

    let call = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .call_command::<u64>(
                    Command::new("nap", "debug.sleep")
                        .arg(10_000)
                        .dataset("model-a"),
                )
                .await
        }
    });
    // The call is running on B once A counts it in B's load.
    wait_view(&client, "A", "B with load 1", |v| {
        entry(v, "B").is_some_and(|b| b["load"] == 1)
    })
    .await;
    let exit = b.signal_and_wait("KILL").await;
    assert!(!exit.success(), "B was killed: {exit:?}");

    let outcome = guard("the call on the killed node ends", call)
        .await
        .expect("the call task did not panic");
    let e = rpc_error(outcome, ErrorCode::NodeLost);
    assert_eq!(e.command.as_deref(), Some("nap"));
    converge(&client, "A", &["A"]).await;
    rpc_error(
        whoami(&client, &["model-a"]).await,
        ErrorCode::NoNodeForDatasets,
    );

    // B again, on the same port: a new generation, routable through A.
    let listen = b_addr.clone();
    let b = spawn_server(&dir, test, "B", &listen, &b_args).await;
    assert_eq!(b.addr(), b_addr, "restarted on the same port");
    let routable = tokio::time::timeout(GUARD, async {
        loop {
            match whoami(&client, &["model-a"]).await {
                Ok(who) => return who,
                Err(mpreg::Error::Rpc(e)) if e.code == ErrorCode::NoNodeForDatasets => {}
                Err(e) => panic!("unexpected error while B rejoins: {e}"),
            }
            tokio::time::sleep(POLL).await;
        }
    })
    .await
    .expect("hang guard: the restarted B never became routable");
    assert_eq!(routable, "B");
    let after = converge(&client, "A", &["A", "B"]).await;
    let b_entry = entry(&after, "B").expect("B");
    assert_eq!(b_entry["addr"], b_addr.as_str());
    assert_ne!(
        b_entry["generation"], first_generation,
        "the restarted B is a new generation"
    );

    for server in [b, a] {
        let exit = server.signal_and_wait("TERM").await;
        assert!(exit.success(), "clean exit: {exit:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_sigterm_leaves_at_once() {
    let test = "sigterm";
    let dir = TempDir::new(test);
    let (a, b, c, client_a) = three(&dir, test).await;
    let client_b = connect(&b).await;
    converge(&client_b, "B", &["A", "B", "C"]).await;

    let exit = c.signal_and_wait("TERM").await;
    assert!(exit.success(), "C exits cleanly on SIGTERM: {exit:?}");

    converge(&client_a, "A", &["A", "B"]).await;
    converge(&client_b, "B", &["A", "B"]).await;
    rpc_error(
        whoami(&client_a, &["model-c"]).await,
        ErrorCode::NoNodeForDatasets,
    );

    for server in [b, a] {
        let exit = server.signal_and_wait("TERM").await;
        assert!(exit.success(), "clean exit: {exit:?}");
    }
}

/// Large messages keep a node's runtime busy; that must not make its peers
/// think it died.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_link_is_not_a_dead_node() {
    let test = "busy";
    let dir = TempDir::new(test);
    let a = spawn_server(&dir, test, "A", "127.0.0.1:0", &[]).await;
    let b = spawn_server(
        &dir,
        test,
        "B",
        "127.0.0.1:0",
        &["--dataset", "model-a", "--peer", &a.url],
    )
    .await;
    let client = connect(&a).await;
    let client_b = connect(&b).await;
    let before = converge(&client, "A", &["A", "B"]).await;
    converge(&client_b, "B", &["A", "B"]).await;
    let generation = entry(&before, "B").expect("B")["generation"].clone();
    // No link yet, or one: jobs sent over it so far.
    let jobs_before = entry(&before, "B").expect("B")["jobs_sent"]
        .as_u64()
        .unwrap_or(0);
    // A member declared down rejoins with a renewed identity (a higher
    // identity version), so these must not move either.
    let identity = |view: &Value| view["nodes"][0]["gossip"]["identity_version"].clone();
    let (identity_a, identity_b) = (
        identity(&view(&client, "A").await),
        identity(&view(&client_b, "B").await),
    );
    assert!(
        identity_a.is_u64() && identity_b.is_u64(),
        "gossip identity shown"
    );

    // 24 MiB each; three at once from one client, all through A to B.
    let big: String = "0123456789abcdef".repeat(24 << 16);
    assert_eq!(big.len(), 24 << 20);
    let echo = |tag: char| {
        let mut arg = big.clone();
        arg.replace_range(0..1, &tag.to_string());
        let client = client.clone();
        async move {
            let back: String = client
                .call_command(
                    Command::new("e", "echo")
                        .arg(arg.clone())
                        .dataset("model-a"),
                )
                .await
                .unwrap_or_else(|e| panic!("echo {tag}: {e}"));
            back == arg
        }
    };
    let (x, y, z) = guard("three large echoes", async {
        tokio::join!(echo('x'), echo('y'), echo('z'))
    })
    .await;
    assert!(x && y && z, "every large echo came back unchanged");

    // B was never declared down and re-admitted: same node, same run.
    let after = converge(&client, "A", &["A", "B"]).await;
    let b_entry = entry(&after, "B").expect("B");
    assert_eq!(b_entry["generation"], generation);
    assert_eq!(b_entry["status"], "up");
    assert_eq!(
        b_entry["jobs_sent"].as_u64(),
        Some(jobs_before + 3),
        "the three echoes went to B over the same link: {b_entry}"
    );
    assert_eq!(identity(&view(&client, "A").await), identity_a);
    assert_eq!(identity(&view(&client_b, "B").await), identity_b);
    converge(&client_b, "B", &["A", "B"]).await;
    assert_eq!(whoami(&client, &["model-a"]).await.expect("B"), "B");

    for server in [b, a] {
        let exit = server.signal_and_wait("TERM").await;
        assert!(exit.success(), "clean exit: {exit:?}");
    }
}
