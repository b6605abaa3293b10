//! `mpreg bench suite`: every target of BENCHMARKS.md measured in one run
//! and printed as one table.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use futures_util::{SinkExt, StreamExt};
use mpreg::{ClusterView, Node, NodeBuilder, NodeHandle};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::*;

/// What a row must reach.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// ratio >= x
    RatioAtLeast(f64),
    /// ratio <= x
    RatioAtMost(f64),
    /// measured < x
    Below(f64),
    /// measured <= x
    AtMost(f64),
    /// measured >= x
    AtLeast(f64),
    /// For information.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Unit {
    ReqPerSec,
    Micros,
    Millis,
    MiB,
    MBps,
}

impl Unit {
    fn show(self, v: f64) -> String {
        match self {
            Unit::ReqPerSec => format!("{} req/s", thousands(v.round() as u64)),
            Unit::Micros => micros(v.round() as u64),
            Unit::Millis => format!("{v:.1} ms"),
            Unit::MiB => format!("{v:.1} MiB"),
            Unit::MBps => format!("{v:.0} MB/s"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Unit::ReqPerSec => "req/s",
            Unit::Micros => "us",
            Unit::Millis => "ms",
            Unit::MiB => "MiB",
            Unit::MBps => "MB/s",
        }
    }
}

/// One line of the suite's table.
#[derive(Debug, Clone)]
struct Row {
    what: String,
    measured: f64,
    unit: Unit,
    /// What it is compared with: a label and a value in the same unit.
    reference: Option<(String, f64)>,
    target: Target,
    /// Errors and timeouts seen while measuring.
    errors: u64,
    note: Option<String>,
}

impl Row {
    fn new(what: impl Into<String>, measured: f64, unit: Unit, target: Target) -> Self {
        Self {
            what: what.into(),
            measured,
            unit,
            reference: None,
            target,
            errors: 0,
            note: None,
        }
    }

    fn against(mut self, label: impl Into<String>, value: f64) -> Self {
        self.reference = Some((label.into(), value));
        self
    }

    fn errors(mut self, n: u64) -> Self {
        self.errors = n;
        self
    }

    fn note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }

    fn ratio(&self) -> Option<f64> {
        self.reference
            .as_ref()
            .map(|(_, r)| ratio(self.measured, *r))
    }

    /// Some(true) met, Some(false) not met, None when there is no target.
    fn met(&self) -> Option<bool> {
        let m = self.measured;
        match self.target {
            Target::RatioAtLeast(x) => self.ratio().map(|r| r >= x),
            Target::RatioAtMost(x) => self.ratio().map(|r| r <= x),
            Target::Below(x) => Some(m < x),
            Target::AtMost(x) => Some(m <= x),
            Target::AtLeast(x) => Some(m >= x),
            Target::None => None,
        }
    }

    fn target_text(&self) -> String {
        let u = self.unit.name();
        match self.target {
            Target::RatioAtLeast(x) => format!(">= {x}x"),
            Target::RatioAtMost(x) => format!("<= {x}x"),
            Target::Below(x) => format!("< {x} {u}"),
            Target::AtMost(x) => format!("<= {x} {u}"),
            Target::AtLeast(x) => format!(">= {x} {u}"),
            Target::None => "-".into(),
        }
    }

    fn cells(&self) -> Vec<String> {
        vec![
            self.what.clone(),
            self.unit.show(self.measured),
            match &self.reference {
                Some((label, v)) => format!("{} ({label})", self.unit.show(*v)),
                None => "-".into(),
            },
            self.ratio().map_or("-".into(), fmt_ratio),
            self.target_text(),
            match self.met() {
                Some(true) => "met".into(),
                Some(false) => "NOT MET".into(),
                None => "-".into(),
            },
            thousands(self.errors),
        ]
    }

    fn json(&self) -> Value {
        json!({
            "what": self.what,
            "measured": round3(self.measured),
            "unit": self.unit.name(),
            "reference": self.reference.as_ref().map(|(l, v)| json!({"what": l, "value": round3(*v)})),
            "ratio": self.ratio().map(round3),
            "target": self.target_text(),
            "met": self.met(),
            "errors": self.errors,
            "note": self.note,
        })
    }
}

const SUITE_HEADER: [&str; 7] = [
    "what",
    "measured",
    "reference",
    "ratio",
    "target",
    "verdict",
    "errors",
];

/// A load run in the suite, kept for the detailed table.
#[derive(Debug)]
struct Run {
    name: &'static str,
    shape: Shape,
    report: Report,
}

/// A node for the suite: loopback, port 0, default settings.
fn node(name: &str) -> NodeBuilder {
    Node::builder().name(name).listen("127.0.0.1:0")
}

fn node_url(node: &NodeHandle) -> BenchResult<String> {
    node.url().ok_or_else(|| "the node does not listen".into())
}

/// The datasets some node in `view` offers a function with.
fn offered_datasets(view: &ClusterView) -> BTreeSet<&str> {
    view.nodes
        .iter()
        .flat_map(|n| &n.functions)
        .flat_map(|f| &f.datasets)
        .map(String::as_str)
        .collect()
}

const CONVERGE: Duration = Duration::from_secs(60);

async fn await_view(
    node: &NodeHandle,
    what: &str,
    ready: impl FnMut(&ClusterView) -> bool,
) -> BenchResult<()> {
    if node.wait_for(CONVERGE, ready).await {
        Ok(())
    } else {
        Err(format!("{}: {what} did not happen within {CONVERGE:?}", node.name()).into())
    }
}

/// `n` `echo` commands on dataset `locs`, each consuming the previous one.
fn chain(n: usize, locs: &[&str]) -> Value {
    let cmds: Vec<Value> = (0..n)
        .map(|i| {
            let arg = if i == 0 {
                json!("hi")
            } else {
                json!(format!("c{}", i - 1))
            };
            json!({"name": format!("c{i}"), "fun": "echo", "args": [arg], "locs": locs})
        })
        .collect();
    Value::Array(cmds)
}

/// Reference example 5 (four commands: echo, echo, echos, echo).
fn example_five() -> Value {
    json!([
        {"name": "|first", "fun": "echo", "args": ["hi there!"], "locs": []},
        {"name": "|second", "fun": "echo", "args": ["|first"], "locs": []},
        {"name": "|third", "fun": "echos", "args": ["|first", "|second", "AND ME TOO"], "locs": []},
        {"name": "|4th", "fun": "echo", "args": ["|third"], "locs": []},
    ])
}

/// A JSON array of integers, at least `bytes` long when serialized.
fn number_array(bytes: usize) -> String {
    let mut out = String::with_capacity(bytes + 16);
    out.push('[');
    let mut x: u64 = 1;
    while out.len() < bytes {
        if out.len() > 1 {
            out.push(',');
        }
        // A cheap spread of 1- to 10-digit numbers.
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let _ = write!(out, "{}", (x >> 33) % 10_000_000_000);
    }
    out.push(']');
    out
}

/// A template whose one command echoes the raw JSON `array` on `locs`.
fn array_echo(array: &str, locs: &[&str]) -> Template {
    let locs = Value::from(locs.iter().map(|s| Value::from(*s)).collect::<Vec<_>>());
    let text = format!(
        "{{\"cmds\":[{{\"name\":\"a\",\"fun\":\"echo\",\"args\":[{array}],\"locs\":{locs}}}]}}"
    );
    // Build the template without re-parsing 16 MiB into a Value.
    Template::from_object_text(&text)
}

/// `mpreg bench suite`.
pub(crate) async fn suite(json_out: bool, quick: bool) -> BenchResult<()> {
    let started = Instant::now();
    // Each load row is measured in `rounds` slices, the rows of a group
    // taking turns (baseline, target, baseline, target, ...), so that drift
    // of a shared machine hits every row of a group alike.
    let (rounds, slice, warmup) = if quick {
        (2, Duration::from_millis(500), Duration::from_millis(100))
    } else {
        (5, Duration::from_secs(1), Duration::from_millis(200))
    };
    let timeout = Duration::from_secs(10);
    let shape = |connections, inflight| Shape {
        connections,
        inflight,
        duration: slice,
        warmup,
        timeout,
    };
    let wide = shape(8, 16);
    let seq = shape(1, 1);
    let balanced = shape(32, 16);
    let progress = !json_out || std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut runs: Vec<Run> = Vec::new();

    let echo = Template::echo();
    let echo_b =
        Template::commands(json!([{"name": "a", "fun": "echo", "args": ["hi"], "locs": ["b"]}]));
    let echo_w =
        Template::commands(json!([{"name": "a", "fun": "echo", "args": ["hi"], "locs": ["w"]}]));
    let chain4 = Template::commands(example_five());
    let chain8_b = Template::commands(chain(8, &["b"]));

    // In-process servers: the baseline, one node, and a forwarding pair.
    let baseline = Baseline::start().await?;
    let base_url = baseline.url();
    let single = node("single").start().await?;
    let single_url = node_url(&single)?;
    let b = node("B").datasets(["b"]).start().await?;
    let a = node("A").peers([node_url(&b)?]).start().await?;
    let a_url = node_url(&a)?;
    await_view(&a, "B offers dataset b", |v| v.nodes_with_dataset("b") == 1).await?;

    // Throughput, then latency: each group's rows take turns.
    let wide_group = [
        ("baseline echo 8x16", &base_url, &echo, wide),
        ("single node echo 8x16", &single_url, &echo, wide),
        ("forwarded A->B 8x16", &a_url, &echo_b, wide),
    ];
    let seq_group = [
        ("baseline echo 1x1", &base_url, &echo, seq),
        ("single node echo 1x1", &single_url, &echo, seq),
        ("4-command chain 1x1", &single_url, &chain4, seq),
        ("forwarded A->B 1x1", &a_url, &echo_b, seq),
        ("8-chain on B via A 1x1", &a_url, &chain8_b, seq),
    ];
    let first = runs.len();
    runs.extend(take_turns(&wide_group, rounds, progress).await?);
    let (base_wide, single_wide, fwd_wide) = (first, first + 1, first + 2);
    let first = runs.len();
    runs.extend(take_turns(&seq_group, rounds, progress).await?);
    let (base_seq, single_seq, chain4_seq, fwd_seq, chain8_seq) =
        (first, first + 1, first + 2, first + 3, first + 4);

    // 16 MiB through a hop, and through one node without a hop.
    let array = number_array(16 << 20);
    let payload = array.len() as f64;
    let calls = if quick { 3 } else { 5 };
    let hop_template = array_echo(&array, &["b"]);
    let local_template = array_echo(&array, &[]);
    drop(array);
    if progress {
        eprint!("\r16 MiB echo ({} bytes per frame)...", hop_template.len());
    }
    let _ = sequential(&a_url, &hop_template, 1).await?;
    let hop = median(sequential(&a_url, &hop_template, calls).await?);
    let _ = sequential(&single_url, &local_template, 1).await?;
    let local = median(sequential(&single_url, &local_template, calls).await?);
    let _ = sequential(&base_url, &local_template, 1).await?;
    let base_big = median(sequential(&base_url, &local_template, calls).await?);
    drop((hop_template, local_template));
    baseline.stop();
    for n in [a, b, single] {
        n.shutdown().await;
    }

    // A balancer with 3 workers and one with 1 worker, same load, taking
    // turns (both clusters run all along; the idle one only gossips).
    let mut clusters = Vec::new();
    for workers in [3, 1] {
        let balancer = node(&format!("balancer-{workers}")).start().await?;
        let seed = node_url(&balancer)?;
        let mut nodes = Vec::new();
        for i in 0..workers {
            nodes.push(
                node(&format!("worker-{workers}-{i}"))
                    .datasets(["w"])
                    .peers([seed.clone()])
                    .start()
                    .await?,
            );
        }
        await_view(&balancer, "every worker offers dataset w", |v| {
            v.nodes_with_dataset("w") == workers
        })
        .await?;
        nodes.push(balancer);
        clusters.push((seed, nodes));
    }
    let balancer_group = [
        (
            "balancer + 3 workers 32x16",
            &clusters[0].0,
            &echo_w,
            balanced,
        ),
        (
            "balancer + 1 worker 32x16",
            &clusters[1].0,
            &echo_w,
            balanced,
        ),
    ];
    let first = runs.len();
    runs.extend(take_turns(&balancer_group, rounds, progress).await?);
    let balancer_runs = [first, first + 1];
    for (_, nodes) in clusters {
        join_all(nodes.into_iter().map(NodeHandle::shutdown)).await;
    }

    // Process rows.
    if progress {
        eprint!("\r{:79}\rprocesses: start to accepting...", "");
    }
    let starts = if quick { 5 } else { 11 };
    let start_ms = process_start_ms(starts).await?;
    if progress {
        eprint!("\r{:79}\rprocesses: memory...", "");
    }
    let memory = process_memory(if quick { 200 } else { 1000 }).await?;

    // Cluster rows.
    if progress {
        eprint!("\r{:79}\rcluster: 16-node join...", "");
    }
    let join_ms = join_sixteenth().await?;
    if progress {
        eprint!("\r{:79}\rcluster: 64 nodes...", "");
    }
    let converge64 = converge(64, None).await?;
    let converge64_fast = converge(64, Some(Duration::from_millis(100))).await?;
    if progress {
        eprint!("\r{:79}\r", "");
    }

    // The table.
    let r = |i: usize| &runs[i].report;
    let errs = |is: &[usize]| {
        is.iter()
            .map(|&i| r(i).errors + r(i).timeouts + r(i).unmatched)
            .sum::<u64>()
    };
    let single_p50 = r(single_seq).p50_us();
    let mut rows = vec![
        Row::new(
            "single node echo, 8 conn x 16 in flight: throughput",
            r(single_wide).throughput(),
            Unit::ReqPerSec,
            Target::RatioAtLeast(0.7),
        )
        .against("baseline", r(base_wide).throughput())
        .errors(errs(&[single_wide, base_wide])),
        Row::new(
            "single node echo, 1 conn sequential: p50",
            single_p50,
            Unit::Micros,
            Target::RatioAtMost(1.3),
        )
        .against("baseline", r(base_seq).p50_us())
        .errors(errs(&[single_seq, base_seq])),
        Row::new(
            "4-command chain (example 5), one node: p50",
            r(chain4_seq).p50_us(),
            Unit::Micros,
            Target::RatioAtMost(1.5),
        )
        .against("single echo", single_p50)
        .errors(errs(&[chain4_seq])),
        Row::new(
            "one call forwarded A -> B: p50",
            r(fwd_seq).p50_us(),
            Unit::Micros,
            Target::RatioAtMost(2.2),
        )
        .against("single echo", single_p50)
        .errors(errs(&[fwd_seq])),
        Row::new(
            "8-command chain on B, sent to A: p50",
            r(chain8_seq).p50_us(),
            Unit::Micros,
            Target::RatioAtMost(2.5),
        )
        .against("single echo", single_p50)
        .errors(errs(&[chain8_seq])),
        Row::new(
            "forwarded A -> B, 8 conn x 16 in flight: throughput",
            r(fwd_wide).throughput(),
            Unit::ReqPerSec,
            Target::RatioAtLeast(0.5),
        )
        .against("single node", r(single_wide).throughput())
        .errors(errs(&[fwd_wide])),
        Row::new(
            "3 workers behind a balancer, 32 conn x 16: throughput",
            r(balancer_runs[0]).throughput(),
            Unit::ReqPerSec,
            Target::RatioAtLeast(1.5),
        )
        .against("1 worker", r(balancer_runs[1]).throughput())
        .errors(errs(&balancer_runs)),
        Row::new(
            "mpreg server start to accepting (median)",
            start_ms.0,
            Unit::Millis,
            Target::Below(100.0),
        )
        .note(format!("median of {starts} starts; min {:.1} ms, max {:.1} ms", start_ms.1, start_ms.2)),
        Row::new(
            "idle node resident memory",
            memory.idle_mib,
            Unit::MiB,
            Target::AtMost(15.0),
        ),
        Row::new(
            format!("{} open idle client connections: extra RSS", thousands(memory.connections as u64)),
            memory.extra_mib,
            Unit::MiB,
            Target::AtMost(40.0),
        )
        .note(memory.note.clone()),
        Row::new(
            "a node joining a 16-node cluster: routable everywhere",
            join_ms,
            Unit::Millis,
            Target::Below(1000.0),
        )
        .note("default failure detection (probe 1 s); from start() to every node offering its dataset"),
        Row::new(
            "64 nodes in one process: all see all abilities",
            converge64.total_ms,
            Unit::Millis,
            Target::AtMost(3000.0),
        )
        .note(format!(
            "from the first start(); starting the 64 took {:.0} ms",
            converge64.start_ms
        )),
        Row::new(
            "64 nodes, probe interval 100 ms (for comparison)",
            converge64_fast.total_ms,
            Unit::Millis,
            Target::None,
        )
        .note(format!(
            "as above with failure_detection(100 ms, 500 ms); starting took {:.0} ms",
            converge64_fast.start_ms
        )),
        Row::new(
            "16 MiB JSON array echoed through a hop (A -> B)",
            payload / hop.as_secs_f64() / 1e6,
            Unit::MBps,
            Target::AtLeast(150.0),
        )
        .against("one node, no hop", payload / local.as_secs_f64() / 1e6)
        .note(format!(
            "{} bytes each way; median of {calls} calls: {:.1} ms through the hop, {:.1} ms without",
            thousands(payload as u64),
            hop.as_secs_f64() * 1e3,
            local.as_secs_f64() * 1e3
        )),
        Row::new(
            "16 MiB JSON array to the baseline (parsed, small reply)",
            payload / base_big.as_secs_f64() / 1e6,
            Unit::MBps,
            Target::None,
        )
        .note(format!(
            "the client's and the transport's share: {:.1} ms per call (median of {calls}), payload one way only",
            base_big.as_secs_f64() * 1e3
        )),
    ];
    // No target of its own: the quick suite opens fewer connections.
    if quick {
        for row in &mut rows {
            if row.what.contains("idle client connections") {
                row.target = Target::None;
            }
        }
    }

    let elapsed = started.elapsed();
    if json_out {
        let out = json!({
            "quick": quick,
            "rounds": rounds,
            "slice_s": slice.as_secs_f64(),
            "warmup_s": warmup.as_secs_f64(),
            "elapsed_s": round3(elapsed.as_secs_f64()),
            "rows": rows.iter().map(Row::json).collect::<Vec<_>>(),
            "runs": runs.iter().map(|run| {
                let mut v = run.report.json();
                v["name"] = json!(run.name);
                v["connections"] = json!(run.shape.connections);
                v["inflight"] = json!(run.shape.inflight);
                v
            }).collect::<Vec<_>>(),
        });
        println!("{out}");
    } else {
        let cells: Vec<Vec<String>> = rows.iter().map(Row::cells).collect();
        println!(
            "mpreg bench suite{} ({:.0} s; each load row: {rounds} turns of {:.1} s, each after a {:.1} s warm-up)",
            if quick { " --quick" } else { "" },
            elapsed.as_secs_f64(),
            slice.as_secs_f64(),
            warmup.as_secs_f64()
        );
        print!(
            "{}",
            format_table(
                &SUITE_HEADER,
                &cells,
                &[true, false, false, false, true, true]
            )
        );
        let met = rows.iter().filter(|r| r.met() == Some(true)).count();
        let judged = rows.iter().filter(|r| r.met().is_some()).count();
        println!("{met} of {judged} targets met");
        println!();
        println!("notes:");
        for row in rows.iter().filter(|r| r.note.is_some()) {
            println!(
                "  {}: {}",
                row.what,
                row.note.as_deref().unwrap_or_default()
            );
        }
        println!();
        println!("load runs (in-process servers; the load generator shares the cores):");
        let detail: Vec<Vec<String>> = runs
            .iter()
            .map(|run| cells_with(run.name, run.report.cells()))
            .collect();
        print!("{}", format_table(&REPORT_HEADER, &detail, &[true]));
        for run in &runs {
            if let Some(e) = &run.report.first_error {
                println!("{}: first error: {e}", run.name);
            }
            if run.report.unmatched > 0 {
                println!(
                    "{}: {} replies matched no request",
                    run.name, run.report.unmatched
                );
            }
        }
    }
    Ok(())
}

/// Measures each `(name, url, request, shape)` of `group` in `rounds`
/// slices, taking turns; each row's slices are merged.
async fn take_turns(
    group: &[(&'static str, &String, &Template, Shape)],
    rounds: u32,
    progress: bool,
) -> BenchResult<Vec<Run>> {
    let mut runs: Vec<Run> = group
        .iter()
        .map(|&(name, _, _, shape)| Run {
            name,
            shape,
            report: Report::new(Duration::ZERO),
        })
        .collect();
    for round in 1..=rounds {
        for (run, &(name, url, template, shape)) in runs.iter_mut().zip(group) {
            let label = format!("{name} (round {round}/{rounds})");
            let report = run_load(url, template, shape, progress.then_some(label.as_str())).await?;
            run.report.window += report.window;
            run.report.merge(report);
        }
    }
    Ok(runs)
}

/// A child process killed when dropped.
#[derive(Debug)]
pub(crate) struct Child(pub(crate) std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `mpreg server` (this executable) on `127.0.0.1:port`.
fn spawn_server(port: u16) -> BenchResult<Child> {
    spawn_server_with(port, &[])
}

/// Starts `mpreg server` (this executable) on `127.0.0.1:port` with these
/// environment variables (`MPREG_*` settings) added to this process's.
pub(crate) fn spawn_server_with(port: u16, vars: &[(&str, &str)]) -> BenchResult<Child> {
    let exe = std::env::current_exe()?;
    let child = std::process::Command::new(exe)
        .args(["server", "--listen", &format!("127.0.0.1:{port}")])
        .envs(vars.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    Ok(Child(child))
}

/// A port that was free a moment ago.
pub(crate) fn free_port() -> BenchResult<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Polls until a WebSocket handshake with `url` succeeds.
pub(crate) async fn until_accepting(url: &str, guard: Duration) -> BenchResult<Ws> {
    let deadline = Instant::now() + guard;
    loop {
        match tokio_tungstenite::connect_async_with_config(url, Some(client_config()), true).await {
            Ok((ws, _)) => return Ok(ws),
            Err(e) if Instant::now() > deadline => {
                return Err(format!("{url} did not accept within {guard:?}: {e}").into());
            }
            Err(_) => tokio::time::sleep(Duration::from_micros(500)).await,
        }
    }
}

/// Median, min and max time from spawning `mpreg server` to a completed
/// WebSocket handshake, over `n` starts, in milliseconds.
async fn process_start_ms(n: usize) -> BenchResult<(f64, f64, f64)> {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let port = free_port()?;
        let url = format!("ws://127.0.0.1:{port}");
        let at = Instant::now();
        let child = spawn_server(port)?;
        let mut ws = until_accepting(&url, Duration::from_secs(10)).await?;
        times.push(at.elapsed());
        let _ = ws.close(None).await;
        drop(child);
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok((
        ms(median(times.clone())),
        ms(times.first().copied().unwrap_or_default()),
        ms(times.last().copied().unwrap_or_default()),
    ))
}

/// Resident memory of a process, MiB.
pub(crate) fn rss_mib(pid: u32) -> BenchResult<f64> {
    status_mib(pid, "VmRSS")
}

/// A memory field of `/proc/PID/status` (`VmRSS`, `VmHWM`, ...), MiB.
pub(crate) fn status_mib(pid: u32, field: &str) -> BenchResult<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb =
        status_kib(&status, field).ok_or_else(|| format!("no {field} in /proc/{pid}/status"))?;
    Ok(kb as f64 / 1024.0)
}

/// A `Field:   1234 kB` line of a `/proc/PID/status` text, in KiB.
pub(crate) fn status_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The soft limit on open files of this process, if known.
pub(crate) fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[derive(Debug)]
struct Memory {
    idle_mib: f64,
    extra_mib: f64,
    connections: usize,
    note: String,
}

/// A client connection that has sent one request and read its reply, as
/// an idle client's is (a connection that never sends counts as not yet
/// authenticated, and is closed at the node's handshake deadline).
async fn connect_and_echo(url: &str) -> BenchResult<Ws> {
    let mut ws = connect(url).await?;
    let request = json!({"role": "rpc", "mpreg": 1, "u": 1,
        "cmds": [{"name": "a", "fun": "echo", "args": [1]}]});
    ws.send(Message::text(request.to_string())).await?;
    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        Ok(Some(Ok(Message::Text(_)))) => Ok(ws),
        other => Err(format!("no reply to the first request: {other:?}").into()),
    }
}

/// Idle RSS of a fresh `mpreg server`, and its growth with `want` idle
/// client connections open (each after one request).
async fn process_memory(want: usize) -> BenchResult<Memory> {
    const SETTLE: Duration = Duration::from_millis(500);
    let port = free_port()?;
    let url = format!("ws://127.0.0.1:{port}");
    let child = spawn_server(port)?;
    let pid = child.0.id();
    let probe = until_accepting(&url, Duration::from_secs(10)).await?;
    drop(probe);
    tokio::time::sleep(SETTLE).await;
    let idle = rss_mib(pid)?;

    let limit = open_files_limit();
    let connections = match limit {
        Some(l) => want.min(usize::try_from(l.saturating_sub(200)).unwrap_or(usize::MAX)),
        None => want,
    };
    let mut open = Vec::with_capacity(connections);
    while open.len() < connections {
        let chunk = (connections - open.len()).min(100);
        let batch = join_all((0..chunk).map(|_| connect_and_echo(&url))).await;
        for ws in batch {
            open.push(ws?);
        }
    }
    tokio::time::sleep(SETTLE * 2).await;
    let loaded = rss_mib(pid)?;
    drop(open);
    drop(child);
    let mut note = format!(
        "RSS {idle:.1} MiB idle, {loaded:.1} MiB with {connections} connections (after {} ms settle); {:.1} KiB per connection",
        (SETTLE * 2).as_millis(),
        (loaded - idle) * 1024.0 / connections.max(1) as f64
    );
    if connections < want {
        let _ = write!(
            note,
            "; only {connections} opened: open-files limit {limit:?}"
        );
    }
    Ok(Memory {
        idle_mib: idle,
        extra_mib: loaded - idle,
        connections,
        note,
    })
}

/// Starts 15 nodes (each with its own dataset) joined through the first,
/// waits until all see all, then starts a 16th and measures until every
/// node offers its dataset. Milliseconds.
async fn join_sixteenth() -> BenchResult<f64> {
    let first = node("n00").datasets(["d00"]).start().await?;
    let seed = node_url(&first)?;
    let mut nodes = vec![first];
    for i in 1..15 {
        nodes.push(
            node(&format!("n{i:02}"))
                .datasets([format!("d{i:02}")])
                .peers([seed.clone()])
                .start()
                .await?,
        );
    }
    for n in &nodes {
        await_view(n, "15 nodes converge", |v| {
            v.nodes.len() == 15 && offered_datasets(v).len() >= 15
        })
        .await?;
    }
    let at = Instant::now();
    nodes.push(node("n15").datasets(["d15"]).peers([seed]).start().await?);
    for n in &nodes {
        await_view(n, "n15's dataset is routable", |v| {
            v.nodes_with_dataset("d15") == 1
        })
        .await?;
    }
    let elapsed = at.elapsed();
    join_all(nodes.into_iter().map(NodeHandle::shutdown)).await;
    Ok(elapsed.as_secs_f64() * 1e3)
}

#[derive(Debug)]
struct Converged {
    start_ms: f64,
    total_ms: f64,
}

/// Starts `n` nodes in this process, each with its own dataset, all joined
/// through the first; measures until every node sees every node and every
/// dataset.
/// `probe`: failure detection's probe interval (default 1 s when `None`;
/// the suspect timeout is 5 probes).
async fn converge(n: usize, probe: Option<Duration>) -> BenchResult<Converged> {
    let member = |name: String| match probe {
        Some(p) => node(&name).failure_detection(p, p * 5),
        None => node(&name),
    };
    let at = Instant::now();
    let first = member("m00".into()).datasets(["e00"]).start().await?;
    let seed = node_url(&first)?;
    let mut nodes = vec![first];
    for i in 1..n {
        nodes.push(
            member(format!("m{i:02}"))
                .datasets([format!("e{i:02}")])
                .peers([seed.clone()])
                .start()
                .await?,
        );
    }
    let start_ms = at.elapsed().as_secs_f64() * 1e3;
    for node in &nodes {
        await_view(node, "every node sees every node", |v| {
            v.nodes.len() == n && offered_datasets(v).len() >= n
        })
        .await?;
    }
    let total_ms = at.elapsed().as_secs_f64() * 1e3;
    join_all(nodes.into_iter().map(NodeHandle::shutdown)).await;
    Ok(Converged { start_ms, total_ms })
}

// ---------------------------------------------------------------------------
// Formatting
// ---------------------------------------------------------------------------

pub(crate) fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 { f64::NAN } else { a / b }
}

pub(crate) fn fmt_ratio(r: f64) -> String {
    if r.is_finite() {
        format!("{r:.2}x")
    } else {
        "-".into()
    }
}

pub(crate) fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// `1234567` as `1,234,567`.
pub(crate) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A latency in microseconds, shown in us below 10 ms, else in ms.
pub(crate) fn micros(us: u64) -> String {
    if us < 10_000 {
        format!("{us} us")
    } else {
        format!("{:.1} ms", us as f64 / 1e3)
    }
}

/// A table: columns padded to their widest cell; column `i` is
/// left-aligned when `left[i]` is true (default: right-aligned, except the
/// first). Trailing spaces are trimmed.
pub(crate) fn format_table(header: &[&str], rows: &[Vec<String>], left: &[bool]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let is_left = |i: usize| left.get(i).copied().unwrap_or(i == 0);
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, width) in widths.iter().enumerate() {
            let cell = row.get(i).map_or("", String::as_str);
            let pad = width.saturating_sub(cell.chars().count());
            if i > 0 {
                line.push_str("  ");
            }
            if is_left(i) {
                line.push_str(cell);
                line.extend(std::iter::repeat_n(' ', pad));
            } else {
                line.extend(std::iter::repeat_n(' ', pad));
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_a_fresh_id_and_the_commands() {
        let t = Template::echo();
        let frame: Value = serde_json::from_str(&t.frame(42)).expect("JSON");
        assert_eq!(frame["u"], 42);
        assert_eq!(frame["role"], "rpc");
        assert_eq!(frame["mpreg"], 1, "mpreg's reply form");
        assert_eq!(frame["cmds"][0]["fun"], "echo");
        let t =
            Template::parse(r#"{"u": "x", "cmds": [{"name": "a", "fun": "f"}], "timeout_ms": 5}"#)
                .expect("object");
        let frame: Value = serde_json::from_str(&t.frame(7)).expect("JSON");
        assert_eq!(frame["u"], 7);
        assert_eq!(frame["timeout_ms"], 5);
        assert!(Template::parse("{}").is_err());
        assert!(Template::parse("nope").is_err());
        let big = array_echo("[1,2,3]", &["b"]);
        let frame: Value = serde_json::from_str(&big.frame(3)).expect("JSON");
        assert_eq!(frame["cmds"][0]["args"][0], json!([1, 2, 3]));
        assert_eq!(frame["cmds"][0]["locs"], json!(["b"]));
        assert_eq!(frame["mpreg"], 1);
        let array = number_array(1000);
        assert!(array.len() >= 1000);
        assert!(serde_json::from_str::<Vec<u64>>(&array).is_ok());
    }

    #[test]
    fn replies_are_checked() {
        assert_eq!(
            check_reply(br#"{"u":3,"r":{"a":"hi"},"error":null}"#),
            Checked::Ok(3)
        );
        assert_eq!(
            check_reply(br#"{"role":"rpc-response","u":4,"r":{"x":null},"error":null}"#),
            Checked::Ok(4)
        );
        assert!(matches!(
            check_reply(br#"{"u":5,"r":null,"error":{"code":"timeout"}}"#),
            Checked::Failed(5, e) if e.contains("timeout")
        ));
        assert!(matches!(
            check_reply(br#"{"u":6,"error":null}"#),
            Checked::Failed(6, _)
        ));
        assert!(matches!(
            check_reply(br#"{"u":"x","r":{}}"#),
            Checked::Malformed(_)
        ));
        assert!(matches!(check_reply(b"not json"), Checked::Malformed(_)));
    }

    #[test]
    fn each_id_is_matched_once() {
        let pending = Pending::default();
        let now = Instant::now();
        pending.sent(1, now);
        pending.sent(2, now);
        assert_eq!(pending.complete(1), Some(now));
        assert_eq!(
            pending.complete(1),
            None,
            "a second reply to 1 matches nothing"
        );
        assert_eq!(pending.complete(9), None);
        assert_eq!(pending.expire(now + Duration::from_millis(1)), 1);
        assert!(pending.is_empty());
    }

    #[test]
    fn tables_and_percentiles() {
        let mut report = Report::new(Duration::from_secs(2));
        for us in 1..=1000 {
            report.latency.saturating_record(us);
        }
        report.ok = 1000;
        report.errors = 2;
        assert_eq!(report.throughput(), 500.0);
        assert_eq!(report.quantile_us(0.5), 500);
        assert_eq!(report.quantile_us(0.99), 990);
        assert_eq!(
            report.cells(),
            [
                "500 req/s",
                "500 us",
                "900 us",
                "990 us",
                "999 us",
                "1000 us",
                "1,000",
                "2",
                "0"
            ]
        );
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(12), "12");
        assert_eq!(micros(12_345), "12.3 ms");
        let table = format_table(
            &["what", "n"],
            &[
                vec!["a".into(), "1".into()],
                vec!["bbb".into(), "1,000".into()],
            ],
            &[],
        );
        assert_eq!(table, "what      n\na         1\nbbb   1,000\n");

        let row = Row::new("x", 80.0, Unit::ReqPerSec, Target::RatioAtLeast(0.7))
            .against("baseline", 100.0);
        assert_eq!(row.met(), Some(true));
        assert_eq!(
            row.cells()[2..6],
            ["100 req/s (baseline)", "0.80x", ">= 0.7x", "met"]
        );
        let row = Row::new("y", 120.0, Unit::Millis, Target::Below(100.0));
        assert_eq!(row.met(), Some(false));
        assert_eq!(row.cells()[5], "NOT MET");
    }

    fn tiny(connections: usize, inflight: usize) -> Shape {
        Shape {
            connections,
            inflight,
            duration: Duration::from_millis(200),
            warmup: Duration::ZERO,
            timeout: Duration::from_secs(10),
        }
    }

    fn assert_clean(report: &Report) {
        assert!(report.ok > 0, "{report:?}");
        assert_eq!(report.errors, 0, "{:?}", report.first_error);
        assert_eq!(report.timeouts, 0);
        assert_eq!(report.unmatched, 0);
        // Every request sent was answered exactly once.
        assert_eq!(report.sent, report.ok_total);
        assert!(report.ok <= report.ok_total);
        assert_eq!(report.latency.len(), report.ok);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn load_generator_drives_a_node_and_the_baseline() {
        let node = Node::builder().start().await.expect("node");
        let url = node.url().expect("listens");
        let report = run_load(&url, &Template::echo(), tiny(2, 2), None)
            .await
            .expect("load");
        assert_clean(&report);

        let chain = Template::commands(example_five());
        let report = run_load(&url, &chain, tiny(1, 1), None)
            .await
            .expect("load");
        assert_clean(&report);

        let unknown = Template::commands(json!([{"name": "a", "fun": "no.such.fun"}]));
        let report = run_load(&url, &unknown, tiny(1, 2), None)
            .await
            .expect("load");
        assert_eq!(report.ok, 0);
        assert!(report.errors > 0);
        assert_eq!(report.errors, report.sent);
        assert!(
            report
                .first_error
                .as_deref()
                .is_some_and(|e| e.contains("unknown_function"))
        );
        node.shutdown().await;

        let baseline = Baseline::start().await.expect("baseline");
        let report = run_load(&baseline.url(), &Template::echo(), tiny(2, 2), None)
            .await
            .expect("load");
        assert_clean(&report);
        let times = sequential(&baseline.url(), &Template::echo(), 3)
            .await
            .expect("sequential");
        assert_eq!(times.len(), 3);
        baseline.stop();
    }
}
