//! The accept loop and one task per client connection.
//!
//! A connection reads frames and starts one task per request, so many
//! requests are in flight at once and replies go out in completion order.
//! Replies pass through a bounded queue to a single writer task. When the
//! client goes away, its requests still running are cancelled.
//!
//! A connection that does not ask for a WebSocket is a plain HTTP request
//! (`/metrics`, `/healthz`, the status page), answered by [`crate::http`].

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::{ErrorCode, RpcError};
use crate::http::Peeked;
use crate::node::NodeState;
use crate::protocol::{Reply, parse_request};
use crate::ws;

/// How long a new connection may take to complete the WebSocket handshake
/// (TLS and the request head included), or to be answered when it is a
/// plain HTTP request.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections until `shutdown` is cancelled. Each connection runs
/// on its own task, tracked by `tracker` so shutdown can wait for them.
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
                    connection(stream, state, shutdown).await;
                    tracing::debug!(%peer, "connection closed");
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

/// The token in an upgrade request: `Authorization: Bearer TOKEN`, or a
/// `token` query parameter.
fn request_token(request: &Request) -> Option<String> {
    if let Some(value) = request.headers().get("authorization") {
        let value = value.to_str().ok()?;
        return value.strip_prefix("Bearer ").map(str::to_owned);
    }
    request
        .uri()
        .query()?
        .split('&')
        .find_map(|pair| pair.strip_prefix("token=").map(str::to_owned))
}

/// The token of a first message `{"role":"auth","token":"TOKEN"}`; else the
/// message's request id (for the `unauthorized` reply), or `null`.
fn auth_message(message: &Message) -> Result<String, Value> {
    let value: Value = match message {
        Message::Text(text) => serde_json::from_str(text.as_str()).unwrap_or(Value::Null),
        Message::Binary(bytes) => serde_json::from_slice(bytes).unwrap_or(Value::Null),
        _ => Value::Null,
    };
    match (&value["role"], &value["token"]) {
        (Value::String(role), Value::String(token)) if role == "auth" => Ok(token.clone()),
        _ => {
            let u = match &value["u"] {
                Value::Null => value["rpc"]["u"].clone(),
                u => u.clone(),
            };
            Err(u)
        }
    }
}

/// What a new connection turned out to be.
enum Opened<W, S> {
    WebSocket(W),
    /// A plain HTTP request, and its head.
    Http(S, Result<crate::http::Head, crate::http::Status>),
}

/// Serves one client connection until it closes or the node shuts down.
async fn connection(stream: TcpStream, state: Arc<NodeState>, shutdown: CancellationToken) {
    let config = ws::config(state.config.max_message_size);
    // A token in the upgrade request authorizes the connection at once.
    let mut token_in_request = false;
    // The largest reply the client takes, within the node's own budget.
    let mut reply_limit = state.config.reply_budget();
    // The error type is the WebSocket library's callback signature.
    #[allow(clippy::result_large_err)]
    let check = |request: &Request, response: Response| {
        token_in_request = request_token(request).is_some_and(|t| state.tokens.accepts(&t));
        let asked = request.headers().get(crate::protocol::REPLY_LIMIT_HEADER);
        reply_limit = crate::protocol::reply_limit(asked.map(|v| v.as_bytes()), reply_limit);
        Ok(response)
    };
    // With TLS, the TLS handshake comes first, within the same deadline;
    // then the request head, which tells WebSocket from plain HTTP.
    let acceptor = state.tls.acceptor.as_ref();
    let handshake = async move {
        let stream = crate::tls::accept(stream, acceptor).await?;
        match crate::http::peek(stream).await? {
            Peeked::WebSocket(stream) => {
                tokio_tungstenite::accept_hdr_async_with_config(stream, check, Some(config))
                    .await
                    .map(Opened::WebSocket)
            }
            Peeked::Http(stream, head) => Ok(Opened::Http(stream, head)),
        }
    };
    let handshake = tokio::select! {
        _ = shutdown.cancelled() => return,
        done = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake) => done,
    };
    let ws = match handshake {
        Ok(Ok(Opened::WebSocket(ws))) => ws,
        Ok(Ok(Opened::Http(stream, head))) => {
            // Boxed: its buffers would otherwise make every connection's
            // task (a WebSocket's too) that much bigger.
            let answer = Box::pin(crate::http::answer(stream, head, &state));
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, answer) => {}
            }
            return;
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
            return;
        }
        Err(_) => {
            tracing::debug!("WebSocket handshake timed out");
            return;
        }
    };
    // With TLS, a peer link needs a certificate from the node's CA.
    let certified = ws.get_ref().get_ref().has_peer_certificate();
    let (sink, mut source) = ws.split();
    // A peer's first message is its `peer-open`: then this is a peer link.
    let first = tokio::select! {
        _ = shutdown.cancelled() => return,
        first = source.next() => first,
    };
    if let Some(Ok(message)) = &first
        && let Some(opening) = crate::link::opening(message)
    {
        if state.tls.acceptor.is_some() && !certified {
            state.cluster.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(node = %state.name,
                "peer link refused: it presented no certificate from this node's tls_ca");
            return;
        }
        // The real allowance comes with the pre-authentication budgets.
        let allowance = crate::budget::Allowance::unlimited();
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = crate::cluster::accept(state, sink, source, opening, allowance) => {}
        }
        return;
    }
    let mut pending_first = first;
    let (outgoing, queue) = mpsc::channel(ws::OUTGOING_QUEUE);
    let writer = tokio::spawn(ws::write_loop(sink, queue));
    if state.tokens.required() && !token_in_request {
        // Otherwise the first message must present a token.
        let presented = match pending_first.take() {
            Some(Ok(message)) => auth_message(&message),
            _ => Err(Value::Null),
        };
        match presented {
            Ok(token) if state.tokens.accepts(&token) => {
                let ok = json!({"role": "auth", "ok": true}).to_string();
                let _ = outgoing.send(Message::text(ok)).await;
            }
            Ok(_) | Err(_) => {
                let u = presented.err().unwrap_or(Value::Null);
                let error = RpcError::new(
                    ErrorCode::Unauthorized,
                    "a client token is required: send it as `Authorization: Bearer TOKEN` or in a first message {\"role\":\"auth\",\"token\":\"TOKEN\"}",
                );
                let _ = outgoing
                    .send(Message::text(Reply::err(u, error).encode()))
                    .await;
                let close = CloseFrame {
                    code: CloseCode::Policy,
                    reason: "unauthorized".into(),
                };
                let _ = outgoing.send(Message::Close(Some(close))).await;
                drop(outgoing);
                let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, writer).await;
                return;
            }
        }
    }
    let _open = state.metrics.connection();
    let inflight = Arc::new(Semaphore::new(state.config.max_inflight_per_connection));
    let mut requests: JoinSet<()> = JoinSet::new();
    let mut close_frame = None;

    loop {
        let frame = tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                close_frame = Some(CloseFrame { code: CloseCode::Away, reason: "node shutting down".into() });
                break;
            }
            Some(_) = requests.join_next(), if !requests.is_empty() => continue,
            frame = async {
                match pending_first.take() {
                    Some(first) => Some(first),
                    None => source.next().await,
                }
            } => frame,
        };
        let bytes = match frame {
            Some(Ok(Message::Text(text))) => text.into(),
            Some(Ok(Message::Binary(bytes))) => bytes,
            Some(Ok(Message::Close(_))) | None => {
                // The client is gone: nobody will read the replies.
                requests.abort_all();
                break;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
            Some(Err(e)) => {
                // A frame over the size limit, a protocol violation or a
                // broken socket: only this connection ends.
                tracing::debug!(error = %e, "connection read failed");
                requests.abort_all();
                if let tokio_tungstenite::tungstenite::Error::Capacity(e) = e {
                    close_frame = Some(CloseFrame {
                        code: CloseCode::Size,
                        reason: e.to_string().into(),
                    });
                }
                break;
            }
        };
        match inflight.clone().try_acquire_owned() {
            Ok(permit) => {
                let state = state.clone();
                // Progress of a streaming request goes through the same
                // queue, ahead of its reply.
                let progress_to = outgoing.clone();
                let mut work = Box::pin(async move {
                    crate::node::handle_frame(&state, bytes, &progress_to, reply_limit).await
                });
                // Most requests (a quick handler) are done at their first
                // poll: answer at once, without a task and the wake-ups it
                // costs. The others go on on a task of their own; polling a
                // future once before handing it over is fine (it registers
                // the task's waker at its next poll).
                let first = work
                    .as_mut()
                    .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
                match first {
                    std::task::Poll::Ready(reply) => {
                        // Fails only when the connection is already gone.
                        let _ = outgoing.send(Message::text(reply)).await;
                        drop(permit);
                    }
                    std::task::Poll::Pending => {
                        let outgoing = outgoing.clone();
                        requests.spawn(async move {
                            let reply = work.await;
                            let _ = outgoing.send(Message::text(reply)).await;
                            drop(permit);
                        });
                    }
                }
            }
            Err(_) => {
                state.metrics.request().end(Some(ErrorCode::Overloaded));
                let u = parse_request(&bytes).map(|r| r.u).unwrap_or_else(|r| r.u);
                let limit = state.config.max_inflight_per_connection;
                let error = RpcError::new(
                    ErrorCode::Overloaded,
                    format!("more than {limit} requests in flight on this connection"),
                )
                .with_details(json!({ "limit": limit }));
                let _ = outgoing
                    .send(Message::text(Reply::err(u, error).encode()))
                    .await;
            }
        }
    }

    // On shutdown, requests already accepted still get their answers
    // (unless the node is killed).
    let drain = async { while requests.join_next().await.is_some() {} };
    let drained = tokio::select! {
        drained = tokio::time::timeout(state.config.shutdown_grace(), drain) => drained.is_ok(),
        _ = state.killed.cancelled() => false,
    };
    if !drained {
        requests.abort_all();
    }
    if state.killed.is_cancelled() {
        writer.abort();
        return;
    }
    // A client that stopped reading can block the writer for good: give it
    // the grace period, then drop the connection.
    let finish = async {
        if let Some(frame) = close_frame {
            let _ = outgoing.send(Message::Close(Some(frame))).await;
        }
        drop(outgoing);
    };
    let mut writer = writer;
    let flushed = async {
        finish.await;
        let _ = (&mut writer).await;
    };
    if tokio::time::timeout(state.config.shutdown_grace(), flushed)
        .await
        .is_err()
    {
        writer.abort();
    }
}
