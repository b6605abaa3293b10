//! Each member's card (what it offers, as opaque bytes), fetched from its
//! owner over the gossip socket: a sans-IO state machine.
//!
//! Membership gossips each member's identity (address, generation, card
//! version); this module makes sure that, for every member up, this node
//! ends up holding the card of that identity. When a member comes up or its
//! version grows past the card held, the card is *wanted*; wanted cards are
//! asked for (one small packet to the owner, at most [`MAX_ASKING`] at
//! once, again after [`ASK_AGAIN`] without an answer) and arrive in parts of
//! at most [`PART_BYTES`] bytes. Pulling from the owner, rather than
//! spreading every card as a rumor, costs one round trip per member and
//! change, and a node that joins late still gets every card (rumors are
//! retransmitted a few times, then forgotten).
//!
//! The bytes are opaque here: the cluster encodes and decodes them.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::MemberId;

/// Most bytes of a card in one packet (the rest of the packet is the
/// header and, with a cluster secret, the tag).
pub(crate) const PART_BYTES: usize = 1200;

/// Most parts of a card: a card is at most `PART_BYTES * MAX_PARTS` bytes
/// (~300 KB, a few thousand functions).
pub(crate) const MAX_PARTS: usize = 256;

/// Most cards asked for and not yet answered, at once.
pub(crate) const MAX_ASKING: usize = 64;

/// How long an ask waits for its answer before it is sent again.
pub(crate) const ASK_AGAIN: Duration = Duration::from_millis(300);

/// The first byte of a gossip packet: what follows.
pub(crate) const KIND_SWIM: u8 = 0;
/// An ask for a part of the receiver's card.
pub(crate) const KIND_ASK: u8 = 1;
/// A part of the sender's card.
pub(crate) const KIND_PART: u8 = 2;
/// Cards the sender holds, whole, several to a packet (see
/// [`Cards::bulk`]).
pub(crate) const KIND_CARDS: u8 = 5;

/// One card in a [`KIND_CARDS`] packet.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Carried {
    addr: SocketAddr,
    generation: u64,
    version: u64,
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
    held: HashMap<SocketAddr, (u64, u64, Arc<[u8]>)>,
    /// Cards wanted, by address.
    wants: HashMap<SocketAddr, Want>,
    /// Wanted cards not asked for yet, oldest first (entries no longer
    /// wanted, or already asked, are skipped).
    waiting: VecDeque<SocketAddr>,
    /// Outstanding asks, in the order they were sent.
    asking: VecDeque<(Instant, SocketAddr)>,
}

impl Cards {
    /// Holds no card but `own`.
    pub(crate) fn new(own: Arc<[u8]>) -> Self {
        Self {
            own,
            held: HashMap::new(),
            wants: HashMap::new(),
            waiting: VecDeque::new(),
            asking: VecDeque::new(),
        }
    }

    /// Replaces our card (its version is the identity's).
    pub(crate) fn set_own(&mut self, card: Arc<[u8]>) {
        self.own = card;
    }

    /// Wants the card of `id` unless one as recent is held or wanted.
    pub(crate) fn want(&mut self, id: MemberId) {
        let key = (id.generation, id.version);
        if self
            .held
            .get(&id.addr)
            .is_some_and(|(generation, version, _)| (*generation, *version) >= key)
        {
            return;
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
                    },
                );
                self.waiting.push_back(id.addr);
            }
        }
    }

    /// Forgets the card of the member at `addr` (it is down).
    pub(crate) fn forget(&mut self, addr: SocketAddr) {
        self.held.remove(&addr);
        self.wants.remove(&addr);
    }

    /// Cards wanted and not held yet.
    pub(crate) fn wanted(&self) -> usize {
        self.wants.len()
    }

    /// When [`Cards::poll`] has something to do next: the earliest
    /// outstanding ask's retry.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.asking.front().map(|(at, _)| *at + ASK_AGAIN)
    }

    /// The asks to send now: asks whose answer is overdue again, then
    /// waiting cards, up to [`MAX_ASKING`] outstanding.
    pub(crate) fn poll(&mut self, now: Instant) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut out = Vec::new();
        let mut overdue = Vec::new();
        while let Some(&(at, addr)) = self.asking.front() {
            if at + ASK_AGAIN > now {
                break;
            }
            self.asking.pop_front();
            if let Some(want) = self.wants.get_mut(&addr)
                && want.asked == Some(at)
            {
                want.asked = None;
                overdue.push(addr);
            }
        }
        // Overdue asks go first, oldest first.
        for addr in overdue.into_iter().rev() {
            self.waiting.push_front(addr);
        }
        while self.asking.len() < MAX_ASKING {
            let Some(addr) = self.waiting.pop_front() else {
                break;
            };
            if let Some(ask) = self.ask(addr, now) {
                out.push((addr, ask));
            }
        }
        out
    }

    /// Asks `addr` for the first part of its card still missing, if its
    /// card is wanted and not being asked for.
    fn ask(&mut self, addr: SocketAddr, now: Instant) -> Option<Vec<u8>> {
        let want = self.wants.get_mut(&addr)?;
        if want.asked.is_some() {
            return None;
        }
        want.asked = Some(now);
        self.asking.push_back((now, addr));
        let mut ask = Vec::with_capacity(ASK_LEN);
        ask.push(KIND_ASK);
        ask.extend_from_slice(&want.id.generation.to_le_bytes());
        ask.extend_from_slice(&want.id.version.to_le_bytes());
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
        out.extend_from_slice(&me.version.to_le_bytes());
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
        want.asked = None;
        if want.parts.iter().any(Option::is_none) {
            return (None, self.ask(from, now));
        }
        let Some(want) = self.wants.remove(&from) else {
            return (None, None);
        };
        let card: Arc<[u8]> = want
            .parts
            .into_iter()
            .flatten()
            .flatten()
            .collect::<Vec<u8>>()
            .into();
        self.held.insert(from, (generation, version, card.clone()));
        let arrived = Arrived { id: want.id, card };
        (Some(arrived), None)
    }

    /// Every card held, and ours (identity `me`), packed several to a
    /// packet (each packet's cards at most [`PART_BYTES`] bytes): what a
    /// member that joins gets from one member instead of asking each
    /// owner. A card too large for a packet is left out (its owner is
    /// asked).
    pub(crate) fn bulk(&self, me: MemberId) -> Vec<Vec<u8>> {
        let own = (me.addr, (me.generation, me.version, &self.own));
        let all = self
            .held
            .iter()
            .map(|(addr, (g, v, card))| (*addr, (*g, *v, card)))
            .chain(std::iter::once(own));
        let mut packets = Vec::new();
        let mut batch: Vec<Carried> = Vec::new();
        let mut size = 0;
        for (addr, (generation, version, card)) in all {
            // Address, numbers and length prefix: at most 40 bytes.
            let len = card.len() + 40;
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

    /// Takes the cards of a [`KIND_CARDS`] packet (its kind byte left
    /// out) that are wanted, of the generation wanted and at least the
    /// version; returns them. `None` when malformed.
    pub(crate) fn receive_bulk(&mut self, body: &[u8]) -> Option<Vec<Arrived>> {
        let carried: Vec<Carried> = postcard::from_bytes(body).ok()?;
        let mut arrived = Vec::new();
        for c in carried {
            let Some(want) = self.wants.get(&c.addr) else {
                continue;
            };
            let usable = c.generation == want.id.generation && c.version >= want.id.version;
            if !usable {
                continue;
            }
            self.wants.remove(&c.addr);
            let card: Arc<[u8]> = c.card.into();
            self.held
                .insert(c.addr, (c.generation, c.version, card.clone()));
            let id = MemberId {
                addr: c.addr,
                generation: c.generation,
                version: c.version,
            };
            arrived.push(Arrived { id, card });
        }
        Some(arrived)
    }
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
fn parse_part(packet: &[u8]) -> Option<(u64, u64, u16, u16, &[u8])> {
    if packet.first() != Some(&KIND_PART) {
        return None;
    }
    let header = packet.get(..PART_HEADER)?;
    let u64_at = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(header.get(at..at + 8)?.try_into().ok()?))
    };
    let generation = u64_at(1)?;
    let version = u64_at(9)?;
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

    fn id(port: u16, generation: u64, version: u64) -> MemberId {
        MemberId {
            addr: SocketAddr::from(([10, 0, 0, 1], port)),
            generation,
            version,
        }
    }

    /// Asks until the card of `owner` (holding `card`) arrives at `cards`.
    fn fetch(cards: &mut Cards, owner: MemberId, card: &[u8]) -> Arrived {
        let own = Cards::new(card.into());
        let now = Instant::now();
        let mut asks = cards.poll(now);
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
        cards.want(b);
        assert_eq!(cards.wants.len(), 1);
        let arrived = fetch(&mut cards, b, b"hello");
        assert_eq!(arrived.id, b);
        assert_eq!(&*arrived.card, b"hello");
        assert_eq!(cards.wants.len(), 0);
        // Held: the same identity is not wanted again; a newer one is.
        cards.want(b);
        assert_eq!(cards.wants.len(), 0);
        cards.want(id(2, 1, 2));
        assert_eq!(cards.wants.len(), 1);
    }

    #[test]
    fn held_cards_pass_on_in_bulk_to_who_wants_them() {
        let mut holder = Cards::new(Arc::from(&b"holder's"[..]));
        for port in 2..=40u16 {
            holder.want(id(port, 1, 1));
            fetch(
                &mut holder,
                id(port, 1, 1),
                format!("card {port}").as_bytes(),
            );
        }
        // Too large for a packet: left out of the bulk.
        holder.want(id(50, 1, 1));
        fetch(&mut holder, id(50, 1, 1), &[7u8; PART_BYTES]);
        let me = id(1, 1, 3);
        let packets = holder.bulk(me);
        assert!(packets.len() > 1, "several packets");
        assert!(packets.iter().all(|p| p.len() <= PART_BYTES + 1));

        let mut joiner = Cards::new(Arc::from(&b""[..]));
        joiner.want(me);
        joiner.want(id(7, 1, 1));
        joiner.want(id(8, 2, 1)); // another generation than held: not taken
        joiner.want(id(50, 1, 1));
        let arrived: Vec<Arrived> = packets
            .iter()
            .flat_map(|p| joiner.receive_bulk(&p[1..]).expect("well formed"))
            .collect();
        let ids: Vec<MemberId> = arrived.iter().map(|a| a.id).collect();
        assert_eq!(ids.len(), 2, "{ids:?}");
        assert!(ids.contains(&me) && ids.contains(&id(7, 1, 1)));
        assert!(arrived.iter().any(|a| &*a.card == b"card 7"));
        assert_eq!(joiner.wants.len(), 2, "8 and 50 are asked of their owners");
        assert!(joiner.receive_bulk(&[0xff, 0xff]).is_none());
    }

    #[test]
    fn large_cards_come_in_parts() {
        let big: Vec<u8> = (0..PART_BYTES * 3 + 17).map(|i| i as u8).collect();
        let mut cards = Cards::new(Arc::from(&b""[..]));
        cards.want(id(3, 1, 1));
        let arrived = fetch(&mut cards, id(3, 1, 1), &big);
        assert_eq!(&*arrived.card, &big[..]);
    }

    #[test]
    fn unanswered_asks_are_sent_again_and_capped() {
        let mut cards = Cards::new(Arc::from(&b""[..]));
        for port in 1..=(MAX_ASKING as u16 + 10) {
            cards.want(id(port, 1, 1));
        }
        let start = Instant::now();
        assert_eq!(cards.poll(start).len(), MAX_ASKING);
        assert!(cards.poll(start).is_empty(), "no more than the cap at once");
        assert_eq!(cards.next_deadline(), Some(start + ASK_AGAIN));
        // Overdue: the same asks again (the oldest first), still capped.
        let again = cards.poll(start + ASK_AGAIN);
        assert_eq!(again.len(), MAX_ASKING);
        assert_eq!(again[0].0, id(1, 1, 1).addr);
    }

    #[test]
    fn stale_unasked_and_malformed_parts_are_ignored() {
        let owner = id(2, 5, 3);
        let mut cards = Cards::new(Arc::from(&b""[..]));
        let now = Instant::now();
        let part = Cards::new(Arc::from(&b"x"[..]))
            .answer(id(2, 5, 2), &{
                let mut c = Cards::new(Arc::from(&b""[..]));
                c.want(owner);
                c.poll(now).remove(0).1
            })
            .expect("answer");
        // Nobody asked.
        assert_eq!(cards.receive(owner.addr, &part, now), (None, None));
        // Older than wanted.
        cards.want(owner);
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
        cards.want(id(2, 1, 1));
        // The owner moved on to version 4 before our ask.
        let arrived = fetch(&mut cards, id(2, 1, 4), b"v4");
        assert_eq!(arrived.id, id(2, 1, 4));
        cards.want(id(2, 1, 3));
        assert_eq!(cards.wants.len(), 0, "version 4 is held");
        cards.forget(id(2, 1, 1).addr);
        cards.want(id(2, 1, 3));
        assert_eq!(cards.wants.len(), 1);
    }
}
