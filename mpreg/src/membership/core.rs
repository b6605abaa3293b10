//! The gossip of one node without IO: SWIM (`foca`), the view of members
//! up, and the cards fetched from them ([`Cards`]). The driver (see the
//! parent module) feeds it packets, timers and commands with the time they
//! happen at, and sends what it queued; a simulation feeds it the same
//! from an in-memory network and a clock of its own.
//!
//! # Packets
//!
//! Every packet on the gossip socket starts with one byte saying what it
//! is ([`KIND_SWIM`]: foca's, [`KIND_ASK`]/[`KIND_PART`]: cards); with a
//! cluster secret, every packet ends with a tag over the rest, and a packet
//! without a valid tag is dropped unread.

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

use super::cards::{
    Cards, KIND_ASK, KIND_ASK_MANY, KIND_CARDS, KIND_LACKING, KIND_PART, KIND_SWIM, PART_BYTES,
};
use super::{MemberEvent, MemberId, MemberView, MembershipConfig, REANNOUNCE_AFTER_CHANGE};
use crate::auth::Secret;

/// An ask for the receiver's whole membership state.
pub(crate) const KIND_STATE_ASK: u8 = 3;
/// A part of the sender's membership state: members, postcard-encoded.
pub(crate) const KIND_STATE: u8 = 4;

/// Members in one packet of membership state: at most 43 bytes each
/// (an IPv6 address, three numbers and a state), so a part stays within
/// [`PART_BYTES`].
const STATE_PART_MEMBERS: usize = PART_BYTES / 44;

/// A pull asks for the cards too when more than this many are wanted.
const BULK_WHEN_WANTED: usize = 16;

/// After joining, the whole membership state is pulled from a random
/// member after this long, then twice as long each time up to
/// [`SYNC_MAX`]: anti-entropy for what gossip missed (a rumor reaches
/// most nodes in a few rounds, but a few nodes in a thousand miss it).
const SYNC_FIRST: std::time::Duration = std::time::Duration::from_millis(500);
/// The longest time between two pulls of the membership state.
const SYNC_MAX: std::time::Duration = std::time::Duration::from_secs(32);

/// The foca instance driven here: postcard on the wire, no custom
/// broadcasts (cards are pulled from their owners, see [`Cards`]).
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
    next_sync: Option<Instant>,
    /// Picks the members to pull from, and when.
    rng: SmallRng,
    /// Set at join until the first pull, which asks for the cards too.
    joining: bool,
    /// foca's configuration, and the cluster size its retransmissions are
    /// tuned for.
    config: foca::Config,
    tuned_for: usize,
    /// The time between the last pull and the next.
    sync_every: std::time::Duration,
    /// The latest state of each member given to foca (see [`Known`]).
    known: Known,
    /// The configured suspicion time, before it is scaled to the cluster's
    /// size.
    suspect_base: std::time::Duration,
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
            next_sync: None,
            rng: own_rng,
            joining: false,
            config: foca_config.clone(),
            tuned_for: 0,
            sync_every: SYNC_FIRST,
            known: Known::default(),
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
        [timer, self.cards.next_deadline(), self.next_sync]
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
            KIND_STATE_ASK if body.len() <= 1 && self.view.up.contains_key(&from) => {
                for part in self.state_parts() {
                    self.queue(from, part);
                }
                // Asked with the cards too: after the members, so they are
                // wanted by the time the cards arrive.
                if body == [1] {
                    let me = self.id();
                    for part in self.cards.bulk(me) {
                        self.queue(from, part);
                    }
                }
            }
            KIND_ASK_MANY if self.view.up.contains_key(&from) => {
                let me = self.id();
                match self.cards.answer_many(me, body) {
                    Some(answer) => {
                        for packet in answer {
                            self.queue(from, packet);
                        }
                    }
                    None => self.dropped += 1,
                }
            }
            KIND_LACKING => {
                if self.cards.receive_lacking(body, now).is_none() {
                    self.dropped += 1;
                }
            }
            KIND_CARDS => match self.cards.receive_bulk(body) {
                Some(arrived) => {
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
                    if let Err(error) =
                        self.foca
                            .apply_many(news.into_iter(), false, &mut self.runtime)
                    {
                        tracing::debug!(%from, %error, "membership state not applied");
                    }
                }
                Err(_) => self.dropped += 1,
            },
            KIND_ASK | KIND_ASK_MANY | KIND_STATE_ASK => {
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

    /// Our membership state (every member we know of, down ones too), in
    /// packets of at most [`STATE_PART_MEMBERS`] members.
    fn state_parts(&self) -> Vec<Vec<u8>> {
        let members: Vec<&Member<MemberId>> = self.foca.iter_membership_state().collect();
        members
            .chunks(STATE_PART_MEMBERS)
            .map(encode_state)
            .collect()
    }

    /// Pulls the whole membership state from `from`, with every card it
    /// holds when many are wanted here (at join).
    fn sync_with(&mut self, from: SocketAddr) {
        let with_cards = self.joining || self.cards.wanted() > BULK_WHEN_WANTED;
        self.joining = false;
        self.queue(from, vec![KIND_STATE_ASK, u8::from(with_cards)]);
    }

    /// Runs what is due at `now`: foca's timers (in deadline, then foca's,
    /// order), the asks for cards and the periodic pull of the state.
    pub(crate) fn tick(&mut self, now: Instant) {
        if self.next_sync.is_some_and(|at| at <= now) {
            self.sync_every = (self.sync_every * 2).min(SYNC_MAX);
            self.next_sync = Some(now + self.sync_every);
            let count = self.view.up.len().max(1);
            let pick = self.rng.random_range(0..count);
            let member = self.view.up.keys().nth(pick).copied();
            if let Some(member) = member {
                self.sync_with(member);
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
                    self.joining = true;
                    self.sync_every = SYNC_FIRST / 2;
                    let jitter = self.rng.random_range(0..SYNC_FIRST.as_millis() as u64 / 2);
                    self.next_sync = Some(now + std::time::Duration::from_millis(jitter));
                }
                match &event {
                    MemberEvent::Up(id) | MemberEvent::Changed { new: id, .. } => {
                        if let MemberEvent::Changed { old, new } = &event
                            && old.generation != new.generation
                        {
                            self.cards.forget(old.addr);
                        }
                        self.cards.want(*id, now);
                    }
                    MemberEvent::Down(id) => self.cards.forget(id.addr),
                    MemberEvent::Card { .. } => {}
                }
                self.events.push_back(event);
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
        // Retransmissions and the suspicion time follow the cluster's size
        // (by doubling or halving, not at every member).
        let members = self.view.up.len();
        if members > self.tuned_for.saturating_mul(2).max(8) || members < self.tuned_for / 2 {
            self.tuned_for = members;
            self.config.max_transmissions = super::max_transmissions(members);
            self.config.suspect_to_down_after = super::suspect_to_down(self.suspect_base, members);
            if let Err(error) = self.foca.set_config(self.config.clone()) {
                tracing::debug!(%error, "retuning retransmissions failed");
            }
        }
    }
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
