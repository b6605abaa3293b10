//! Each member's card (what it offers, as opaque bytes), spread over the
//! gossip socket: a sans-IO state machine.
//!
//! Membership gossips each member's identity (address, generation, card
//! version); this module makes sure that, for every member up, this node
//! ends up holding the card of that identity. Cards travel two ways:
//!
//! - **Syncs** (anti-entropy, as Scuttlebutt and Cassandra do): every so
//!   often a node sends a random member a [`KIND_SYNC`] packet, a Bloom
//!   filter of the cards it holds, and the member answers with every card
//!   it holds that is not in it, several to a packet. One packet each way
//!   brings a node that joins every card a member has, including those of
//!   members it has not seen yet (kept aside, at most [`EARLY_MAX`], until
//!   they come up); cards spread from node to node like a rumor, but only
//!   to whoever lacks them. Syncs are frequent while cards arrive, and
//!   space out up to [`SYNC_SLOW`] when nothing changes.
//! - **Asks**, for a card still wanted after [`GATHER`] (a sync usually
//!   brings it first) or, wanted alone, after [`GATHER_ALONE`] (one member
//!   joined or changed: its owner is the one sure to hold it): several at
//!   once of one member chosen by the caller (a *helper*), which answers
//!   with those it holds and names those it lacks; one alone, and every
//!   card helpers lacked [`HELPER_TRIES`] times or did not answer for
//!   within [`ASK_AGAIN`], of its owner, which answers in parts of at most
//!   [`PART_BYTES`] bytes.
//!
//! Pulling, rather than spreading every card as a rumor, costs a round
//! trip per change, and a node that joins late still gets every card
//! (rumors are retransmitted a few times, then forgotten). When a thousand
//! nodes start together, each learns of nearly a thousand members within
//! seconds: with asks alone, most helpers lacked the cards asked for, and
//! asks and their answers were nine tenths of the cluster's packets; syncs
//! cut the cluster's packets by more than half.
//!
//! The bytes are opaque here: the cluster encodes and decodes them.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::MemberId;
use super::bloom::{Bloom, Key};

/// Most bytes of a card in one packet (the rest of the packet is the
/// header and, with a cluster secret, the tag).
pub(crate) const PART_BYTES: usize = 1200;

/// Most parts of a card: a card is at most `PART_BYTES * MAX_PARTS` bytes
/// (~300 KB, a few thousand functions).
pub(crate) const MAX_PARTS: usize = 256;

/// Most cards asked for and not yet answered, at once (a batch asked of a
/// helper may take it past by less than [`ASK_MANY_MAX`]).
pub(crate) const MAX_ASKING: usize = 64;

/// How long an ask waits for its answer before it is sent again.
pub(crate) const ASK_AGAIN: Duration = Duration::from_millis(300);

/// The longest a newly wanted card waits before it is asked for: syncs
/// usually bring it first, and the cards wanted meanwhile are asked for
/// together. The wait is 4 ms per member, from [`GATHER_ALONE`] up to
/// this: in a small cluster asking is cheap and syncs take several rounds
/// to find a card; in a thousand-node one, asks of helpers that lack the
/// card were most of the traffic.
pub(crate) const GATHER: Duration = Duration::from_secs(1);

/// How long a card wanted alone (no other is waiting) waits before it is
/// asked of its owner: one member joined or changed its card, and its
/// owner is the only one sure to hold it (syncs with random members would
/// find it late in a large cluster).
pub(crate) const GATHER_ALONE: Duration = Duration::from_millis(50);

/// The time between two syncs while cards are wanted or arriving.
pub(crate) const SYNC_FAST: Duration = Duration::from_millis(100);

/// The longest time between two syncs (the time doubles from
/// [`SYNC_FAST`] while nothing is wanted or arrives).
pub(crate) const SYNC_SLOW: Duration = Duration::from_secs(5);

/// How many helpers may lack a card before its owner is asked: while a
/// thousand nodes join, the first helper asked often has not fetched a card
/// yet, and another, a little later, has (an ask of a helper names up to
/// [`ASK_MANY_MAX`] cards in one packet; an owner's answer is a round trip
/// per card).
pub(crate) const HELPER_TRIES: u8 = 8;

/// Most cards named in one ask of a helper (each at most 40 bytes encoded,
/// an IPv6 address and two numbers: the ask stays within [`PART_BYTES`]).
pub(crate) const ASK_MANY_MAX: usize = 30;

/// The first byte of a gossip packet: what follows.
pub(crate) const KIND_SWIM: u8 = 0;
/// An ask for a part of the receiver's card.
pub(crate) const KIND_ASK: u8 = 1;
/// A part of the sender's card.
pub(crate) const KIND_PART: u8 = 2;
/// Cards the sender holds, whole, several to a packet (answering a
/// [`KIND_SYNC`] or a [`KIND_ASK_MANY`]).
pub(crate) const KIND_CARDS: u8 = 5;
/// An ask for the cards of several members the receiver may hold.
pub(crate) const KIND_ASK_MANY: u8 = 6;
/// The members whose cards a [`KIND_ASK_MANY`] asked for and the sender
/// does not hold (or holds too large for a packet).
pub(crate) const KIND_LACKING: u8 = 7;

/// A summary of the cards the sender holds (a Bloom filter): the receiver
/// answers with the cards it holds that are not in it.
pub(crate) const KIND_SYNC: u8 = 8;

/// Most [`KIND_CARDS`] packets in the answer to one [`KIND_SYNC`] (what is
/// left is sent at the next sync).
pub(crate) const SYNC_ANSWER_PACKETS: usize = 48;

/// Most bytes of cards held for members not seen up yet (they arrived in
/// the answer to a sync before the member's identity did); past that,
/// more are not kept (asked for when their members come up).
pub(crate) const EARLY_MAX: usize = 256 * 1024;

/// How long a card of a member not seen up is kept.
pub(crate) const EARLY_KEEP: Duration = Duration::from_secs(30);

/// A card of a member not seen up yet.
#[derive(Debug)]
struct Early {
    generation: u64,
    version: u32,
    card: Arc<[u8]>,
    /// When it arrived.
    since: Instant,
}

/// One card named in a [`KIND_ASK_MANY`] packet: the identity wanted (its
/// version or a later one).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Named {
    addr: SocketAddr,
    generation: u64,
    version: u32,
}

/// One card in a [`KIND_CARDS`] packet.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Carried {
    addr: SocketAddr,
    generation: u64,
    version: u32,
    card: Vec<u8>,
}

/// Bytes of an ask: kind, generation, version, part.
const ASK_LEN: usize = 1 + 8 + 8 + 2;
/// Bytes of a part's header: kind, generation, version, part, parts.
const PART_HEADER: usize = 1 + 8 + 8 + 2 + 2;

/// A card that arrived complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Arrived {
    /// The identity the card belongs to.
    pub(crate) id: MemberId,
    /// The card, as its owner encoded it.
    pub(crate) card: Arc<[u8]>,
}

/// A card being fetched.
#[derive(Debug)]
struct Want {
    /// The identity whose card is wanted (its version, or a later one).
    id: MemberId,
    /// The parts received so far (empty until the first answer tells how
    /// many there are).
    parts: Vec<Option<Vec<u8>>>,
    /// When the outstanding ask was sent, if one is.
    asked: Option<Instant>,
    /// Whether the next ask goes to the owner (helpers lacked the card
    /// [`HELPER_TRIES`] times, or one did not answer).
    of_owner: bool,
    /// Helpers asked so far that lacked the card.
    lacked: u8,
}

impl Want {
    /// The first part still missing.
    fn missing(&self) -> u16 {
        let index = self.parts.iter().position(Option::is_none).unwrap_or(0);
        u16::try_from(index).unwrap_or(0)
    }
}

/// The cards this node holds and wants, and its own.
#[derive(Debug)]
pub(crate) struct Cards {
    /// Our card, as encoded by the cluster.
    own: Arc<[u8]>,
    /// Every card held, by address: its identity (generation, version)
    /// and the card, to pass on to members that join.
    held: HashMap<SocketAddr, (u64, u32, Arc<[u8]>)>,
    /// Cards wanted, by address.
    wants: HashMap<SocketAddr, Want>,
    /// Wanted cards not asked for yet, oldest first, with when they became
    /// wanted (entries no longer wanted, or already asked, are skipped).
    waiting: VecDeque<(Instant, SocketAddr)>,
    /// Cards to ask of their owners, without gathering (entries no longer
    /// wanted, or already asked, are skipped).
    of_owners: VecDeque<SocketAddr>,
    /// Asks sent, in the order they were sent, to find the overdue ones
    /// (an entry whose card was answered meanwhile is skipped).
    asking: VecDeque<(Instant, SocketAddr)>,
    /// Cards asked for and not answered yet (at most [`MAX_ASKING`]).
    outstanding: usize,
    /// Cards of members not seen up yet, from syncs: taken when the
    /// member comes up, dropped after [`EARLY_KEEP`].
    early: HashMap<SocketAddr, Early>,
    /// Bytes of the cards in `early` (at most [`EARLY_MAX`]).
    early_bytes: usize,
    /// How long wanted cards are gathered (see [`GATHER`]).
    gather: Duration,
    /// The XOR of the hashes of the identities of the cards in `held` (see
    /// [`Cards::digest`]).
    held_xor: u64,
    /// The last sync packet built, and what it was built from (our
    /// identity, and `changes` then): a filter is rebuilt only when what
    /// it summarises changed.
    last_sync: Option<(MemberId, u64, Vec<u8>)>,
    /// Bumped at every change of `held` or `early`.
    changes: u64,
}

impl Cards {
    /// Holds no card but `own`.
    pub(crate) fn new(own: Arc<[u8]>) -> Self {
        Self {
            own,
            held: HashMap::new(),
            wants: HashMap::new(),
            waiting: VecDeque::new(),
            of_owners: VecDeque::new(),
            asking: VecDeque::new(),
            outstanding: 0,
            early: HashMap::new(),
            early_bytes: 0,
            gather: GATHER_ALONE,
            held_xor: 0,
            last_sync: None,
            changes: 0,
        }
    }

    /// Replaces our card (its version is the identity's).
    pub(crate) fn set_own(&mut self, card: Arc<[u8]>) {
        self.own = card;
    }

    /// Wants the card of `id` (from `now`) unless one as recent is held or
    /// wanted. Returns the card when it arrived early (see
    /// [`Cards::receive_bulk`]).
    pub(crate) fn want(&mut self, id: MemberId, now: Instant) -> Option<Arrived> {
        let key = (id.generation, id.version);
        if self
            .held
            .get(&id.addr)
            .is_some_and(|(generation, version, _)| (*generation, *version) >= key)
        {
            return None;
        }
        if let Some(early) = self.take_early(id.addr)
            && early.generation == id.generation
            && early.version >= id.version
        {
            self.unwant(id.addr);
            let (version, card) = (early.version, early.card);
            self.hold(id.addr, id.generation, version, card.clone());
            let id = MemberId { version, ..id };
            return Some(Arrived { id, card });
        }
        match self.wants.get_mut(&id.addr) {
            Some(want) if (want.id.generation, want.id.version) >= key => {}
            Some(want) => want.id = id,
            None => {
                self.wants.insert(
                    id.addr,
                    Want {
                        id,
                        parts: Vec::new(),
                        asked: None,
                        of_owner: false,
                        lacked: 0,
                    },
                );
                self.waiting.push_back((now, id.addr));
            }
        }
        None
    }

    /// Forgets the card of the member at `addr` (it is down).
    pub(crate) fn forget(&mut self, addr: SocketAddr) {
        self.unhold(addr);
        self.take_early(addr);
        self.unwant(addr);
    }

    /// Holds `card` as the card of `addr` at `generation` and `version`.
    fn hold(&mut self, addr: SocketAddr, generation: u64, version: u32, card: Arc<[u8]>) {
        self.unhold(addr);
        self.held_xor ^= card_key(addr, generation, version).hash();
        self.held.insert(addr, (generation, version, card));
        self.changes += 1;
    }

    /// Stops holding the card of `addr`.
    fn unhold(&mut self, addr: SocketAddr) {
        if let Some((generation, version, _)) = self.held.remove(&addr) {
            self.held_xor ^= card_key(addr, generation, version).hash();
            self.changes += 1;
        }
    }

    /// The count and XOR of the hashes of the identities of the cards we
    /// hold, ours (identity `me`) too: two members that hold the same
    /// cards have the same digest (each holds the other's card and its
    /// own), and a sync between them needs no answer.
    fn digest(&self, me: MemberId) -> (u32, u64) {
        let count = u32::try_from(self.held.len() + 1).unwrap_or(u32::MAX);
        (
            count,
            self.held_xor ^ card_key(me.addr, me.generation, me.version).hash(),
        )
    }

    /// Removes the card of `addr` kept aside, if any.
    fn take_early(&mut self, addr: SocketAddr) -> Option<Early> {
        let early = self.early.remove(&addr)?;
        self.changes += 1;
        self.early_bytes -= early.card.len();
        Some(early)
    }

    /// Drops the cards kept aside longer than [`EARLY_KEEP`] at `now`
    /// (their members never came up: gone before we saw them).
    pub(crate) fn expire_early(&mut self, now: Instant) {
        let bytes = &mut self.early_bytes;
        let changes = &mut self.changes;
        self.early.retain(|_, e| {
            let keep = e.since + EARLY_KEEP > now;
            if !keep {
                *bytes -= e.card.len();
                *changes += 1;
            }
            keep
        });
    }

    /// Stops wanting the card at `addr`; returns what was wanted.
    fn unwant(&mut self, addr: SocketAddr) -> Option<Want> {
        let want = self.wants.remove(&addr)?;
        if want.asked.is_some() {
            self.outstanding -= 1;
        }
        Some(want)
    }

    /// Marks the card at `addr` as answered, or as no longer waited for;
    /// returns its want.
    fn unask(&mut self, addr: SocketAddr) -> Option<&mut Want> {
        let want = self.wants.get_mut(&addr)?;
        if want.asked.take().is_some() {
            self.outstanding -= 1;
        }
        Some(want)
    }

    /// A helper lacked the card at `addr` (not asked any more) at `now`:
    /// it waits for another helper, or, after [`HELPER_TRIES`], is asked
    /// of its owner.
    fn lacked(&mut self, addr: SocketAddr, now: Instant) {
        let Some(want) = self.wants.get_mut(&addr) else {
            return;
        };
        want.lacked = want.lacked.saturating_add(1);
        if want.lacked >= HELPER_TRIES {
            want.of_owner = true;
            self.of_owners.push_back(addr);
        } else {
            self.waiting.push_back((now, addr));
        }
    }

    /// Marks the card at `addr` as asked for at `now`; returns its want,
    /// `None` when it is not wanted or already asked for.
    fn mark_asked(&mut self, addr: SocketAddr, now: Instant) -> Option<&mut Want> {
        let want = self.wants.get_mut(&addr)?;
        if want.asked.is_some() {
            return None;
        }
        want.asked = Some(now);
        self.outstanding += 1;
        self.asking.push_back((now, addr));
        Some(want)
    }

    /// Cards wanted and not held yet.
    pub(crate) fn wanted(&self) -> usize {
        self.wants.len()
    }

    /// When [`Cards::poll`] has something to do next: the earliest
    /// outstanding ask's retry, or (with room for more asks) the end of the
    /// oldest card's gathering.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let retry = self.asking.front().map(|(at, _)| *at + ASK_AGAIN);
        let room = self.outstanding < MAX_ASKING;
        let gathered = self
            .waiting
            .front()
            .filter(|_| room)
            .map(|(at, _)| *at + self.gather());
        retry.into_iter().chain(gathered).min()
    }

    /// How long the waiting cards are gathered: [`GATHER_ALONE`] for a
    /// card alone, else as long as the cluster's size says (see
    /// [`GATHER`]).
    fn gather(&self) -> Duration {
        if self.waiting.len() == 1 {
            GATHER_ALONE
        } else {
            self.gather
        }
    }

    /// Sets the gathering for a cluster of `members` (see [`GATHER`]).
    pub(crate) fn set_members(&mut self, members: usize) {
        let members = u64::try_from(members).unwrap_or(u64::MAX);
        let per_member = Duration::from_millis(members.saturating_mul(4));
        self.gather = per_member.clamp(GATHER_ALONE, GATHER);
    }

    /// The asks to send now, up to [`MAX_ASKING`] cards outstanding: asks
    /// whose answer is overdue again (of the owner), then cards a helper
    /// lacked (of their owners), then, once gathered, waiting cards: of
    /// the member `helper` picks when there are several, else of their
    /// owners.
    pub(crate) fn poll(
        &mut self,
        now: Instant,
        helper: impl FnOnce() -> Option<SocketAddr>,
    ) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut out = Vec::new();
        let mut overdue = Vec::new();
        while let Some(&(at, addr)) = self.asking.front() {
            if at + ASK_AGAIN > now {
                break;
            }
            self.asking.pop_front();
            if self.wants.get(&addr).is_some_and(|w| w.asked == Some(at)) {
                overdue.push(addr);
            }
        }
        // Overdue asks of owners go first, oldest first; of helpers, as
        // if the helper lacked the card (a member that does not know us
        // yet does not answer).
        for addr in overdue.into_iter().rev() {
            if let Some(want) = self.unask(addr) {
                if want.of_owner {
                    self.of_owners.push_front(addr);
                } else {
                    self.lacked(addr, now);
                }
            }
        }
        while self.outstanding < MAX_ASKING {
            let Some(addr) = self.of_owners.pop_front() else {
                break;
            };
            if let Some(ask) = self.ask(addr, now) {
                out.push((addr, ask));
            }
        }
        let gathered = self
            .waiting
            .front()
            .is_some_and(|(at, _)| *at + self.gather() <= now);
        if !gathered || self.outstanding >= MAX_ASKING {
            return out;
        }
        // A whole batch of a helper, even past the cap (by less than a
        // batch): asks of one card each would waste the gathering.
        let mut batch = Vec::new();
        while batch.len() < ASK_MANY_MAX {
            let Some((_, addr)) = self.waiting.pop_front() else {
                break;
            };
            if self.wants.get(&addr).is_some_and(|w| w.asked.is_none()) {
                batch.push(addr);
            }
        }
        let helper = if batch.len() > 1 { helper() } else { None };
        match helper {
            Some(helper) => out.push((helper, self.ask_many(&batch, now))),
            None => {
                let mut left = Vec::new();
                for addr in batch {
                    if self.outstanding >= MAX_ASKING {
                        left.push(addr);
                    } else if let Some(ask) = self.ask(addr, now) {
                        out.push((addr, ask));
                    }
                }
                // Back to the front, gathered already.
                for addr in left.into_iter().rev() {
                    self.waiting
                        .push_front((now.checked_sub(GATHER).unwrap_or(now), addr));
                }
            }
        }
        out
    }

    /// Asks for the cards at `addrs` (wanted, not asked) in one packet.
    fn ask_many(&mut self, addrs: &[SocketAddr], now: Instant) -> Vec<u8> {
        let mut named = Vec::with_capacity(addrs.len());
        for addr in addrs {
            if let Some(want) = self.mark_asked(*addr, now) {
                named.push(Named {
                    addr: *addr,
                    generation: want.id.generation,
                    version: want.id.version,
                });
            }
        }
        let mut packet = vec![KIND_ASK_MANY];
        // Addresses and numbers: encoding cannot fail.
        if let Ok(body) = postcard::to_allocvec(&named) {
            packet.extend_from_slice(&body);
        }
        packet
    }

    /// The answer to a [`KIND_ASK_MANY`] (`body`, its kind byte left out)
    /// from a member, our identity being `me`: the cards named that are
    /// held (of the generation named, at least the version), several to a
    /// packet, then a [`KIND_LACKING`] packet naming the others, if any.
    /// `None` when malformed or naming more than [`ASK_MANY_MAX`].
    pub(crate) fn answer_many(&self, me: MemberId, body: &[u8]) -> Option<Vec<Vec<u8>>> {
        let named: Vec<Named> = postcard::from_bytes(body).ok()?;
        if named.len() > ASK_MANY_MAX {
            return None;
        }
        let mut found = Vec::new();
        let mut lacking = Vec::new();
        for n in named {
            let held = if n.addr == me.addr {
                Some((me.generation, me.version, &self.own))
            } else {
                self.held.get(&n.addr).map(|(g, v, card)| (*g, *v, card))
            };
            match held {
                Some((generation, version, card))
                    if generation == n.generation
                        && version >= n.version
                        && card.len() + CARRIED_OVERHEAD <= PART_BYTES =>
                {
                    found.push((n.addr, (generation, version, card)));
                }
                _ => lacking.push(n.addr),
            }
        }
        let mut packets = pack(found.into_iter());
        if !lacking.is_empty() {
            let mut packet = vec![KIND_LACKING];
            if let Ok(body) = postcard::to_allocvec(&lacking) {
                packet.extend_from_slice(&body);
            }
            packets.push(packet);
        }
        Some(packets)
    }

    /// Takes a [`KIND_LACKING`] answer (`body`, its kind byte left out),
    /// received at `now`: the cards named that are still wanted wait for
    /// another helper, or, after [`HELPER_TRIES`], are asked of their
    /// owners. `None` when malformed.
    pub(crate) fn receive_lacking(&mut self, body: &[u8], now: Instant) -> Option<()> {
        let lacking: Vec<SocketAddr> = postcard::from_bytes(body).ok()?;
        for addr in lacking.into_iter().take(ASK_MANY_MAX) {
            let asked_helper = self
                .wants
                .get(&addr)
                .is_some_and(|w| w.asked.is_some() && !w.of_owner);
            if asked_helper {
                self.unask(addr);
                self.lacked(addr, now);
            }
        }
        Some(())
    }

    /// Asks `addr` for the first part of its card still missing, if its
    /// card is wanted and not being asked for.
    fn ask(&mut self, addr: SocketAddr, now: Instant) -> Option<Vec<u8>> {
        let want = self.mark_asked(addr, now)?;
        // Asked again of the owner if unanswered.
        want.of_owner = true;
        let mut ask = Vec::with_capacity(ASK_LEN);
        ask.push(KIND_ASK);
        ask.extend_from_slice(&want.id.generation.to_le_bytes());
        ask.extend_from_slice(&u64::from(want.id.version).to_le_bytes());
        ask.extend_from_slice(&want.missing().to_le_bytes());
        Some(ask)
    }

    /// The answer to an ask (`packet`, its kind byte included) for part of
    /// our card, whose identity is `me`; `None` for a malformed ask.
    pub(crate) fn answer(&self, me: MemberId, packet: &[u8]) -> Option<Vec<u8>> {
        if packet.len() != ASK_LEN || packet.first() != Some(&KIND_ASK) {
            return None;
        }
        let part = u16::from_le_bytes([packet[17], packet[18]]);
        let parts = self.own.chunks(PART_BYTES).len().clamp(1, MAX_PARTS);
        let index = if usize::from(part) < parts { part } else { 0 };
        let start = usize::from(index) * PART_BYTES;
        let body = self
            .own
            .get(start..(start + PART_BYTES).min(self.own.len()))
            .unwrap_or_default();
        let mut out = Vec::with_capacity(PART_HEADER + body.len());
        out.push(KIND_PART);
        out.extend_from_slice(&me.generation.to_le_bytes());
        out.extend_from_slice(&u64::from(me.version).to_le_bytes());
        out.extend_from_slice(&index.to_le_bytes());
        out.extend_from_slice(&u16::try_from(parts).unwrap_or(u16::MAX).to_le_bytes());
        out.extend_from_slice(body);
        Some(out)
    }

    /// Takes a part of `from`'s card (`packet`, its kind byte included).
    /// Returns the card when it is complete, and the next ask when parts
    /// are still missing. A part nobody asked for, or of an older identity
    /// than wanted, is ignored.
    pub(crate) fn receive(
        &mut self,
        from: SocketAddr,
        packet: &[u8],
        now: Instant,
    ) -> (Option<Arrived>, Option<Vec<u8>>) {
        let Some((generation, version, index, parts, body)) = parse_part(packet) else {
            return (None, None);
        };
        let Some(want) = self.wants.get_mut(&from) else {
            return (None, None);
        };
        if (generation, version) < (want.id.generation, want.id.version) {
            return (None, None);
        }
        if (generation, version) != (want.id.generation, want.id.version)
            || want.parts.len() != usize::from(parts)
        {
            // A later card than the identity gossiped so far: take it.
            want.id = MemberId {
                generation,
                version,
                ..want.id
            };
            want.parts = vec![None; usize::from(parts)];
        }
        if let Some(slot) = want.parts.get_mut(usize::from(index)) {
            *slot = Some(body.to_vec());
        }
        let incomplete = want.parts.iter().any(Option::is_none);
        self.unask(from);
        if incomplete {
            return (None, self.ask(from, now));
        }
        let Some(want) = self.unwant(from) else {
            return (None, None);
        };
        let card: Arc<[u8]> = want
            .parts
            .into_iter()
            .flatten()
            .flatten()
            .collect::<Vec<u8>>()
            .into();
        self.hold(from, generation, version, card.clone());
        let arrived = Arrived { id: want.id, card };
        (Some(arrived), None)
    }

    /// Takes the cards of a [`KIND_CARDS`] packet (its kind byte left
    /// out): returns those wanted (of the generation wanted, at least the
    /// version); keeps aside those of members not wanted, newer than held
    /// (see [`Cards::want`]). `None` when malformed.
    pub(crate) fn receive_bulk(&mut self, body: &[u8], now: Instant) -> Option<Vec<Arrived>> {
        let carried: Vec<Carried> = postcard::from_bytes(body).ok()?;
        let mut arrived = Vec::new();
        for c in carried {
            let Some(want) = self.wants.get(&c.addr) else {
                // Not wanted: of a member not seen up yet (a sync's answer
                // brings every card the sender holds), kept for when it
                // is; or one held already.
                let newer = |(g, v): (u64, u32)| (c.generation, c.version) > (g, v);
                let held = self.held.get(&c.addr).map(|(g, v, _)| (*g, *v));
                let early = self.early.get(&c.addr).map(|e| (e.generation, e.version));
                if held.is_none_or(newer) && early.is_none_or(newer) {
                    self.take_early(c.addr);
                    if self.early_bytes + c.card.len() <= EARLY_MAX {
                        self.early_bytes += c.card.len();
                        let early = Early {
                            generation: c.generation,
                            version: c.version,
                            card: c.card.into(),
                            since: now,
                        };
                        self.early.insert(c.addr, early);
                        self.changes += 1;
                    }
                }
                continue;
            };
            let usable = c.generation == want.id.generation && c.version >= want.id.version;
            if !usable {
                continue;
            }
            let id = MemberId {
                version: c.version,
                ..want.id
            };
            self.unwant(c.addr);
            let card: Arc<[u8]> = c.card.into();
            self.hold(c.addr, c.generation, c.version, card.clone());
            arrived.push(Arrived { id, card });
        }
        Some(arrived)
    }
}

impl Cards {
    /// A [`KIND_SYNC`] packet: the digest of the cards we hold (ours,
    /// identity `me`, too; see [`Cards::digest`]), then a Bloom filter
    /// (hashed with `seed`) of those and of the cards kept aside. The
    /// packet is built again only when what it summarises changed (until
    /// then, with the seed it was built with).
    pub(crate) fn sync_ask(&mut self, me: MemberId, seed: u32) -> Vec<u8> {
        if let Some((id, changes, packet)) = &self.last_sync
            && (*id, *changes) == (me, self.changes)
        {
            return packet.clone();
        }
        let keys = self
            .held
            .iter()
            .map(|(addr, (g, v, _))| card_key(*addr, *g, *v))
            .chain(
                self.early
                    .iter()
                    .map(|(a, e)| card_key(*a, e.generation, e.version)),
            )
            .chain(std::iter::once(card_key(
                me.addr,
                me.generation,
                me.version,
            )));
        let mut filter = Bloom::for_keys(seed, self.held.len() + self.early.len() + 1);
        for key in keys {
            filter.insert(&key);
        }
        let (count, xor) = self.digest(me);
        let mut packet = vec![KIND_SYNC];
        packet.extend_from_slice(&count.to_le_bytes());
        packet.extend_from_slice(&xor.to_le_bytes());
        filter.encode_into(&mut packet);
        self.last_sync = Some((me, self.changes, packet.clone()));
        packet
    }

    /// The answer to a [`KIND_SYNC`] (`body`, its kind byte left out) from
    /// the member at `to`, our identity being `me`: nothing when its digest
    /// is ours (we hold the same cards), else the cards held (ours too, not
    /// its own) that are not in its filter, several to a packet, at most
    /// [`SYNC_ANSWER_PACKETS`] packets. `None` when malformed.
    pub(crate) fn answer_sync(
        &self,
        me: MemberId,
        to: SocketAddr,
        body: &[u8],
    ) -> Option<Vec<Vec<u8>>> {
        let count = u32::from_le_bytes(body.get(..4)?.try_into().ok()?);
        let xor = u64::from_le_bytes(body.get(4..12)?.try_into().ok()?);
        let filter = Bloom::decode(body.get(12..)?)?;
        if (count, xor) == self.digest(me) {
            return Some(Vec::new());
        }
        let own = (me.addr, (me.generation, me.version, &self.own));
        let lacking = self
            .held
            .iter()
            .map(|(addr, (g, v, card))| (*addr, (*g, *v, card)))
            .chain(std::iter::once(own))
            .filter(|(addr, (g, v, _))| *addr != to && !filter.contains(&card_key(*addr, *g, *v)));
        let mut packets = pack(lacking);
        packets.truncate(SYNC_ANSWER_PACKETS);
        Some(packets)
    }
}

/// What identifies a card in a [`KIND_SYNC`] filter.
fn card_key(addr: SocketAddr, generation: u64, version: u32) -> Key {
    Key::new(addr, [generation, u64::from(version), 0])
}

/// Bytes of a card in a [`KIND_CARDS`] packet beyond the card itself
/// (address, numbers and length prefix), at most.
const CARRIED_OVERHEAD: usize = 40;

/// Cards (address, generation, version, card) packed into [`KIND_CARDS`]
/// packets of at most [`PART_BYTES`] bytes of cards; a card too large for
/// a packet is left out.
fn pack<'a>(cards: impl Iterator<Item = (SocketAddr, (u64, u32, &'a Arc<[u8]>))>) -> Vec<Vec<u8>> {
    let mut packets = Vec::new();
    let mut batch: Vec<Carried> = Vec::new();
    let mut size = 0;
    for (addr, (generation, version, card)) in cards {
        let len = card.len() + CARRIED_OVERHEAD;
        if len > PART_BYTES {
            continue;
        }
        if size + len > PART_BYTES {
            packets.push(encode_carried(&batch));
            batch.clear();
            size = 0;
        }
        batch.push(Carried {
            addr,
            generation,
            version,
            card: card.to_vec(),
        });
        size += len;
    }
    if !batch.is_empty() {
        packets.push(encode_carried(&batch));
    }
    packets
}

/// A [`KIND_CARDS`] packet of `cards`.
fn encode_carried(cards: &[Carried]) -> Vec<u8> {
    let mut packet = vec![KIND_CARDS];
    // Addresses, numbers and bytes: encoding cannot fail.
    if let Ok(body) = postcard::to_allocvec(cards) {
        packet.extend_from_slice(&body);
    }
    packet
}

/// The header fields and body of a part; `None` when malformed.
fn parse_part(packet: &[u8]) -> Option<(u64, u32, u16, u16, &[u8])> {
    if packet.first() != Some(&KIND_PART) {
        return None;
    }
    let header = packet.get(..PART_HEADER)?;
    let u64_at = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(header.get(at..at + 8)?.try_into().ok()?))
    };
    let generation = u64_at(1)?;
    let version = u32::try_from(u64_at(9)?).ok()?;
    let index = u16::from_le_bytes([header[17], header[18]]);
    let parts = u16::from_le_bytes([header[19], header[20]]);
    let body = &packet[PART_HEADER..];
    let valid =
        parts >= 1 && usize::from(parts) <= MAX_PARTS && index < parts && body.len() <= PART_BYTES;
    valid.then_some((generation, version, index, parts, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(port: u16, generation: u64, version: u32) -> MemberId {
        MemberId {
            addr: SocketAddr::from(([10, 0, 0, 1], port)),
            generation,
            version,
            rejoin: 0,
        }
    }

    /// Asks until the card of `owner` (holding `card`) arrives at `cards`.
    fn fetch(cards: &mut Cards, owner: MemberId, card: &[u8]) -> Arrived {
        let own = Cards::new(card.into());
        let now = Instant::now();
        let mut asks = cards.poll(now + GATHER, || None);
        for _ in 0..MAX_PARTS + 1 {
            let Some((to, ask)) = asks.pop() else { break };
            assert_eq!(to, owner.addr);
            let part = own.answer(owner, &ask).expect("an answer");
            match cards.receive(owner.addr, &part, now) {
                (Some(arrived), None) => return arrived,
                (None, Some(next)) => asks.push((owner.addr, next)),
                other => panic!("unexpected {other:?}"),
            }
        }
        panic!("the card never arrived");
    }

    #[test]
    fn a_wanted_card_is_asked_for_and_arrives() {
        let mut cards = Cards::new(Arc::from(&b"mine"[..]));
        let b = id(2, 1, 1);
        cards.want(b, Instant::now());
        assert_eq!(cards.wants.len(), 1);
        let arrived = fetch(&mut cards, b, b"hello");
        assert_eq!(arrived.id, b);
        assert_eq!(&*arrived.card, b"hello");
        assert_eq!(cards.wants.len(), 0);
        // Held: the same identity is not wanted again, nor the same card
        // after a rejoin; a newer version is.
        cards.want(b, Instant::now());
        cards.want(MemberId { rejoin: 1, ..b }, Instant::now());
        assert_eq!(cards.wants.len(), 0);
        cards.want(id(2, 1, 2), Instant::now());
        assert_eq!(cards.wants.len(), 1);
    }

    #[test]
    fn a_sync_brings_what_the_asker_lacks_and_keeps_cards_of_members_not_seen_yet() {
        let mut holder = Cards::new(Arc::from(&b"holder's"[..]));
        for port in 2..=40u16 {
            holder.want(id(port, 1, 1), Instant::now());
            fetch(
                &mut holder,
                id(port, 1, 1),
                format!("card {port}").as_bytes(),
            );
        }
        // Too large for a packet: left out (its owner is asked).
        holder.want(id(50, 1, 1), Instant::now());
        fetch(&mut holder, id(50, 1, 1), &[7u8; PART_BYTES]);
        let me = id(1, 1, 3);

        let start = Instant::now();
        let mut joiner = Cards::new(Arc::from(&b"joiner's"[..]));
        let joiner_id = id(60, 1, 1);
        joiner.want(id(3, 1, 1), start);
        fetch(&mut joiner, id(3, 1, 1), b"card 3");
        joiner.want(me, start);
        joiner.want(id(7, 1, 1), start);
        joiner.want(id(8, 2, 1), start); // another generation than held: not taken
        joiner.want(id(50, 1, 1), start);

        let ask = joiner.sync_ask(joiner_id, 99);
        assert_eq!(ask[0], KIND_SYNC);
        assert!(ask.len() <= PART_BYTES);
        let packets = holder
            .answer_sync(me, joiner_id.addr, &ask[1..])
            .expect("an answer");
        assert!(packets.len() > 1, "several packets");
        assert!(
            packets
                .iter()
                .all(|p| p[0] == KIND_CARDS && p.len() <= PART_BYTES + 1)
        );
        let arrived: Vec<Arrived> = packets
            .iter()
            .flat_map(|p| joiner.receive_bulk(&p[1..], start).expect("well formed"))
            .collect();
        let ids: Vec<MemberId> = arrived.iter().map(|a| a.id).collect();
        assert_eq!(ids.len(), 2, "{ids:?}");
        assert!(ids.contains(&me) && ids.contains(&id(7, 1, 1)));
        assert!(arrived.iter().any(|a| &*a.card == b"card 7"));
        assert_eq!(joiner.wants.len(), 2, "8 and 50 are asked for");
        // Held already: not sent again. Not wanted yet: kept aside, and
        // taken at once when the member comes up.
        assert_eq!(
            joiner.early.len(),
            40 - 2 - 2,
            "2..=40 but 3, 7 and 8 (8 is wanted newer)"
        );
        let early = joiner.want(id(9, 1, 1), start).expect("kept aside");
        assert_eq!(&*early.card, b"card 9");
        assert!(!joiner.wants.contains_key(&id(9, 1, 1).addr));
        // Asked again, nothing more is sent than the asker lacks.
        let again = joiner.sync_ask(joiner_id, 100);
        let rest = holder
            .answer_sync(me, joiner_id.addr, &again[1..])
            .expect("an answer");
        let carried: usize = rest
            .iter()
            .map(|p| postcard::from_bytes::<Vec<Carried>>(&p[1..]).map_or(0, |c| c.len()))
            .sum();
        assert_eq!(
            carried, 1,
            "only the card of 8 of the generation held there"
        );
        // Kept aside too long: dropped, and wanted like any other.
        joiner.expire_early(start + EARLY_KEEP);
        assert!(joiner.early.is_empty() && joiner.early_bytes == 0);
        assert!(joiner.want(id(10, 1, 1), start + EARLY_KEEP).is_none());
        assert!(joiner.wants.contains_key(&id(10, 1, 1).addr));
        assert!(joiner.receive_bulk(&[0xff, 0xff], start).is_none());
        assert!(
            holder.answer_sync(me, joiner_id.addr, &[1, 2]).is_none(),
            "a malformed filter"
        );
    }

    #[test]
    fn members_holding_the_same_cards_answer_a_sync_with_nothing() {
        let (a_id, b_id, c_id) = (id(1, 1, 1), id(2, 1, 1), id(3, 1, 1));
        let mut a = Cards::new(Arc::from(&b"a"[..]));
        let mut b = Cards::new(Arc::from(&b"b"[..]));
        for (cards, other, card) in [(&mut a, b_id, &b"b"[..]), (&mut b, a_id, &b"a"[..])] {
            cards.want(other, Instant::now());
            fetch(cards, other, card);
            cards.want(c_id, Instant::now());
            fetch(cards, c_id, b"c");
        }
        let ask = a.sync_ask(a_id, 1);
        assert_eq!(a.sync_ask(a_id, 2), ask, "nothing changed: the same packet");
        assert_eq!(
            b.answer_sync(b_id, a_id.addr, &ask[1..]),
            Some(Vec::new()),
            "same digest"
        );
        // b holds a card a lacks: the digests differ and the card is sent.
        b.want(id(4, 1, 1), Instant::now());
        fetch(&mut b, id(4, 1, 1), b"d");
        let answer = b
            .answer_sync(b_id, a_id.addr, &ask[1..])
            .expect("an answer");
        let arrived = a
            .receive_bulk(&answer[0][1..], Instant::now())
            .expect("cards");
        assert!(arrived.is_empty(), "4 is not up at a: kept aside");
        assert_eq!(a.early.len(), 1);
        assert_ne!(a.sync_ask(a_id, 3), ask, "a filter of what changed");
        // Once a holds it (4 came up), the digests agree again.
        assert!(a.want(id(4, 1, 1), Instant::now()).is_some());
        let ask = a.sync_ask(a_id, 4);
        assert_eq!(b.answer_sync(b_id, a_id.addr, &ask[1..]), Some(Vec::new()));
        // Our own card's new version changes the digest; the answer does
        // not send us our own card back.
        let ask = a.sync_ask(id(1, 1, 2), 5);
        let answer = b
            .answer_sync(b_id, a_id.addr, &ask[1..])
            .expect("an answer");
        let carried: Vec<Carried> = answer
            .iter()
            .flat_map(|p| postcard::from_bytes::<Vec<Carried>>(&p[1..]).expect("cards"))
            .collect();
        // b holds nothing else that a lacks: a's own old card, the one
        // card outside a's filter, is not sent.
        assert!(carried.is_empty(), "{carried:?}");
    }

    #[test]
    fn cards_are_gathered_longer_in_larger_clusters_and_briefly_alone() {
        let start = Instant::now();
        let mut cards = Cards::new(Arc::from(&b""[..]));
        cards.want(id(2, 1, 1), start);
        assert_eq!(cards.next_deadline(), Some(start + GATHER_ALONE), "alone");
        cards.want(id(3, 1, 1), start);
        assert_eq!(
            cards.next_deadline(),
            Some(start + GATHER_ALONE),
            "a small cluster"
        );
        cards.set_members(100);
        assert_eq!(
            cards.next_deadline(),
            Some(start + Duration::from_millis(400))
        );
        cards.set_members(3000);
        assert_eq!(cards.next_deadline(), Some(start + GATHER), "at most");
        assert!(
            cards
                .poll(start + GATHER - Duration::from_millis(1), || None)
                .is_empty()
        );
        assert_eq!(
            cards.poll(start + GATHER, || None).len(),
            2,
            "one ask each, of owners"
        );
    }

    #[test]
    fn large_cards_come_in_parts() {
        let big: Vec<u8> = (0..PART_BYTES * 3 + 17).map(|i| i as u8).collect();
        let mut cards = Cards::new(Arc::from(&b""[..]));
        cards.want(id(3, 1, 1), Instant::now());
        let arrived = fetch(&mut cards, id(3, 1, 1), &big);
        assert_eq!(&*arrived.card, &big[..]);
    }

    #[test]
    fn unanswered_asks_are_sent_again_and_capped() {
        let mut cards = Cards::new(Arc::from(&b""[..]));
        cards.set_members(5000);
        let start = Instant::now();
        for port in 1..=(MAX_ASKING as u16 + 10) {
            cards.want(id(port, 1, 1), start);
        }
        assert_eq!(cards.next_deadline(), Some(start + GATHER));
        let gathered = start + GATHER;
        let mut asked = 0;
        for _ in 0..MAX_ASKING {
            let asks = cards.poll(gathered, || None);
            if asks.is_empty() {
                break;
            }
            assert!(
                asks.iter()
                    .all(|(to, ask)| ask[0] == KIND_ASK && to.port() >= 1)
            );
            asked += asks.len();
        }
        assert_eq!(asked, MAX_ASKING, "no more than the cap at once");
        assert_eq!(cards.next_deadline(), Some(gathered + ASK_AGAIN));
        // Overdue: the same asks again (the oldest first), still capped.
        let again = cards.poll(gathered + ASK_AGAIN, || None);
        assert_eq!(again.len(), MAX_ASKING);
        assert_eq!(again[0].0, id(1, 1, 1).addr);
    }

    #[test]
    fn an_answer_frees_its_ask_at_once() {
        let start = Instant::now();
        let mut cards = Cards::new(Arc::from(&b""[..]));
        for port in 1..=(MAX_ASKING as u16 + 10) {
            cards.want(id(port, 1, 1), start);
        }
        let now = start + GATHER;
        let mut asks = Vec::new();
        for _ in 0..MAX_ASKING {
            let more = cards.poll(now, || None);
            if more.is_empty() {
                break;
            }
            asks.extend(more);
        }
        assert_eq!(asks.len(), MAX_ASKING);
        let (owner, ask) = &asks[0];
        let owner_id = id(owner.port(), 1, 1);
        let part = Cards::new(Arc::from(&b"c"[..]))
            .answer(owner_id, ask)
            .expect("answer");
        assert!(cards.receive(*owner, &part, now).0.is_some());
        // Not after the answered ask's retry time: now.
        assert_eq!(cards.poll(now, || None).len(), 1);
    }

    #[test]
    fn a_card_alone_waits_to_be_gathered_then_goes_to_its_owner() {
        let mut cards = Cards::new(Arc::from(&b""[..]));
        let start = Instant::now();
        cards.want(id(2, 1, 1), start);
        let helper = SocketAddr::from(([10, 0, 0, 9], 9));
        assert!(cards.poll(start, || Some(helper)).is_empty(), "gathering");
        let asks = cards.poll(start + GATHER, || Some(helper));
        assert_eq!(asks.len(), 1);
        assert_eq!(asks[0].0, id(2, 1, 1).addr, "one card: of its owner");
    }

    #[test]
    fn many_cards_come_from_a_helper_and_what_it_lacks_from_owners() {
        // The helper holds the cards of ports 2..=8 and its own (port 20).
        let helper_id = id(20, 1, 1);
        let mut helper = Cards::new(Arc::from(&b"helper's"[..]));
        for port in 2..=8u16 {
            helper.want(id(port, 1, 1), Instant::now());
            fetch(
                &mut helper,
                id(port, 1, 1),
                format!("card {port}").as_bytes(),
            );
        }
        let start = Instant::now();
        let mut joiner = Cards::new(Arc::from(&b""[..]));
        for port in (2..=11u16).chain([20]) {
            joiner.want(id(port, 1, 1), start);
        }
        let later = start + GATHER;
        let asks = joiner.poll(later, || Some(helper_id.addr));
        assert_eq!(asks.len(), 1, "one ask names them all");
        let (to, ask) = &asks[0];
        assert_eq!((*to, ask[0]), (helper_id.addr, KIND_ASK_MANY));
        assert!(ask.len() <= PART_BYTES);
        let answer = helper.answer_many(helper_id, &ask[1..]).expect("answer");
        let (lacking, cards): (Vec<_>, Vec<_>) = answer.iter().partition(|p| p[0] == KIND_LACKING);
        assert_eq!(lacking.len(), 1);
        let arrived: Vec<Arrived> = cards
            .iter()
            .flat_map(|p| {
                joiner
                    .receive_bulk(&p[1..], Instant::now())
                    .expect("well formed")
            })
            .collect();
        assert_eq!(arrived.len(), 8, "ports 2..=8 and the helper's own");
        assert!(arrived.iter().any(|a| &*a.card == b"helper's"));
        assert!(
            joiner.poll(later, || None).is_empty(),
            "the rest still asked"
        );
        // Lacked by every helper asked: then asked of the owners.
        let mut lacking = lacking[0].clone();
        for tries in 1..=HELPER_TRIES {
            joiner
                .receive_lacking(&lacking[1..], later)
                .expect("well formed");
            if tries == HELPER_TRIES {
                break;
            }
            let asks = joiner.poll(later + GATHER, || Some(helper_id.addr));
            assert_eq!(asks.len(), 1, "another helper, after gathering");
            let answer = helper
                .answer_many(helper_id, &asks[0].1[1..])
                .expect("answer");
            assert_eq!(answer.len(), 1, "{answer:?}");
            lacking = answer[0].clone();
        }
        let mut owners: Vec<u16> = joiner
            .poll(later, || Some(helper_id.addr))
            .iter()
            .map(|(to, ask)| {
                assert_eq!(ask[0], KIND_ASK);
                to.port()
            })
            .collect();
        owners.sort_unstable();
        assert_eq!(owners, [9, 10, 11], "what the helper lacks, of the owners");
        assert!(joiner.receive_lacking(&[0xff, 0xff], later).is_none());
        // Malformed or too long asks get no answer.
        assert!(helper.answer_many(helper_id, &[0xff, 0xff]).is_none());
        let named: Vec<Named> = (0..=ASK_MANY_MAX as u16)
            .map(|port| Named {
                addr: id(port, 1, 1).addr,
                generation: 1,
                version: 1,
            })
            .collect();
        let body = postcard::to_allocvec(&named).expect("encodes");
        assert!(helper.answer_many(helper_id, &body).is_none());
    }

    #[test]
    fn unanswered_asks_of_helpers_go_to_others_then_to_the_owner() {
        let mut now = Instant::now();
        let mut cards = Cards::new(Arc::from(&b""[..]));
        cards.want(id(2, 1, 1), now);
        cards.want(id(3, 1, 1), now);
        let helper = SocketAddr::from(([10, 0, 0, 9], 9));
        now += GATHER;
        for tries in 1..=HELPER_TRIES {
            let asks = cards.poll(now, || Some(helper));
            assert_eq!(asks.len(), 1, "both of a helper");
            assert_eq!((asks[0].0, asks[0].1[0]), (helper, KIND_ASK_MANY));
            now += ASK_AGAIN;
            let again = cards.poll(now, || Some(helper));
            if tries < HELPER_TRIES {
                // Overdue: gathered again for another helper.
                assert!(again.is_empty(), "{again:?}");
                now += GATHER;
                continue;
            }
            let mut owners: Vec<(u16, u8)> =
                again.iter().map(|(to, ask)| (to.port(), ask[0])).collect();
            owners.sort_unstable();
            assert_eq!(owners, [(2, KIND_ASK), (3, KIND_ASK)]);
        }
    }

    #[test]
    fn stale_unasked_and_malformed_parts_are_ignored() {
        let owner = id(2, 5, 3);
        let mut cards = Cards::new(Arc::from(&b""[..]));
        let now = Instant::now();
        let part = Cards::new(Arc::from(&b"x"[..]))
            .answer(id(2, 5, 2), &{
                let mut c = Cards::new(Arc::from(&b""[..]));
                c.want(owner, now);
                c.poll(now + GATHER, || None).remove(0).1
            })
            .expect("answer");
        // Nobody asked.
        assert_eq!(cards.receive(owner.addr, &part, now), (None, None));
        // Older than wanted.
        cards.want(owner, Instant::now());
        assert_eq!(cards.receive(owner.addr, &part, now), (None, None));
        for bad in [&[][..], &[KIND_PART][..], &[KIND_ASK; 40][..]] {
            assert_eq!(cards.receive(owner.addr, bad, now), (None, None));
            assert_eq!(Cards::new(Arc::from(&b""[..])).answer(owner, bad), None);
        }
        assert_eq!(cards.wants.len(), 1);
    }

    #[test]
    fn a_newer_card_than_gossiped_is_taken_and_forget_drops_all() {
        let mut cards = Cards::new(Arc::from(&b""[..]));
        cards.want(id(2, 1, 1), Instant::now());
        // The owner moved on to version 4 before our ask.
        let arrived = fetch(&mut cards, id(2, 1, 4), b"v4");
        assert_eq!(arrived.id, id(2, 1, 4));
        cards.want(id(2, 1, 3), Instant::now());
        assert_eq!(cards.wants.len(), 0, "version 4 is held");
        cards.forget(id(2, 1, 1).addr);
        cards.want(id(2, 1, 3), Instant::now());
        assert_eq!(cards.wants.len(), 1);
    }
}
