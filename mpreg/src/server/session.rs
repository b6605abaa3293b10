//! A client connection's requests: the read loop, the idle and ping
//! limits, and draining on shutdown.

use crate::error::{ErrorCode, RpcError};
use crate::metrics::Refused;
use crate::node::RunningNode;
use crate::protocol::Answer;
use crate::ws::{Ending, Outgoing};
use futures_util::{Stream, StreamExt};
use serde_json::json;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Error as WsError, Message};
use tokio_util::sync::CancellationToken;

use super::*;

/// Why a connection's request loop ended.
pub(super) enum Stop {
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
pub(super) struct Session<'a> {
    pub(super) state: &'a Arc<RunningNode>,
    pub(super) outgoing: &'a Outgoing,
    pub(super) inflight: Arc<Semaphore>,
    pub(super) requests: JoinSet<()>,
    /// The largest reply the client takes.
    pub(super) reply_limit: usize,
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
    pub(super) fn start(&mut self, bytes: Bytes) -> Option<Waiting> {
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
    pub(super) fn defer(&mut self, waiting: Waiting) {
        let outgoing = self.outgoing.clone();
        self.requests.spawn(async move {
            let _ = outgoing.send(waiting.reply).await;
            drop(waiting.permit);
        });
    }

    /// The `overloaded` reply to the request in `bytes`.
    pub(super) fn overloaded(&self, bytes: &[u8]) -> Message {
        self.state
            .metrics
            .request()
            .end(Some(ErrorCode::Overloaded));
        let to = crate::protocol::reply_to(bytes);
        let limit = self.state.config.max_inflight_per_connection;
        let error = RpcError::new(
            ErrorCode::Overloaded,
            format!("more than {limit} requests in flight on this connection"),
        )
        .with_details(json!({ "limit": limit }));
        Message::text(Answer::err(to, error).encode())
    }
}

/// A reply that found no room in the outgoing queue, and the permit of
/// its request (none for `overloaded`).
pub(super) struct Waiting {
    pub(super) reply: Message,
    pub(super) permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Counts pings in windows of [`PING_WINDOW`].
pub(super) struct Pings {
    pub(super) since: Instant,
    pub(super) count: u32,
}

impl Pings {
    pub(super) fn new() -> Self {
        Self {
            since: Instant::now(),
            count: 0,
        }
    }

    /// Counts one; `false` when there were too many.
    pub(super) fn allow(&mut self) -> bool {
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
pub(super) async fn serve_requests<St>(
    state: &Arc<RunningNode>,
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
    // When `idle_after` is `None` the timer is never polled. Activity only
    // records when it happened (a clock read): the timer is moved on only
    // when it fires early, not at every message.
    let mut last_active = Instant::now();
    let idle = tokio::time::sleep(idle_after.unwrap_or(Duration::ZERO));
    tokio::pin!(idle);
    // Made once, not at every message (each one registers a waiter).
    let mut stopping = std::pin::pin!(shutdown.cancelled());
    let mut ended = std::pin::pin!(outgoing.ended());
    let stop = loop {
        let message = match first.take() {
            Some(message) => Some(Ok(message)),
            None => tokio::select! {
                biased;
                _ = &mut stopping => break Stop::Shutdown,
                ending = &mut ended => break Stop::Writing(ending),
                Some(_) = session.requests.join_next(), if !session.requests.is_empty() => {
                    if session.requests.is_empty() {
                        last_active = Instant::now();
                    }
                    continue;
                }
                // Once idle is decided, nothing more is read.
                _ = &mut idle, if idle_after.is_some() && session.requests.is_empty() => {
                    let since = last_active + idle_after.unwrap_or_default();
                    if since > Instant::now() {
                        idle.as_mut().reset(since);
                        continue;
                    }
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
        if idle_after.is_some() {
            last_active = Instant::now();
        }
        if let Some(waiting) = session.start(bytes) {
            // Wait for room before reading on (the reader stops meanwhile:
            // backpressure), bounded by the slow-reader timeout.
            // (A message's clone shares its bytes.)
            tokio::select! {
                biased;
                _ = &mut stopping => {
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
pub(super) async fn finish(
    state: &RunningNode,
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
            Some((CloseCode::Normal, crate::protocol::IDLE_CLOSE_REASON)),
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
