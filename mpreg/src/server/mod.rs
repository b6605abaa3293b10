//! The accept loop and one task per client connection.
//!
//! A connection goes through four stages, each a function here:
//!
//! 1. **Opening** ([`open`]): TLS, the request head, and the WebSocket
//!    upgrade, with admission: a connection that has not proved itself in
//!    its upgrade request (a client token, a peer ticket) counts against the
//!    caps on unauthenticated connections, and is refused with HTTP 503 past
//!    them; on a node that requires tokens it may read only a few KiB
//!    ([`Allowance`]) until it authenticates.
//! 2. **Authentication** ([`websocket`]): the first
//!    message, within the same deadline as the opening: a peer's hello, a
//!    client's auth message, or (with no token required, or one in the
//!    upgrade) its first request.
//! 3. **Requests** ([`serve_requests`]): one task per request not done at
//!    its first poll, so many requests are in flight at once and replies go
//!    out in completion order, through a queue bounded in bytes to a single
//!    writer task. A connection idle for the idle timeout, one that does not
//!    read its replies, or one that floods pings is closed.
//! 4. **Draining** ([`finish`]): on shutdown, requests in flight may finish
//!    within the grace period; then the last replies and the close frame
//!    are written, briefly. Past the grace (and a little), a connection's
//!    task is stopped whatever it waits for ([`serve`]).
//!
//! A connection that does not ask for a WebSocket is a plain HTTP request
//! (`/metrics`, `/healthz`, the status page), answered by [`crate::http`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{Sink, Stream, StreamExt};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::budget::{Allowance, Metered, Pending};
use crate::config::PRE_AUTH_BYTES;
use crate::error::{ErrorCode, RpcError};
use crate::http::Rewind;
use crate::metrics::Refused;
use crate::node::RunningNode;
use crate::protocol::{Answer, ReplyTo, auth_ok, auth_token};
use crate::ws::{self, Outgoing};

mod admission;
mod session;

use self::admission::*;
use self::session::*;

/// Past the shutdown grace period, a connection's task still running is
/// stopped after this much more, whatever it waits for.
const HARD_STOP_MARGIN: Duration = Duration::from_secs(2);

/// Once requests are drained on shutdown (or the grace is over), how long
/// the last replies and the close frame may still take to be written.
const LINGER: Duration = Duration::from_secs(1);

/// A client sending more pings than this within [`PING_WINDOW`] is closed:
/// a keepalive needs a few a minute.
const MAX_PINGS: u32 = 1000;

/// See [`MAX_PINGS`].
const PING_WINDOW: Duration = Duration::from_secs(10);

/// The close reason of a connection that did not read its replies.
const SLOW_READER_REASON: &str = "slow reader";

/// Accepts connections until `shutdown` is cancelled. Each connection runs
/// on its own task, tracked by `tracker` so shutdown can wait for them; a
/// task still running [`HARD_STOP_MARGIN`] past the shutdown grace is
/// stopped.
pub(crate) async fn serve(
    mut listener: crate::transport::Listener,
    state: Arc<RunningNode>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let state = state.clone();
                let shutdown = shutdown.clone();
                tracker.spawn(async move {
                    let grace = state.config.shutdown_grace();
                    let killed = state.killed.clone();
                    let stopping = shutdown.clone();
                    let hard_stop = async move {
                        stopping.cancelled().await;
                        tokio::time::sleep(grace.saturating_add(HARD_STOP_MARGIN)).await;
                    };
                    tokio::select! {
                        _ = connection(stream, peer, state, shutdown) => {
                            tracing::debug!(%peer, "connection closed");
                        }
                        _ = hard_stop => tracing::debug!(%peer, "connection stopped: shutdown grace over"),
                        _ = killed.cancelled() => {}
                    }
                });
            }
            Err(e) => {
                // Typically out of file descriptors: wait a little rather
                // than spin; connections already open keep being served.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The stream under a WebSocket connection: TLS or not, the request head
/// put back, and metered until the connection authenticates.
type Transport = Metered<Rewind<crate::tls::Stream>>;

/// A WebSocket connection past its upgrade.
struct Upgraded {
    ws: WebSocketStream<Transport>,
    /// Counted as unauthenticated until it authenticates (exempt when its
    /// upgrade request proved it).
    pending: Pending,
    /// What it may read before it authenticates.
    allowance: Allowance,
    /// A valid client token came with the upgrade request.
    token_in_upgrade: bool,
    /// The largest reply the client takes, within the node's own budget
    /// (the `mpreg-max-reply-bytes` upgrade header).
    reply_limit: usize,
}

/// What a new connection turned out to be.
enum Opened {
    WebSocket(Box<Upgraded>),
    /// A plain HTTP request, and its head.
    Http(
        crate::tls::Stream,
        Result<crate::http::Head, crate::http::Status>,
    ),
}

/// Serves one connection until it closes or the node shuts down.
async fn connection(
    stream: crate::transport::Conn,
    peer: SocketAddr,
    state: Arc<RunningNode>,
    shutdown: CancellationToken,
) {
    // One deadline for the whole opening and the first message.
    let deadline = Instant::now() + state.config.handshake_timeout();
    let opened = tokio::select! {
        _ = shutdown.cancelled() => return,
        opened = tokio::time::timeout_at(deadline, open(stream, peer.ip(), &state)) => opened,
    };
    match opened {
        Ok(Ok(Opened::WebSocket(upgraded))) => {
            websocket(*upgraded, state, shutdown, deadline).await
        }
        Ok(Ok(Opened::Http(stream, head))) => {
            // Boxed: its buffers would otherwise make every connection's
            // task (a WebSocket's too) that much bigger.
            let answer = Box::pin(crate::http::answer(stream, head, &state));
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::timeout(state.config.handshake_timeout(), answer) => {}
            }
        }
        Ok(Err(e)) => {
            if crate::tls::rejected_certificate(&e) {
                // Only peers present certificates: one from another CA is
                // a peer refused.
                state.cluster.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(node = %state.name, error = %e,
                    "connection refused: its certificate is not from this node's tls_ca");
            } else {
                tracing::debug!(error = %e, "TLS or WebSocket handshake failed");
            }
        }
        Err(_) => {
            state.metrics.refused(Refused::HandshakeTimeout);
            tracing::debug!(%peer, "handshake timed out");
        }
    }
}

/// Why no first message came.
enum NoFirst {
    /// The deadline passed.
    TimedOut,
    /// The connection ended or broke.
    Ended,
    /// More bytes than allowed before authenticating.
    PreAuthLimit,
    /// Too many pings.
    PingFlood,
}

/// The first data message (pings and pongs are answered and skipped), or
/// why none came before `deadline`.
async fn first_message<St>(
    source: &mut St,
    deadline: Instant,
    allowance: &Allowance,
    pings: &mut Pings,
) -> Result<Message, NoFirst>
where
    St: Stream<Item = Result<Message, WsError>> + Unpin,
{
    loop {
        match tokio::time::timeout_at(deadline, source.next()).await {
            Err(_) => return Err(NoFirst::TimedOut),
            Ok(None | Some(Ok(Message::Close(_)))) => return Err(NoFirst::Ended),
            Ok(Some(Ok(Message::Ping(_)))) if !pings.allow() => return Err(NoFirst::PingFlood),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)))) => continue,
            Ok(Some(Ok(message))) => return Ok(message),
            Ok(Some(Err(WsError::Io(e))))
                if e.kind() == std::io::ErrorKind::InvalidData && allowance.limited() =>
            {
                return Err(NoFirst::PreAuthLimit);
            }
            Ok(Some(Err(e))) => {
                tracing::debug!(error = %e, "connection read failed before its first message");
                return Err(NoFirst::Ended);
            }
        }
    }
}

/// A spawned writer task, aborted when dropped (so a connection's task
/// stopped at any point leaves nothing behind).
struct Writer(JoinHandle<()>);

impl Drop for Writer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts the writer of a client connection.
fn client_writer<Si>(state: &RunningNode, sink: Si) -> (Outgoing, Writer)
where
    Si: Sink<Message, Error = WsError> + Unpin + Send + 'static,
{
    let (outgoing, queue) = ws::outgoing(
        state.config.max_outgoing_bytes,
        state.config.slow_reader_timeout(),
    );
    (outgoing, Writer(tokio::spawn(ws::write_loop(sink, queue))))
}

/// A WebSocket connection past its upgrade: its first message tells a peer
/// link from a client; a client then authenticates and sends requests.
async fn websocket(
    upgraded: Upgraded,
    state: Arc<RunningNode>,
    shutdown: CancellationToken,
    deadline: Instant,
) {
    let Upgraded {
        ws,
        mut pending,
        allowance,
        token_in_upgrade,
        reply_limit,
    } = upgraded;
    // With TLS, a peer link needs a certificate from the node's CA.
    let certified = ws.get_ref().get_ref().get_ref().has_peer_certificate();
    let (sink, mut source) = ws.split();
    let mut pings = Pings::new();
    let first = tokio::select! {
        _ = shutdown.cancelled() => return,
        first = first_message(&mut source, deadline, &allowance, &mut pings) => first,
    };
    let first = match first {
        Ok(first) => first,
        Err(NoFirst::TimedOut) => {
            state.metrics.refused(Refused::HandshakeTimeout);
            tracing::debug!("no first message within the handshake deadline");
            return;
        }
        Err(NoFirst::Ended) => return,
        Err(NoFirst::PingFlood) => {
            state.metrics.refused(Refused::PingFlood);
            tracing::debug!("too many pings before the first message");
            return;
        }
        Err(NoFirst::PreAuthLimit) => {
            state.metrics.refused(Refused::PreAuthLimit);
            let (outgoing, writer) = client_writer(&state, sink);
            let why = format!(
                "more than {PRE_AUTH_BYTES} bytes before authenticating: send the token first, as `Authorization: Bearer TOKEN` or in a first message {{\"role\":\"auth\",\"token\":\"TOKEN\"}}"
            );
            let to = ReplyTo::mpreg(Value::Null);
            return refuse(&state, outgoing, writer, to, why, &shutdown).await;
        }
    };
    // A peer's first message opens a link (`peer-open`): then this is a
    // peer link.
    if let Some(opening) = crate::protocol::peer::opening(&first) {
        if state.tls.acceptor.is_some() && !certified {
            state.cluster.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(node = %state.name,
                "peer link refused: it presented no certificate from this node's tls_ca");
            return;
        }
        // The link's own handshake (and its proof of the cluster secret)
        // is bounded by the link; it no longer counts here.
        pending.authenticated();
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = crate::node::accept(state, sink, source, opening, allowance) => {}
        }
        return;
    }
    let (outgoing, writer) = client_writer(&state, sink);
    let first = if state.tokens.required() && !token_in_upgrade {
        match auth_token(&first) {
            Ok(token) if state.tokens.accepts(&token) => {
                allowance.lift();
                let ok = auth_ok();
                let _ = outgoing.try_send(Message::text(ok));
                None
            }
            Ok(_) | Err(_) => {
                state.metrics.refused(Refused::Unauthorized);
                let to = auth_token(&first)
                    .err()
                    .unwrap_or_else(|| ReplyTo::mpreg(Value::Null));
                let why = "a client token is required: send it as `Authorization: Bearer TOKEN` or in a first message {\"role\":\"auth\",\"token\":\"TOKEN\"}";
                return refuse(&state, outgoing, writer, to, why.into(), &shutdown).await;
            }
        }
    } else {
        Some(first)
    };
    pending.authenticated();
    drop(pending);
    let _open = state.metrics.connection();
    let (stop, requests) = serve_requests(
        &state,
        &mut source,
        first,
        pings,
        &outgoing,
        reply_limit,
        &shutdown,
    )
    .await;
    drop(source);
    finish(&state, stop, requests, outgoing, writer, &shutdown).await;
}

/// Answers request `to` with `unauthorized` (`why`) and closes the
/// connection.
async fn refuse(
    state: &RunningNode,
    outgoing: Outgoing,
    writer: Writer,
    to: ReplyTo,
    why: String,
    shutdown: &CancellationToken,
) {
    let error = RpcError::new(ErrorCode::Unauthorized, why);
    // The queue is empty: there is room.
    let _ = outgoing.try_send(Message::text(Answer::err(to, error).encode()));
    outgoing.close(CloseFrame {
        code: CloseCode::Policy,
        reason: "unauthorized".into(),
    });
    drop(outgoing);
    let mut writer = writer;
    tokio::select! {
        _ = &mut writer.0 => {}
        _ = tokio::time::sleep(state.config.handshake_timeout()) => {}
        _ = shutdown.cancelled() => {}
    }
}
