//! Soak: separate `mpreg server` processes under steady load while workers
//! are killed (SIGKILL) and restarted at random. Every request must get an
//! answer (a result, or an error such as `node_lost`); none may be lost.
//!
//! Not part of the normal test run (it takes minutes):
//!
//! ```text
//! MPREG_SOAK_SECS=120 cargo test --release --test soak -- --ignored --nocapture
//! ```

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mpreg::{Client, Command, Request};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command as Process};
use tokio::sync::Mutex;

const BIN: &str = env!("CARGO_BIN_EXE_mpreg");
/// A request's own deadline.
const DEADLINE: Duration = Duration::from_secs(5);
/// Past this a request counts as lost: its deadline, plus failure
/// detection, plus a generous margin.
const LOST_AFTER: Duration = Duration::from_secs(20);

fn config_file() -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("mpreg-soak-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        "probe_interval_ms = 200\nsuspect_timeout_ms = 1000\n",
    )
    .expect("write config");
    path
}

/// Starts `mpreg server` on `listen` with `args`; returns it and its URL.
async fn server(listen: &str, args: &[String]) -> (Child, String) {
    let mut child = Process::new(BIN)
        .args(["server", "--listen", listen, "--config"])
        .arg(config_file())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn mpreg server");
    let stdout = child.stdout.take().expect("piped");
    let line = tokio::time::timeout(
        Duration::from_secs(30),
        BufReader::new(stdout).lines().next_line(),
    )
    .await
    .expect("server starts in time")
    .expect("read stdout")
    .expect("a line");
    let url = line
        .strip_prefix("listening on ")
        .expect("listening line")
        .to_owned();
    (child, url)
}

fn kill(child: &Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
}

/// Outcomes by kind: "ok", an error code, "lost".
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    outcomes: std::sync::Mutex<BTreeMap<String, u64>>,
}

impl Tally {
    fn record(&self, outcome: &str) {
        let mut o = self
            .outcomes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *o.entry(outcome.to_owned()).or_default() += 1;
    }
}

/// One request of the mix: an idempotent echo (retried elsewhere when its
/// node dies), a non-idempotent sleep, or a chain across the workers.
fn request(i: u64) -> Request {
    let r = match i % 3 {
        0 => Request::new().cmd(Command::new("e", "echo").arg(i).dataset("w")),
        1 => Request::new().cmd(
            Command::new("s", "debug.sleep")
                .arg(20 + i % 80)
                .dataset("w"),
        ),
        _ => Request::new()
            .cmd(Command::new("a", "echo").arg(i).dataset("w"))
            .cmd(Command::new("b", "echos").arg("a").arg("x").dataset("w")),
    };
    r.timeout(DEADLINE)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long: run with --ignored (see the file's docs)"]
async fn soak_with_random_kills() {
    let seconds: u64 = std::env::var("MPREG_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let (_balancer, balancer_url) =
        server("127.0.0.1:0", &["--name".into(), "balancer".into()]).await;
    let mut workers = Vec::new();
    for i in 0..3 {
        let args: Vec<String> = [
            "--name",
            &format!("w{i}"),
            "--dataset",
            "w",
            "--diagnostics",
            "--peer",
            &balancer_url,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let (child, url) = server("127.0.0.1:0", &args).await;
        workers.push((child, url, args));
    }
    let workers = Arc::new(Mutex::new(workers));
    let client = Client::connect(&balancer_url).await.expect("connect");
    // Wait until the balancer routes to the workers.
    let ready = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let r = client
                .call_command::<String>(Command::new("w", "mpreg.whoami").dataset("w"))
                .await;
            if r.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(ready.is_ok(), "the workers joined");

    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let mut load = Vec::new();
    for task in 0..16u64 {
        let client = client.clone();
        let tally = tally.clone();
        load.push(tokio::spawn(async move {
            let mut i = task;
            while Instant::now() < until {
                tally.sent.fetch_add(1, Ordering::Relaxed);
                match tokio::time::timeout(LOST_AFTER, client.send(request(i))).await {
                    Ok(Ok(_)) => tally.record("ok"),
                    Ok(Err(mpreg::Error::Rpc(e))) => tally.record(e.code.as_str()),
                    Ok(Err(e)) => tally.record(&format!("client: {e}")),
                    Err(_) => tally.record("lost"),
                }
                i += 16;
            }
        }));
    }

    // The killer: every 2-4 s, SIGKILL a worker, restart it on its port.
    let mut kills = 0u64;
    let mut seed = std::process::id() as u64 | 1;
    while Instant::now() + Duration::from_secs(5) < until {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        tokio::time::sleep(Duration::from_millis(2000 + seed % 2000)).await;
        let mut w = workers.lock().await;
        let victim = (seed % w.len() as u64) as usize;
        let (child, url, args) = &mut w[victim];
        kill(child);
        let _ = child.wait().await;
        kills += 1;
        tokio::time::sleep(Duration::from_millis(300 + seed % 700)).await;
        let port = url.rsplit(':').next().unwrap_or("0").to_owned();
        let (restarted, new_url) = server(&format!("127.0.0.1:{port}"), args).await;
        *child = restarted;
        *url = new_url;
    }
    for task in load {
        task.await.expect("load task");
    }
    let outcomes = tally
        .outcomes
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let sent = tally.sent.load(Ordering::Relaxed);
    let answered: u64 = outcomes
        .iter()
        .filter(|(k, _)| *k != "lost")
        .map(|(_, n)| n)
        .sum();
    println!(
        "soak: {:?}, {kills} worker kills and restarts, {sent} requests sent, {answered} answered: {outcomes:?}",
        started.elapsed()
    );
    assert_eq!(
        outcomes.get("lost").copied().unwrap_or(0),
        0,
        "no request may be lost"
    );
    assert_eq!(answered, sent, "every request answered");
    assert!(outcomes.get("ok").copied().unwrap_or(0) > 0);
}
