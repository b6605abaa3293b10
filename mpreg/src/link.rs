//! Peer links: one multiplexed WebSocket between two nodes, on the same port
//! as clients. Jobs carry ids; replies may come back in any order, so a slow
//! job never blocks a fast one. Either side may send jobs.
//!
//! A link opens with a small [`Open`](crate::protocol::peer::Open) from the
//! dialer, then, with a cluster secret, a
//! [`Proof`](crate::protocol::peer::Proof) from each side (the acceptor
//! first), then a [`Hello`](crate::protocol::peer::Hello) from each side (the
//! dialer first): see `cluster/handshake.rs`. After that, messages are
//! [`PeerMessage`]s; see `docs/PROTOCOL.md` ("Node to node"). The messages
//! themselves, and their encoding, are in [`crate::protocol::peer`]; this
//! file is the link that carries them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::{AbortHandle, JoinSet};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;

use crate::error::{ErrorCode, RpcError};
use crate::exec::Job;
use crate::payload::Payload;
use crate::protocol::peer::{Catalog, JobLimits, PeerMessage, RunRef};

type Waiter = oneshot::Sender<Result<Vec<Payload>, RpcError>>;

/// The sending side of a link, shared by everyone who sends jobs over it.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    inner: Arc<LinkInner>,
}

#[derive(Debug)]
struct LinkInner {
    /// The peer's name, for error messages.
    peer: String,
    outgoing: mpsc::Sender<Message>,
    /// Callers waiting for `Done`, by job id; `None` once the link is gone.
    pending: Mutex<Option<HashMap<u64, Waiter>>>,
    next_id: AtomicU64,
    /// Jobs sent and not answered yet: the load the router sees.
    inflight: AtomicUsize,
    /// Jobs sent over the link in total.
    jobs_sent: AtomicU64,
    /// Grows with every job sent and every message received: the link is
    /// idle while it stands still.
    activity: AtomicU64,
    /// Set while the link is closing for being idle: no job may start on
    /// it (see [`Link::reserve`]).
    draining: std::sync::atomic::AtomicBool,
    closed: CancellationToken,
}

impl Link {
    /// A link sending through `outgoing` (drained by a writer task).
    pub(crate) fn new(peer: String, outgoing: mpsc::Sender<Message>) -> Self {
        Self {
            inner: Arc::new(LinkInner {
                peer,
                outgoing,
                pending: Mutex::new(Some(HashMap::new())),
                next_id: AtomicU64::new(1),
                inflight: AtomicUsize::new(0),
                jobs_sent: AtomicU64::new(0),
                activity: AtomicU64::new(0),
                draining: std::sync::atomic::AtomicBool::new(false),
                closed: CancellationToken::new(),
            }),
        }
    }

    fn pending(&self) -> MutexGuard<'_, Option<HashMap<u64, Waiter>>> {
        // Held only for map operations, which cannot panic.
        self.inner
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn lost(&self) -> RpcError {
        RpcError::new(
            ErrorCode::NodeLost,
            format!("lost the link to node '{}'", self.inner.peer),
        )
    }

    /// Jobs in flight over this link.
    pub(crate) fn load(&self) -> usize {
        self.inner.inflight.load(Ordering::Relaxed)
    }

    /// Jobs sent over this link so far.
    pub(crate) fn jobs_sent(&self) -> u64 {
        self.inner.jobs_sent.load(Ordering::Relaxed)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.inner.closed.is_cancelled()
    }

    /// Whether new jobs may go over this link: it is neither closed nor
    /// closing for being idle.
    pub(crate) fn is_usable(&self) -> bool {
        !self.is_closed() && !self.inner.draining.load(Ordering::SeqCst)
    }

    /// Takes a slot for a job on this link: `None` when it is closed or
    /// closing (the job must go over another link). Counted in the load
    /// until the slot (or the job it becomes) is dropped.
    ///
    /// With [`Link::start_draining`] this is a two-sided check on two
    /// atomics (each side writes its own, then reads the other's), so a
    /// job and the decision that the link is idle never both go through.
    pub(crate) fn reserve(&self) -> Option<InFlight<'_>> {
        self.inner.inflight.fetch_add(1, Ordering::SeqCst);
        let slot = InFlight {
            link: self,
            id: None,
            answered: false,
        };
        self.is_usable().then_some(slot)
    }

    /// Marks the link as closing for being idle, unless a job is in flight
    /// (sent by this side); returns whether it did.
    fn start_draining(&self) -> bool {
        self.inner.draining.store(true, Ordering::SeqCst);
        if self.inner.inflight.load(Ordering::SeqCst) > 0 {
            self.inner.draining.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Closes the link: every waiting job fails with `node_lost`.
    pub(crate) fn close(&self) {
        self.inner.closed.cancel();
        // Dropping the waiters wakes their callers with an error.
        self.pending().take();
    }

    /// Sends a close frame (`code`, `reason`), then closes the link.
    pub(crate) async fn close_with(
        &self,
        code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode,
        reason: &str,
    ) {
        let frame = tokio_tungstenite::tungstenite::protocol::CloseFrame {
            code,
            reason: reason.to_owned().into(),
        };
        self.send_encoded(Message::Close(Some(frame))).await;
        self.close();
    }

    /// Queues a message; false when the link is gone.
    pub(crate) async fn send(&self, message: &PeerMessage) -> bool {
        self.send_encoded(message.encode()).await
    }

    /// Queues an encoded message; false when the link is gone.
    async fn send_encoded(&self, message: Message) -> bool {
        !self.is_closed() && self.inner.outgoing.send(message).await.is_ok()
    }

    /// Runs `job` on the peer, in a slot [`Link::reserve`] took, and waits
    /// for its outputs. Dropping the future before the answer tells the
    /// peer to stop the job.
    pub(crate) async fn run_job(
        &self,
        mut slot: InFlight<'_>,
        job: &Job,
        timeout: Duration,
        trace: &str,
        limits: JobLimits,
    ) -> Result<Vec<Payload>, RpcError> {
        self.inner.activity.fetch_add(1, Ordering::Relaxed);
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let run = RunRef::Run {
            id,
            steps: &job.steps,
            outputs: &job.outputs,
            timeout_ms: timeout.as_millis().try_into().unwrap_or(u64::MAX),
            trace: (!trace.is_empty()).then_some(trace),
            budget: Some(limits.budget.try_into().unwrap_or(u64::MAX)),
        }
        .encode();
        if run.len() > limits.max_message {
            return Err(too_large_message(
                "the job's arguments",
                run.len(),
                limits.max_message,
            ));
        }
        let (tx, rx) = oneshot::channel();
        match self.pending().as_mut() {
            Some(p) => p.insert(id, tx),
            None => return Err(self.lost()),
        };
        slot.id = Some(id);
        if !self.send_encoded(run).await {
            slot.answered = true;
            return Err(self.lost());
        }
        self.inner.jobs_sent.fetch_add(1, Ordering::Relaxed);
        let answer = rx.await;
        slot.answered = true;
        answer.unwrap_or_else(|_| Err(self.lost()))
    }

    /// Hands `Done { id }` to the job's caller.
    fn complete(&self, id: u64, answer: Result<Vec<Payload>, RpcError>) {
        let waiter = self.pending().as_mut().and_then(|p| p.remove(&id));
        if let Some(waiter) = waiter {
            // The caller may have stopped waiting.
            let _ = waiter.send(answer);
        }
    }
}

/// A slot for a job on a link, then the job in flight: keeps the load
/// count, and cancels the job on the peer if its caller stops waiting.
#[derive(Debug)]
pub(crate) struct InFlight<'a> {
    link: &'a Link,
    /// The job's id, once it is sent.
    id: Option<u64>,
    answered: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.link.inner.inflight.fetch_sub(1, Ordering::SeqCst);
        if let Some(id) = self.id
            && !self.answered
        {
            if let Some(p) = self.link.pending().as_mut() {
                p.remove(&id);
            }
            // Best effort: when the queue is full or the link gone, the
            // peer's own deadline still ends the job.
            let _ = self
                .link
                .inner
                .outgoing
                .try_send(PeerMessage::Cancel { id }.encode());
        }
    }
}

/// How a link checks that its peer is still there, and when it is idle.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Keepalive {
    /// How often to ping (and to look whether the link is idle).
    pub(crate) interval: Duration,
    /// Silence longer than this (no message, not even a pong) closes the
    /// link.
    pub(crate) timeout: Duration,
    /// When set (on the side that dialed), a link without any job for this
    /// long is closed, by agreement with the peer (`idle`, `idle-ok`).
    pub(crate) idle: Option<Duration>,
}

/// What the receiving side of a link does with what the peer sends.
pub(crate) trait LinkHandler: Send + Sync + 'static {
    /// Runs a job the peer sent; resolves to its outputs.
    fn run(
        &self,
        job: Job,
        timeout: Duration,
        trace: Option<String>,
        budget: Option<u64>,
    ) -> futures_util::future::BoxFuture<'static, Result<Vec<Payload>, RpcError>>;
    /// The largest answer the link carries: a larger one is answered with
    /// `too_large` instead, so one job's result never closes the link.
    fn max_answer(&self) -> usize;
    /// The peer's abilities changed.
    fn catalog(&self, catalog: Catalog);
}

/// Reads the peer's messages until the link closes: answers `Run`, hands
/// `Done` to waiting callers, stops cancelled jobs. A message that is not
/// a valid peer message closes the link: a peer sending garbage is not
/// trusted. When this returns, the link is closed and its jobs stopped.
pub(crate) async fn read_loop<S, H>(link: &Link, mut source: S, handler: H, keepalive: Keepalive)
where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
    H: LinkHandler,
{
    let handler = Arc::new(handler);
    let mut jobs: JoinSet<u64> = JoinSet::new();
    let mut running: HashMap<u64, AbortHandle> = HashMap::new();
    let mut ping = tokio::time::interval(keepalive.interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = tokio::time::Instant::now();
    // Idle links: the activity last seen, since when, and where the
    // closing stands.
    let mut seen_activity = link.inner.activity.load(Ordering::Relaxed);
    let mut quiet_since = last_heard;
    let mut asked_idle = false;
    let mut close_when_done = false;
    loop {
        if close_when_done && running.is_empty() {
            tracing::debug!(peer = %link.inner.peer, "closing an idle link");
            link.close_with(
                tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal,
                "idle",
            )
            .await;
            break;
        }
        let message = tokio::select! {
            biased;
            _ = link.inner.closed.cancelled() => break,
            Some(done) = jobs.join_next(), if !jobs.is_empty() => {
                if let Ok(id) = done {
                    running.remove(&id);
                }
                continue;
            }
            message = source.next() => message,
            _ = ping.tick() => {
                // A link can stall without closing (a peer frozen, a
                // middlebox dropping packets): silence past the timeout,
                // despite our pings, means it is lost.
                if last_heard.elapsed() > keepalive.timeout {
                    tracing::warn!(peer = %link.inner.peer, "peer link silent past the keepalive timeout; closing it");
                    break;
                }
                let _ = link.inner.outgoing.try_send(Message::Ping(Default::default()));
                let activity = link.inner.activity.load(Ordering::Relaxed);
                if activity != seen_activity || !running.is_empty() || link.load() > 0 {
                    seen_activity = activity;
                    quiet_since = tokio::time::Instant::now();
                } else if let Some(idle) = keepalive.idle
                    && !asked_idle
                    && quiet_since.elapsed() >= idle
                    && link.start_draining()
                {
                    asked_idle = true;
                    let _ = link.inner.outgoing.try_send(PeerMessage::Idle.encode());
                }
                continue;
            }
        };
        last_heard = tokio::time::Instant::now();
        let message = match message {
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
            Some(Ok(m)) => m,
        };
        let size = message.len();
        let decoded = crate::ws::cpu_bound(size, move || PeerMessage::decode(&message)).await;
        let decoded = match decoded {
            None => break,          // the node is stopping
            Some(None) => continue, // ping, pong
            Some(Some(Ok(m))) => {
                link.inner.activity.fetch_add(1, Ordering::Relaxed);
                m
            }
            Some(Some(Err(e))) => {
                tracing::warn!(peer = %link.inner.peer, error = %e, "peer sent an invalid message; closing the link");
                break;
            }
        };
        match decoded {
            PeerMessage::Run {
                id,
                steps,
                outputs,
                timeout_ms,
                trace,
                budget,
            } => {
                let mut work = handler.run(
                    Job { steps, outputs },
                    Duration::from_millis(timeout_ms),
                    trace,
                    budget,
                );
                let max = handler.max_answer();
                // Most jobs (a quick handler) are done at their first poll:
                // answer at once, without a task and its wake-ups (as a
                // client connection does). The others go on on a task.
                match poll_once(&mut work) {
                    std::task::Poll::Ready(answer) => {
                        match link.inner.outgoing.try_send(done(id, answer, max)) {
                            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
                            // The queue is full: wait for room on a task,
                            // never in this loop (which must keep reading).
                            Err(mpsc::error::TrySendError::Full(message)) => {
                                let link = link.clone();
                                jobs.spawn(async move {
                                    link.send_encoded(message).await;
                                    id
                                });
                            }
                        }
                    }
                    std::task::Poll::Pending => {
                        let link = link.clone();
                        let abort = jobs.spawn(async move {
                            let answer = crate::exec::guarded(work).await;
                            link.send_encoded(done(id, answer, max)).await;
                            id
                        });
                        running.insert(id, abort);
                    }
                }
            }
            PeerMessage::Done { id, values, error } => {
                let answer = match (error, values) {
                    (Some(e), _) => Err(e),
                    (None, Some(values)) => Ok(values),
                    (None, None) => Err(RpcError::new(
                        ErrorCode::Internal,
                        "peer answered with neither values nor error",
                    )),
                };
                link.complete(id, answer);
            }
            PeerMessage::Cancel { id } => {
                if let Some(job) = running.remove(&id) {
                    job.abort();
                }
            }
            PeerMessage::Catalog(catalog) => handler.catalog(catalog),
            PeerMessage::Idle => {
                let answer = if link.start_draining() {
                    PeerMessage::IdleOk
                } else {
                    PeerMessage::IdleNo
                };
                link.send(&answer).await;
            }
            PeerMessage::IdleOk if asked_idle => close_when_done = true,
            PeerMessage::IdleNo if asked_idle => {
                asked_idle = false;
                link.inner.draining.store(false, Ordering::SeqCst);
                quiet_since = tokio::time::Instant::now();
            }
            PeerMessage::IdleOk | PeerMessage::IdleNo => {
                tracing::debug!(peer = %link.inner.peer, "ignoring an answer to an idle nobody asked");
            }
            PeerMessage::PeerOpen(_) | PeerMessage::PeerHello(_) | PeerMessage::PeerProof(_) => {
                tracing::debug!(peer = %link.inner.peer, "ignoring a repeated handshake message");
            }
        }
    }
    link.close();
    jobs.abort_all();
}

/// The answer to job `id`, encoded; `too_large` instead when it would be
/// over `max` bytes (the link's message limit).
fn done(id: u64, answer: Result<Vec<Payload>, RpcError>, max: usize) -> Message {
    let message = done_message(id, answer).encode();
    if message.len() <= max {
        return message;
    }
    let error = too_large_message("the job's answer", message.len(), max);
    done_message(id, Err(error)).encode()
}

/// `too_large`: `what` is `bytes` long, over the link's message limit.
fn too_large_message(what: &str, bytes: usize, max: usize) -> RpcError {
    RpcError::new(
        ErrorCode::TooLarge,
        format!("{what} would be a message of {bytes} bytes, over the link's limit of {max}"),
    )
    .with_details(serde_json::json!({ "limit": max, "bytes": bytes }))
}

fn done_message(id: u64, answer: Result<Vec<Payload>, RpcError>) -> PeerMessage {
    match answer {
        Ok(values) => PeerMessage::Done {
            id,
            values: Some(values),
            error: None,
        },
        Err(error) => PeerMessage::Done {
            id,
            values: None,
            error: Some(error),
        },
    }
}

/// Polls a job's future once, without a task to wake (a future still
/// pending registers the waker of the task it moves to at its next poll).
/// A panic is a `handler_failed` answer, as with [`crate::exec::guarded`].
fn poll_once(
    work: &mut futures_util::future::BoxFuture<'static, Result<Vec<Payload>, RpcError>>,
) -> std::task::Poll<Result<Vec<Payload>, RpcError>> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let polled =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work.as_mut().poll(&mut cx)));
    polled.unwrap_or_else(|payload| {
        std::task::Poll::Ready(Err(RpcError::handler_failed(format!(
            "handler panicked: {}",
            crate::exec::panic_message(&*payload)
        ))))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `job` over `link` as a caller does: in a slot, or `node_lost`
    /// when the link takes no job.
    async fn run(
        link: &Link,
        job: &Job,
        timeout: Duration,
        limits: JobLimits,
    ) -> Result<Vec<Payload>, RpcError> {
        let slot = link.reserve().ok_or_else(|| link.lost())?;
        link.run_job(slot, job, timeout, "", limits).await
    }
    use crate::plan::{Arg, Step};
    use serde_json::json;

    const LIMITS: JobLimits = JobLimits {
        max_message: 1 << 20,
        budget: 1 << 20,
    };

    #[tokio::test]
    async fn a_job_too_large_for_the_link_fails_alone_and_is_never_sent() {
        let (tx, mut rx) = mpsc::channel(8);
        let link = Link::new("p".into(), tx);
        let job = Job {
            steps: vec![Step {
                name: "a".into(),
                fun: "echo".into(),
                args: vec![Arg::Value(json!("x".repeat(2000)).into())],
                kwargs: Vec::new(),
                locs: Vec::new(),
                deps: Vec::new(),
            }],
            outputs: vec![0],
        };
        let limits = JobLimits {
            max_message: 1000,
            budget: 1000,
        };
        let e = run(&link, &job, Duration::from_secs(1), limits)
            .await
            .expect_err("too large");
        assert_eq!(e.code, ErrorCode::TooLarge);
        assert_eq!(
            e.details.as_ref().map(|d| d["limit"].clone()),
            Some(json!(1000))
        );
        assert!(rx.try_recv().is_err(), "nothing was sent");
        assert!(!link.is_closed());
        assert_eq!(link.load(), 0);
    }

    #[test]
    fn an_answer_too_large_for_the_link_is_too_large_instead() {
        let big = Ok(vec![Payload::from(json!("y".repeat(5000)))]);
        let message = done(3, big, 1000);
        assert!(message.len() <= 1000);
        let Some(Ok(PeerMessage::Done { id, values, error })) = PeerMessage::decode(&message)
        else {
            panic!("not a done: {message:?}");
        };
        assert_eq!((id, values), (3, None));
        assert_eq!(error.map(|e| e.code), Some(ErrorCode::TooLarge));
        let small = done(4, Ok(vec![Payload::from(json!(1))]), 1000);
        assert!(matches!(
            PeerMessage::decode(&small),
            Some(Ok(PeerMessage::Done {
                values: Some(_),
                ..
            }))
        ));
    }

    #[tokio::test]
    async fn closing_fails_waiting_jobs_with_node_lost() {
        let (tx, mut rx) = mpsc::channel(8);
        let link = Link::new("peer-x".into(), tx);
        let job = Job {
            steps: Vec::new(),
            outputs: Vec::new(),
        };
        let waiting = tokio::spawn({
            let link = link.clone();
            async move { run(&link, &job, Duration::from_secs(60), LIMITS).await }
        });
        // The Run message went out; the answer never comes.
        let sent = rx.recv().await.expect("run sent");
        assert!(matches!(
            PeerMessage::decode(&sent),
            Some(Ok(PeerMessage::Run { .. }))
        ));
        assert_eq!(link.jobs_sent(), 1);
        link.close();
        let e = waiting.await.expect("join").expect_err("lost");
        assert_eq!(e.code, ErrorCode::NodeLost);
        assert!(e.message.contains("peer-x"));
        assert_eq!(link.load(), 0);
        // A closed link refuses new jobs at once.
        let e = run(
            &link,
            &Job {
                steps: Vec::new(),
                outputs: Vec::new(),
            },
            Duration::from_secs(1),
            LIMITS,
        )
        .await
        .expect_err("closed");
        assert_eq!(e.code, ErrorCode::NodeLost);
    }

    #[tokio::test]
    async fn dropping_a_waiting_job_sends_cancel() {
        let (tx, mut rx) = mpsc::channel(8);
        let link = Link::new("p".into(), tx);
        let job = Job {
            steps: Vec::new(),
            outputs: Vec::new(),
        };
        let fut = run(&link, &job, Duration::from_secs(60), LIMITS);
        // Poll until the Run is queued, then drop the caller.
        let _ = tokio::time::timeout(Duration::from_millis(50), fut).await;
        let first = rx.recv().await.expect("run");
        let second = rx.recv().await.expect("cancel");
        let (
            Some(Ok(PeerMessage::Run { id, .. })),
            Some(Ok(PeerMessage::Cancel { id: cancelled })),
        ) = (PeerMessage::decode(&first), PeerMessage::decode(&second))
        else {
            panic!("expected run then cancel");
        };
        assert_eq!(id, cancelled);
        assert_eq!(link.load(), 0);
    }
}
