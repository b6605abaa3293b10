//! [`Node`], its builder and its running handle; the running node:
//!
//! - `state`: what every connection, link and job of a node reaches
//!   (`RunningNode`);
//! - `request`: how it answers a client's request;
//! - `local`: running a job here;
//! - `dispatcher` and `peering`: the node's side of the cluster, placing jobs
//!   and running the links' and membership's IO over the cluster's state
//!   ([`crate::cluster`], which knows nothing of the node);
//! - `sim` (tests): whole nodes on the in-memory network of
//!   [`crate::transport`] (chosen with the crate-private
//!   `NodeBuilder::transport`), under paused time.

mod dispatcher;
mod local;
mod peering;
mod request;
#[cfg(test)]
mod sim;
mod state;

pub(crate) use self::local::{far_enough, run_local};
pub(crate) use self::request::{handle_frame, send};
pub(crate) use self::state::RunningNode;
use self::state::{membership_config, new_generation, unguarded};

pub(crate) use self::dispatcher::{DESCRIBE, describe_functions};
pub(crate) use self::peering::accept;

use std::any::Any;
use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Secret, Tokens};
use crate::budget::{ByteBudget, Unauthenticated};
use crate::builtins;
use crate::client::Results;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::context::DatasetStates;
use crate::error::Error;
use crate::membership::{MemberId, Membership};
use crate::metrics::NodeMetrics;
use crate::protocol::Request;
use crate::registry::{Function, Registry, linked_functions};
use crate::transport::{Listener, Transport};

/// An mpreg node: serves its functions to clients and peers over WebSocket.
///
/// Every `#[mpreg::rpc]` function linked into the binary is served, plus the
/// built-ins (`echo`, `echos`, `mpreg.whoami`) and anything registered on the
/// builder.
///
/// ```no_run
/// # async fn doc() -> Result<(), mpreg::Error> {
/// mpreg::Node::builder()
///     .name("worker-1")
///     .listen("127.0.0.1:7773")
///     .datasets(["model-a"])
///     .run() // until Ctrl-C or SIGTERM
///     .await
/// # }
/// ```
#[derive(Debug)]
pub struct Node(());

impl Node {
    /// A builder with default settings (listen on `127.0.0.1:0`).
    pub fn builder() -> NodeBuilder {
        NodeBuilder::default()
    }
}

/// Configures and starts a [`Node`].
#[derive(Debug)]
pub struct NodeBuilder {
    config: Config,
    functions: Vec<Function>,
    linked: bool,
    excluded: BTreeSet<String>,
    /// TLS material given in memory (overrides the config's paths).
    tls: crate::tls::Sources,
    dataset_states: DatasetStates,
    /// Sockets, or the in-memory network (the crate's simulation).
    transport: Transport,
}

impl Default for NodeBuilder {
    fn default() -> Self {
        Self {
            config: Config::default(),
            functions: Vec::new(),
            linked: true,
            excluded: BTreeSet::new(),
            tls: crate::tls::Sources::default(),
            dataset_states: DatasetStates::default(),
            transport: Transport::Os,
        }
    }
}

impl NodeBuilder {
    /// Starts from a whole [`Config`] (e.g. read with [`Config::from_file`]).
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// The node's name (default `mpreg-<port>`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config.name = Some(name.into());
        self
    }

    /// The address to listen on, `HOST:PORT`; port 0 picks a free port.
    pub fn listen(mut self, addr: impl Into<String>) -> Self {
        self.config.listen = addr.into();
        self
    }

    /// Adds a dataset this node has, with its state: the value handlers
    /// get for it as a [`Dataset<T>`](crate::Dataset) parameter or from
    /// [`Context::dataset`](crate::Context::dataset) when a command names
    /// it (a loaded model, a connection pool, ...). For datasets without
    /// state, use [`datasets`](Self::datasets).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), mpreg::Error> {
    /// struct Model { layers: usize }
    ///
    /// let node = mpreg::Node::builder()
    ///     .dataset("model-a", Model { layers: 12 })
    ///     .start()
    ///     .await?;
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn dataset<T: Any + Send + Sync>(mut self, name: impl Into<String>, state: T) -> Self {
        let name = name.into();
        if !self.config.datasets.contains(&name) {
            self.config.datasets.push(name.clone());
        }
        self.dataset_states.insert(name, state);
        self
    }

    /// Adds datasets this node has. Every function the node serves has them.
    pub fn datasets<I, S>(mut self, datasets: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config
            .datasets
            .extend(datasets.into_iter().map(Into::into));
        self
    }

    /// Adds peers to join (`ws://host:port`).
    pub fn peers<I, S>(mut self, peers: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config.peers.extend(peers.into_iter().map(Into::into));
        self
    }

    /// Makes this a node that only dials out (behind NAT, or with no
    /// reachable address): it does not listen, joins through its peers as a
    /// **leaf**, and is served through the link it opened; its gateway
    /// offers its functions to the cluster.
    pub fn dial_out_only(mut self) -> Self {
        self.config.listen = String::new();
        self
    }

    /// Registers a function built at runtime. A function with the name of a
    /// linked or built-in function replaces it.
    pub fn function(mut self, function: Function) -> Self {
        self.functions.push(function);
        self
    }

    /// Does not serve the `#[mpreg::rpc]` functions linked into the binary
    /// (only built-ins and those given to [`function`](Self::function)).
    pub fn without_linked_functions(mut self) -> Self {
        self.linked = false;
        self
    }

    /// Does not serve the linked function named `name`.
    pub fn without_function(mut self, name: impl Into<String>) -> Self {
        self.excluded.insert(name.into());
        self
    }

    /// Serves the operator functions `debug.sleep(ms)`, `debug.fail(message)`
    /// and `debug.panic()`.
    pub fn diagnostics(mut self, enabled: bool) -> Self {
        self.config.diagnostics = enabled;
        self
    }

    /// Largest WebSocket message accepted, in bytes (default 64 MiB).
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.config.max_message_size = bytes;
        self
    }

    /// Deadline of requests that carry none (default 300 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.config.request_timeout_ms = timeout.as_millis().try_into().unwrap_or(u64::MAX);
        self
    }

    /// On shutdown, how long requests in flight may take to finish (default
    /// 10 s); a connection still open 2 s past it is dropped, whatever its
    /// client does.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.config.shutdown_grace_ms = grace.as_millis().try_into().unwrap_or(u64::MAX);
        self
    }

    /// Failure detection timings: how often a random member is probed, and
    /// how long a silent member has before it is declared down (defaults
    /// 1 s and 3 s). A crashed node is noticed within roughly
    /// `probe_interval + suspect_timeout`.
    pub fn failure_detection(
        mut self,
        probe_interval: Duration,
        suspect_timeout: Duration,
    ) -> Self {
        self.config.probe_interval_ms = probe_interval.as_millis().try_into().unwrap_or(u64::MAX);
        self.config.suspect_timeout_ms = suspect_timeout.as_millis().try_into().unwrap_or(u64::MAX);
        self
    }

    /// Requires peers to prove they know `secret` to link with this node,
    /// and authenticates gossip with it. Every node of a cluster needs the
    /// same secret.
    pub fn cluster_secret(mut self, secret: impl Into<String>) -> Self {
        self.config.cluster_secret = Some(secret.into());
        self
    }

    /// Requires clients to present one of `tokens` (see
    /// [`ClientBuilder::token`](crate::ClientBuilder::token)). Set a
    /// [`cluster_secret`](Self::cluster_secret) too: without one, a node
    /// with client tokens refuses peer links (they could not prove
    /// anything).
    pub fn client_tokens<I, S>(mut self, tokens: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config
            .client_tokens
            .extend(tokens.into_iter().map(Into::into));
        self
    }

    /// Peer link keepalive: how often to ping, and how long a link may stay
    /// silent before it is treated as lost (defaults 5 s and 20 s). Catches
    /// links that stall without closing.
    pub fn keepalive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.config.keepalive_interval_ms = interval.as_millis().try_into().unwrap_or(u64::MAX);
        self.config.keepalive_timeout_ms = timeout.as_millis().try_into().unwrap_or(u64::MAX);
        self
    }

    /// Closes a link this node dialed once it has carried no job for
    /// `idle` (default 60 s; zero keeps links open). Links open when a
    /// command must go to a node, so the links a node holds follow its
    /// traffic; the peer agrees to the close first, so no job is lost to
    /// it. Checked at every keepalive ping.
    ///
    /// ```
    /// use std::time::Duration;
    /// let builder = mpreg::Node::builder().link_idle_timeout(Duration::from_secs(10));
    /// # drop(builder);
    /// ```
    pub fn link_idle_timeout(mut self, idle: Duration) -> Self {
        self.config.link_idle_timeout_ms = idle.as_millis().try_into().unwrap_or(u64::MAX);
        self
    }

    /// Listens with TLS (`wss://`), with the certificate chain and private
    /// key in these PEM files, and presents this certificate to the peers
    /// it dials. Needs [`tls_ca`](Self::tls_ca) too: peers are dialed over
    /// `wss://` and verified against it. Peers dial members by IP address,
    /// so the certificate must name that address (an IP subject
    /// alternative name). See [`Config::tls_cert`].
    pub fn tls(
        mut self,
        cert_pem_path: impl Into<PathBuf>,
        key_pem_path: impl Into<PathBuf>,
    ) -> Self {
        self.config.tls_cert = Some(cert_pem_path.into());
        self.config.tls_key = Some(key_pem_path.into());
        self.tls.cert = None;
        self.tls.key = None;
        self
    }

    /// Like [`tls`](Self::tls), with the PEM text itself instead of files
    /// (which it takes precedence over, also over those of a later
    /// [`config`](Self::config)).
    pub fn tls_pem(mut self, cert_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Self {
        self.tls.cert = Some(crate::tls::Pem::Memory(cert_pem.into()));
        self.tls.key = Some(crate::tls::Pem::Memory(key_pem.into()));
        self
    }

    /// The CA certificates (PEM file) that peers' certificates must be
    /// issued by, whichever side dials: a node with a certificate from
    /// another CA cannot link. Required with [`tls`](Self::tls), and to join
    /// `wss://` peer URLs.
    pub fn tls_ca(mut self, ca_pem_path: impl Into<PathBuf>) -> Self {
        self.config.tls_ca = Some(ca_pem_path.into());
        self.tls.ca = None;
        self
    }

    /// Like [`tls_ca`](Self::tls_ca), with the PEM text itself (which takes
    /// precedence over a file).
    pub fn tls_ca_pem(mut self, ca_pem: impl Into<Vec<u8>>) -> Self {
        self.tls.ca = Some(crate::tls::Pem::Memory(ca_pem.into()));
        self
    }

    /// Most requests in flight on one connection; more get `overloaded`.
    pub fn max_inflight_per_connection(mut self, n: usize) -> Self {
        self.config.max_inflight_per_connection = n;
        self
    }

    /// Runs the node on `transport` instead of TCP and UDP sockets: the
    /// simulation's in-memory network (`node/sim.rs`).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn transport(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }

    /// Binds the listen address and starts serving in the background.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), mpreg::Error> {
    /// let node = mpreg::Node::builder().start().await?;
    /// println!("serving on {:?}", node.url());
    /// node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn start(self) -> Result<NodeHandle, Error> {
        let config = self.config;
        validate(&config)?;
        let tls = crate::tls::NodeTls::load(&config, &self.tls)?;
        let transport = self.transport;
        let listener = match config.listen.as_str() {
            "" => None,
            addr => Some(transport.listen(addr).await?),
        };
        let local_addr = listener.as_ref().map(Listener::local_addr).transpose()?;
        let name = config.name.clone().unwrap_or_else(|| match local_addr {
            Some(a) => format!("mpreg-{}", a.port()),
            None => format!("mpreg-leaf-{}", std::process::id()),
        });

        let cluster_view = Arc::new(std::sync::OnceLock::new());
        let mut functions: Vec<Function> =
            builtins::functions(&name, config.diagnostics, cluster_view.clone());
        if self.linked {
            functions.extend(linked_functions().filter(|f| !self.excluded.contains(&f.name)));
        }
        functions.extend(self.functions);
        let datasets: BTreeSet<String> = config.datasets.iter().cloned().collect();
        let registry = Registry::new(functions, &datasets);
        let peers = config.peers.clone();
        let generation = new_generation();
        let (membership, events) = match local_addr {
            Some(addr) => {
                let id = MemberId {
                    addr,
                    generation,
                    version: 1,
                    rejoin: 0,
                };
                // What this node offers at start: its own functions (no
                // leaf has linked yet).
                let abilities: Vec<crate::protocol::peer::Ability> = registry
                    .iter()
                    .filter(|f| f.advertised)
                    .map(crate::protocol::peer::Ability::of)
                    .collect();
                let card = crate::cluster::Card::new(&name, &abilities).encode();
                let (m, events) =
                    Membership::start(id, card, membership_config(&config), &transport).await?;
                (Some(m), Some(events))
            }
            None => (None, None),
        };

        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let config_budgets = (
            config.max_inflight_bytes,
            config.max_unauthenticated_connections,
            config.max_unauthenticated_per_address,
        );
        let state = Arc::new(RunningNode {
            dialing: dispatcher::Dials::default(),
            secret: config.cluster_secret.as_deref().map(Secret::new),
            tokens: Tokens::new(&config.client_tokens),
            tls,
            transport: transport.at(local_addr),
            stopping: shutdown.clone(),
            tasks: tracker.clone(),
            name: name.clone(),
            config,
            registry: RwLock::new(Arc::new(registry)),
            cluster: Cluster::default(),
            advertise: local_addr,
            generation,
            membership,
            local_load: AtomicUsize::new(0),
            killed: CancellationToken::new(),
            dataset_states: self.dataset_states,
            metrics: NodeMetrics::default(),
            draining: AtomicBool::new(false),
            inflight_bytes: ByteBudget::new(config_budgets.0),
            unauthenticated: Unauthenticated::new(config_budgets.1, config_budgets.2),
        });
        let _ = cluster_view.set(Arc::downgrade(&state));
        state.routing_changed(false);

        let server = listener.map(|listener| {
            tokio::spawn(crate::server::serve(
                listener,
                state.clone(),
                shutdown.clone(),
                tracker.clone(),
            ))
        });
        if let Some(events) = events {
            state.spawn(peering::follow_membership(state.clone(), events));
        }
        for url in peers {
            state.spawn(peering::keep_linked(state.clone(), url));
        }
        if let Some(addr) = local_addr
            && unguarded(addr, state.secret.is_some())
        {
            tracing::warn!(%name, %addr,
                "listening beyond loopback without a cluster secret: anyone who reaches this port can join the cluster as a peer, claim a member's address and receive its calls, and read every function and dataset; set `cluster_secret` (the same on every node)");
        }
        match local_addr {
            Some(addr) => tracing::info!(%name, %addr, "node listening"),
            None => tracing::info!(%name, "node started (dial-out only)"),
        }
        Ok(NodeHandle {
            name,
            local_addr,
            shutdown,
            tracker,
            server,
            state,
        })
    }

    /// Starts the node and serves until Ctrl-C (or SIGTERM on Unix), then
    /// shuts down gracefully.
    pub async fn run(self) -> Result<(), Error> {
        self.run_until(shutdown_signal()).await
    }

    /// Starts the node and serves until `signal` completes, then shuts down
    /// gracefully.
    pub async fn run_until(self, signal: impl Future<Output = ()>) -> Result<(), Error> {
        let node = self.start().await?;
        signal.await;
        node.shutdown().await;
        Ok(())
    }
}

fn validate(config: &Config) -> Result<(), crate::config::ConfigError> {
    use crate::config::ConfigError::Invalid;
    if config.max_message_size < 1024 {
        return Err(Invalid {
            setting: "max_message_size",
            reason: "must be at least 1024 bytes".into(),
        });
    }
    if config.max_inflight_per_connection == 0 {
        return Err(Invalid {
            setting: "max_inflight_per_connection",
            reason: "must be at least 1".into(),
        });
    }
    for (setting, value) in [
        ("max_inflight_bytes", config.max_inflight_bytes),
        ("max_outgoing_bytes", config.max_outgoing_bytes),
        (
            "max_unauthenticated_connections",
            config.max_unauthenticated_connections,
        ),
        (
            "max_unauthenticated_per_address",
            config.max_unauthenticated_per_address,
        ),
    ] {
        if value == 0 {
            return Err(Invalid {
                setting,
                reason: "must be at least 1".into(),
            });
        }
    }
    if config.max_reply_bytes == Some(0) {
        return Err(Invalid {
            setting: "max_reply_bytes",
            reason: "must be at least 1".into(),
        });
    }
    if config.max_commands_per_request == 0 {
        return Err(Invalid {
            setting: "max_commands_per_request",
            reason: "must be at least 1".into(),
        });
    }
    Ok(())
}

/// Completes on Ctrl-C, or on SIGTERM on Unix.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            // No signal handling available: never complete from here.
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => ctrl_c.await,
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await;
}

/// A running node. Dropping the handle leaves the node running in the
/// background; call [`shutdown`](Self::shutdown) to stop it.
#[derive(Debug)]
pub struct NodeHandle {
    name: String,
    local_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// The accept loop, when the node listens.
    server: Option<tokio::task::JoinHandle<()>>,
    state: Arc<RunningNode>,
}

impl NodeHandle {
    /// The node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address the node listens on (with the real port when 0 was
    /// asked); `None` for a dial-out-only node.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// The URL clients connect to, `ws://HOST:PORT` (`wss://` with TLS);
    /// `None` for a dial-out-only node.
    pub fn url(&self) -> Option<String> {
        let scheme = self.state.tls.scheme();
        self.local_addr.map(|a| format!("{scheme}://{a}"))
    }

    /// Stops the node at once, as if its process died: connections and
    /// links are dropped, requests in flight are cancelled without replies,
    /// and peers are not told. For testing how a cluster copes with a crash;
    /// use [`shutdown`](Self::shutdown) to stop a node cleanly.
    pub async fn kill(self) {
        if let Some(m) = self.state.membership.clone() {
            m.kill().await;
        }
        self.state.killed.cancel();
        self.shutdown.cancel();
        if let Some(server) = self.server {
            server.abort();
        }
        self.state.cluster.close_all();
        self.tracker.close();
        self.tracker.wait().await;
        tracing::info!(name = %self.name, "node killed");
    }

    /// Runs a request through this node, without a connection: the same
    /// planning, routing (to peers too) and execution as for a client, in
    /// process. For applications that call their cluster from the node they
    /// host, and for tests and benchmarks of handlers. [`Request::stream`]
    /// has no effect here: the results come back together.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), mpreg::Error> {
    /// use mpreg::{Command, Request};
    ///
    /// let node = mpreg::Node::builder().start().await?;
    /// let results = node
    ///     .send(Request::new()
    ///         .cmd(Command::new("first", "echo").arg("hi there!"))
    ///         .cmd(Command::new("second", "echos").arg("first").arg("AND ME TOO")))
    ///     .await?;
    /// assert_eq!(results.get::<Vec<String>>("second")?, ["hi there!", "AND ME TOO"]);
    /// node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn send(&self, request: Request) -> Result<Results, Error> {
        send(&self.state, Value::Null, request).await
    }

    /// Starts serving `function` (replacing a function of the same name).
    /// Every member of the cluster learns of it: the node's catalog version
    /// grows, the catalog is pushed over its links and the version gossiped.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), mpreg::Error> {
    /// use mpreg::{Function, RpcError};
    /// use serde_json::json;
    ///
    /// let node = mpreg::Node::builder().start().await?;
    /// node.register(Function::new("answer", |_| async { Ok::<_, RpcError>(json!(42)) }));
    /// let n: i64 = node.send([mpreg::Command::new("a", "answer")].into_iter().collect()).await?.get("a")?;
    /// assert_eq!(n, 42);
    /// assert!(node.unregister("answer"));
    /// node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn register(&self, function: Function) {
        let datasets: BTreeSet<String> = self.state.config.datasets.iter().cloned().collect();
        self.state
            .update_registry(|r| (r.with(function, &datasets), true));
    }

    /// Stops serving the function `name`; returns whether it was served.
    /// The cluster learns of it as with [`register`](Self::register).
    /// Calls already running finish.
    pub fn unregister(&self, name: &str) -> bool {
        self.state.update_registry(|r| r.without(name))
    }

    /// The cluster as this node sees it (what `mpreg.cluster` answers
    /// with, as JSON).
    pub fn cluster_view(&self) -> crate::ClusterView {
        self.state.cluster_view()
    }

    /// A few counts of the cluster as this node sees it (nodes, links,
    /// datasets), cheap enough to poll often even in a large cluster,
    /// unlike [`cluster_view`](Self::cluster_view), which copies every
    /// node's functions.
    pub fn cluster_summary(&self) -> crate::ClusterSummary {
        self.state.cluster.summary()
    }

    /// Waits until `ready` holds for this node's view of the cluster, or
    /// until `timeout`; returns whether it held. Checks again at every
    /// change of the node's routing (peers, catalogs), and every 20 ms for
    /// what changes without notice (load).
    ///
    /// ```no_run
    /// # async fn doc(node: mpreg::NodeHandle) {
    /// use std::time::Duration;
    /// // Wait until some node offers `predict` with dataset `model-a`.
    /// let ok = node
    ///     .wait_for(Duration::from_secs(10), |view| view.offers("predict", &["model-a"]))
    ///     .await;
    /// # }
    /// ```
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut ready: impl FnMut(&crate::ClusterView) -> bool,
    ) -> bool {
        let mut changes = self.state.cluster.subscribe();
        let wait = async {
            loop {
                if ready(&self.cluster_view()) {
                    return;
                }
                tokio::select! {
                    _ = changes.changed() => {}
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }

    /// Stops accepting connections, lets requests in flight finish (up to a
    /// grace period), closes every connection and waits for all of it.
    pub async fn shutdown(self) {
        self.state.draining.store(true, Ordering::Relaxed);
        // Tell the cluster first, so nobody routes here while we drain.
        if let Some(m) = self.state.membership.clone() {
            m.leave().await;
        }
        self.shutdown.cancel();
        // The accept loop ends at once on cancellation; it never panics.
        if let Some(server) = self.server {
            let _ = server.await;
        }
        self.state.cluster.close_all();
        self.tracker.close();
        self.tracker.wait().await;
        tracing::info!(name = %self.name, "node stopped");
    }
}
