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
pub(crate) mod handshake;
pub(crate) mod routes;
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

use serde_json::{Value, json};
use tokio::sync::watch;

use self::routes::{Candidate, Interner, Offer, Routes};
use crate::auth;
use crate::error::RpcError;
use crate::exec::Job;
use crate::link::Link;
use crate::membership::MemberId;
use crate::protocol::peer::{Ability, Catalog, Hello};
use crate::registry::{Registry, Unavailable};

/// A peer, as a key local to this node.
pub(crate) type PeerKey = u64;

/// Which places a placement may choose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    /// Anywhere in the cluster (a client's request).
    Cluster,
    /// This node and its leaves only (a job a peer routed here).
    Here,
}

/// The node a cluster state belongs to, as the view and the function table
/// need it (the rest of the node stays out of the cluster's state).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Own<'a> {
    pub(crate) name: &'a str,
    /// The functions served here.
    pub(crate) registry: &'a Registry,
    /// Where peers reach it, if they can.
    pub(crate) addr: Option<SocketAddr>,
    pub(crate) generation: u64,
    /// Jobs running here now.
    pub(crate) load: usize,
    /// Its gossip's counters, when it is a member.
    pub(crate) gossip: Option<GossipStats>,
}

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
    version: u32,
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
        datasets: offer.datasets.iter().map(|d| d.to_string()).collect(),
        idempotent: offer.idempotent,
        params: Vec::new(),
        returns: String::new(),
        doc: String::new(),
    }
}

/// An ability, interned: `datasets` sorted, without repeats (as a
/// `BTreeSet` gives them).
fn offer<'a>(
    interner: &mut Interner,
    fun: &str,
    datasets: impl IntoIterator<Item = &'a str>,
    idempotent: bool,
) -> Offer {
    let (fun, fun_id) = interner.name(fun);
    Offer {
        fun,
        fun_id,
        datasets: interner.datasets(datasets),
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

/// Peers with a link, by key, and the key of the one at each address (at
/// most one peer per address: [`Cluster::register`] replaces or refuses a
/// second), so a forwarded call finds its link without a scan.
#[derive(Debug, Default)]
pub(crate) struct Peers {
    by_key: HashMap<PeerKey, Peer>,
    by_addr: HashMap<SocketAddr, PeerKey>,
}

impl Peers {
    fn insert(&mut self, key: PeerKey, peer: Peer) {
        if let Some(addr) = peer.addr {
            self.by_addr.insert(addr, key);
        }
        self.by_key.insert(key, peer);
    }

    fn remove(&mut self, key: &PeerKey) -> Option<Peer> {
        let peer = self.by_key.remove(key)?;
        if let Some(addr) = peer.addr
            && self.by_addr.get(&addr) == Some(key)
        {
            self.by_addr.remove(&addr);
        }
        Some(peer)
    }

    fn get_mut(&mut self, key: &PeerKey) -> Option<&mut Peer> {
        self.by_key.get_mut(key)
    }

    /// The key of the peer at `addr`.
    fn key_at(&self, addr: SocketAddr) -> Option<PeerKey> {
        self.by_addr.get(&addr).copied()
    }

    /// The peer at `addr`.
    fn at(&self, addr: SocketAddr) -> Option<&Peer> {
        self.by_key.get(self.by_addr.get(&addr)?)
    }
}

impl std::ops::Deref for Peers {
    type Target = HashMap<PeerKey, Peer>;

    fn deref(&self) -> &Self::Target {
        &self.by_key
    }
}

/// The cluster state of one node.
///
/// Its locks are never held across an await, and are taken in this order
/// when nested: `interner`, `members`, `peers`, `routes`.
#[derive(Debug)]
pub(crate) struct Cluster {
    /// Members, from their cards.
    members: RwLock<Members>,
    /// Peers with a link (members this node talks to now, and leaves).
    peers: RwLock<Peers>,
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
    /// Peer tickets seen lately (replays are refused).
    pub(crate) tickets: auth::Tickets,
}

impl Default for Cluster {
    fn default() -> Self {
        Self {
            members: RwLock::new(Members::default()),
            peers: RwLock::new(Peers::default()),
            routes: RwLock::new(Arc::new(Routes::default())),
            interner: std::sync::Mutex::new(Interner::default()),
            next_key: AtomicU64::new(1),
            version: AtomicU64::new(1),
            changes: watch::Sender::new(0),
            refused: AtomicU64::new(0),
            tickets: auth::Tickets::default(),
        }
    }
}

/// Why a peer whose link opened was not registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotRegistered {
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
    pub(crate) fn reason(self) -> &'static str {
        match self {
            NotRegistered::Duplicate => "duplicate link",
            NotRegistered::AddressInUse(_) => {
                "a live peer has this address; a node that restarted must retry once its old link closed"
            }
        }
    }
}

impl Cluster {
    fn read_peers(&self) -> std::sync::RwLockReadGuard<'_, Peers> {
        // Never held across an await or a panic-prone call.
        self.peers.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_peers(&self) -> std::sync::RwLockWriteGuard<'_, Peers> {
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
            Some(addr) => peers.at(addr).map(|p| &p.link),
            None => peers.get(&key).map(|p| &p.link),
        };
        link.filter(|l| l.is_usable()).cloned()
    }

    /// The address and name of the member `key`, if it is one.
    pub(crate) fn member_addr(&self, key: PeerKey) -> Option<(SocketAddr, String)> {
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
        // Before the members' lock: the interner's comes first.
        let offers = self.offers_of(&card);
        let mut members = self.write_members();
        if let Some(held) = members.by_addr.get_mut(&id.addr) {
            if (held.generation, held.version) >= (id.generation, id.version) {
                return false;
            }
            if held.generation == id.generation {
                held.version = id.version;
                // A new version with the same card (foca renews a member's
                // identity when it rejoins after being taken for dead):
                // routing is unchanged.
                let same = held.name == card.name && held.offers == offers;
                held.name = card.name;
                held.offers = offers;
                return !same;
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
                name: card.name,
                generation: id.generation,
                version: id.version,
                offers,
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
                let datasets: BTreeSet<&str> = f
                    .datasets
                    .iter()
                    .filter_map(|&i| card.datasets.get(i as usize).map(String::as_str))
                    .collect();
                offer(&mut interner, &f.name, datasets, f.idempotent)
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
        // The interner's lock is held to the end, so two rebuilds publish
        // in the order they read the state.
        let mut interner = self.interner.lock().unwrap_or_else(PoisonError::into_inner);
        let table = {
            let own: Vec<Offer> = registry
                .iter()
                .map(|f| {
                    offer(
                        &mut interner,
                        &f.name,
                        f.datasets.iter().map(String::as_str),
                        f.idempotent,
                    )
                })
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
                        .map(|a| {
                            offer(
                                &mut interner,
                                &a.fun,
                                a.datasets.iter().map(String::as_str),
                                a.idempotent,
                            )
                        })
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
            Arc::new(Routes::build(interner.names(), places))
        };
        let old = std::mem::replace(
            &mut *self.routes.write().unwrap_or_else(PoisonError::into_inner),
            table.clone(),
        );
        drop(old);
        // Sets held by nothing but the interner now are in no table (a
        // reader still holding the old table keeps its sets, and the
        // count with them, one rebuild longer).
        interner.prune();
        table.know_datasets(interner.dataset_names());
        drop(interner);
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
    pub(crate) fn candidates(
        &self,
        local_load: usize,
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
            .filter(|r| locs.iter().all(|d| routes::has(&r.datasets, d)))
            .map(|r| Candidate {
                target: r.target,
                load: self.load(local_load, r.target),
                local: r.target == Target::Local,
            })
            .collect();
        if candidates.is_empty() {
            return Err(Unavailable::MissingDatasets.error(fun, locs));
        }
        Ok(candidates)
    }

    fn load(&self, local_load: usize, target: Target) -> usize {
        match target {
            Target::Local => local_load,
            // A member without a link has nothing in flight from here.
            Target::Peer(key) => self.link(key).map_or(0, |l| l.load()),
        }
    }

    /// Takes the catalog a peer's link sent (when newer than the one
    /// held); returns whether the peer is a leaf, `None` when nothing
    /// changed.
    pub(crate) fn take_catalog(&self, key: PeerKey, catalog: Catalog) -> Option<bool> {
        let mut peers = self.write_peers();
        match peers.get_mut(&key) {
            Some(p) if catalog.version >= p.catalog.version => {
                p.catalog = catalog;
                Some(p.is_leaf())
            }
            _ => None,
        }
    }

    /// Whether every function of `job` is safe to run again.
    pub(crate) fn idempotent(&self, job: &Job) -> bool {
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
    pub(crate) fn register(
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
                .key_at(addr)
                .and_then(|k| peers.get(&k).map(|p| (k, p)))
                .map(|(k, p)| (k, p.generation, p.dialed, !p.link.is_usable()));
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
    pub(crate) fn remove(&self, key: PeerKey) -> Option<Peer> {
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
        if let Some(p) = self.read_peers().at(addr)
            && p.generation <= generation
        {
            p.link.close();
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
            .at(addr)
            .is_some_and(|p| !p.link.is_closed())
    }

    /// Every function in the cluster as this node knows it without asking
    /// anyone (descriptions where at hand): what the status page shows.
    pub(crate) fn functions(&self, own: &Own<'_>) -> Value {
        let (by_fun, _) = function_table(&self.places(own));
        Value::Array(by_fun.into_values().collect())
    }

    /// Every place a function runs, as this node knows it: its own
    /// functions (described), the members' (from their cards: names,
    /// datasets, idempotent) and its leaves' (described), each with the
    /// node's name and, for a peer, its key.
    pub(crate) fn places(&self, own: &Own<'_>) -> Vec<(String, Option<PeerKey>, Ability)> {
        let mut places: Vec<(String, Option<PeerKey>, Ability)> = own
            .registry
            .iter()
            .map(|f| (own.name.to_owned(), None, Ability::of(f)))
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
    pub(crate) fn view(&self, this: &Own<'_>) -> ClusterView {
        let registry = this.registry;
        // Everything served here, local-only functions included.
        let mut own = self.catalog(registry).functions;
        own.extend(registry.iter().filter(|f| !f.advertised).map(Ability::of));
        own.sort();
        let info = |functions: &[Ability]| functions.iter().map(FunctionInfo::from).collect();
        let mut nodes = vec![NodeView {
            name: this.name.to_owned(),
            addr: this.addr,
            status: NodeStatus::This,
            generation: this.generation,
            load: this.load,
            jobs_sent: None,
            linked: false,
            functions: info(&own),
            gossip: this.gossip,
            security: Some(SecurityStats {
                refused_peer_links: self.refused.load(Ordering::Relaxed),
            }),
        }];
        let members = self.read_members();
        let peers = self.read_peers();
        let link_to = |addr: SocketAddr| {
            peers
                .at(addr)
                .filter(|p| !p.link.is_closed())
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
            self_name: this.name.to_owned(),
            nodes,
        }
    }
}

/// Every function at hand (see [`Cluster::places`]), by name, as
/// `mpreg.functions` lists it, described where a place describes it; and
/// the names of those described.
pub(crate) fn function_table(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use crate::protocol::peer::PEER_PROTOCOL;
    use tokio::sync::mpsc;

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
    fn peers_are_found_by_address_after_replacements_and_removals() {
        let c = Cluster::default();
        let addr: SocketAddr = "127.0.0.1:2000".parse().expect("addr");
        let first = c
            .register(None, hello("127.0.0.1:2000", 1), link(), true, true)
            .expect("registered");
        assert_eq!(c.read_peers().key_at(addr), Some(first));
        assert!(c.linked(addr));
        // The node restarted: its new link replaces the old one.
        let second = c
            .register(None, hello("127.0.0.1:2000", 2), link(), true, true)
            .expect("replaces");
        assert_ne!(first, second);
        assert_eq!(c.read_peers().key_at(addr), Some(second));
        assert_eq!(c.read_peers().len(), 1);
        // Removing the replaced key leaves the index alone.
        assert!(c.remove(first).is_none());
        assert_eq!(c.read_peers().key_at(addr), Some(second));
        assert!(c.remove(second).is_some());
        assert_eq!(c.read_peers().key_at(addr), None);
        assert!(!c.linked(addr));
    }

    #[test]
    fn the_state_alone_views_and_places_its_own_functions() {
        let datasets: std::collections::BTreeSet<String> = ["model-a".to_owned()].into();
        let registry = Registry::new(
            [crate::registry::Function::new("f", |_args| async {
                Ok(serde_json::Value::Null)
            })],
            &datasets,
        );
        let cluster = Cluster::default();
        cluster.rebuild(&registry);
        let own = Own {
            name: "solo",
            registry: &registry,
            addr: None,
            generation: 7,
            load: 3,
            gossip: None,
        };
        let view = cluster.view(&own);
        assert_eq!(view.nodes.len(), 1);
        let this = &view.nodes[0];
        assert_eq!(
            (this.name.as_str(), this.status, this.load),
            ("solo", NodeStatus::This, 3)
        );
        assert!(this.functions.iter().any(|f| f.fun == "f"));
        let here = cluster
            .candidates(3, "f", &["model-a".to_owned()], Scope::Cluster, None)
            .expect("runs here");
        assert_eq!(here.len(), 1);
        assert!(here[0].local && here[0].load == 3);
        let missing = cluster.candidates(0, "f", &["model-b".to_owned()], Scope::Cluster, None);
        assert_eq!(
            missing.err().map(|e| e.code),
            Some(ErrorCode::NoNodeForDatasets)
        );
        let unknown = cluster.candidates(0, "g", &[], Scope::Cluster, None);
        assert_eq!(
            unknown.err().map(|e| e.code),
            Some(ErrorCode::UnknownFunction)
        );
    }

    #[test]
    fn members_cards_route_and_count_their_datasets_and_a_renewal_changes_nothing() {
        use crate::protocol::peer::Ability;
        let registry = Registry::new([], &std::collections::BTreeSet::new());
        let cluster = Cluster::default();
        let member = |port: u16, version: u32| MemberId {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            generation: 1,
            version,
            rejoin: 0,
        };
        let card = |datasets: &[&str]| {
            let ability = Ability {
                fun: "echo".into(),
                datasets: datasets.iter().map(|d| (*d).to_owned()).collect(),
                idempotent: true,
                params: Vec::new(),
                returns: String::new(),
                doc: String::new(),
            };
            Card::new("m", &[ability]).encode()
        };
        assert!(cluster.take_card(member(1, 1), &card(&["a", "b"])));
        assert!(cluster.take_card(member(2, 1), &card(&["b", "c"])));
        cluster.rebuild(&registry);
        assert_eq!(cluster.summary().datasets, 3, "a, b and c, each once");
        assert_eq!(cluster.routes().get("echo").map(<[_]>::len), Some(2));
        // The same card at a new version (a renewed identity): held, but
        // routing is unchanged; an older version is refused.
        assert!(!cluster.take_card(member(1, 2), &card(&["a", "b"])));
        assert!(!cluster.take_card(member(1, 1), &card(&["x"])));
        // Another card at a new version changes routing.
        assert!(cluster.take_card(member(1, 3), &card(&["d"])));
        cluster.rebuild(&registry);
        assert_eq!(cluster.summary().datasets, 3, "b, c and d: a is gone");
        cluster.drop_member(member(2, 1).addr, 1);
        cluster.rebuild(&registry);
        assert_eq!(cluster.summary().datasets, 1, "d");
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
