//! WebSocket plumbing shared by the server and the client.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::{Sink, SinkExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;

/// Outgoing messages queued per connection before senders wait
/// (backpressure instead of an unbounded buffer). Client connections of a
/// node are bounded in bytes instead ([`Outgoing`]).
pub(crate) const OUTGOING_QUEUE: usize = 1024;

/// Messages at least this large are parsed and encoded on tokio's blocking
/// pool, so a few huge messages never hold every runtime worker at once.
pub(crate) const LARGE_MESSAGE: usize = 256 << 10;

/// Bytes the WebSocket library gathers before writing to the socket.
const WRITE_BUFFER: usize = 64 << 10;

/// Room for a frame's header and a pong or close frame on top of the
/// largest message, in the bound of the write buffer.
const WRITE_BUFFER_SLACK: usize = 64 << 10;

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
/// a client may send a whole message as one frame) up to `max_message_size`,
/// and a write buffer bounded by [`write_buffer_bound`] of the same size.
pub(crate) fn config(max_message_size: usize) -> WebSocketConfig {
    config_for(max_message_size, max_message_size)
}

/// [`config`] for a connection that may send messages up to
/// `largest_outgoing` bytes (a node's replies, up to its reply budget).
pub(crate) fn config_for(max_message_size: usize, largest_outgoing: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(max_message_size))
        .max_frame_size(Some(max_message_size))
        // The default read buffer (128 KiB, zeroed on first use) made each
        // idle connection cost ~132 KiB of memory; it still grows for big
        // messages.
        .read_buffer_size(8 << 10)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(write_buffer_bound(largest_outgoing.max(max_message_size)))
}

/// The most the WebSocket write buffer may hold for a connection that sends
/// messages up to `largest` bytes: one such message (plus an eighth, for a
/// reply's envelope around results counted up to the budget) and a little.
/// The writer adds a message only when the buffer holds at most
/// `WRITE_BUFFER` (the library writes out, and waits for the socket to take,
/// anything more first), so a message that fits is never refused; what the
/// bound stops is pongs piling up for a peer that sends pings and never
/// reads.
pub(crate) fn write_buffer_bound(largest: usize) -> usize {
    largest
        .saturating_add(largest / 8)
        .saturating_add(WRITE_BUFFER)
        .saturating_add(WRITE_BUFFER_SLACK)
}

/// What [`write_loop`] takes its messages from.
pub(crate) trait WriteQueue: Send {
    /// The next message; `None` when every sender is gone.
    fn recv(&mut self) -> impl Future<Output = Option<Message>> + Send;
    /// The next message if one is queued now.
    fn try_recv(&mut self) -> Option<Message>;
    /// The messages received so far are written and flushed.
    fn written(&mut self) {}
    /// Writing failed with `error`; the loop ends.
    fn failed(&mut self, _error: &WsError) {}
}

impl WriteQueue for mpsc::Receiver<Message> {
    fn recv(&mut self) -> impl Future<Output = Option<Message>> + Send {
        mpsc::Receiver::recv(self)
    }

    fn try_recv(&mut self) -> Option<Message> {
        mpsc::Receiver::try_recv(self).ok()
    }
}

/// Writes queued messages to `sink` until every sender is gone, then closes
/// it. Messages that are already queued are written together and flushed
/// once, so many small replies cost one system call.
pub(crate) async fn write_loop<S, Q>(mut sink: S, mut queue: Q)
where
    S: Sink<Message, Error = WsError> + Unpin,
    Q: WriteQueue,
{
    while let Some(first) = queue.recv().await {
        if let Err(e) = sink.feed(first).await {
            return queue.failed(&e);
        }
        while let Some(next) = queue.try_recv() {
            if let Err(e) = sink.feed(next).await {
                return queue.failed(&e);
            }
        }
        if let Err(e) = sink.flush().await {
            return queue.failed(&e);
        }
        queue.written();
    }
    // Best effort: the peer may already be gone.
    let _ = sink.close().await;
}

/// The sending side of a connection's outgoing queue, bounded in bytes:
/// each queued message holds permits for its length (at most the whole
/// budget, so one message larger than the budget still goes when the queue
/// is empty) until the writer has written it. Senders wait for room; one
/// that waits longer than the slow-reader timeout ends the connection (see
/// [`Outgoing::ended`]). Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Outgoing {
    tx: mpsc::UnboundedSender<Queued>,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    room: Arc<Semaphore>,
    budget: u32,
    slow_reader: Duration,
    /// Cancelled when the connection's writing is over: the writer ended,
    /// the reader is too slow, or the connection stopped.
    ended: CancellationToken,
    slow: AtomicBool,
    overflow: AtomicBool,
}

#[derive(Debug)]
struct Queued {
    message: Message,
    /// `None` for a close frame, which goes whatever the room.
    permit: Option<OwnedSemaphorePermit>,
}

/// Why a message was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SendError {
    /// The connection's writing is over.
    Closed,
    /// No room came within the slow-reader timeout: the connection ends.
    SlowReader,
}

/// How the writing of a connection ended, once [`Outgoing::ended`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// The writer stopped (the socket broke or the connection stopped).
    Closed,
    /// A sender waited for room longer than the slow-reader timeout.
    SlowReader,
    /// The WebSocket write buffer was full (the peer does not read).
    WriteBuffer,
}

/// A connection's outgoing queue of `budget` bytes (at least 1, at most
/// `u32::MAX`); senders waiting longer than `slow_reader` end it.
pub(crate) fn outgoing(budget: usize, slow_reader: Duration) -> (Outgoing, OutgoingQueue) {
    let budget = u32::try_from(budget.max(1)).unwrap_or(u32::MAX);
    let shared = Arc::new(Shared {
        room: Arc::new(Semaphore::new(budget as usize)),
        budget,
        slow_reader,
        ended: CancellationToken::new(),
        slow: AtomicBool::new(false),
        overflow: AtomicBool::new(false),
    });
    let (tx, rx) = mpsc::unbounded_channel();
    let queue = OutgoingQueue {
        rx,
        written: Vec::new(),
        shared: shared.clone(),
    };
    (Outgoing { tx, shared }, queue)
}

impl Outgoing {
    /// The permits `message` holds: its length, at least 1, at most the
    /// whole budget.
    fn cost(&self, message: &Message) -> u32 {
        let len = u32::try_from(message.len()).unwrap_or(u32::MAX);
        len.clamp(1, self.shared.budget)
    }

    /// Queues `message`, waiting for room.
    pub(crate) async fn send(&self, message: Message) -> Result<(), SendError> {
        let cost = self.cost(&message);
        let shared = &self.shared;
        let wait = tokio::time::timeout(
            shared.slow_reader,
            shared.room.clone().acquire_many_owned(cost),
        );
        let permit = tokio::select! {
            biased;
            _ = shared.ended.cancelled() => return Err(SendError::Closed),
            permit = wait => match permit {
                Ok(Ok(permit)) => permit,
                Ok(Err(_)) => return Err(SendError::Closed),
                Err(_) => {
                    shared.slow.store(true, Ordering::Relaxed);
                    shared.ended.cancel();
                    return Err(SendError::SlowReader);
                }
            },
        };
        self.push(message, Some(permit))
            .map_err(|_| SendError::Closed)
    }

    /// Queues `message` if there is room now; else gives it back.
    pub(crate) fn try_send(&self, message: Message) -> Result<(), Message> {
        if self.shared.ended.is_cancelled() {
            return Err(message);
        }
        match self
            .shared
            .room
            .clone()
            .try_acquire_many_owned(self.cost(&message))
        {
            Ok(permit) => self.push(message, Some(permit)),
            Err(_) => Err(message),
        }
    }

    /// Queues a close frame after everything queued, whatever the room
    /// (it is small and the last message).
    pub(crate) fn close(&self, frame: tokio_tungstenite::tungstenite::protocol::CloseFrame) {
        let _ = self.push(Message::Close(Some(frame)), None);
    }

    /// Gives `message` back when the writer is gone.
    fn push(&self, message: Message, permit: Option<OwnedSemaphorePermit>) -> Result<(), Message> {
        self.tx
            .send(Queued { message, permit })
            .map_err(|e| e.0.message)
    }

    /// Ends the connection's writing: senders waiting for room give up.
    /// What is queued is still written.
    pub(crate) fn stop(&self) {
        self.shared.ended.cancel();
    }

    /// Completes when the writing is over (see [`Ending`]).
    pub(crate) async fn ended(&self) -> Ending {
        self.shared.ended.cancelled().await;
        self.ending()
    }

    /// How the writing ended (meaningful once it has).
    pub(crate) fn ending(&self) -> Ending {
        if self.shared.slow.load(Ordering::Relaxed) {
            Ending::SlowReader
        } else if self.shared.overflow.load(Ordering::Relaxed) {
            Ending::WriteBuffer
        } else {
            Ending::Closed
        }
    }

    /// Bytes queued and not yet written.
    #[cfg(test)]
    fn queued(&self) -> usize {
        self.shared.budget as usize - self.shared.room.available_permits()
    }
}

/// The writer's side of an [`Outgoing`] queue: gives each message's room
/// back once it is written, and marks the writing as over when dropped.
#[derive(Debug)]
pub(crate) struct OutgoingQueue {
    rx: mpsc::UnboundedReceiver<Queued>,
    /// Permits of messages fed and not yet flushed.
    written: Vec<OwnedSemaphorePermit>,
    shared: Arc<Shared>,
}

impl OutgoingQueue {
    fn take(&mut self, queued: Queued) -> Message {
        self.written.extend(queued.permit);
        queued.message
    }
}

impl WriteQueue for OutgoingQueue {
    async fn recv(&mut self) -> Option<Message> {
        let queued = self.rx.recv().await?;
        Some(self.take(queued))
    }

    fn try_recv(&mut self) -> Option<Message> {
        let queued = self.rx.try_recv().ok()?;
        Some(self.take(queued))
    }

    fn written(&mut self) {
        self.written.clear();
    }

    fn failed(&mut self, error: &WsError) {
        if matches!(error, WsError::WriteBufferFull(_)) {
            self.shared.overflow.store(true, Ordering::Relaxed);
        }
    }
}

impl Drop for OutgoingQueue {
    fn drop(&mut self) {
        self.shared.ended.cancel();
        // Senders still waiting for room give up at once.
        self.shared.room.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(len: usize) -> Message {
        Message::text("x".repeat(len))
    }

    #[tokio::test]
    async fn the_queue_is_bounded_in_bytes_and_gives_room_back_when_written() {
        let (outgoing, mut queue) = outgoing(100, Duration::from_secs(30));
        outgoing.send(text(60)).await.expect("fits");
        assert!(outgoing.try_send(text(41)).is_err(), "over the budget");
        outgoing.try_send(text(40)).expect("fits exactly");
        assert_eq!(outgoing.queued(), 100);
        assert_eq!(queue.recv().await.map(|m| m.len()), Some(60));
        assert_eq!(queue.try_recv().map(|m| m.len()), Some(40));
        assert_eq!(outgoing.queued(), 100, "held until written");
        queue.written();
        assert_eq!(outgoing.queued(), 0);
    }

    #[tokio::test]
    async fn a_message_larger_than_the_budget_goes_when_the_queue_is_empty() {
        let (outgoing, mut queue) = outgoing(100, Duration::from_secs(30));
        outgoing.send(text(10)).await.expect("fits");
        assert!(outgoing.try_send(text(1000)).is_err(), "waits for room");
        let _ = queue.recv().await;
        queue.written();
        outgoing.try_send(text(1000)).expect("goes alone");
        assert_eq!(queue.recv().await.map(|m| m.len()), Some(1000));
    }

    #[tokio::test(start_paused = true)]
    async fn a_sender_waiting_past_the_slow_reader_timeout_ends_the_connection() {
        let (outgoing, _queue) = outgoing(10, Duration::from_secs(5));
        outgoing.send(text(10)).await.expect("fits");
        assert_eq!(outgoing.send(text(1)).await, Err(SendError::SlowReader));
        assert_eq!(outgoing.ended().await, Ending::SlowReader);
        assert_eq!(outgoing.send(text(1)).await, Err(SendError::Closed));
    }

    #[tokio::test]
    async fn senders_give_up_when_the_writer_is_gone() {
        let (outgoing, queue) = outgoing(10, Duration::from_secs(30));
        outgoing.send(text(10)).await.expect("fits");
        let waiting = tokio::spawn({
            let outgoing = outgoing.clone();
            async move { outgoing.send(text(5)).await }
        });
        drop(queue);
        assert_eq!(waiting.await.ok(), Some(Err(SendError::Closed)));
        assert_eq!(outgoing.ended().await, Ending::Closed);
    }

    #[tokio::test]
    async fn a_close_frame_goes_whatever_the_room() {
        use tokio_tungstenite::tungstenite::protocol::CloseFrame;
        use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
        let (outgoing, mut queue) = outgoing(10, Duration::from_secs(30));
        outgoing.send(text(10)).await.expect("fits");
        outgoing.close(CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        });
        let _ = queue.recv().await;
        assert!(matches!(queue.try_recv(), Some(Message::Close(Some(_)))));
    }

    #[test]
    fn the_write_buffer_holds_one_largest_message() {
        let c = config(64 << 10);
        assert!(c.max_write_buffer_size > c.write_buffer_size);
        assert!(c.max_write_buffer_size >= (64 << 10) + c.write_buffer_size);
        assert!(c.max_write_buffer_size < 1 << 20);
        let replies = config_for(64 << 10, 1 << 20);
        assert_eq!(replies.max_message_size, Some(64 << 10));
        assert!(replies.max_write_buffer_size > (1 << 20) + replies.write_buffer_size);
    }
}
