//! mpreg: run functions on data anywhere in a cluster.
//!
//! Each process embeds a **node** that serves functions registered with
//! [`#[mpreg::rpc]`](rpc). A client connects to any node and sends a
//! **request**: a list of named commands `(name, function, args, datasets)`.
//! An argument equal to another command's name is replaced by that command's
//! result; commands run as soon as their inputs are ready, and the client gets
//! back the results of the final commands (those nothing else consumes).
//!
//! ```no_run
//! /// Adds two numbers.
//! #[mpreg::rpc]
//! fn add(a: i64, b: i64) -> i64 {
//!     a + b
//! }
//!
//! #[mpreg::rpc(datasets = ["model-a"])]
//! async fn predict(x: f64) -> Result<f64, std::io::Error> {
//!     Ok(x * 2.0)
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), mpreg::Error> {
//!     // Serves `add`, `predict` and the built-ins until Ctrl-C.
//!     mpreg::Node::builder().listen("127.0.0.1:7773").run().await
//! }
//! ```
//!
//! And from another process:
//!
//! ```no_run
//! # async fn doc() -> Result<(), mpreg::Error> {
//! use mpreg::{Client, Command, Request};
//!
//! let client = Client::connect("ws://127.0.0.1:7773").await?;
//! let sum: i64 = client.call("add", (1, 2)).await?;
//! let results = client
//!     .send(
//!         Request::new()
//!             .cmd(Command::new("sum", "add").arg(1).arg(2))
//!             .cmd(Command::new("y", "predict").arg("sum").dataset("model-a")),
//!     )
//!     .await?;
//! assert_eq!(results.get::<f64>("y")?, 6.0);
//! # Ok(()) }
//! ```
//!
//! # Guide
//!
//! **Functions.** [`#[mpreg::rpc]`](rpc) registers a free function (sync,
//! `async`, or `blocking`) with its parameter names, types and doc comment;
//! [`Function`] registers a closure at runtime
//! ([`NodeBuilder::function`], [`NodeHandle::register`]). Arguments come by
//! position or by name (`kwargs`).
//!
//! **Datasets and context.** A node has datasets, by name
//! ([`NodeBuilder::datasets`]) or with typed state
//! ([`NodeBuilder::dataset`]); a command naming datasets runs on a node
//! that has all of them. A handler parameter [`Dataset<T>`] is the state of
//! the dataset its command named, and a [`Context`] parameter tells the
//! node, the datasets, the deadline and the request id, and calls other
//! functions anywhere in the cluster within that deadline.
//!
//! **Requests and clients.** A [`Request`] is a list of [`Command`]s; an
//! argument equal to another command's name is that command's result.
//! [`Client`] sends them to any node: typed [`Client::call`], whole
//! requests with [`Client::send`], results as they complete with
//! [`Client::stream`], and failover across several seed URLs with
//! [`Client::connect_any`]. [`NodeHandle::send`] does the same in process.
//!
//! **A cluster.** Give a node the URL of any running node
//! ([`NodeBuilder::peers`]); membership and abilities spread by gossip,
//! failed nodes are detected, and every node routes any command to a node
//! that can run it (balancing by load). [`NodeHandle::cluster_view`] (a
//! typed [`ClusterView`]) and the built-in `mpreg.cluster` /
//! `mpreg.functions` show what a node sees.
//!
//! **Operating.** [`config`] reads TOML or YAML files and `MPREG_*`
//! variables; the node's port also answers HTTP `GET /healthz`, `/metrics`
//! (Prometheus) and `/` (a status page); logs and spans go through
//! `tracing`. Errors carry stable codes ([`ErrorCode`]).
//!
//! # Layout
//! - [`protocol`](Command): every wire message (JSON over WebSocket): a
//!   client's requests (both envelopes of the original Python client),
//!   replies, progress and auth messages, and the messages between nodes.
//! - `plan`: a request's commands become a typed dependency graph; names
//!   are resolved once, cycles and duplicates rejected.
//! - `exec`: the dataflow executor; each command starts when its inputs are
//!   ready.
//! - `registry`: functions from `#[mpreg::rpc]` (collected with `inventory`)
//!   and from [`Function`].
//! - [`Context`], [`Dataset`]: what a handler knows of its call, typed
//!   dataset state, calls from a handler into the cluster.
//! - [`Node`], [`NodeBuilder`], [`NodeHandle`]: a node's lifecycle; `server`:
//!   its connections.
//! - `http`: plain HTTP on the node's port: `/healthz`, `/metrics`
//!   (Prometheus), a status page; `metrics`: the counters behind them.
//! - [`Client`]: the Rust client, with failover across seed URLs and
//!   [`ResultStream`] for per-command results as they complete.
//! - [`config`]: settings and the TOML config file.
//! - [`Error`], [`RpcError`], [`ErrorCode`]: errors, with stable wire codes.

#![deny(missing_docs)]

mod auth;
mod budget;
mod builtins;
mod client;
mod cluster;
pub mod config;
mod context;
pub mod demo;
mod error;
mod exec;
mod http;
mod link;
mod membership;
mod metrics;
mod node;
mod payload;
mod plan;
mod protocol;
mod registry;
mod server;
mod tls;
mod transport;
mod ws;

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;

/// Internal costs for the benchmarks in `benches/`. Not a stable API.
#[doc(hidden)]
pub mod __bench {
    use serde_json::{Map, Value};

    use crate::{Command, RpcError};

    /// Plans `commands` as a request would be; returns the number of sinks.
    pub fn plan(commands: Vec<Command>) -> Result<usize, RpcError> {
        crate::plan::Plan::new(commands.into_iter().map(Into::into).collect(), usize::MAX)
            .map(|p| p.sinks.len())
    }

    /// Parses one client frame; returns its number of commands.
    pub fn parse_frame(frame: &[u8]) -> Result<usize, RpcError> {
        crate::protocol::parse_request(frame)
            .map(|r| r.cmds.len())
            .map_err(|r| *r.error)
    }

    /// Encodes a successful reply.
    pub fn encode_reply(u: Value, results: Map<String, Value>) -> String {
        crate::protocol::Reply::ok(u, results).encode()
    }
}

pub use client::{Client, ClientBuilder, Event, Progress, ResultStream, Results};
pub use cluster::{
    ClusterSummary, ClusterView, FunctionInfo, GossipStats, NodeStatus, NodeView, ParamInfo,
    SecurityStats,
};
pub use config::Config;
pub use context::{Context, Dataset};
pub use error::{Error, ErrorCode, Result, RpcError, TransportError};
pub use node::{Node, NodeBuilder, NodeHandle, shutdown_signal};
pub use protocol::{Command, IDLE_CLOSE_REASON, MAX_ID_BYTES, REPLY_LIMIT_HEADER, Request};
pub use registry::{Args, Function, Param};

/// Registers a function to be served by every mpreg node in this binary.
///
/// Put it on a free function, sync or `async`, whose arguments are decoded
/// from JSON (`serde::de::DeserializeOwned`) and whose return value is encoded
/// to JSON (`serde::Serialize`):
///
/// ```
/// /// Adds two numbers.
/// #[mpreg::rpc(name = "math.add", idempotent)]
/// fn add(a: i64, b: i64) -> i64 {
///     a + b
/// }
///
/// #[mpreg::rpc(datasets = ["model-a"])]
/// async fn predict(input: Vec<f32>, scale: Option<f32>) -> Result<f32, String> {
///     let sum: f32 = input.iter().sum();
///     if sum.is_finite() { Ok(sum * scale.unwrap_or(1.0)) } else { Err("overflow".into()) }
/// }
///
/// #[mpreg::rpc(blocking)]
/// fn checksum(path: String) -> std::io::Result<u64> {
///     Ok(std::fs::read(path)?.iter().map(|b| u64::from(*b)).sum())
/// }
///
/// // They are still ordinary Rust functions.
/// assert_eq!(add(1, 2), 3);
/// # let _ = (predict(vec![], None), checksum(String::new()));
/// ```
///
/// # Arguments
///
/// All are optional, in any order, each at most once:
///
/// - `name = "math.add"`: the name callers use (default: the function's name).
/// - `datasets = ["model-a", "model-b"]`: datasets this function always has,
///   on top of the node's; calls that ask for datasets are routed to a node
///   that has all of them.
/// - `idempotent`: running it again after a failure is harmless, so mpreg
///   may retry a failed call to it.
/// - `blocking`: the function blocks (CPU-heavy work, blocking I/O). It runs on
///   tokio's blocking thread pool instead of the node's I/O threads. Only for
///   sync functions.
/// - `crate = path`: where to find this crate, if not at `::mpreg` (for
///   example when it is renamed or re-exported).
///
/// # Calls
///
/// A call's arguments are matched to the parameters by position, then by
/// name (`kwargs`). A missing `Option<T>` argument is `None`; any other
/// missing, unknown, surplus or undecodable argument fails the call with
/// [`ErrorCode::BadArguments`], naming the parameter and its type.
///
/// Two kinds of parameters, in any position, are not arguments on the wire
/// and are recognized by their type's name: a [`Context`]
/// (`ctx: mpreg::Context`: the node, the datasets named, the deadline, calls
/// into the cluster) and a [`Dataset<T>`] (the state of type `T` of the
/// dataset the command named; the call fails with `bad_arguments` when it
/// named none or several). A type of your own must not be named `Context`
/// or `Dataset` for a wire parameter.
///
/// ```
/// use mpreg::{Context, Dataset};
///
/// struct Model { bias: f64 }
///
/// #[mpreg::rpc]
/// async fn predict(x: f64, model: Dataset<Model>, ctx: Context) -> Result<f64, mpreg::Error> {
///     let scale: f64 = ctx.call("echo", (2.0,)).await?;
///     Ok(x * scale + model.bias)
/// }
/// # let _ = predict;
/// ```
///
/// The return value becomes the call's result; no return type gives `null`.
/// A return type named `Result` (`Result<T, E>`, `std::io::Result<T>`,
/// `anyhow::Result<T>`, ...) is unwrapped: `Ok(value)` is the result and
/// `Err(e)` fails the call with [`ErrorCode::HandlerFailed`] and `e`'s
/// `Display` text as the message. So does a panic in a `blocking` function.
/// An `Err` that is an [`RpcError`], or an [`Error::Rpc`] (the error of a
/// call made through the context), keeps its code and message: a timeout
/// of an inner call is the command's timeout.
///
/// # What it generates
///
/// The function itself, unchanged, and next to it a hidden `const _: () = {
/// .. };` with a handler that decodes the arguments, calls the function and
/// encodes its result, plus an `inventory` registration of the handler with
/// its name, datasets, parameter names and types, return type, doc comment
/// and `idempotent` flag. Nothing runs at startup; every node built in this
/// binary finds the registrations when it starts.
///
/// # Errors
///
/// These are rejected at compile time, with an error on the offending tokens:
/// methods (`self`), generic functions, `const`, `unsafe` or `extern`
/// functions, pattern arguments (`(a, b): (i32, i32)`), reference arguments
/// (use an owned type: `String` instead of `&str`), `impl Trait` arguments,
/// `blocking` on an `async fn`, unknown or repeated attribute arguments, and
/// argument or return types that do not implement `Deserialize`/`Serialize`:
///
/// ```compile_fail
/// #[mpreg::rpc]
/// fn greet(name: &str) -> String { // error: use `String` instead of `&str`
///     format!("hello {name}")
/// }
/// ```
pub use mpreg_macros::rpc;
