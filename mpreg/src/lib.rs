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
//! # Layout
//! - [`protocol`](Command): the wire messages (JSON over WebSocket), both
//!   envelopes of the original Python client.
//! - `plan`: a request's commands become a typed dependency graph; names
//!   are resolved once, cycles and duplicates rejected.
//! - `exec`: the dataflow executor; each command starts when its inputs are
//!   ready.
//! - `registry`: functions from `#[mpreg::rpc]` (collected with `inventory`)
//!   and from [`Function`].
//! - [`Node`], [`NodeBuilder`], [`NodeHandle`]: a node's lifecycle; `server`:
//!   its connections.
//! - [`Client`]: the Rust client.
//! - [`config`]: settings and the TOML config file.
//! - [`Error`], [`RpcError`], [`ErrorCode`]: errors, with stable wire codes.

mod builtins;
mod client;
pub mod config;
pub mod demo;
mod error;
mod exec;
mod node;
mod plan;
mod protocol;
mod registry;
mod server;
mod ws;

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;

pub use client::{Client, ClientBuilder, Results};
pub use config::Config;
pub use error::{Error, ErrorCode, Result, RpcError, TransportError};
pub use node::{Node, NodeBuilder, NodeHandle, shutdown_signal};
pub use protocol::{Command, Request};
pub use registry::{Args, Function, Param};

/// Registers a function to be served by every mpreg node in this binary.
pub use mpreg_macros::rpc;
