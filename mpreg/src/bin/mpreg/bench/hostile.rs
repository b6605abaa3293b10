//! `mpreg bench hostile`: a well-behaved client on a node left alone, then
//! on the same node while hostile neighbours try to exhaust it or break it
//! for others.
//!
//! One `mpreg server` process (this executable) runs on a free loopback
//! port with a client token and a cluster secret. The well-behaved client
//! (one raw WebSocket connection with the token in its upgrade) sends
//! sequential `echo` requests for N seconds, twice: once with the node to
//! itself (idle), once while every attacker below runs at once (attack).
//! Every attacker connects only to the node's loopback address, is bounded
//! in count and time, stops by itself at the end of the attack run, and
//! records what happened to it: the error codes it received, the close
//! codes and reasons, the HTTP status of refused upgrades.
//!
//! - doubling references: a 1.2 KB request `a = echo("x" * 100)`, then 22
//!   levels `l(i) = echos(l(i-1), l(i-1))` (2^22 copies of `a` when
//!   nothing stops it), sent over and over with a token;
//! - silent connections: about 2,000 upgrades without a token that never
//!   send a message (fewer when the open-files limit is low);
//! - a `stream: true` request with a 1 MiB `u` and 1,500 commands (each
//!   progress message carries the `u`), from a client that never reads;
//! - four 60 MiB first messages from clients without a token;
//! - a `peer-hello` with no proof, over and over (every other one with a
//!   challenge nonce, as a real dialer sends), recording whether any answer
//!   reveals the node's name;
//! - 200 pipelined 1 MiB `echo` requests on a connection that never reads;
//! - a ping flood (2 million small pings) on a connection that never reads;
//! - a request whose argument nests 10,000 levels deep, over and over
//!   (expected: `bad_request` carrying its `u`).
//!
//! The node's memory is sampled every 100 ms (`VmRSS`, `VmHWM` from
//! `/proc/PID/status`); past `--max-rss-mib` the node is killed and the
//! attack stops, to protect the machine. The report: the well-behaved
//! client's success rate (the command fails unless it is 100 % in both
//! runs) and its p50, p99 and max idle and under attack, the node's peak
//! RSS in both runs, and one line per attacker.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::http::header::AUTHORIZATION;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Bytes, Error as WsError, Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;

use super::*;

/// The client token the node accepts.
const TOKEN: &str = "hostile-bench-token";
/// The node's cluster secret (no attacker knows it).
const SECRET: &str = "hostile-bench-cluster-secret";
/// The node's name: distinctive, so that an answer revealing it is seen.
const NODE_NAME: &str = "hostile-bench-node-5c1e";

/// How long the well-behaved client (and a repeated attacker) waits for
/// one reply.
const REPLY_WAIT: Duration = Duration::from_secs(10);
/// How long an upgrade may take.
const CONNECT_WAIT: Duration = Duration::from_secs(5);
/// How long a connection that never read is read at the end of the attack,
/// to see what the node left for it.
const DRAIN: Duration = Duration::from_secs(2);
/// Every attacker has finished this long after the end of the attack run
/// (else it is aborted and says so).
const GRACE: Duration = Duration::from_secs(20);
/// How often the node's memory is sampled.
const SAMPLE: Duration = Duration::from_millis(100);

const DOUBLING_LEVELS: usize = 22;
const SILENT_CONNECTIONS: usize = 2000;
const STREAM_U_BYTES: usize = 1 << 20;
const STREAM_COMMANDS: usize = 1500;
const BIG_FIRST_BYTES: usize = 60 << 20;
const BIG_FIRST_CLIENTS: usize = 4;
/// How long after the end of the run a huge first message may still be
/// sent.
const BIG_FIRST_OVERTIME: Duration = Duration::from_secs(5);
const PIPELINED: usize = 200;
const PIPELINED_BYTES: usize = 1 << 20;
const PINGS: u64 = 2_000_000;
const NESTING: usize = 10_000;

/// Options of `mpreg bench hostile`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HostileOptions {
    /// Length of each run (idle, attack).
    pub(crate) duration: Duration,
    pub(crate) json: bool,
    /// The node is killed (and the attack stopped) past this RSS.
    pub(crate) max_rss_mib: u64,
}

// ---------------------------------------------------------------------------
// The requests (pure)
// ---------------------------------------------------------------------------

/// `a = echo("x" * 100)`, then `l1 = echos(a, a)`, ...,
/// `l<levels> = echos(l<levels-1>, l<levels-1>)`: each level doubles the
/// result (2^levels copies of `a` at the end).
fn doubling_request(u: &str, levels: usize) -> String {
    let mut cmds = vec![json!({"name": "a", "fun": "echo", "args": ["x".repeat(100)]})];
    for i in 1..=levels {
        let prev = if i == 1 {
            "a".to_owned()
        } else {
            format!("l{}", i - 1)
        };
        cmds.push(json!({"name": format!("l{i}"), "fun": "echos", "args": [prev, prev]}));
    }
    json!({"role": "rpc", "u": u, "cmds": cmds}).to_string()
}

/// A request whose one argument is `depth` nested arrays (`u` first, so
/// that a reader can find it before the nesting).
fn nested_request(u: &str, depth: usize) -> String {
    let mut out = String::with_capacity(2 * depth + 128);
    let _ = write!(
        out,
        "{{\"u\":{},\"role\":\"rpc\",\"cmds\":[{{\"name\":\"a\",\"fun\":\"echo\",\"args\":[",
        Value::from(u)
    );
    out.extend(std::iter::repeat_n('[', depth));
    out.extend(std::iter::repeat_n(']', depth));
    out.push_str("]}]}");
    out
}

/// A streaming request with a `u` of `u_bytes` bytes and `commands`
/// independent `echo` commands: every progress message carries the `u`.
fn stream_request(u_bytes: usize, commands: usize) -> String {
    let cmds: Vec<Value> = (0..commands)
        .map(|i| json!({"name": format!("c{i}"), "fun": "echo", "args": [i]}))
        .collect();
    json!({"role": "rpc", "u": "u".repeat(u_bytes), "stream": true, "cmds": cmds}).to_string()
}

/// A request of about `bytes` bytes: one `echo` of a long string.
fn echo_of_size(u: &str, bytes: usize) -> String {
    json!({"role": "rpc", "u": u, "cmds": [{"name": "a", "fun": "echo", "args": ["x".repeat(bytes)]}]})
        .to_string()
}

/// A peer's hello that proves nothing (with a challenge `nonce`, as a
/// dialer of a cluster with a secret sends, or without).
fn peer_hello(nonce: Option<&str>) -> String {
    let mut body = json!({
        "protocol": 1,
        "name": "x",
        "addr": null,
        "generation": 1,
        "catalog": {"version": 1, "functions": []},
    });
    if let Some(nonce) = nonce {
        body["nonce"] = json!(nonce);
    }
    json!({"role": "peer-hello", "body": body}).to_string()
}

/// A 32-byte challenge nonce in hex, different for each `n`.
fn nonce_hex(n: u64) -> String {
    let mut x = n ^ 0x9e37_79b9_7f4a_7c15;
    let mut out = String::with_capacity(64);
    for _ in 0..4 {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let _ = write!(out, "{x:016x}");
    }
    out
}

// ---------------------------------------------------------------------------
// What attackers see (pure)
// ---------------------------------------------------------------------------

/// What a message from the node is: `error CODE`, `reply ok`, `progress`,
/// `ROLE message`...
fn message_label(bytes: &[u8]) -> String {
    let Ok(v) = serde_json::from_slice::<Value>(bytes) else {
        return "a message that is not JSON".into();
    };
    if let Some(e) = v.get("error").filter(|e| !e.is_null()) {
        return format!(
            "error {}",
            e.get("code").and_then(Value::as_str).unwrap_or("?")
        );
    }
    match v.get("role").and_then(Value::as_str) {
        Some("rpc-progress") => "progress".into(),
        Some("rpc-response") => "reply ok".into(),
        None if v.get("r").is_some() => "reply ok".into(),
        Some(role) => format!("{role} message"),
        None => "a message without a role".into(),
    }
}

/// The reply to request `u` in `bytes`: its label, with `, u null` when the
/// reply lost the id; `None` for a message that answers another request.
fn reply_label(bytes: &[u8], u: &str) -> Option<String> {
    let Ok(v) = serde_json::from_slice::<Value>(bytes) else {
        return Some("a reply that is not JSON".into());
    };
    let id = v.get("u").unwrap_or(&Value::Null);
    if !id.is_null() && id.as_str() != Some(u) {
        return None;
    }
    let label = message_label(bytes);
    if label == "progress" {
        return None;
    }
    Some(if id.is_null() {
        format!("{label}, u null")
    } else {
        label
    })
}

fn close_text(frame: Option<&CloseFrame>) -> String {
    match frame {
        Some(f) if f.reason.is_empty() => format!("closed {}", u16::from(f.code)),
        Some(f) => format!("closed {} \"{}\"", u16::from(f.code), f.reason.as_str()),
        None => "closed (no code)".into(),
    }
}

fn gone_text(e: &WsError) -> String {
    match e {
        WsError::ConnectionClosed | WsError::AlreadyClosed => "connection closed".into(),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            "dropped (no close frame)".into()
        }
        WsError::Io(io) => format!("connection failed: {}", io.kind()),
        WsError::Protocol(p) => format!("protocol error: {p}"),
        WsError::Capacity(c) => format!("too big for this client: {c}"),
        other => other.to_string(),
    }
}

/// What happened to one attacker (or one kind of attacker).
#[derive(Debug, Default)]
struct Tally {
    /// Requests, messages or connections sent.
    sent: u64,
    /// What it saw, and how many times.
    seen: BTreeMap<String, u64>,
    notes: Vec<String>,
}

impl Tally {
    fn saw(&mut self, what: impl Into<String>) {
        self.saw_n(what, 1);
    }

    fn saw_n(&mut self, what: impl Into<String>, n: u64) {
        if n > 0 {
            *self.seen.entry(what.into()).or_default() += n;
        }
    }

    fn merge(&mut self, other: Tally) {
        self.sent += other.sent;
        for (what, n) in other.seen {
            self.saw_n(what, n);
        }
        self.notes.extend(other.notes);
    }

    fn failed(why: String) -> Self {
        let mut t = Self::default();
        t.saw(why);
        t
    }

    /// `most seen x N; next x M; note`.
    fn summary(&self) -> String {
        let mut seen: Vec<(&String, &u64)> = self.seen.iter().collect();
        seen.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let mut parts: Vec<String> = seen
            .into_iter()
            .map(|(what, &n)| {
                if n == 1 {
                    what.clone()
                } else {
                    format!("{what} x{}", thousands(n))
                }
            })
            .collect();
        parts.extend(self.notes.iter().cloned());
        if parts.is_empty() {
            "nothing".into()
        } else {
            parts.join("; ")
        }
    }
}

// ---------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------

/// Attackers accept messages up to 128 MiB (a larger one is an error, not
/// memory of this process).
fn attack_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(128 << 20))
        .max_frame_size(Some(128 << 20))
}

/// Opens a WebSocket to `url`, with `Authorization: Bearer TOKEN` when
/// `token` is given. The error is a label: `refused: HTTP 503`, ...
async fn open(url: &str, token: Option<&str>, config: WebSocketConfig) -> Result<Ws, String> {
    let mut request = url
        .into_client_request()
        .map_err(|e| format!("bad URL: {e}"))?;
    if let Some(token) = token {
        let value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|e| e.to_string())?;
        request.headers_mut().insert(AUTHORIZATION, value);
    }
    let connect = tokio_tungstenite::connect_async_with_config(request, Some(config), true);
    match tokio::time::timeout(CONNECT_WAIT, connect).await {
        Err(_) => Err(format!(
            "upgrade not answered within {} s",
            CONNECT_WAIT.as_secs()
        )),
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(WsError::Http(response))) => {
            Err(format!("refused: HTTP {}", response.status().as_u16()))
        }
        Ok(Err(e)) => Err(format!("upgrade failed: {}", gone_text(&e))),
    }
}

/// Reads until the reply to `u`, the end of the connection, or `wait`.
/// Returns the reply's label and whether the connection is still usable.
async fn reply_to(ws: &mut Ws, u: &str, wait: Duration) -> (String, bool) {
    let read = async {
        loop {
            let bytes = match ws.next().await {
                Some(Ok(Message::Text(t))) => Bytes::from(t),
                Some(Ok(Message::Binary(b))) => b,
                Some(Ok(Message::Close(f))) => return (close_text(f.as_ref()), false),
                Some(Ok(_)) => continue,
                None => return ("dropped (no close frame)".to_owned(), false),
                Some(Err(e)) => return (gone_text(&e), false),
            };
            if let Some(label) = reply_label(&bytes, u) {
                return (label, true);
            }
        }
    };
    match tokio::time::timeout(wait, read).await {
        Ok(seen) => seen,
        Err(_) => (format!("no reply within {} s", wait.as_secs()), false),
    }
}

/// Reads what the node sends on a connection for at most `budget`, until
/// it closes; records each kind of message (prefixed) and how it ended.
async fn drain(ws: &mut Ws, budget: Duration, prefix: &str, tally: &mut Tally) {
    let end = tokio::time::Instant::now() + budget;
    let mut read: BTreeMap<String, u64> = BTreeMap::new();
    loop {
        let bytes = match tokio::time::timeout_at(end, ws.next()).await {
            Err(_) => {
                tally.saw(format!(
                    "still open after {:.0} s of reading",
                    budget.as_secs_f64()
                ));
                break;
            }
            Ok(Some(Ok(Message::Text(t)))) => Bytes::from(t),
            Ok(Some(Ok(Message::Binary(b)))) => b,
            Ok(Some(Ok(Message::Pong(_)))) => {
                *read.entry("pong".into()).or_default() += 1;
                continue;
            }
            Ok(Some(Ok(Message::Ping(_) | Message::Frame(_)))) => continue,
            Ok(Some(Ok(Message::Close(f)))) => {
                tally.saw(close_text(f.as_ref()));
                break;
            }
            Ok(None) => {
                tally.saw("dropped (no close frame)");
                break;
            }
            Ok(Some(Err(e))) => {
                tally.saw(gone_text(&e));
                break;
            }
        };
        *read.entry(message_label(&bytes)).or_default() += 1;
    }
    for (what, n) in read {
        tally.saw_n(format!("{prefix}{what}"), n);
    }
}

// ---------------------------------------------------------------------------
// The node and its memory
// ---------------------------------------------------------------------------

/// The node process and what the watcher saw of it.
struct Watch {
    child: Mutex<Child>,
    pid: u32,
    max_rss_kib: u64,
    /// Highest VmRSS sampled, KiB.
    peak_rss_kib: AtomicU64,
    /// Last VmHWM read, KiB (kept when the process is gone).
    hwm_kib: AtomicU64,
    /// The current run and when it started, for the messages.
    phase: Mutex<(&'static str, Instant)>,
    /// Why the node is gone, when it is.
    ended: Mutex<Option<String>>,
    /// Cancelled when the node is gone: the attack stops.
    stop: CancellationToken,
    /// Set when the run is over: the watcher stops.
    done: AtomicBool,
}

impl Watch {
    fn phase(&self, name: &'static str) {
        *self.phase.lock().unwrap_or_else(PoisonError::into_inner) = (name, Instant::now());
    }

    fn end(&self, why: String) {
        self.ended
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(why);
        self.stop.cancel();
    }

    fn ended(&self) -> Option<String> {
        self.ended
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reads VmHWM now (the last value seen when the node is gone), MiB.
    fn hwm_mib(&self) -> f64 {
        if let Ok(mib) = status_mib(self.pid, "VmHWM")
            && self.ended().is_none()
        {
            return mib;
        }
        self.hwm_kib.load(Ordering::Relaxed) as f64 / 1024.0
    }

    /// One sample; false once the node is gone.
    fn sample(&self) -> bool {
        let exited = self
            .child
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .try_wait();
        if let Ok(Some(status)) = exited {
            self.end(format!(
                "the node exited by itself ({status}) {}",
                self.when()
            ));
            return false;
        }
        let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", self.pid)) else {
            return true;
        };
        if let Some(hwm) = status_kib(&status, "VmHWM") {
            self.hwm_kib.store(hwm, Ordering::Relaxed);
        }
        let Some(rss) = status_kib(&status, "VmRSS") else {
            return true;
        };
        self.peak_rss_kib.fetch_max(rss, Ordering::Relaxed);
        if rss > self.max_rss_kib {
            let _ = self
                .child
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .0
                .kill();
            self.end(format!(
                "the node's RSS reached {:.0} MiB, past --max-rss-mib {}: it was killed {} and the attack stopped",
                rss as f64 / 1024.0,
                self.max_rss_kib / 1024,
                self.when()
            ));
            return false;
        }
        true
    }

    fn when(&self) -> String {
        let (name, at) = *self.phase.lock().unwrap_or_else(PoisonError::into_inner);
        format!("{:.1} s into the {name} run", at.elapsed().as_secs_f64())
    }
}

/// Samples the node every 100 ms on a thread of its own (a busy runtime
/// cannot delay it) until it is gone or `watch.done` is set.
fn watch_node(watch: Arc<Watch>) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("rss-watch".into())
        .spawn(move || {
            while !watch.done.load(Ordering::Relaxed) && watch.sample() {
                std::thread::sleep(SAMPLE);
            }
        })
}

// ---------------------------------------------------------------------------
// The well-behaved client
// ---------------------------------------------------------------------------

/// One `echo` of "hi" as request `id` on `ws`: Ok, or why not and whether
/// the connection is still usable.
async fn echo_once(ws: &mut Ws, template: &Template, id: u64) -> Result<(), (String, bool)> {
    if let Err(e) = ws.send(Message::text(template.frame(id))).await {
        return Err((format!("send failed: {}", gone_text(&e)), false));
    }
    let read = async {
        loop {
            let bytes = match ws.next().await {
                Some(Ok(Message::Text(t))) => Bytes::from(t),
                Some(Ok(Message::Binary(b))) => b,
                Some(Ok(Message::Close(f))) => {
                    return Err((
                        format!("the node closed the connection: {}", close_text(f.as_ref())),
                        false,
                    ));
                }
                Some(Ok(_)) => continue,
                None => return Err(("dropped (no close frame)".to_owned(), false)),
                Some(Err(e)) => return Err((gone_text(&e), false)),
            };
            match check_reply(&bytes) {
                Checked::Ok(u) if u == id => {
                    let v: Value = serde_json::from_slice(&bytes).unwrap_or_default();
                    return if v["r"]["a"] == "hi" {
                        Ok(())
                    } else {
                        Err((format!("wrong result: {}", v["r"]), true))
                    };
                }
                Checked::Failed(u, e) if u == id => return Err((e, true)),
                _ => continue,
            }
        }
    };
    match tokio::time::timeout(REPLY_WAIT, read).await {
        Ok(outcome) => outcome,
        Err(_) => Err((format!("no reply within {} s", REPLY_WAIT.as_secs()), false)),
    }
}

/// Sequential `echo` requests until `until` (or `stop`), on `first` and,
/// when a connection is lost, on a new one. Every request sent and every
/// connection that could not be opened is an attempt; `ok` of `sent`
/// succeeded.
async fn well_behaved(
    url: &str,
    first: Result<Ws, String>,
    until: Instant,
    window: Duration,
    stop: &CancellationToken,
) -> Report {
    let template = Template::echo();
    let mut report = Report::new(window);
    let mut ws = match first {
        Ok(ws) => Some(ws),
        Err(e) => {
            report.sent += 1;
            report.error(1, format!("cannot connect: {e}"));
            None
        }
    };
    let mut id = 0;
    while Instant::now() < until && !stop.is_cancelled() {
        let Some(conn) = ws.as_mut() else {
            match open(url, Some(TOKEN), client_config()).await {
                Ok(new) => ws = Some(new),
                Err(e) => {
                    report.sent += 1;
                    report.error(1, format!("cannot connect: {e}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            continue;
        };
        id += 1;
        report.sent += 1;
        let at = Instant::now();
        let outcome = tokio::select! {
            outcome = echo_once(conn, &template, id) => outcome,
            _ = stop.cancelled() => Err(("the node is gone".to_owned(), false)),
        };
        match outcome {
            Ok(()) => {
                report.ok += 1;
                report.ok_total += 1;
                let us = u64::try_from(at.elapsed().as_micros()).unwrap_or(u64::MAX);
                report.latency.saturating_record(us.max(1));
            }
            Err((why, usable)) => {
                if why.starts_with("no reply within") {
                    report.timeouts += 1;
                    if report.first_error.is_none() {
                        report.first_error = Some(why);
                    }
                } else {
                    report.error(1, why);
                }
                if !usable {
                    ws = None;
                }
            }
        }
    }
    if let Some(mut ws) = ws {
        let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    }
    report
}

/// Runs the well-behaved client on a thread of its own, with its own
/// single-thread runtime, so that the attackers' work in this process does
/// not delay its tasks (they still share the machine's cores). Once it is
/// connected, `ready` gets the end of its run.
fn client_thread(
    url: String,
    secs: Duration,
    stop: CancellationToken,
) -> BenchResult<(
    std::thread::JoinHandle<Report>,
    tokio::sync::oneshot::Receiver<Instant>,
)> {
    let (ready, connected) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("well-behaved".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let mut report = Report::new(secs);
                    report.sent = 1;
                    report.error(1, format!("cannot start the client's runtime: {e}"));
                    let _ = ready.send(Instant::now());
                    return report;
                }
            };
            runtime.block_on(async move {
                let first = open(&url, Some(TOKEN), client_config()).await;
                let until = Instant::now() + secs;
                let _ = ready.send(until);
                well_behaved(&url, first, until, secs, &stop).await
            })
        })?;
    Ok((thread, connected))
}

/// Waits for the client's thread (it stops by itself: at most a reply wait
/// and a connection attempt after `until`).
async fn join_client(
    thread: std::thread::JoinHandle<Report>,
    until: Instant,
) -> BenchResult<Report> {
    let bound = tokio::time::Instant::from_std(until + REPLY_WAIT + CONNECT_WAIT * 2);
    match tokio::time::timeout_at(bound, tokio::task::spawn_blocking(move || thread.join())).await {
        Ok(Ok(Ok(report))) => Ok(report),
        Ok(Ok(Err(_))) => Err("the well-behaved client panicked".into()),
        Ok(Err(e)) => Err(format!("the well-behaved client's thread failed: {e}").into()),
        Err(_) => Err("the well-behaved client did not stop".into()),
    }
}

fn success_pct(r: &Report) -> f64 {
    if r.sent == 0 {
        0.0
    } else {
        r.ok as f64 * 100.0 / r.sent as f64
    }
}

// ---------------------------------------------------------------------------
// The attackers
// ---------------------------------------------------------------------------

/// What every attacker shares: where, until when, and the emergency stop.
struct Ctx {
    url: String,
    until: Instant,
    stop: CancellationToken,
}

impl Ctx {
    fn over(&self) -> bool {
        self.stop.is_cancelled() || Instant::now() >= self.until
    }

    /// Returns at the end of the attack run (or at the emergency stop).
    async fn ended(&self) {
        tokio::select! {
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(self.until)) => {}
            _ = self.stop.cancelled() => {}
        }
    }

    async fn pause(&self, d: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.ended() => {}
        }
    }
}

/// Sends `request(n)` over and over (with a token), one at a time, each
/// reply awaited; reconnects when the node closes the connection.
async fn repeat_requests(ctx: Arc<Ctx>, pace: Duration, request: fn(&str) -> String) -> Tally {
    let mut tally = Tally::default();
    let mut ws: Option<Ws> = None;
    let mut n = 0u64;
    while !ctx.over() {
        let Some(conn) = ws.as_mut() else {
            match open(&ctx.url, Some(TOKEN), attack_config()).await {
                Ok(new) => ws = Some(new),
                Err(e) => {
                    tally.saw(e);
                    ctx.pause(Duration::from_millis(100)).await;
                }
            }
            continue;
        };
        n += 1;
        let u = format!("h-{n}");
        tally.sent += 1;
        if let Err(e) = conn.send(Message::text(request(&u))).await {
            tally.saw(format!("send failed: {}", gone_text(&e)));
            ws = None;
            continue;
        }
        let (seen, usable) = reply_to(conn, &u, REPLY_WAIT).await;
        tally.saw(seen);
        if !usable {
            ws = None;
        }
        ctx.pause(pace).await;
    }
    tally
}

async fn doubling(ctx: Arc<Ctx>) -> Tally {
    repeat_requests(ctx, Duration::ZERO, |u| {
        doubling_request(u, DOUBLING_LEVELS)
    })
    .await
}

async fn deep_nesting(ctx: Arc<Ctx>) -> Tally {
    let mut tally = repeat_requests(ctx, Duration::from_millis(50), |u| {
        nested_request(u, NESTING)
    })
    .await;
    let kept = tally
        .seen
        .iter()
        .filter(|(what, _)| what.starts_with("error bad_request") && !what.ends_with("u null"))
        .map(|(_, n)| n)
        .sum::<u64>();
    tally.notes.push(format!(
        "bad_request with its u: {} of {}",
        thousands(kept),
        thousands(tally.sent)
    ));
    tally
}

/// Opens `want` connections without a token (200 upgrades at a time),
/// never sends,
/// and holds them until the end of the run.
async fn silent(ctx: Arc<Ctx>, want: usize) -> Tally {
    let mut tally = Tally::default();
    let mut holders: Vec<JoinHandle<(Vec<String>, Option<Duration>)>> = Vec::new();
    let started = Instant::now();
    let mut upgrades = futures_util::stream::iter(0..want)
        .map(|_| open(&ctx.url, None, attack_config()))
        .buffer_unordered(200);
    loop {
        let opened = tokio::select! {
            opened = upgrades.next() => opened,
            _ = ctx.ended() => None,
        };
        let Some(opened) = opened else { break };
        tally.sent += 1;
        match opened {
            Ok(ws) => holders.push(tokio::spawn(hold(ws, ctx.clone(), started))),
            Err(e) => tally.saw(e),
        }
    }
    // Upgrades still under way at the end are dropped.
    drop(upgrades);
    let upgraded = holders.len();
    let mut first_close: Option<Duration> = None;
    for holder in holders {
        match holder.await {
            Ok((seen, closed_at)) => {
                for what in seen {
                    tally.saw(what);
                }
                if let Some(at) = closed_at {
                    first_close = Some(first_close.map_or(at, |f| f.min(at)));
                }
            }
            Err(e) => tally.saw(format!("holder failed: {e}")),
        }
    }
    tally
        .notes
        .push(format!("{} upgraded", thousands(upgraded as u64)));
    if (tally.sent as usize) < want {
        tally.notes.push(format!(
            "{} upgrades not done by the end (dropped)",
            thousands((want - tally.sent as usize) as u64)
        ));
    }
    if let Some(at) = first_close {
        tally.notes.push(format!(
            "first closed by the node {:.1} s after the first upgrade",
            at.as_secs_f64()
        ));
    }
    tally
}

async fn hold(mut ws: Ws, ctx: Arc<Ctx>, started: Instant) -> (Vec<String>, Option<Duration>) {
    let mut seen = Vec::new();
    loop {
        let message = tokio::select! {
            m = ws.next() => m,
            _ = ctx.ended() => {
                seen.push("open at the end".to_owned());
                return (seen, None);
            }
        };
        let end = match message {
            Some(Ok(Message::Text(t))) => {
                seen.push(message_label(t.as_bytes()));
                continue;
            }
            Some(Ok(Message::Close(f))) => close_text(f.as_ref()),
            Some(Ok(_)) => continue,
            None => "dropped (no close frame)".to_owned(),
            Some(Err(e)) => gone_text(&e),
        };
        seen.push(end);
        return (seen, Some(started.elapsed()));
    }
}

/// One streaming request with a 1 MiB `u` and 1,500 commands; never reads.
async fn stream_never_read(ctx: Arc<Ctx>) -> Tally {
    let mut tally = Tally::default();
    let mut ws = match open(&ctx.url, Some(TOKEN), attack_config()).await {
        Ok(ws) => ws,
        Err(e) => return Tally::failed(e),
    };
    let request = stream_request(STREAM_U_BYTES, STREAM_COMMANDS);
    tally.sent = 1;
    tokio::select! {
        sent = ws.send(Message::text(request)) => {
            if let Err(e) = sent {
                tally.saw(format!("send failed: {}", gone_text(&e)));
                return tally;
            }
        }
        _ = ctx.ended() => tally.saw("request still being sent at the end"),
    }
    ctx.ended().await;
    drain(&mut ws, DRAIN, "read at the end: ", &mut tally).await;
    tally
}

/// One 60 MiB request as the first message of a connection without a
/// token; then what the node answers.
async fn big_first(ctx: Arc<Ctx>, payload: Utf8Bytes) -> Tally {
    let mut tally = Tally::default();
    let mut ws = match open(&ctx.url, None, attack_config()).await {
        Ok(ws) => ws,
        Err(e) => return Tally::failed(e),
    };
    tally.sent = 1;
    // The node may take long to read it: the send may finish a little
    // after the end of the run, to see what the node makes of it.
    let bound = tokio::time::Instant::from_std(ctx.until + BIG_FIRST_OVERTIME);
    tokio::select! {
        sent = ws.send(Message::Text(payload)) => {
            if let Err(e) = sent {
                tally.saw(format!("send failed: {}", gone_text(&e)));
            }
        }
        _ = tokio::time::sleep_until(bound) => {
            tally.saw(format!("still sending {} s after the end", BIG_FIRST_OVERTIME.as_secs()));
            return tally;
        }
        _ = ctx.stop.cancelled() => {
            tally.saw("still sending at the emergency stop");
            return tally;
        }
    }
    drain(&mut ws, Duration::from_secs(5), "", &mut tally).await;
    tally
}

async fn big_first_messages(ctx: Arc<Ctx>) -> Tally {
    let payload = Utf8Bytes::from(echo_of_size("big", BIG_FIRST_BYTES));
    let mut tally = Tally::default();
    for t in join_all((0..BIG_FIRST_CLIENTS).map(|_| big_first(ctx.clone(), payload.clone()))).await
    {
        tally.merge(t);
    }
    tally
}

/// `peer-hello` without proof, over and over (every other one with a
/// challenge nonce); what the node answers, and whether it names itself.
async fn peer_hellos(ctx: Arc<Ctx>) -> Tally {
    let mut tally = Tally::default();
    let mut revealed = 0u64;
    while !ctx.over() {
        tally.sent += 1;
        let with_nonce = tally.sent.is_multiple_of(2);
        let kind = if with_nonce { "with nonce" } else { "no nonce" };
        let mut ws = match open(&ctx.url, None, attack_config()).await {
            Ok(ws) => ws,
            Err(e) => {
                tally.saw(format!("{kind}: {e}"));
                ctx.pause(Duration::from_millis(100)).await;
                continue;
            }
        };
        let nonce = with_nonce.then(|| nonce_hex(tally.sent));
        if let Err(e) = ws.send(Message::text(peer_hello(nonce.as_deref()))).await {
            tally.saw(format!("{kind}: send failed: {}", gone_text(&e)));
            continue;
        }
        let seen = match tokio::time::timeout(Duration::from_secs(1), ws.next()).await {
            Err(_) => "no answer within 1 s".to_owned(),
            Ok(Some(Ok(Message::Text(t)))) if t.as_str().contains(NODE_NAME) => {
                revealed += 1;
                format!("answered with its name ({})", message_label(t.as_bytes()))
            }
            Ok(Some(Ok(Message::Text(t)))) => message_label(t.as_bytes()),
            Ok(Some(Ok(Message::Close(f)))) => close_text(f.as_ref()),
            Ok(Some(Ok(other))) => format!("{} frame", message_kind(&other)),
            Ok(None) => "dropped (no close frame)".to_owned(),
            Ok(Some(Err(e))) => gone_text(&e),
        };
        tally.saw(format!("{kind}: {seen}"));
        let _ = tokio::time::timeout(Duration::from_millis(200), ws.close(None)).await;
        ctx.pause(Duration::from_millis(20)).await;
    }
    tally.notes.push(format!(
        "name revealed in {} of {}",
        thousands(revealed),
        thousands(tally.sent)
    ));
    tally
}

fn message_kind(m: &Message) -> &'static str {
    match m {
        Message::Text(_) => "text",
        Message::Binary(_) => "binary",
        Message::Ping(_) => "ping",
        Message::Pong(_) => "pong",
        Message::Close(_) => "close",
        Message::Frame(_) => "raw",
    }
}

/// 200 pipelined 1 MiB `echo` requests; never reads.
async fn pipelined(ctx: Arc<Ctx>) -> Tally {
    let mut tally = Tally::default();
    let mut ws = match open(&ctx.url, Some(TOKEN), attack_config()).await {
        Ok(ws) => ws,
        Err(e) => return Tally::failed(e),
    };
    let template = echo_of_size("TEMPLATE-U", PIPELINED_BYTES);
    for i in 0..PIPELINED {
        if ctx.over() {
            break;
        }
        let frame = template.replacen("TEMPLATE-U", &format!("pipe-{i}"), 1);
        tokio::select! {
            sent = ws.send(Message::text(frame)) => {
                if let Err(e) = sent {
                    tally.saw(format!("send failed: {}", gone_text(&e)));
                    break;
                }
                tally.sent += 1;
            }
            _ = ctx.ended() => {
                tally.saw("writes blocked at the end");
                break;
            }
        }
    }
    ctx.ended().await;
    drain(&mut ws, DRAIN, "read at the end: ", &mut tally).await;
    tally
}

/// Up to 2 million 8-byte pings (1,000 per flush); never reads.
async fn ping_flood(ctx: Arc<Ctx>) -> Tally {
    const BATCH: u64 = 1000;
    let mut tally = Tally::default();
    let mut ws = match open(&ctx.url, Some(TOKEN), attack_config()).await {
        Ok(ws) => ws,
        Err(e) => return Tally::failed(e),
    };
    while tally.sent < PINGS && !ctx.over() {
        let batch = async {
            for _ in 0..BATCH {
                ws.feed(Message::Ping(Bytes::from_static(b"hostile!")))
                    .await?;
            }
            ws.flush().await
        };
        let sent = tokio::select! {
            sent = batch => sent,
            _ = ctx.ended() => {
                tally.saw("writes blocked at the end");
                break;
            }
        };
        match sent {
            Ok(()) => tally.sent += BATCH,
            Err(e) => {
                tally.saw(format!("send failed: {}", gone_text(&e)));
                break;
            }
        }
    }
    ctx.ended().await;
    drain(&mut ws, DRAIN, "read at the end: ", &mut tally).await;
    tally
}

/// One row of the attackers' table.
struct Attacker {
    name: &'static str,
    what: String,
    tally: Tally,
}

fn start_attackers(ctx: &Arc<Ctx>) -> Vec<(&'static str, String, JoinHandle<Tally>)> {
    let limit = open_files_limit();
    let silent_count = match limit {
        Some(l) => {
            SILENT_CONNECTIONS.min(usize::try_from(l.saturating_sub(400)).unwrap_or(usize::MAX))
        }
        None => SILENT_CONNECTIONS,
    };
    let mut silent_what = format!(
        "{} upgrades without a token, never send",
        thousands(silent_count as u64)
    );
    if silent_count < SILENT_CONNECTIONS {
        let _ = write!(silent_what, " (open-files limit {limit:?})");
    }
    let c = || ctx.clone();
    vec![
        (
            "doubling references",
            format!(
                "{} B request, {DOUBLING_LEVELS} levels echos(l, l), repeated",
                doubling_request("h-1", DOUBLING_LEVELS).len()
            ),
            tokio::spawn(doubling(c())),
        ),
        (
            "silent connections",
            silent_what,
            tokio::spawn(silent(c(), silent_count)),
        ),
        (
            "stream, never read",
            format!(
                "stream: true, {} KiB u, {} commands",
                STREAM_U_BYTES >> 10,
                thousands(STREAM_COMMANDS as u64)
            ),
            tokio::spawn(stream_never_read(c())),
        ),
        (
            "huge first messages",
            format!(
                "{BIG_FIRST_CLIENTS} x {} MiB first message, no token",
                BIG_FIRST_BYTES >> 20
            ),
            tokio::spawn(big_first_messages(c())),
        ),
        (
            "peer-hello, no proof",
            "repeated, with and without a nonce".to_owned(),
            tokio::spawn(peer_hellos(c())),
        ),
        (
            "pipelined, never read",
            format!("{PIPELINED} x {} MiB echo", PIPELINED_BYTES >> 20),
            tokio::spawn(pipelined(c())),
        ),
        (
            "ping flood, never read",
            format!("up to {} pings", thousands(PINGS)),
            tokio::spawn(ping_flood(c())),
        ),
        (
            "deep nesting",
            format!(
                "argument {} levels deep, repeated",
                thousands(NESTING as u64)
            ),
            tokio::spawn(deep_nesting(c())),
        ),
    ]
}

// ---------------------------------------------------------------------------
// The command
// ---------------------------------------------------------------------------

/// `mpreg bench hostile`.
pub(crate) async fn hostile(options: HostileOptions) -> BenchResult<()> {
    let secs = options.duration;
    if secs.is_zero() {
        return Err("--secs must be more than 0".into());
    }
    let progress = !options.json || std::io::IsTerminal::is_terminal(&std::io::stderr());
    let say = |what: &str| {
        if progress {
            eprint!("\r{:79}\r{what}", "");
        }
    };
    let port = free_port()?;
    let url = format!("ws://127.0.0.1:{port}");
    let child = spawn_server_with(
        port,
        &[
            ("MPREG_NAME", NODE_NAME),
            ("MPREG_CLIENT_TOKENS", TOKEN),
            ("MPREG_CLUSTER_SECRET", SECRET),
        ],
    )?;
    let pid = child.0.id();
    let stop = CancellationToken::new();
    let watch = Arc::new(Watch {
        child: Mutex::new(child),
        pid,
        max_rss_kib: options.max_rss_mib.saturating_mul(1024),
        peak_rss_kib: AtomicU64::new(0),
        hwm_kib: AtomicU64::new(0),
        phase: Mutex::new(("start", Instant::now())),
        ended: Mutex::new(None),
        stop: stop.clone(),
        done: AtomicBool::new(false),
    });
    // From here on, the node is killed when `watch` is dropped.
    let probe = until_accepting(&url, Duration::from_secs(10)).await?;
    drop(probe);
    let watcher = watch_node(watch.clone())?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Idle.
    say(&format!("idle run ({:.0} s)...", secs.as_secs_f64()));
    watch.phase("idle");
    let (client, connected) = client_thread(url.clone(), secs, stop.clone())?;
    let until = connected
        .await
        .map_err(|_| "the well-behaved client stopped before it started")?;
    let idle = join_client(client, until).await?;
    let idle_hwm = watch.hwm_mib();
    let idle_peak = watch.peak_rss_kib.swap(0, Ordering::Relaxed) as f64 / 1024.0;

    // Under attack: the client connects first, then every attacker starts.
    say(&format!("attack run ({:.0} s)...", secs.as_secs_f64()));
    watch.phase("attack");
    let (client, connected) = client_thread(url.clone(), secs, stop.clone())?;
    let until = connected
        .await
        .map_err(|_| "the well-behaved client stopped before it started")?;
    let ctx = Arc::new(Ctx {
        url: url.clone(),
        until,
        stop: stop.clone(),
    });
    let started = start_attackers(&ctx);
    let attacked = join_client(client, until).await;
    say("waiting for the attackers to stop...");
    let hard = tokio::time::Instant::from_std(ctx.until + GRACE);
    let mut attackers = Vec::with_capacity(started.len());
    for (name, what, mut handle) in started {
        let tally = match tokio::time::timeout_at(hard, &mut handle).await {
            Ok(Ok(tally)) => tally,
            Ok(Err(e)) => Tally::failed(format!("attacker failed: {e}")),
            Err(_) => {
                handle.abort();
                Tally::failed(format!(
                    "did not stop within {} s of the end: aborted",
                    GRACE.as_secs()
                ))
            }
        };
        attackers.push(Attacker { name, what, tally });
    }
    let attacked = attacked?;
    let attack_hwm = watch.hwm_mib();
    let attack_peak = watch.peak_rss_kib.load(Ordering::Relaxed) as f64 / 1024.0;

    // After: does the node still answer, and what does it hold?
    say("after the attack...");
    let mut after_ms = None;
    let mut after_error = None;
    let mut after_rss = None;
    if watch.ended().is_none() {
        tokio::time::sleep(Duration::from_secs(1)).await;
        after_rss = rss_mib(pid).ok();
        let at = Instant::now();
        match open(&url, Some(TOKEN), client_config()).await {
            Ok(mut ws) => match echo_once(&mut ws, &Template::echo(), 1).await {
                Ok(()) => after_ms = Some(at.elapsed().as_secs_f64() * 1e3),
                Err((why, _)) => after_error = Some(why),
            },
            Err(e) => after_error = Some(e),
        }
    } else {
        after_error = Some("the node is gone".into());
    }
    let ended = watch.ended();
    watch.done.store(true, Ordering::Relaxed);
    // Within one sample.
    let _ = tokio::task::spawn_blocking(move || watcher.join()).await;
    // Kills the node (the last reference to `watch`).
    drop(watch);
    say("");

    let ok = ended.is_none() && success_pct(&idle) >= 100.0 && success_pct(&attacked) >= 100.0;
    let q = |r: &Report, q: f64| r.quantile_us(q);
    let max = |r: &Report| {
        if r.latency.is_empty() {
            0
        } else {
            r.latency.max()
        }
    };
    let ratios = [
        ratio(q(&attacked, 0.5) as f64, q(&idle, 0.5) as f64),
        ratio(q(&attacked, 0.99) as f64, q(&idle, 0.99) as f64),
        ratio(max(&attacked) as f64, max(&idle) as f64),
    ];

    if options.json {
        let client = |r: &Report| {
            let mut v = r.json();
            v["success_pct"] = json!(round3(success_pct(r)));
            v
        };
        let out = json!({
            "secs": secs.as_secs_f64(),
            "node": {
                "url": url,
                "pid": pid,
                "peak_rss_mib": {"idle": round3(idle_hwm), "attack": round3(attack_hwm)},
                "sampled_peak_rss_mib": {"idle": round3(idle_peak), "attack": round3(attack_peak)},
                "rss_after_attack_mib": after_rss.map(round3),
                "answers_after_attack": after_ms.is_some(),
                "after_attack_ms": after_ms.map(round3),
                "after_attack_error": after_error,
                "stopped": ended,
                "max_rss_mib": options.max_rss_mib,
            },
            "idle": client(&idle),
            "attack": client(&attacked),
            "ratio": {"p50": finite(ratios[0]), "p99": finite(ratios[1]), "max": finite(ratios[2])},
            "attackers": attackers.iter().map(|a| json!({
                "name": a.name,
                "what": a.what,
                "sent": a.tally.sent,
                "seen": a.tally.seen,
                "notes": a.tally.notes,
            })).collect::<Vec<_>>(),
            "ok": ok,
        });
        println!("{out}");
    } else {
        println!(
            "hostile neighbours: node {url} (pid {pid}), {:.1} s alone, then {:.1} s under attack",
            secs.as_secs_f64(),
            secs.as_secs_f64()
        );
        println!();
        println!("well-behaved client: sequential echo on one connection with a token");
        let row = |name: &str, r: &Report| {
            vec![
                name.to_owned(),
                thousands(r.sent),
                thousands(r.ok),
                format!("{:.2} %", success_pct(r)),
                micros(q(r, 0.5)),
                micros(q(r, 0.99)),
                micros(max(r)),
            ]
        };
        let rows = vec![
            row("idle", &idle),
            row("under attack", &attacked),
            vec![
                "attack / idle".to_owned(),
                String::new(),
                String::new(),
                String::new(),
                fmt_ratio(ratios[0]),
                fmt_ratio(ratios[1]),
                fmt_ratio(ratios[2]),
            ],
        ];
        print!(
            "{}",
            format_table(
                &["", "requests", "ok", "success", "p50", "p99", "max"],
                &rows,
                &[]
            )
        );
        for (name, r) in [("idle", &idle), ("under attack", &attacked)] {
            if let Some(e) = &r.first_error {
                println!(
                    "{name}: {} errors, {} timeouts; first: {e}",
                    r.errors, r.timeouts
                );
            }
        }
        println!();
        let mut node = format!(
            "node peak RSS (VmHWM): {idle_hwm:.1} MiB idle, {attack_hwm:.1} MiB under attack"
        );
        if let Some(rss) = after_rss {
            let _ = write!(node, "; VmRSS 1 s after the attack {rss:.1} MiB");
        }
        println!("{node}");
        match (after_ms, &after_error) {
            (Some(ms), _) => println!("after the attack: a new client's echo took {ms:.1} ms"),
            (None, Some(e)) => println!("after the attack: a new client's echo failed: {e}"),
            (None, None) => {}
        }
        if let Some(why) = &ended {
            println!("STOPPED: {why}");
        }
        println!();
        println!(
            "attackers (all at once for {:.1} s, loopback only)",
            secs.as_secs_f64()
        );
        let rows: Vec<Vec<String>> = attackers
            .iter()
            .map(|a| {
                vec![
                    a.name.to_owned(),
                    a.what.clone(),
                    thousands(a.tally.sent),
                    a.tally.summary(),
                ]
            })
            .collect();
        print!(
            "{}",
            format_table(
                &["attacker", "what", "sent", "what happened"],
                &rows,
                &[true, true, false, true]
            )
        );
    }
    if let Some(why) = ended {
        return Err(why.into());
    }
    if !ok {
        return Err(format!(
            "the well-behaved client did not get 100 % (idle {:.2} %, under attack {:.2} %)",
            success_pct(&idle),
            success_pct(&attacked)
        )
        .into());
    }
    Ok(())
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then(|| round3(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_doubling_request_doubles_22_times_in_about_a_kilobyte() {
        let text = doubling_request("h-1", 22);
        assert!((1000..1500).contains(&text.len()), "{} bytes", text.len());
        let v: Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(v["u"], "h-1");
        let cmds = v["cmds"].as_array().expect("cmds");
        assert_eq!(cmds.len(), 23);
        assert_eq!(cmds[0]["fun"], "echo");
        assert_eq!(cmds[0]["args"][0].as_str().map(str::len), Some(100));
        assert_eq!(cmds[1]["args"], json!(["a", "a"]));
        assert_eq!(cmds[22]["name"], "l22");
        assert_eq!(cmds[22]["fun"], "echos");
        assert_eq!(cmds[22]["args"], json!(["l21", "l21"]));
    }

    #[test]
    fn the_other_requests_have_the_announced_shape() {
        let deep = nested_request("d-1", 10_000);
        assert!(deep.starts_with("{\"u\":\"d-1\","));
        assert_eq!(deep.matches('[').count(), 10_000 + 2);
        assert_eq!(deep.matches(']').count(), 10_000 + 2);
        // Too deep for a default parser: exactly what the node must refuse.
        assert!(serde_json::from_str::<Value>(&deep).is_err());
        let shallow: Value = serde_json::from_str(&nested_request("d-2", 3)).expect("JSON");
        assert_eq!(shallow["cmds"][0]["args"][0], json!([[[]]]));

        let stream: Value = serde_json::from_str(&stream_request(1 << 20, 1500)).expect("JSON");
        assert_eq!(stream["stream"], true);
        assert_eq!(stream["u"].as_str().map(str::len), Some(1 << 20));
        assert_eq!(stream["cmds"].as_array().map(Vec::len), Some(1500));

        let big = echo_of_size("big", 1 << 20);
        assert!(big.len() > 1 << 20 && big.len() < (1 << 20) + 200);
        let big: Value = serde_json::from_str(&big).expect("JSON");
        assert_eq!(
            big["cmds"][0]["args"][0].as_str().map(str::len),
            Some(1 << 20)
        );

        let hello: Value = serde_json::from_str(&peer_hello(None)).expect("JSON");
        assert_eq!(hello["role"], "peer-hello");
        assert_eq!(hello["body"]["catalog"]["functions"], json!([]));
        assert!(hello["body"].get("nonce").is_none());
        let nonce = nonce_hex(7);
        assert_eq!(nonce.len(), 64);
        assert!(nonce.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(nonce, nonce_hex(8));
        let hello: Value = serde_json::from_str(&peer_hello(Some(&nonce))).expect("JSON");
        assert_eq!(hello["body"]["nonce"], nonce.as_str());
    }

    #[test]
    fn replies_and_tallies_read_as_labels() {
        let err = br#"{"role":"rpc-response","u":"h-1","r":null,"error":{"code":"too_large"}}"#;
        assert_eq!(message_label(err), "error too_large");
        assert_eq!(reply_label(err, "h-1").as_deref(), Some("error too_large"));
        assert_eq!(reply_label(err, "h-2"), None);
        let lost = br#"{"u":null,"r":null,"error":{"code":"bad_request"}}"#;
        assert_eq!(
            reply_label(lost, "h-9").as_deref(),
            Some("error bad_request, u null")
        );
        let progress = br#"{"role":"rpc-progress","u":"h-1","name":"a","value":1}"#;
        assert_eq!(message_label(progress), "progress");
        assert_eq!(reply_label(progress, "h-1"), None);
        assert_eq!(
            message_label(br#"{"u":1,"r":{"a":"hi"},"error":null}"#),
            "reply ok"
        );
        assert_eq!(
            message_label(br#"{"role":"peer-hello","body":{}}"#),
            "peer-hello message"
        );
        assert_eq!(message_label(b"nope"), "a message that is not JSON");

        let mut t = Tally::default();
        assert_eq!(t.summary(), "nothing");
        t.saw_n("error too_large", 1200);
        t.saw("closed 1008 \"unauthorized\"");
        t.saw_n("never", 0);
        t.notes.push("a note".into());
        assert_eq!(
            t.summary(),
            "error too_large x1,200; closed 1008 \"unauthorized\"; a note"
        );

        assert_eq!(
            status_kib(
                "Name:\tmpreg\nVmHWM:\t  20480 kB\nVmRSS:\t  10240 kB\n",
                "VmRSS"
            ),
            Some(10240)
        );
        assert_eq!(status_kib("VmRSS:\t1 kB\n", "VmHWM"), None);
    }
}
