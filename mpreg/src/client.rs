//! [`Client`]: one WebSocket connection to any node, shared by any number of
//! tasks. Requests carry ids; replies are matched to them in whatever order
//! they come back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio_tungstenite::tungstenite::Message;

use crate::config::DEFAULT_MAX_MESSAGE_SIZE;
use crate::error::{Error, TransportError};
use crate::protocol::{Command, OutgoingRequest, Reply, Request};
use crate::ws;

/// Extra time the client waits past a request's own deadline, so that the
/// node's `timeout` error (which says more) arrives before the client gives up.
const DEADLINE_SLACK: Duration = Duration::from_secs(5);

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
#[derive(Debug, Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

/// Builds a [`Client`] with non-default settings.
#[derive(Clone)]
pub struct ClientBuilder {
    timeout: Option<Duration>,
    max_message_size: usize,
    token: Option<String>,
    /// PEM of the CA certificates to trust for `wss://`.
    tls_ca: Option<Vec<u8>>,
}

impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("timeout", &self.timeout)
            .field("max_message_size", &self.max_message_size)
            .field("token", &self.token.as_ref().map(|_| "(set)"))
            .field("tls_ca", &self.tls_ca.as_ref().map(|_| "(set)"))
            .finish()
    }
}

impl Default for ClientBuilder {
    fn default() -> Self {
        Self {
            timeout: None,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            token: None,
            tls_ca: None,
        }
    }
}

impl ClientBuilder {
    /// Gives every request this deadline unless it sets its own; the node
    /// enforces it (`timeout` error), and the client stops waiting shortly
    /// after. Without it, the node's default deadline applies.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Largest reply accepted, in bytes (default 64 MiB).
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Presents `token` to nodes that require client tokens (sent as
    /// `Authorization: Bearer TOKEN` when connecting).
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
    /// with [`tls_ca_pem`](Self::tls_ca_pem)).
    ///
    /// Fails with [`Error::Connect`] when the node cannot be reached or the
    /// TLS or WebSocket handshake fails (an untrusted certificate, a
    /// `wss://` URL without a CA), and with [`Error::Config`] when the CA
    /// PEM cannot be used.
    pub async fn connect(self, url: &str) -> Result<Client, Error> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        use tokio_tungstenite::tungstenite::http::HeaderValue;
        let failed = |e| Error::Connect {
            url: url.to_owned(),
            source: TransportError(e),
        };
        let mut request = url.into_client_request().map_err(failed)?;
        if let Some(token) = &self.token {
            let value = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|e| failed(tokio_tungstenite::tungstenite::Error::HttpFormat(e.into())))?;
            request.headers_mut().insert("authorization", value);
        }
        let config = ws::config(self.max_message_size);
        let connector = self
            .tls_ca
            .as_deref()
            .map(crate::tls::client_connector)
            .transpose()?;
        let (stream, _response) = crate::tls::connect(request, connector.as_ref(), config)
            .await
            .map_err(failed)?;
        let (sink, source) = stream.split();
        let (outgoing, queue) = mpsc::channel(ws::OUTGOING_QUEUE);
        let pending: Arc<Pending> = Arc::new(Mutex::new(Some(HashMap::new())));
        let writer = tokio::spawn(ws::write_loop(sink, queue)).abort_handle();
        let reader = tokio::spawn(read_loop(source, pending.clone())).abort_handle();
        Ok(Client {
            shared: Arc::new(Shared {
                outgoing,
                pending,
                next_id: AtomicU64::new(1),
                timeout: self.timeout,
                tasks: [reader, writer],
            }),
        })
    }
}

/// Waiting callers by request id; `None` once the connection is gone, so a
/// late caller fails at once instead of waiting for a reply that cannot come.
type Pending = Mutex<Option<HashMap<String, oneshot::Sender<Reply>>>>;

#[derive(Debug)]
struct Shared {
    outgoing: mpsc::Sender<Message>,
    pending: Arc<Pending>,
    next_id: AtomicU64,
    timeout: Option<Duration>,
    /// The reader and writer tasks, stopped when the last clone is dropped.
    tasks: [AbortHandle; 2],
}

impl Drop for Shared {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Hands each reply to the caller waiting for its id.
async fn read_loop<S>(mut source: S, pending: Arc<Pending>)
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    while let Some(Ok(message)) = source.next().await {
        let reply: Reply = match &message {
            // A reply that cannot be read cannot be matched to its caller,
            // who would wait forever: end the connection, failing every call.
            Message::Text(text) => match serde_json::from_str(text.as_str()) {
                Ok(reply) => reply,
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable reply; closing the connection");
                    break;
                }
            },
            Message::Binary(bytes) => match serde_json::from_slice(bytes) {
                Ok(reply) => reply,
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable reply; closing the connection");
                    break;
                }
            },
            Message::Close(_) => break,
            _ => continue,
        };
        let Value::String(id) = &reply.u else {
            tracing::warn!(reply = ?reply.error, "reply without a request id");
            continue;
        };
        let waiter = lock(&pending).as_mut().and_then(|p| p.remove(id));
        if let Some(waiter) = waiter {
            // The caller may have stopped waiting (timeout, cancelled).
            let _ = waiter.send(reply);
        }
    }
    // Connection gone: fail every waiting call (dropping its sender).
    lock(&pending).take();
}

fn lock(
    pending: &Pending,
) -> std::sync::MutexGuard<'_, Option<HashMap<String, oneshot::Sender<Reply>>>> {
    // The lock is held only for map operations that cannot panic.
    pending
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Removes a request's waiter if the caller stops waiting early.
struct Forget<'a> {
    pending: &'a Pending,
    id: &'a str,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        if let Some(p) = lock(self.pending).as_mut() {
            p.remove(self.id);
        }
    }
}

impl Client {
    /// Connects to the node at `url` (`ws://host:port`) with default settings
    /// (for `wss://`, use [`ClientBuilder::tls_ca_pem`]).
    pub async fn connect(url: &str) -> Result<Self, Error> {
        ClientBuilder::default().connect(url).await
    }

    /// A builder for a client with a timeout or other settings.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
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
        let args = match serde_json::to_value(args)? {
            Value::Array(args) => args,
            Value::Null => Vec::new(),
            other => vec![other],
        };
        self.call_command(Command::new("result", fun).args(args))
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
    pub async fn send(&self, request: Request) -> Result<Results, Error> {
        let shared = &self.shared;
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed).to_string();
        let timeout = request.timeout.or(shared.timeout);
        let text = serde_json::to_string(&OutgoingRequest {
            role: "rpc",
            u: &id,
            cmds: &request.cmds,
            timeout_ms: timeout.map(|t| t.as_millis().try_into().unwrap_or(u64::MAX)),
            return_intermediate_results: request.return_intermediate_results,
            stream: false,
        })?;

        let (tx, rx) = oneshot::channel();
        match lock(&shared.pending).as_mut() {
            Some(p) => p.insert(id.clone(), tx),
            None => return Err(Error::Closed),
        };
        let _forget = Forget {
            pending: &shared.pending,
            id: &id,
        };
        shared
            .outgoing
            .send(Message::text(text))
            .await
            .map_err(|_| Error::Closed)?;
        // A deadline too large to add the slack to is no client-side limit.
        let reply = match timeout.and_then(|t| t.checked_add(DEADLINE_SLACK)) {
            Some(wait) => tokio::time::timeout(wait, rx)
                .await
                .map_err(|_| Error::Timeout(wait))?,
            None => rx.await,
        }
        .map_err(|_| Error::Closed)?;
        match (reply.error, reply.r) {
            (Some(e), _) => Err(Error::Rpc(e)),
            (None, Some(results)) => Ok(Results::new(results)),
            (None, None) => Err(Error::Protocol("reply has neither `r` nor `error`")),
        }
    }
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
