//! [`Client`]: a WebSocket connection to a node, shared by any number of
//! tasks, that fails over to another node when its node goes away.
//! Requests carry ids; replies are matched to them in whatever order they
//! come back.

mod conn;
mod stream;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

use crate::config::{ConfigError, DEFAULT_MAX_MESSAGE_SIZE, DEFAULT_REQUEST_TIMEOUT};
use crate::error::Error;
use crate::protocol::{Command, MARKER_VERSION, OutgoingRequest, Reply, Request};
use conn::{Conn, Dial, Entry, Orphans, StreamItem, Waiter};
pub use stream::{Event, Progress, ResultStream};

/// Extra time the client waits past a request's own deadline, so that the
/// node's `timeout` error (which says more) arrives before the client gives up.
const DEADLINE_SLACK: Duration = Duration::from_secs(5);

/// Default bound on one connection attempt.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// See [`Client::DEFAULT_CALL_TIMEOUT`].
const DEFAULT_CALL_TIMEOUT: Duration = DEFAULT_REQUEST_TIMEOUT.saturating_add(DEADLINE_SLACK);

/// Room left in the client's message limit, over the reply size it asks
/// for, for the reply's envelope (id, names, an error naming the command).
const REPLY_ENVELOPE_ROOM: usize = 64 << 10;

/// A connection to an mpreg node. Cheap to clone; clones share the
/// connection, and many calls may be in flight at once.
///
/// ```no_run
/// # async fn doc() -> Result<(), mpreg::Error> {
/// use mpreg::{Client, Command, Request};
///
/// let client = Client::connect("ws://127.0.0.1:7773").await?;
///
/// // One function:
/// let said: String = client.call("echo", ("hi there!",)).await?;
///
/// // Several, with references between them:
/// let results = client
///     .send(
///         Request::new()
///             .cmd(Command::new("|first", "echo").arg("hi there!"))
///             .cmd(Command::new("|second", "echos").arg("|first").arg("AND ME TOO")),
///     )
///     .await?;
/// let second: Vec<String> = results.get("|second")?;
/// # Ok(()) }
/// ```
///
/// # Failover
///
/// A client made with [`connect_any`](Self::connect_any) knows several
/// nodes (seeds) and is connected to one at a time
/// ([`url`](Self::url) says which). When that node goes away, the calls in
/// flight on it fail with [`Error::Closed`]: **they may or may not have
/// run**, and the client never sends them again by itself (retry only what
/// is safe to run twice). The next call reconnects first, trying each seed
/// once, starting with the one after the lost node in the seed list and
/// ending with the lost node itself, each attempt within the
/// [connect timeout](ClientBuilder::connect_timeout). One call reconnects
/// at a time; calls made meanwhile wait for it and then use the same new
/// connection. If no seed answers, that call fails with
/// [`Error::NoSeedReachable`], and the next call tries again.
///
/// A client made with [`connect`](Self::connect) stays on its one node:
/// once the connection is lost, every call fails with [`Error::Closed`].
///
/// # Idle connections
///
/// A node may close a connection that had no request in flight for a
/// while (its `idle_timeout_ms`), with close code 1000 and the reason
/// [`IDLE_CLOSE_REASON`](crate::IDLE_CLOSE_REASON). Such a close means no
/// request still waiting on that connection was processed: the client
/// sends those again on a new connection (to the same node first, then the
/// other seeds), and the next call reconnects, with either constructor.
/// Callers see nothing of it.
///
/// # Limits
///
/// Every call has a deadline on the client side too: the request's own
/// ([`Request::timeout`]), else the client's ([`ClientBuilder::timeout`]),
/// plus 5 s of slack so the node's `timeout` error arrives first; without
/// either, [`Client::DEFAULT_CALL_TIMEOUT`] (305 s). A call that gets no reply by
/// then fails with [`Error::Timeout`].
///
/// The client tells the node the largest reply it takes
/// ([`ClientBuilder::max_reply_bytes`]); a request whose results would be
/// larger fails alone with `too_large`, and the connection stays up.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// Builds a [`Client`] with non-default settings.
#[derive(Clone)]
pub struct ClientBuilder {
    timeout: Option<Duration>,
    connect_timeout: Duration,
    max_message_size: usize,
    max_reply_bytes: Option<usize>,
    token: Option<String>,
    /// PEM of the CA certificates to trust for `wss://`.
    tls_ca: Option<Vec<u8>>,
    /// Sockets, or the in-memory network (the crate's simulation).
    transport: crate::transport::Transport,
}

impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_message_size", &self.max_message_size)
            .field("max_reply_bytes", &self.max_reply_bytes)
            .field("token", &self.token.as_ref().map(|_| "(set)"))
            .field("tls_ca", &self.tls_ca.as_ref().map(|_| "(set)"))
            .finish()
    }
}

impl Default for ClientBuilder {
    fn default() -> Self {
        Self {
            timeout: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            max_reply_bytes: None,
            token: None,
            tls_ca: None,
            transport: crate::transport::Transport::Os,
        }
    }
}

impl ClientBuilder {
    /// Connects over `transport` instead of TCP: the simulation's
    /// in-memory network (`node/sim.rs`).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn transport(mut self, transport: crate::transport::Transport) -> Self {
        self.transport = transport;
        self
    }

    /// Gives every request this deadline unless it sets its own; the node
    /// enforces it (`timeout` error), and the client stops waiting 5 s
    /// after ([`Error::Timeout`]).
    ///
    /// Without it, the node's default deadline applies (300 s unless the
    /// node is configured otherwise), and the client stops waiting after
    /// [`Client::DEFAULT_CALL_TIMEOUT`] (305 s): set a longer timeout here (or on
    /// the request) for work that may run longer on a node configured so.
    ///
    /// ```no_run
    /// # async fn doc() -> Result<(), mpreg::Error> {
    /// use std::time::Duration;
    ///
    /// let client = mpreg::Client::builder()
    ///     .timeout(Duration::from_secs(30))
    ///     .connect("ws://127.0.0.1:7773")
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Bounds each connection attempt (TCP, TLS and WebSocket handshakes),
    /// to each seed and at every reconnection (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Largest message accepted, in bytes (default 64 MiB). The client
    /// asks nodes for replies of at most this less room for the envelope
    /// (64 KiB, or an eighth of a limit under 512 KiB); see
    /// [`max_reply_bytes`](Self::max_reply_bytes).
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self.max_reply_bytes = None;
        self
    }

    /// Largest reply asked for, in bytes (default: 64 KiB under
    /// [`max_message_size`](Self::max_message_size), so 64 MiB − 64 KiB).
    ///
    /// The client sends it in its WebSocket upgrade request (the header
    /// [`REPLY_LIMIT_HEADER`](crate::REPLY_LIMIT_HEADER)); a node then
    /// answers a request whose results would be larger with a `too_large`
    /// error for that request only, and the connection and the other calls
    /// on it go on. The client's own message limit becomes this plus
    /// 64 KiB, so that such an answer always fits. (A node that predates the
    /// header may still send a larger reply, which closes the connection.)
    ///
    /// ```no_run
    /// # async fn doc() -> Result<(), mpreg::Error> {
    /// use mpreg::{Error, ErrorCode};
    ///
    /// let client = mpreg::Client::builder()
    ///     .max_reply_bytes(1 << 20)
    ///     .connect("ws://127.0.0.1:7773")
    ///     .await?;
    /// match client.call::<String>("echo", ("x".repeat(2 << 20),)).await {
    ///     Err(Error::Rpc(e)) if e.code == ErrorCode::TooLarge => println!("too large: {e}"),
    ///     other => println!("{other:?}"),
    /// }
    /// # Ok(()) }
    /// ```
    pub fn max_reply_bytes(mut self, bytes: usize) -> Self {
        self.max_reply_bytes = Some(bytes);
        self
    }

    /// The client's WebSocket message limit and the reply size it asks for.
    fn limits(&self) -> (usize, usize) {
        match self.max_reply_bytes {
            Some(reply) => (reply.saturating_add(REPLY_ENVELOPE_ROOM), reply),
            None => {
                let room = REPLY_ENVELOPE_ROOM.min(self.max_message_size / 8);
                (self.max_message_size, self.max_message_size - room)
            }
        }
    }

    /// Presents `token` to nodes that require client tokens (sent as
    /// `Authorization: Bearer TOKEN` when connecting, to every seed).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Trusts the CA certificates in `ca_pem` (PEM text) for `wss://` URLs:
    /// the node's certificate must be issued by one of them and name the
    /// URL's host (an IP address or a DNS name). No root store is bundled,
    /// so a `wss://` URL needs this.
    ///
    /// ```no_run
    /// # async fn doc() -> Result<(), mpreg::Error> {
    /// let ca = std::fs::read("ca.pem")?;
    /// let client = mpreg::Client::builder()
    ///     .tls_ca_pem(ca)
    ///     .connect("wss://127.0.0.1:7773")
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn tls_ca_pem(mut self, ca_pem: impl Into<Vec<u8>>) -> Self {
        self.tls_ca = Some(ca_pem.into());
        self
    }

    /// Connects to the node at `url` (`ws://host:port`, or `wss://host:port`
    /// with [`tls_ca_pem`](Self::tls_ca_pem)). The client stays on this
    /// node; see [`connect_any`](Self::connect_any) for failover.
    ///
    /// Fails with [`Error::Connect`] when the node cannot be reached or the
    /// TLS or WebSocket handshake fails (an untrusted certificate, a
    /// `wss://` URL without a CA), and with [`Error::Config`] when the CA
    /// PEM cannot be used.
    pub async fn connect(self, url: &str) -> Result<Client, Error> {
        let (dial, orphans) = self.dial()?;
        let conn = Conn::open(url, 0, &dial).await?;
        Ok(self.client(vec![url.to_owned()], false, dial, conn, orphans))
    }

    /// Connects to the first of `seeds` that answers, trying them in order,
    /// each within the [connect timeout](Self::connect_timeout); the client
    /// then fails over among them (see [`Client`]'s "Failover"). Token and
    /// TLS settings apply to every seed.
    ///
    /// Fails with [`Error::NoSeedReachable`], listing each seed with why it
    /// failed, when none answers; with [`Error::Config`] when `seeds` is
    /// empty or the CA PEM cannot be used.
    ///
    /// ```no_run
    /// # async fn doc() -> Result<(), mpreg::Error> {
    /// use std::time::Duration;
    ///
    /// let client = mpreg::Client::builder()
    ///     .connect_timeout(Duration::from_secs(2))
    ///     .connect_any(["ws://10.0.0.1:7773", "ws://10.0.0.2:7773"])
    ///     .await?;
    /// println!("connected to {}", client.url());
    /// # Ok(()) }
    /// ```
    pub async fn connect_any<I, S>(self, seeds: I) -> Result<Client, Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let seeds: Vec<String> = seeds.into_iter().map(Into::into).collect();
        if seeds.is_empty() {
            return Err(ConfigError::Invalid {
                setting: "seeds",
                reason: "at least one seed URL is needed".into(),
            }
            .into());
        }
        let (dial, orphans) = self.dial()?;
        let conn = dial_from(&seeds, 0, &dial).await?;
        Ok(self.client(seeds, true, dial, conn, orphans))
    }

    /// The dialing settings shared by every seed, and where connections
    /// closed for idleness hand over their requests.
    fn dial(&self) -> Result<(Dial, mpsc::UnboundedReceiver<Orphans>), Error> {
        let tls = self
            .tls_ca
            .as_deref()
            .map(crate::tls::client_connector)
            .transpose()?;
        let (max_message_size, max_reply_bytes) = self.limits();
        let (orphans, handed_over) = mpsc::unbounded_channel();
        let dial = Dial {
            max_message_size,
            max_reply_bytes,
            token: self.token.clone(),
            tls,
            connect_timeout: self.connect_timeout,
            orphans: Some(orphans),
            transport: self.transport.clone(),
        };
        Ok((dial, handed_over))
    }

    fn client(
        self,
        seeds: Vec<String>,
        failover: bool,
        dial: Dial,
        conn: Conn,
        orphans: mpsc::UnboundedReceiver<Orphans>,
    ) -> Client {
        let inner = Arc::new(Inner {
            seeds,
            failover,
            dial,
            current: Mutex::new(Arc::new(conn)),
            reconnecting: tokio::sync::Mutex::new(()),
            next_id: AtomicU64::new(1),
            timeout: self.timeout,
        });
        // Ends when the client and its connections are gone.
        tokio::spawn(send_orphans_again(Arc::downgrade(&inner), orphans));
        Client { inner }
    }
}

/// Sends again, on a new connection, the requests of each connection a node
/// closed for idleness (none of them was processed there), for as long as
/// the client exists.
async fn send_orphans_again(client: Weak<Inner>, mut orphans: mpsc::UnboundedReceiver<Orphans>) {
    while let Some(orphaned) = orphans.recv().await {
        let Some(inner) = client.upgrade() else {
            return;
        };
        Client { inner }.send_again(orphaned).await;
    }
}

/// Tries each seed once, from `start` on (wrapping around), each within the
/// connect timeout; the first that answers is the connection.
async fn dial_from(seeds: &[String], start: usize, dial: &Dial) -> Result<Conn, Error> {
    let mut attempts = Vec::new();
    for k in 0..seeds.len() {
        let i = (start + k) % seeds.len();
        let url = &seeds[i];
        match Conn::open(url, i, dial).await {
            Ok(conn) => return Ok(conn),
            Err(e) => {
                tracing::debug!(%url, error = %e, "seed did not answer");
                attempts.push((url.clone(), e));
            }
        }
    }
    Err(Error::NoSeedReachable { attempts })
}

/// What every clone of a client shares.
#[derive(Debug)]
struct Inner {
    /// Where the client may connect, in the order given.
    seeds: Vec<String>,
    /// Whether a lost connection is replaced on the next call.
    failover: bool,
    dial: Dial,
    /// The connection in use (possibly lost, until the next call replaces
    /// it). Locked only to read or swap the `Arc`.
    current: Mutex<Arc<Conn>>,
    /// Held while reconnecting, so that one caller reconnects at a time.
    reconnecting: tokio::sync::Mutex<()>,
    next_id: AtomicU64,
    timeout: Option<Duration>,
}

impl Inner {
    fn current(&self) -> Arc<Conn> {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Removes a request's waiter if the caller stops waiting early.
struct Forget<'a> {
    inner: &'a Inner,
    conn: &'a Conn,
    id: &'a str,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        forget(self.inner, self.conn, self.id);
    }
}

/// Stops waiting for request `id`, sent on `conn`: there, or on the
/// client's current connection if it was sent again after an idle close
/// (ids are unique per client, so no other call's waiter goes).
fn forget(inner: &Inner, conn: &Conn, id: &str) {
    if conn.forget(id).is_none() && conn.closed_idle() {
        inner.current().forget(id);
    }
}

/// A request handed to a connection.
struct Submitted<R> {
    conn: Arc<Conn>,
    id: String,
    /// How long the client waits for the reply, if it has a limit.
    wait: Option<Duration>,
    /// Where the reply (and progress) arrives.
    receiver: R,
}

impl Client {
    /// How long a call waits for its reply when neither the request
    /// ([`Request::timeout`]) nor the client ([`ClientBuilder::timeout`])
    /// sets a deadline: the node's default deadline
    /// ([`DEFAULT_REQUEST_TIMEOUT`](crate::config::DEFAULT_REQUEST_TIMEOUT),
    /// 300 s) plus 5 s of slack. Past it, the call fails with
    /// [`Error::Timeout`].
    ///
    /// ```
    /// use std::time::Duration;
    /// assert_eq!(mpreg::Client::DEFAULT_CALL_TIMEOUT, Duration::from_secs(305));
    /// ```
    pub const DEFAULT_CALL_TIMEOUT: Duration = DEFAULT_CALL_TIMEOUT;

    /// Connects to the node at `url` (`ws://host:port`) with default settings
    /// (for `wss://`, use [`ClientBuilder::tls_ca_pem`]). The client stays
    /// on this node.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        ClientBuilder::default().connect(url).await
    }

    /// Connects to the first of `seeds` that answers, with default
    /// settings, and fails over among them (see [`Client`], "Failover", and
    /// [`ClientBuilder::connect_any`]).
    ///
    /// ```no_run
    /// # async fn doc() -> Result<(), mpreg::Error> {
    /// let client = mpreg::Client::connect_any(["ws://10.0.0.1:7773", "ws://10.0.0.2:7773"]).await?;
    /// let said: String = client.call("echo", ("hi",)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect_any<I, S>(seeds: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ClientBuilder::default().connect_any(seeds).await
    }

    /// A builder for a client with a timeout or other settings.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The URL of the node the client is connected to (or was last, if that
    /// connection is lost and no call has reconnected yet).
    pub fn url(&self) -> String {
        self.inner.current().url.clone()
    }

    /// Calls one function and decodes its result.
    ///
    /// `args` are the positional arguments: a tuple (`("hi",)`, `(1, 2)`),
    /// an array or `Vec`, or `()` for none. To pass a single list argument,
    /// wrap it: `(vec![1, 2],)`.
    pub async fn call<T: DeserializeOwned>(
        &self,
        fun: &str,
        args: impl Serialize,
    ) -> Result<T, Error> {
        self.call_command(Command::new("result", fun).args(positional(args)?))
            .await
    }

    /// Runs one command (with datasets or kwargs) and decodes its result.
    ///
    /// ```no_run
    /// # async fn doc(client: mpreg::Client) -> Result<(), mpreg::Error> {
    /// use mpreg::Command;
    /// let who: String = client
    ///     .call_command(Command::new("w", "mpreg.whoami").dataset("model-a"))
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn call_command<T: DeserializeOwned>(&self, command: Command) -> Result<T, Error> {
        let name = command.name.clone();
        self.send(Request::new().cmd(command)).await?.get(&name)
    }

    /// Sends a request of any number of commands and waits for its results.
    /// It asks for no progress (it clears [`Request::stream`]); see
    /// [`stream`](Self::stream) for that.
    pub async fn send(&self, request: Request) -> Result<Results, Error> {
        let sent = self
            .submit(&request, false, || {
                let (tx, rx) = oneshot::channel();
                (Waiter::Reply(tx), rx)
            })
            .await?;
        let _forget = Forget {
            inner: &self.inner,
            conn: &sent.conn,
            id: &sent.id,
        };
        let reply = match sent.wait {
            Some(wait) => tokio::time::timeout(wait, sent.receiver)
                .await
                .map_err(|_| Error::Timeout(wait))?,
            None => sent.receiver.await,
        }
        .map_err(|_| Error::Closed)?;
        results_of(reply)
    }

    /// Sends a request asking for each command's result as soon as it
    /// exists (it sets [`Request::stream`]), and returns the stream of those
    /// results followed by the final reply.
    ///
    /// The node then runs each command as a unit of its own (a chain bound
    /// for one peer is not shipped there as one job), so that every result
    /// streams the moment it exists. A node that predates streaming ignores
    /// the flag: the stream then yields only [`Event::Done`].
    ///
    /// ```no_run
    /// # async fn doc(client: mpreg::Client) -> Result<(), mpreg::Error> {
    /// use mpreg::{Command, Event, Request};
    ///
    /// let mut events = client
    ///     .stream(Request::new()
    ///         .cmd(Command::new("load", "echo").arg("data"))
    ///         .cmd(Command::new("train", "echos").arg("load")))
    ///     .await?;
    /// while let Some(event) = events.next().await {
    ///     match event? {
    ///         Event::Progress(p) => println!("{} finished: {}", p.name(), p.value()),
    ///         Event::Done(results) => println!("all done: {:?}", results.value("train")),
    ///         _ => {}
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn stream(&self, request: Request) -> Result<ResultStream, Error> {
        // One place per command and one for the reply: a node that keeps to
        // the protocol never fills it (see `Waiter::Stream`).
        let places = request
            .cmds
            .len()
            .saturating_add(1)
            .min(tokio::sync::Semaphore::MAX_PERMITS);
        let sent = self
            .submit(&request, true, || {
                let (tx, rx) = mpsc::channel::<StreamItem>(places);
                (Waiter::Stream(tx), rx)
            })
            .await?;
        Ok(ResultStream::new(
            self.inner.clone(),
            sent.conn,
            sent.id,
            sent.receiver,
            sent.wait,
        ))
    }

    /// Sends `request` (with `stream` set as given) under a new id, waited
    /// for by the waiter `make` returns. When the connection turns out to be
    /// gone before the request could leave, it is tried once more (on a
    /// new connection, when failing over): only what certainly was not sent
    /// is sent again.
    async fn submit<R>(
        &self,
        request: &Request,
        stream: bool,
        mut make: impl FnMut() -> (Waiter, R),
    ) -> Result<Submitted<R>, Error> {
        let inner = &self.inner;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed).to_string();
        let timeout = request.timeout.or(inner.timeout);
        let text = serde_json::to_string(&OutgoingRequest {
            role: "rpc",
            mpreg: MARKER_VERSION,
            u: &id,
            cmds: &request.cmds,
            timeout_ms: timeout.map(|t| t.as_millis().try_into().unwrap_or(u64::MAX)),
            return_intermediate_results: request.return_intermediate_results,
            stream,
        })?;
        let mut message = Message::text(text);
        let wait = reply_wait(timeout);
        for _ in 0..2 {
            let conn = self.connection().await?;
            let (waiter, receiver) = make();
            // A shared copy: the text is not duplicated.
            let entry = Entry {
                waiter,
                request: message.clone(),
            };
            if conn.register(&id, entry).is_err() {
                continue;
            }
            match conn.send(message).await {
                Ok(()) => {
                    return Ok(Submitted {
                        conn,
                        id,
                        wait,
                        receiver,
                    });
                }
                Err(unsent) => {
                    if conn.forget(&id).is_none() && conn.closed_idle() {
                        // Closed for idleness meanwhile: the request was
                        // handed over to be sent again, waiter and all.
                        return Ok(Submitted {
                            conn,
                            id,
                            wait,
                            receiver,
                        });
                    }
                    message = unsent;
                }
            }
        }
        Err(Error::Closed)
    }

    /// Sends the requests of a connection closed for idleness again, on
    /// the current connection or a new one (to the same seed first). Those
    /// whose callers stopped waiting are dropped; should no connection be
    /// had, the others fail with [`Error::Closed`].
    async fn send_again(&self, orphaned: Orphans) {
        let conn = match self.connection().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::debug!(error = %e, lost = orphaned.requests.len(),
                    "no connection to send requests again on");
                return;
            }
        };
        tracing::debug!(url = %conn.url, seed = orphaned.seed,
            requests = orphaned.requests.len(), "sending requests again after an idle close");
        for (id, entry) in orphaned.requests {
            if entry.waiter.is_closed() {
                continue;
            }
            let request = entry.request.clone();
            if conn.register(&id, entry).is_err() || conn.send(request).await.is_err() {
                // That connection is gone too: its waiters went with it.
                conn.forget(&id);
            }
        }
    }

    /// The connection to use: the current one while it is open; else, when
    /// failing over, a new one (one reconnection at a time).
    async fn connection(&self) -> Result<Arc<Conn>, Error> {
        let inner = &self.inner;
        let current = inner.current();
        if current.is_open() {
            return Ok(current);
        }
        // A connection the node closed for idleness is replaced whether or
        // not the client fails over: nothing was lost with it.
        if !inner.failover && !current.closed_idle() {
            return Err(Error::Closed);
        }
        let _turn = inner.reconnecting.lock().await;
        // Someone else may have reconnected while this call waited.
        let current = inner.current();
        if current.is_open() {
            return Ok(current);
        }
        let lost = current.url.clone();
        let conn = if current.closed_idle() {
            // The node is fine: go back to it first.
            let conn = dial_from(&inner.seeds, current.seed, &inner.dial).await?;
            tracing::debug!(%lost, now = %conn.url, "idle connection closed; reconnected");
            Arc::new(conn)
        } else {
            let conn = dial_from(&inner.seeds, current.seed + 1, &inner.dial).await?;
            tracing::info!(%lost, now = %conn.url, "connection lost; reconnected");
            Arc::new(conn)
        };
        *inner.current.lock().unwrap_or_else(PoisonError::into_inner) = conn.clone();
        Ok(conn)
    }
}

/// How long a call with `deadline` (its own, or the client's) waits for its
/// reply: the deadline plus slack, [`DEFAULT_CALL_TIMEOUT`] without one. A
/// deadline too large to add the slack to is no client-side limit.
fn reply_wait(deadline: Option<Duration>) -> Option<Duration> {
    match deadline {
        Some(d) => d.checked_add(DEADLINE_SLACK),
        None => Some(DEFAULT_CALL_TIMEOUT),
    }
}

/// The results of a reply, or its error.
pub(crate) fn results_of(reply: Reply) -> Result<Results, Error> {
    match (reply.error, reply.r) {
        (Some(e), _) => Err(Error::Rpc(e)),
        (None, Some(results)) => Ok(Results::new(results)),
        (None, None) => Err(Error::Protocol("reply has neither `r` nor `error`")),
    }
}

/// Positional arguments from a tuple, an array, a `Vec`, `()` (none) or a
/// single value.
pub(crate) fn positional(args: impl Serialize) -> Result<Vec<Value>, Error> {
    Ok(match serde_json::to_value(args)? {
        Value::Array(args) => args,
        Value::Null => Vec::new(),
        other => vec![other],
    })
}

/// The results of a request, by command name: the sinks' (or every
/// command's, when the request asked for intermediate results).
#[derive(Debug, Clone, PartialEq)]
pub struct Results(Map<String, Value>);

impl Results {
    pub(crate) fn new(results: Map<String, Value>) -> Self {
        Self(results)
    }

    /// Decodes the result of command `name`.
    pub fn get<T: DeserializeOwned>(&self, name: &str) -> Result<T, Error> {
        let value = self.0.get(name).ok_or_else(|| Error::NoSuchResult {
            name: name.to_owned(),
        })?;
        Ok(T::deserialize(value)?)
    }

    /// The raw result of command `name`.
    pub fn value(&self, name: &str) -> Option<&Value> {
        self.0.get(name)
    }

    /// How many results there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The results as a JSON object, as the node sent them.
    pub fn into_map(self) -> Map<String, Value> {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_wait_for_a_bounded_time_by_default() {
        let builder = ClientBuilder::default();
        assert_eq!(builder.timeout, None, "no deadline is sent by default");
        assert_eq!(reply_wait(builder.timeout), Some(DEFAULT_CALL_TIMEOUT));
        assert_eq!(
            DEFAULT_CALL_TIMEOUT,
            DEFAULT_REQUEST_TIMEOUT + DEADLINE_SLACK
        );
        let set = builder.timeout(Duration::from_secs(2));
        assert_eq!(reply_wait(set.timeout), Some(Duration::from_secs(7)));
        assert_eq!(reply_wait(Some(Duration::MAX)), None);
    }

    #[test]
    fn reply_limit_leaves_room_for_the_envelope() {
        let default = ClientBuilder::default();
        assert_eq!(
            default.limits(),
            (
                DEFAULT_MAX_MESSAGE_SIZE,
                DEFAULT_MAX_MESSAGE_SIZE - REPLY_ENVELOPE_ROOM
            )
        );
        let small = ClientBuilder::default().max_reply_bytes(64 << 10);
        assert_eq!(small.limits(), (128 << 10, 64 << 10));
        // The last of the two settings counts.
        let back = small.max_message_size(1 << 20);
        assert_eq!(back.limits(), (1 << 20, (1 << 20) - REPLY_ENVELOPE_ROOM));
        let tiny = ClientBuilder::default().max_message_size(8 << 10);
        assert_eq!(tiny.limits(), (8 << 10, 7 << 10));
        let huge = ClientBuilder::default().max_reply_bytes(usize::MAX);
        assert_eq!(huge.limits(), (usize::MAX, usize::MAX));
    }
}
