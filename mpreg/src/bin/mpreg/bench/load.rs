//! The requests the load generator sends and checks, and the generator:
//! C connections each keeping D requests in flight, latencies in an HDR
//! histogram.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures_util::{Sink, SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Map, Value, json};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::*;

/// Highest latency the histograms hold (larger values are clamped): 10 min.
const MAX_LATENCY_US: u64 = 600_000_000;

/// The request sent over and over, with a fresh numeric `u` each time, as
/// mpreg's clients send it (with the marker `"mpreg":1`: replies in mpreg's
/// form).
#[derive(Debug, Clone)]
pub(crate) struct Template {
    /// The request object serialized without `u` and without its opening
    /// brace: a frame is `{"u":ID,` + this.
    rest: Arc<str>,
}

impl Template {
    /// A template from the JSON text of a request object (`{"cmds":..}`,
    /// without `u`), used as it is: nothing is parsed (for huge requests).
    pub(crate) fn from_object_text(object: &str) -> Self {
        let body = object.strip_prefix('{').unwrap_or(object);
        Self {
            rest: format!("\"role\":\"rpc\",\"mpreg\":1,{body}").into(),
        }
    }

    /// One `echo` of `"hi"`.
    pub(crate) fn echo() -> Self {
        Self::commands(json!([{"name": "a", "fun": "echo", "args": ["hi"], "locs": []}]))
    }

    /// A request with these commands (a JSON list).
    pub(crate) fn commands(cmds: Value) -> Self {
        let mut object = Map::new();
        object.insert("cmds".into(), cmds);
        Self::object(object)
    }

    /// A request file: a JSON list of commands, or a request object with
    /// `cmds` (its `u`, if any, is replaced).
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        match serde_json::from_str(text) {
            Ok(Value::Array(cmds)) => Ok(Self::commands(Value::Array(cmds))),
            Ok(Value::Object(object)) if object.get("cmds").is_some_and(Value::is_array) => {
                Ok(Self::object(object))
            }
            Ok(_) => {
                Err("a request file is a JSON list of commands or an object with `cmds`".into())
            }
            Err(e) => Err(format!("the request file is not JSON: {e}")),
        }
    }

    pub(crate) fn object(mut object: Map<String, Value>) -> Self {
        object.remove("u");
        object.insert("role".into(), json!("rpc"));
        object.entry("mpreg").or_insert(json!(1));
        let text = Value::Object(object).to_string();
        Self {
            rest: text[1..].into(),
        }
    }

    /// The frame of request `id`.
    pub(crate) fn frame(&self, id: u64) -> String {
        let mut frame = String::with_capacity(self.rest.len() + 28);
        let _ = write!(frame, "{{\"u\":{id},");
        frame.push_str(&self.rest);
        frame
    }

    /// Size of a frame, in bytes (about).
    pub(crate) fn len(&self) -> usize {
        self.rest.len() + 8
    }
}

/// What a reply says.
#[derive(Debug, PartialEq)]
pub(crate) enum Checked {
    /// `error` is null and `r` present: request `u` succeeded.
    Ok(u64),
    /// Request `u` failed; the error as sent.
    Failed(u64, String),
    /// Not a reply to any request of ours (no numeric `u`, not JSON...).
    Malformed(String),
}

/// Reads a reply: `{"u": ID, "r": {..}, "error": null}` is a success (the
/// baseline's minimal reply has that shape too); a non-null `error`, or no
/// `r`, is a failure.
pub(crate) fn check_reply(frame: &[u8]) -> Checked {
    #[derive(Deserialize)]
    struct Head {
        #[serde(default)]
        u: Value,
        #[serde(default)]
        r: Option<IgnoredAny>,
        #[serde(default)]
        error: Option<Value>,
    }
    let head: Head = match serde_json::from_slice(frame) {
        Ok(head) => head,
        Err(e) => return Checked::Malformed(format!("reply is not a JSON object: {e}")),
    };
    let Some(u) = head.u.as_u64() else {
        return Checked::Malformed(format!("reply with an unknown id {}", head.u));
    };
    match (head.error, head.r) {
        (Some(error), _) => Checked::Failed(u, error.to_string()),
        (None, Some(_)) => Checked::Ok(u),
        (None, None) => Checked::Failed(u, "reply has neither `r` nor `error`".into()),
    }
}

/// The requests of one connection waiting for their replies, by id.
#[derive(Debug, Default)]
pub(crate) struct Pending(Mutex<HashMap<u64, Instant>>);

impl Pending {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Instant>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Request `id` was sent at `at`.
    pub(crate) fn sent(&self, id: u64, at: Instant) {
        self.lock().insert(id, at);
    }

    /// The reply to `id` came: when it was sent, or `None` when no request
    /// `id` is waiting (already answered, timed out, or never sent).
    pub(crate) fn complete(&self, id: u64) -> Option<Instant> {
        self.lock().remove(&id)
    }

    /// Forgets requests sent before `before`; returns how many.
    pub(crate) fn expire(&self, before: Instant) -> usize {
        let mut map = self.lock();
        let n = map.len();
        map.retain(|_, at| *at >= before);
        n - map.len()
    }

    /// Forgets all; returns how many were waiting.
    pub(crate) fn clear(&self) -> usize {
        let mut map = self.lock();
        let n = map.len();
        map.clear();
        n
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

// ---------------------------------------------------------------------------
// The load generator
// ---------------------------------------------------------------------------

/// How hard and how long to drive a server.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    pub(crate) connections: usize,
    pub(crate) inflight: usize,
    pub(crate) duration: Duration,
    pub(crate) warmup: Duration,
    pub(crate) timeout: Duration,
}

impl Shape {
    pub(crate) fn describe(&self) -> String {
        format!(
            "{} connection{} x {} in flight, {:.1} s (+{:.1} s warm-up)",
            self.connections,
            if self.connections == 1 { "" } else { "s" },
            self.inflight,
            self.duration.as_secs_f64(),
            self.warmup.as_secs_f64()
        )
    }
}

/// What one load run measured.
#[derive(Debug)]
pub(crate) struct Report {
    /// Requests sent (whole run).
    pub(crate) sent: u64,
    /// Successful replies completed inside the measured window.
    pub(crate) ok: u64,
    /// Successful replies over the whole run (warm-up and drain included).
    pub(crate) ok_total: u64,
    /// Error replies and requests lost with a closed connection.
    pub(crate) errors: u64,
    /// Requests without a reply within the timeout.
    pub(crate) timeouts: u64,
    /// Replies that matched no waiting request (late, duplicate, unknown).
    pub(crate) unmatched: u64,
    /// Latency of the successful replies of the window, microseconds.
    pub(crate) latency: Histogram<u64>,
    /// The measured window.
    pub(crate) window: Duration,
    /// The first error seen, for the report.
    pub(crate) first_error: Option<String>,
}

impl Report {
    pub(crate) fn new(window: Duration) -> Self {
        Self {
            sent: 0,
            ok: 0,
            ok_total: 0,
            errors: 0,
            timeouts: 0,
            unmatched: 0,
            latency: new_histogram(),
            window,
            first_error: None,
        }
    }

    pub(crate) fn merge(&mut self, other: Self) {
        self.sent += other.sent;
        self.ok += other.ok;
        self.ok_total += other.ok_total;
        self.errors += other.errors;
        self.timeouts += other.timeouts;
        self.unmatched += other.unmatched;
        // Same bounds: cannot fail.
        let _ = self.latency.add(&other.latency);
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    pub(crate) fn error(&mut self, n: u64, what: String) {
        self.errors += n;
        if n > 0 && self.first_error.is_none() {
            self.first_error = Some(what);
        }
    }

    /// Successful requests per second in the window.
    pub(crate) fn throughput(&self) -> f64 {
        self.ok as f64 / self.window.as_secs_f64().max(1e-9)
    }

    /// Latency at quantile `q`, microseconds (0 without samples).
    pub(crate) fn quantile_us(&self, q: f64) -> u64 {
        if self.latency.is_empty() {
            0
        } else {
            self.latency.value_at_quantile(q)
        }
    }

    pub(crate) fn p50_us(&self) -> f64 {
        self.quantile_us(0.5) as f64
    }

    /// The table cells: throughput, p50, p90, p99, p99.9, max, ok, errors,
    /// timeouts.
    pub(crate) fn cells(&self) -> Vec<String> {
        vec![
            format!("{} req/s", thousands(self.throughput().round() as u64)),
            micros(self.quantile_us(0.5)),
            micros(self.quantile_us(0.9)),
            micros(self.quantile_us(0.99)),
            micros(self.quantile_us(0.999)),
            micros(if self.latency.is_empty() {
                0
            } else {
                self.latency.max()
            }),
            thousands(self.ok),
            thousands(self.errors),
            thousands(self.timeouts),
        ]
    }

    pub(crate) fn json(&self) -> Value {
        json!({
            "throughput": (self.throughput() * 10.0).round() / 10.0,
            "p50_us": self.quantile_us(0.5),
            "p90_us": self.quantile_us(0.9),
            "p99_us": self.quantile_us(0.99),
            "p999_us": self.quantile_us(0.999),
            "max_us": if self.latency.is_empty() { 0 } else { self.latency.max() },
            "sent": self.sent,
            "ok": self.ok,
            "ok_total": self.ok_total,
            "errors": self.errors,
            "timeouts": self.timeouts,
            "unmatched": self.unmatched,
            "first_error": self.first_error,
        })
    }
}

pub(crate) const REPORT_HEADER: [&str; 10] = [
    "",
    "throughput",
    "p50",
    "p90",
    "p99",
    "p99.9",
    "max",
    "ok",
    "errors",
    "timeouts",
];

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

/// Counters the progress line reads while a run goes on.
#[derive(Debug, Default)]
struct Progress {
    ok: AtomicU64,
    errors: AtomicU64,
    timeouts: AtomicU64,
}

/// Client-side WebSocket settings: no practical message limit.
pub(crate) fn client_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(1 << 30))
        .max_frame_size(Some(1 << 30))
}

pub(crate) type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

pub(crate) async fn connect(url: &str) -> BenchResult<Ws> {
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(client_config()), true)
        .await
        .map_err(|e| format!("cannot connect to {url}: {e}"))?;
    Ok(ws)
}

/// Drives `url` with `template` in `shape`; prints a progress line on
/// stderr once a second when `label` is given.
pub(crate) async fn run_load(
    url: &str,
    template: &Template,
    shape: Shape,
    label: Option<&str>,
) -> BenchResult<Report> {
    if shape.connections == 0 || shape.inflight == 0 {
        return Err("--connections and --inflight must be at least 1".into());
    }
    let mut sockets = Vec::with_capacity(shape.connections);
    for _ in 0..shape.connections {
        sockets.push(connect(url).await?);
    }
    let progress = Arc::new(Progress::default());
    let ids = Arc::new(AtomicU64::new(1));
    let start = Instant::now();
    let window_start = start + shape.warmup;
    let window_end = window_start + shape.duration;
    let drivers: Vec<_> = sockets
        .into_iter()
        .map(|ws| {
            tokio::spawn(drive(
                ws,
                template.clone(),
                shape,
                (window_start, window_end),
                ids.clone(),
                progress.clone(),
            ))
        })
        .collect();
    let ticker = label.map(|label| {
        let label = label.to_owned();
        let progress = progress.clone();
        tokio::spawn(show_progress(label, progress, start, window_end))
    });
    let mut report = Report::new(shape.duration);
    for driver in drivers {
        match driver.await {
            Ok(r) => report.merge(r),
            Err(e) => report.error(1, format!("a connection task failed: {e}")),
        }
    }
    if let Some(ticker) = ticker {
        ticker.abort();
        eprint!("\r{:79}\r", "");
    }
    Ok(report)
}

async fn show_progress(label: String, progress: Arc<Progress>, start: Instant, end: Instant) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last = 0;
    loop {
        tick.tick().await;
        let ok = progress.ok.load(Ordering::Relaxed);
        let phase = if Instant::now() > end {
            "draining"
        } else {
            "running"
        };
        eprint!(
            "\r{label}: {phase} {:>4.0} s  {:>8} req/s  ok {}  errors {}  timeouts {}   ",
            start.elapsed().as_secs_f64(),
            thousands(ok - last),
            thousands(ok),
            progress.errors.load(Ordering::Relaxed),
            progress.timeouts.load(Ordering::Relaxed),
        );
        let _ = std::io::stderr().flush();
        last = ok;
    }
}

/// One connection: a writer keeping `shape.inflight` requests in flight
/// until `window.1`, and this task reading and matching the replies.
async fn drive(
    ws: Ws,
    template: Template,
    shape: Shape,
    window: (Instant, Instant),
    ids: Arc<AtomicU64>,
    progress: Arc<Progress>,
) -> Report {
    let (window_start, window_end) = window;
    let (sink, mut stream) = ws.split();
    let pending = Arc::new(Pending::default());
    let slots = Arc::new(Semaphore::new(shape.inflight));
    let sent = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn(write_requests(
        sink,
        template,
        slots.clone(),
        pending.clone(),
        ids,
        sent.clone(),
        window_end,
    ));

    let mut report = Report::new(shape.duration);
    let hard_end = window_end + shape.timeout + Duration::from_millis(100);
    let mut sweep = tokio::time::interval(Duration::from_millis(20));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if Instant::now() >= window_end && writer.is_finished() && pending.is_empty() {
            break;
        }
        let message = tokio::select! {
            message = stream.next() => message,
            _ = sweep.tick() => {
                let now = Instant::now();
                let expired = match now.checked_sub(shape.timeout) {
                    Some(before) => pending.expire(before),
                    None => 0,
                };
                let expired = if now >= hard_end { expired + pending.clear() } else { expired };
                if expired > 0 {
                    report.timeouts += expired as u64;
                    progress.timeouts.fetch_add(expired as u64, Ordering::Relaxed);
                    slots.add_permits(expired);
                }
                if now >= hard_end {
                    break;
                }
                continue;
            }
        };
        let bytes = match message {
            Some(Ok(Message::Text(text))) => tokio_tungstenite::tungstenite::Bytes::from(text),
            Some(Ok(Message::Binary(bytes))) => bytes,
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
            Some(Ok(Message::Close(_))) | None => {
                let lost = pending.clear() as u64;
                report.error(
                    lost,
                    format!("the server closed the connection with {lost} requests in flight"),
                );
                progress.errors.fetch_add(lost, Ordering::Relaxed);
                break;
            }
            Some(Err(e)) => {
                let lost = pending.clear() as u64;
                report.error(lost.max(1), format!("connection failed: {e}"));
                progress.errors.fetch_add(lost.max(1), Ordering::Relaxed);
                break;
            }
        };
        let now = Instant::now();
        match check_reply(&bytes) {
            Checked::Ok(id) => match pending.complete(id) {
                Some(at) => {
                    slots.add_permits(1);
                    report.ok_total += 1;
                    progress.ok.fetch_add(1, Ordering::Relaxed);
                    if now >= window_start && now <= window_end {
                        report.ok += 1;
                        let us = now.duration_since(at).as_micros();
                        report
                            .latency
                            .saturating_record(u64::try_from(us).unwrap_or(u64::MAX).max(1));
                    }
                }
                None => report.unmatched += 1,
            },
            Checked::Failed(id, error) => match pending.complete(id) {
                Some(_) => {
                    slots.add_permits(1);
                    report.error(1, error);
                    progress.errors.fetch_add(1, Ordering::Relaxed);
                }
                None => report.unmatched += 1,
            },
            Checked::Malformed(why) => {
                // Its request (if any) will time out.
                report.error(1, why);
                progress.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    // Stop writing (it may be stuck on a server that stopped reading), then
    // close the connection politely.
    writer.abort();
    if let Ok(Some(sink)) = writer.await
        && let Ok(mut ws) = sink.reunite(stream)
    {
        let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    }
    report.sent = sent.load(Ordering::Relaxed);
    report
}

/// Sends a request whenever a slot is free, until `end`; requests that are
/// ready together are written together and flushed once. Returns the sink
/// (`None` when writing failed).
async fn write_requests<S>(
    mut sink: S,
    template: Template,
    slots: Arc<Semaphore>,
    pending: Arc<Pending>,
    ids: Arc<AtomicU64>,
    sent: Arc<AtomicU64>,
    end: Instant,
) -> Option<S>
where
    S: Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    let end_at = tokio::time::Instant::from_std(end);
    loop {
        let slot = tokio::select! {
            slot = slots.acquire() => slot,
            _ = tokio::time::sleep_until(end_at) => return Some(sink),
        };
        let Ok(slot) = slot else { return Some(sink) };
        slot.forget();
        let mut first = true;
        loop {
            if !first {
                match slots.try_acquire() {
                    Ok(slot) if Instant::now() < end => slot.forget(),
                    _ => break,
                }
            }
            first = false;
            let id = ids.fetch_add(1, Ordering::Relaxed);
            let frame = template.frame(id);
            pending.sent(id, Instant::now());
            sent.fetch_add(1, Ordering::Relaxed);
            if sink.feed(Message::text(frame)).await.is_err() {
                return None;
            }
        }
        if sink.flush().await.is_err() {
            return None;
        }
        if Instant::now() >= end {
            return Some(sink);
        }
    }
}

/// Sends `template` `n` times, one at a time, on one connection; returns
/// each round trip's time. Any failure is an error.
pub(crate) async fn sequential(
    url: &str,
    template: &Template,
    n: usize,
) -> BenchResult<Vec<Duration>> {
    let mut ws = connect(url).await?;
    let mut times = Vec::with_capacity(n);
    for id in 1..=n as u64 {
        let frame = template.frame(id);
        let at = Instant::now();
        ws.send(Message::text(frame)).await?;
        loop {
            let bytes = match ws.next().await {
                Some(Ok(Message::Text(t))) => tokio_tungstenite::tungstenite::Bytes::from(t),
                Some(Ok(Message::Binary(b))) => b,
                Some(Ok(Message::Close(_))) | None => return Err("connection closed".into()),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
            };
            match check_reply(&bytes) {
                Checked::Ok(u) if u == id => break,
                other => return Err(format!("unexpected reply: {other:?}").into()),
            }
        }
        times.push(at.elapsed());
    }
    let _ = ws.close(None).await;
    Ok(times)
}

pub(crate) fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times.get(times.len() / 2).copied().unwrap_or_default()
}
