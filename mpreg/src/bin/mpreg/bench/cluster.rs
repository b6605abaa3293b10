//! `mpreg bench cluster --nodes N --processes P`: a cluster of N nodes on
//! loopback, spread over P worker processes, measured against the scale
//! targets: convergence after the last start, memory per node, idle CPU,
//! and how long a killed node stays in the views.
//!
//! The parent spawns the workers (this executable, `bench cluster-worker`,
//! hidden) and talks to them in JSON lines (`wire.rs`): orders on their
//! stdin, notes on their stdout, each timestamped by the parent on
//! receipt. Worker 0 starts node `n0` (the seed) first and says its URL;
//! then the other workers start, and every node `n{i}` (dataset `d{i}`,
//! default timings) joins through the seed. Each worker starts its nodes
//! one after another and polls their views (`worker.rs`).
//!
//! The run, each wait bounded:
//!
//! 1. start: until every worker has started its nodes (`--timeout`);
//! 2. convergence: until every node sees all N nodes and all N datasets,
//!    at most `--timeout` after the last worker started (on timeout, the
//!    partial figures: how many nodes converged, the fewest and most
//!    nodes and datasets a view held);
//! 3. routing (converged only): from 5 nodes spread over the workers,
//!    `echo` and `mpreg.whoami` on the dataset of a random node of another
//!    worker (links open on demand), each checked to run there;
//! 4. resources: each worker's VmRSS against its VmRSS before any node,
//!    threads, descriptors and sockets by kind (`procfs.rs`);
//! 5. idle (converged only): user + system CPU of every worker over
//!    `--idle-secs`, then the resources again (settled: tokio keeps idle
//!    blocking threads for 10 s);
//! 6. failure (converged only): a node other than the seed, the last one,
//!    is killed as by a crash; from the kill order until no view of any
//!    node lists it (at most `--timeout`).
//!
//! Then the workers are told to quit and, if still there after 5 s,
//! killed (as they are when the parent fails). The command fails (after
//! printing what it measured) when the cluster does not converge, a
//! routing check fails, or the killed node is not gone in time; targets
//! not met are only reported.

use std::collections::BTreeMap;
use std::sync::PoisonError;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use super::*;

mod fleet;
mod procfs;
mod wire;
mod worker;

pub(crate) use worker::{WorkerOptions, cluster_worker};

use self::fleet::Fleet;
use self::wire::{Check, Note, Order, Polling, Progress, Resources, Routed};

/// How many nodes the routing check sends through.
const ROUTE_SAMPLES: usize = 5;
/// How long the routing checks may take together.
const ROUTE_WAIT: Duration = Duration::from_secs(30);
/// How long the workers may take to measure themselves.
const MEASURE_WAIT: Duration = Duration::from_secs(30);
/// How long the workers may take to answer a `Stop`.
const STOP_WAIT: Duration = Duration::from_secs(15);
/// How long killing a node may take.
const KILL_WAIT: Duration = Duration::from_secs(15);
/// How long the workers have to exit when told to quit.
const QUIT_WAIT: Duration = Duration::from_secs(5);
/// A worker's lifetime beyond the run's own bounds.
const LIFETIME_SLACK: Duration = Duration::from_secs(300);
/// Memory per node the issue allows at 1,000 nodes, MiB.
const MEMORY_TARGET_MIB: f64 = 2.0;
/// Idle CPU the issue allows for a 1,000-node cluster, cores.
const IDLE_TARGET_CORES: f64 = 0.5;

/// Options of `mpreg bench cluster`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClusterOptions {
    /// Nodes in the cluster.
    pub(crate) nodes: usize,
    /// Worker processes they are spread over.
    pub(crate) processes: usize,
    /// The bound of each long wait (start, convergence, failure).
    pub(crate) timeout: Duration,
    /// The idle window.
    pub(crate) idle: Duration,
    /// One JSON object instead of tables.
    pub(crate) json: bool,
}

/// The name of node `i`.
pub(crate) fn node_name(i: usize) -> String {
    format!("n{i}")
}

/// `nodes` split over `processes` as evenly as possible:
/// `(first, count)` per process, the larger shares first.
fn split(nodes: usize, processes: usize) -> Vec<(usize, usize)> {
    let processes = processes.max(1);
    let (each, extra) = (nodes / processes, nodes % processes);
    let mut first = 0;
    (0..processes)
        .map(|p| {
            let count = each + usize::from(p < extra);
            let share = (first, count);
            first += count;
            share
        })
        .collect()
}

/// The convergence target of the issue for `nodes` nodes, seconds: 3 s up
/// to 256 nodes, 10 s up to 1,000, none beyond.
fn converge_target(nodes: usize) -> Option<f64> {
    match nodes {
        0..=256 => Some(3.0),
        257..=1000 => Some(10.0),
        _ => None,
    }
}

/// A small, fast generator (SplitMix64) for picking routing targets; no
/// need for a good one.
#[derive(Debug)]
struct SplitMix(u64);

impl SplitMix {
    /// Seeded from the clock and the process id.
    fn from_clock() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self(nanos ^ (u64::from(std::process::id()) << 32))
    }

    /// A number below `n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z % n.max(1) as u64) as usize
    }
}

/// The routing checks: from `samples` nodes spread evenly over the
/// cluster, each to a random node of another worker (any other node when
/// there is one worker). Each with the index of the worker that sends it.
fn pick_checks(
    shares: &[(usize, usize)],
    samples: usize,
    rng: &mut SplitMix,
) -> Vec<(usize, Check)> {
    let nodes: usize = shares.iter().map(|s| s.1).sum();
    let owner = |i: usize| {
        shares
            .iter()
            .position(|&(f, c)| i >= f && i < f + c)
            .unwrap_or(0)
    };
    let samples = samples.min(nodes);
    (0..samples)
        .map(|s| {
            let from = s * nodes / samples;
            let w = owner(from);
            // Skip the nodes of `from`'s worker, or `from` alone.
            let (skip_first, skip) = if shares.len() > 1 {
                shares[w]
            } else {
                (from, 1)
            };
            let r = rng.below(nodes.saturating_sub(skip).max(1));
            let to = if r < skip_first { r } else { r + skip };
            (w, Check { from, to })
        })
        .collect()
}

/// A warning when a worker may need more open files than the soft limit:
/// each node holds 2 sockets plus one per link, and today's core links
/// every pair of members.
fn fd_warning(shares: &[(usize, usize)], nodes: usize) -> Option<String> {
    let limit = open_files_limit()?;
    let most = shares.iter().map(|s| s.1).max().unwrap_or(0) as u64;
    let need = most * (2 + nodes.saturating_sub(1) as u64) + 64;
    (need > limit).then(|| {
        format!(
            "a worker with {most} nodes may need up to {need} open files (2 sockets per node plus one per link, and every pair of nodes may link), above the soft limit of {limit} (ulimit -n): use more --processes or raise the limit"
        )
    })
}

/// The phases, for the progress line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the seed's URL.
    Seed,
    /// Waiting for every worker to start its nodes.
    Start,
    /// Waiting for every node to see every node.
    Converge,
    /// Waiting for the routing checks.
    Route,
    /// Waiting for the workers' measurements.
    Measure,
    /// Waiting for the killed node to be killed.
    Kill,
    /// Waiting for the killed node to leave every view.
    Gone,
}

/// What the parent knows of one worker.
#[derive(Debug, Default)]
struct Record {
    /// Its first node.
    first: usize,
    /// Its number of nodes.
    count: usize,
    /// Its process id (0 until spawned).
    pid: u32,
    /// VmRSS before its first node, KiB.
    baseline_kib: Option<u64>,
    /// When it said it was starting its first node.
    starting_at: Option<Instant>,
    /// When it said all its nodes were up.
    started_at: Option<Instant>,
    /// Its own measure of starting them, ms.
    start_ms: Option<f64>,
    /// When it said all its nodes converged.
    converged_at: Option<Instant>,
    /// What polling cost it until convergence.
    polls: Polling,
    /// Its last convergence progress, and when it came.
    progress: Option<(Instant, Progress)>,
    /// Its resources after the routing check (or the timeout).
    resources: Option<Resources>,
    /// Its resources again after the idle window.
    resources_idle: Option<Resources>,
    /// Its routing checks' outcomes.
    routed: Option<Vec<Routed>>,
    /// CPU ticks it used from its start to the end of convergence.
    busy_ticks: Option<u64>,
    /// CPU ticks it used during the idle window.
    idle_ticks: Option<u64>,
    /// When it said the killed node was dead (its owner only).
    killed_at: Option<Instant>,
    /// Its last count of nodes still listing the killed node, and when.
    listing: Option<(Instant, usize)>,
    /// When none of its nodes listed the killed node any more.
    gone_at: Option<Instant>,
    /// What watching the killed node cost it.
    gone_polls: Polling,
}

/// Everything the parent learned in one run.
#[derive(Debug)]
struct Run {
    /// Nodes in the cluster.
    nodes: usize,
    /// One per worker.
    records: Vec<Record>,
    /// The seed's URL.
    seed: Option<String>,
    /// When the first worker was spawned.
    spawned: Instant,
    /// Resources now go to `Record::resources_idle`.
    after_idle: bool,
}

impl Run {
    /// Records a worker's note.
    fn absorb(&mut self, worker: usize, at: Instant, note: Note) {
        let Some(r) = self.records.get_mut(worker) else {
            return;
        };
        match note {
            Note::Starting { baseline_kib } => {
                r.baseline_kib = Some(baseline_kib);
                r.starting_at = Some(at);
            }
            Note::Seed { url } => self.seed = Some(url),
            Note::Started { start_ms, .. } => {
                r.started_at = Some(at);
                r.start_ms = Some(start_ms);
            }
            Note::Progress(p) => {
                r.polls = p.polling;
                r.progress = Some((at, p));
            }
            Note::Converged(polling) => {
                r.converged_at = Some(at);
                r.polls = polling;
            }
            Note::Resources(resources) if self.after_idle => r.resources_idle = Some(resources),
            Note::Resources(resources) => r.resources = Some(resources),
            Note::Routed { results } => r.routed = Some(results),
            Note::Killed { .. } => r.killed_at = Some(at),
            Note::Listing {
                still_listing,
                polling,
                ..
            } => {
                r.listing = Some((at, still_listing));
                r.gone_polls = polling;
            }
            Note::Gone { polling, .. } => {
                r.gone_at = Some(at);
                r.gone_polls = polling;
                r.listing = Some((at, 0));
            }
            // `Fleet::next` turns errors into errors.
            Note::Error { .. } => {}
        }
    }

    /// Convergence over all workers, from their last progress (a worker
    /// not heard from counts as having seen nothing).
    fn partial(&self) -> Progress {
        let mut all = Progress {
            seen_nodes_min: usize::MAX,
            seen_datasets_min: usize::MAX,
            ..Progress::default()
        };
        for r in &self.records {
            let p = r.progress.map(|(_, p)| p).unwrap_or(Progress {
                nodes: r.count,
                ..Progress::default()
            });
            all.nodes += r.count;
            all.converged += p.converged;
            all.seen_nodes_min = all.seen_nodes_min.min(p.seen_nodes_min);
            all.seen_nodes_max = all.seen_nodes_max.max(p.seen_nodes_max);
            all.seen_datasets_min = all.seen_datasets_min.min(p.seen_datasets_min);
            all.seen_datasets_max = all.seen_datasets_max.max(p.seen_datasets_max);
            all.polling.polls += r.polls.polls;
            all.polling.views += r.polls.views;
            all.polling.view_ms += r.polls.view_ms;
            all.polling.max_gap_ms = all.polling.max_gap_ms.max(r.polls.max_gap_ms);
        }
        if all.seen_nodes_min == usize::MAX {
            all.seen_nodes_min = 0;
            all.seen_datasets_min = 0;
        }
        all
    }

    /// Nodes of the workers that said their nodes are up.
    fn nodes_started(&self) -> usize {
        self.records
            .iter()
            .filter(|r| r.started_at.is_some())
            .map(|r| r.count)
            .sum()
    }

    /// How many nodes still list the killed node (as last reported; a
    /// worker not heard from counts all its nodes).
    fn still_listing(&self) -> usize {
        self.records
            .iter()
            .map(|r| r.listing.map_or(r.count, |(_, n)| n))
            .sum()
    }

    /// The progress line for `phase`.
    fn status(&self, phase: Phase) -> String {
        let t = self.spawned.elapsed().as_secs_f64();
        match phase {
            Phase::Seed => format!("{t:.1} s: starting the seed node..."),
            Phase::Start => format!(
                "{t:.1} s: starting: {} of {} nodes up...",
                self.nodes_started(),
                self.nodes
            ),
            Phase::Converge => {
                let p = self.partial();
                format!(
                    "{t:.1} s: converging: {} of {} nodes see all; views hold {}..{} nodes, {}..{} datasets",
                    p.converged,
                    self.nodes,
                    p.seen_nodes_min,
                    p.seen_nodes_max,
                    p.seen_datasets_min,
                    p.seen_datasets_max
                )
            }
            Phase::Route => format!("{t:.1} s: routing checks..."),
            Phase::Measure => format!("{t:.1} s: measuring the workers..."),
            Phase::Kill => format!("{t:.1} s: killing a node..."),
            Phase::Gone => format!(
                "{t:.1} s: {} nodes still list the killed node...",
                self.still_listing()
            ),
        }
    }
}

/// Waits until every worker is `done`, or `deadline`. Past it, orders every
/// worker to stop watching (a fresh look from each, and no more polling)
/// and waits at most [`STOP_WAIT`] for those not done to answer (`answered`
/// with the time of the order). Returns whether all were done, and how many
/// did not answer.
async fn watch(
    fleet: &mut Fleet,
    run: &mut Run,
    deadline: Instant,
    phase: Phase,
    show: bool,
    done: impl Fn(&Record) -> bool,
    answered: impl Fn(&Record, Instant) -> bool,
) -> BenchResult<(bool, usize)> {
    if wait_until(fleet, run, deadline, phase, show, |r| {
        r.records.iter().all(&done)
    })
    .await?
    {
        return Ok((true, 0));
    }
    let stop = Instant::now();
    fleet.send_all(&Order::Stop)?;
    let settled = |w: &Record| done(w) || answered(w, stop);
    wait_until(fleet, run, stop + STOP_WAIT, phase, show, |r| {
        r.records.iter().all(settled)
    })
    .await?;
    Ok((false, run.records.iter().filter(|w| !settled(w)).count()))
}

/// Absorbs notes until `done` holds (true) or `deadline` passes (false),
/// showing the progress line of `phase` when `show`.
async fn wait_until(
    fleet: &mut Fleet,
    run: &mut Run,
    deadline: Instant,
    phase: Phase,
    show: bool,
    done: impl Fn(&Run) -> bool,
) -> BenchResult<bool> {
    let mut shown = String::new();
    // Bounded: `next` returns `None` past the deadline.
    while !done(run) {
        let status = run.status(phase);
        if show && status != shown {
            eprint!("\r{:100}\r{status}", "");
            shown = status;
        }
        match fleet.next(deadline).await? {
            Some((worker, at, note)) => run.absorb(worker, at, note),
            None => return Ok(false),
        }
    }
    Ok(true)
}

/// Seconds, for people.
fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// `mpreg bench cluster`.
pub(crate) async fn cluster(o: ClusterOptions) -> BenchResult<()> {
    let show = !o.json || std::io::IsTerminal::is_terminal(&std::io::stderr());
    let result = run_cluster(o, show).await;
    // The progress line, when an error left it there.
    if show {
        eprint!("\r{:100}\r", "");
    }
    result
}

/// Runs and reports; `show`: the progress line on stderr.
async fn run_cluster(o: ClusterOptions, show: bool) -> BenchResult<()> {
    if o.nodes < 2 {
        return Err("--nodes must be at least 2 (one is killed, and it is not the seed)".into());
    }
    if o.processes == 0 || o.processes > o.nodes {
        return Err("--processes must be between 1 and --nodes".into());
    }
    if o.timeout.is_zero() {
        return Err("--timeout must be more than 0".into());
    }
    let shares = split(o.nodes, o.processes);
    let defaults = mpreg::Config::default();
    // The killed node leaves a cluster of all the others.
    let detection = defaults.failure_detection_time(o.nodes.saturating_sub(1));
    let mut notes = Vec::new();
    if let Some(warning) = fd_warning(&shares, o.nodes) {
        eprintln!("warning: {warning}");
        notes.push(warning);
    }
    let lifetime = o.timeout * 3 + o.idle + ROUTE_WAIT + MEASURE_WAIT + LIFETIME_SLACK;
    let mut fleet = Fleet::new(o.nodes, o.processes, lifetime)?;
    let spawned = Instant::now();
    let mut run = Run {
        nodes: o.nodes,
        records: shares
            .iter()
            .map(|&(first, count)| Record {
                first,
                count,
                ..Record::default()
            })
            .collect(),
        seed: None,
        spawned,
        after_idle: false,
    };

    // 1. Start: the seed's worker, then the others.
    fleet.spawn(shares[0].0, shares[0].1, None)?;
    let start_deadline = spawned + o.timeout;
    if !wait_until(
        &mut fleet,
        &mut run,
        start_deadline,
        Phase::Seed,
        show,
        |r| r.seed.is_some(),
    )
    .await?
    {
        return Err(format!(
            "worker 0 did not start the seed node within {}",
            secs(o.timeout)
        )
        .into());
    }
    let seed = run.seed.clone().unwrap_or_default();
    for &(first, count) in &shares[1..] {
        fleet.spawn(first, count, Some(&seed))?;
    }
    for (record, worker) in run.records.iter_mut().zip(&fleet.workers) {
        record.pid = worker.pid;
    }
    if !wait_until(
        &mut fleet,
        &mut run,
        start_deadline,
        Phase::Start,
        show,
        |r| r.records.iter().all(|w| w.started_at.is_some()),
    )
    .await?
    {
        let late: Vec<String> = (0..run.records.len())
            .filter(|&i| run.records[i].started_at.is_none())
            .map(|i| format!("worker {i} ({})", fleet.workers[i].nodes_text()))
            .collect();
        return Err(format!(
            "{} of {} nodes were up after {}; not started: {}",
            run.nodes_started(),
            o.nodes,
            secs(o.timeout),
            late.join(", ")
        )
        .into());
    }
    let first_start = run.records[0].starting_at.unwrap_or(spawned);
    let last_started = run
        .records
        .iter()
        .filter_map(|r| r.started_at)
        .max()
        .unwrap_or(spawned);

    // 2. Convergence.
    // Workers that converged watch nothing and say nothing more.
    let (converged, silent) = watch(
        &mut fleet,
        &mut run,
        last_started + o.timeout,
        Phase::Converge,
        show,
        |w| w.converged_at.is_some(),
        |w, stop| w.progress.is_some_and(|(at, _)| at >= stop),
    )
    .await?;
    if silent > 0 {
        notes.push(format!(
            "{silent} workers did not answer within {} of the timeout: their figures are from their last progress",
            secs(STOP_WAIT)
        ));
    }
    let converged_wall = spawned.elapsed();
    for r in &mut run.records {
        r.busy_ticks = procfs::cpu_ticks(r.pid).ok();
    }

    // 3. Routing, through links opened on demand.
    let mut checks = Vec::new();
    if converged {
        checks = pick_checks(&shares, ROUTE_SAMPLES, &mut SplitMix::from_clock());
        let mut by_worker: BTreeMap<usize, Vec<Check>> = BTreeMap::new();
        for &(w, check) in &checks {
            by_worker.entry(w).or_default().push(check);
        }
        for (&w, checks) in &by_worker {
            fleet.send(
                w,
                &Order::Route {
                    checks: checks.clone(),
                },
            )?;
        }
        wait_until(
            &mut fleet,
            &mut run,
            Instant::now() + ROUTE_WAIT,
            Phase::Route,
            show,
            |r| by_worker.keys().all(|&w| r.records[w].routed.is_some()),
        )
        .await?;
    }

    // 4. Resources.
    fleet.send_all(&Order::Measure)?;
    wait_until(
        &mut fleet,
        &mut run,
        Instant::now() + MEASURE_WAIT,
        Phase::Measure,
        show,
        |r| r.records.iter().all(|w| w.resources.is_some()),
    )
    .await?;

    // 5. Idle.
    let ticks_per_sec = procfs::clock_ticks_per_sec();
    let mut idle_measured = false;
    if converged && !o.idle.is_zero() {
        if show {
            eprint!(
                "\r{:100}\r{:.1} s: idle for {}...",
                "",
                spawned.elapsed().as_secs_f64(),
                secs(o.idle)
            );
        }
        let before: Vec<Option<u64>> = run
            .records
            .iter()
            .map(|r| procfs::cpu_ticks(r.pid).ok())
            .collect();
        tokio::time::sleep(o.idle).await;
        for (r, before) in run.records.iter_mut().zip(before) {
            let after = procfs::cpu_ticks(r.pid).ok();
            r.idle_ticks = before.zip(after).map(|(b, a)| a.saturating_sub(b));
        }
        idle_measured = true;
        // Settled: the blocking threads of the start are gone (tokio keeps
        // an idle one 10 s), the links of the routing check are open.
        run.after_idle = true;
        fleet.send_all(&Order::Measure)?;
        wait_until(
            &mut fleet,
            &mut run,
            Instant::now() + MEASURE_WAIT,
            Phase::Measure,
            show,
            |r| r.records.iter().all(|w| w.resources_idle.is_some()),
        )
        .await?;
    }

    // 6. Failure: the last node (never the seed) dies as by a crash.
    let victim = o.nodes - 1;
    let owner = shares.len() - 1;
    let mut kill_sent = None;
    let mut gone = false;
    if converged {
        fleet.send_all(&Order::WatchGone {
            node: node_name(victim),
        })?;
        let sent = Instant::now();
        kill_sent = Some(sent);
        fleet.send(
            owner,
            &Order::Kill {
                node: node_name(victim),
            },
        )?;
        let killed = wait_until(
            &mut fleet,
            &mut run,
            sent + KILL_WAIT,
            Phase::Kill,
            show,
            |r| r.records[owner].killed_at.is_some(),
        )
        .await?;
        if !killed {
            notes.push(format!(
                "{} was not killed within {}",
                node_name(victim),
                secs(KILL_WAIT)
            ));
        }
        let silent;
        (gone, silent) = watch(
            &mut fleet,
            &mut run,
            sent + o.timeout,
            Phase::Gone,
            show,
            |w| w.gone_at.is_some(),
            |w, stop| w.listing.is_some_and(|(at, _)| at >= stop),
        )
        .await?;
        if silent > 0 {
            notes.push(format!(
                "{silent} workers did not answer within {} of the timeout: their counts of nodes listing {} are from their last report",
                secs(STOP_WAIT),
                node_name(victim)
            ));
        }
    }
    if show {
        eprint!("\r{:100}\r", "");
    }
    fleet.quit(QUIT_WAIT).await;

    // The figures.
    let started_span = last_started.saturating_duration_since(first_start);
    let last_converged = run.records.iter().filter_map(|r| r.converged_at).max();
    let after_last = last_converged.map(|c| c.saturating_duration_since(last_started));
    let after_first = last_converged.map(|c| c.saturating_duration_since(first_start));
    let routed: Vec<&Routed> = run
        .records
        .iter()
        .filter_map(|r| r.routed.as_ref())
        .flatten()
        .collect();
    let routed_ok = routed.iter().filter(|r| r.ok).count();
    let measured: Vec<&Resources> = run
        .records
        .iter()
        .filter_map(|r| r.resources.as_ref())
        .collect();
    let rss_kib: u64 = measured.iter().map(|r| r.rss_kib).sum();
    let baseline_kib: u64 = measured.iter().map(|r| r.baseline_kib).sum();
    let measured_nodes: usize = measured.iter().map(|r| r.nodes).sum();
    let per_node_mib = (measured_nodes > 0)
        .then(|| rss_kib.saturating_sub(baseline_kib) as f64 / 1024.0 / measured_nodes as f64);
    let sum = |f: fn(&Resources) -> usize| measured.iter().map(|r| f(r)).sum::<usize>();
    let idle_cores = idle_measured.then(|| {
        let ticks: u64 = run.records.iter().filter_map(|r| r.idle_ticks).sum();
        ticks as f64 / ticks_per_sec as f64 / o.idle.as_secs_f64()
    });
    let busy_core_secs =
        run.records.iter().filter_map(|r| r.busy_ticks).sum::<u64>() as f64 / ticks_per_sec as f64;
    let gone_after = kill_sent.and_then(|sent| {
        gone.then(|| {
            run.records
                .iter()
                .filter_map(|r| r.gone_at)
                .max()
                .map(|g| g.saturating_duration_since(sent))
        })
        .flatten()
    });
    let partial = run.partial();

    // Rows: what, measured, target, verdict (None: no target).
    let verdict = |met: Option<bool>| match met {
        Some(true) => "met",
        Some(false) => "NOT MET",
        None => "-",
    };
    let target_s = converge_target(o.nodes);
    let converge_text = match after_last {
        Some(d) => secs(d),
        None => format!(
            "NOT CONVERGED in {} ({} of {} nodes)",
            secs(o.timeout),
            partial.converged,
            o.nodes
        ),
    };
    let rows: Vec<(String, String, String, Option<bool>)> = vec![
        (
            "all nodes started, from the first start".into(),
            secs(started_span),
            "-".into(),
            None,
        ),
        (
            "converged, from the last node started".into(),
            converge_text,
            target_s.map_or("-".into(), |t| format!("<= {t} s")),
            target_s.map(|t| after_last.is_some_and(|d| d.as_secs_f64() <= t)),
        ),
        (
            "converged, from the first node started".into(),
            after_first.map_or("-".into(), secs),
            "-".into(),
            None,
        ),
        (
            format!(
                "routing: echo + whoami on d{{j}} via {} nodes",
                ROUTE_SAMPLES.min(o.nodes)
            ),
            if converged {
                format!("{routed_ok} of {} ok", checks.len())
            } else {
                "skipped".into()
            },
            "all".into(),
            converged.then_some(routed_ok == checks.len() && routed.len() == checks.len()),
        ),
        (
            "memory per node: (RSS - baseline) / nodes".into(),
            per_node_mib.map_or("-".into(), |m| format!("{m:.2} MiB")),
            format!("<= {MEMORY_TARGET_MIB} MiB"),
            per_node_mib.map(|m| m <= MEMORY_TARGET_MIB),
        ),
        (
            format!("idle CPU of all workers over {}", secs(o.idle)),
            idle_cores.map_or_else(|| "skipped".into(), |c| format!("{c:.3} cores")),
            format!("<= {IDLE_TARGET_CORES} core"),
            idle_cores.map(|c| c <= IDLE_TARGET_CORES),
        ),
        (
            format!("killed {} gone from every view", node_name(victim)),
            match (kill_sent, gone_after) {
                (None, _) => "skipped".into(),
                (Some(_), Some(d)) => secs(d),
                (Some(_), None) => format!(
                    "NOT GONE in {}: {} nodes list it",
                    secs(o.timeout),
                    run.still_listing()
                ),
            },
            format!("<= {}", secs(detection)),
            kill_sent.map(|_| gone_after.is_some_and(|d| d <= detection)),
        ),
    ];

    if !converged {
        notes.push(format!(
            "not converged within {} of the last start: {} of {} nodes saw every node and dataset; a view held {}..{} nodes and {}..{} datasets",
            secs(o.timeout),
            partial.converged,
            o.nodes,
            partial.seen_nodes_min,
            partial.seen_nodes_max,
            partial.seen_datasets_min,
            partial.seen_datasets_max
        ));
    }
    for r in routed.iter().filter(|r| !r.ok) {
        notes.push(format!(
            "routing {} -> d{} failed after {:.1} ms: {}",
            node_name(r.check.from),
            r.check.to,
            r.ms,
            r.error.as_deref().unwrap_or("?")
        ));
    }
    if converged && routed.len() < checks.len() {
        notes.push(format!(
            "{} of {} routing checks got no answer within {}",
            checks.len() - routed.len(),
            checks.len(),
            secs(ROUTE_WAIT)
        ));
    }
    if measured.len() < run.records.len() {
        notes.push(format!(
            "{} of {} workers did not report their resources",
            run.records.len() - measured.len(),
            run.records.len()
        ));
    }
    let settled: Vec<&Resources> = run
        .records
        .iter()
        .filter_map(|r| r.resources_idle.as_ref())
        .collect();
    if !settled.is_empty() {
        let nodes: usize = settled.iter().map(|r| r.nodes).sum();
        let rss: u64 = settled.iter().map(|r| r.rss_kib).sum();
        let base: u64 = settled.iter().map(|r| r.baseline_kib).sum();
        notes.push(format!(
            "after the idle window: RSS {:.1} MiB in all ({:.2} MiB per node beyond the baseline), {} threads, {} TCP connections established",
            rss as f64 / 1024.0,
            rss.saturating_sub(base) as f64 / 1024.0 / nodes.max(1) as f64,
            settled.iter().map(|r| r.threads).sum::<u64>(),
            settled.iter().map(|r| r.tcp_established).sum::<usize>()
        ));
    }
    let total = |f: fn(&Record) -> f64| run.records.iter().map(f).sum::<f64>();
    let longest = |f: fn(&Record) -> f64| run.records.iter().map(f).fold(0.0, f64::max);
    notes.push(format!(
        "CPU of the workers from spawn to {}: {busy_core_secs:.1} core-seconds over {} ({:.2} cores on average), of which the bench's own polling: {:.0} views of the cluster in {:.2} s ({:.0} passes, at most {:.0} ms apart)",
        if converged { "convergence" } else { "the timeout" },
        secs(converged_wall),
        busy_core_secs / converged_wall.as_secs_f64().max(1e-9),
        total(|r| r.polls.views as f64),
        total(|r| r.polls.view_ms) / 1e3,
        total(|r| r.polls.polls as f64),
        longest(|r| r.polls.max_gap_ms)
    ));
    if kill_sent.is_some() {
        notes.push(format!(
            "watching {}: {:.0} views in {:.0} ms ({:.0} passes, at most {:.0} ms apart)",
            node_name(victim),
            total(|r| r.gone_polls.views as f64),
            total(|r| r.gone_polls.view_ms),
            total(|r| r.gone_polls.polls as f64),
            longest(|r| r.gone_polls.max_gap_ms)
        ));
    }
    // What the workers logged (the nodes' warnings): in all, and the last
    // line of the worker that logged most.
    let logged: Vec<(u64, Option<String>)> = fleet
        .workers
        .iter()
        .map(|w| {
            let tail = w.tail.lock().unwrap_or_else(PoisonError::into_inner);
            (tail.count, tail.last.back().cloned())
        })
        .collect();
    let most = (0..logged.len()).max_by_key(|&i| logged[i].0);
    if let Some(i) = most.filter(|&i| logged[i].0 > 0) {
        notes.push(format!(
            "the workers wrote {} lines on stderr (worker {i}: {}); its last: {}",
            thousands(logged.iter().map(|l| l.0).sum()),
            thousands(logged[i].0),
            logged[i].1.as_deref().unwrap_or_default()
        ));
    }
    let mut states: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &measured {
        for (state, n) in &r.tcp_other_states {
            *states.entry(state).or_default() += n;
        }
    }
    if !states.is_empty() {
        let states: Vec<String> = states.iter().map(|(s, n)| format!("{s} {n}")).collect();
        notes.push(format!(
            "TCP sockets in other states: {}",
            states.join(", ")
        ));
    }
    for line in &fleet.unreadable {
        notes.push(format!("unreadable line from {line}"));
    }
    let ok = converged
        && routed_ok == checks.len()
        && routed.len() == checks.len()
        && gone_after.is_some();

    if o.json {
        let worker_json = |(i, r): (usize, &Record)| {
            let rel = |at: Option<Instant>| {
                at.map(|a| round3(a.saturating_duration_since(first_start).as_secs_f64()))
            };
            json!({
                "worker": i,
                "pid": r.pid,
                "first": r.first,
                "nodes": r.count,
                "start_ms": r.start_ms.map(round3),
                "started_s": rel(r.started_at),
                "converged_s": rel(r.converged_at),
                "polling": r.polls,
                "gone_polling": r.gone_polls,
                "progress": r.progress.map(|(_, p)| p),
                "resources": r.resources,
                "resources_after_idle": r.resources_idle,
                "stderr_lines": logged.get(i).map(|l| l.0),
                "stderr_last": logged.get(i).and_then(|l| l.1.as_deref()),
                "baseline_kib": r.baseline_kib,
                "idle_ticks": r.idle_ticks,
                "busy_ticks": r.busy_ticks,
                "gone_s": r.gone_at.zip(kill_sent).map(|(g, k)| round3(g.saturating_duration_since(k).as_secs_f64())),
            })
        };
        let out = json!({
            "nodes": o.nodes,
            "processes": o.processes,
            "timeout_s": o.timeout.as_secs_f64(),
            "idle_s": o.idle.as_secs_f64(),
            "probe_interval_ms": defaults.probe_interval_ms,
            "suspect_timeout_ms": defaults.suspect_timeout_ms,
            "converged": converged,
            "started_s": round3(started_span.as_secs_f64()),
            "converge_s": after_last.map(|d| round3(d.as_secs_f64())),
            "converge_from_first_s": after_first.map(|d| round3(d.as_secs_f64())),
            "converge_target_s": target_s,
            "partial": partial,
            "routing": {
                "checks": checks.len(),
                "ok": routed_ok,
                "results": routed,
            },
            "resources": {
                "rss_mib": round3(rss_kib as f64 / 1024.0),
                "baseline_mib": round3(baseline_kib as f64 / 1024.0),
                "per_node_mib": per_node_mib.map(round3),
                "threads": measured.iter().map(|r| r.threads).sum::<u64>(),
                "fds": sum(|r| r.fds),
                "sockets": sum(|r| r.sockets),
                "tcp_established": sum(|r| r.tcp_established),
                "tcp_listen": sum(|r| r.tcp_listen),
                "tcp_other": sum(|r| r.tcp_other),
                "udp": sum(|r| r.udp),
                "other_sockets": sum(|r| r.other_sockets),
            },
            "idle": {
                "cores": idle_cores.map(round3),
                "ticks_per_sec": ticks_per_sec,
            },
            "busy_core_s": round3(busy_core_secs),
            "failure": {
                "node": node_name(victim),
                "gone_s": gone_after.map(|d| round3(d.as_secs_f64())),
                "detection_s": detection.as_secs_f64(),
                "still_listing": kill_sent.map(|_| run.still_listing()),
            },
            "targets": rows.iter().map(|(what, measured, target, met)| json!({
                "what": what, "measured": measured, "target": target, "met": met,
            })).collect::<Vec<Value>>(),
            "workers": run.records.iter().enumerate().map(worker_json).collect::<Vec<Value>>(),
            "notes": notes,
            "ok": ok,
        });
        println!("{out}");
    } else {
        let counts: Vec<String> = shares.iter().map(|s| s.1.to_string()).collect();
        println!(
            "mpreg bench cluster: {} nodes in {} worker processes ({} nodes), default timings (probe {} ms, suspect {} ms), timeout {}",
            o.nodes,
            o.processes,
            counts.join(" + "),
            defaults.probe_interval_ms,
            defaults.suspect_timeout_ms,
            secs(o.timeout)
        );
        println!();
        let cells: Vec<Vec<String>> = rows
            .iter()
            .map(|(what, measured, target, met)| {
                vec![
                    what.clone(),
                    measured.clone(),
                    target.clone(),
                    verdict(*met).into(),
                ]
            })
            .collect();
        print!(
            "{}",
            format_table(
                &["what", "measured", "target", "verdict"],
                &cells,
                &[true, false, true, true]
            )
        );
        println!();
        println!("workers (times from the first node's start; resources after the routing check):");
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        let cells: Vec<Vec<String>> = run
            .records
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let rel = |at: Option<Instant>| {
                    opt(at.map(|a| secs(a.saturating_duration_since(first_start))))
                };
                let res = r.resources.as_ref();
                let per_node = res.filter(|x| x.nodes > 0).map(|x| {
                    format!(
                        "{:.2}",
                        x.rss_kib.saturating_sub(x.baseline_kib) as f64 / 1024.0 / x.nodes as f64
                    )
                });
                vec![
                    i.to_string(),
                    fleet
                        .workers
                        .get(i)
                        .map_or_else(String::new, |w| w.nodes_text()),
                    r.pid.to_string(),
                    rel(r.started_at),
                    rel(r.converged_at),
                    opt(res.map(|x| format!("{:.1}", x.rss_kib as f64 / 1024.0))),
                    opt(res.map(|x| format!("{:.1}", x.baseline_kib as f64 / 1024.0))),
                    opt(per_node),
                    opt(res.map(|x| x.threads.to_string())),
                    opt(res.map(|x| x.fds.to_string())),
                    opt(res.map(|x| x.tcp_established.to_string())),
                    opt(res.map(|x| x.tcp_listen.to_string())),
                    opt(res.map(|x| x.tcp_other.to_string())),
                    opt(res.map(|x| x.udp.to_string())),
                    opt(r.idle_ticks.map(|t| {
                        format!(
                            "{:.3}",
                            t as f64 / ticks_per_sec as f64 / o.idle.as_secs_f64()
                        )
                    })),
                    opt(r
                        .gone_at
                        .zip(kill_sent)
                        .map(|(g, k)| secs(g.saturating_duration_since(k)))),
                ]
            })
            .collect();
        print!(
            "{}",
            format_table(
                &[
                    "worker",
                    "nodes",
                    "pid",
                    "started",
                    "converged",
                    "RSS MiB",
                    "base MiB",
                    "MiB/node",
                    "threads",
                    "fds",
                    "tcp estab",
                    "tcp listen",
                    "tcp other",
                    "udp",
                    "idle cores",
                    "gone",
                ],
                &cells,
                &[true, true]
            )
        );
        if !notes.is_empty() {
            println!();
            println!("notes:");
            for note in &notes {
                println!("  {note}");
            }
        }
    }

    if !converged {
        return Err(format!(
            "the cluster did not converge within {} of the last start ({} of {} nodes)",
            secs(o.timeout),
            partial.converged,
            o.nodes
        )
        .into());
    }
    if !ok {
        return Err("a routing check failed or the killed node stayed in some view".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_are_split_evenly_and_checks_cross_workers() {
        assert_eq!(split(10, 3), [(0, 4), (4, 3), (7, 3)]);
        assert_eq!(split(64, 1), [(0, 64)]);
        assert_eq!(split(4, 4), [(0, 1), (1, 1), (2, 1), (3, 1)]);

        let mut rng = SplitMix(7);
        let shares = split(64, 2);
        for _ in 0..200 {
            for (w, c) in pick_checks(&shares, 5, &mut rng) {
                assert!(c.to < 64);
                let (first, count) = shares[w];
                assert!(c.from >= first && c.from < first + count);
                assert!(!(first..first + count).contains(&c.to), "{c:?}");
            }
        }
        let froms: Vec<usize> = pick_checks(&shares, 5, &mut rng)
            .iter()
            .map(|(_, c)| c.from)
            .collect();
        assert_eq!(froms, [0, 12, 25, 38, 51]);
        for _ in 0..200 {
            for (w, c) in pick_checks(&[(0, 3)], 5, &mut rng) {
                assert_eq!(w, 0);
                assert!(c.to < 3 && c.to != c.from, "{c:?}");
            }
        }

        assert_eq!(converge_target(64), Some(3.0));
        assert_eq!(converge_target(1000), Some(10.0));
        assert_eq!(converge_target(2000), None);
    }
}
