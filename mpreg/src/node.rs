//! [`Node`], its builder, its running handle, and how it answers a request.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::builtins;
use crate::config::Config;
use crate::error::{Error, ErrorCode, RpcError};
use crate::exec::{Dispatch, Job, Wanted, execute};
use crate::plan::{Arg, Plan, Step};
use crate::protocol::{IncomingRequest, Rejected, Reply, parse_request};
use crate::registry::{Args, Function, Registry, Unavailable, linked_functions};

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
}

impl Default for NodeBuilder {
    fn default() -> Self {
        Self {
            config: Config::default(),
            functions: Vec::new(),
            linked: true,
            excluded: BTreeSet::new(),
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

    /// Adds a dataset this node has.
    pub fn dataset(mut self, dataset: impl Into<String>) -> Self {
        self.config.datasets.push(dataset.into());
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

    /// On shutdown, how long requests in flight may take to finish, and then
    /// how long their replies may take to be written (default 10 s each).
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.config.shutdown_grace_ms = grace.as_millis().try_into().unwrap_or(u64::MAX);
        self
    }

    /// Most requests in flight on one connection; more get `overloaded`.
    pub fn max_inflight_per_connection(mut self, n: usize) -> Self {
        self.config.max_inflight_per_connection = n;
        self
    }

    /// Binds the listen address and starts serving in the background.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), mpreg::Error> {
    /// let node = mpreg::Node::builder().start().await?;
    /// println!("serving on {}", node.url());
    /// node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn start(self) -> Result<NodeHandle, Error> {
        let config = self.config;
        validate(&config)?;
        let listener = TcpListener::bind(config.listen.as_str()).await?;
        let local_addr = listener.local_addr()?;
        let name = config
            .name
            .clone()
            .unwrap_or_else(|| format!("mpreg-{}", local_addr.port()));

        let mut functions: Vec<Function> = builtins::functions(&name, config.diagnostics);
        if self.linked {
            functions.extend(linked_functions().filter(|f| !self.excluded.contains(&f.name)));
        }
        functions.extend(self.functions);
        let datasets: BTreeSet<String> = config.datasets.iter().cloned().collect();
        let registry = Registry::new(functions, &datasets);
        if !config.peers.is_empty() {
            tracing::warn!(
                peers = ?config.peers,
                "peers are configured, but this version serves as a single node"
            );
        }

        let state = Arc::new(NodeState {
            name: name.clone(),
            config,
            registry,
        });
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let server = tokio::spawn(crate::server::serve(
            listener,
            state,
            shutdown.clone(),
            tracker.clone(),
        ));
        tracing::info!(%name, addr = %local_addr, "node listening");
        Ok(NodeHandle {
            name,
            local_addr,
            shutdown,
            tracker,
            server,
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
    local_addr: SocketAddr,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    server: tokio::task::JoinHandle<()>,
}

impl NodeHandle {
    /// The node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address the node listens on (with the real port when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The URL clients connect to, `ws://HOST:PORT`.
    pub fn url(&self) -> String {
        format!("ws://{}", self.local_addr)
    }

    /// Stops accepting connections, lets requests in flight finish (up to a
    /// grace period), closes every connection and waits for all of it.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        // The accept loop ends at once on cancellation; it never panics.
        let _ = self.server.await;
        self.tracker.close();
        self.tracker.wait().await;
        tracing::info!(name = %self.name, "node stopped");
    }
}

/// What every connection of a node shares.
#[derive(Debug)]
pub(crate) struct NodeState {
    pub(crate) name: String,
    pub(crate) config: Config,
    pub(crate) registry: Registry,
}

/// Answers one client frame.
pub(crate) async fn handle_frame(state: &Arc<NodeState>, frame: &[u8]) -> Reply {
    match parse_request(frame) {
        Ok(incoming) => handle(state, incoming).await,
        Err(Rejected { u, error }) => Reply::err(u, error),
    }
}

/// Plans, places and runs a request within its deadline.
pub(crate) async fn handle(state: &Arc<NodeState>, incoming: IncomingRequest) -> Reply {
    let IncomingRequest { u, request } = incoming;
    let deadline = request
        .timeout
        .unwrap_or_else(|| state.config.request_timeout());
    let plan = match Plan::new(request.cmds, state.config.max_commands_per_request) {
        Ok(plan) => plan,
        Err(e) => return Reply::err(u, e),
    };
    let wanted = if request.return_intermediate_results {
        Wanted::All
    } else {
        Wanted::Sinks
    };
    match tokio::time::timeout(deadline, execute(plan, state, wanted)).await {
        Ok(Ok(results)) => Reply::ok(u, results.into_iter().collect()),
        Ok(Err(e)) => {
            tracing::debug!(node = %state.name, %u, error = %e, "request failed");
            Reply::err(u, e)
        }
        Err(_) => Reply::err(
            u,
            RpcError::new(
                ErrorCode::Timeout,
                format!("request did not finish within {} ms", deadline.as_millis()),
            )
            .with_details(json!({ "timeout_ms": deadline.as_millis() as u64 })),
        ),
    }
}

/// Where a command runs.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Target {
    /// On this node.
    Local,
}

impl Dispatch for Arc<NodeState> {
    type Target = Target;

    fn place(&self, step: &Step) -> Result<Target, RpcError> {
        self.registry
            .lookup(&step.fun, &step.locs)
            .map(|_| Target::Local)
            .map_err(|why| unavailable(&step.fun, &step.locs, why))
    }

    fn ships_chains(&self, target: &Target) -> bool {
        match target {
            Target::Local => false,
        }
    }

    fn run(&self, target: Target, job: Job) -> BoxFuture<'static, Result<Vec<Value>, RpcError>> {
        match target {
            Target::Local => run_local(self, job),
        }
    }
}

/// Runs a job on this node: one step directly, several through the executor.
pub(crate) fn run_local(
    state: &Arc<NodeState>,
    mut job: Job,
) -> BoxFuture<'static, Result<Vec<Value>, RpcError>> {
    if job.steps.len() != 1 {
        let state = state.clone();
        return Box::pin(async move {
            let plan = Plan::from_steps(job.steps)?;
            let out = execute(plan, &state, Wanted::These(job.outputs)).await?;
            Ok(out.into_iter().map(|(_, v)| v).collect())
        });
    }
    let step = job.steps.remove(0);
    let handler = match state.registry.lookup(&step.fun, &step.locs) {
        Ok(f) => f.handler.clone(),
        Err(why) => {
            let e = unavailable(&step.fun, &step.locs, why);
            return Box::pin(async move { Err(e) });
        }
    };
    let args = Args::new(
        step.args.into_iter().map(Arg::into_value).collect(),
        step.kwargs
            .into_iter()
            .map(|(k, a)| (k, a.into_value()))
            .collect(),
    );
    // The handler is called inside the future, so a panic while it builds
    // its future is caught like any other.
    Box::pin(async move { handler(args).await.map(|v| vec![v]) })
}

/// The error for a command that cannot run anywhere.
fn unavailable(fun: &str, locs: &[String], why: Unavailable) -> RpcError {
    match why {
        Unavailable::NoFunction => RpcError::new(
            ErrorCode::UnknownFunction,
            format!("no function '{fun}' on any node"),
        ),
        Unavailable::MissingDatasets => RpcError::new(
            ErrorCode::NoNodeForDatasets,
            format!("no node has function '{fun}' with all of the datasets {locs:?}"),
        )
        .with_details(json!({ "function": fun, "datasets": locs })),
    }
}
