//! mpreg: run functions on data anywhere in a cluster.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod config;
mod error;
mod exec;
mod registry;

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;

pub use config::Config;
pub use error::{Error, ErrorCode, Result, RpcError, TransportError};
pub use registry::{Args, Function, Param};

/// Registers a function to be served by every mpreg node in this binary.
pub use mpreg_macros::rpc;
