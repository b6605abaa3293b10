//! Whole nodes in a simulation: real nodes (server, links, handshake,
//! dispatcher, membership driver) on the in-memory network of
//! [`crate::transport::memory`], on one runtime whose clock is paused, so
//! time jumps to the next timer whenever every task waits. Convergence, a
//! partition and its healing, and churn take seconds of wall time and no
//! socket.
//!
//! Requests come from a [`Client`] on the node's host, over the in-memory
//! network too (so through the node's server, as any client's), or
//! through [`NodeHandle::send`].
//! Nodes seed their random numbers from the system, so runs are not
//! repeated bit for bit; what is asserted holds for any of them. Every wait
//! is bounded in simulated time; nothing is timed with the wall clock.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use super::{Node, NodeHandle};
use crate::client::Client;
use crate::cluster::NodeStatus;
use crate::error::{Error, ErrorCode};
use crate::protocol::{Command, Request};
use crate::registry::Function;
use crate::transport::{Transport, memory::Network};

/// How often a wait looks again (simulated time).
const POLL: Duration = Duration::from_millis(100);

/// A cluster on an in-memory network: node `i` is named `n{i}`, has the
/// dataset `d{i}` and serves `work`, which answers with its name.
struct Sim {
    net: Network,
    /// Each node's address, by index (kept when it stops).
    addrs: Vec<SocketAddr>,
    /// The nodes running, by index.
    nodes: Vec<Option<NodeHandle>>,
    /// The cluster secret of nodes started from now on.
    secret: Option<&'static str>,
}

impl Sim {
    fn new() -> Self {
        Self {
            net: Network::new(),
            addrs: Vec::new(),
            nodes: Vec::new(),
            secret: None,
        }
    }

    /// Starts `count` nodes, each joining through node 0.
    async fn start(count: usize) -> Self {
        Self::new().with(count).await
    }

    /// Starts `count` more nodes, each joining through node 0.
    async fn with(self, count: usize) -> Self {
        let mut sim = self;
        for _ in 0..count {
            sim.add().await;
        }
        sim
    }

    /// Starts a node at a new address; returns its index.
    async fn add(&mut self) -> usize {
        let i = self.addrs.len();
        self.addrs.push(self.net.host());
        self.nodes.push(None);
        self.restart(i).await;
        i
    }

    /// Node `i`'s builder.
    fn builder(&self, i: usize) -> super::NodeBuilder {
        let name = format!("n{i}");
        let answer = name.clone();
        let builder = Node::builder()
            .transport(Transport::Memory(self.net.clone()))
            .name(name)
            .listen(self.addrs[i].to_string())
            .without_linked_functions()
            .datasets([format!("d{i}")])
            .function(Function::new("work", move |_| {
                let answer = answer.clone();
                async move { Ok(json!(answer)) }
            }));
        let builder = match self.secret {
            Some(secret) => builder.cluster_secret(secret),
            None => builder,
        };
        if i == 0 {
            builder
        } else {
            builder.peers([format!("ws://{}", self.addrs[0])])
        }
    }

    /// Starts node `i` (again) at its address, joining through node 0.
    async fn restart(&mut self, i: usize) {
        // A node just stopped may not have closed its listener yet.
        let mut tries = 0;
        let node = loop {
            match self.builder(i).start().await {
                Ok(node) => break node,
                Err(e) if tries < 10 => {
                    tries += 1;
                    tracing::debug!(node = i, error = %e, "start failed; again");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("n{i} did not start: {e}"),
            }
        };
        self.nodes[i] = Some(node);
    }

    fn node(&self, i: usize) -> &NodeHandle {
        self.nodes[i].as_ref().expect("running")
    }

    /// The indexes of the nodes running.
    fn running(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].is_some())
            .collect()
    }

    /// Crashes node `i` (nobody is told).
    async fn kill(&mut self, i: usize) {
        if let Some(node) = self.nodes[i].take() {
            node.kill().await;
        }
    }

    /// Stops node `i` gracefully (it leaves membership first).
    async fn stop(&mut self, i: usize) {
        if let Some(node) = self.nodes[i].take() {
            node.shutdown().await;
        }
    }

    /// Waits (at most `limit` of simulated time) until `done` holds;
    /// returns the simulated time it took, or panics with `what` and the
    /// last `state`.
    async fn settle(
        &self,
        what: &str,
        limit: Duration,
        mut done: impl FnMut(&Self) -> bool,
        state: impl Fn(&Self) -> String,
    ) -> Duration {
        let start = Instant::now();
        loop {
            if done(self) {
                return start.elapsed();
            }
            if start.elapsed() > limit {
                panic!("{what}: not within {limit:?} (simulated); {}", state(self));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until every node in `group` sees exactly the nodes of
    /// `group` (by card: count and datasets, see `exactly`).
    async fn converge(&self, what: &str, group: &[usize], limit: Duration) -> Duration {
        self.settle(
            what,
            limit,
            |sim| group.iter().all(|&i| sim.sees_exactly(i, group)),
            |sim| sim.describe(group),
        )
        .await
    }

    /// Whether node `i` sees exactly the running nodes of `group` (names
    /// and generations, by their cards) and routes to each one's dataset.
    fn sees_exactly(&self, i: usize, group: &[usize]) -> bool {
        let node = self.node(i);
        let summary = node.cluster_summary();
        if summary.nodes != group.len() || summary.datasets != group.len() {
            return false;
        }
        // Cheap checks first; the whole view for small clusters only.
        if group.len() > 64 {
            return true;
        }
        let view = node.cluster_view();
        let mut seen: Vec<(String, u64)> = view
            .nodes
            .iter()
            .filter(|n| matches!(n.status, NodeStatus::Up | NodeStatus::This))
            .map(|n| (n.name.clone(), n.generation))
            .collect();
        seen.sort();
        let mut want: Vec<(String, u64)> = group
            .iter()
            .map(|&j| (format!("n{j}"), self.node(j).state.generation))
            .collect();
        want.sort();
        seen == want
            && group
                .iter()
                .all(|j| view.offers("work", &[format!("d{j}").as_str()]))
    }

    /// What each node of `group` sees, for a failure's message.
    fn describe(&self, group: &[usize]) -> String {
        group
            .iter()
            .map(|&i| {
                let s = self.node(i).cluster_summary();
                format!("n{i}: {} nodes, {} datasets", s.nodes, s.datasets)
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Asks node `from`, through a client on its host, to run `work` on
    /// dataset `d{on}`.
    async fn work(&self, from: usize, on: usize) -> Result<String, Error> {
        let addr = self.addrs[from];
        let client = Client::builder()
            .transport(Transport::Memory(self.net.at(addr)))
            .connect(&format!("ws://{addr}"))
            .await?;
        let results = client.send(work_on(on)).await?;
        results.get::<String>("w")
    }

    /// Whether node `from` has a link to node `to` now.
    fn linked(&self, from: usize, to: usize) -> bool {
        self.node(from)
            .cluster_view()
            .node(&format!("n{to}"))
            .is_some_and(|n| n.linked)
    }

    /// Stops every node.
    async fn shutdown(mut self) {
        for i in 0..self.nodes.len() {
            self.stop(i).await;
        }
    }
}

/// A request to run `work` on dataset `d{on}`.
fn work_on(on: usize) -> Request {
    Request::new().cmd(Command::new("w", "work").dataset(format!("d{on}")))
}

/// Whether `result` is the failure for no node having the datasets.
fn no_node(result: &Result<String, Error>) -> bool {
    matches!(result, Err(Error::Rpc(e)) if e.code == ErrorCode::NoNodeForDatasets)
}

#[tokio::test(start_paused = true)]
async fn eight_nodes_converge_and_a_link_opens_on_demand() {
    let sim = Sim::start(8).await;
    let all = sim.running();
    let took = sim
        .converge("8 nodes converge", &all, Duration::from_secs(60))
        .await;
    eprintln!("8 nodes converged in {took:?} (simulated)");
    // Routing came by gossip: nobody linked to anybody yet.
    for i in &all {
        for j in &all {
            assert!(!sim.linked(*i, *j), "n{i} linked to n{j} before any call");
        }
    }

    // A client asks node 0 for a command on a dataset only node 7 has: a
    // link opens.
    assert_eq!(sim.work(0, 7).await.expect("work on d7"), "n7");
    assert!(sim.linked(0, 7), "no link from n0 to n7");
    assert!(!sim.linked(0, 6), "a link nobody needed");
    // The node's own entry point routes the same way.
    let results = sim.node(1).send(work_on(6)).await.expect("work on d6");
    assert_eq!(results.get::<String>("w").expect("a name"), "n6");
    assert!(sim.linked(1, 6), "no link from n1 to n6");
    // And the other way round, over the same link or a new one.
    assert_eq!(sim.work(7, 0).await.expect("work on d0"), "n0");
    // A dataset nobody has.
    assert!(no_node(&sim.work(0, 99).await));
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn with_a_cluster_secret_links_prove_it_and_strangers_stay_out() {
    let mut sim = Sim::new();
    sim.secret = Some("sim secret");
    let mut sim = sim.with(4).await;
    let all = sim.running();
    sim.converge("4 nodes with a secret", &all, Duration::from_secs(60))
        .await;
    assert_eq!(sim.work(0, 3).await.expect("work on d3"), "n3");
    assert!(sim.linked(0, 3));

    // A node with another secret does not join: its gossip is dropped,
    // so nobody learns of it (nor it of anyone, to link to).
    sim.secret = Some("another secret");
    let stranger = sim.add().await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    for &i in &all {
        assert!(sim.sees_exactly(i, &all), "n{i} let the stranger in");
    }
    assert!(
        sim.node(0)
            .state
            .membership
            .as_ref()
            .is_some_and(|m| m.dropped_packets() > 0)
    );
    assert_eq!(sim.node(stranger).cluster_summary().nodes, 1);
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_partition_splits_the_cluster_and_healing_joins_it() {
    let sim = Sim::start(8).await;
    let all = sim.running();
    sim.converge("8 nodes converge", &all, Duration::from_secs(60))
        .await;
    // Links across the coming cut, so the partition has some to reset.
    assert_eq!(sim.work(0, 5).await.expect("work on d5"), "n5");
    assert_eq!(sim.work(6, 1).await.expect("work on d1"), "n1");
    assert!(sim.linked(0, 5) && sim.linked(6, 1));

    let (left, right): (Vec<usize>, Vec<usize>) = all.iter().partition(|&&i| i < 4);
    sim.net.partition(right.iter().map(|&i| sim.addrs[i]));
    let took = sim
        .converge("the left half alone", &left, Duration::from_secs(120))
        .await;
    eprintln!("halves apart after {took:?} (simulated)");
    // The links across the cut are gone (reset, and their members down).
    assert!(
        !sim.linked(0, 5) && !sim.linked(5, 0),
        "a link across the cut"
    );
    assert!(
        !sim.linked(6, 1) && !sim.linked(1, 6),
        "a link across the cut"
    );
    sim.converge("the right half alone", &right, Duration::from_secs(60))
        .await;
    // Each half serves what it can reach, and only that.
    for (half, other) in [(&left, &right), (&right, &left)] {
        for &from in half {
            for &on in half {
                assert_eq!(
                    sim.work(from, on).await.expect("same half"),
                    format!("n{on}")
                );
            }
            for &on in other {
                let result = sim.work(from, on).await;
                assert!(no_node(&result), "n{from} on d{on}: {result:?}");
            }
        }
    }

    sim.net.heal();
    let took = sim
        .converge("whole again", &all, Duration::from_secs(180))
        .await;
    eprintln!("whole again {took:?} after healing (simulated)");
    for &from in &all {
        for &on in &all {
            assert_eq!(sim.work(from, on).await.expect("healed"), format!("n{on}"));
        }
    }
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn churn_settles_on_the_nodes_running() {
    let mut sim = Sim::start(8).await;
    sim.converge("8 nodes converge", &sim.running(), Duration::from_secs(60))
        .await;
    // Crashes, a graceful stop, restarts at the same address (a new
    // generation) and a node at a new address, a round at a time; after
    // each, every node sees exactly the nodes running.
    let limit = Duration::from_secs(120);
    sim.kill(1).await;
    sim.restart(1).await;
    sim.converge("n1 restarted", &sim.running(), limit).await;

    sim.stop(2).await;
    sim.kill(3).await;
    sim.add().await;
    sim.converge("n2 stopped, n3 crashed, n8 added", &sim.running(), limit)
        .await;

    sim.kill(4).await;
    sim.restart(3).await;
    sim.kill(8).await;
    sim.converge("n4, n8 crashed, n3 back", &sim.running(), limit)
        .await;

    sim.restart(4).await;
    sim.restart(8).await;
    sim.restart(2).await;
    let running = sim.running();
    assert_eq!(running.len(), 9);
    sim.converge("every node back", &running, limit).await;
    for &from in &running {
        for &on in &running {
            assert_eq!(
                sim.work(from, on).await.expect("after churn"),
                format!("n{on}")
            );
        }
    }
    sim.shutdown().await;
}

/// As large as converges in a few seconds of wall time in a debug build
/// (256 nodes: 3 to 7 s here, on 2 busy cores; `MPREG_SIM_NODES` sets
/// another size: 512 take ~26 s, 1,000 ~100 s and 2 GB).
#[tokio::test(start_paused = true)]
async fn many_nodes_converge() {
    let nodes: usize = std::env::var("MPREG_SIM_NODES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(256);
    let sim = Sim::start(nodes).await;
    let all = sim.running();
    let took = sim
        .converge("all nodes converge", &all, Duration::from_secs(120))
        .await;
    let (sent, lost) = sim.net.datagrams_sent();
    eprintln!("{nodes} nodes converged in {took:?} (simulated); {sent} datagrams, {lost} lost");
    // Any node reaches any other's dataset.
    let last = nodes - 1;
    assert_eq!(sim.work(0, last).await.expect("far"), format!("n{last}"));
    assert_eq!(sim.work(last, 1).await.expect("far"), "n1");
    sim.shutdown().await;
}
