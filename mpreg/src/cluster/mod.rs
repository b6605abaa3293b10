//! The cluster as one node sees it: its peers, what each offers, the links
//! to them, and where each command should run.
//!
//! Every node runs the same code. A peer is either a **member** (it
//! listens; found through membership, which also brings its card: what it
//! offers) or a **leaf** (it only dials out: it is served through the link
//! it opened, and this node, its gateway, offers the leaf's abilities as
//! its own). A member is routed to from its card alone; a link to it opens
//! when a command must go there, and closes once idle.

mod card;
mod handshake;
mod routes;
mod view;

pub(crate) use self::card::Card;

pub use self::view::{
    ClusterSummary, ClusterView, FunctionInfo, GossipStats, NodeStatus, NodeView, ParamInfo,
    SecurityStats,
};

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use self::handshake::{Acceptor, Dialer, Handshake, Outcome, Refusal};
use self::routes::{Candidate, Interner, Offer, Routes, choose, random_below};
use crate::auth;
use crate::budget::{Allowance, ResultBudget};
use crate::error::{ErrorCode, RpcError};
use crate::exec::{Dispatch, Job, Wanted, execute};
use crate::link::{
    self, Ability, Catalog, Hello, JobLimits, Link, LinkHandler, Opening, PEER_PROTOCOL,
    PRE_PROOF_MAX, PeerMessage,
};
use crate::membership::{MemberEvent, MemberId};
use crate::node::{NodeState, run_local};
use crate::payload::Payload;
use crate::plan::{Plan, Step};
use crate::registry::{Registry, Unavailable};
use crate::ws;

/// How long the other side of a new link may take to open it (proofs and
/// hellos).
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnection backoff: first delay, and the cap.
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The cap of the backoff between announces to a seed.
const ANNOUNCE_MAX: Duration = Duration::from_secs(1);

/// A peer, as a key local to this node.
pub(crate) type PeerKey = u64;

/// Where a command runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Target {
    /// On this node.
    Local,
    /// On a peer, over its link.
    Peer(PeerKey),
}

/// A member, as its card says.
#[derive(Debug)]
struct Member {
    /// Its key as a routing target (new for each generation).
    key: PeerKey,
    name: String,
    generation: u64,
    /// The version of the card below.
    version: u64,
    /// What it offers, interned.
    offers: Vec<Offer>,
}

impl Member {
    /// What it offers, as abilities (without descriptions).
    fn abilities(&self) -> Vec<Ability> {
        self.offers.iter().map(undescribed).collect()
    }
}

/// An offer as an ability without description.
fn undescribed(offer: &Offer) -> Ability {
    Ability {
        fun: offer.fun.to_string(),
        datasets: (*offer.datasets).clone(),
        idempotent: offer.idempotent,
        params: Vec::new(),
        returns: String::new(),
        doc: String::new(),
    }
}

/// An ability, interned.
fn offer(
    interner: &mut Interner,
    fun: &str,
    datasets: &BTreeSet<String>,
    idempotent: bool,
) -> Offer {
    let (fun, fun_id) = interner.name(fun);
    Offer {
        fun,
        fun_id,
        datasets: interner.datasets(datasets.clone()),
        idempotent,
    }
}

/// The members known by card, by address, and their keys.
#[derive(Debug, Default)]
struct Members {
    by_addr: HashMap<SocketAddr, Member>,
    by_key: HashMap<PeerKey, SocketAddr>,
}

/// A peer with a live link.
#[derive(Debug)]
pub(crate) struct Peer {
    pub(crate) name: String,
    /// Where it listens; `None` for a leaf.
    pub(crate) addr: Option<SocketAddr>,
    pub(crate) generation: u64,
    pub(crate) catalog: Catalog,
    pub(crate) link: Link,
    /// Whether this node dialed the link (decides which of two links
    /// between the same pair survives).
    pub(crate) dialed: bool,
}

impl Peer {
    fn is_leaf(&self) -> bool {
        self.addr.is_none()
    }
}

/// The cluster state of one node.
#[derive(Debug)]
pub(crate) struct Cluster {
    /// Members, from their cards.
    members: RwLock<Members>,
    /// Peers with a link (members this node talks to now, and leaves).
    peers: RwLock<HashMap<PeerKey, Peer>>,
    routes: RwLock<Arc<Routes<Target>>>,
    /// Names and dataset sets shared by members' offers and routes.
    interner: std::sync::Mutex<Interner>,
    next_key: AtomicU64,
    /// Our catalog's version: grows whenever what we offer changes.
    version: AtomicU64,
    /// Bumped on every change of routes (tests and tools wait on it).
    changes: watch::Sender<u64>,
    /// Peer links refused for failing the cluster secret check, or, with
    /// TLS, for a certificate: one not from this node's CA (presented to
    /// this node, or served by a peer it dialed), none from a peer that
    /// dialed, or this node's own when the peer it dialed refused it.
    pub(crate) refused: AtomicU64,
    /// Links being opened, by address: everyone who needs a link to that
    /// node waits for the same dial.
    dialing: std::sync::Mutex<HashMap<SocketAddr, Dialing>>,
    /// Peer tickets seen lately (replays are refused).
    pub(crate) tickets: auth::Tickets,
}

impl Default for Cluster {
    fn default() -> Self {
        Self {
            members: RwLock::new(Members::default()),
            peers: RwLock::new(HashMap::new()),
            routes: RwLock::new(Arc::new(Routes::default())),
            interner: std::sync::Mutex::new(Interner::default()),
            next_key: AtomicU64::new(1),
            version: AtomicU64::new(1),
            changes: watch::Sender::new(0),
            dialing: std::sync::Mutex::new(HashMap::new()),
            refused: AtomicU64::new(0),
            tickets: auth::Tickets::default(),
        }
    }
}

/// A dial in progress, shared by everyone waiting for it.
type Dialing = futures_util::future::Shared<BoxFuture<'static, Result<Link, Arc<str>>>>;

/// Why a peer whose link opened was not registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NotRegistered {
    /// Another link to the same node (same address and generation) is
    /// kept instead.
    Duplicate,
    /// Without a cluster secret, the peer claims the address of a peer
    /// whose link is still up: it may be an impostor, and the live peer
    /// stays until its link closes or membership declares it down.
    AddressInUse(SocketAddr),
}

impl NotRegistered {
    /// The reason in the close frame (no more than 123 bytes).
    fn reason(self) -> &'static str {
        match self {
            NotRegistered::Duplicate => "duplicate link",
            NotRegistered::AddressInUse(_) => {
                "a live peer has this address; a node that restarted must retry once its old link closed"
            }
        }
    }
}

/// Why the opening of a link failed.
#[derive(Debug)]
enum OpenError {
    /// This side refused the other.
    Refused(Refusal),
    /// A message over [`PRE_PROOF_MAX`] bytes before the other side proved
    /// itself (never decoded).
    TooLarge(usize),
    /// Not a peer message.
    Invalid,
    /// The other side closed the connection, with this reason if any.
    Closed(String),
    /// The other side took longer than [`HELLO_TIMEOUT`].
    TimedOut,
    /// The connection failed.
    Transport(String),
}

impl OpenError {
    /// The close frame this side sends (refusals only).
    fn close_frame(&self) -> Option<CloseFrame> {
        let (code, reason) = match self {
            OpenError::Refused(r) => (CloseCode::Policy, r.to_string()),
            OpenError::TooLarge(_) => (
                CloseCode::Size,
                format!("a peer message before its proof must be at most {PRE_PROOF_MAX} bytes"),
            ),
            OpenError::Invalid => (CloseCode::Policy, "not a peer message".to_owned()),
            _ => return None,
        };
        Some(CloseFrame {
            code,
            reason: reason.into(),
        })
    }

    /// Whether this counts as a refused peer link.
    fn refused(&self) -> bool {
        matches!(
            self,
            OpenError::Refused(_) | OpenError::TooLarge(_) | OpenError::Invalid
        )
    }
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Refused(r) => write!(f, "refused: {r}"),
            OpenError::TooLarge(n) => write!(
                f,
                "refused: a {n}-byte message before its proof (at most {PRE_PROOF_MAX})"
            ),
            OpenError::Invalid => f.write_str("refused: not a peer message"),
            OpenError::Closed(reason) if reason.is_empty() => {
                f.write_str("the other side closed the connection")
            }
            OpenError::Closed(reason) => {
                write!(f, "the other side closed the connection: {reason}")
            }
            OpenError::TimedOut => write!(f, "no answer within {} s", HELLO_TIMEOUT.as_secs()),
            OpenError::Transport(e) => write!(f, "connection failed: {e}"),
        }
    }
}

impl std::error::Error for OpenError {}

/// Runs one side of a link's opening over a connection: sends what
/// `outcome` says, reads the other side's messages into `side`, until a
/// verdict. `proven` runs once, when the other side has proven the secret
/// (at once without one). Messages before that are at most
/// [`PRE_PROOF_MAX`] bytes; all are decoded into the opening's typed
/// messages only ([`link::decode_opening`]). The caller bounds it in time.
async fn open_link<H, Si, St>(
    side: &mut H,
    mut outcome: Outcome,
    sink: &mut Si,
    source: &mut St,
    mut proven: impl FnMut(),
) -> Result<Hello, OpenError>
where
    H: Handshake,
    Si: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
    St: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    use futures_util::SinkExt;
    let mut was_proven = false;
    loop {
        if !was_proven && side.proven() {
            was_proven = true;
            proven();
        }
        let (send, linked) = match outcome {
            Outcome::Send(send) => (send, None),
            Outcome::Linked { send, theirs } => (send, Some(theirs)),
            Outcome::Refused(r) => return Err(OpenError::Refused(r)),
        };
        for message in send {
            sink.feed(message.encode())
                .await
                .map_err(|e| OpenError::Transport(e.to_string()))?;
        }
        sink.flush()
            .await
            .map_err(|e| OpenError::Transport(e.to_string()))?;
        if let Some(theirs) = linked {
            return Ok(*theirs);
        }
        let message = loop {
            match source.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Close(frame))) => {
                    return Err(OpenError::Closed(
                        frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                    ));
                }
                Some(Ok(m)) => break m,
                Some(Err(e)) => return Err(OpenError::Transport(e.to_string())),
                None => return Err(OpenError::Closed(String::new())),
            }
        };
        let size = message.len();
        if !side.proven() && size > PRE_PROOF_MAX {
            return Err(OpenError::TooLarge(size));
        }
        let decoded = crate::ws::cpu_bound(size, move || link::decode_opening(&message)).await;
        let Some(Some(Ok(message))) = decoded else {
            return Err(OpenError::Invalid);
        };
        outcome = side.receive(message);
    }
}

/// Which places a placement may choose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    /// Anywhere in the cluster (a client's request).
    Cluster,
    /// This node and its leaves only (a job a peer routed here).
    Here,
}

impl Cluster {
    fn read_peers(&self) -> std::sync::RwLockReadGuard<'_, HashMap<PeerKey, Peer>> {
        // Never held across an await or a panic-prone call.
        self.peers.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_peers(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<PeerKey, Peer>> {
        self.peers.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn routes(&self) -> Arc<Routes<Target>> {
        self.routes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn read_members(&self) -> std::sync::RwLockReadGuard<'_, Members> {
        self.members.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_members(&self) -> std::sync::RwLockWriteGuard<'_, Members> {
        self.members.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// A usable link to the peer `key` (a member or a leaf), if one is
    /// open.
    pub(crate) fn link(&self, key: PeerKey) -> Option<Link> {
        let member = self.read_members().by_key.get(&key).copied();
        let peers = self.read_peers();
        let link = match member {
            Some(addr) => peers
                .values()
                .find(|p| p.addr == Some(addr) && p.link.is_usable())
                .map(|p| &p.link),
            None => peers.get(&key).map(|p| &p.link),
        };
        link.filter(|l| l.is_usable()).cloned()
    }

    /// The address and name of the member `key`, if it is one.
    fn member_addr(&self, key: PeerKey) -> Option<(SocketAddr, String)> {
        let members = self.read_members();
        let addr = *members.by_key.get(&key)?;
        let name = members.by_addr.get(&addr)?.name.clone();
        Some((addr, name))
    }

    /// Takes the card of member `id` (a newer one than held, or the first
    /// of a new generation, which replaces the old); returns whether
    /// routing changed. A card that does not decode is logged and left
    /// out.
    pub(crate) fn take_card(&self, id: MemberId, card: &[u8]) -> bool {
        let Some(card) = Card::decode(card) else {
            tracing::warn!(addr = %id.addr, "a member's card does not decode; ignoring it");
            return false;
        };
        let mut members = self.write_members();
        if let Some(held) = members.by_addr.get_mut(&id.addr) {
            if (held.generation, held.version) >= (id.generation, id.version) {
                return false;
            }
            if held.generation == id.generation {
                held.version = id.version;
                held.name = card.name.clone();
                held.offers = self.offers_of(&card);
                return true;
            }
            let old = held.key;
            members.by_key.remove(&old);
        }
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        members.by_key.insert(key, id.addr);
        members.by_addr.insert(
            id.addr,
            Member {
                key,
                name: card.name.clone(),
                generation: id.generation,
                version: id.version,
                offers: self.offers_of(&card),
            },
        );
        true
    }

    /// What `card` offers, interned.
    fn offers_of(&self, card: &Card) -> Vec<Offer> {
        let mut interner = self.interner.lock().unwrap_or_else(PoisonError::into_inner);
        card.functions
            .iter()
            .map(|f| {
                let datasets: BTreeSet<String> = f
                    .datasets
                    .iter()
                    .filter_map(|&i| card.datasets.get(i as usize).cloned())
                    .collect();
                offer(&mut interner, &f.name, &datasets, f.idempotent)
            })
            .collect()
    }

    /// A receiver that sees a new value whenever routing changes.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Our catalog: our own functions plus our leaves' abilities.
    pub(crate) fn catalog(&self, registry: &Registry) -> Catalog {
        let mut functions: Vec<Ability> = registry
            .iter()
            .filter(|f| f.advertised)
            .map(Ability::of)
            .collect();
        for peer in self.read_peers().values().filter(|p| p.is_leaf()) {
            functions.extend(peer.catalog.functions.iter().cloned());
        }
        functions.sort();
        functions.dedup();
        Catalog {
            version: self.version.load(Ordering::Relaxed),
            functions,
        }
    }

    /// Recomputes the routes from our registry, every member's card and
    /// every leaf's catalog.
    pub(crate) fn rebuild(&self, registry: &Registry) {
        let table = {
            let mut interner = self.interner.lock().unwrap_or_else(PoisonError::into_inner);
            let own: Vec<Offer> = registry
                .iter()
                .map(|f| offer(&mut interner, &f.name, &f.datasets, f.idempotent))
                .collect();
            let members = self.read_members();
            // Leaves are known by their link; and a node that is no member
            // (itself a leaf) knows its gateways by their links too.
            let linked: Vec<(PeerKey, bool, Vec<Offer>)> = self
                .read_peers()
                .iter()
                .filter(|(_, p)| {
                    !p.link.is_closed() && !p.addr.is_some_and(|a| members.by_addr.contains_key(&a))
                })
                .map(|(&key, p)| {
                    let offers = p
                        .catalog
                        .functions
                        .iter()
                        .map(|a| offer(&mut interner, &a.fun, &a.datasets, a.idempotent))
                        .collect();
                    (key, p.is_leaf(), offers)
                })
                .collect();
            let places = std::iter::once((Target::Local, false, &own[..]))
                .chain(
                    members
                        .by_addr
                        .values()
                        .map(|m| (Target::Peer(m.key), false, &m.offers[..])),
                )
                .chain(
                    linked
                        .iter()
                        .map(|(key, leaf, offers)| (Target::Peer(*key), *leaf, &offers[..])),
                );
            let table = Routes::build(interner.names(), places);
            drop(members);
            drop(linked);
            drop(own);
            interner.prune();
            table
        };
        *self.routes.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(table);
        self.changes.send_modify(|v| *v += 1);
    }

    /// How many nodes this node knows (itself included), how many it has a
    /// link to, and how many datasets they have: no copy of the view, for
    /// polling (counting the datasets is one pass over the routes).
    pub(crate) fn summary(&self) -> ClusterSummary {
        let members = self.read_members();
        let peers = self.read_peers();
        let others = peers
            .values()
            .filter(|p| !p.addr.is_some_and(|a| members.by_addr.contains_key(&a)))
            .count();
        ClusterSummary {
            nodes: 1 + members.by_addr.len() + others,
            linked: peers.values().filter(|p| !p.link.is_closed()).count(),
            datasets: self.routes().datasets(),
        }
    }

    /// The places that can run `fun` with every dataset in `locs`, within
    /// `scope`, leaving out `exclude`.
    fn candidates(
        &self,
        state: &NodeState,
        fun: &str,
        locs: &[String],
        scope: Scope,
        exclude: Option<Target>,
    ) -> Result<Vec<Candidate<Target>>, RpcError> {
        let routes = self.routes();
        let Some(all) = routes.get(fun) else {
            return Err(Unavailable::NoFunction.error(fun, locs));
        };
        let candidates: Vec<Candidate<Target>> = all
            .iter()
            .filter(|r| scope == Scope::Cluster || r.target == Target::Local || r.via_leaf)
            .filter(|r| Some(r.target) != exclude)
            .filter(|r| locs.iter().all(|d| r.datasets.contains(d)))
            .map(|r| Candidate {
                target: r.target,
                load: self.load(state, r.target),
                local: r.target == Target::Local,
            })
            .collect();
        if candidates.is_empty() {
            return Err(Unavailable::MissingDatasets.error(fun, locs));
        }
        Ok(candidates)
    }

    fn load(&self, state: &NodeState, target: Target) -> usize {
        match target {
            Target::Local => state.local_load(),
            // A member without a link has nothing in flight from here.
            Target::Peer(key) => self.link(key).map_or(0, |l| l.load()),
        }
    }

    /// Whether every function of `job` is safe to run again.
    fn idempotent(&self, job: &Job) -> bool {
        let routes = self.routes();
        job.steps.iter().all(|s| {
            routes
                .get(&s.fun)
                .is_some_and(|rs| rs.iter().all(|r| r.idempotent))
        })
    }

    /// Adds a peer whose link just opened, unless it duplicates a better
    /// link to the same node, or (`proven` false: no cluster secret vouches
    /// for it) claims the address of a peer whose link is still up. Returns
    /// its key, or why the new link must close.
    fn register(
        &self,
        me: Option<SocketAddr>,
        hello: Hello,
        link: Link,
        dialed: bool,
        proven: bool,
    ) -> Result<PeerKey, NotRegistered> {
        let mut peers = self.write_peers();
        if let Some(addr) = hello.addr {
            let existing = peers
                .iter()
                .find(|(_, p)| p.addr == Some(addr))
                .map(|(k, p)| (*k, p.generation, p.dialed, !p.link.is_usable()));
            if let Some((key, generation, old_dialed, old_closed)) = existing {
                if !proven && !old_closed {
                    // Anyone can claim any address without a secret: the
                    // live link stays until it closes or membership
                    // declares its node down (a restarted node's old link
                    // closes with its process; the new one retries).
                    return Err(if generation == hello.generation {
                        NotRegistered::Duplicate
                    } else {
                        NotRegistered::AddressInUse(addr)
                    });
                }
                let replace = old_closed
                    || if generation != hello.generation {
                        // A restarted node replaces its old self, never the
                        // reverse.
                        hello.generation > generation
                    } else {
                        // Two links between the same pair: both sides keep the
                        // one dialed by the lower address.
                        let dialer_is_me = |d: bool| d;
                        let lower_is_me = me.is_some_and(|m| m < addr);
                        dialer_is_me(dialed) == lower_is_me
                            && dialer_is_me(old_dialed) != lower_is_me
                    };
                if !replace {
                    return Err(NotRegistered::Duplicate);
                }
                if let Some(old) = peers.remove(&key) {
                    old.link.close();
                }
            }
        }
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        peers.insert(
            key,
            Peer {
                name: hello.name,
                addr: hello.addr,
                generation: hello.generation,
                catalog: hello.catalog,
                link,
                dialed,
            },
        );
        Ok(key)
    }

    /// Forgets a peer (its link closed).
    fn remove(&self, key: PeerKey) -> Option<Peer> {
        self.write_peers().remove(&key)
    }

    /// Forgets the member at `addr` and closes its links, unless newer
    /// than `generation` (it failed, left or restarted).
    pub(crate) fn drop_member(&self, addr: SocketAddr, generation: u64) {
        {
            let mut members = self.write_members();
            let old = members
                .by_addr
                .get(&addr)
                .filter(|m| m.generation <= generation)
                .map(|m| m.key);
            if let Some(key) = old {
                members.by_addr.remove(&addr);
                members.by_key.remove(&key);
            }
        }
        for p in self.read_peers().values() {
            if p.addr == Some(addr) && p.generation <= generation {
                p.link.close();
            }
        }
    }

    /// Marks our catalog as changed.
    pub(crate) fn bump_version(&self) {
        self.version.fetch_add(1, Ordering::Relaxed);
    }

    /// Who must hear of a change of our catalog over a link: a member's
    /// leaves (members read the card), or a leaf's gateways.
    pub(crate) fn catalog_listeners(&self, member: bool) -> Vec<Link> {
        self.read_peers()
            .values()
            .filter(|p| !member || p.is_leaf())
            .map(|p| p.link.clone())
            .collect()
    }

    /// Closes every link (the node is stopping).
    pub(crate) fn close_all(&self) {
        for p in self.read_peers().values() {
            p.link.close();
        }
    }

    /// Members known by card.
    pub(crate) fn members(&self) -> usize {
        self.read_members().by_addr.len()
    }

    /// Whether there is a live link to the node at `addr`.
    pub(crate) fn linked(&self, addr: SocketAddr) -> bool {
        self.read_peers()
            .values()
            .any(|p| p.addr == Some(addr) && !p.link.is_closed())
    }

    /// Every function in the cluster as this node knows it without asking
    /// anyone (descriptions where at hand): what the status page shows.
    pub(crate) fn functions(&self, state: &NodeState) -> Value {
        let (by_fun, _) = function_table(&self.places(state));
        Value::Array(by_fun.into_values().collect())
    }

    /// Every place a function runs, as this node knows it: its own
    /// functions (described), the members' (from their cards: names,
    /// datasets, idempotent) and its leaves' (described), each with the
    /// node's name and, for a peer, its key.
    fn places(&self, state: &NodeState) -> Vec<(String, Option<PeerKey>, Ability)> {
        let registry = state.registry();
        let mut places: Vec<(String, Option<PeerKey>, Ability)> = registry
            .iter()
            .map(|f| (state.name.clone(), None, Ability::of(f)))
            .collect();
        let members = self.read_members();
        for m in members.by_addr.values() {
            places.extend(
                m.offers
                    .iter()
                    .map(|o| (m.name.clone(), Some(m.key), undescribed(o))),
            );
        }
        for (&key, p) in self.read_peers().iter() {
            let by_card = p.addr.is_some_and(|a| members.by_addr.contains_key(&a));
            if !by_card {
                places.extend(
                    p.catalog
                        .functions
                        .iter()
                        .map(|a| (p.name.clone(), Some(key), a.clone())),
                );
            }
        }
        places
    }

    /// The cluster as this node sees it (what `mpreg.cluster` returns).
    pub(crate) fn view(&self, state: &NodeState) -> ClusterView {
        let registry = state.registry();
        // Everything served here, local-only functions included.
        let mut own = self.catalog(&registry).functions;
        own.extend(registry.iter().filter(|f| !f.advertised).map(Ability::of));
        own.sort();
        let info = |functions: &[Ability]| functions.iter().map(FunctionInfo::from).collect();
        let mut nodes = vec![NodeView {
            name: state.name.clone(),
            addr: state.advertise,
            status: NodeStatus::This,
            generation: state.generation,
            load: state.local_load(),
            jobs_sent: None,
            linked: false,
            functions: info(&own),
            gossip: state.membership.as_ref().map(|m| GossipStats {
                identity_version: m.id().version,
                dropped_packets: m.dropped_packets(),
            }),
            security: Some(SecurityStats {
                refused_peer_links: self.refused.load(Ordering::Relaxed),
            }),
        }];
        let members = self.read_members();
        let peers = self.read_peers();
        let link_to = |addr: SocketAddr| {
            peers
                .values()
                .find(|p| p.addr == Some(addr) && !p.link.is_closed())
                .map(|p| &p.link)
        };
        let mut others: Vec<NodeView> = members
            .by_addr
            .iter()
            .map(|(&addr, m)| {
                let link = link_to(addr);
                NodeView {
                    name: m.name.clone(),
                    addr: Some(addr),
                    status: NodeStatus::Up,
                    generation: m.generation,
                    load: link.map_or(0, Link::load),
                    jobs_sent: link.map(Link::jobs_sent),
                    linked: link.is_some(),
                    functions: info(&m.abilities()),
                    gossip: None,
                    security: None,
                }
            })
            .collect();
        others.extend(
            peers
                .values()
                .filter(|p| !p.addr.is_some_and(|a| members.by_addr.contains_key(&a)))
                .map(|p| NodeView {
                    name: p.name.clone(),
                    addr: p.addr,
                    status: if p.is_leaf() {
                        NodeStatus::Leaf
                    } else {
                        NodeStatus::Up
                    },
                    generation: p.generation,
                    load: p.link.load(),
                    jobs_sent: Some(p.link.jobs_sent()),
                    linked: true,
                    functions: info(&p.catalog.functions),
                    gossip: None,
                    security: None,
                }),
        );
        others.sort_by(|a, b| a.name.cmp(&b.name));
        nodes.extend(others);
        ClusterView {
            self_name: state.name.clone(),
            nodes,
        }
    }
}

/// Every function in the cluster as this node sees it, described, with the
/// nodes that run it (what `mpreg.functions` returns). Members' cards carry
/// no descriptions: a function described nowhere at hand is described by
/// one node that runs it (`mpreg.describe`, over a link), at most
/// [`DESCRIBE_AT_ONCE`] nodes asked at once; a node that cannot answer
/// leaves its functions undescribed.
pub(crate) async fn describe_functions(state: &Arc<NodeState>) -> Value {
    let places = state.cluster.places(state);
    let (mut by_fun, mut described) = function_table(&places);
    // One node to ask per function still undescribed, each node once.
    let mut ask: HashMap<PeerKey, Vec<String>> = HashMap::new();
    for (_, key, a) in &places {
        if let Some(key) = key
            && !described.contains(&a.fun)
        {
            described.insert(a.fun.clone());
            ask.entry(*key).or_default().push(a.fun.clone());
        }
    }
    let placer = Placer {
        state: state.clone(),
        scope: Scope::Cluster,
        deadline: Instant::now() + DESCRIBE_TIMEOUT,
        trace: Arc::from("mpreg.functions"),
        budget: ResultBudget::new(state.config.reply_budget(), state.inflight_bytes.clone()),
    };
    let answers = futures_util::stream::iter(ask)
        .map(|(key, names)| {
            let placer = placer.clone();
            async move {
                let step = Step {
                    name: "describe".to_owned(),
                    fun: DESCRIBE.to_owned(),
                    args: vec![crate::plan::Arg::Value(Payload::from(json!(names)))],
                    kwargs: Vec::new(),
                    locs: Vec::new(),
                    deps: Vec::new(),
                };
                let job = Job {
                    steps: vec![step],
                    outputs: vec![0],
                };
                attempt(&placer, key, &job).await
            }
        })
        .buffer_unordered(DESCRIBE_AT_ONCE)
        .collect::<Vec<_>>()
        .await;
    for answer in answers {
        let Ok(values) = answer else { continue };
        for value in values {
            let abilities = value
                .into_value()
                .ok()
                .and_then(|v| serde_json::from_value::<Vec<Ability>>(v).ok());
            let Some(abilities) = abilities else { continue };
            for a in abilities {
                if let Some(entry) = by_fun.get_mut(&a.fun) {
                    entry["params"] = json!(a.params);
                    entry["returns"] = json!(a.returns);
                    entry["doc"] = json!(a.doc);
                }
            }
        }
    }
    Value::Array(by_fun.into_values().collect())
}

/// Every function at hand (see [`Cluster::places`]), by name, as
/// `mpreg.functions` lists it, described where a place describes it; and
/// the names of those described.
fn function_table(
    places: &[(String, Option<PeerKey>, Ability)],
) -> (std::collections::BTreeMap<String, Value>, BTreeSet<String>) {
    let mut by_fun: std::collections::BTreeMap<String, Value> = std::collections::BTreeMap::new();
    let mut described: BTreeSet<String> = BTreeSet::new();
    for (node, _, a) in places {
        let entry = by_fun.entry(a.fun.clone()).or_insert_with(|| {
            json!({
                "name": a.fun,
                "params": a.params,
                "returns": a.returns,
                "doc": a.doc,
                "idempotent": a.idempotent,
                "nodes": [],
            })
        });
        // The first place that describes the function gives its
        // description (a runtime function may have none).
        if !a.doc.is_empty() || !a.params.is_empty() || !a.returns.is_empty() {
            if !described.contains(&a.fun) {
                entry["params"] = json!(a.params);
                entry["returns"] = json!(a.returns);
                entry["doc"] = json!(a.doc);
            }
            described.insert(a.fun.clone());
        }
        if let Some(nodes) = entry["nodes"].as_array_mut() {
            nodes.push(json!({ "node": node, "datasets": a.datasets }));
        }
    }
    (by_fun, described)
}

/// The built-in that describes functions of the node it runs on (local
/// only, not advertised): `mpreg.functions` asks it of peers.
pub(crate) const DESCRIBE: &str = "mpreg.describe";
/// How long `mpreg.functions` waits for descriptions.
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Nodes asked for descriptions at once.
const DESCRIBE_AT_ONCE: usize = 16;

/// Places and runs the commands of one request (or of one job a peer
/// sent), within its deadline.
#[derive(Debug, Clone)]
pub(crate) struct Placer {
    pub(crate) state: Arc<NodeState>,
    pub(crate) scope: Scope,
    pub(crate) deadline: Instant,
    /// The request's id, carried to peers so one request can be followed
    /// across the cluster's logs.
    pub(crate) trace: Arc<str>,
    /// The bytes of results the request (or job) may hold.
    pub(crate) budget: Arc<ResultBudget>,
}

impl Dispatch for Placer {
    type Target = Target;

    fn place(&self, step: &Step) -> Result<Target, RpcError> {
        let candidates =
            self.state
                .cluster
                .candidates(&self.state, &step.fun, &step.locs, self.scope, None)?;
        let pick = choose(&candidates, random_below).unwrap_or(0);
        Ok(candidates[pick].target)
    }

    fn ships_chains(&self, target: &Target) -> bool {
        matches!(target, Target::Peer(_))
    }

    fn run(&self, target: Target, job: Job) -> BoxFuture<'static, Result<Vec<Payload>, RpcError>> {
        match target {
            Target::Local => run_local(self, job),
            Target::Peer(key) => Box::pin(run_remote(self.clone(), key, job)),
        }
    }
}

/// Runs a job on a peer. If the peer is lost and every function of the
/// job is idempotent, runs it once more elsewhere.
async fn run_remote(placer: Placer, key: PeerKey, job: Job) -> Result<Vec<Payload>, RpcError> {
    let cluster = &placer.state.cluster;
    // The job is encoded from a borrow, so it is still here for a retry.
    let retry = cluster.idempotent(&job);
    let first = attempt(&placer, key, &job).await;
    let Err(e) = &first else {
        return first;
    };
    if !retry || e.code != ErrorCode::NodeLost {
        return first;
    }
    // Somewhere else that can run every step of the job.
    let mut options: Option<Vec<Candidate<Target>>> = None;
    for step in &job.steps {
        let here = cluster
            .candidates(
                &placer.state,
                &step.fun,
                &step.locs,
                placer.scope,
                Some(Target::Peer(key)),
            )
            .unwrap_or_default();
        options = Some(match options {
            None => here,
            Some(prev) => prev
                .into_iter()
                .filter(|c| here.iter().any(|h| h.target == c.target))
                .collect(),
        });
    }
    let options = options.unwrap_or_default();
    let Some(pick) = choose(&options, random_below) else {
        return first;
    };
    tracing::debug!(error = %e, "retrying an idempotent job on another node");
    let target = options[pick].target;
    match target {
        Target::Local => run_local(&placer, job).await,
        // Boxed: a retry is rare, and its state would otherwise double
        // that of every forwarded job.
        Target::Peer(other) => Box::pin(attempt(&placer, other, &job)).await,
    }
}

async fn attempt(placer: &Placer, key: PeerKey, job: &Job) -> Result<Vec<Payload>, RpcError> {
    // A link that starts closing for being idle just as the job would go
    // takes no job (nothing was sent): a fresh link to the node does.
    for _ in 0..3 {
        let link = match placer.state.cluster.link(key) {
            Some(link) => link,
            None => connect(&placer.state, key, placer.deadline).await?,
        };
        let Some(slot) = link.reserve() else {
            continue;
        };
        let left = placer.deadline.saturating_duration_since(Instant::now());
        let limits = JobLimits {
            max_message: placer.state.config.max_message_size,
            // What the job's results may add to what the request holds.
            budget: placer.budget.left(),
        };
        let values = link.run_job(slot, job, left, &placer.trace, limits).await?;
        // The peer kept within `budget`; other parts of the request may
        // have taken some of it meanwhile.
        return values
            .into_iter()
            .map(|v| {
                let bytes = v.json_len();
                Payload::held(v, bytes, &placer.budget)
            })
            .collect();
    }
    Err(RpcError::new(
        ErrorCode::NodeLost,
        "every link to the node closed before the call could go",
    ))
}

/// Opens a link to the member `key` (or waits for the dial another call
/// started), within `deadline`: links open when a command must go there.
async fn connect(
    state: &Arc<NodeState>,
    key: PeerKey,
    deadline: Instant,
) -> Result<Link, RpcError> {
    let Some((addr, name)) = state.cluster.member_addr(key) else {
        return Err(RpcError::new(
            ErrorCode::NodeLost,
            "the node left before the call",
        ));
    };
    let dialing = {
        let mut dialing = state
            .cluster
            .dialing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        dialing
            .entry(addr)
            .or_insert_with(|| {
                let state = state.clone();
                let dial: BoxFuture<'static, Result<Link, Arc<str>>> = Box::pin(async move {
                    let url = format!("{}://{addr}", state.tls.scheme());
                    let linked = dial(&state, &url).await.map(|(_, link)| link);
                    state
                        .cluster
                        .dialing
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&addr);
                    linked.map_err(Arc::from)
                });
                futures_util::FutureExt::shared(dial)
            })
            .clone()
    };
    match tokio::time::timeout_at(deadline, dialing).await {
        Ok(Ok(link)) => Ok(link),
        Ok(Err(e)) => Err(RpcError::new(
            ErrorCode::NodeLost,
            format!("cannot link to node '{name}' at {addr}: {e}"),
        )),
        Err(_) => Err(RpcError::new(
            ErrorCode::Timeout,
            format!("no link to node '{name}' at {addr} before the deadline"),
        )),
    }
}

/// Serves a peer's messages for this node.
struct Served {
    state: Arc<NodeState>,
    key: PeerKey,
}

impl LinkHandler for Served {
    fn run(
        &self,
        job: Job,
        timeout: Duration,
        trace: Option<String>,
        budget: Option<u64>,
    ) -> BoxFuture<'static, Result<Vec<Payload>, RpcError>> {
        let trace: Arc<str> = trace.unwrap_or_default().into();
        let span = tracing::debug_span!("job", node = %self.state.name, id = %trace, steps = job.steps.len());
        // What the sender accepts, within this node's own budgets.
        let config = &self.state.config;
        let limit = budget
            .map_or(usize::MAX, |b| usize::try_from(b).unwrap_or(usize::MAX))
            .min(config.reply_budget())
            .min(config.max_message_size);
        let placer = Placer {
            state: self.state.clone(),
            scope: Scope::Here,
            deadline: crate::node::far_enough(timeout),
            trace,
            budget: ResultBudget::new(limit, self.state.inflight_bytes.clone()),
        };
        Box::pin(tracing::Instrument::instrument(
            async move {
                if let Some(bad) = job.outputs.iter().find(|&&o| o >= job.steps.len()) {
                    return Err(RpcError::bad_request(format!(
                        "job output {bad} names no step (the job has {})",
                        job.steps.len()
                    )));
                }
                let plan = Plan::from_steps(job.steps)?;
                let run = execute(plan, &placer, Wanted::These(job.outputs));
                match tokio::time::timeout(timeout, run).await {
                    Ok(out) => Ok(out?.into_iter().map(|(_, v)| v).collect()),
                    Err(_) => Err(RpcError::new(
                        ErrorCode::Timeout,
                        format!("job did not finish within {} ms", timeout.as_millis()),
                    )),
                }
            },
            span,
        ))
    }

    fn max_answer(&self) -> usize {
        self.state.config.max_message_size
    }

    fn catalog(&self, catalog: Catalog) {
        let cluster = &self.state.cluster;
        let is_leaf = {
            let mut peers = cluster.write_peers();
            match peers.get_mut(&self.key) {
                Some(p) if catalog.version >= p.catalog.version => {
                    p.catalog = catalog;
                    p.is_leaf()
                }
                _ => return,
            }
        };
        self.state.routing_changed(is_leaf);
    }
}

/// Our hello to a peer.
fn hello(state: &NodeState) -> Hello {
    Hello {
        protocol: PEER_PROTOCOL,
        name: state.name.clone(),
        addr: state.advertise,
        generation: state.generation,
        catalog: state.cluster.catalog(&state.registry()),
    }
}

/// Runs a link whose hellos were exchanged: registers the peer, reads until
/// the link closes, then forgets the peer.
async fn run_link<Si, St>(
    state: Arc<NodeState>,
    sink: Si,
    source: St,
    theirs: Hello,
    dialed: bool,
    sent_version: u64,
    registered: Option<oneshot::Sender<Link>>,
) where
    Si: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error>
        + Unpin
        + Send
        + 'static,
    St: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    if theirs.protocol != PEER_PROTOCOL {
        tracing::warn!(peer = %theirs.name, protocol = theirs.protocol, "peer speaks another protocol version");
        return;
    }
    let (outgoing, queue) = mpsc::channel(ws::OUTGOING_QUEUE);
    let writer = tokio::spawn(ws::write_loop(sink, queue));
    let name = theirs.name.clone();
    let leaf = theirs.addr.is_none();
    let link = Link::new(name.clone(), outgoing);
    let proven = state.secret.is_some();
    let outcome = state
        .cluster
        .register(state.advertise, theirs, link.clone(), dialed, proven);
    let key = match outcome {
        Ok(key) => key,
        Err(why) => {
            match why {
                NotRegistered::Duplicate => {
                    tracing::debug!(peer = %name, "duplicate link closed");
                }
                NotRegistered::AddressInUse(addr) => {
                    state.cluster.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(node = %state.name, peer = %name, %addr,
                        "peer link refused: it claims the address of a peer whose link is still up (without a cluster secret, anyone may claim any address; the live peer stays until its link closes or membership declares it down)");
                }
            }
            link.close_with(CloseCode::Policy, why.reason()).await;
            drop(link);
            let _ = tokio::time::timeout(HELLO_TIMEOUT, writer).await;
            return;
        }
    };
    tracing::debug!(node = %state.name, peer = %name, leaf, dialed, "peer linked");
    state.routing_changed(leaf);
    if let Some(registered) = registered {
        let _ = registered.send(link.clone());
    }
    // Our catalog may have changed since our hello went out, before this
    // peer was registered to hear about changes.
    let catalog = state.cluster.catalog(&state.registry());
    if catalog.version != sent_version {
        link.send(&PeerMessage::Catalog(catalog)).await;
    }
    let keepalive = state.config.keepalive();
    // Whatever ends this link (the peer, an error, or this future being
    // dropped at shutdown), its callers hear `node_lost` and it leaves the
    // routes.
    let _unlink = Unlink {
        state: state.clone(),
        key,
        link: link.clone(),
        leaf,
        name: name.clone(),
        writer,
    };
    link::read_loop(
        &link,
        source,
        Served {
            state: state.clone(),
            key,
        },
        link::Keepalive {
            // Only the side that dialed closes an idle link.
            idle: if dialed { keepalive.idle } else { None },
            ..keepalive
        },
    )
    .await;
}

/// Forgets a peer when its link ends.
struct Unlink {
    state: Arc<NodeState>,
    key: PeerKey,
    link: Link,
    leaf: bool,
    name: String,
    writer: tokio::task::JoinHandle<()>,
}

impl Drop for Unlink {
    fn drop(&mut self) {
        self.link.close();
        self.writer.abort();
        if self.state.cluster.remove(self.key).is_some() {
            tracing::info!(node = %self.state.name, peer = %self.name, "peer link closed");
            self.state.routing_changed(self.leaf);
        }
    }
}

/// Logs, counts and answers a failed opening (`side`: "dialed" or
/// "accepted").
async fn failed_opening<Si>(state: &NodeState, sink: &mut Si, error: &OpenError, side: &str)
where
    Si: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    use futures_util::SinkExt;
    if error.refused() {
        state.cluster.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(node = %state.name, link = side, %error, "peer link refused");
    } else {
        tracing::debug!(node = %state.name, link = side, %error, "peer link did not open");
    }
    if let Some(frame) = error.close_frame() {
        // Best effort, and bounded: the other side may be gone or not
        // reading.
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            sink.send(Message::Close(Some(frame))),
        )
        .await;
    }
}

/// Serves a link a peer opened to us (its first message was `peer-open`,
/// or a peer message that cannot open one: see [`link::opening`]).
///
/// With a cluster secret, nothing about this node is sent, and nothing
/// about the peer is registered, before the peer proved the secret; only
/// then is the connection's read `allowance` lifted (at once without a
/// secret).
pub(crate) async fn accept<Si, St>(
    state: Arc<NodeState>,
    mut sink: Si,
    mut source: St,
    opening: Opening,
    allowance: Allowance,
) where
    Si: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error>
        + Unpin
        + Send
        + 'static,
    St: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let open = match opening {
        Opening::Open(open) => open,
        Opening::Refused(why) => {
            state.cluster.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(node = %state.name, "peer link refused: {why}");
            let frame = CloseFrame {
                code: CloseCode::Policy,
                reason: why.into(),
            };
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                futures_util::SinkExt::send(&mut sink, Message::Close(Some(frame))),
            )
            .await;
            return;
        }
    };
    let nonce = match auth::nonce() {
        Ok(nonce) => nonce,
        Err(e) => {
            tracing::warn!(node = %state.name, error = %e, "peer link refused: no random numbers available");
            return;
        }
    };
    let ours = hello(&state);
    let sent_version = ours.catalog.version;
    let mut acceptor = Acceptor::new(state.secret.clone(), state.tokens.required(), ours, nonce);
    let first = acceptor.receive(PeerMessage::PeerOpen(open));
    let opened = tokio::time::timeout(
        HELLO_TIMEOUT,
        open_link(&mut acceptor, first, &mut sink, &mut source, || {
            allowance.lift()
        }),
    )
    .await
    .unwrap_or(Err(OpenError::TimedOut));
    match opened {
        Ok(theirs) => run_link(state, sink, source, theirs, false, sent_version, None).await,
        Err(e) => failed_opening(&state, &mut sink, &e, "accepted").await,
    }
}

/// Dials a peer (`ws://` or, verifying its certificate against the node's
/// `tls_ca`, `wss://`), opens the link (proving the cluster secret, and
/// with a peer ticket in the upgrade request, when there is one), and
/// serves the link on a new task. Returns once the link is up (or failed
/// to come up).
/// On success, returns the address the peer advertises (which may differ
/// from the URL's, e.g. through a proxy or NAT), and the link once
/// registered. A link not registered (another link to that node is kept)
/// is an error.
pub(crate) async fn dial(
    state: &Arc<NodeState>,
    url: &str,
) -> Result<(Option<SocketAddr>, Link), String> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let config = ws::config(state.config.max_message_size);
    let mut request = url.into_client_request().map_err(|e| e.to_string())?;
    if let Some(secret) = &state.secret {
        // Exempts this connection from the acceptor's caps on
        // unauthenticated connections (many nodes may share an address).
        let ticket = secret.ticket().map_err(|e| e.to_string())?;
        let value = tokio_tungstenite::tungstenite::http::HeaderValue::from_str(&ticket)
            .map_err(|e| e.to_string())?;
        request.headers_mut().insert(auth::TICKET_HEADER, value);
    }
    let connect = crate::tls::connect(request, state.tls.connector.as_ref(), config);
    let (stream, _) = tokio::time::timeout(HELLO_TIMEOUT, connect)
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| {
            if crate::tls::rejected_certificate(&e) || crate::tls::certificate_refused(&e) {
                state.cluster.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(node = %state.name, peer = %url, error = %e,
                    "peer link refused: certificate not trusted");
            }
            e.to_string()
        })?;
    let (mut sink, mut source) = stream.split();
    let nonce = auth::nonce().map_err(|e| e.to_string())?;
    let ours = hello(state);
    let sent_version = ours.catalog.version;
    let (mut dialer, opening) = Dialer::new(state.secret.clone(), ours, nonce);
    let opened = tokio::time::timeout(
        HELLO_TIMEOUT,
        open_link(
            &mut dialer,
            Outcome::Send(opening),
            &mut sink,
            &mut source,
            || {},
        ),
    )
    .await
    .unwrap_or(Err(OpenError::TimedOut));
    let theirs = match opened {
        Ok(theirs) => theirs,
        Err(e) => {
            failed_opening(state, &mut sink, &e, "dialed").await;
            return Err(e.to_string());
        }
    };
    let advertised = theirs.addr;
    let (registered, link) = oneshot::channel();
    state.spawn(run_link(
        state.clone(),
        sink,
        source,
        theirs,
        true,
        sent_version,
        Some(registered),
    ));
    match link.await {
        Ok(link) => Ok((advertised, link)),
        Err(_) => Err("the link was not kept (another link to that node is)".to_owned()),
    }
}

/// Keeps a configured peer (`url`) joined. A member announces itself to
/// the peer over UDP until the peer is a member (membership then links
/// them, the lower address dialing); a leaf, which is no member, keeps a
/// link to the peer itself. Retries after a jittered, growing delay; ends
/// with the node.
pub(crate) async fn keep_linked(state: Arc<NodeState>, url: String) {
    let mut delay = BACKOFF_START;
    let mut addr = url_addr(&url);
    // Announcing is one cheap UDP packet: retry it sooner than a dial.
    let cap = if state.membership.is_some() {
        ANNOUNCE_MAX
    } else {
        BACKOFF_MAX
    };
    // Where the peer says it listens, once a dial reached it: the URL may
    // name another address (a proxy, NAT).
    let mut advertised: Option<SocketAddr> = None;
    loop {
        if addr.is_none() {
            // A host name: resolve it (it may not resolve yet).
            addr = resolve(&url).await;
        }
        let done = match (&state.membership, addr) {
            (Some(m), Some(a)) => {
                let member = m.members().await.iter().any(|id| id.addr == a);
                if !member {
                    m.announce(a);
                }
                member
            }
            (Some(_), None) => false,
            // A leaf keeps a link to its gateway itself.
            (None, _) => {
                let target = advertised.or(addr);
                if target.is_some_and(|a| state.cluster.linked(a)) {
                    true
                } else {
                    // A fresh link registers on its own task: count it as
                    // done; the next look checks it under its real address.
                    match dial(&state, &url).await {
                        Ok((peer, _)) => {
                            advertised = peer.or(advertised);
                            true
                        }
                        Err(e) => {
                            tracing::debug!(peer = %url, error = %e, "cannot link to peer yet");
                            false
                        }
                    }
                }
            }
        };
        // Joined: look again on a change, or now and then. Not yet: back
        // off, with jitter so restarted nodes do not retry in step.
        let wait = if done {
            delay = BACKOFF_START;
            BACKOFF_MAX
        } else {
            let jitter = random_below(delay.as_millis() as usize / 2 + 1) as u64;
            let wait = delay + Duration::from_millis(jitter);
            delay = (delay * 2).min(cap);
            wait
        };
        let mut changes = state.cluster.subscribe();
        let _ = tokio::time::timeout(wait, changes.changed()).await;
    }
}

/// How often, at most, routing is rebuilt for what membership reports:
/// cards arriving together (a thousand at join) make one rebuild.
const REBUILD_AT_MOST_EVERY: Duration = Duration::from_millis(50);
/// What each member adds to the time between two rebuilds.
const REBUILD_PER_MEMBER: Duration = Duration::from_micros(250);
/// Rebuilding takes at most one part in this many of the time: in a large
/// cluster (a rebuild copies a pointer per function per member), rebuilds
/// space out as they grow.
const REBUILD_SHARE: u32 = 20;

/// Follows membership: takes the cards of members (routing to them needs
/// no link), and forgets members that fail, leave or restart, closing
/// their links. Events that arrive together are taken together, and
/// routing is rebuilt once for them.
pub(crate) async fn follow_membership(
    state: Arc<NodeState>,
    mut events: mpsc::Receiver<MemberEvent>,
) {
    let mut next_rebuild = Instant::now();
    loop {
        let Some(first) = events.recv().await else {
            return;
        };
        // Rebuilding at most every so often: wait for the rest of a burst.
        tokio::time::sleep_until(next_rebuild).await;
        let mut changed = follow(&state, first);
        while let Ok(event) = events.try_recv() {
            changed |= follow(&state, event);
        }
        if changed {
            let started = Instant::now();
            state.cluster.rebuild(&state.registry());
            let took = started.elapsed();
            // Each member adds a little wait: in a large cluster, a node
            // rebuilds a few times a second while cards pour in, not
            // twenty (many nodes may share a machine).
            let members = u32::try_from(state.cluster.members()).unwrap_or(u32::MAX);
            let floor = REBUILD_AT_MOST_EVERY + REBUILD_PER_MEMBER.saturating_mul(members);
            next_rebuild = Instant::now() + floor.max(took * REBUILD_SHARE);
        }
    }
}

/// Applies one membership event; returns whether routing changed.
fn follow(state: &NodeState, event: MemberEvent) -> bool {
    tracing::debug!(node = %state.name, ?event, "membership");
    match event {
        // Routing waits for the card.
        MemberEvent::Up(_) => false,
        MemberEvent::Down(id) => {
            state.cluster.drop_member(id.addr, id.generation);
            true
        }
        MemberEvent::Changed { old, new } => {
            // Restarted: the old node, its card and its links are gone. A
            // new version alone: its card is on the way.
            let restarted = new.generation != old.generation;
            if restarted {
                state.cluster.drop_member(old.addr, old.generation);
            }
            restarted
        }
        MemberEvent::Card { id, card } => state.cluster.take_card(id, &card),
    }
}

/// The first address a `ws://host:port` (or `wss://`) URL's host name
/// resolves to.
async fn resolve(url: &str) -> Option<SocketAddr> {
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("wss://"))?;
    let hostport = rest.split('/').next()?;
    tokio::net::lookup_host(hostport).await.ok()?.next()
}

/// The socket address of a `ws://host:port` (or `wss://`) URL, when it
/// names one directly.
pub(crate) fn url_addr(url: &str) -> Option<SocketAddr> {
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("wss://"))?;
    let hostport = rest.split('/').next()?;
    hostport.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn host_names_resolve() {
        let addr = resolve("ws://localhost:7773/")
            .await
            .expect("localhost resolves");
        assert!(addr.ip().is_loopback());
        assert_eq!(addr.port(), 7773);
        assert_eq!(resolve("not a url").await, None);
    }

    #[test]
    fn url_addresses() {
        assert_eq!(
            url_addr("ws://127.0.0.1:7773/"),
            Some("127.0.0.1:7773".parse().expect("addr"))
        );
        assert_eq!(
            url_addr("ws://[::1]:1"),
            Some("[::1]:1".parse().expect("addr"))
        );
        assert_eq!(
            url_addr("wss://127.0.0.1:7773"),
            Some("127.0.0.1:7773".parse().expect("addr"))
        );
        assert_eq!(url_addr("ws://localhost:1"), None);
        assert_eq!(url_addr("http://127.0.0.1:1"), None);
    }

    fn hello(addr: &str, generation: u64) -> Hello {
        Hello {
            protocol: PEER_PROTOCOL,
            name: addr.into(),
            addr: Some(addr.parse().expect("addr")),
            generation,
            catalog: Catalog::default(),
        }
    }

    fn link() -> Link {
        Link::new("x".into(), mpsc::channel(1).0)
    }

    #[test]
    fn duplicate_links_keep_the_one_dialed_by_the_lower_address() {
        let low: SocketAddr = "127.0.0.1:1000".parse().expect("addr");
        let high: SocketAddr = "127.0.0.1:2000".parse().expect("addr");
        // On the low node: its own dial first, then the high node's dial.
        let on_low = Cluster::default();
        let mine = link();
        assert!(
            on_low
                .register(
                    Some(low),
                    hello("127.0.0.1:2000", 1),
                    mine.clone(),
                    true,
                    true
                )
                .is_ok()
        );
        assert_eq!(
            on_low.register(Some(low), hello("127.0.0.1:2000", 1), link(), false, true),
            Err(NotRegistered::Duplicate)
        );
        assert!(!mine.is_closed());
        // On the high node, in the other order: the low node's dial wins.
        let on_high = Cluster::default();
        let own = link();
        assert!(
            on_high
                .register(
                    Some(high),
                    hello("127.0.0.1:1000", 1),
                    own.clone(),
                    true,
                    true
                )
                .is_ok()
        );
        assert!(
            on_high
                .register(Some(high), hello("127.0.0.1:1000", 1), link(), false, true)
                .is_ok()
        );
        assert!(own.is_closed());
        assert_eq!(on_high.read_peers().len(), 1);
    }

    #[test]
    fn restarted_node_replaces_its_old_self() {
        let me: SocketAddr = "127.0.0.1:1000".parse().expect("addr");
        let c = Cluster::default();
        let old = link();
        assert!(
            c.register(
                Some(me),
                hello("127.0.0.1:2000", 1),
                old.clone(),
                false,
                true
            )
            .is_ok()
        );
        assert!(
            c.register(Some(me), hello("127.0.0.1:2000", 2), link(), false, true)
                .is_ok()
        );
        assert!(old.is_closed());
        // An older generation never replaces a newer one.
        assert!(
            c.register(Some(me), hello("127.0.0.1:2000", 1), link(), false, true)
                .is_err()
        );
        assert_eq!(c.read_peers().len(), 1);
    }

    #[test]
    fn without_a_secret_a_live_peer_is_never_replaced() {
        let me: SocketAddr = "127.0.0.1:1000".parse().expect("addr");
        let addr: SocketAddr = "127.0.0.1:2000".parse().expect("addr");
        let c = Cluster::default();
        let real = link();
        assert!(
            c.register(
                Some(me),
                hello("127.0.0.1:2000", 5),
                real.clone(),
                false,
                false
            )
            .is_ok()
        );
        // An impostor with a higher generation, whichever way it dialed.
        for dialed in [false, true] {
            assert_eq!(
                c.register(
                    Some(me),
                    hello("127.0.0.1:2000", u64::MAX),
                    link(),
                    dialed,
                    false
                ),
                Err(NotRegistered::AddressInUse(addr))
            );
        }
        // The same generation: a duplicate, refused too.
        assert_eq!(
            c.register(Some(me), hello("127.0.0.1:2000", 5), link(), true, false),
            Err(NotRegistered::Duplicate)
        );
        assert!(!real.is_closed());
        assert_eq!(c.read_peers().len(), 1);
        // Once the real one's link closed (it died, or membership declared
        // it down), its successor takes its place.
        real.close();
        let next = link();
        assert!(
            c.register(
                Some(me),
                hello("127.0.0.1:2000", 6),
                next.clone(),
                false,
                false
            )
            .is_ok()
        );
        assert_eq!(c.read_peers().len(), 1);
        assert!(c.linked(addr));
        // Membership declaring it down closes the link too.
        c.drop_member(addr, 6);
        assert!(next.is_closed());
        assert!(
            c.register(Some(me), hello("127.0.0.1:2000", 7), link(), false, false)
                .is_ok()
        );
    }
}
