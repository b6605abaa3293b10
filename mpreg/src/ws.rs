//! WebSocket plumbing shared by the server and the client.

use futures_util::{Sink, SinkExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// Outgoing messages queued per connection before senders wait
/// (backpressure instead of an unbounded buffer).
pub(crate) const OUTGOING_QUEUE: usize = 1024;

/// Messages at least this large are parsed and encoded on tokio's blocking
/// pool, so a few huge messages never hold every runtime worker at once.
pub(crate) const LARGE_MESSAGE: usize = 256 << 10;

/// Runs `work` inline when `size` is small, else on the blocking pool.
/// `None` only if the pool could not run it (the runtime is stopping) or
/// `work` panicked.
pub(crate) async fn cpu_bound<T, F>(size: usize, work: F) -> Option<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    if size < LARGE_MESSAGE {
        return Some(work());
    }
    tokio::task::spawn_blocking(work).await.ok()
}

/// The WebSocket limits for a connection: one message (and one frame, since
/// a client may send a whole message as one frame) up to `max_message_size`.
pub(crate) fn config(max_message_size: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(max_message_size))
        .max_frame_size(Some(max_message_size))
        // The default read buffer (128 KiB, zeroed on first use) made each
        // idle connection cost ~132 KiB of memory; it still grows for big
        // messages.
        .read_buffer_size(8 << 10)
}

/// Writes queued messages to `sink` until every sender is gone, then closes
/// it. Messages that are already queued are written together and flushed
/// once, so many small replies cost one system call.
pub(crate) async fn write_loop<S>(mut sink: S, mut queue: mpsc::Receiver<Message>)
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    while let Some(first) = queue.recv().await {
        if sink.feed(first).await.is_err() {
            return;
        }
        while let Ok(next) = queue.try_recv() {
            if sink.feed(next).await.is_err() {
                return;
            }
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
    // Best effort: the peer may already be gone.
    let _ = sink.close().await;
}
