//! The wire: every message mpreg sends or reads, JSON objects, one per
//! WebSocket frame. The full description is in `docs/PROTOCOL.md`.
//!
//! Between a client and a node: requests, progress messages, replies, and
//! the auth message.
//! Both request envelopes of the original Python client are accepted
//! unchanged: the first release nested the request under `rpc`
//! (`{"role":"rpc","rpc":{"cmds":[..],"u":".."}}`), the later one is flat
//! (`{"role":"rpc","u":"..","cmds":[..]}`). Replies carry the request's `u`.
//!
//! Replies take one of two forms, the request's [`Dialect`]: mpreg's own,
//! or the one the original project's later client reads (see [`later`]).
//! The dialect is decided when a frame is read and travels with the request
//! to its reply.
//!
//! Between nodes, over a link: the messages of [`peer`].
//!
//! What each file holds (types and the functions that only encode or decode
//! them; what a node or a client does with them stays with the node, the
//! server, the client and the link):
//! - `request.rs`: [`Command`] and [`Request`], the envelope the Rust client
//!   writes, a request as a node reads it, the parsing of a client frame in
//!   either envelope, and the limits on ids and replies a client asks for.
//! - `fast.rs`: the one-pass reading of a well-formed client frame.
//! - `scan.rs`: whom the reply to a frame that could not be read answers
//!   (its id and the reply's form), by a scan of its bytes.
//! - `reply.rs`: the reply's form ([`Dialect`], the marker), replies as a
//!   node sends them and as a client reads them, error objects, result maps.
//! - `later.rs`: the later client's form: the original's error numbers,
//!   levels and their times, the execution summary.
//! - `progress.rs`: a streaming request's progress messages.
//! - `auth.rs`: the auth message a client sends first when the node
//!   requires a token and none came with the upgrade, and its answer.
//! - `peer.rs`: the node-to-node messages (the opening of a link, jobs and
//!   their answers, catalogs, idleness) and their encoding.

mod auth;
mod fast;
pub(crate) mod later;
pub(crate) mod peer;
mod progress;
mod reply;
mod request;
mod scan;

pub(crate) use auth::{auth_ok, auth_token};
pub(crate) use progress::ProgressMessage;
pub(crate) use reply::{
    Answer, Dialect, Incoming, MARKER_FIELD, MARKER_VERSION, MAX_RESULT_DEPTH, Reply, ReplyRole,
    ReplyShape, ReplyTo, ResultMap, Role,
};
pub use request::{Command, IDLE_CLOSE_REASON, MAX_ID_BYTES, REPLY_LIMIT_HEADER, Request};
pub(crate) use request::{
    IncomingRequest, OutgoingRequest, ParsedCommand, Rejected, parse_request, reply_limit,
};
pub(crate) use scan::reply_to;
