//! An in-memory network for whole nodes (the simulation's): listeners and
//! byte streams (`tokio::io::duplex` pairs) instead of TCP, datagrams
//! through channels keyed by address instead of UDP, fake addresses
//! (`10.x.y.z:7000`), and partitions between sets of addresses.
//!
//! Everything is tokio channels and buffers, so nodes on it run on one
//! runtime whose clock can be paused: time then jumps to the next timer
//! whenever every task waits, and a minute of a cluster's life takes the
//! CPU it needs, not a minute.
//!
//! Behaviour at the edges follows the real network: a dial to an address
//! nobody listens on is refused; a datagram to nobody, or to a full
//! queue, is lost; a partition loses datagrams between its sides, refuses
//! dials across it, and resets the connections that crossed it (as a
//! firewall that rejects would; a silent one would stall them until the
//! links' keepalive gave up, with the same outcome later).

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::sync::mpsc;

/// The port every simulated node listens on (each has an address of its
/// own).
pub(crate) const PORT: u16 = 7000;

/// Bytes a stream buffers in each direction before its writer waits.
const STREAM_BUFFER: usize = 64 * 1024;

/// Datagrams queued for a receiver before more are lost (a socket's
/// receive buffer).
const DATAGRAM_QUEUE: usize = 4096;

/// Connections queued for a listener before more are refused (a backlog).
const BACKLOG: usize = 1024;

/// A datagram in a receiver's queue: sender and bytes.
type Datagram = (SocketAddr, Box<[u8]>);

/// A connection in a listener's queue: the stream and the dialer's address.
type Incoming = (Stream, SocketAddr);

/// An in-memory network, as seen from one host (or from none). Cheap to
/// clone: clones are the same network.
#[derive(Debug, Clone, Default)]
pub(crate) struct Network {
    inner: Arc<Mutex<Inner>>,
    /// The host dials come from (see [`Network::at`]); unspecified when
    /// not set.
    local: Option<IpAddr>,
    /// Datagrams sent, and those lost (to a partition, nobody, a full
    /// queue).
    sent: Arc<AtomicU64>,
    lost: Arc<AtomicU64>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Hosts handed out so far.
    hosts: u32,
    /// Tokens tell a binding from a later one at the same address.
    next_token: u64,
    /// Ephemeral ports of dialers.
    next_port: u16,
    listeners: HashMap<SocketAddr, (u64, mpsc::Sender<Incoming>)>,
    datagrams: HashMap<SocketAddr, (u64, mpsc::Sender<Datagram>)>,
    /// One side of a partition (the other is every other address); empty:
    /// no partition.
    side: HashSet<IpAddr>,
    /// Open connections, by the addresses of their ends.
    connections: Vec<(IpAddr, IpAddr, Weak<Cut>)>,
}

impl Inner {
    fn reachable(&self, a: IpAddr, b: IpAddr) -> bool {
        self.side.contains(&a) == self.side.contains(&b)
    }

    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }
}

impl Network {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The same network, dialing from `host`'s address (which decides the
    /// side of a partition its connections are on).
    pub(crate) fn at(&self, host: SocketAddr) -> Self {
        Self {
            local: Some(host.ip()),
            ..self.clone()
        }
    }

    /// A new address for a node: `10.x.y.z:7000`, a host of its own.
    pub(crate) fn host(&self) -> SocketAddr {
        let mut inner = self.lock();
        inner.hosts += 1;
        let [_, x, y, z] = inner.hosts.to_be_bytes();
        SocketAddr::from(([10, x, y, z], PORT))
    }

    /// Listens at `addr` (`HOST:PORT`; port 0, or an address that does not
    /// parse, takes a new host's).
    pub(crate) fn listen(&self, addr: &str) -> io::Result<Listener> {
        let addr = match addr.parse::<SocketAddr>() {
            Ok(addr) if addr.port() != 0 => addr,
            _ => self.host(),
        };
        let (tx, rx) = mpsc::channel(BACKLOG);
        let mut inner = self.lock();
        if inner.listeners.contains_key(&addr) {
            return Err(io::ErrorKind::AddrInUse.into());
        }
        let token = inner.token();
        inner.listeners.insert(addr, (token, tx));
        Ok(Listener {
            addr,
            token,
            incoming: rx,
            network: self.clone(),
        })
    }

    /// Opens a stream from this host (see [`Network::at`]) to whoever
    /// listens at `to`.
    pub(crate) fn dial(&self, to: SocketAddr) -> io::Result<Stream> {
        let from_ip = self.local.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let mut inner = self.lock();
        if !inner.reachable(from_ip, to.ip()) {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "partitioned from that address",
            ));
        }
        let Some((_, listener)) = inner.listeners.get(&to) else {
            return Err(io::ErrorKind::ConnectionRefused.into());
        };
        let listener = listener.clone();
        inner.next_port = inner.next_port.wrapping_add(1);
        let source = SocketAddr::new(from_ip, 10_000 + inner.next_port % 50_000);
        let (ours, theirs) = tokio::io::duplex(STREAM_BUFFER);
        let cut = Arc::new(Cut::default());
        inner.connections.retain(|(_, _, c)| c.strong_count() > 0);
        inner
            .connections
            .push((from_ip, to.ip(), Arc::downgrade(&cut)));
        drop(inner);
        let theirs = Stream {
            io: theirs,
            cut: cut.clone(),
            end: 1,
        };
        listener
            .try_send((theirs, source))
            .map_err(|_| io::Error::from(io::ErrorKind::ConnectionRefused))?;
        Ok(Stream {
            io: ours,
            cut,
            end: 0,
        })
    }

    /// Binds a datagram socket at `addr`.
    pub(crate) fn bind_datagrams(&self, addr: SocketAddr) -> io::Result<Datagrams> {
        let (tx, rx) = mpsc::channel(DATAGRAM_QUEUE);
        let mut inner = self.lock();
        if inner.datagrams.contains_key(&addr) {
            return Err(io::ErrorKind::AddrInUse.into());
        }
        let token = inner.token();
        inner.datagrams.insert(addr, (token, tx));
        Ok(Datagrams {
            addr,
            token,
            queue: rx,
            network: self.clone(),
        })
    }

    /// Delivers a datagram, or loses it.
    fn deliver(&self, from: SocketAddr, to: SocketAddr, data: &[u8]) {
        self.sent.fetch_add(1, Ordering::Relaxed);
        let queue = {
            let inner = self.lock();
            if !inner.reachable(from.ip(), to.ip()) {
                None
            } else {
                inner.datagrams.get(&to).map(|(_, tx)| tx.clone())
            }
        };
        let delivered = queue.is_some_and(|q| q.try_send((from, data.into())).is_ok());
        if !delivered {
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Cuts the hosts of `side` off from every other: datagrams between
    /// the two sides are lost, dials across are refused, and connections
    /// across are reset. Replaces any earlier partition.
    pub(crate) fn partition(&self, side: impl IntoIterator<Item = SocketAddr>) {
        let mut guard = self.lock();
        let inner = &mut *guard;
        inner.side = side.into_iter().map(|a| a.ip()).collect();
        let side = &inner.side;
        let mut cut = Vec::new();
        inner.connections.retain(|(a, b, c)| match c.upgrade() {
            None => false,
            Some(c) => {
                let across = side.contains(a) != side.contains(b);
                if across {
                    cut.push(c);
                }
                !across
            }
        });
        drop(guard);
        for c in cut {
            c.cut();
        }
    }

    /// Ends the partition.
    pub(crate) fn heal(&self) {
        self.lock().side.clear();
    }

    /// Datagrams sent so far, and how many of them were lost.
    pub(crate) fn datagrams_sent(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.lost.load(Ordering::Relaxed),
        )
    }
}

/// A listener on the network; stops listening when dropped.
#[derive(Debug)]
pub(crate) struct Listener {
    addr: SocketAddr,
    token: u64,
    incoming: mpsc::Receiver<Incoming>,
    network: Network,
}

impl Listener {
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The next connection, and the dialer's address.
    pub(crate) async fn accept(&mut self) -> io::Result<Incoming> {
        self.incoming
            .recv()
            .await
            .ok_or_else(|| io::Error::other("the network is gone"))
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let mut inner = self.network.lock();
        if inner.listeners.get(&self.addr).map(|(t, _)| *t) == Some(self.token) {
            inner.listeners.remove(&self.addr);
        }
    }
}

/// A datagram socket on the network; unbound when dropped.
#[derive(Debug)]
pub(crate) struct Datagrams {
    addr: SocketAddr,
    token: u64,
    queue: mpsc::Receiver<Datagram>,
    network: Network,
}

impl Datagrams {
    /// Copies the next datagram into `buf` (cut to its length, as UDP
    /// does); returns its length there and its sender.
    pub(crate) async fn recv_from(&mut self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        match self.queue.recv().await {
            Some(datagram) => Ok(copy(datagram, buf)),
            None => Err(io::Error::other("the network is gone")),
        }
    }

    /// Like `recv_from`, without waiting (`WouldBlock` when none is
    /// queued).
    pub(crate) fn try_recv_from(&mut self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        match self.queue.try_recv() {
            Ok(datagram) => Ok(copy(datagram, buf)),
            Err(_) => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    /// Sends a datagram (which may be lost, silently).
    pub(crate) fn send_to(&self, data: &[u8], to: SocketAddr) -> io::Result<usize> {
        self.network.deliver(self.addr, to, data);
        Ok(data.len())
    }
}

fn copy((from, data): Datagram, buf: &mut [u8]) -> (usize, SocketAddr) {
    let len = data.len().min(buf.len());
    if let (Some(to), Some(from_data)) = (buf.get_mut(..len), data.get(..len)) {
        to.copy_from_slice(from_data);
    }
    (len, from)
}

impl Drop for Datagrams {
    fn drop(&mut self) {
        let mut inner = self.network.lock();
        if inner.datagrams.get(&self.addr).map(|(t, _)| *t) == Some(self.token) {
            inner.datagrams.remove(&self.addr);
        }
    }
}

/// Whether a connection was reset by a partition, and the tasks to wake
/// when it is (one slot per end and direction).
#[derive(Debug, Default)]
struct Cut {
    cut: AtomicBool,
    wakers: Mutex<[Option<Waker>; 4]>,
}

impl Cut {
    fn cut(&self) {
        self.cut.store(true, Ordering::Release);
        let wakers = std::mem::take(
            &mut *self
                .wakers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for waker in wakers.into_iter().flatten() {
            waker.wake();
        }
    }

    fn is_cut(&self) -> bool {
        self.cut.load(Ordering::Acquire)
    }

    fn wait(&self, slot: usize, waker: &Waker) {
        let mut wakers = self
            .wakers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(place) = wakers.get_mut(slot)
            && !place.as_ref().is_some_and(|w| w.will_wake(waker))
        {
            *place = Some(waker.clone());
        }
    }
}

/// One end of a connection on the network.
#[derive(Debug)]
pub(crate) struct Stream {
    io: DuplexStream,
    cut: Arc<Cut>,
    /// 0: the dialer's end; 1: the listener's.
    end: usize,
}

impl Stream {
    fn reset() -> io::Error {
        io::Error::new(io::ErrorKind::ConnectionReset, "cut by a partition")
    }

    /// Polls `io` unless the connection was cut; when it waits, it also
    /// waits for the cut.
    fn poll<T>(
        &mut self,
        cx: &mut Context<'_>,
        write: bool,
        io: impl FnOnce(Pin<&mut DuplexStream>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if self.cut.is_cut() {
            return Poll::Ready(Err(Self::reset()));
        }
        match io(Pin::new(&mut self.io), cx) {
            Poll::Pending => {
                self.cut.wait(self.end * 2 + usize::from(write), cx.waker());
                if self.cut.is_cut() {
                    return Poll::Ready(Err(Self::reset()));
                }
                Poll::Pending
            }
            ready => ready,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut()
            .poll(cx, false, |io, cx| io.poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll(cx, true, |io, cx| io.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll(cx, true, |io, cx| io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.cut.is_cut() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn streams_datagrams_and_partitions() {
        let net = Network::new();
        let (a, b) = (net.host(), net.host());
        assert_ne!(a, b);
        let mut listener = net.listen(&b.to_string()).expect("listen");
        assert!(net.listen(&b.to_string()).is_err(), "address in use");
        assert_eq!(
            net.at(a).dial(a).expect_err("nobody").kind(),
            io::ErrorKind::ConnectionRefused
        );

        let mut dialed = net.at(a).dial(b).expect("dial");
        let (mut accepted, from) = listener.accept().await.expect("accept");
        assert_eq!(from.ip(), a.ip());
        dialed.write_all(b"ping").await.expect("write");
        let mut buf = [0; 4];
        accepted.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"ping");

        let da = net.bind_datagrams(a).expect("bind");
        let mut db = net.bind_datagrams(b).expect("bind");
        da.send_to(b"hello", b).expect("send");
        let mut buf = [0; 3];
        assert_eq!(db.recv_from(&mut buf).await.expect("recv"), (3, a));
        assert_eq!(&buf, b"hel", "cut to the buffer, as UDP");

        // A partition resets the stream (a read waiting wakes up), loses
        // datagrams and refuses dials.
        let reader = tokio::spawn(async move { accepted.read(&mut [0; 8]).await });
        tokio::task::yield_now().await;
        net.partition([a]);
        let read = reader.await.expect("no panic");
        assert_eq!(
            read.expect_err("reset").kind(),
            io::ErrorKind::ConnectionReset
        );
        assert!(dialed.write_all(b"x").await.is_err());
        assert!(net.at(a).dial(b).is_err());
        da.send_to(b"lost", b).expect("send");
        assert_eq!(
            db.try_recv_from(&mut [0; 8]).expect_err("lost").kind(),
            io::ErrorKind::WouldBlock
        );
        assert_eq!(net.datagrams_sent(), (2, 1));

        net.heal();
        assert!(net.at(a).dial(b).is_ok());
        drop(listener);
        assert!(net.at(a).dial(b).is_err(), "no longer listening");
        drop(db);
        assert!(net.bind_datagrams(b).is_ok(), "unbound when dropped");
    }
}
