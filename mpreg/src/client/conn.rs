//! One WebSocket connection of a [`Client`](super::Client) to one node: its
//! writer and reader tasks, and the callers waiting on it by request id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::error::{Error, TransportError};
use crate::protocol::{IDLE_CLOSE_REASON, Incoming, REPLY_LIMIT_HEADER, Reply, Role};
use crate::ws;

/// How to dial a node: the settings every seed shares.
#[derive(Clone)]
pub(super) struct Dial {
    /// The WebSocket message limit: a little more than `max_reply_bytes`,
    /// so that the node's `too_large` answer fits.
    pub(super) max_message_size: usize,
    /// The largest reply asked for, sent in the upgrade request as
    /// [`REPLY_LIMIT_HEADER`].
    pub(super) max_reply_bytes: usize,
    pub(super) token: Option<String>,
    pub(super) tls: Option<TlsConnector>,
    /// Bound on one connection attempt (TCP, TLS and WebSocket handshakes).
    pub(super) connect_timeout: Duration,
    /// Where a connection closed for idleness hands the requests that were
    /// waiting on it (none of them was processed), to be sent again.
    pub(super) orphans: Option<mpsc::UnboundedSender<Orphans>>,
    /// Sockets, or the in-memory network.
    pub(super) transport: crate::transport::Transport,
}

impl std::fmt::Debug for Dial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dial")
            .field("max_message_size", &self.max_message_size)
            .field("max_reply_bytes", &self.max_reply_bytes)
            .field("token", &self.token.as_ref().map(|_| "(set)"))
            .field("tls", &self.tls.is_some())
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// A request waiting for its reply: the caller, and the request as sent
/// (a cheap, shared copy of its text), to send it again should the node
/// close the connection for idleness before reading it.
#[derive(Debug)]
pub(super) struct Entry {
    pub(super) waiter: Waiter,
    pub(super) request: Message,
}

/// The requests that were waiting on a connection the node closed for
/// idleness: none was processed. `seed` is the connection's place in the
/// seed list.
#[derive(Debug)]
pub(super) struct Orphans {
    pub(super) seed: usize,
    pub(super) requests: Vec<(String, Entry)>,
}

/// What a caller waits with.
#[derive(Debug)]
pub(super) enum Waiter {
    /// The final reply only; progress messages for it are dropped.
    Reply(oneshot::Sender<Reply>),
    /// Progress messages, then the final reply. The channel holds one more
    /// item than the request has commands, so a node that keeps to the
    /// protocol never fills it and the reader never waits on a caller.
    Stream(mpsc::Sender<StreamItem>),
}

impl Waiter {
    /// Whether the caller stopped waiting.
    pub(super) fn is_closed(&self) -> bool {
        match self {
            Waiter::Reply(tx) => tx.is_closed(),
            Waiter::Stream(tx) => tx.is_closed(),
        }
    }
}

/// What the reader hands to a streaming caller.
#[derive(Debug)]
pub(super) enum StreamItem {
    /// One command's result: its name and value.
    Progress(String, Value),
    /// The final reply.
    Done(Reply),
}

/// Waiting callers by request id; `None` once the connection is gone, so a
/// late caller fails at once instead of waiting for a reply that cannot come.
type Pending = Mutex<Option<HashMap<String, Entry>>>;

fn lock(pending: &Pending) -> MutexGuard<'_, Option<HashMap<String, Entry>>> {
    // The lock is held only for map operations that cannot panic.
    pending.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An open (or lost) connection.
pub(super) struct Conn {
    /// The URL dialed.
    pub(super) url: String,
    /// Its place in the client's seed list (where failover goes on from).
    pub(super) seed: usize,
    outgoing: mpsc::Sender<Message>,
    pending: Arc<Pending>,
    /// Set when the node closed the connection for idleness (then nothing
    /// waiting on it was processed).
    idle: Arc<AtomicBool>,
    /// The reader and writer tasks, stopped when the connection is dropped.
    tasks: [AbortHandle; 2],
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("url", &self.url)
            .field("open", &self.is_open())
            .finish()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Conn {
    /// Connects to `url` within `dial.connect_timeout`.
    pub(super) async fn open(url: &str, seed: usize, dial: &Dial) -> Result<Conn, Error> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        use tokio_tungstenite::tungstenite::http::HeaderValue;
        let failed = |e| Error::Connect {
            url: url.to_owned(),
            source: TransportError(e),
        };
        let mut request = url.into_client_request().map_err(failed)?;
        if let Some(token) = &dial.token {
            let value = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|e| failed(tungstenite::Error::HttpFormat(e.into())))?;
            request.headers_mut().insert("authorization", value);
        }
        request
            .headers_mut()
            .insert(REPLY_LIMIT_HEADER, HeaderValue::from(dial.max_reply_bytes));
        // Requests may be as large as the node takes: the client does not
        // know that limit, so its write buffer is not bounded (a node is
        // not a peer that floods it with pings).
        let config = ws::config_for(dial.max_message_size, usize::MAX);
        let connect = crate::tls::connect(&dial.transport, request, dial.tls.as_ref(), config);
        let (stream, _response) = match tokio::time::timeout(dial.connect_timeout, connect).await {
            Ok(done) => done.map_err(failed)?,
            Err(_) => {
                let why = std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {:?}", dial.connect_timeout),
                );
                return Err(failed(tungstenite::Error::Io(why)));
            }
        };
        let (sink, source) = stream.split();
        let (outgoing, queue) = mpsc::channel(ws::OUTGOING_QUEUE);
        let pending: Arc<Pending> = Arc::new(Mutex::new(Some(HashMap::new())));
        let idle = Arc::new(AtomicBool::new(false));
        let writer = tokio::spawn(ws::write_loop(sink, queue)).abort_handle();
        let ended = Ended {
            pending: pending.clone(),
            idle: idle.clone(),
            seed,
            orphans: dial.orphans.clone(),
        };
        let reader = tokio::spawn(read_loop(source, ended)).abort_handle();
        Ok(Conn {
            url: url.to_owned(),
            seed,
            outgoing,
            pending,
            idle,
            tasks: [reader, writer],
        })
    }

    /// Whether the node closed this connection for idleness: the calls
    /// that were waiting on it were handed over to be sent again, and the
    /// next call reconnects (to the same node first).
    pub(super) fn closed_idle(&self) -> bool {
        self.idle.load(Ordering::Acquire)
    }

    /// Whether replies can still come on this connection.
    pub(super) fn is_open(&self) -> bool {
        lock(&self.pending).is_some() && !self.outgoing.is_closed()
    }

    /// Waits for the reply to `id` (whose request is `entry.request`) with
    /// `entry.waiter`. Gives the entry back when the connection is already
    /// gone.
    pub(super) fn register(&self, id: &str, entry: Entry) -> Result<(), Entry> {
        match lock(&self.pending).as_mut() {
            Some(p) => {
                p.insert(id.to_owned(), entry);
                Ok(())
            }
            None => Err(entry),
        }
    }

    /// Stops waiting for the reply to `id`; returns its entry if it was
    /// still there.
    pub(super) fn forget(&self, id: &str) -> Option<Entry> {
        lock(&self.pending).as_mut().and_then(|p| p.remove(id))
    }

    /// Queues `message` for the writer; gives it back when the writer is
    /// gone (the message was then certainly not sent).
    pub(super) async fn send(&self, message: Message) -> Result<(), Message> {
        self.outgoing.send(message).await.map_err(|e| e.0)
    }
}

/// How a connection's reader ends: it clears the waiting callers however
/// it ends (including when its task is aborted), so nobody waits forever;
/// when the node closed the connection for idleness, it hands them over to
/// be sent again instead.
struct Ended {
    pending: Arc<Pending>,
    idle: Arc<AtomicBool>,
    seed: usize,
    orphans: Option<mpsc::UnboundedSender<Orphans>>,
}

impl Ended {
    /// The node closed the connection for idleness: nothing waiting on it
    /// was processed.
    fn idle(&self) {
        let requests = {
            let mut pending = lock(&self.pending);
            // Under the lock: whoever then finds no entry knows why.
            self.idle.store(true, Ordering::Release);
            pending.take()
        };
        let requests: Vec<_> = requests.into_iter().flatten().collect();
        tracing::debug!(
            resent = requests.len(),
            "node closed the connection for idleness"
        );
        if requests.is_empty() {
            return;
        }
        if let Some(orphans) = &self.orphans {
            let _ = orphans.send(Orphans {
                seed: self.seed,
                requests,
            });
        }
    }
}

impl Drop for Ended {
    fn drop(&mut self) {
        lock(&self.pending).take();
    }
}

/// Whether `frame` is a node's close for idleness.
fn is_idle_close(frame: Option<&CloseFrame>) -> bool {
    frame.is_some_and(|f| f.code == CloseCode::Normal && f.reason.as_str() == IDLE_CLOSE_REASON)
}

/// Hands each reply (and each progress message) to the caller waiting for
/// its id.
async fn read_loop<S>(mut source: S, ended: Ended)
where
    S: futures_util::Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    let pending = ended.pending.clone();
    while let Some(Ok(message)) = source.next().await {
        let incoming: Incoming = match &message {
            // A reply that cannot be read cannot be matched to its caller,
            // who would wait forever: end the connection, failing every call.
            Message::Text(text) => match serde_json::from_str(text.as_str()) {
                Ok(incoming) => incoming,
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable reply; closing the connection");
                    break;
                }
            },
            Message::Binary(bytes) => match serde_json::from_slice(bytes) {
                Ok(incoming) => incoming,
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable reply; closing the connection");
                    break;
                }
            },
            Message::Close(frame) => {
                if is_idle_close(frame.as_ref()) {
                    ended.idle();
                }
                break;
            }
            _ => continue,
        };
        let Value::String(id) = &incoming.u else {
            tracing::warn!(reply = ?incoming.error, "reply without a request id");
            continue;
        };
        match incoming.role {
            Role::Progress => {
                let Some(name) = incoming.name else {
                    tracing::warn!(%id, "progress message without a command name");
                    continue;
                };
                let value = incoming.value.unwrap_or(Value::Null);
                if let Some(Entry {
                    waiter: Waiter::Stream(tx),
                    ..
                }) = lock(&pending).as_ref().and_then(|p| p.get(id))
                {
                    // The last place is kept for the final reply; a node
                    // sending more progress than commands loses the excess.
                    if tx.capacity() > 1 {
                        let _ = tx.try_send(StreamItem::Progress(name, value));
                    } else {
                        tracing::warn!(%id, "more progress messages than commands; dropped");
                    }
                }
                // Otherwise nobody asked for it, or the caller stopped
                // waiting: drop it.
            }
            Role::Reply => {
                let waiter = lock(&pending)
                    .as_mut()
                    .and_then(|p| p.remove(id))
                    .map(|e| e.waiter);
                let reply = Reply {
                    role: crate::protocol::ReplyRole,
                    u: incoming.u,
                    r: incoming.r,
                    error: incoming.error,
                };
                // The caller may have stopped waiting (timeout, cancelled).
                match waiter {
                    Some(Waiter::Reply(tx)) => {
                        let _ = tx.send(reply);
                    }
                    Some(Waiter::Stream(tx)) => {
                        let _ = tx.try_send(StreamItem::Done(reply));
                    }
                    None => {}
                }
            }
        }
    }
}
