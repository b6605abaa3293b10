//! Counters and latency histograms: per function (calls started, calls
//! ended by outcome, time taken) and per node (client requests and
//! connections), written out in the Prometheus text format (version 0.0.4)
//! for `/metrics` (see [`crate::http`]).
//!
//! Recording is a few relaxed atomic additions and two clock reads per
//! call, with no lock and no lookup: each served function carries its own
//! [`FunctionMetrics`], made when the node's registry is built. Readers
//! take a [`FunctionSnapshot`]; its counts are read one by one, so a
//! snapshot taken while calls run may be off by the calls in between
//! (never by more), and within one snapshot the histogram's `+Inf` bucket
//! always equals its count.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::error::{ErrorCode, RpcError};

/// Upper bounds of the latency buckets, in nanoseconds: 50 µs to 10 s.
/// A last bucket, `+Inf`, takes the rest.
const BOUNDS_NS: [u64; 17] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// The same bounds in seconds, as the `le` labels spell them.
const BOUNDS_LABEL: [&str; 17] = [
    "0.00005", "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05",
    "0.1", "0.25", "0.5", "1", "2.5", "5", "10",
];

/// Number of buckets, `+Inf` included.
pub(crate) const BUCKETS: usize = BOUNDS_NS.len() + 1;

/// The upper bound of bucket `i` in seconds (`None` for `+Inf`).
pub(crate) fn bucket_bound(i: usize) -> Option<f64> {
    BOUNDS_NS.get(i).map(|&ns| ns as f64 / 1e9)
}

/// Every error code, in the order of their counters.
const CODES: [ErrorCode; 14] = ErrorCode::ALL;

/// Number of outcomes: `ok`, every error code, `cancelled`.
const OUTCOMES: usize = CODES.len() + 2;

/// How a call or a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// It succeeded.
    Ok,
    /// It failed with this code (a panicking handler: `handler_failed`).
    Failed(ErrorCode),
    /// It was dropped before it ended (deadline passed, client gone).
    Cancelled,
}

impl Outcome {
    /// The outcome of a result.
    pub(crate) fn of<T>(result: &Result<T, RpcError>) -> Self {
        match result {
            Ok(_) => Self::Ok,
            Err(e) => Self::Failed(e.code),
        }
    }

    fn index(self) -> usize {
        match self {
            Self::Ok => 0,
            Self::Failed(code) => 1 + code_index(code),
            Self::Cancelled => OUTCOMES - 1,
        }
    }

    /// The `outcome` label of counter `index`.
    fn label(index: usize) -> &'static str {
        match index {
            0 => "ok",
            i if i == OUTCOMES - 1 => "cancelled",
            i => CODES[i - 1].as_str(),
        }
    }
}

/// The place of `code` in [`CODES`]. A match, not a search, so that a new
/// code cannot be forgotten here.
fn code_index(code: ErrorCode) -> usize {
    match code {
        ErrorCode::BadRequest => 0,
        ErrorCode::DuplicateName => 1,
        ErrorCode::Cycle => 2,
        ErrorCode::UnknownFunction => 3,
        ErrorCode::NoNodeForDatasets => 4,
        ErrorCode::BadArguments => 5,
        ErrorCode::HandlerFailed => 6,
        ErrorCode::Timeout => 7,
        ErrorCode::NodeLost => 8,
        ErrorCode::Overloaded => 9,
        ErrorCode::TooLarge => 10,
        ErrorCode::Unauthorized => 11,
        ErrorCode::Internal => 12,
        ErrorCode::Unknown => 13,
    }
}

/// One counter per outcome.
#[derive(Debug, Default)]
struct Outcomes([AtomicU64; OUTCOMES]);

impl Outcomes {
    fn add(&self, outcome: Outcome) {
        self.0[outcome.index()].fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> [u64; OUTCOMES] {
        std::array::from_fn(|i| self.0[i].load(Ordering::Relaxed))
    }
}

/// A latency histogram with the fixed buckets above.
#[derive(Debug, Default)]
struct Histogram {
    /// Observations per bucket (not cumulative: one addition per call).
    counts: [AtomicU64; BUCKETS],
    /// Sum of every observation, in nanoseconds (wraps after 584 years).
    sum_ns: AtomicU64,
}

impl Histogram {
    fn observe(&self, ns: u64) {
        let i = BOUNDS_NS
            .iter()
            .position(|&bound| ns <= bound)
            .unwrap_or(BOUNDS_NS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

/// The counters of one function served by this node.
#[derive(Debug, Default)]
pub(crate) struct FunctionMetrics {
    started: AtomicU64,
    ended: Outcomes,
    latency: Histogram,
}

impl FunctionMetrics {
    /// Counts a call as started; the returned guard counts it as ended,
    /// with its outcome and time, when [`Call::end`] is called or, failing
    /// that, when it is dropped (as `cancelled`, or `handler_failed` if
    /// dropped by a panic).
    pub(crate) fn start(&self) -> Call<'_> {
        self.started.fetch_add(1, Ordering::Relaxed);
        Call {
            metrics: self,
            since: Instant::now(),
            ended: false,
        }
    }

    /// The current counts.
    pub(crate) fn snapshot(&self) -> FunctionSnapshot {
        // Ended before started: no snapshot ever shows more calls ended
        // than started.
        let ended = self.ended.snapshot();
        let counts: [u64; BUCKETS] =
            std::array::from_fn(|i| self.latency.counts[i].load(Ordering::Relaxed));
        let sum_ns = self.latency.sum_ns.load(Ordering::Relaxed);
        let started = self.started.load(Ordering::Relaxed);
        let mut cumulative = [0u64; BUCKETS];
        let mut total = 0u64;
        for (c, n) in cumulative.iter_mut().zip(counts) {
            total = total.wrapping_add(n);
            *c = total;
        }
        FunctionSnapshot {
            started,
            ended,
            cumulative,
            sum_seconds: sum_ns as f64 / 1e9,
        }
    }
}

/// One call being measured (see [`FunctionMetrics::start`]).
#[derive(Debug)]
pub(crate) struct Call<'a> {
    metrics: &'a FunctionMetrics,
    since: Instant,
    ended: bool,
}

impl Call<'_> {
    /// Records how the call ended.
    pub(crate) fn end(mut self, outcome: Outcome) {
        self.record(outcome);
    }

    fn record(&mut self, outcome: Outcome) {
        if self.ended {
            return;
        }
        self.ended = true;
        let ns = u64::try_from(self.since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.metrics.latency.observe(ns);
        self.metrics.ended.add(outcome);
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        // Dropped while unwinding: the handler panicked, which the
        // executor turns into `handler_failed`.
        let outcome = if std::thread::panicking() {
            Outcome::Failed(ErrorCode::HandlerFailed)
        } else {
            Outcome::Cancelled
        };
        self.record(outcome);
    }
}

/// A function's counts at one moment.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FunctionSnapshot {
    /// Calls started.
    pub(crate) started: u64,
    ended: [u64; OUTCOMES],
    /// Cumulative bucket counts; the last one (`+Inf`) is the count.
    pub(crate) cumulative: [u64; BUCKETS],
    /// Total time of the ended calls, in seconds.
    pub(crate) sum_seconds: f64,
}

impl FunctionSnapshot {
    /// Calls ended, with any outcome.
    pub(crate) fn ended(&self) -> u64 {
        self.ended.iter().fold(0, |a, &n| a.wrapping_add(n))
    }

    /// Calls running now.
    pub(crate) fn in_flight(&self) -> u64 {
        self.started.saturating_sub(self.ended())
    }

    /// Calls ended by outcome, leaving out outcomes that never happened
    /// (but always listing `ok`).
    pub(crate) fn outcomes(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        outcome_counts(&self.ended)
    }
}

fn outcome_counts(counts: &[u64; OUTCOMES]) -> impl Iterator<Item = (&'static str, u64)> + '_ {
    counts
        .iter()
        .enumerate()
        .filter(|&(i, &n)| i == 0 || n > 0)
        .map(|(i, &n)| (Outcome::label(i), n))
}

/// Why a connection was refused, or closed by one of the node's budgets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Too many connections waiting to authenticate (HTTP 503 at upgrade).
    UnauthenticatedCap,
    /// No upgrade, authentication or first message within the deadline.
    HandshakeTimeout,
    /// More bytes than allowed before authenticating.
    PreAuthLimit,
    /// A missing or wrong client token.
    Unauthorized,
    /// No request in flight for the idle timeout.
    IdleTimeout,
    /// Its outgoing queue stayed full past the slow-reader timeout.
    SlowReader,
    /// Its WebSocket write buffer was full (it does not read).
    WriteBuffer,
    /// Pings faster than the node answers them.
    PingFlood,
}

impl Refused {
    const ALL: [Refused; 8] = [
        Refused::UnauthenticatedCap,
        Refused::HandshakeTimeout,
        Refused::PreAuthLimit,
        Refused::Unauthorized,
        Refused::IdleTimeout,
        Refused::SlowReader,
        Refused::WriteBuffer,
        Refused::PingFlood,
    ];

    /// The `reason` label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Refused::UnauthenticatedCap => "unauthenticated_cap",
            Refused::HandshakeTimeout => "handshake_timeout",
            Refused::PreAuthLimit => "pre_auth_limit",
            Refused::Unauthorized => "unauthorized",
            Refused::IdleTimeout => "idle_timeout",
            Refused::SlowReader => "slow_reader",
            Refused::WriteBuffer => "write_buffer",
            Refused::PingFlood => "ping_flood",
        }
    }
}

const REFUSALS: usize = Refused::ALL.len();

/// The counters of the node as a whole.
#[derive(Debug, Default)]
pub(crate) struct NodeMetrics {
    received: AtomicU64,
    answered: Outcomes,
    connections: AtomicU64,
    refused: [AtomicU64; REFUSALS],
}

impl NodeMetrics {
    /// Counts a client request as received; the guard counts it as
    /// answered (see [`Request::end`]), or as `cancelled` when dropped.
    pub(crate) fn request(&self) -> Request<'_> {
        self.received.fetch_add(1, Ordering::Relaxed);
        Request {
            metrics: self,
            ended: false,
        }
    }

    /// Counts a client connection as open until the guard is dropped.
    pub(crate) fn connection(&self) -> Connection<'_> {
        self.connections.fetch_add(1, Ordering::Relaxed);
        Connection(self)
    }

    /// Counts a connection refused or closed for `why`.
    pub(crate) fn refused(&self, why: Refused) {
        self.refused[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The current counts.
    pub(crate) fn snapshot(&self) -> NodeSnapshot {
        let answered = self.answered.snapshot();
        NodeSnapshot {
            received: self.received.load(Ordering::Relaxed),
            answered,
            connections: self.connections.load(Ordering::Relaxed),
            refused: std::array::from_fn(|i| self.refused[i].load(Ordering::Relaxed)),
        }
    }
}

/// One client request being counted (see [`NodeMetrics::request`]).
#[derive(Debug)]
pub(crate) struct Request<'a> {
    metrics: &'a NodeMetrics,
    ended: bool,
}

impl Request<'_> {
    /// Records how the request ended: `None` for success, else the code
    /// of its error.
    pub(crate) fn end(mut self, error: Option<ErrorCode>) {
        self.ended = true;
        self.metrics
            .answered
            .add(error.map_or(Outcome::Ok, Outcome::Failed));
    }
}

impl Drop for Request<'_> {
    fn drop(&mut self) {
        if !self.ended {
            self.metrics.answered.add(Outcome::Cancelled);
        }
    }
}

/// An open client connection (see [`NodeMetrics::connection`]).
#[derive(Debug)]
pub(crate) struct Connection<'a>(&'a NodeMetrics);

impl Drop for Connection<'_> {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The node's counts at one moment.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NodeSnapshot {
    /// Client requests received.
    pub(crate) received: u64,
    answered: [u64; OUTCOMES],
    /// Client connections open.
    pub(crate) connections: u64,
    /// Connections refused or closed by a budget, by [`Refused`] reason.
    refused: [u64; REFUSALS],
}

impl NodeSnapshot {
    /// Requests answered, with any outcome.
    pub(crate) fn answered(&self) -> u64 {
        self.answered.iter().fold(0, |a, &n| a.wrapping_add(n))
    }

    /// Connections refused or closed by a budget, by reason label (every
    /// reason listed).
    pub(crate) fn refusals(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Refused::ALL
            .iter()
            .map(|r| (r.label(), self.refused[*r as usize]))
    }

    /// Requests answered by outcome (always listing `ok`).
    pub(crate) fn outcomes(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        outcome_counts(&self.answered)
    }
}

/// Everything `/metrics` shows.
#[derive(Debug)]
pub(crate) struct Exposition<'a> {
    /// The node's name.
    pub(crate) node: &'a str,
    /// The node's counters.
    pub(crate) counts: NodeSnapshot,
    /// Peers with a live link.
    pub(crate) peers: usize,
    /// Peer links refused (secret or certificate).
    pub(crate) refused_peer_links: u64,
    /// Connections open and not yet authenticated.
    pub(crate) unauthenticated: usize,
    /// Each function served here, by name.
    pub(crate) functions: Vec<(&'a str, FunctionSnapshot)>,
}

impl Exposition<'_> {
    /// The Prometheus text exposition format, version 0.0.4.
    pub(crate) fn render(&self) -> String {
        let mut out = String::with_capacity(1024 + self.functions.len() * 2048);
        let node = Escaped(self.node);
        let version = env!("CARGO_PKG_VERSION");
        family(
            &mut out,
            "mpreg_node_info",
            "gauge",
            "This node: its name and mpreg version (always 1).",
        );
        line(
            &mut out,
            format_args!("mpreg_node_info{{node=\"{node}\",version=\"{version}\"}} 1"),
        );

        let c = &self.counts;
        family(
            &mut out,
            "mpreg_requests_received_total",
            "counter",
            "Client requests received on this node's connections.",
        );
        line(
            &mut out,
            format_args!("mpreg_requests_received_total {}", c.received),
        );
        family(
            &mut out,
            "mpreg_requests_total",
            "counter",
            "Client requests answered (or cancelled), by outcome: ok, an error code, or cancelled.",
        );
        for (outcome, n) in c.outcomes() {
            line(
                &mut out,
                format_args!("mpreg_requests_total{{outcome=\"{outcome}\"}} {n}"),
            );
        }
        family(
            &mut out,
            "mpreg_requests_in_flight",
            "gauge",
            "Client requests received and not answered yet.",
        );
        let in_flight = c.received.saturating_sub(c.answered());
        line(
            &mut out,
            format_args!("mpreg_requests_in_flight {in_flight}"),
        );
        family(
            &mut out,
            "mpreg_client_connections",
            "gauge",
            "Client connections open now.",
        );
        line(
            &mut out,
            format_args!("mpreg_client_connections {}", c.connections),
        );
        family(
            &mut out,
            "mpreg_unauthenticated_connections",
            "gauge",
            "Connections open and not yet authenticated (counted against max_unauthenticated_connections).",
        );
        line(
            &mut out,
            format_args!("mpreg_unauthenticated_connections {}", self.unauthenticated),
        );
        family(
            &mut out,
            "mpreg_connections_refused_total",
            "counter",
            "Connections refused, or closed by one of the node's budgets, by reason.",
        );
        for (reason, n) in c.refusals() {
            line(
                &mut out,
                format_args!("mpreg_connections_refused_total{{reason=\"{reason}\"}} {n}"),
            );
        }
        family(
            &mut out,
            "mpreg_peers_linked",
            "gauge",
            "Peers (members and leaves) with a live link to this node.",
        );
        line(&mut out, format_args!("mpreg_peers_linked {}", self.peers));
        family(
            &mut out,
            "mpreg_refused_peer_links_total",
            "counter",
            "Peer links refused: cluster secret or certificate check failed.",
        );
        line(
            &mut out,
            format_args!("mpreg_refused_peer_links_total {}", self.refused_peer_links),
        );

        family(
            &mut out,
            "mpreg_function_calls_started_total",
            "counter",
            "Calls of each function served here, started.",
        );
        for (name, f) in &self.functions {
            let name = Escaped(name);
            line(
                &mut out,
                format_args!(
                    "mpreg_function_calls_started_total{{function=\"{name}\"}} {}",
                    f.started
                ),
            );
        }
        family(
            &mut out,
            "mpreg_function_calls_total",
            "counter",
            "Calls of each function served here, ended, by outcome: ok, an error code, or cancelled.",
        );
        for (name, f) in &self.functions {
            let name = Escaped(name);
            for (outcome, n) in f.outcomes() {
                line(
                    &mut out,
                    format_args!(
                        "mpreg_function_calls_total{{function=\"{name}\",outcome=\"{outcome}\"}} {n}"
                    ),
                );
            }
        }
        family(
            &mut out,
            "mpreg_function_calls_in_flight",
            "gauge",
            "Calls of each function running here now.",
        );
        for (name, f) in &self.functions {
            let name = Escaped(name);
            line(
                &mut out,
                format_args!(
                    "mpreg_function_calls_in_flight{{function=\"{name}\"}} {}",
                    f.in_flight()
                ),
            );
        }
        family(
            &mut out,
            "mpreg_function_call_duration_seconds",
            "histogram",
            "Time each call of a function took here, whatever its outcome.",
        );
        for (name, f) in &self.functions {
            let name = Escaped(name);
            let metric = "mpreg_function_call_duration_seconds";
            for (i, n) in f.cumulative.iter().enumerate() {
                let le = BOUNDS_LABEL.get(i).copied().unwrap_or("+Inf");
                line(
                    &mut out,
                    format_args!("{metric}_bucket{{function=\"{name}\",le=\"{le}\"}} {n}"),
                );
            }
            line(
                &mut out,
                format_args!("{metric}_sum{{function=\"{name}\"}} {}", f.sum_seconds),
            );
            line(
                &mut out,
                format_args!(
                    "{metric}_count{{function=\"{name}\"}} {}",
                    f.cumulative[BUCKETS - 1]
                ),
            );
        }
        out
    }
}

/// The `# HELP` and `# TYPE` lines of a metric family.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    // Help texts are ours: no backslash or newline to escape.
    line(out, format_args!("# HELP {name} {help}"));
    line(out, format_args!("# TYPE {name} {kind}"));
}

fn line(out: &mut String, text: std::fmt::Arguments<'_>) {
    // Writing to a String cannot fail.
    let _ = out.write_fmt(text);
    out.push('\n');
}

/// A label value escaped for the text format: `\`, `"` and newline.
struct Escaped<'a>(&'a str);

impl std::fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for c in self.0.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                '"' => f.write_str("\\\"")?,
                '\n' => f.write_str("\\n")?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn every_code_has_its_own_counter() {
        for (i, &code) in CODES.iter().enumerate() {
            assert_eq!(code_index(code), i, "{code}");
            assert_eq!(Outcome::label(Outcome::Failed(code).index()), code.as_str());
        }
        assert_eq!(Outcome::label(Outcome::Ok.index()), "ok");
        assert_eq!(Outcome::label(Outcome::Cancelled.index()), "cancelled");
    }

    #[test]
    fn buckets_take_their_upper_bound() {
        let h = Histogram::default();
        h.observe(0);
        h.observe(50_000);
        h.observe(50_001);
        h.observe(10_000_000_000);
        h.observe(10_000_000_001);
        h.observe(u64::MAX / 2);
        let counts: Vec<u64> = h.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        assert_eq!(counts[0], 2, "0 and 50 µs are in the first bucket");
        assert_eq!(counts[1], 1);
        assert_eq!(counts[BUCKETS - 2], 1, "10 s exactly is in the 10 s bucket");
        assert_eq!(counts[BUCKETS - 1], 2, "above 10 s: +Inf");
        for (i, label) in BOUNDS_LABEL.iter().enumerate() {
            let parsed: f64 = label.parse().expect("a float");
            assert_eq!(Some(parsed), bucket_bound(i), "label {label}");
        }
        assert_eq!(bucket_bound(BUCKETS - 1), None);
    }

    #[test]
    fn calls_end_with_their_outcome_or_as_cancelled() {
        let m = FunctionMetrics::default();
        m.start().end(Outcome::Ok);
        m.start().end(Outcome::Failed(ErrorCode::HandlerFailed));
        let running = m.start();
        drop(m.start());
        let s = m.snapshot();
        assert_eq!(s.started, 4);
        assert_eq!(s.ended(), 3);
        assert_eq!(s.in_flight(), 1);
        let outcomes: BTreeMap<_, _> = s.outcomes().collect();
        assert_eq!(outcomes["ok"], 1);
        assert_eq!(outcomes["handler_failed"], 1);
        assert_eq!(outcomes["cancelled"], 1);
        assert!(
            !outcomes.contains_key("timeout"),
            "outcomes that never happened are left out"
        );
        assert_eq!(s.cumulative[BUCKETS - 1], 3);
        running.end(Outcome::Ok);
        assert_eq!(m.snapshot().in_flight(), 0);
    }

    #[test]
    fn a_panic_ends_a_call_as_handler_failed() {
        let m = FunctionMetrics::default();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _call = m.start();
            panic!("handler bug");
        }));
        assert!(caught.is_err());
        let outcomes: BTreeMap<_, _> = m.snapshot().outcomes().collect();
        assert_eq!(outcomes.get("handler_failed"), Some(&1));
    }

    #[test]
    fn node_counts_requests_and_connections() {
        let n = NodeMetrics::default();
        n.request().end(None);
        n.request().end(Some(ErrorCode::Cycle));
        drop(n.request());
        let open = n.connection();
        drop(n.connection());
        let s = n.snapshot();
        assert_eq!((s.received, s.answered(), s.connections), (3, 3, 1));
        let outcomes: BTreeMap<_, _> = s.outcomes().collect();
        assert_eq!(
            outcomes,
            BTreeMap::from([("ok", 1), ("cycle", 1), ("cancelled", 1)])
        );
        drop(open);
        assert_eq!(n.snapshot().connections, 0);
    }

    /// A sample line: name, labels, value.
    #[derive(Debug)]
    struct Sample {
        name: String,
        labels: BTreeMap<String, String>,
        value: f64,
    }

    /// Parses the text format back, strictly: every sample belongs to the
    /// family of the `# TYPE` line before it, label values are unescaped.
    fn parse(text: &str) -> (BTreeMap<String, (String, String)>, Vec<Sample>) {
        let mut families = BTreeMap::new();
        let mut help: Option<(String, String)> = None;
        let mut current: Option<(String, String)> = None;
        let mut samples = Vec::new();
        assert!(text.ends_with('\n'), "ends with a newline");
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# HELP ") {
                let (name, text) = rest.split_once(' ').expect("HELP name text");
                help = Some((name.to_owned(), text.to_owned()));
            } else if let Some(rest) = l.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{l}");
                let (help_name, help_text) = help.take().expect("HELP before TYPE");
                assert_eq!(help_name, name);
                assert!(!help_text.is_empty());
                assert!(
                    families
                        .insert(name.to_owned(), (kind.to_owned(), help_text))
                        .is_none(),
                    "family {name} appears once"
                );
                current = Some((name.to_owned(), kind.to_owned()));
            } else {
                let (family, kind) = current.clone().expect("a sample after a TYPE line");
                let (series, value) = l.rsplit_once(' ').expect("series value");
                let value: f64 = value.parse().expect("a number");
                let (name, labels) = match series.split_once('{') {
                    None => (series.to_owned(), BTreeMap::new()),
                    Some((name, rest)) => {
                        let body = rest.strip_suffix('}').expect("labels end with }");
                        (name.to_owned(), parse_labels(body))
                    }
                };
                let allowed: Vec<String> = if kind == "histogram" {
                    ["_bucket", "_sum", "_count"]
                        .iter()
                        .map(|s| format!("{family}{s}"))
                        .collect()
                } else {
                    vec![family.clone()]
                };
                assert!(allowed.contains(&name), "{name} in family {family}");
                samples.push(Sample {
                    name,
                    labels,
                    value,
                });
            }
        }
        (families, samples)
    }

    fn parse_labels(body: &str) -> BTreeMap<String, String> {
        let mut labels = BTreeMap::new();
        let mut chars = body.chars().peekable();
        while chars.peek().is_some() {
            let name: String = chars.by_ref().take_while(|&c| c != '=').collect();
            assert_eq!(chars.next(), Some('"'), "label value is quoted");
            let mut value = String::new();
            loop {
                match chars.next().expect("unterminated label value") {
                    '"' => break,
                    '\\' => match chars.next() {
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        Some('n') => value.push('\n'),
                        other => panic!("bad escape {other:?}"),
                    },
                    '\n' => panic!("raw newline in a label value"),
                    c => value.push(c),
                }
            }
            labels.insert(name, value);
            match chars.next() {
                Some(',') | None => {}
                other => panic!("expected , between labels, got {other:?}"),
            }
        }
        labels
    }

    #[test]
    fn the_text_format_parses_back() {
        let plain = FunctionMetrics::default();
        for _ in 0..3 {
            plain.start().end(Outcome::Ok);
        }
        plain.start().end(Outcome::Failed(ErrorCode::BadArguments));
        let _running = plain.start();
        let odd = FunctionMetrics::default();
        drop(odd.start());
        let odd_name = "we\"ird\\na\nme";
        let node = NodeMetrics::default();
        node.request().end(None);
        let _connection = node.connection();
        node.refused(Refused::SlowReader);
        node.refused(Refused::SlowReader);
        let text = Exposition {
            node: "node \"one\"",
            counts: node.snapshot(),
            peers: 2,
            refused_peer_links: 0,
            unauthenticated: 3,
            functions: vec![("echo", plain.snapshot()), (odd_name, odd.snapshot())],
        }
        .render();
        let (families, samples) = parse(&text);
        assert_eq!(
            families["mpreg_function_call_duration_seconds"].0,
            "histogram"
        );
        assert_eq!(families["mpreg_function_calls_total"].0, "counter");
        assert_eq!(families["mpreg_client_connections"].0, "gauge");
        assert_eq!(families["mpreg_connections_refused_total"].0, "counter");

        let find = |name: &str, labels: &[(&str, &str)]| -> f64 {
            let want: BTreeMap<String, String> = labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            let found: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.name == name && s.labels == want)
                .collect();
            assert_eq!(found.len(), 1, "one sample {name} {want:?} in\n{text}");
            found[0].value
        };
        assert_eq!(
            find(
                "mpreg_node_info",
                &[
                    ("node", "node \"one\""),
                    ("version", env!("CARGO_PKG_VERSION"))
                ]
            ),
            1.0
        );
        assert_eq!(find("mpreg_requests_total", &[("outcome", "ok")]), 1.0);
        assert_eq!(find("mpreg_client_connections", &[]), 1.0);
        assert_eq!(find("mpreg_peers_linked", &[]), 2.0);
        assert_eq!(find("mpreg_unauthenticated_connections", &[]), 3.0);
        assert_eq!(
            find(
                "mpreg_connections_refused_total",
                &[("reason", "slow_reader")]
            ),
            2.0
        );
        assert_eq!(
            find(
                "mpreg_connections_refused_total",
                &[("reason", "handshake_timeout")]
            ),
            0.0
        );
        assert_eq!(
            find(
                "mpreg_function_calls_started_total",
                &[("function", "echo")]
            ),
            5.0
        );
        assert_eq!(
            find(
                "mpreg_function_calls_total",
                &[("function", "echo"), ("outcome", "ok")]
            ),
            3.0
        );
        assert_eq!(
            find(
                "mpreg_function_calls_total",
                &[("function", "echo"), ("outcome", "bad_arguments")]
            ),
            1.0
        );
        assert_eq!(
            find("mpreg_function_calls_in_flight", &[("function", "echo")]),
            1.0
        );
        assert_eq!(
            find(
                "mpreg_function_calls_total",
                &[("function", odd_name), ("outcome", "cancelled")]
            ),
            1.0
        );
        assert_eq!(
            find(
                "mpreg_function_calls_total",
                &[("function", odd_name), ("outcome", "ok")]
            ),
            0.0
        );

        for function in ["echo", odd_name] {
            let buckets: Vec<(f64, f64)> = samples
                .iter()
                .filter(|s| {
                    s.name == "mpreg_function_call_duration_seconds_bucket"
                        && s.labels["function"] == function
                })
                .map(|s| {
                    let le = &s.labels["le"];
                    let le = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().expect("le is a float")
                    };
                    (le, s.value)
                })
                .collect();
            assert_eq!(buckets.len(), BUCKETS, "{function}");
            for pair in buckets.windows(2) {
                assert!(pair[0].0 < pair[1].0, "bounds grow: {pair:?}");
                assert!(pair[0].1 <= pair[1].1, "counts are cumulative: {pair:?}");
            }
            let inf = buckets.last().expect("+Inf bucket");
            assert_eq!(inf.0, f64::INFINITY, "the last bucket is +Inf");
            let count = find(
                "mpreg_function_call_duration_seconds_count",
                &[("function", function)],
            );
            assert_eq!(inf.1, count, "+Inf equals the count for {function}");
            let sum = find(
                "mpreg_function_call_duration_seconds_sum",
                &[("function", function)],
            );
            assert!(sum >= 0.0);
        }
        assert_eq!(
            find(
                "mpreg_function_call_duration_seconds_count",
                &[("function", "echo")]
            ),
            4.0
        );
    }
}
