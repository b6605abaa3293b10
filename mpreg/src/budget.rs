//! Budgets that keep one client or peer from exhausting a node: bytes held
//! for requests, connections that have not yet authenticated, and the bytes
//! a connection may send before it has.
//!
//! Each is a small counter with a guard that gives back what it took when
//! dropped, so a budget cannot leak on an early return, a panic or a
//! cancelled future.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::{ErrorCode, RpcError};

/// A budget of bytes shared by many holders (all requests of a node).
#[derive(Debug)]
pub(crate) struct ByteBudget {
    used: AtomicUsize,
    limit: usize,
}

impl ByteBudget {
    pub(crate) fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            limit,
        })
    }

    /// Bytes held now.
    #[cfg(test)]
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The budget's size.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Takes `bytes` when they fit: the budget is never crossed, whatever
    /// the races between holders.
    pub(crate) fn take(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(bytes).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }

    /// A charge of `bytes`, or `None` when they do not fit.
    pub(crate) fn charge(self: &Arc<Self>, bytes: usize) -> Option<Charge> {
        self.take(bytes).then(|| Charge {
            budget: self.clone(),
            bytes,
        })
    }

    /// Gives back `bytes` taken with [`take`](Self::take).
    pub(crate) fn give_back(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// The results one request (or one job a peer sent) holds: at most `limit`
/// bytes of them at once, each also taken from the node's budget. A result
/// is held from when it is produced until its last reader lets it go (see
/// `payload::Held`), so a request never holds more than its limit, however
/// its results are referenced.
#[derive(Debug)]
pub(crate) struct ResultBudget {
    limit: usize,
    used: AtomicUsize,
    node: Arc<ByteBudget>,
}

/// Why a result could not be held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Over {
    /// The request would hold `would_hold` bytes of results, over `limit`.
    Request { limit: usize, would_hold: usize },
    /// The node holds its whole budget (`limit`) for requests.
    Node { limit: usize },
}

impl Over {
    /// The error for a result of `bytes` that did not fit: `too_large` when
    /// the request's budget is crossed (retrying cannot help),
    /// `overloaded` when the node's is (it may fit later).
    pub(crate) fn error(self, bytes: usize) -> RpcError {
        match self {
            Over::Request { limit, would_hold } => RpcError::new(
                ErrorCode::TooLarge,
                format!(
                    "a result of {bytes} bytes would make the request hold {would_hold} bytes of results, over its budget of {limit}"
                ),
            )
            .with_details(json!({ "limit": limit, "bytes": bytes })),
            Over::Node { limit } => RpcError::new(
                ErrorCode::Overloaded,
                format!("the node holds its budget of {limit} bytes for requests; try later"),
            )
            .with_details(json!({ "limit": limit })),
        }
    }
}

impl ResultBudget {
    pub(crate) fn new(limit: usize, node: Arc<ByteBudget>) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicUsize::new(0),
            node,
        })
    }

    /// Bytes that may still be held.
    pub(crate) fn left(&self) -> usize {
        self.limit.saturating_sub(self.used.load(Ordering::Relaxed))
    }

    /// Holds `bytes` more, or says which budget they would cross (and
    /// holds nothing).
    pub(crate) fn hold(&self, bytes: usize) -> Result<(), Over> {
        let mut would_hold = 0;
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                would_hold = used.saturating_add(bytes);
                (would_hold <= self.limit).then_some(would_hold)
            })
            .map_err(|_| Over::Request {
                limit: self.limit,
                would_hold,
            })?;
        if !self.node.take(bytes) {
            self.used.fetch_sub(bytes, Ordering::Relaxed);
            return Err(Over::Node {
                limit: self.node.limit(),
            });
        }
        Ok(())
    }

    /// Lets go of `bytes` held before.
    pub(crate) fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
        self.node.give_back(bytes);
    }
}

/// Bytes taken from a [`ByteBudget`], given back when dropped.
#[derive(Debug)]
pub(crate) struct Charge {
    budget: Arc<ByteBudget>,
    bytes: usize,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Caps on connections that have not yet authenticated: in total, and per
/// source address.
#[derive(Debug)]
pub(crate) struct Unauthenticated {
    total: usize,
    per_address: usize,
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The node holds its cap of unauthenticated connections.
    Total(usize),
    /// This address holds its cap.
    PerAddress(usize),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Total(n) => write!(f, "{n} connections are waiting to authenticate"),
            Refusal::PerAddress(n) => write!(
                f,
                "{n} connections from this address are waiting to authenticate"
            ),
        }
    }
}

impl Unauthenticated {
    pub(crate) fn new(total: usize, per_address: usize) -> Arc<Self> {
        Arc::new(Self {
            total,
            per_address,
            counts: Mutex::new(Counts::default()),
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        // The counts stay consistent whatever panicked while holding them.
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts a connection from `address` until the returned guard is
    /// dropped (or [`Pending::authenticated`]), or refuses it.
    pub(crate) fn admit(self: &Arc<Self>, address: IpAddr) -> Result<Pending, Refusal> {
        let mut counts = self.counts();
        if counts.total >= self.total {
            return Err(Refusal::Total(self.total));
        }
        let from_here = counts.by_address.entry(address).or_insert(0);
        if *from_here >= self.per_address {
            return Err(Refusal::PerAddress(self.per_address));
        }
        *from_here += 1;
        counts.total += 1;
        Ok(Pending {
            gate: Some((self.clone(), address)),
        })
    }

    /// Connections counted now.
    pub(crate) fn count(&self) -> usize {
        self.counts().total
    }

    fn release(&self, address: IpAddr) {
        let mut counts = self.counts();
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.by_address.get_mut(&address) {
            *n -= 1;
            if *n == 0 {
                counts.by_address.remove(&address);
            }
        }
    }
}

/// A connection counted as not yet authenticated, until dropped.
#[derive(Debug)]
pub(crate) struct Pending {
    gate: Option<(Arc<Unauthenticated>, IpAddr)>,
}

impl Pending {
    /// A connection that needs no counting (it proved itself in its
    /// upgrade request).
    pub(crate) fn exempt() -> Self {
        Self { gate: None }
    }

    /// The connection has authenticated: it no longer counts.
    pub(crate) fn authenticated(&mut self) {
        if let Some((gate, address)) = self.gate.take() {
            gate.release(address);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.authenticated();
    }
}

/// What a connection may still read before it authenticates; lifted (to
/// no limit) once it has.
#[derive(Debug, Clone)]
pub(crate) struct Allowance(Arc<AtomicUsize>);

impl Allowance {
    const UNLIMITED: usize = usize::MAX;

    /// `bytes` may be read before [`lift`](Self::lift).
    pub(crate) fn new(bytes: usize) -> Self {
        Self(Arc::new(AtomicUsize::new(bytes)))
    }

    /// No limit at all.
    pub(crate) fn unlimited() -> Self {
        Self::new(Self::UNLIMITED)
    }

    /// The connection has authenticated: reading is no longer limited.
    pub(crate) fn lift(&self) {
        self.0.store(Self::UNLIMITED, Ordering::Relaxed);
    }

    /// Whether reading is limited.
    pub(crate) fn limited(&self) -> bool {
        self.0.load(Ordering::Relaxed) != Self::UNLIMITED
    }
}

/// A stream whose reads stop with an error once its [`Allowance`] is used
/// up: a connection that has not authenticated cannot make the node read
/// (and buffer, and parse) more than a few KiB. Writes pass through.
#[derive(Debug)]
pub(crate) struct Metered<S> {
    inner: S,
    allowance: Allowance,
}

impl<S> Metered<S> {
    pub(crate) fn new(inner: S, allowance: Allowance) -> Self {
        Self { inner, allowance }
    }

    pub(crate) fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let left = self.allowance.0.load(Ordering::Relaxed);
        if left == Allowance::UNLIMITED {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        if left == 0 {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "too many bytes before authenticating",
            )));
        }
        // Read at most what is left into the front of `buf`.
        let room = buf.remaining().min(left);
        let mut limited = ReadBuf::new(&mut buf.initialize_unfilled()[..room]);
        let poll = Pin::new(&mut self.inner).poll_read(cx, &mut limited);
        let n = limited.filled().len();
        if let Poll::Ready(Ok(())) = poll {
            buf.advance(n);
            // Only this connection's reader reads: no race with another
            // read. A `lift` in between wins.
            let _ = self.allowance.0.compare_exchange(
                left,
                left - n,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn byte_budget_is_never_crossed_and_charges_give_back() {
        let budget = ByteBudget::new(100);
        let a = budget.charge(60).expect("fits");
        assert!(budget.charge(41).is_none());
        let b = budget.charge(40).expect("fits exactly");
        assert_eq!(budget.used(), 100);
        drop(a);
        let c = budget.charge(60).expect("room again");
        drop((b, c));
        assert_eq!(budget.used(), 0);
        assert!(budget.charge(usize::MAX).is_none(), "no overflow");
    }

    #[test]
    fn result_budget_holds_within_its_limit_and_the_nodes() {
        let node = ByteBudget::new(150);
        let a = ResultBudget::new(100, node.clone());
        let b = ResultBudget::new(100, node.clone());
        a.hold(60).expect("fits");
        assert_eq!(
            a.hold(50),
            Err(Over::Request {
                limit: 100,
                would_hold: 110
            })
        );
        assert_eq!(a.left(), 40);
        b.hold(90).expect("fits the node: 150");
        assert_eq!(b.hold(1), Err(Over::Node { limit: 150 }));
        assert_eq!(b.left(), 10, "a refused hold holds nothing");
        a.release(60);
        b.hold(10).expect("room again");
        assert_eq!(node.used(), 100);
    }

    #[test]
    fn unauthenticated_caps_count_per_address_and_in_total() {
        let gate = Unauthenticated::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let a1 = gate.admit(a).expect("first");
        let mut a2 = gate.admit(a).expect("second");
        assert_eq!(gate.admit(a).err(), Some(Refusal::PerAddress(2)));
        let b1 = gate.admit(b).expect("other address");
        assert_eq!(gate.admit(b).err(), Some(Refusal::Total(3)));
        a2.authenticated();
        assert_eq!(gate.count(), 2);
        let _a3 = gate.admit(a).expect("room again");
        drop((a1, b1, a2));
        assert_eq!(gate.count(), 1);
    }

    #[tokio::test]
    async fn metered_stream_stops_at_its_allowance_until_lifted() {
        let (mut near, far) = tokio::io::duplex(64 << 10);
        let allowance = Allowance::new(10);
        let mut metered = Metered::new(far, allowance.clone());
        near.write_all(&[7u8; 100]).await.expect("write");
        let mut buf = [0u8; 100];
        let n = metered.read(&mut buf).await.expect("within the allowance");
        assert_eq!(n, 10);
        let e = metered.read(&mut buf).await.expect_err("used up");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        allowance.lift();
        assert!(!allowance.limited());
        let n = metered.read(&mut buf).await.expect("lifted");
        assert_eq!(n, 90);
    }
}
