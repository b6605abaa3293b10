//! Who may talk to a node: peers that know the cluster secret, clients that
//! present a token.
//!
//! - **Peer links**: the dialer sends a random nonce; the acceptor answers
//!   with its own and proves knowledge of the secret with an HMAC-SHA256
//!   over both nonces and its role; then the dialer proves it likewise.
//!   Neither says who it is before the other's proof checked (see
//!   `cluster/handshake.rs`). The secret never crosses the wire, and a
//!   recorded proof is useless for another link (fresh nonces).
//! - **Peer tickets**: a dialer that knows the secret puts a ticket (time,
//!   nonce, HMAC) in its upgrade request, so the acceptor does not count it
//!   against the caps on unauthenticated connections. A ticket is accepted
//!   once, within a minute of its time.
//! - **Gossip packets**: each UDP packet carries a truncated HMAC tag; a
//!   packet without a valid tag is dropped and counted.
//! - **Client tokens**: compared in constant time, through their SHA-256
//!   digests, so neither their content nor their length leaks by timing.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{KeyInit, Mac};
use rand::TryRng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio_tungstenite::tungstenite::handshake::server::Request;

type HmacSha256 = hmac::Hmac<Sha256>;

/// Length of the tag appended to each gossip packet.
pub(crate) const TAG_LEN: usize = 16;

/// The cluster secret.
#[derive(Clone)]
pub(crate) struct Secret {
    key: Vec<u8>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Which side of a link a proof comes from (so one side's proof cannot be
/// replayed as the other's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Dialer,
    Acceptor,
}

impl Secret {
    pub(crate) fn new(secret: &str) -> Self {
        Self {
            key: secret.as_bytes().to_vec(),
        }
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC takes keys of any length.
        match <HmacSha256 as KeyInit>::new_from_slice(&self.key) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC accepts keys of every length"),
        }
    }

    fn link_mac(&self, side: Side, dialer_nonce: &[u8], acceptor_nonce: &[u8]) -> HmacSha256 {
        let mut mac = self.mac();
        mac.update(match side {
            Side::Dialer => b"mpreg link proof: dialer\0",
            Side::Acceptor => b"mpreg link proof: acceptor\0",
        });
        mac.update(dialer_nonce);
        mac.update(acceptor_nonce);
        mac
    }

    /// The proof `side` sends on a link whose hellos carried these nonces.
    pub(crate) fn proof(&self, side: Side, dialer_nonce: &[u8], acceptor_nonce: &[u8]) -> Vec<u8> {
        self.link_mac(side, dialer_nonce, acceptor_nonce)
            .finalize()
            .into_bytes()
            .to_vec()
    }

    /// Checks a proof, in constant time.
    pub(crate) fn verify(
        &self,
        side: Side,
        dialer_nonce: &[u8],
        acceptor_nonce: &[u8],
        proof: &[u8],
    ) -> bool {
        self.link_mac(side, dialer_nonce, acceptor_nonce)
            .verify_slice(proof)
            .is_ok()
    }

    /// The tag of a gossip packet.
    pub(crate) fn tag(&self, packet: &[u8]) -> [u8; TAG_LEN] {
        let mut mac = self.mac();
        mac.update(b"mpreg gossip\0");
        mac.update(packet);
        let full = mac.finalize().into_bytes();
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&full[..TAG_LEN]);
        tag
    }

    /// Splits a tagged gossip packet and checks its tag (constant time);
    /// `None` when it is not authentic.
    pub(crate) fn open<'a>(&self, tagged: &'a [u8]) -> Option<&'a [u8]> {
        let split = tagged.len().checked_sub(TAG_LEN)?;
        let (packet, tag) = tagged.split_at(split);
        bool::from(self.tag(packet).ct_eq(tag)).then_some(packet)
    }
}

/// The header of an upgrade request that carries a peer ticket.
pub(crate) const TICKET_HEADER: &str = "mpreg-peer-ticket";
/// How far a ticket's time may be from the acceptor's clock, either way.
const TICKET_WINDOW: Duration = Duration::from_secs(60);
/// Tickets remembered (to refuse replays) at most; when that many fresh
/// ones are held, further tickets are refused (the connection is then
/// counted as any unauthenticated one).
const TICKET_MEMORY: usize = 4096;
/// Random bytes in a ticket.
const TICKET_NONCE: usize = 16;

/// Milliseconds since the Unix epoch, now.
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis().try_into().unwrap_or(u64::MAX))
}

impl Secret {
    fn ticket_mac(&self, unix_ms: u64, nonce: &[u8]) -> HmacSha256 {
        let mut mac = self.mac();
        mac.update(b"mpreg-peer-ticket\0");
        mac.update(&unix_ms.to_be_bytes());
        mac.update(nonce);
        mac
    }

    /// A ticket for an upgrade request at `unix_ms`:
    /// `UNIX_MS.NONCE.MAC` (decimal, then hex of 16 random bytes, then hex
    /// of HMAC-SHA256 over `"mpreg-peer-ticket\0"`, the time as 8 bytes big
    /// endian, and the nonce's bytes).
    fn ticket_at(&self, unix_ms: u64, nonce: &[u8; TICKET_NONCE]) -> String {
        let mac = self.ticket_mac(unix_ms, nonce).finalize().into_bytes();
        format!("{unix_ms}.{}.{}", hex(nonce), hex(&mac))
    }

    /// A fresh ticket for an upgrade request (see [`peer_ticket_ok`]).
    pub(crate) fn ticket(&self) -> std::io::Result<String> {
        let mut nonce = [0u8; TICKET_NONCE];
        rand::rngs::SysRng
            .try_fill_bytes(&mut nonce)
            .map_err(std::io::Error::other)?;
        Ok(self.ticket_at(unix_ms(), &nonce))
    }
}

/// Why a ticket was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TicketError {
    /// Not `UNIX_MS.NONCE.MAC` with a 16-byte nonce and a 32-byte MAC.
    Malformed,
    /// Its time is more than a minute from ours.
    Stale,
    /// Its MAC does not check with our secret.
    Forged,
    /// It was used already.
    Replayed,
    /// Too many fresh tickets are remembered to take one more.
    Full,
}

/// The tickets accepted within the last window, to refuse replays.
#[derive(Debug, Default)]
pub(crate) struct Tickets {
    /// Nonce → the ticket's time (ms).
    seen: Mutex<HashMap<[u8; TICKET_NONCE], u64>>,
}

impl Tickets {
    /// Checks `ticket` against `secret` at `now` (ms), and remembers it.
    fn check_at(&self, secret: &Secret, ticket: &str, now: u64) -> Result<(), TicketError> {
        let mut parts = ticket.split('.');
        let (Some(time), Some(nonce), Some(mac), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TicketError::Malformed);
        };
        if time.is_empty() || time.len() > 20 || !time.bytes().all(|b| b.is_ascii_digit()) {
            return Err(TicketError::Malformed);
        }
        let time: u64 = time.parse().map_err(|_| TicketError::Malformed)?;
        let nonce: [u8; TICKET_NONCE] = unhex(nonce)
            .and_then(|n| n.try_into().ok())
            .ok_or(TicketError::Malformed)?;
        let mac = unhex(mac)
            .filter(|m| m.len() == 32)
            .ok_or(TicketError::Malformed)?;
        let window = TICKET_WINDOW.as_millis() as u64;
        if time.abs_diff(now) > window {
            return Err(TicketError::Stale);
        }
        secret
            .ticket_mac(time, &nonce)
            .verify_slice(&mac)
            .map_err(|_| TicketError::Forged)?;
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.contains_key(&nonce) {
            return Err(TicketError::Replayed);
        }
        if seen.len() >= TICKET_MEMORY {
            // A ticket older than the window can never be accepted again.
            seen.retain(|_, t| t.abs_diff(now) <= window);
            if seen.len() >= TICKET_MEMORY {
                return Err(TicketError::Full);
            }
        }
        seen.insert(nonce, time);
        Ok(())
    }
}

/// Whether an upgrade request carries a valid peer ticket
/// (`mpreg-peer-ticket: UNIX_MS.NONCE.MAC`): made with this node's cluster
/// secret, within a minute of this node's clock, and never seen before. A
/// valid ticket only exempts the connection from the caps on
/// unauthenticated connections: the link's challenge and response still
/// run. Always false without a cluster secret.
pub(crate) fn peer_ticket_ok(state: &crate::node::RunningNode, request: &Request) -> bool {
    let Some(secret) = &state.secret else {
        return false;
    };
    let Some(ticket) = request
        .headers()
        .get(TICKET_HEADER)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    match state.cluster.tickets.check_at(secret, ticket, unix_ms()) {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(node = %state.name, error = ?e, "peer ticket refused");
            false
        }
    }
}

/// The client tokens a node accepts.
#[derive(Clone, Default)]
pub(crate) struct Tokens {
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} configured)", self.digests.len())
    }
}

impl Tokens {
    pub(crate) fn new<'a>(tokens: impl IntoIterator<Item = &'a String>) -> Self {
        Self {
            digests: tokens.into_iter().map(|t| digest(t)).collect(),
        }
    }

    /// Whether clients must present a token.
    pub(crate) fn required(&self) -> bool {
        !self.digests.is_empty()
    }

    /// Whether `candidate` is one of the tokens. Looks at every token, in
    /// constant time for each.
    pub(crate) fn accepts(&self, candidate: &str) -> bool {
        let candidate = digest(candidate);
        self.digests
            .iter()
            .fold(subtle::Choice::from(0), |found, d| {
                found | d.ct_eq(&candidate)
            })
            .into()
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A fresh random nonce from the operating system.
pub(crate) fn nonce() -> std::io::Result<[u8; 32]> {
    let mut bytes = [0u8; 32];
    rand::rngs::SysRng
        .try_fill_bytes(&mut bytes)
        .map_err(std::io::Error::other)?;
    Ok(bytes)
}

/// Lowercase hex, for nonces and proofs in JSON.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses lowercase or uppercase hex; `None` if it is not hex.
pub(crate) fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_proofs_check_secret_side_and_nonces() {
        let s = Secret::new("s3cret");
        let (d, a) = (nonce().expect("rng"), nonce().expect("rng"));
        let proof = s.proof(Side::Dialer, &d, &a);
        assert!(s.verify(Side::Dialer, &d, &a, &proof));
        assert!(!s.verify(Side::Acceptor, &d, &a, &proof), "sides differ");
        assert!(!s.verify(Side::Dialer, &a, &d, &proof), "nonces bind");
        assert!(!Secret::new("other").verify(Side::Dialer, &d, &a, &proof));
        assert!(!s.verify(Side::Dialer, &d, &a, &proof[..31]));
    }

    #[test]
    fn gossip_tags() {
        let s = Secret::new("k");
        let mut packet = b"hello".to_vec();
        packet.extend_from_slice(&s.tag(b"hello"));
        assert_eq!(s.open(&packet), Some(&b"hello"[..]));
        let mut forged = packet.clone();
        forged[0] ^= 1;
        assert_eq!(s.open(&forged), None);
        assert_eq!(Secret::new("x").open(&packet), None);
        assert_eq!(s.open(b"short"), None);
    }

    #[test]
    fn tokens() {
        let t = Tokens::new(&["alpha".to_owned(), "beta".to_owned()]);
        assert!(t.required());
        assert!(t.accepts("beta"));
        assert!(!t.accepts("gamma"));
        assert!(!t.accepts(""));
        assert!(!Tokens::default().required());
    }

    #[test]
    fn tickets_check_secret_time_and_replays() {
        let s = Secret::new("s3cret");
        let now = 1_764_000_000_000;
        let nonce = [7u8; TICKET_NONCE];
        let ticket = s.ticket_at(now, &nonce);
        let parts: Vec<&str> = ticket.split('.').collect();
        assert_eq!(parts.len(), 3, "{ticket}");
        assert_eq!(parts[0], now.to_string());
        assert_eq!(parts[1].len(), 32);
        assert_eq!(parts[2].len(), 64);

        // Valid, once; then a replay.
        let tickets = Tickets::default();
        assert_eq!(tickets.check_at(&s, &ticket, now + 1_000), Ok(()));
        assert_eq!(
            tickets.check_at(&s, &ticket, now + 2_000),
            Err(TicketError::Replayed)
        );

        // Another secret.
        let other = Tickets::default();
        assert_eq!(
            other.check_at(&Secret::new("other"), &ticket, now),
            Err(TicketError::Forged)
        );
        // Stale either way, even with a valid MAC.
        assert_eq!(
            other.check_at(&s, &ticket, now + 60_001),
            Err(TicketError::Stale)
        );
        assert_eq!(
            other.check_at(&s, &ticket, now - 60_001),
            Err(TicketError::Stale)
        );
        assert_eq!(other.check_at(&s, &ticket, now - 60_000), Ok(()));
        // A changed time breaks the MAC.
        let moved = format!("{}.{}.{}", now + 1, parts[1], parts[2]);
        assert_eq!(
            Tickets::default().check_at(&s, &moved, now),
            Err(TicketError::Forged)
        );
        // Malformed.
        let t = Tickets::default();
        for bad in [
            "",
            "1.2",
            "1.2.3.4",
            "x.00.00",
            &format!("{now}.{}.{}", "zz".repeat(16), parts[2]),
            &format!("{now}.{}.{}", "00".repeat(15), parts[2]),
            &format!("{now}.{}.{}", parts[1], &parts[2][..62]),
            &format!("+{now}.{}.{}", parts[1], parts[2]),
            &format!("{}.{}.{}", "9".repeat(30), parts[1], parts[2]),
        ] {
            assert_eq!(
                t.check_at(&s, bad, now),
                Err(TicketError::Malformed),
                "{bad}"
            );
        }
        // Fresh tickets are distinct and valid now.
        let (a, b) = (s.ticket().expect("rng"), s.ticket().expect("rng"));
        assert_ne!(a, b);
        let t = Tickets::default();
        assert_eq!(t.check_at(&s, &a, unix_ms()), Ok(()));
        assert_eq!(t.check_at(&s, &b, unix_ms()), Ok(()));
    }

    #[test]
    fn ticket_memory_is_bounded() {
        let s = Secret::new("k");
        let now = 1_000_000_000;
        let t = Tickets::default();
        // Old tickets make room for new ones; fresh ones do not.
        for i in 0..TICKET_MEMORY {
            let mut nonce = [0u8; TICKET_NONCE];
            nonce[..8].copy_from_slice(&(i as u64).to_be_bytes());
            assert_eq!(t.check_at(&s, &s.ticket_at(now, &nonce), now), Ok(()));
        }
        let late = now + 59_000;
        assert_eq!(
            t.check_at(&s, &s.ticket_at(late, &[0xff; TICKET_NONCE]), late),
            Err(TicketError::Full)
        );
        let later = now + 61_000;
        assert_eq!(
            t.check_at(&s, &s.ticket_at(later, &[0xff; TICKET_NONCE]), later),
            Ok(())
        );
        assert_eq!(t.seen.lock().expect("lock").len(), 1);
    }

    #[test]
    fn hex_round_trip() {
        let bytes = nonce().expect("rng");
        assert_eq!(unhex(&hex(&bytes)).as_deref(), Some(&bytes[..]));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
        assert_ne!(nonce().expect("rng"), bytes, "fresh");
    }
}
