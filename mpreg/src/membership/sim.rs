//! A deterministic simulation of many nodes' gossip: [`Core`]s exchanging
//! packets through an in-memory network, on a clock of the simulation's
//! own (milliseconds advance as fast as the machine computes them). Tests
//! of 1,000-node convergence, a partition and its healing, and churn run in
//! seconds, without sockets.

use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::{RngExt, SeedableRng, rngs::SmallRng};
use tokio::time::Instant;

use super::core::Core;
use super::{MemberEvent, MemberId, MembershipConfig};

/// One step of the simulated clock.
const STEP: Duration = Duration::from_millis(1);
/// How long a packet takes to arrive.
const LATENCY: Duration = Duration::from_millis(1);

/// One simulated node: its core and what it learned from its events.
struct Node {
    core: Core,
    /// Whether it runs (a stopped node neither sends nor receives).
    alive: bool,
    /// The members it sees up, by address.
    up: HashMap<SocketAddr, MemberId>,
    /// The identity of each card it holds, by address.
    cards: HashMap<SocketAddr, MemberId>,
    /// The seed it announces to while the seed is not a member.
    seed: Option<SocketAddr>,
    /// When it next announces to its seed.
    next_announce: Instant,
}

/// A packet in flight.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct InFlight {
    at: std::cmp::Reverse<Instant>,
    seq: std::cmp::Reverse<u64>,
    from: SocketAddr,
    to: SocketAddr,
    data: Vec<u8>,
}

/// Many nodes on an in-memory network.
pub(super) struct Sim {
    nodes: Vec<Node>,
    by_addr: HashMap<SocketAddr, usize>,
    now: Instant,
    packets: BinaryHeap<InFlight>,
    seq: u64,
    /// Which side of a partition each address is on; packets between sides
    /// are lost. Empty: no partition.
    sides: HashMap<SocketAddr, u8>,
    /// Share of packets lost at random, in percent.
    loss_percent: u32,
    rng: SmallRng,
    config: MembershipConfig,
    /// Packets delivered so far by kind (their first byte; the last entry
    /// counts every kind past it).
    pub(super) delivered_by_kind: [u64; 9],
}

/// The address of node `i`.
fn addr(i: usize) -> SocketAddr {
    let i = u32::try_from(i).unwrap_or(u32::MAX);
    SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 7000))
}

/// The card node `i` offers (its generation in it, so a restart is seen).
fn card(i: usize, generation: u64) -> Arc<[u8]> {
    Arc::from(format!("card {i} gen {generation}").into_bytes())
}

impl Sim {
    /// An empty network with the timings of `config`.
    pub(super) fn new(config: MembershipConfig, loss_percent: u32) -> Self {
        Self {
            nodes: Vec::new(),
            by_addr: HashMap::new(),
            now: Instant::now(),
            packets: BinaryHeap::new(),
            seq: 0,
            sides: HashMap::new(),
            loss_percent,
            rng: SmallRng::seed_from_u64(7),
            config,
            delivered_by_kind: [0; 9],
        }
    }

    /// Starts node `i` (a new one, or a restart of a stopped one with a
    /// new generation), joining through node `seed`.
    pub(super) fn start(&mut self, i: usize, seed: Option<usize>) {
        let generation = self.nodes.get(i).map_or(1, |n| n.core.id().generation + 1);
        let id = MemberId {
            addr: addr(i),
            generation,
            version: 1,
            rejoin: 0,
        };
        let rng = SmallRng::seed_from_u64(i as u64 * 1_000 + generation);
        let core = Core::new(id, &self.config, rng, card(i, generation)).expect("valid timings");
        let node = Node {
            core,
            alive: true,
            up: HashMap::new(),
            cards: HashMap::new(),
            seed: seed.map(addr),
            next_announce: self.now,
        };
        if i < self.nodes.len() {
            self.nodes[i] = node;
        } else {
            assert_eq!(i, self.nodes.len(), "nodes start in order");
            self.nodes.push(node);
            self.by_addr.insert(id.addr, i);
        }
    }

    /// Stops node `i` as a crash would.
    pub(super) fn kill(&mut self, i: usize) {
        self.nodes[i].alive = false;
    }

    /// Splits the network: nodes for which `side` is true on one side.
    pub(super) fn partition(&mut self, side: impl Fn(usize) -> bool) {
        self.sides = (0..self.nodes.len())
            .map(|i| (addr(i), u8::from(side(i))))
            .collect();
    }

    /// Heals the partition.
    pub(super) fn heal(&mut self) {
        self.sides.clear();
    }

    /// Runs the network for `duration` of simulated time.
    pub(super) fn run(&mut self, duration: Duration) {
        let end = self.now + duration;
        while self.now < end {
            self.step();
        }
    }

    /// Runs until `done` holds (checked every 100 ms), for at most `max`;
    /// returns the simulated time it took, or `None`.
    pub(super) fn run_until(
        &mut self,
        max: Duration,
        mut done: impl FnMut(&Self) -> bool,
    ) -> Option<Duration> {
        let start = self.now;
        while self.now - start < max {
            if done(self) {
                return Some(self.now - start);
            }
            for _ in 0..100 {
                self.step();
            }
        }
        done(self).then(|| self.now - start)
    }

    /// Whether every running node in `group` sees exactly the other
    /// running nodes of `group` up, and holds the card of each one's
    /// current identity.
    pub(super) fn converged(&self, group: impl Fn(usize) -> bool) -> bool {
        let live: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].alive && group(i))
            .collect();
        live.iter().all(|&i| {
            let node = &self.nodes[i];
            node.up.len() == live.len() - 1
                && live.iter().filter(|&&j| j != i).all(|&j| {
                    let id = self.nodes[j].core.id();
                    // A rejoin (a new identity, the same card) keeps the card.
                    let card = |c: &MemberId| (c.generation, c.version);
                    node.up.get(&id.addr) == Some(&id)
                        && node.cards.get(&id.addr).map(card) == Some(card(&id))
                })
        })
    }

    /// The fewest members any running node in `group` sees up.
    pub(super) fn fewest_up(&self, group: impl Fn(usize) -> bool) -> usize {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].alive && group(i))
            .map(|i| self.nodes[i].up.len())
            .min()
            .unwrap_or(0)
    }

    /// One millisecond: packets due arrive, nodes run what is due, then
    /// send.
    fn step(&mut self) {
        self.now += STEP;
        let now = self.now;
        while self.packets.peek().is_some_and(|p| p.at.0 <= now) {
            let Some(packet) = self.packets.pop() else {
                break;
            };
            let Some(&i) = self.by_addr.get(&packet.to) else {
                continue;
            };
            if self.nodes[i].alive {
                let kind = packet.data.first().map_or(0, |&k| usize::from(k));
                self.delivered_by_kind[kind.min(8)] += 1;
                self.nodes[i].core.receive(packet.from, &packet.data, now);
                self.collect(i);
            }
        }
        for i in 0..self.nodes.len() {
            let node = &mut self.nodes[i];
            if !node.alive {
                continue;
            }
            // As the node's seed loop does: announce to the seed until it
            // is a member.
            if let Some(seed) = node.seed
                && node.next_announce <= now
                && !node.up.contains_key(&seed)
            {
                node.next_announce = now + Duration::from_millis(500);
                node.core.announce(seed, now);
            }
            if node.core.next_deadline().is_some_and(|at| at <= now) {
                node.core.tick(now);
            }
            self.collect(i);
        }
    }

    /// Takes node `i`'s packets into the network and its events into its
    /// view.
    fn collect(&mut self, i: usize) {
        let from = addr(i);
        for (to, data) in self.nodes[i].core.take_outbox() {
            let lost = self.loss_percent > 0 && self.rng.random_range(0..100) < self.loss_percent;
            let cut = !self.sides.is_empty() && self.sides.get(&from) != self.sides.get(&to);
            if lost || cut {
                continue;
            }
            self.seq += 1;
            self.packets.push(InFlight {
                at: std::cmp::Reverse(self.now + LATENCY),
                seq: std::cmp::Reverse(self.seq),
                from,
                to,
                data,
            });
        }
        let node = &mut self.nodes[i];
        while let Some(event) = node.core.next_event() {
            match event {
                MemberEvent::Up(id) => {
                    node.up.insert(id.addr, id);
                }
                MemberEvent::Changed { old, new } => {
                    if old.generation != new.generation {
                        node.cards.remove(&old.addr);
                    }
                    node.up.insert(new.addr, new);
                }
                MemberEvent::Down(id) => {
                    node.up.remove(&id.addr);
                    node.cards.remove(&id.addr);
                }
                MemberEvent::Card { id, card } => {
                    let j = self.by_addr[&id.addr];
                    assert_eq!(card, self::card(j, id.generation), "the right card");
                    node.cards.insert(id.addr, id);
                }
            }
        }
    }
}

/// Timings of the node's defaults (1 s probes, 3 s suspicion).
fn lan() -> MembershipConfig {
    MembershipConfig::default()
}

/// `n` nodes started at once, all through node 0, converged (within 30 s).
fn joined(n: usize, loss_percent: u32) -> Sim {
    let mut sim = Sim::new(lan(), loss_percent);
    sim.start(0, None);
    for i in 1..n {
        sim.start(i, Some(0));
    }
    sim.settle(Duration::from_secs(30), &|_| true, "joined");
    sim
}

impl Sim {
    /// Runs until the nodes of every group converge among themselves, for
    /// at most `max`; returns the time it took. Panics (saying `what`)
    /// when they do not.
    fn settle_groups(
        &mut self,
        max: Duration,
        groups: &[&dyn Fn(usize) -> bool],
        what: &str,
    ) -> Duration {
        let took = self.run_until(max, |s| groups.iter().all(|g| s.converged(g)));
        match took {
            Some(took) => took,
            None => panic!(
                "not {what} within {max:?}: a node sees only {} others",
                self.fewest_up(|_| true)
            ),
        }
    }

    /// [`Sim::settle_groups`] with one group.
    fn settle(&mut self, max: Duration, group: &dyn Fn(usize) -> bool, what: &str) -> Duration {
        self.settle_groups(max, &[group], what)
    }
}

#[test]
fn a_thousand_nodes_converge() {
    let n = 1000;
    let mut sim = Sim::new(lan(), 0);
    // Started one after another, 2 ms apart, all through node 0.
    sim.start(0, None);
    for i in 1..n {
        sim.start(i, Some(0));
        sim.run(Duration::from_millis(2));
    }
    // The target of the scale benchmark is 10 s on real sockets.
    let took = sim.settle(Duration::from_secs(10), &|_| true, "converged");
    eprintln!(
        "{n} nodes: every node sees every other up and holds its card {took:?} after the last start \
         ({} packets; by kind: swim, card ask, card part, state ask, state part, cards, ask many, lacking, sync: {:?})",
        sim.delivered_by_kind.iter().sum::<u64>(),
        &sim.delivered_by_kind,
    );
}

#[test]
fn a_partition_serves_each_half_and_heals() {
    let n = 64;
    let mut sim = joined(n, 1);
    let left = |i: usize| i < n / 2;
    let right = |i: usize| !left(i);
    sim.partition(left);
    let split = sim.settle_groups(
        Duration::from_secs(60),
        &[&left, &right],
        "split into halves that each see only themselves",
    );
    sim.heal();
    let healed = sim.settle(Duration::from_secs(120), &|_| true, "whole again");
    eprintln!("partition: halves apart after {split:?}, whole again {healed:?} after healing");
}

#[test]
fn churn_settles_on_the_nodes_running() {
    let n = 128;
    let mut sim = joined(n, 1);
    // Every 200 ms, one node crashes and another restarts, for 10 s.
    for round in 0..50 {
        let victim = 1 + (round * 37) % (n - 1);
        sim.kill(victim);
        let back = 1 + (round * 53 + 11) % (n - 1);
        if !sim.nodes[back].alive {
            sim.start(back, Some(0));
        }
        sim.run(Duration::from_millis(200));
    }
    let settled = sim.settle(Duration::from_secs(60), &|_| true, "settled");
    eprintln!("churn: settled {settled:?} after the last change");
}
