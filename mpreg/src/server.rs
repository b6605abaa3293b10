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
//! 2. **Authentication** ([`websocket`], [`authenticate`]): the first
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

use std::borrow::Cow;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{Sink, Stream, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode, header};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Error as WsError, Message};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::budget::{Allowance, Metered, Pending, Refusal};
use crate::config::PRE_AUTH_BYTES;
use crate::error::{ErrorCode, RpcError};
use crate::http::{Peeked, Rewind};
use crate::metrics::Refused;
use crate::node::NodeState;
use crate::protocol::Reply;
use crate::ws::{self, Ending, Outgoing};

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

/// The close reason of a connection closed for being idle. Clients rely on
/// it: no frame read after the node decided so was processed, so a request
/// sent meanwhile can be sent again on a new connection.
pub(crate) const IDLE_REASON: &str = "idle timeout";

/// The close reason of a connection that did not read its replies.
const SLOW_READER_REASON: &str = "slow reader";

/// Accepts connections until `shutdown` is cancelled. Each connection runs
/// on its own task, tracked by `tracker` so shutdown can wait for them; a
/// task still running [`HARD_STOP_MARGIN`] past the shutdown grace is
/// stopped.
pub(crate) async fn serve(
    listener: TcpListener,
    state: Arc<NodeState>,
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
                // Replies are small and latency matters more than packing.
                let _ = stream.set_nodelay(true);
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

/// The client tokens an upgrade request presents: `Authorization: Bearer
/// TOKEN` headers, and `token` query parameters.
fn request_tokens(request: &Request) -> impl Iterator<Item = &str> {
    let bearer = request
        .headers()
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter_map(|value| value.to_str().ok()?.strip_prefix("Bearer "));
    let query = request
        .uri()
        .query()
        .into_iter()
        .flat_map(|query| query.split('&'))
        .filter_map(|pair| pair.strip_prefix("token="));
    bearer.chain(query)
}

/// Whether an upgrade request presents a valid client token, in a header
/// or in the query (whichever is present: another `Authorization` scheme
/// beside a valid `?token=` is fine).
fn token_ok(state: &NodeState, request: &Request) -> bool {
    state.tokens.required() && request_tokens(request).any(|t| state.tokens.accepts(t))
}

/// A client's first message when the node requires a token and none came
/// with the upgrade: `{"role":"auth","token":"TOKEN"}`. Decoded as is, never
/// as a tree: the id of a request sent instead is kept as raw text, for the
/// `unauthorized` reply.
#[derive(Deserialize)]
struct AuthMessage<'a> {
    #[serde(borrow, default)]
    role: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    token: Option<Cow<'a, str>>,
}

/// The token of an auth message; else the message's request id (for the
/// `unauthorized` reply), or `null`.
fn auth_token(message: &Message) -> Result<String, Value> {
    let bytes: &[u8] = match message {
        Message::Text(text) => text.as_bytes(),
        Message::Binary(bytes) => bytes,
        _ => return Err(Value::Null),
    };
    match serde_json::from_slice::<AuthMessage<'_>>(bytes) {
        Ok(AuthMessage {
            role: Some(role),
            token: Some(token),
        }) if role == "auth" => Ok(token.into_owned()),
        _ => Err(crate::protocol::request_id(bytes)),
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
    stream: TcpStream,
    peer: SocketAddr,
    state: Arc<NodeState>,
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

/// TLS, the request head and, for a WebSocket, the upgrade with admission
/// (see [`admit`]). The caller bounds the time it may take.
async fn open(stream: TcpStream, address: IpAddr, state: &NodeState) -> Result<Opened, WsError> {
    // Counted from the start: connections still in TLS or sending their
    // head count too.
    let admitted = state.unauthenticated.admit(address);
    let stream = crate::tls::accept(stream, state.tls.acceptor.as_ref()).await?;
    let stream = match crate::http::peek(stream).await? {
        // Plain HTTP: no longer counted (`admitted` is dropped).
        Peeked::Http(stream, head) => return Ok(Opened::Http(stream, head)),
        Peeked::WebSocket(stream) => stream,
    };
    // The head read so far is not counted against the allowance.
    let allowance = if state.tokens.required() {
        Allowance::new(PRE_AUTH_BYTES.saturating_add(stream.buffered()))
    } else {
        Allowance::unlimited()
    };
    let transport = Metered::new(stream, allowance.clone());
    let mut admission = None;
    let mut reply_limit = state.config.reply_budget();
    // The error type is the WebSocket library's callback signature.
    #[allow(clippy::result_large_err)]
    let check = |request: &Request, response: Response| {
        admission = Some(admit(state, request, address, admitted, &allowance)?);
        let asked = request.headers().get(crate::protocol::REPLY_LIMIT_HEADER);
        reply_limit = crate::protocol::reply_limit(asked.map(|v| v.as_bytes()), reply_limit);
        Ok(response)
    };
    let config = ws::config_for(state.config.max_message_size, state.config.reply_budget());
    let ws =
        tokio_tungstenite::accept_hdr_async_with_config(transport, check, Some(config)).await?;
    let Some((pending, token_in_upgrade)) = admission else {
        // The library calls the callback before any upgrade succeeds.
        return Err(WsError::Io(std::io::Error::other(
            "upgrade without a request",
        )));
    };
    Ok(Opened::WebSocket(Box::new(Upgraded {
        ws,
        pending,
        allowance,
        token_in_upgrade,
        reply_limit,
    })))
}

/// Admission at the upgrade: a client with a valid token is exempt (not
/// counted, not refused, not metered), and so is a peer with a valid
/// ticket, except that it stays metered until its link's proof; any
/// other connection must have found room among the unauthenticated
/// connections (`admitted`, counted when it connected; asked again now in
/// case room was made since), else it is refused with HTTP 503. Returns the
/// connection's count and whether its upgrade carried a valid token.
#[allow(clippy::result_large_err)]
fn admit(
    state: &NodeState,
    request: &Request,
    address: IpAddr,
    admitted: Result<Pending, Refusal>,
    allowance: &Allowance,
) -> Result<(Pending, bool), ErrorResponse> {
    if token_ok(state, request) {
        allowance.lift();
        return Ok((Pending::exempt(), true));
    }
    // A peer's ticket proves the secret only as far as the caps go: its
    // link still proves it before reading more (`cluster::accept` lifts
    // the allowance then).
    if crate::auth::peer_ticket_ok(state, request) {
        return Ok((Pending::exempt(), false));
    }
    match admitted.or_else(|_| state.unauthenticated.admit(address)) {
        Ok(pending) => Ok((pending, false)),
        Err(refusal) => {
            state.metrics.refused(Refused::UnauthenticatedCap);
            tracing::debug!(%address, %refusal, "upgrade refused");
            Err(unavailable(refusal))
        }
    }
}

/// The HTTP 503 answer to an upgrade refused for `refusal`.
fn unavailable(refusal: Refusal) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(format!(
        "{refusal}: authenticate in the upgrade request (Authorization: Bearer TOKEN) or try again later\n"
    )));
    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
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
fn client_writer<Si>(state: &NodeState, sink: Si) -> (Outgoing, Writer)
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
    state: Arc<NodeState>,
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
            return refuse(&state, outgoing, writer, Value::Null, why, &shutdown).await;
        }
    };
    // A peer's first message opens a link (`peer-open`): then this is a
    // peer link.
    if let Some(opening) = crate::link::opening(&first) {
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
            _ = crate::cluster::accept(state, sink, source, opening, allowance) => {}
        }
        return;
    }
    let (outgoing, writer) = client_writer(&state, sink);
    let first = if state.tokens.required() && !token_in_upgrade {
        match auth_token(&first) {
            Ok(token) if state.tokens.accepts(&token) => {
                allowance.lift();
                let ok = json!({"role": "auth", "ok": true}).to_string();
                let _ = outgoing.try_send(Message::text(ok));
                None
            }
            Ok(_) | Err(_) => {
                state.metrics.refused(Refused::Unauthorized);
                let u = auth_token(&first).err().unwrap_or(Value::Null);
                let why = "a client token is required: send it as `Authorization: Bearer TOKEN` or in a first message {\"role\":\"auth\",\"token\":\"TOKEN\"}";
                return refuse(&state, outgoing, writer, u, why.into(), &shutdown).await;
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

/// Answers request `u` with `unauthorized` (`why`) and closes the
/// connection.
async fn refuse(
    state: &NodeState,
    outgoing: Outgoing,
    writer: Writer,
    u: Value,
    why: String,
    shutdown: &CancellationToken,
) {
    let error = RpcError::new(ErrorCode::Unauthorized, why);
    // The queue is empty: there is room.
    let _ = outgoing.try_send(Message::text(Reply::err(u, error).encode()));
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

/// Why a connection's request loop ended.
enum Stop {
    /// The node is shutting down.
    Shutdown,
    /// The client closed the connection or it broke.
    Gone,
    /// A frame the node cannot read (over the size limit, a protocol
    /// violation): the close frame to send, if any.
    Unreadable(Option<CloseFrame>),
    /// No request in flight for the idle timeout.
    Idle,
    /// The writing ended (see [`Ending`]).
    Writing(Ending),
    /// Too many pings.
    PingFlood,
}

/// The requests of one client connection.
struct Session<'a> {
    state: &'a Arc<NodeState>,
    outgoing: &'a Outgoing,
    inflight: Arc<Semaphore>,
    requests: JoinSet<()>,
    /// The largest reply the client takes.
    reply_limit: usize,
}

impl Session<'_> {
    /// Starts the request in `bytes`. Most requests (a quick handler) are
    /// done at their first poll and answered at once, without a task and
    /// the wake-ups it costs; the others go on on a task of their own
    /// (polling a future once before handing it over is fine: it registers
    /// the task's waker at its next poll). Returns a reply that found no
    /// room in the queue (an answer at once, or `overloaded` when the
    /// connection has too many requests in flight), with the request's
    /// permit: the reader sends it before it reads on (backpressure).
    fn start(&mut self, bytes: Bytes) -> Option<Waiting> {
        let Ok(permit) = self.inflight.clone().try_acquire_owned() else {
            let reply = self.overloaded(&bytes);
            return self.outgoing.try_send(reply).err().map(|reply| Waiting {
                reply,
                permit: None,
            });
        };
        let state = self.state.clone();
        // Progress of a streaming request goes through the same queue,
        // ahead of its reply.
        let progress_to = self.outgoing.clone();
        let reply_limit = self.reply_limit;
        let mut work = Box::pin(async move {
            crate::node::handle_frame(&state, bytes, &progress_to, reply_limit).await
        });
        let first = work
            .as_mut()
            .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
        match first {
            std::task::Poll::Ready(reply) => self
                .outgoing
                .try_send(Message::text(reply))
                .err()
                .map(|reply| Waiting {
                    reply,
                    permit: Some(permit),
                }),
            std::task::Poll::Pending => {
                let outgoing = self.outgoing.clone();
                self.requests.spawn(async move {
                    let reply = work.await;
                    // Fails only when the connection's writing is over.
                    let _ = outgoing.send(Message::text(reply)).await;
                    drop(permit);
                });
                None
            }
        }
    }

    /// Hands `waiting` to a task: on shutdown, it may still be written
    /// while requests drain.
    fn defer(&mut self, waiting: Waiting) {
        let outgoing = self.outgoing.clone();
        self.requests.spawn(async move {
            let _ = outgoing.send(waiting.reply).await;
            drop(waiting.permit);
        });
    }

    /// The `overloaded` reply to the request in `bytes`.
    fn overloaded(&self, bytes: &[u8]) -> Message {
        self.state
            .metrics
            .request()
            .end(Some(ErrorCode::Overloaded));
        let u = crate::protocol::request_id(bytes);
        let limit = self.state.config.max_inflight_per_connection;
        let error = RpcError::new(
            ErrorCode::Overloaded,
            format!("more than {limit} requests in flight on this connection"),
        )
        .with_details(json!({ "limit": limit }));
        Message::text(Reply::err(u, error).encode())
    }
}

/// A reply that found no room in the outgoing queue, and the permit of
/// its request (none for `overloaded`).
struct Waiting {
    reply: Message,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Counts pings in windows of [`PING_WINDOW`].
struct Pings {
    since: Instant,
    count: u32,
}

impl Pings {
    fn new() -> Self {
        Self {
            since: Instant::now(),
            count: 0,
        }
    }

    /// Counts one; `false` when there were too many.
    fn allow(&mut self) -> bool {
        let now = Instant::now();
        if now.duration_since(self.since) > PING_WINDOW {
            self.since = now;
            self.count = 0;
        }
        self.count += 1;
        self.count <= MAX_PINGS
    }
}

/// Reads requests (`first` is one already read) until the connection
/// closes, the node shuts down, the connection stays idle, or its writing
/// ends; returns why, with the requests still running.
async fn serve_requests<St>(
    state: &Arc<NodeState>,
    source: &mut St,
    mut first: Option<Message>,
    mut pings: Pings,
    outgoing: &Outgoing,
    reply_limit: usize,
    shutdown: &CancellationToken,
) -> (Stop, JoinSet<()>)
where
    St: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let mut session = Session {
        state,
        outgoing,
        inflight: Arc::new(Semaphore::new(state.config.max_inflight_per_connection)),
        requests: JoinSet::new(),
        reply_limit,
    };
    let idle_after = state.config.idle_timeout();
    // When `idle_after` is `None` the timer is never polled.
    let idle = tokio::time::sleep(idle_after.unwrap_or(Duration::ZERO));
    tokio::pin!(idle);
    let stop = loop {
        let message = match first.take() {
            Some(message) => Some(Ok(message)),
            None => tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Stop::Shutdown,
                ending = outgoing.ended() => break Stop::Writing(ending),
                Some(_) = session.requests.join_next(), if !session.requests.is_empty() => {
                    if let (true, Some(after)) = (session.requests.is_empty(), idle_after) {
                        idle.as_mut().reset(Instant::now() + after);
                    }
                    continue;
                }
                // Once idle is decided, nothing more is read.
                _ = &mut idle, if idle_after.is_some() && session.requests.is_empty() => {
                    break Stop::Idle;
                }
                message = source.next() => message,
            },
        };
        let bytes = match message {
            Some(Ok(Message::Text(text))) => text.into(),
            Some(Ok(Message::Binary(bytes))) => bytes,
            Some(Ok(Message::Close(_))) | None => break Stop::Gone,
            Some(Ok(Message::Ping(_))) => {
                if pings.allow() {
                    continue;
                }
                break Stop::PingFlood;
            }
            Some(Ok(Message::Pong(_) | Message::Frame(_))) => continue,
            Some(Err(e)) => {
                // A frame over the size limit, a protocol violation or a
                // broken socket: only this connection ends.
                tracing::debug!(error = %e, "connection read failed");
                break match e {
                    WsError::Capacity(e) => Stop::Unreadable(Some(CloseFrame {
                        code: CloseCode::Size,
                        reason: e.to_string().into(),
                    })),
                    WsError::WriteBufferFull(_) => Stop::Writing(Ending::WriteBuffer),
                    _ => Stop::Gone,
                };
            }
        };
        if let Some(after) = idle_after {
            idle.as_mut().reset(Instant::now() + after);
        }
        if let Some(waiting) = session.start(bytes) {
            // Wait for room before reading on (the reader stops meanwhile:
            // backpressure), bounded by the slow-reader timeout.
            // (A message's clone shares its bytes.)
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    session.defer(waiting);
                    break Stop::Shutdown;
                }
                _ = outgoing.send(waiting.reply.clone()) => {}
            }
        }
    };
    (stop, session.requests)
}

/// Ends a client connection after its request loop stopped for `stop`: on
/// shutdown, requests in flight may finish within the grace period (else
/// they are cancelled, as they are at once for any other stop); then the
/// close frame goes and the writer gets a little time to write what is
/// queued.
async fn finish(
    state: &NodeState,
    stop: Stop,
    mut requests: JoinSet<()>,
    outgoing: Outgoing,
    writer: Writer,
    shutdown: &CancellationToken,
) {
    let shutting_down = matches!(stop, Stop::Shutdown);
    let (close, reason) = match stop {
        Stop::Shutdown => (Some((CloseCode::Away, "node shutting down")), None),
        Stop::Gone | Stop::Writing(Ending::Closed) => (None, None),
        Stop::Unreadable(frame) => {
            requests.abort_all();
            if let Some(frame) = frame {
                outgoing.close(frame);
            }
            (None, None)
        }
        Stop::Idle => (
            Some((CloseCode::Normal, IDLE_REASON)),
            Some(Refused::IdleTimeout),
        ),
        Stop::Writing(Ending::SlowReader) => (
            Some((CloseCode::Policy, SLOW_READER_REASON)),
            Some(Refused::SlowReader),
        ),
        Stop::Writing(Ending::WriteBuffer) => (None, Some(Refused::WriteBuffer)),
        Stop::PingFlood => (
            Some((CloseCode::Policy, "too many pings")),
            Some(Refused::PingFlood),
        ),
    };
    if let Some(reason) = reason {
        state.metrics.refused(reason);
        tracing::debug!(reason = reason.label(), "connection closed by the node");
    }
    let grace = state.config.shutdown_grace();
    let drained_by = Instant::now() + grace;
    if shutting_down {
        // Requests already accepted still get their answers (unless the
        // node is killed).
        let drain = async { while requests.join_next().await.is_some() {} };
        tokio::select! {
            _ = tokio::time::timeout_at(drained_by, drain) => {}
            _ = state.killed.cancelled() => {}
        }
    }
    // Nobody will read the replies of what still runs.
    requests.abort_all();
    drop(requests);
    if state.killed.is_cancelled() {
        return;
    }
    if let Some((code, reason)) = close {
        outgoing.close(CloseFrame {
            code,
            reason: reason.into(),
        });
    }
    // Senders still waiting give up; what is queued is still written.
    outgoing.stop();
    drop(outgoing);
    // A client that stopped reading can block the writer for good: give it
    // a while, then drop the connection.
    let until = if shutting_down {
        drained_by.max(Instant::now() + LINGER)
    } else {
        Instant::now() + grace
    };
    let shutdown_linger = async {
        shutdown.cancelled().await;
        tokio::time::sleep(LINGER).await;
    };
    let mut writer = writer;
    tokio::select! {
        _ = &mut writer.0 => {}
        _ = tokio::time::sleep_until(until) => {}
        _ = shutdown_linger => {}
        _ = state.killed.cancelled() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uri: &str, authorization: Option<&str>) -> Request {
        let mut builder = Request::builder().uri(uri);
        if let Some(value) = authorization {
            builder = builder.header("authorization", value);
        }
        builder.body(()).expect("request")
    }

    #[test]
    fn tokens_come_from_the_header_or_the_query() {
        let tokens = |r: &Request| request_tokens(r).map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(tokens(&request("/", Some("Bearer a"))), ["a"]);
        assert_eq!(tokens(&request("/?x=1&token=b", None)), ["b"]);
        assert_eq!(
            tokens(&request("/?token=b", Some("Basic dXNlcjpwdw=="))),
            ["b"],
            "another scheme does not hide the query token"
        );
        assert_eq!(tokens(&request("/?token=b", Some("Bearer a"))), ["a", "b"]);
        assert!(tokens(&request("/", Some("Basic dXNlcjpwdw=="))).is_empty());
    }

    #[test]
    fn auth_messages_are_read_without_a_tree() {
        let token = |text: &str| auth_token(&Message::text(text));
        assert_eq!(token(r#"{"role":"auth","token":"t1"}"#), Ok("t1".into()));
        assert_eq!(
            token(r#"{"role":"auth","token":"a\"b"}"#),
            Ok("a\"b".into())
        );
        assert_eq!(
            token(r#"{"role":"rpc","u":"r1","cmds":[{"x":[1,2,{"y":3}]}]}"#),
            Err(json!("r1"))
        );
        assert_eq!(
            token(r#"{"role":"rpc","rpc":{"u":7,"cmds":[]}}"#),
            Err(json!(7))
        );
        assert_eq!(token("not json"), Err(Value::Null));
        assert_eq!(token(r#"{"role":"auth","token":5}"#), Err(Value::Null));
        assert_eq!(auth_token(&Message::Ping(Bytes::new())), Err(Value::Null));
    }

    #[test]
    fn the_refusal_is_a_503_with_a_reason() {
        let response = unavailable(Refusal::PerAddress(2));
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = response.body().as_deref().unwrap_or_default();
        assert!(body.contains("2 connections from this address"), "{body}");
    }
}
