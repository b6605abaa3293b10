//! A Bloom filter small enough for one gossip packet: how a node tells a
//! member what it holds already (members' states, cards), so that the
//! member answers with only what is missing.
//!
//! On the wire (after the packet's kind byte): the seed (`u32`, little
//! endian), the number of hashes (1 to 8), then the bits. A key is a few
//! numbers ([`Key`]); it is hashed once with the seed (a fixed mix of
//! multiplications and shifts, so both sides agree, and fast: a sync hashes
//! every card or member held on both sides) and its bit positions are drawn
//! from that hash by double hashing. A new seed at each ask makes the false
//! positives of one ask (what is missing but looks held, about 1 % at ten
//! bits per key) unlikely to repeat.

use std::net::SocketAddr;

/// Most bytes of a filter's bits: the filter and its header fit a packet.
pub(crate) const MAX_BYTES: usize = 1150;

/// Bits per key aimed for (about 1 % false positives with 7 hashes).
const BITS_PER_KEY: usize = 10;

/// A Bloom filter as sent in a gossip packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Bloom {
    seed: u32,
    hashes: u8,
    bits: Vec<u8>,
}

impl Bloom {
    /// An empty filter for `count` keys, hashed with `seed`: ten bits per
    /// key, within [`MAX_BYTES`] (past ~900 keys, fewer bits per key and
    /// more false positives).
    pub(crate) fn for_keys(seed: u32, count: usize) -> Self {
        let bytes = (count * BITS_PER_KEY).div_ceil(8).clamp(8, MAX_BYTES);
        // k = (m / n) ln 2, within 1..=8.
        let per_key = (bytes * 8) as f64 / count.max(1) as f64;
        let hashes = (per_key * std::f64::consts::LN_2).round().clamp(1.0, 8.0) as u8;
        Self {
            seed,
            hashes,
            bits: vec![0; bytes],
        }
    }

    /// The bit positions of `key`.
    fn positions(&self, key: &Key) -> impl Iterator<Item = usize> + use<> {
        let hash = key.hash_with(u64::from(self.seed));
        let (a, b) = (hash & 0xffff_ffff, (hash >> 32) | 1);
        let m = self.bits.len() as u64 * 8;
        (0..u64::from(self.hashes)).map(move |i| (a.wrapping_add(i.wrapping_mul(b)) % m) as usize)
    }

    /// Adds `key`.
    pub(crate) fn insert(&mut self, key: &Key) {
        for bit in self.positions(key) {
            self.bits[bit / 8] |= 1 << (bit % 8);
        }
    }

    /// Whether `key` may have been added (never false for a key added).
    pub(crate) fn contains(&self, key: &Key) -> bool {
        self.positions(key)
            .all(|bit| self.bits[bit / 8] & (1 << (bit % 8)) != 0)
    }

    /// The filter as a packet of kind `kind`.
    pub(crate) fn encode(&self, kind: u8) -> Vec<u8> {
        let mut packet = Vec::with_capacity(6 + self.bits.len());
        packet.push(kind);
        self.encode_into(&mut packet);
        packet
    }

    /// Appends the filter (seed, hashes, bits) to `out`.
    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.seed.to_le_bytes());
        out.push(self.hashes);
        out.extend_from_slice(&self.bits);
    }

    /// A filter as sent (the packet's kind byte left out); `None` when
    /// malformed.
    pub(crate) fn decode(body: &[u8]) -> Option<Self> {
        let seed = u32::from_le_bytes(body.get(..4)?.try_into().ok()?);
        let hashes = *body.get(4)?;
        let bits = body.get(5..)?;
        let valid = (1..=8).contains(&hashes) && !bits.is_empty() && bits.len() <= MAX_BYTES;
        valid.then(|| Self {
            seed,
            hashes,
            bits: bits.to_vec(),
        })
    }
}

/// What a filter holds: an address and up to three numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Key([u64; 5]);

impl Key {
    /// The key of `addr` with `numbers`.
    pub(crate) fn new(addr: SocketAddr, numbers: [u64; 3]) -> Self {
        let ip = match addr.ip() {
            std::net::IpAddr::V4(ip) => ip.to_ipv6_mapped(),
            std::net::IpAddr::V6(ip) => ip,
        };
        let ip = u128::from(ip);
        let port = u64::from(addr.port());
        Self([
            (ip >> 64) as u64,
            ip as u64 ^ (port << 48),
            numbers[0],
            numbers[1],
            numbers[2],
        ])
    }
}

impl Key {
    /// The key's hash with `seed` (see the module's doc).
    fn hash_with(&self, seed: u64) -> u64 {
        self.0.iter().fold(mix(seed), |h, &word| mix(h ^ word))
    }

    /// The key's hash with seed 0: what digests of sets of keys combine.
    pub(crate) fn hash(&self) -> u64 {
        self.hash_with(0)
    }
}

/// SplitMix64's finaliser: every bit of the input moves every bit of the
/// output.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_added_are_found_and_few_others_are() {
        let key = |i: u32| {
            let addr = SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 7000));
            Key::new(addr, [1, 1, 0])
        };
        let mut filter = Bloom::for_keys(7, 1000);
        for i in 0..1000u32 {
            filter.insert(&key(i));
        }
        assert!((0..1000u32).all(|i| filter.contains(&key(i))));
        let false_positives = (1000..11_000u32)
            .filter(|i| filter.contains(&key(*i)))
            .count();
        // ~9 bits per key at 1,000 keys (the packet's limit): about 2 %.
        assert!(false_positives < 500, "{false_positives} of 10,000");
    }

    #[test]
    fn another_seed_gives_other_false_positives() {
        let key = |i: u64| Key::new(SocketAddr::from(([127, 0, 0, 1], 9000)), [i, 0, 0]);
        let fill = |seed| {
            let mut filter = Bloom::for_keys(seed, 100);
            for i in 0..100 {
                filter.insert(&key(i));
            }
            filter
        };
        let (a, b) = (fill(1), fill(2));
        let both = (100..100_000)
            .filter(|&i| a.contains(&key(i)) && b.contains(&key(i)))
            .count();
        let either = (100..100_000)
            .filter(|&i| a.contains(&key(i)) || b.contains(&key(i)))
            .count();
        assert!(either > 0 && both * 10 < either, "{both} of {either}");
    }

    #[test]
    fn round_trips_and_refuses_malformed_filters() {
        let a = Key::new(SocketAddr::from(([127, 0, 0, 1], 1)), [1, 2, 3]);
        let mut filter = Bloom::for_keys(42, 3);
        filter.insert(&a);
        let packet = filter.encode(9);
        assert_eq!(packet[0], 9);
        let back = Bloom::decode(&packet[1..]).expect("decodes");
        assert_eq!(back, filter);
        assert!(back.contains(&a));
        let other_port = Key::new(SocketAddr::from(([127, 0, 0, 1], 2)), [1, 2, 3]);
        let v6 = Key::new(
            "[::ffff:127.0.0.1]:1".parse().expect("an address"),
            [1, 2, 3],
        );
        assert_ne!(a, other_port);
        assert_eq!(
            a, v6,
            "an IPv4 address and its mapped IPv6 form are one key"
        );
        assert_eq!(Bloom::decode(&[]), None);
        assert_eq!(Bloom::decode(&[1, 0, 0, 0, 3]), None, "no bits");
        assert_eq!(Bloom::decode(&[1, 0, 0, 0, 0, 0xff]), None, "no hashes");
        assert_eq!(Bloom::decode(&[1, 0, 0, 0, 9, 0xff]), None, "too many");
        let mut huge = vec![1, 0, 0, 0, 3];
        huge.extend(std::iter::repeat_n(0, MAX_BYTES + 1));
        assert_eq!(Bloom::decode(&huge), None, "too large");
    }
}
