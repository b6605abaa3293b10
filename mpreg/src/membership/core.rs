//! The gossip of one node without IO: SWIM (`foca`), the view of members
//! up, and the cards fetched from them ([`Cards`]). The driver (see the
//! parent module) feeds it packets, timers and commands with the time they
//! happen at, and sends what it queued; a simulation feeds it the same
//! from an in-memory network and a clock of its own.
//!
//! # Packets
//!
//! Every packet on the gossip socket starts with one byte saying what it
//! is ([`KIND_SWIM`]: foca's; [`KIND_STATE_ASK`]/[`KIND_STATE`]: pulls of
//! the membership state; the others: cards, see [`Cards`]); with a cluster
//! secret, every packet ends with a tag over the rest, and a packet without
//! a valid tag is dropped unread.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use foca::{
    AccumulatingRuntime, Codec, Foca, Incarnation, Member, Message, OwnedNotification,
    PostcardCodec, State, Timer,
};
use rand::{RngExt, SeedableRng, rngs::SmallRng};
use tokio::time::Instant;

use super::bloom::{Bloom, Key};
use super::cards::{
    Cards, KIND_ASK, KIND_ASK_MANY, KIND_CARDS, KIND_LACKING, KIND_PART, KIND_SWIM, KIND_SYNC,
    PART_BYTES, SYNC_FAST, SYNC_SLOW,
};
use super::{MemberEvent, MemberId, MemberView, MembershipConfig, REANNOUNCE_AFTER_CHANGE};
use crate::auth::Secret;

/// An ask for the receiver's membership state: a Bloom filter of the
/// member records the sender holds (see [`member_key`]); the answer holds
/// the others.
pub(crate) const KIND_STATE_ASK: u8 = 3;
/// A part of the sender's membership state: members, postcard-encoded.
pub(crate) const KIND_STATE: u8 = 4;

/// Members in one packet of membership state: at most 43 bytes each
/// (an IPv6 address, three numbers and a state), so a part stays within
/// [`PART_BYTES`].
const STATE_PART_MEMBERS: usize = PART_BYTES / 44;

/// Most packets in the answer to one [`KIND_STATE_ASK`] (~1,300 members;
/// what is left comes with the next pull).
const STATE_ANSWER_PACKETS: usize = 48;

/// After joining, the membership state this node lacks is pulled from a
/// random member after this long, then twice as long each time up to
/// [`PULL_MAX`], and again this soon whenever a pull brought news:
/// anti-entropy for what gossip missed (a rumor reaches most nodes in a few
/// rounds, but a few nodes in a thousand miss it). The ask is a Bloom
/// filter of the records held, so an answer holds only what is missing
/// (and, once in a hundred, not all of it: the next pull, with another
/// seed, brings the rest).
const PULL_FIRST: std::time::Duration = std::time::Duration::from_millis(500);
/// The longest time between two pulls of the membership state: a node
/// that a rumor missed (a member down, say) learns it this late at most
/// (rumors are retransmitted only 2·log10(n+1) times). A pull that finds
/// nothing missing costs a packet each way and a pass over the members on
/// each side.
const PULL_MAX: std::time::Duration = std::time::Duration::from_secs(2);

/// The foca instance driven here: postcard on the wire, no custom
/// broadcasts (cards travel by syncs and asks of their own, see
/// [`Cards`]).
pub(crate) type SwimFoca = Foca<MemberId, PostcardCodec, SmallRng, foca::NoCustomBroadcast>;

/// One node's gossip state.
pub(crate) struct Core {
    foca: SwimFoca,
    /// What foca asked for in its last call; drained after each.
    runtime: AccumulatingRuntime<MemberId>,
    /// foca's timers, earliest first (then in foca's order, which puts an
    /// indirect probe before the next probe, as foca needs).
    timers: BinaryHeap<Reverse<(Instant, Timer<MemberId>)>>,
    /// The members up.
    view: MemberView,
    cards: Cards,
    secret: Option<Secret>,
    /// Packets to send, framed and tagged.
    outbox: Vec<(SocketAddr, Vec<u8>)>,
    /// Events for the cluster, in order.
    events: VecDeque<MemberEvent>,
    /// Packets dropped (unauthenticated, malformed, misaddressed).
    dropped: u64,
    /// Our identity, when foca renewed it (rejoin) since last asked.
    renewed: Option<MemberId>,
    /// When to pull the membership state from a random member next.
    next_pull: Option<Instant>,
    /// Picks the members to pull from, and when.
    rng: SmallRng,
    /// foca's configuration, and the cluster size its retransmissions are
    /// tuned for.
    config: foca::Config,
    tuned_for: usize,
    /// The time between the last pull and the next.
    pull_every: std::time::Duration,
    /// The latest state of each member given to foca (see [`Known`]).
    known: Known,
    /// The configured suspicion time, before it is scaled to the cluster's
    /// size.
    suspect_base: std::time::Duration,
    /// When to send the summary of our cards to a random member next.
    next_card_sync: Option<Instant>,
    /// The time between the last card sync and the next.
    card_sync_every: std::time::Duration,
    /// Whether a card arrived since the last card sync.
    cards_arrived: bool,
}

/// The latest state (in SWIM's order) of each member given to foca, by
/// address, so that updates which cannot be news are dropped before foca
/// sees them.
///
/// foca finds a member by a linear search of its member list: with a
/// thousand members, each update applied costs a thousand steps, and every
/// update reaches every node several times (it is retransmitted
/// `max_transmissions` times by every node that learns it). Nearly all
/// arrive as repeats. foca's state of a member only moves up SWIM's order
/// (a higher incarnation; at one incarnation, alive < suspect; down last)
/// and an update is applied only when it is above that state, so an update
/// not above one already given to foca for the same identity is one foca
/// would ignore: dropping it changes nothing (neither foca's state nor
/// what it gossips).
#[derive(Debug, Default)]
struct Known(HashMap<SocketAddr, (MemberId, Incarnation, State)>);

impl Known {
    /// Whether `update` may change foca's state: it is about a member not
    /// given yet, another identity at its address, or above the state given.
    fn is_news(&self, update: &Member<MemberId>) -> bool {
        let Some((id, incarnation, state)) = self.0.get(&update.id().addr) else {
            return true;
        };
        if id != update.id() {
            return true;
        }
        swim_rank(update.incarnation(), update.state()) > swim_rank(*incarnation, *state)
    }

    /// Records `update` as given to foca (if it is above what was).
    fn given(&mut self, update: &Member<MemberId>) {
        if self.is_news(update) {
            self.0.insert(
                update.id().addr,
                (*update.id(), update.incarnation(), update.state()),
            );
        }
    }
}

/// A member state's place in SWIM's order of precedence: a higher
/// incarnation first, then suspect over alive; down above everything.
fn swim_rank(incarnation: Incarnation, state: State) -> (u8, Incarnation, u8) {
    match state {
        State::Alive => (0, incarnation, 0),
        State::Suspect => (0, incarnation, 1),
        State::Down => (1, 0, 0),
    }
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("id", self.foca.identity())
            .field("members", &self.view.up.len())
            .finish_non_exhaustive()
    }
}

impl Core {
    /// A node with identity `id` offering `card`. Fails on timings foca
    /// cannot work with.
    pub(crate) fn new(
        id: MemberId,
        config: &MembershipConfig,
        rng: SmallRng,
        card: Arc<[u8]>,
    ) -> io::Result<Self> {
        let foca_config = config.foca_config()?;
        let mut rng = rng;
        let own_rng = SmallRng::from_rng(&mut rng);
        Ok(Self {
            foca: Foca::new(id, foca_config.clone(), rng, PostcardCodec),
            runtime: AccumulatingRuntime::new(),
            timers: BinaryHeap::new(),
            view: MemberView::default(),
            cards: Cards::new(card),
            secret: config.secret.clone(),
            outbox: Vec::new(),
            events: VecDeque::new(),
            dropped: 0,
            renewed: None,
            next_pull: None,
            rng: own_rng,
            config: foca_config.clone(),
            tuned_for: 0,
            pull_every: PULL_FIRST,
            known: Known::default(),
            next_card_sync: None,
            card_sync_every: SYNC_FAST,
            cards_arrived: false,
            suspect_base: foca_config.suspect_to_down_after,
        })
    }

    /// Our identity.
    pub(crate) fn id(&self) -> MemberId {
        *self.foca.identity()
    }

    /// The members up (not including ourselves).
    pub(crate) fn members(&self) -> Vec<MemberId> {
        self.view.members()
    }

    /// Packets dropped so far.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Takes the packets to send.
    pub(crate) fn take_outbox(&mut self) -> Vec<(SocketAddr, Vec<u8>)> {
        std::mem::take(&mut self.outbox)
    }

    /// Takes the next event.
    pub(crate) fn next_event(&mut self) -> Option<MemberEvent> {
        self.events.pop_front()
    }

    /// Our identity, if foca renewed it since the last call.
    pub(crate) fn take_renewed(&mut self) -> Option<MemberId> {
        self.renewed.take()
    }

    /// When [`Core::tick`] must run next.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let timer = self.timers.peek().map(|Reverse((at, _))| *at);
        [
            timer,
            self.cards.next_deadline(),
            self.next_pull,
            self.next_card_sync,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// A packet arrived from `from`.
    pub(crate) fn receive(&mut self, from: SocketAddr, received: &[u8], now: Instant) {
        let packet = match &self.secret {
            None => Some(received),
            Some(secret) => secret.open(received),
        };
        let Some((&kind, body)) = packet.and_then(<[u8]>::split_first) else {
            self.dropped += 1;
            tracing::debug!(%from, len = received.len(), "dropped an unauthenticated or empty gossip packet");
            return;
        };
        match kind {
            KIND_SWIM => {
                let filtered = self.without_repeats(body);
                let body = filtered.as_deref().unwrap_or(body);
                if let Err(error) = self.foca.handle_data(body, &mut self.runtime) {
                    self.dropped += 1;
                    tracing::debug!(%from, len = received.len(), %error, "dropped a membership packet");
                }
            }
            // Only members are answered: a stranger gets nothing to
            // reflect at someone else.
            KIND_ASK if self.view.up.contains_key(&from) => {
                let me = self.id();
                let whole = packet.unwrap_or_default();
                match self.cards.answer(me, whole) {
                    Some(answer) => self.queue(from, answer),
                    None => self.dropped += 1,
                }
            }
            KIND_STATE_ASK if self.view.up.contains_key(&from) => {
                let answer = Bloom::decode(body).map(|held| self.state_parts(&held, from));
                self.answer(from, answer);
            }
            KIND_ASK_MANY if self.view.up.contains_key(&from) => {
                let answer = self.cards.answer_many(self.id(), body);
                self.answer(from, answer);
            }
            KIND_SYNC if self.view.up.contains_key(&from) => {
                let answer = self.cards.answer_sync(self.id(), from, body);
                self.answer(from, answer);
            }
            KIND_LACKING => {
                if self.cards.receive_lacking(body, now).is_none() {
                    self.dropped += 1;
                }
            }
            KIND_CARDS => match self.cards.receive_bulk(body, now) {
                Some(arrived) => {
                    self.cards_arrived |= !arrived.is_empty();
                    self.events
                        .extend(arrived.into_iter().map(|a| MemberEvent::Card {
                            id: a.id,
                            card: a.card,
                        }));
                }
                None => self.dropped += 1,
            },
            KIND_STATE => match postcard::from_bytes::<Vec<Member<MemberId>>>(body) {
                // Not broadcast again: the sender has gossiped it already.
                Ok(members) => {
                    let me = self.id().addr;
                    let news: Vec<Member<MemberId>> = members
                        .into_iter()
                        .filter(|m| m.id().addr != me && self.known.is_news(m))
                        .collect();
                    for member in &news {
                        self.known.given(member);
                    }
                    // Gossip missed something: pull again soon, from
                    // another member (what this pull left out, as a false
                    // positive of our filter, comes then).
                    if !news.is_empty() {
                        self.pull_soon(now);
                    }
                    if let Err(error) =
                        self.foca
                            .apply_many(news.into_iter(), false, &mut self.runtime)
                    {
                        tracing::debug!(%from, %error, "membership state not applied");
                    }
                }
                Err(_) => self.dropped += 1,
            },
            KIND_ASK | KIND_ASK_MANY | KIND_STATE_ASK | KIND_SYNC => {
                tracing::debug!(%from, "gossip state asked for by a non-member");
            }
            KIND_PART => {
                let whole = packet.unwrap_or_default();
                let (arrived, next) = self.cards.receive(from, whole, now);
                if let Some(ask) = next {
                    self.queue(from, ask);
                }
                if let Some(arrived) = arrived {
                    self.events.push_back(MemberEvent::Card {
                        id: arrived.id,
                        card: arrived.card,
                    });
                }
            }
            _ => self.dropped += 1,
        }
        self.drain(now);
    }

    /// Queues `answer`'s packets for the member at `to`; `None` (its ask
    /// was malformed) is counted as a dropped packet.
    fn answer(&mut self, to: SocketAddr, answer: Option<Vec<Vec<u8>>>) {
        match answer {
            Some(packets) => {
                for packet in packets {
                    self.queue(to, packet);
                }
            }
            None => self.dropped += 1,
        }
    }

    /// `body` (a foca packet) without the updates that cannot be news (see
    /// [`Known`]), when it carries any; `None` to hand it to foca as it is.
    ///
    /// A packet's layout is foca's: its header, then (unless the message
    /// is an announce or a broadcast) a big-endian `u16` count of updates
    /// and the updates, then custom broadcasts (none here). Only a packet
    /// foca will apply the updates of is filtered: addressed to our
    /// identity, from a member up here (foca ignores the updates of a
    /// sender it holds down). Updates about ourselves always pass.
    fn without_repeats(&mut self, body: &[u8]) -> Option<Vec<u8>> {
        let mut rest = body;
        let header = Codec::<MemberId>::decode_header(&mut PostcardCodec, &mut rest).ok()?;
        let me = self.id();
        if header.dst != me
            || matches!(header.message, Message::Announce | Message::Broadcast)
            || self.view.up.get(&header.src.addr) != Some(&header.src)
        {
            return None;
        }
        let header_len = body.len() - rest.len();
        let (count, mut rest) = match rest {
            [high, low, tail @ ..] => (u16::from_be_bytes([*high, *low]), tail),
            _ => return None,
        };
        let mut kept = Vec::with_capacity(usize::from(count));
        let mut dropped = false;
        for _ in 0..count {
            let update = Codec::<MemberId>::decode_member(&mut PostcardCodec, &mut rest).ok()?;
            if update.id().addr == me.addr || self.known.is_news(&update) {
                kept.push(update);
            } else {
                dropped = true;
            }
        }
        for update in &kept {
            self.known.given(update);
        }
        if !dropped {
            return None;
        }
        let mut packet = Vec::with_capacity(body.len());
        packet.extend_from_slice(&body[..header_len]);
        // At most the count read: fits.
        let kept_count = u16::try_from(kept.len()).unwrap_or(count);
        packet.extend_from_slice(&kept_count.to_be_bytes());
        for update in &kept {
            Codec::<MemberId>::encode_member(&mut PostcardCodec, update, &mut packet).ok()?;
        }
        packet.extend_from_slice(rest);
        Some(packet)
    }

    /// Asks the node at `addr` to let us in.
    pub(crate) fn announce(&mut self, addr: SocketAddr, now: Instant) {
        if addr == self.id().addr {
            tracing::debug!(%addr, "not announcing to ourselves");
            return;
        }
        if let Err(error) = self
            .foca
            .announce(MemberId::placeholder(addr), &mut self.runtime)
        {
            tracing::debug!(%addr, %error, "announce failed");
        }
        self.drain(now);
    }

    /// Switches to identity `id` offering `card` (the card changed: `id`
    /// has a newer version).
    pub(crate) fn change_identity(&mut self, id: MemberId, card: Arc<[u8]>, now: Instant) {
        self.cards.set_own(card);
        if id == self.id() {
            return;
        }
        match self.foca.change_identity(id, &mut self.runtime) {
            Ok(()) => {
                // foca gossiped the change; it now waits for a member to
                // talk to the new identity before it probes again.
                // Announcing to a few members brings a reply right away.
                let peers: Vec<MemberId> = self
                    .foca
                    .iter_members()
                    .take(REANNOUNCE_AFTER_CHANGE)
                    .map(|member| *member.id())
                    .collect();
                for peer in peers {
                    if let Err(error) = self.foca.announce(peer, &mut self.runtime) {
                        tracing::debug!(?peer, %error, "announce after change failed");
                    }
                }
            }
            Err(error) => tracing::debug!(?id, %error, "changing identity failed"),
        }
        self.drain(now);
    }

    /// Our membership state (every member we know of, down ones too) for
    /// the member at `to`: but its own record and the records in `held`,
    /// in packets of at most [`STATE_PART_MEMBERS`] members, at most
    /// [`STATE_ANSWER_PACKETS`] packets.
    fn state_parts(&self, held: &Bloom, to: SocketAddr) -> Vec<Vec<u8>> {
        let members: Vec<&Member<MemberId>> = self
            .foca
            .iter_membership_state()
            .filter(|m| m.id().addr != to && !held.contains(&member_key(m)))
            .collect();
        members
            .chunks(STATE_PART_MEMBERS)
            .take(STATE_ANSWER_PACKETS)
            .map(encode_state)
            .collect()
    }

    /// Pulls the membership state again within [`PULL_FIRST`], then
    /// twice as late each time.
    fn pull_soon(&mut self, now: Instant) {
        self.pull_every = PULL_FIRST / 2;
        let soon = now + PULL_FIRST;
        if self.next_pull.is_none_or(|at| at > soon) {
            self.next_pull = Some(soon);
        }
    }

    /// Pulls from `from` the membership state we lack.
    fn pull_state_from(&mut self, from: SocketAddr) {
        let members: Vec<&Member<MemberId>> = self.foca.iter_membership_state().collect();
        let mut held = Bloom::for_keys(self.rng.random(), members.len() + 1);
        for member in members {
            held.insert(&member_key(member));
        }
        self.queue(from, held.encode(KIND_STATE_ASK));
    }

    /// Sends the summary of our cards to a random member (see
    /// [`KIND_SYNC`]), and sets the next sync: soon while cards arrive,
    /// else twice as late as the last, up to [`SYNC_SLOW`] (a card newly
    /// wanted brings the next sync forward, see [`Core::drain`]).
    fn sync_cards(&mut self, now: Instant) {
        self.card_sync_every = if self.cards_arrived {
            SYNC_FAST
        } else {
            (self.card_sync_every * 2).min(SYNC_SLOW)
        };
        self.cards_arrived = false;
        self.next_card_sync = Some(now + self.card_sync_every);
        self.cards.expire_early(now);
        if let Some(member) = self.random_member() {
            let ask = self.cards.sync_ask(self.id(), self.rng.random());
            self.queue(member, ask);
        }
    }

    /// A member up, picked at random.
    fn random_member(&mut self) -> Option<SocketAddr> {
        let count = self.view.up.len();
        if count == 0 {
            return None;
        }
        let pick = self.rng.random_range(0..count);
        self.view.up.keys().nth(pick).copied()
    }

    /// Runs what is due at `now`: foca's timers (in deadline, then foca's,
    /// order), the asks for cards and the periodic pull of the state.
    pub(crate) fn tick(&mut self, now: Instant) {
        if self.next_card_sync.is_some_and(|at| at <= now) {
            self.sync_cards(now);
        }
        if self.next_pull.is_some_and(|at| at <= now) {
            self.pull_every = (self.pull_every * 2).min(PULL_MAX);
            self.next_pull = Some(now + self.pull_every);
            if let Some(member) = self.random_member() {
                self.pull_state_from(member);
            }
        }
        while self
            .timers
            .peek()
            .is_some_and(|Reverse((at, _))| *at <= now)
        {
            let Some(Reverse((_, timer))) = self.timers.pop() else {
                break;
            };
            if let Err(error) = self.foca.handle_timer(timer, &mut self.runtime) {
                tracing::debug!(%error, "membership timer failed");
            }
            self.drain(now);
        }
        self.drain(now);
    }

    /// Leaves the cluster: the others see `Down` at once.
    pub(crate) fn leave(&mut self, now: Instant) {
        if let Err(error) = self.foca.leave_cluster(&mut self.runtime) {
            tracing::debug!(%error, "leaving the cluster failed");
        }
        self.drain(now);
    }

    /// Frames (and tags) a packet for `to`.
    fn queue(&mut self, to: SocketAddr, packet: Vec<u8>) {
        let packet = match &self.secret {
            None => packet,
            Some(secret) => {
                let tag = secret.tag(&packet);
                let mut tagged = packet;
                tagged.extend_from_slice(&tag);
                tagged
            }
        };
        self.outbox.push((to, packet));
    }

    /// Does what foca asked for in its last call (packets, timers,
    /// notifications), then asks for the cards now wanted.
    fn drain(&mut self, now: Instant) {
        while let Some((to, data)) = self.runtime.to_send() {
            let mut packet = Vec::with_capacity(data.len() + 1);
            packet.push(KIND_SWIM);
            packet.extend_from_slice(&data);
            self.queue(to.addr, packet);
        }
        while let Some((after, timer)) = self.runtime.to_schedule() {
            // Delays come from our config; saturate rather than overflow.
            let at = now
                .checked_add(after)
                .unwrap_or(now + super::REMOVE_DOWN_AFTER);
            self.timers.push(Reverse((at, timer)));
        }
        let mut early = Vec::new();
        let wanted_before = self.cards.wanted();
        while let Some(notification) = self.runtime.to_notify() {
            if let OwnedNotification::Rejoin(id) = &notification {
                // The cluster declared us down and foca renewed our identity.
                tracing::info!(?id, "rejoined the cluster with a renewed identity");
                self.renewed = Some(*id);
            }
            let alone = self.view.up.is_empty();
            if let Some(event) = self.view.apply(notification) {
                tracing::debug!(?event, "membership event");
                // The first member seen (at join, or after being cut off):
                // pull everything it knows at once, rather than waiting for
                // gossip to bring each member.
                // Not at once, and not necessarily from the member that
                // let us in (a seed that a thousand nodes join at once
                // would send a thousand states): from a random member,
                // within half a second.
                if alone && let MemberEvent::Up(_) = &event {
                    self.card_sync_every = SYNC_FAST;
                    self.next_card_sync = Some(now + SYNC_FAST);
                    self.pull_every = PULL_FIRST / 2;
                    let jitter = self.rng.random_range(0..PULL_FIRST.as_millis() as u64 / 2);
                    self.next_pull = Some(now + std::time::Duration::from_millis(jitter));
                }
                match &event {
                    MemberEvent::Up(id) | MemberEvent::Changed { new: id, .. } => {
                        if let MemberEvent::Changed { old, new } = &event
                            && old.generation != new.generation
                        {
                            self.cards.forget(old.addr);
                        }
                        if let Some(arrived) = self.cards.want(*id, now) {
                            early.push(arrived);
                        }
                    }
                    MemberEvent::Down(id) => self.cards.forget(id.addr),
                    MemberEvent::Card { .. } => {}
                }
                self.events.push_back(event);
                for arrived in early.drain(..) {
                    self.events.push_back(MemberEvent::Card {
                        id: arrived.id,
                        card: arrived.card,
                    });
                }
            }
        }
        // Several cards are asked of one member: the longer running (the
        // lower generation) of two picked at random, as it is likelier to
        // hold them.
        let (view, rng) = (&self.view, &mut self.rng);
        let helper = || {
            let count = view.up.len();
            if count == 0 {
                return None;
            }
            let mut pick = || view.up.values().nth(rng.random_range(0..count)).copied();
            let (a, b) = (pick()?, pick()?);
            Some(if b.generation < a.generation {
                b.addr
            } else {
                a.addr
            })
        };
        for (to, ask) in self.cards.poll(now, helper) {
            self.queue(to, ask);
        }
        // A card newly wanted: the next sync is soon (it usually brings
        // the card before an ask would).
        if self.cards.wanted() > wanted_before
            && let Some(at) = self.next_card_sync
            && at > now + SYNC_FAST
        {
            self.next_card_sync = Some(now + SYNC_FAST);
        }
        // Retransmissions and the suspicion time follow the cluster's size
        // (by doubling or halving, not at every member).
        let members = self.view.up.len();
        if members > self.tuned_for.saturating_mul(2).max(8) || members < self.tuned_for / 2 {
            self.tuned_for = members;
            self.cards.set_members(members);
            self.config.max_transmissions = super::max_transmissions(members);
            self.config.suspect_to_down_after = super::suspect_to_down(self.suspect_base, members);
            if let Err(error) = self.foca.set_config(self.config.clone()) {
                tracing::debug!(%error, "retuning retransmissions failed");
            }
        }
    }
}

/// What identifies a member record in a [`KIND_STATE_ASK`] filter: the
/// identity, incarnation and state (a record that changed is sent again).
fn member_key(member: &Member<MemberId>) -> Key {
    let state = match member.state() {
        State::Alive => 0,
        State::Suspect => 1,
        State::Down => 2,
    };
    let id = member.id();
    let incarnation = u64::from(member.incarnation());
    let rejoin = u64::from(id.rejoin);
    Key::new(
        id.addr,
        [
            id.generation,
            u64::from(id.version),
            rejoin << 24 | incarnation << 8 | state,
        ],
    )
}

/// One part of a membership state, framed.
fn encode_state(members: &[&Member<MemberId>]) -> Vec<u8> {
    let mut packet = vec![KIND_STATE];
    // Members are addresses and numbers: encoding cannot fail.
    if let Ok(body) = postcard::to_allocvec(members) {
        packet.extend_from_slice(&body);
    }
    packet
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(port: u16, generation: u64) -> MemberId {
        MemberId {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            generation,
            version: 1,
            rejoin: 0,
        }
    }

    /// A foca packet from `src` to `dst` carrying `updates`, as foca lays
    /// it out (header, big-endian count, updates).
    fn packet(src: MemberId, dst: MemberId, updates: &[Member<MemberId>]) -> Vec<u8> {
        let header = foca::Header {
            src,
            src_incarnation: 0,
            dst,
            message: Message::Gossip,
        };
        let mut out = Vec::new();
        Codec::<MemberId>::encode_header(&mut PostcardCodec, &header, &mut out).expect("header");
        out.extend_from_slice(&u16::try_from(updates.len()).expect("few").to_be_bytes());
        for update in updates {
            Codec::<MemberId>::encode_member(&mut PostcardCodec, update, &mut out).expect("member");
        }
        out
    }

    /// The updates of a foca packet (as [`packet`] lays them out).
    fn updates_of(mut body: &[u8]) -> Vec<Member<MemberId>> {
        Codec::<MemberId>::decode_header(&mut PostcardCodec, &mut body).expect("header");
        let count = u16::from_be_bytes([body[0], body[1]]);
        body = &body[2..];
        let updates = (0..count)
            .map(|_| {
                Codec::<MemberId>::decode_member(&mut PostcardCodec, &mut body).expect("member")
            })
            .collect();
        assert!(body.is_empty(), "nothing after the updates");
        updates
    }

    #[test]
    fn repeated_updates_are_cut_from_packets_before_foca_sees_them() {
        let (me, sender, c, d) = (id(1, 1), id(2, 1), id(3, 1), id(4, 1));
        let config = MembershipConfig::default();
        let mut core =
            Core::new(me, &config, SmallRng::seed_from_u64(1), Arc::from(&b""[..])).expect("core");
        core.view.up.insert(sender.addr, sender);
        let fresh = [
            Member::new(c, 0, State::Alive),
            Member::new(d, 0, State::Alive),
        ];
        let first = packet(sender, me, &fresh);
        assert_eq!(
            core.without_repeats(&first),
            None,
            "all news: passed as it is"
        );
        let cut = core
            .without_repeats(&first)
            .expect("the same updates again");
        assert!(updates_of(&cut).is_empty(), "every repeat dropped");
        // A suspicion is news; the alive repeat is not; updates about
        // ourselves always pass.
        let mixed = packet(
            sender,
            me,
            &[
                Member::new(c, 0, State::Suspect),
                Member::new(d, 0, State::Alive),
                Member::new(me, 0, State::Suspect),
            ],
        );
        let kept = updates_of(&core.without_repeats(&mixed).expect("one repeat"));
        assert_eq!(
            kept,
            [
                Member::new(c, 0, State::Suspect),
                Member::new(me, 0, State::Suspect)
            ]
        );
        // Not for us, or from a sender not up here: left to foca, untouched
        // and unrecorded.
        assert_eq!(
            core.without_repeats(&packet(sender, id(9, 1), &fresh)),
            None
        );
        let stranger = id(5, 1);
        let from_stranger = [Member::new(id(6, 1), 0, State::Alive)];
        assert_eq!(
            core.without_repeats(&packet(stranger, me, &from_stranger)),
            None
        );
        assert_eq!(
            core.without_repeats(&packet(stranger, me, &from_stranger)),
            None
        );
        // Malformed: left to foca (which drops it).
        assert_eq!(core.without_repeats(&[0xff, 0x01]), None);
    }

    /// A core with identity `me` that holds `members` (given as a state
    /// part from a member up).
    fn core_holding(me: MemberId, members: &[Member<MemberId>], now: Instant) -> Core {
        let config = MembershipConfig::default();
        let mut core =
            Core::new(me, &config, SmallRng::seed_from_u64(2), Arc::from(&b""[..])).expect("core");
        let refs: Vec<&Member<MemberId>> = members.iter().collect();
        core.receive(id(99, 1).addr, &encode_state(&refs), now);
        core
    }

    /// The members in `packets`' state parts (and how many parts).
    fn state_in(packets: &[(SocketAddr, Vec<u8>)]) -> (usize, Vec<MemberId>) {
        let parts: Vec<&Vec<u8>> = packets
            .iter()
            .map(|(_, p)| p)
            .filter(|p| p[0] == KIND_STATE)
            .collect();
        let members = parts
            .iter()
            .flat_map(|p| {
                postcard::from_bytes::<Vec<Member<MemberId>>>(&p[1..]).expect("a state part")
            })
            .map(|m| *m.id())
            .collect();
        (parts.len(), members)
    }

    #[test]
    fn a_state_pull_brings_only_what_the_asker_lacks_then_pulls_again_soon() {
        let now = Instant::now();
        let (a, b) = (id(1, 1), id(2, 1));
        let others: Vec<Member<MemberId>> = (10..110)
            .map(|port| Member::new(id(port, 1), 0, State::Alive))
            .collect();
        let everyone: Vec<Member<MemberId>> = others
            .iter()
            .cloned()
            .chain([Member::new(a, 0, State::Alive)])
            .collect();
        let mut b_core = core_holding(b, &everyone, now);
        b_core.take_outbox();
        b_core.view.up.insert(a.addr, a);
        // a holds the first 60 others, one of them as suspect.
        let mut held: Vec<Member<MemberId>> = others[..60].to_vec();
        held[5] = Member::new(*held[5].id(), 0, State::Suspect);
        held.push(Member::new(b, 0, State::Alive));
        let mut a_core = core_holding(a, &held, now);
        a_core.take_outbox();
        a_core.next_pull = Some(now + PULL_MAX);

        a_core.pull_state_from(b.addr);
        let ask = a_core.take_outbox();
        assert_eq!(ask.len(), 1);
        assert_eq!(ask[0].1[0], KIND_STATE_ASK);
        assert!(ask[0].1.len() <= PART_BYTES);
        b_core.receive(a.addr, &ask[0].1, now);
        let answer = b_core.take_outbox();
        let (parts, sent) = state_in(&answer);
        // The 40 others a lacks and the one it holds in another state
        // (a filter's false positives aside: ~1 % each), never a itself.
        assert!((39..=41).contains(&sent.len()), "{} sent", sent.len());
        assert_eq!(parts, sent.len().div_ceil(STATE_PART_MEMBERS));
        assert!(!sent.contains(&a) && !sent.contains(&b));
        assert!(
            sent.iter()
                .filter(|m| others[..60].iter().any(|o| o.id() == *m))
                .count()
                <= 2
        );
        // News: the next pull comes soon.
        for (_, part) in &answer {
            a_core.receive(b.addr, part, now);
        }
        assert!(a_core.next_pull.is_some_and(|at| at <= now + PULL_FIRST));
        // Asked again, now that a holds it all: nothing.
        a_core.pull_state_from(b.addr);
        let again = a_core.take_outbox();
        let ask = again
            .iter()
            .find(|(_, p)| p[0] == KIND_STATE_ASK)
            .expect("an ask");
        b_core.receive(a.addr, &ask.1, now);
        let (_, sent) = state_in(&b_core.take_outbox());
        assert!(sent.len() <= 2, "false positives at most: {sent:?}");
        // A malformed filter is dropped and counted.
        let dropped = b_core.dropped();
        b_core.receive(a.addr, &[KIND_STATE_ASK, 1, 2], now);
        assert_eq!(b_core.dropped(), dropped + 1);
        assert!(b_core.take_outbox().is_empty());
    }

    #[test]
    fn only_updates_above_the_state_given_are_news() {
        let mut known = Known::default();
        let a = id(1, 7);
        let alive = |inc| Member::new(a, inc, State::Alive);
        let suspect = |inc| Member::new(a, inc, State::Suspect);
        assert!(known.is_news(&alive(0)), "a member never given");
        known.given(&alive(0));
        assert!(!known.is_news(&alive(0)), "the same state again");
        assert!(known.is_news(&suspect(0)), "suspect over alive");
        known.given(&suspect(0));
        assert!(!known.is_news(&alive(0)), "alive under suspect");
        assert!(!known.is_news(&suspect(0)));
        assert!(known.is_news(&alive(1)), "a refutation: higher incarnation");
        known.given(&alive(1));
        assert!(!known.is_news(&suspect(0)), "an older suspicion");
        // Giving something below what was given changes nothing.
        known.given(&alive(0));
        assert!(!known.is_news(&alive(1)));
        known.given(&Member::new(a, 0, State::Down));
        assert!(!known.is_news(&alive(9)), "down is final for an identity");
        assert!(!known.is_news(&Member::new(a, 0, State::Down)));
        let restarted = Member::new(id(1, 8), 0, State::Alive);
        assert!(known.is_news(&restarted), "another identity at the address");
        assert!(known.is_news(&Member::new(id(2, 7), 0, State::Alive)));
    }
}
