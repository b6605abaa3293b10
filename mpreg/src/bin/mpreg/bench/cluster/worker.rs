//! The worker process (`mpreg bench cluster-worker`, hidden): starts its
//! share of the nodes one after another, then follows the parent's orders
//! (one JSON line each on stdin) and reports on stdout, one JSON line per
//! note (see `wire.rs`).
//!
//! Nodes are polled only while something is watched (convergence, a killed
//! node leaving the views), never during the idle window. Looking at a
//! node means taking its `cluster_summary()` (nodes and datasets counted,
//! one pass over its routes), whose cost still grows with the cluster:
//! looking at every node every 100 ms could take more CPU than the
//! cluster itself. So a pass looks at the nodes not yet done,
//! those that saw least first, and stops at the first that is not done:
//! while the worker is not done, a pass costs one view, and the moment its
//! last node is done is still seen at the next pass. Passes come every
//! 100 ms, or less often when such one-view passes of all workers would
//! take more than a tenth of a core (from the mean cost of a view so far;
//! a pass that finds nodes done looks further, but only as many times as
//! there are nodes). When every node was seen done, all are looked at once
//! more (one could have lost a peer since). For the progress figures
//! (fewest and most nodes and datasets a view holds), a survey looks at
//! every node not yet done at most every 5 s, and within another tenth of
//! a core; a `Stop` order surveys at once. What polling cost (the time inside
//! `cluster_summary()`) and the longest time between two passes (what a
//! reported time may be late by) are reported with the outcome.

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead as _;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use mpreg::{Command, Node, NodeHandle, Request};
use tokio::sync::mpsc;

use super::procfs;
use super::wire::{Check, Note, Order, Polling, Progress, Routed, emit};
use super::{BenchResult, node_name};

/// The shortest time between two poll passes.
const POLL: Duration = Duration::from_millis(100);
/// How often progress is reported while watching.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// The first survey of every node, after the start.
const FIRST_SURVEY: Duration = Duration::from_secs(1);
/// The shortest time between two surveys.
const SURVEY_EVERY: Duration = Duration::from_secs(5);
/// The passes of all workers together, and their surveys, each take at
/// most one core divided by this.
const SHARE: u32 = 10;
/// The longest one node's `start()` may take.
const START_WAIT: Duration = Duration::from_secs(30);
/// The deadline of each routing request (the client side waits 5 s more).
const ROUTE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest `kill()` may take.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// Options of the hidden `mpreg bench cluster-worker`.
#[derive(Debug, Clone)]
pub(crate) struct WorkerOptions {
    /// Index of the worker's first node (node `n{first}` has dataset
    /// `d{first}`).
    pub(crate) first: usize,
    /// How many nodes it runs.
    pub(crate) count: usize,
    /// Nodes in the whole cluster.
    pub(crate) total: usize,
    /// Worker processes in the run (surveys share a CPU budget).
    pub(crate) workers: usize,
    /// The seed node's URL; none for worker 0, which starts the seed.
    pub(crate) seed: Option<String>,
    /// The worker exits by itself after this long, whatever happens.
    pub(crate) lifetime: Duration,
}

/// `mpreg bench cluster-worker`: a failure is reported to the parent as an
/// [`Note::Error`] line before it is returned (the process then exits
/// non-zero).
pub(crate) async fn cluster_worker(options: WorkerOptions) -> BenchResult<()> {
    let result = run(options).await;
    if let Err(e) = &result {
        // The parent may be gone too: nothing more to do then.
        let _ = emit(&Note::Error {
            message: e.to_string(),
        });
    }
    result
}

/// What the worker is watching.
#[derive(Debug)]
enum Watch {
    /// Nothing: no polling.
    Nothing,
    /// Until every node sees every node and dataset.
    Convergence(Converging),
    /// Until no node lists the killed node.
    Gone(Leaving),
}

/// Convergence as watched in one worker.
#[derive(Debug)]
struct Converging {
    /// Nodes (indices) not yet seen converged.
    pending: BTreeSet<usize>,
    /// What each node saw when last looked at: (nodes, datasets).
    seen: BTreeMap<usize, (usize, usize)>,
    /// When every pending node is next looked at.
    next_survey: Instant,
    /// When the last pass started (or the watch).
    last_pass: Instant,
    /// What polling cost so far.
    polling: Polling,
}

/// A killed node leaving the views, as watched in one worker.
#[derive(Debug)]
struct Leaving {
    /// The killed node's name.
    name: String,
    /// The nodes (indices) whose view listed it when last looked at.
    pending: BTreeSet<usize>,
    /// When the last pass started (or the watch).
    last_pass: Instant,
    /// What polling cost so far.
    polling: Polling,
}

/// The worker's nodes and what it watches.
#[derive(Debug)]
struct Worker {
    /// Nodes in the whole cluster.
    total: usize,
    /// Worker processes in the run.
    workers: usize,
    /// The live nodes, by index.
    nodes: BTreeMap<usize, NodeHandle>,
    /// VmRSS before the first node, KiB.
    baseline_kib: u64,
    /// What is polled.
    watch: Watch,
    /// When progress was last reported.
    reported: Instant,
}

/// Reads the parent's orders on a thread of its own (stdin is blocking)
/// until end of input; a line that is not an order becomes an error.
fn read_orders() -> BenchResult<mpsc::UnboundedReceiver<Result<Order, String>>> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("orders".into())
        .spawn(move || {
            // Bounded by the parent: ends at end of input (the parent quit
            // or died) or when the worker no longer listens.
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                let order = serde_json::from_str(&line)
                    .map_err(|e| format!("unreadable order {line:?}: {e}"));
                if tx.send(order).is_err() {
                    break;
                }
            }
        })?;
    Ok(rx)
}

/// Starts the nodes, then serves orders until `Quit`, end of input, or the
/// end of the worker's lifetime.
async fn run(options: WorkerOptions) -> BenchResult<()> {
    let end = tokio::time::Instant::now() + options.lifetime;
    let mut orders = read_orders()?;
    let baseline_kib = procfs::own_rss_kib()?;
    emit(&Note::Starting { baseline_kib })?;
    let started = Instant::now();
    let mut seed = options.seed.clone();
    let mut nodes = BTreeMap::new();
    for i in options.first..options.first + options.count {
        let mut builder = Node::builder()
            .name(node_name(i))
            .listen("127.0.0.1:0")
            .datasets([format!("d{i}")]);
        match (&seed, i) {
            (None, 0) => {}
            (None, _) => return Err("no --seed, and node 0 is not in this worker".into()),
            (Some(url), _) => builder = builder.peers([url.clone()]),
        }
        let node = match tokio::time::timeout(START_WAIT, builder.start()).await {
            Ok(Ok(node)) => node,
            Ok(Err(e)) => return Err(format!("{}: cannot start: {e}", node_name(i)).into()),
            Err(_) => {
                return Err(format!("{}: start() took over {START_WAIT:?}", node_name(i)).into());
            }
        };
        if seed.is_none() {
            let url = node.url().ok_or("the seed node does not listen")?;
            emit(&Note::Seed { url: url.clone() })?;
            seed = Some(url);
        }
        nodes.insert(i, node);
    }
    emit(&Note::Started {
        nodes: nodes.len(),
        start_ms: ms(started.elapsed()),
    })?;

    let mut worker = Worker {
        total: options.total,
        workers: options.workers.max(1),
        watch: Watch::Convergence(Converging {
            pending: nodes.keys().copied().collect(),
            seen: BTreeMap::new(),
            next_survey: Instant::now() + FIRST_SURVEY,
            last_pass: Instant::now(),
            polling: Polling::default(),
        }),
        nodes,
        baseline_kib,
        reported: Instant::now(),
    };
    let mut next_poll = tokio::time::Instant::now();
    // Bounded: ends at `Quit`, end of input, or `end`.
    loop {
        let polling = !matches!(worker.watch, Watch::Nothing);
        tokio::select! {
            order = orders.recv() => match order {
                None | Some(Ok(Order::Quit)) => return Ok(()),
                Some(Ok(order)) => worker.obey(order).await?,
                Some(Err(e)) => return Err(e.into()),
            },
            () = tokio::time::sleep_until(next_poll), if polling => {
                worker.poll(false).await?;
                let workers = u32::try_from(worker.workers).unwrap_or(u32::MAX);
                let share = worker.mean_view().saturating_mul(SHARE.saturating_mul(workers));
                next_poll = tokio::time::Instant::now() + POLL.max(share);
            }
            () = tokio::time::sleep_until(end) => {
                return Err(format!(
                    "still running after its lifetime ({:?}): the parent stopped giving orders",
                    options.lifetime
                )
                .into());
            }
        }
    }
}

impl Worker {
    /// Carries out one order (all but `Quit`).
    async fn obey(&mut self, order: Order) -> BenchResult<()> {
        match order {
            Order::Stop => {
                // A fresh look at every node, then report and stop.
                self.poll(true).await?;
                self.report()?;
                self.watch = Watch::Nothing;
            }
            Order::Measure => {
                let resources = procfs::own_resources(self.nodes.len(), self.baseline_kib)?;
                emit(&Note::Resources(resources))?;
            }
            Order::Route { checks } => {
                let results = join_all(checks.into_iter().map(|c| self.route(c))).await;
                emit(&Note::Routed { results })?;
            }
            Order::WatchGone { node } => {
                self.watch = Watch::Gone(Leaving {
                    pending: self
                        .nodes
                        .iter()
                        .filter(|(_, n)| n.name() != node)
                        .map(|(&i, _)| i)
                        .collect(),
                    name: node,
                    last_pass: Instant::now(),
                    polling: Polling::default(),
                });
                self.reported = Instant::now();
            }
            Order::Kill { node } => {
                let index = self
                    .nodes
                    .iter()
                    .find(|(_, n)| n.name() == node)
                    .map(|(&i, _)| i)
                    .ok_or_else(|| format!("cannot kill {node}: not a node of this worker"))?;
                if let Some(handle) = self.nodes.remove(&index) {
                    tokio::time::timeout(KILL_WAIT, handle.kill())
                        .await
                        .map_err(|_| format!("killing {node} took over {KILL_WAIT:?}"))?;
                }
                if let Watch::Gone(leaving) = &mut self.watch {
                    leaving.pending.remove(&index);
                }
                emit(&Note::Killed { node })?;
            }
            Order::Quit => {}
        }
        Ok(())
    }

    /// The mean time one view took in the current watch (zero without).
    fn mean_view(&self) -> Duration {
        let polling = match &self.watch {
            Watch::Nothing => return Duration::ZERO,
            Watch::Convergence(c) => &c.polling,
            Watch::Gone(g) => &g.polling,
        };
        let mean_ms = polling.view_ms / polling.views.max(1) as f64;
        Duration::try_from_secs_f64(mean_ms / 1e3).unwrap_or_default()
    }

    /// One poll pass (see the module's doc); `full`: look at every node
    /// not yet done. Reports when done, and progress at most every second.
    async fn poll(&mut self, full: bool) -> BenchResult<()> {
        let at = Instant::now();
        let (total, workers) = (self.total, self.workers);
        match &mut self.watch {
            Watch::Nothing => return Ok(()),
            Watch::Convergence(c) => {
                let survey = full || at >= c.next_survey;
                // Those that saw least first.
                let mut order: Vec<usize> = c.pending.iter().copied().collect();
                order.sort_by_key(|i| c.seen.get(i).map_or(0, |(n, d)| n + d));
                let viewed = c.polling.view_ms;
                for i in order {
                    let Some(node) = self.nodes.get(&i) else {
                        c.pending.remove(&i);
                        continue;
                    };
                    let seen = c.polling.look(|| seen_by(node));
                    c.seen.insert(i, seen);
                    if seen == (total, total) {
                        c.pending.remove(&i);
                    } else if !survey {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                if survey {
                    let took = Duration::try_from_secs_f64((c.polling.view_ms - viewed) / 1e3)
                        .unwrap_or_default();
                    let workers = u32::try_from(workers).unwrap_or(u32::MAX);
                    let share = took.saturating_mul(SHARE.saturating_mul(workers));
                    c.next_survey = Instant::now() + SURVEY_EVERY.max(share);
                }
                if c.pending.is_empty() {
                    for (&i, node) in &self.nodes {
                        let seen = c.polling.look(|| seen_by(node));
                        c.seen.insert(i, seen);
                        if seen != (total, total) {
                            c.pending.insert(i);
                        }
                        tokio::task::yield_now().await;
                    }
                }
                c.polling.pass(at.duration_since(c.last_pass));
                c.last_pass = at;
                if c.pending.is_empty() {
                    emit(&Note::Converged(c.polling))?;
                    self.report()?;
                    self.watch = Watch::Nothing;
                    return Ok(());
                }
            }
            Watch::Gone(g) => {
                let order: Vec<usize> = g.pending.iter().copied().collect();
                for i in order {
                    let Some(node) = self.nodes.get(&i) else {
                        g.pending.remove(&i);
                        continue;
                    };
                    // Nothing else changes meanwhile: the killed node is
                    // gone from a view once it counts one node less.
                    let listed = g.polling.look(|| node.cluster_summary().nodes >= total);
                    if !listed {
                        g.pending.remove(&i);
                    } else if !full {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                g.polling.pass(at.duration_since(g.last_pass));
                g.last_pass = at;
                if g.pending.is_empty() {
                    emit(&Note::Gone {
                        node: g.name.clone(),
                        polling: g.polling,
                    })?;
                    self.report()?;
                    self.watch = Watch::Nothing;
                    return Ok(());
                }
            }
        }
        if full || self.reported.elapsed() >= PROGRESS_EVERY {
            self.report()?;
        }
        Ok(())
    }

    /// Reports where the watch stands: `Progress` for convergence,
    /// `Listing` for a killed node; nothing when nothing is watched.
    fn report(&mut self) -> BenchResult<()> {
        self.reported = Instant::now();
        match &self.watch {
            Watch::Nothing => Ok(()),
            Watch::Convergence(c) => {
                let mut p = progress(self.nodes.len(), c.pending.len(), c.seen.values().copied());
                p.polling = c.polling;
                emit(&Note::Progress(p))
            }
            Watch::Gone(g) => emit(&Note::Listing {
                node: g.name.clone(),
                still_listing: g.pending.len(),
                polling: g.polling,
            }),
        }
    }

    /// One routing check: `echo` and `mpreg.whoami` on dataset `d{to}`,
    /// sent through node `n{from}`.
    async fn route(&self, check: Check) -> Routed {
        let at = Instant::now();
        let mut routed = Routed {
            check,
            ok: false,
            ran_on: None,
            ms: 0.0,
            error: None,
        };
        let Some(node) = self.nodes.get(&check.from) else {
            routed.error = Some(format!("{} is not in this worker", node_name(check.from)));
            return routed;
        };
        let dataset = format!("d{}", check.to);
        let ping = format!("ping {}", check.to);
        let request = Request::new()
            .cmd(
                Command::new("e", "echo")
                    .arg(ping.as_str())
                    .dataset(&dataset),
            )
            .cmd(Command::new("w", "mpreg.whoami").dataset(&dataset))
            .timeout(ROUTE_TIMEOUT);
        let sent = tokio::time::timeout(ROUTE_TIMEOUT + Duration::from_secs(5), node.send(request));
        let outcome = match sent.await {
            Err(_) => Err(format!("no answer within {ROUTE_TIMEOUT:?}")),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(results)) => match (results.get::<String>("e"), results.get::<String>("w")) {
                (Ok(echoed), Ok(ran_on)) => {
                    routed.ran_on = Some(ran_on.clone());
                    if echoed != ping {
                        Err(format!("echo returned {echoed:?}, not {ping:?}"))
                    } else if ran_on != node_name(check.to) {
                        Err(format!("ran on {ran_on}, which does not have {dataset}"))
                    } else {
                        Ok(())
                    }
                }
                (Err(e), _) | (_, Err(e)) => Err(format!("unexpected results: {e}")),
            },
        };
        routed.ms = ms(at.elapsed());
        match outcome {
            Ok(()) => routed.ok = true,
            Err(e) => routed.error = Some(e),
        }
        routed
    }
}

impl Polling {
    /// Runs `look` (a view and its count), timing it.
    fn look<T>(&mut self, look: impl FnOnce() -> T) -> T {
        let at = Instant::now();
        let out = look();
        self.views += 1;
        self.view_ms += ms(at.elapsed());
        out
    }

    /// Counts one pass, started `gap` after the one before (or the watch).
    fn pass(&mut self, gap: Duration) {
        self.polls += 1;
        self.max_gap_ms = self.max_gap_ms.max(ms(gap));
    }
}

/// How many nodes and datasets `node` sees, from its cluster summary (every
/// node of the bench has one dataset of its own, so all of them are seen
/// when the count is the number of nodes).
fn seen_by(node: &NodeHandle) -> (usize, usize) {
    let summary = node.cluster_summary();
    (summary.nodes, summary.datasets)
}

/// Progress of `nodes` nodes of which `pending` are not converged, from
/// what each saw at its last poll.
fn progress(nodes: usize, pending: usize, seen: impl Iterator<Item = (usize, usize)>) -> Progress {
    let mut p = Progress {
        nodes,
        converged: nodes.saturating_sub(pending),
        seen_nodes_min: usize::MAX,
        seen_datasets_min: usize::MAX,
        ..Progress::default()
    };
    for (n, d) in seen {
        p.seen_nodes_min = p.seen_nodes_min.min(n);
        p.seen_nodes_max = p.seen_nodes_max.max(n);
        p.seen_datasets_min = p.seen_datasets_min.min(d);
        p.seen_datasets_max = p.seen_datasets_max.max(d);
    }
    if p.seen_nodes_min == usize::MAX {
        p.seen_nodes_min = 0;
        p.seen_datasets_min = 0;
    }
    p
}

/// A duration in milliseconds.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_spans_what_the_nodes_saw() {
        let p = progress(3, 1, [(3, 2), (4, 4), (1, 0)].into_iter());
        assert_eq!((p.converged, p.seen_nodes_min, p.seen_nodes_max), (2, 1, 4));
        assert_eq!((p.seen_datasets_min, p.seen_datasets_max), (0, 4));
        let p = progress(2, 2, std::iter::empty());
        assert_eq!((p.converged, p.seen_nodes_min, p.seen_nodes_max), (0, 0, 0));
    }
}
