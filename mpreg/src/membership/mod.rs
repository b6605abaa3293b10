//! Cluster membership and failure detection: SWIM (via `foca`) over UDP.
//!
//! `foca` is a sans-IO state machine: it never touches a socket or a clock.
//! This module is the thin driver around it: one tokio task owns the `Foca`
//! instance, the UDP socket (same port number as the node's WebSocket
//! listener, so failure detection never queues behind large RPC payloads on a
//! TCP link), an [`AccumulatingRuntime`] and the timers foca asks for. After
//! every interaction with foca the task drains the runtime: packets go out on
//! the socket, timers go into a heap, and notifications become
//! [`MemberEvent`]s for the cluster manager.
//!
//! The gossiped identity ([`MemberId`]) is small on purpose: address,
//! generation (one per process start) and card version. The card itself
//! (what the member offers, opaque bytes here) is pulled from its owner over
//! the same socket whenever a member comes up or its version grows
//! (`cards.rs`), and handed to the cluster as [`MemberEvent::Card`].
//!
//! The protocol itself lives in `core.rs`, a state machine without IO (so
//! a simulation can run many nodes over an in-memory network); this module
//! is the driver that gives it a socket and a clock. The socket ([`Socket`])
//! is UDP, or, for whole nodes simulated on the in-memory network
//! (`crate::transport::memory`, `node/sim.rs`), that network's datagrams:
//! the driver is the same, and its task then runs on the caller's runtime
//! instead of the gossip thread, so a paused test clock is its clock too.
//!
//! # Events
//!
//! Events describe how the set of *up* members changes, as seen by this node
//! (see [`MemberView`]):
//! - first contact with a member: `Up(id)`;
//! - a member leaves (`leave()`): `Down(id)` at once, without suspicion;
//! - a member crashes: `Down(id)` once suspicion times out;
//! - a member changes its catalog version (`set_version`): foca reports a
//!   rename, which becomes `Changed { old, new }` (never `Down` + `Up`);
//! - a member restarts (same address, new generation): `Changed { old, new }`
//!   if the old identity was still up here, or `Up(new)` if it had already
//!   been reported `Down` (foca then reports a rename of a down member plus
//!   `MemberUp`, and a rename of a member that is not up is not an event).

mod bloom;
mod cards;
mod core;
#[cfg(test)]
mod sim;

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    num::{NonZeroU32, NonZeroUsize},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use foca::{OwnedNotification, PeriodicParams};
use rand::{SeedableRng, rngs::SmallRng};
use tokio::{
    net::UdpSocket,
    sync::oneshot,
    sync::{mpsc, watch},
    task::AbortHandle,
    time::{Instant, sleep_until},
};
use tracing::Instrument;

use self::core::Core;
use crate::transport::Transport;

/// Largest packet foca produces and accepts: below a typical Ethernet MTU, so
/// gossip datagrams are not fragmented.
const MAX_PACKET_SIZE: NonZeroUsize = match NonZeroUsize::new(1400) {
    Some(size) => size,
    None => unreachable!(),
};

/// How long a suspected member has to refute before it is declared down,
/// in a cluster of `members`: `base` (the node's `suspect_timeout_ms`)
/// times log10 of the size, at least once (3 s stays 3 s up to 10 nodes,
/// 6 s at 100, 9 s at 1,000). Updated as the cluster grows (`core.rs`).
/// memberlist (Serf, Consul) scales its suspicion the same way: in a large
/// cluster a suspicion takes longer to reach the suspected node, and under
/// load (a thousand nodes starting at once on two cores) a fixed 3 s
/// declared live nodes down faster than they could refute, and the cluster
/// never settled.
pub(crate) fn suspect_to_down(base: Duration, members: usize) -> Duration {
    base.mul_f64((members as f64).log10().max(1.0))
}

/// How many times each node sends each membership update on, for a cluster
/// of `members` (foca's LAN preset says 4·log10(n+1): 4 for 16 nodes, 12
/// for 1,000; this is 2·log10(n+1), at least 4: 6 at 1,000). Updated as
/// the cluster grows (`core.rs`). Not more: every update received costs
/// its decoding and a lookup (foca's, a linear search, for news), and
/// after a thousand-node join the rumors' tail was most of the idle CPU;
/// what a rumor misses, the pulls of the membership state bring (at most
/// 2 s apart). At 1,000 nodes, 3·log10 -> 2·log10: converged 9.5-10.9 ->
/// 8.5-8.8 s, 18.5-21 -> 16.5-16.9 core-seconds.
pub(crate) fn max_transmissions(members: usize) -> std::num::NonZeroU8 {
    let tx = (2.0 * ((members as f64) + 1.0).log10()).ceil();
    let tx = if tx.is_finite() {
        tx.clamp(4.0, 12.0) as u8
    } else {
        4
    };
    std::num::NonZeroU8::new(tx).unwrap_or(std::num::NonZeroU8::MIN)
}

/// Most packets read, when timers are due, before they run (a bound, so
/// a flood of packets cannot hold the timers back).
const READ_BEFORE_TIMERS: usize = 256;

/// How long a down identity is remembered. An identity that is forgotten
/// could be resurrected by stale gossip; restarts use a new generation, so a
/// long memory costs nothing but one entry per address.
const REMOVE_DOWN_AFTER: Duration = Duration::from_secs(60 * 60);

/// Capacity of the events channel. The cluster manager consumes it promptly;
/// when it is full the membership task waits.
const EVENTS_CAPACITY: usize = 4096;

/// Capacity of the command channel from the handles to the task.
const COMMANDS_CAPACITY: usize = 64;

/// Upper bound on [`Membership::leave`].
const LEAVE_TIMEOUT: Duration = Duration::from_secs(1);

/// After a version change foca forgets it is connected until a member talks
/// to it; announcing to this many known members gets it back at once.
const REANNOUNCE_AFTER_CHANGE: usize = 3;

/// A member's identity as gossiped: small, fits a UDP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub(crate) struct MemberId {
    /// The node's address: its WebSocket TCP port and, with the same number,
    /// its UDP gossip port.
    pub(crate) addr: SocketAddr,
    /// Bumped at each start of the node (e.g. from the wall clock in ms or a
    /// random u64), so a restarted node wins over its previous incarnation.
    /// Real nodes use a generation above 0 (0 is the placeholder used when
    /// announcing to an address).
    pub(crate) generation: u64,
    /// Bumped whenever the node's card (what it offers) changes, telling
    /// the others to fetch the card again. 32 bits, as `rejoin`, so an
    /// identity is 48 bytes: a node holds one per member in several maps.
    pub(crate) version: u32,
    /// Bumped by foca's renew when the node rejoins after the cluster took
    /// it for dead: a new identity, the same card (the others keep the card
    /// they hold: a thousand-node cluster that forms on two cores takes a
    /// few live nodes for dead, and each rejoin made every node fetch a
    /// card again).
    pub(crate) rejoin: u32,
}

impl MemberId {
    /// The identity we announce to when only an address is known (a seed).
    /// foca accepts an announce for any identity with the receiver's address.
    fn placeholder(addr: SocketAddr) -> Self {
        Self {
            addr,
            generation: 0,
            version: 0,
            rejoin: 0,
        }
    }
}

impl foca::Identity for MemberId {
    type Addr = SocketAddr;

    /// Opts in to foca's automatic rejoin: when the cluster declares us down
    /// (a false positive, e.g. after a long pause), foca switches to this
    /// newer identity instead of staying defunct.
    fn renew(&self) -> Option<Self> {
        self.rejoin
            .checked_add(1)
            .map(|rejoin| Self { rejoin, ..*self })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Of two identities at one address, the later start wins, then the later
    /// catalog version, then the later rejoin.
    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        (self.generation, self.version, self.rejoin)
            > (adversary.generation, adversary.version, adversary.rejoin)
    }
}

/// A change in the set of members considered up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MemberEvent {
    /// A member is up (first seen, or back after being down).
    Up(MemberId),
    /// A member is down (failed or left). Its abilities must disappear.
    Down(MemberId),
    /// A member with the same address now has a new identity (restart: new
    /// generation; card change: new version). `old` was up.
    Changed {
        /// The identity that was up until now.
        old: MemberId,
        /// The identity that replaces it.
        new: MemberId,
    },
    /// The card of a member up arrived: `id`'s, or a later one of the same
    /// generation.
    Card {
        /// The identity the card belongs to.
        id: MemberId,
        /// The card, as its owner encoded it.
        card: Arc<[u8]>,
    },
}

/// Timings of the failure detector.
#[derive(Debug, Clone)]
pub(crate) struct MembershipConfig {
    /// How often a random member is probed. Also sets the periodic announce
    /// (every ten probe periods, to one member); discovery itself is the
    /// pulls of the whole membership state.
    pub(crate) probe_period: Duration,
    /// How long to wait for a direct ack before asking others to probe
    /// indirectly. Must be shorter than `probe_period`.
    pub(crate) probe_rtt: Duration,
    /// How long a suspected member has to refute before it is declared down.
    pub(crate) suspect_to_down: Duration,
    /// How often pending updates are gossiped, on top of those piggybacked on
    /// probes.
    pub(crate) gossip_interval: Duration,
    /// When set, every packet carries an HMAC tag made with this secret;
    /// packets without a valid tag are dropped and counted.
    pub(crate) secret: Option<crate::auth::Secret>,
}

impl Default for MembershipConfig {
    /// Values for a LAN: a crash is noticed within a few seconds.
    fn default() -> Self {
        Self {
            probe_period: Duration::from_secs(1),
            probe_rtt: Duration::from_millis(300),
            suspect_to_down: Duration::from_secs(3),
            gossip_interval: Duration::from_millis(200),
            secret: None,
        }
    }
}

impl MembershipConfig {
    /// Fast timings for tests on loopback.
    #[cfg(test)]
    pub(crate) fn for_tests() -> Self {
        Self {
            probe_period: Duration::from_millis(200),
            probe_rtt: Duration::from_millis(80),
            suspect_to_down: Duration::from_millis(600),
            gossip_interval: Duration::from_millis(50),
            secret: None,
        }
    }

    /// foca's LAN preset with our timings. Rejects timings foca cannot work
    /// with (zero, or a probe round trip not shorter than the probe period).
    pub(crate) fn foca_config(&self) -> io::Result<foca::Config> {
        let zero = [
            self.probe_period,
            self.probe_rtt,
            self.suspect_to_down,
            self.gossip_interval,
        ]
        .contains(&Duration::ZERO);
        if zero || self.probe_rtt >= self.probe_period {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid membership timings: {self:?}"),
            ));
        }
        let mut config = foca::Config::new_lan(NonZeroU32::MIN);
        config.max_transmissions = max_transmissions(0);
        config.probe_period = self.probe_period;
        config.probe_rtt = self.probe_rtt;
        config.suspect_to_down_after = self.suspect_to_down;
        config.remove_down_after = Some(REMOVE_DOWN_AFTER);
        // Leave room for the kind byte, and the tag when packets are
        // authenticated.
        let tag = if self.secret.is_some() {
            crate::auth::TAG_LEN
        } else {
            0
        };
        config.max_packet_size =
            NonZeroUsize::new(MAX_PACKET_SIZE.get() - 1 - tag).unwrap_or(MAX_PACKET_SIZE);
        config.notify_down_members = true;
        // Discovery is the pulls of the whole state (`core.rs`); an
        // announce brings a feed of members, each applied by a linear
        // search, so not too often.
        config.periodic_announce = Some(PeriodicParams {
            frequency: self.probe_period * 10,
            num_members: NonZeroUsize::MIN,
        });
        // A partition heals when one side announces to a member it holds
        // down: every ten probe periods (foca's preset: 65 s).
        config.periodic_announce_to_down_members = Some(PeriodicParams {
            frequency: self.probe_period * 10,
            num_members: NonZeroUsize::MIN.saturating_add(1),
        });
        config.periodic_gossip = Some(PeriodicParams {
            frequency: self.gossip_interval,
            num_members: config.num_indirect_probes,
        });
        Ok(config)
    }
}

/// The members this node considers up, keyed by address, and the translation
/// of foca's notifications into [`MemberEvent`]s against it.
///
/// foca keeps one entry per address, and reports a rename (`Rename(old,
/// new)`) before the liveness change it may come with (`MemberUp(new)` or
/// `MemberDown(new)`). Tracking the up set makes the events simple for the
/// consumer: `Changed` only replaces an up member, and a rename of a member
/// that is not up is silent (the `Up` that follows it says everything).
#[derive(Debug, Default)]
struct MemberView {
    /// Up members (alive or suspect), by address.
    up: HashMap<SocketAddr, MemberId>,
}

impl MemberView {
    /// Applies one notification; returns the event it amounts to, if any.
    fn apply(&mut self, notification: OwnedNotification<MemberId>) -> Option<MemberEvent> {
        match notification {
            OwnedNotification::MemberUp(id) => match self.up.insert(id.addr, id) {
                None => Some(MemberEvent::Up(id)),
                Some(old) if old == id => None,
                Some(old) => Some(MemberEvent::Changed { old, new: id }),
            },
            OwnedNotification::MemberDown(id) => {
                if self.up.get(&id.addr) == Some(&id) {
                    self.up.remove(&id.addr);
                    Some(MemberEvent::Down(id))
                } else {
                    tracing::debug!(?id, "down notification for a member not up");
                    None
                }
            }
            OwnedNotification::Rename(old, new) => match self.up.get_mut(&old.addr) {
                Some(current) if *current == old => {
                    *current = new;
                    Some(MemberEvent::Changed { old, new })
                }
                _ => None,
            },
            other => {
                tracing::trace!(notification = ?other, "membership notification");
                None
            }
        }
    }

    /// The members currently up.
    fn members(&self) -> Vec<MemberId> {
        self.up.values().copied().collect()
    }
}

/// Requests from the handles to the membership task.
#[derive(Debug)]
enum Command {
    /// Ask the node at this address to let us in.
    Announce(SocketAddr),
    /// Reply with the members currently up.
    Members(oneshot::Sender<Vec<MemberId>>),
    /// Leave the cluster and stop.
    Leave,
}

/// What this node advertises: its identity and its card (whose version is
/// the identity's).
#[derive(Debug, Clone)]
struct Advert {
    id: MemberId,
    card: Arc<[u8]>,
}

/// Handle to the running membership task. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Membership {
    /// Commands to the task.
    commands: mpsc::Sender<Command>,
    /// Our identity and card, as wanted by the handles (`set_card`) or
    /// renewed by foca (rejoin). The task watches it and applies changes; a
    /// watch coalesces them, so `set_card` never blocks nor gets lost.
    advert: Arc<watch::Sender<Advert>>,
    /// Packets dropped (unauthenticated, malformed, misaddressed).
    dropped: Arc<AtomicU64>,
    /// The task, taken by the first `leave` to wait for the socket to close.
    task: Arc<Mutex<Option<Task>>>,
}

/// The socket of a membership task, closed before the task's end is told.
struct Closing {
    socket: Socket,
    _finished: oneshot::Sender<()>,
}

/// The receive buffer asked for the gossip socket (the kernel caps it at
/// `net.core.rmem_max`). Pulls and syncs are answered with bursts of
/// packets, and one thread reads the sockets of every node of a process:
/// with the default buffer (~90 datagrams on Linux), a thousand-node
/// cluster forming on two cores lost tens of thousands of packets, and
/// members whose probes were lost were taken for dead.
const GOSSIP_RECV_BUFFER: usize = 1 << 20;

/// The gossip socket at `addr`, non-blocking, its receive buffer enlarged
/// where the system allows.
fn bind_gossip(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if let Err(error) = socket.set_recv_buffer_size(GOSSIP_RECV_BUFFER) {
        tracing::debug!(%error, "the gossip socket keeps its default receive buffer");
    }
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// The gossip's socket: UDP, or the in-memory network's datagrams (the
/// simulation's). The driver is the same on both.
#[derive(Debug)]
enum Socket {
    Udp(UdpSocket),
    Memory(crate::transport::memory::Datagrams),
}

impl Socket {
    /// Binds `addr` on `transport`; returns the socket and the runtime
    /// its task runs on: the process's gossip thread for UDP, the caller's
    /// runtime in memory (so a simulation's paused clock is the gossip's
    /// too).
    fn bind(
        addr: SocketAddr,
        transport: &Transport,
    ) -> io::Result<(Socket, tokio::runtime::Handle)> {
        match transport {
            Transport::Os => {
                let socket = bind_gossip(addr)?;
                let runtime = gossip_runtime()?;
                let socket = {
                    let _entered = runtime.enter();
                    UdpSocket::from_std(socket)?
                };
                Ok((Socket::Udp(socket), runtime))
            }
            Transport::Memory(net) => {
                let runtime = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
                Ok((Socket::Memory(net.bind_datagrams(addr)?), runtime))
            }
        }
    }

    async fn recv_from(&mut self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        match self {
            Socket::Udp(socket) => socket.recv_from(buf).await,
            Socket::Memory(socket) => socket.recv_from(buf).await,
        }
    }

    fn try_recv_from(&mut self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        match self {
            Socket::Udp(socket) => socket.try_recv_from(buf),
            Socket::Memory(socket) => socket.try_recv_from(buf),
        }
    }

    async fn send_to(&self, data: &[u8], to: SocketAddr) -> io::Result<usize> {
        match self {
            Socket::Udp(socket) => socket.send_to(data, to).await,
            Socket::Memory(socket) => socket.send_to(data, to),
        }
    }
}

/// The runtime the gossip of every node of this process runs on: one
/// thread of its own, started with the first node.
fn gossip_runtime() -> io::Result<tokio::runtime::Handle> {
    static RUNTIME: Mutex<Option<tokio::runtime::Handle>> = Mutex::new(None);
    let mut shared = RUNTIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(handle) = shared.as_ref() {
        return Ok(handle.clone());
    }
    let (ready, handle) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("mpreg-gossip".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => {
                    let _ = ready.send(Ok(runtime.handle().clone()));
                    runtime.block_on(std::future::pending::<()>());
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                }
            }
        })?;
    let handle = handle
        .recv()
        .map_err(|_| io::Error::other("the gossip thread stopped at start"))??;
    *shared = Some(handle.clone());
    Ok(handle)
}

/// The membership task, which runs on the gossip thread (see `start`).
#[derive(Debug)]
struct Task {
    abort: AbortHandle,
    /// Resolves (with an error) once the thread has finished and the socket
    /// is closed.
    finished: oneshot::Receiver<()>,
}

impl Task {
    fn abort(&self) {
        self.abort.abort();
    }

    async fn wait(&mut self) {
        let _ = (&mut self.finished).await;
    }
}

impl Membership {
    /// Binds UDP (or the in-memory network's datagrams, per `transport`)
    /// on `id.addr` and starts the membership task, offering `card`.
    /// Events arrive on the returned receiver.
    ///
    /// `id.addr` must be the address other nodes reach us at, with a real port
    /// (the one of the WebSocket listener, which keeps the number taken).
    pub(crate) async fn start(
        id: MemberId,
        card: Arc<[u8]>,
        config: MembershipConfig,
        transport: &Transport,
    ) -> io::Result<(Membership, mpsc::Receiver<MemberEvent>)> {
        if id.addr.port() == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "membership needs the node's real port, not 0",
            ));
        }
        let rng = SmallRng::try_from_rng(&mut rand::rngs::SysRng).map_err(io::Error::other)?;
        let core = Core::new(id, &config, rng, card.clone())?;
        // With UDP, failure detection runs on a thread and runtime of its
        // own, shared by the nodes of this process: a node whose workers are busy
        // (decoding a huge message, a handler that blocks) still answers
        // probes, so it is not declared dead; and a process with a hundred
        // nodes has one gossip thread, not a hundred.
        let (socket, runtime) = Socket::bind(id.addr, transport)?;

        let (events_tx, events_rx) = mpsc::channel(EVENTS_CAPACITY);
        let (commands_tx, commands_rx) = mpsc::channel(COMMANDS_CAPACITY);
        let (advert_tx, advert_rx) = watch::channel(Advert { id, card });
        let advert = Arc::new(advert_tx);
        let dropped = Arc::new(AtomicU64::new(0));

        let driver = Driver {
            core,
            events: events_tx,
            advert: Arc::clone(&advert),
            dropped: Arc::clone(&dropped),
        };
        let span = tracing::debug_span!("membership", addr = %id.addr);
        let (finished_tx, finished_rx) = oneshot::channel::<()>();
        let task = runtime.spawn(
            async move {
                // Dropped in this order however the task ends (aborted
                // too): the socket closes, then the waiters hear it.
                let mut closing = Closing {
                    socket,
                    _finished: finished_tx,
                };
                driver
                    .run(&mut closing.socket, commands_rx, advert_rx)
                    .await;
            }
            .instrument(span),
        );
        let abort = task.abort_handle();
        let task = Task {
            abort,
            finished: finished_rx,
        };
        let membership = Membership {
            commands: commands_tx,
            advert,
            dropped,
            task: Arc::new(Mutex::new(Some(task))),
        };
        Ok((membership, events_rx))
    }

    /// Asks the node at `addr` (UDP, same port number as its WebSocket) to let
    /// us in. Safe to call repeatedly: the caller retries seeds with backoff,
    /// so an announce that cannot be queued is dropped.
    pub(crate) fn announce(&self, addr: SocketAddr) {
        if let Err(error) = self.commands.try_send(Command::Announce(addr)) {
            tracing::debug!(%addr, %error, "announce not queued");
        }
    }

    /// Offers `card` from now on: our identity's version grows (past any
    /// version foca's renew may have taken), so every member fetches it.
    /// [`Membership::id`] tells the new identity.
    pub(crate) fn set_card(&self, card: Arc<[u8]>) {
        self.advert.send_modify(|advert| {
            advert.id.version = advert.id.version.saturating_add(1);
            advert.card = card;
        });
    }

    /// The members currently considered up (not including ourselves). Empty
    /// once the task has stopped.
    pub(crate) async fn members(&self) -> Vec<MemberId> {
        let (reply, members) = oneshot::channel();
        if self.commands.send(Command::Members(reply)).await.is_err() {
            return Vec::new();
        }
        members.await.unwrap_or_default()
    }

    /// Our current identity (including a version set by `set_card` that
    /// the task may not have gossiped yet).
    pub(crate) fn id(&self) -> MemberId {
        self.advert.borrow().id
    }

    /// Packets dropped because they were unauthenticated, malformed or
    /// meant for a previous identity of ours.
    pub(crate) fn dropped_packets(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Leaves the cluster gracefully (others see `Down` at once, not after
    /// suspicion), then stops the task and closes the socket. Takes at most
    /// [`LEAVE_TIMEOUT`]; past it the task is aborted.
    pub(crate) async fn leave(self) {
        let mut task = self.take_task();
        let stopped = tokio::time::timeout(LEAVE_TIMEOUT, async {
            // An error means the task is already gone: nothing to leave.
            let _ = self.commands.send(Command::Leave).await;
            match task.as_mut() {
                Some(task) => task.wait().await,
                // Another handle is leaving; wait until the task is gone.
                None => self.commands.closed().await,
            }
        })
        .await;
        if stopped.is_err() {
            // E.g. stuck on a full events channel nobody reads.
            tracing::warn!("membership task did not leave in time; aborting it");
            if let Some(task) = task {
                task.abort();
            }
        }
    }

    /// Takes the task's handle (only one caller gets it).
    fn take_task(&self) -> Option<Task> {
        // A poisoned lock only means another thread panicked while taking the
        // handle; the Option inside is still valid.
        match self.task.lock() {
            Ok(mut task) => task.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        }
    }

    /// Stops the task without leaving, as a crash would: the others must
    /// notice through probes and suspicion. Returns once the socket is closed.
    pub(crate) async fn kill(self) {
        if let Some(mut task) = self.take_task() {
            task.abort();
            task.wait().await;
        }
    }
}

/// What woke the membership task.
enum Wake {
    /// A datagram arrived (its length and sender), or receiving failed.
    Packet(io::Result<(usize, SocketAddr)>),
    /// A command, or `None` once every handle is gone.
    Command(Option<Command>),
    /// The wanted advert changed (`Err` if its sender is gone).
    Advert(Result<(), watch::error::RecvError>),
    /// A deadline of the core is due.
    Timer,
}

/// The membership task: the core, and where its output goes.
struct Driver {
    core: Core,
    /// Events to the cluster manager.
    events: mpsc::Sender<MemberEvent>,
    /// Shared advert, updated when foca renews our identity.
    advert: Arc<watch::Sender<Advert>>,
    /// Shared count of dropped packets.
    dropped: Arc<AtomicU64>,
}

impl Driver {
    /// The task's loop: runs until `leave` or until every handle is dropped
    /// (then it leaves too, so a node that forgets to leave still departs
    /// cleanly).
    async fn run(
        mut self,
        socket: &mut Socket,
        mut commands: mpsc::Receiver<Command>,
        mut wanted: watch::Receiver<Advert>,
    ) {
        // One byte more than foca accepts, so an oversized datagram is seen as
        // such (truncated to this length) and rejected, not cut and parsed.
        let mut buf = vec![0u8; MAX_PACKET_SIZE.get() + crate::auth::TAG_LEN + 1];
        loop {
            let next = self.core.next_deadline();
            let wake = tokio::select! {
                received = socket.recv_from(&mut buf) => Wake::Packet(received),
                command = commands.recv() => Wake::Command(command),
                changed = wanted.changed() => Wake::Advert(changed),
                () = sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                    Wake::Timer
                }
            };
            let now = Instant::now();
            match wake {
                Wake::Packet(Ok((len, from))) => {
                    let received = buf.get(..len).unwrap_or(&buf);
                    self.core.receive(from, received, now);
                }
                Wake::Packet(Err(error)) => {
                    tracing::debug!(%error, "receiving a membership packet failed");
                }
                Wake::Command(Some(Command::Announce(addr))) => self.core.announce(addr, now),
                Wake::Command(Some(Command::Members(reply))) => {
                    let _ = reply.send(self.core.members());
                }
                Wake::Advert(Ok(())) => {
                    let Advert { id, card } = wanted.borrow_and_update().clone();
                    self.core.change_identity(id, card, now);
                }
                Wake::Timer => {
                    // What arrived before the timers run is read first: in
                    // a busy process timers run late, and an ack waiting
                    // unread must not make a member that answered in time
                    // look dead.
                    for _ in 0..READ_BEFORE_TIMERS {
                        match socket.try_recv_from(&mut buf) {
                            Ok((len, from)) => {
                                let received = buf.get(..len).unwrap_or(&buf);
                                self.core.receive(from, received, now);
                            }
                            Err(error) => {
                                if error.kind() != io::ErrorKind::WouldBlock {
                                    tracing::debug!(%error, "receiving a membership packet failed");
                                }
                                break;
                            }
                        }
                    }
                    self.core.tick(now);
                }
                Wake::Command(Some(Command::Leave) | None) | Wake::Advert(Err(_)) => {
                    self.core.leave(now);
                    self.flush(socket).await;
                    tracing::debug!("left the cluster");
                    return;
                }
            }
            self.flush(socket).await;
        }
    }

    /// Sends what the core queued, and hands its events on.
    async fn flush(&mut self, socket: &Socket) {
        for (to, packet) in self.core.take_outbox() {
            if let Err(error) = socket.send_to(&packet, to).await {
                tracing::debug!(%to, %error, "sending a membership packet failed");
            }
        }
        if let Some(renewed) = self.core.take_renewed() {
            self.advert.send_if_modified(|wanted| {
                let newer =
                    (renewed.version, renewed.rejoin) > (wanted.id.version, wanted.id.rejoin);
                if newer {
                    wanted.id = renewed;
                }
                newer
            });
        }
        self.dropped.store(self.core.dropped(), Ordering::Relaxed);
        while let Some(event) = self.core.next_event() {
            // An error means nobody listens any more; keep the cluster
            // view running for `members()`.
            let _ = self.events.send(event).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::core::SwimFoca;
    use super::*;
    use foca::{AccumulatingRuntime, Foca, PostcardCodec};
    use std::net::TcpListener;
    use tokio::time::timeout;

    /// Only to stop a broken test from hanging; nothing is timed with it.
    const HANG_GUARD: Duration = Duration::from_secs(30);

    // ---- sans-IO: foca instances wired through memory ----

    /// One foca with its runtime and the view/events our driver would derive.
    struct SimNode {
        foca: SwimFoca,
        runtime: AccumulatingRuntime<MemberId>,
        view: MemberView,
        events: Vec<MemberEvent>,
    }

    impl SimNode {
        fn new(id: MemberId, seed: u64) -> Self {
            let config = MembershipConfig::for_tests().foca_config().expect("valid");
            Self {
                foca: Foca::new(id, config, SmallRng::seed_from_u64(seed), PostcardCodec),
                runtime: AccumulatingRuntime::new(),
                view: MemberView::default(),
                events: Vec::new(),
            }
        }

        /// Announces to `addr`, as `Membership::announce` does.
        fn announce(&mut self, addr: SocketAddr) {
            let seed = MemberId::placeholder(addr);
            self.foca
                .announce(seed, &mut self.runtime)
                .expect("announce");
        }

        /// Drains the runtime: returns the packets; timers are not fired.
        fn drain(&mut self) -> Vec<(MemberId, Vec<u8>)> {
            while self.runtime.to_schedule().is_some() {}
            while let Some(notification) = self.runtime.to_notify() {
                self.events.extend(self.view.apply(notification));
            }
            std::iter::from_fn(|| self.runtime.to_send())
                .map(|(to, data)| (to, data.to_vec()))
                .collect()
        }
    }

    /// Delivers packets between the nodes until none is left.
    fn settle(nodes: &mut [&mut SimNode]) {
        for _ in 0..64 {
            let packets: Vec<_> = nodes.iter_mut().flat_map(|node| node.drain()).collect();
            if packets.is_empty() {
                return;
            }
            for (to, data) in packets {
                if let Some(node) = nodes.iter_mut().find(|n| n.foca.identity().addr == to.addr) {
                    // Like the driver: a rejected packet is only dropped.
                    let _ = node.foca.handle_data(&data, &mut node.runtime);
                }
            }
        }
        panic!("the nodes kept talking without timers");
    }

    fn sim_id(port: u16, generation: u64) -> MemberId {
        MemberId {
            addr: SocketAddr::from(([10, 0, 0, 1], port)),
            generation,
            version: 1,
            rejoin: 0,
        }
    }

    #[test]
    fn sans_io_announce_gossip_and_leave() {
        let (a_id, b_id, c_id) = (sim_id(1, 1), sim_id(2, 1), sim_id(3, 1));
        let (mut a, mut b, mut c) = (
            SimNode::new(a_id, 1),
            SimNode::new(b_id, 2),
            SimNode::new(c_id, 3),
        );

        a.announce(b_id.addr);
        settle(&mut [&mut a, &mut b, &mut c]);
        assert_eq!(a.events, [MemberEvent::Up(b_id)]);
        assert_eq!(b.events, [MemberEvent::Up(a_id)]);

        // c joins through a; the feed tells c about b, gossip tells b about c.
        c.announce(a_id.addr);
        settle(&mut [&mut a, &mut b, &mut c]);
        a.foca.gossip(&mut a.runtime).expect("gossip");
        settle(&mut [&mut a, &mut b, &mut c]);
        for (node, others) in [(&a, [b_id, c_id]), (&b, [a_id, c_id]), (&c, [a_id, b_id])] {
            let mut members = node.view.members();
            members.sort_by_key(|m| m.addr);
            assert_eq!(members, others);
        }

        b.foca.leave_cluster(&mut b.runtime).expect("leave");
        settle(&mut [&mut a, &mut b, &mut c]);
        assert_eq!(a.events.last(), Some(&MemberEvent::Down(b_id)));
        assert_eq!(c.events.last(), Some(&MemberEvent::Down(b_id)));
        assert_eq!(a.view.members(), [c_id]);
    }

    #[test]
    fn sans_io_version_change_is_seen_as_changed() {
        let (a_id, b_id) = (sim_id(1, 1), sim_id(2, 1));
        let (mut a, mut b) = (SimNode::new(a_id, 1), SimNode::new(b_id, 2));
        b.announce(a_id.addr);
        settle(&mut [&mut a, &mut b]);

        let b2 = MemberId { version: 2, ..b_id };
        b.foca.change_identity(b2, &mut b.runtime).expect("change");
        settle(&mut [&mut a, &mut b]);
        // foca reports Rename(old, new) only: no Down, no Up.
        assert_eq!(
            a.events,
            [
                MemberEvent::Up(b_id),
                MemberEvent::Changed { old: b_id, new: b2 }
            ]
        );
        assert_eq!(a.view.members(), [b2]);
    }

    #[test]
    fn sans_io_restart_is_changed_or_up_after_down() {
        let (a_id, b_id) = (sim_id(1, 1), sim_id(2, 1));
        let mut a = SimNode::new(a_id, 1);
        let mut b = SimNode::new(b_id, 2);
        b.announce(a_id.addr);
        settle(&mut [&mut a, &mut b]);

        // Restarted before anyone noticed: the new generation replaces the old.
        let b2 = MemberId {
            generation: 2,
            ..b_id
        };
        let mut b = SimNode::new(b2, 3);
        b.announce(a_id.addr);
        settle(&mut [&mut a, &mut b]);
        assert_eq!(
            a.events.last(),
            Some(&MemberEvent::Changed { old: b_id, new: b2 })
        );

        // Down first (here: it left), then restarted: just Up, no Changed.
        b.foca.leave_cluster(&mut b.runtime).expect("leave");
        settle(&mut [&mut a, &mut b]);
        let b3 = MemberId {
            generation: 3,
            ..b_id
        };
        let mut b = SimNode::new(b3, 4);
        b.announce(a_id.addr);
        settle(&mut [&mut a, &mut b]);
        assert_eq!(
            a.events[2..],
            [MemberEvent::Down(b2), MemberEvent::Up(b3)],
            "all events: {:?}",
            a.events
        );
        assert_eq!(a.view.members(), [b3]);
    }

    #[test]
    fn view_tracks_the_up_set() {
        use OwnedNotification as N;
        let (x, y) = (sim_id(1, 1), sim_id(2, 1));
        let x2 = MemberId { version: 2, ..x };
        let mut view = MemberView::default();
        assert_eq!(view.apply(N::MemberUp(x)), Some(MemberEvent::Up(x)));
        assert_eq!(view.apply(N::MemberUp(x)), None);
        assert_eq!(
            view.apply(N::Rename(x, x2)),
            Some(MemberEvent::Changed { old: x, new: x2 })
        );
        assert_eq!(view.apply(N::MemberDown(x)), None, "stale id");
        assert_eq!(view.apply(N::MemberDown(x2)), Some(MemberEvent::Down(x2)));
        assert_eq!(
            view.apply(N::Rename(x2, x)),
            None,
            "rename of a down member"
        );
        assert_eq!(view.apply(N::MemberUp(y)), Some(MemberEvent::Up(y)));
        assert_eq!(view.apply(N::Idle), None);
        assert_eq!(view.members(), [y]);
    }

    #[test]
    fn newer_generation_then_version_then_rejoin_wins() {
        use foca::Identity;
        let old = sim_id(1, 5);
        let newer_version = MemberId { version: 9, ..old };
        let newer_generation = MemberId {
            generation: 6,
            version: 0,
            ..old
        };
        assert!(newer_version.win_addr_conflict(&old));
        assert!(!old.win_addr_conflict(&newer_version));
        assert!(newer_generation.win_addr_conflict(&newer_version));
        let rejoined = MemberId { rejoin: 1, ..old };
        assert_eq!(
            old.renew(),
            Some(rejoined),
            "a rejoin keeps the card's version"
        );
        assert!(rejoined.win_addr_conflict(&old));
        assert!(newer_version.win_addr_conflict(&rejoined));
        assert!(!MemberId::placeholder(old.addr).win_addr_conflict(&old));
    }

    #[test]
    fn an_identity_is_48_bytes() {
        // A node holds one per member in foca's list, the up view, the
        // filter of repeats and its wants: at a thousand members, every 8
        // bytes are ~0.07 MiB per node.
        assert_eq!(std::mem::size_of::<MemberId>(), 48);
    }

    #[test]
    fn bad_timings_are_rejected() {
        let mut config = MembershipConfig::for_tests();
        config.probe_rtt = config.probe_period;
        assert!(config.foca_config().is_err());
        assert!(MembershipConfig::default().foca_config().is_ok());
    }

    // ---- real UDP sockets on loopback ----

    /// A node's membership, on the port of a TCP listener it keeps open (as a
    /// node's WebSocket listener would).
    struct TestNode {
        membership: Membership,
        events: mpsc::Receiver<MemberEvent>,
        _tcp: TcpListener,
    }

    impl TestNode {
        async fn start(generation: u64) -> Self {
            let tcp = TcpListener::bind("127.0.0.1:0").expect("bind tcp");
            Self::start_on(tcp, generation).await
        }

        async fn start_on(tcp: TcpListener, generation: u64) -> Self {
            let addr = tcp.local_addr().expect("local addr");
            let id = MemberId {
                addr,
                generation,
                version: 1,
                rejoin: 0,
            };
            let card: Arc<[u8]> = Arc::from(format!("card of {addr}").into_bytes());
            let (membership, events) =
                Membership::start(id, card, MembershipConfig::for_tests(), &Transport::Os)
                    .await
                    .expect("start membership");
            Self {
                membership,
                events,
                _tcp: tcp,
            }
        }

        fn id(&self) -> MemberId {
            self.membership.id()
        }

        fn addr(&self) -> SocketAddr {
            self.membership.id().addr
        }

        /// Waits for an event matching `wanted`; returns it and those skipped.
        async fn expect_event(
            &mut self,
            what: &str,
            wanted: impl Fn(&MemberEvent) -> bool,
        ) -> (MemberEvent, Vec<MemberEvent>) {
            let mut skipped = Vec::new();
            let found = timeout(HANG_GUARD, async {
                loop {
                    match self.events.recv().await {
                        Some(event) if wanted(&event) => return event,
                        Some(event) => skipped.push(event),
                        None => panic!("events closed while waiting for {what}"),
                    }
                }
            })
            .await;
            match found {
                Ok(event) => (event, skipped),
                Err(_) => panic!("no {what} within {HANG_GUARD:?}; saw {skipped:?}"),
            }
        }
    }

    fn sorted(mut ids: Vec<MemberId>) -> Vec<MemberId> {
        ids.sort_by_key(|m| (m.addr, m.generation, m.version));
        ids
    }

    /// Polls `members()` until it is exactly `want`.
    async fn eventually_members(node: &Membership, want: &[MemberId]) {
        let want = sorted(want.to_vec());
        let mut last = Vec::new();
        let reached = timeout(HANG_GUARD, async {
            loop {
                last = sorted(node.members().await);
                if last == want {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            reached.is_ok(),
            "members never became {want:?}; last {last:?}"
        );
    }

    /// Announces to `seed` again and again (as the node's seed retry does)
    /// until `node` knows a member at that address.
    async fn join_via(node: &Membership, seed: SocketAddr) {
        let joined = timeout(HANG_GUARD, async {
            loop {
                node.announce(seed);
                for _ in 0..10 {
                    if node.members().await.iter().any(|m| m.addr == seed) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            }
        })
        .await;
        assert!(joined.is_ok(), "never joined via {seed}");
    }

    /// Three nodes joined through `a`, each seeing the other two.
    async fn three_nodes() -> (TestNode, TestNode, TestNode) {
        let a = TestNode::start(1).await;
        let b = TestNode::start(1).await;
        let c = TestNode::start(1).await;
        join_via(&b.membership, a.addr()).await;
        join_via(&c.membership, a.addr()).await;
        eventually_members(&a.membership, &[b.id(), c.id()]).await;
        eventually_members(&b.membership, &[a.id(), c.id()]).await;
        eventually_members(&c.membership, &[a.id(), b.id()]).await;
        (a, b, c)
    }

    #[tokio::test]
    async fn udp_join_card_change_and_leave() {
        let (mut a, mut b, mut c) = three_nodes().await;
        let (b_old, c_id) = (b.id(), c.id());

        b.membership.set_card(Arc::from(&b"new card"[..]));
        let b_new = MemberId {
            version: b_old.version + 1,
            ..b_old
        };
        assert_eq!(b.id(), b_new);
        for node in [&mut a, &mut c] {
            let changed = MemberEvent::Changed {
                old: b_old,
                new: b_new,
            };
            let (_, skipped) = node.expect_event("Changed(b)", |e| *e == changed).await;
            assert!(
                skipped.iter().all(|e| *e != MemberEvent::Down(b_old)),
                "a version change is not a Down: {skipped:?}"
            );
            // The new card is fetched from b.
            let card = MemberEvent::Card {
                id: b_new,
                card: Arc::from(&b"new card"[..]),
            };
            node.expect_event("b's new card", |e| *e == card).await;
        }
        eventually_members(&a.membership, &[b_new, c_id]).await;

        c.membership.leave().await;
        for node in [&mut a, &mut b] {
            node.expect_event("Down(c)", |e| *e == MemberEvent::Down(c_id))
                .await;
        }
        eventually_members(&a.membership, &[b.id()]).await;
    }

    #[tokio::test]
    async fn udp_cards_of_members_arrive() {
        let mut a = TestNode::start(1).await;
        let b = TestNode::start(1).await;
        join_via(&b.membership, a.addr()).await;
        let want = MemberEvent::Card {
            id: b.id(),
            card: Arc::from(format!("card of {}", b.addr()).into_bytes()),
        };
        a.expect_event("b's card", |e| *e == want).await;
    }

    #[tokio::test]
    async fn udp_crash_is_detected_and_restart_comes_back_up() {
        let (mut a, mut b, c) = three_nodes().await;
        let c_old = c.id();
        let TestNode {
            membership,
            _tcp: c_tcp,
            ..
        } = c;
        membership.kill().await;
        for node in [&mut a, &mut b] {
            node.expect_event("Down(c) after suspicion", |e| {
                *e == MemberEvent::Down(c_old)
            })
            .await;
        }

        // Restarted after it was declared down: a plain Up of the new identity.
        let c = TestNode::start_on(c_tcp, 2).await;
        let c_new = c.id();
        join_via(&c.membership, a.addr()).await;
        for node in [&mut a, &mut b] {
            let (_, skipped) = node
                .expect_event("Up(c new)", |e| *e == MemberEvent::Up(c_new))
                .await;
            assert!(
                skipped
                    .iter()
                    .all(|e| !matches!(e, MemberEvent::Changed { .. })),
                "{skipped:?}"
            );
        }
        eventually_members(&a.membership, &[b.id(), c_new]).await;
        eventually_members(&c.membership, &[a.id(), b.id()]).await;
    }

    #[tokio::test]
    async fn udp_quick_restart_replaces_the_old_identity() {
        let (mut a, b, c) = three_nodes().await;
        let c_old = c.id();
        let TestNode {
            membership,
            _tcp: c_tcp,
            ..
        } = c;
        membership.kill().await;
        let c = TestNode::start_on(c_tcp, 2).await;
        let c_new = c.id();
        join_via(&c.membership, a.addr()).await;

        // Typically `Changed { old, new }` (a has not suspected c yet). If
        // the old identity was declared down first, it is `Down` then `Up`.
        let (event, skipped) = a
            .expect_event("Changed(c) or Up(c new)", |e| {
                *e == MemberEvent::Changed {
                    old: c_old,
                    new: c_new,
                } || *e == MemberEvent::Up(c_new)
            })
            .await;
        if event == MemberEvent::Up(c_new) {
            assert!(skipped.contains(&MemberEvent::Down(c_old)), "{skipped:?}");
        }
        eventually_members(&a.membership, &[b.id(), c_new]).await;
        eventually_members(&b.membership, &[a.id(), c_new]).await;
    }

    #[tokio::test]
    async fn udp_announce_before_the_seed_is_up() {
        let seed_tcp = TcpListener::bind("127.0.0.1:0").expect("bind tcp");
        let seed_addr = seed_tcp.local_addr().expect("local addr");
        let b = TestNode::start(1).await;
        b.membership.announce(seed_addr); // nobody listens yet: lost
        assert!(b.membership.members().await.is_empty());

        let a = TestNode::start_on(seed_tcp, 1).await;
        join_via(&b.membership, seed_addr).await;
        eventually_members(&a.membership, &[b.id()]).await;
        eventually_members(&b.membership, &[a.id()]).await;
    }

    #[tokio::test]
    async fn udp_garbage_is_dropped_and_counted() {
        let mut a = TestNode::start(1).await;
        let b = TestNode::start(1).await;
        join_via(&b.membership, a.addr()).await;

        let sender = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let garbage: [&[u8]; 4] = [b"", b"hello", &[0xff; 64], &[7; 2000]];
        for packet in garbage {
            sender.send_to(packet, a.addr()).expect("send garbage");
        }
        let counted = timeout(HANG_GUARD, async {
            while a.membership.dropped_packets() < 4 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(
            counted.is_ok(),
            "dropped: {}",
            a.membership.dropped_packets()
        );

        // Still working: a new node joins.
        let c = TestNode::start(1).await;
        join_via(&c.membership, a.addr()).await;
        a.expect_event("Up(c)", |e| *e == MemberEvent::Up(c.id()))
            .await;
        eventually_members(&a.membership, &[b.id(), c.id()]).await;
    }
}
