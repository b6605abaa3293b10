//! The socket boundary: where a node listens, dials and gossips. Either the
//! operating system's sockets (TCP for links and clients, UDP for gossip:
//! the default, and the only choice outside the crate's tests), or an
//! in-memory network ([`memory`]) on which whole nodes run in a
//! simulation under paused time.
//!
//! Only the sockets differ: above [`Listener`], [`Conn`] (wrapped in
//! [`crate::tls::Stream`]) and the gossip driver's socket
//! (`membership::Socket`), the server, the links' handshake and IO, and
//! the membership driver are the same code on both.

// The in-memory network is chosen only by the crate's tests.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) mod memory;

use std::io;
use std::net::{IpAddr, SocketAddr};

use tokio::net::{TcpListener, TcpStream};

/// Which network a node uses, chosen in its builder.
#[derive(Debug, Clone, Default)]
pub(crate) enum Transport {
    /// TCP and UDP sockets.
    #[default]
    Os,
    /// The in-memory network (the simulation's).
    #[cfg_attr(not(test), allow(dead_code))]
    Memory(memory::Network),
}

impl Transport {
    /// Listens at `addr` (`HOST:PORT`).
    pub(crate) async fn listen(&self, addr: &str) -> io::Result<Listener> {
        match self {
            Self::Os => Ok(Listener::Tcp(TcpListener::bind(addr).await?)),
            Self::Memory(net) => Ok(Listener::Memory(net.listen(addr)?)),
        }
    }

    /// The same transport, for a node listening at `addr`: in memory, its
    /// dials come from that address (which decides the side of a
    /// partition they are on).
    pub(crate) fn at(self, addr: Option<SocketAddr>) -> Self {
        match (self, addr) {
            (Self::Memory(net), Some(addr)) => Self::Memory(net.at(addr)),
            (transport, _) => transport,
        }
    }

    /// Opens a byte stream to `host:port`.
    pub(crate) async fn dial(&self, host: &str, port: u16) -> io::Result<Conn> {
        match self {
            Self::Os => {
                let tcp = TcpStream::connect((host, port)).await?;
                // Requests are small and latency matters more than packing.
                let _ = tcp.set_nodelay(true);
                Ok(Conn::Tcp(tcp))
            }
            Self::Memory(net) => {
                let ip: IpAddr = host.parse().map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "the in-memory network has addresses, not names",
                    )
                })?;
                Ok(Conn::Memory(net.dial(SocketAddr::new(ip, port))?))
            }
        }
    }
}

/// Where a node accepts connections.
#[derive(Debug)]
pub(crate) enum Listener {
    Tcp(TcpListener),
    Memory(memory::Listener),
}

impl Listener {
    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Self::Tcp(tcp) => tcp.local_addr(),
            Self::Memory(listener) => Ok(listener.local_addr()),
        }
    }

    /// The next connection, and the address it comes from.
    pub(crate) async fn accept(&mut self) -> io::Result<(Conn, SocketAddr)> {
        match self {
            Self::Tcp(tcp) => {
                let (stream, peer) = tcp.accept().await?;
                // Replies are small and latency matters more than packing.
                let _ = stream.set_nodelay(true);
                Ok((Conn::Tcp(stream), peer))
            }
            Self::Memory(listener) => {
                let (stream, peer) = listener.accept().await?;
                Ok((Conn::Memory(stream), peer))
            }
        }
    }
}

/// A connection's bytes, before TLS (see [`crate::tls::accept`] and
/// [`crate::tls::connect`]).
#[derive(Debug)]
pub(crate) enum Conn {
    Tcp(TcpStream),
    Memory(memory::Stream),
}
