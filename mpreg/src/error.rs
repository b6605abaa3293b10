//! Errors: the wire error a node answers with ([`RpcError`], with a stable
//! [`ErrorCode`]), and the library's own [`Error`] for everything a caller of
//! the Rust API can run into (connecting, configuration, the node's answer).

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A stable, machine-readable error code, sent on the wire as a snake_case
/// string (`"unknown_function"`, ...).
///
/// The codes are part of the protocol: clients in any language match on them.
/// Which one to use:
/// - the request itself is wrong and retrying it unchanged cannot help:
///   [`BadRequest`](Self::BadRequest), [`DuplicateName`](Self::DuplicateName),
///   [`Cycle`](Self::Cycle), [`BadArguments`](Self::BadArguments),
///   [`TooLarge`](Self::TooLarge);
/// - nothing in the cluster can serve it (now):
///   [`UnknownFunction`](Self::UnknownFunction),
///   [`NoNodeForDatasets`](Self::NoNodeForDatasets);
/// - it ran and failed: [`HandlerFailed`](Self::HandlerFailed);
/// - it may succeed if tried again later: [`Timeout`](Self::Timeout),
///   [`NodeLost`](Self::NodeLost), [`Overloaded`](Self::Overloaded).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// Not JSON, not the shape of a request, or a field of the wrong type.
    BadRequest,
    /// Two commands in one request have the same name.
    DuplicateName,
    /// The commands' references form a cycle.
    Cycle,
    /// No node has a function of that name.
    UnknownFunction,
    /// The function exists, but on no node together with all the requested
    /// datasets.
    NoNodeForDatasets,
    /// The arguments do not fit the function's parameters.
    BadArguments,
    /// The handler returned an error or panicked.
    HandlerFailed,
    /// The request's deadline passed before it finished.
    Timeout,
    /// The node running a command went away before answering.
    NodeLost,
    /// A limit was reached (in-flight requests, queue length); try later.
    Overloaded,
    /// A result, or the request's results together, crossed a byte budget
    /// (the reply's, a peer job's, the client's); the command that crossed
    /// it is named. Retrying unchanged cannot help.
    TooLarge,
    /// Credentials were missing or wrong.
    Unauthorized,
    /// A bug or an unexpected state inside mpreg.
    Internal,
    /// A code this version does not know (sent by a newer node).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// Every code, `Unknown` last.
    pub(crate) const ALL: [ErrorCode; 14] = [
        ErrorCode::BadRequest,
        ErrorCode::DuplicateName,
        ErrorCode::Cycle,
        ErrorCode::UnknownFunction,
        ErrorCode::NoNodeForDatasets,
        ErrorCode::BadArguments,
        ErrorCode::HandlerFailed,
        ErrorCode::Timeout,
        ErrorCode::NodeLost,
        ErrorCode::Overloaded,
        ErrorCode::TooLarge,
        ErrorCode::Unauthorized,
        ErrorCode::Internal,
        ErrorCode::Unknown,
    ];

    /// The code written as `name` (`Unknown` for a name this version does
    /// not know).
    fn from_name(name: &str) -> Self {
        Self::ALL
            .into_iter()
            .find(|c| c.as_str() == name)
            .unwrap_or(Self::Unknown)
    }

    /// The code as it is written on the wire.
    ///
    /// ```
    /// assert_eq!(mpreg::ErrorCode::NoNodeForDatasets.as_str(), "no_node_for_datasets");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::DuplicateName => "duplicate_name",
            Self::Cycle => "cycle",
            Self::UnknownFunction => "unknown_function",
            Self::NoNodeForDatasets => "no_node_for_datasets",
            Self::BadArguments => "bad_arguments",
            Self::HandlerFailed => "handler_failed",
            Self::Timeout => "timeout",
            Self::NodeLost => "node_lost",
            Self::Overloaded => "overloaded",
            Self::TooLarge => "too_large",
            Self::Unauthorized => "unauthorized",
            Self::Internal => "internal",
            Self::Unknown => "unknown",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error a node answers with: a stable [`code`](Self::code), a human
/// message, and the name of the command that failed (when one did).
///
/// This is also what a handler returns to fail a call: see
/// [`RpcError::handler_failed`].
///
/// ```
/// use mpreg::{ErrorCode, RpcError};
///
/// let e = RpcError::new(ErrorCode::UnknownFunction, "no function 'nope' on any node")
///     .with_command("x");
/// let wire = serde_json::to_value(&e).unwrap();
/// assert_eq!(wire["code"], "unknown_function");
/// assert_eq!(wire["command"], "x");
/// ```
///
/// Reading one is lenient, so that any node's reply can be read: the code
/// is taken from `kind` (mpreg's string code, in every reply of this
/// version), else from `code` as a string, else from `code` as the number
/// the original Python server's later release sends (the broadest code of
/// that number: 1001 reads as `unknown_function`, 1003 as
/// `handler_failed`, 1004 as `bad_request`); a missing `message` is empty.
///
/// ```
/// use mpreg::{ErrorCode, RpcError};
///
/// let e: RpcError = serde_json::from_str(
///     r#"{"code": 1001, "kind": "no_node_for_datasets", "message": "m"}"#,
/// ).unwrap();
/// assert_eq!(e.code, ErrorCode::NoNodeForDatasets);
/// let e: RpcError = serde_json::from_str(r#"{"code": 1001, "message": "m"}"#).unwrap();
/// assert_eq!(e.code, ErrorCode::UnknownFunction);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[serde(from = "ErrorWire")]
#[error("{code}: {message}{}", command_suffix(.command))]
pub struct RpcError {
    /// What kind of failure this is.
    pub code: ErrorCode,
    /// A human-readable explanation.
    pub message: String,
    /// The command that failed, when the failure belongs to one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Extra structured information (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
}

/// An error object as read from the wire, before its code is settled.
#[derive(Deserialize)]
struct ErrorWire {
    #[serde(default)]
    code: Value,
    #[serde(default)]
    kind: Value,
    #[serde(default)]
    message: String,
    #[serde(default)]
    command: Option<String>,
    #[serde(default)]
    details: Option<Value>,
}

impl From<ErrorWire> for RpcError {
    fn from(wire: ErrorWire) -> Self {
        let code = match (&wire.kind, &wire.code) {
            (Value::String(name), _) | (_, Value::String(name)) => ErrorCode::from_name(name),
            (_, Value::Number(n)) => n
                .as_i64()
                .map_or(ErrorCode::Unknown, crate::protocol::later::code_of_number),
            _ => ErrorCode::Unknown,
        };
        Self {
            code,
            message: wire.message,
            command: wire.command,
            details: wire.details,
        }
    }
}

fn command_suffix(command: &Option<String>) -> String {
    match command {
        Some(c) => format!(" (command '{c}')"),
        None => String::new(),
    }
}

impl RpcError {
    /// An error with a code and a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            command: None,
            details: None,
        }
    }

    /// A `handler_failed` error: what a handler returns when it cannot do its
    /// job.
    pub fn handler_failed(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::HandlerFailed, message)
    }

    /// A `bad_arguments` error.
    pub fn bad_arguments(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadArguments, message)
    }

    /// A `bad_request` error.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    /// Names the failing command (keeps a name that is already set: the
    /// innermost command is the one that failed).
    pub fn with_command(mut self, command: impl Into<String>) -> Self {
        if self.command.is_none() {
            self.command = Some(command.into());
        }
        self
    }

    /// Attaches structured details.
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }
}

/// A transport failure (WebSocket or I/O) under a client or node connection.
///
/// Kept opaque so the WebSocket library is not part of mpreg's public API;
/// [`std::error::Error::source`] gives the underlying error.
#[derive(Debug)]
pub struct TransportError(pub(crate) tokio_tungstenite::tungstenite::Error);

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for TransportError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// Everything that can go wrong when using mpreg from Rust.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The node answered the request with an error.
    #[error(transparent)]
    Rpc(#[from] RpcError),
    /// Could not connect to a node.
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// The URL that was dialed.
        url: String,
        /// Why it failed.
        #[source]
        source: TransportError,
    },
    /// None of a client's seed URLs could be connected to: each one tried,
    /// in the order tried, with why it failed (each an [`Error::Connect`]).
    #[error("no seed could be reached: {}", seed_failures(.attempts))]
    NoSeedReachable {
        /// `(url, why)` for every seed tried.
        attempts: Vec<(String, Error)>,
    },
    /// The connection failed while in use.
    #[error("connection failed: {0}")]
    Transport(#[from] TransportError),
    /// The connection closed before the answer came.
    #[error("connection closed")]
    Closed,
    /// No answer within the client-side timeout.
    #[error("no reply within {0:?}")]
    Timeout(std::time::Duration),
    /// A result could not be decoded into the requested type, or a request
    /// could not be encoded.
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The reply has no result for the command asked about (it was not a
    /// sink, and intermediate results were not requested).
    #[error("no result for command '{name}' in the reply")]
    NoSuchResult {
        /// The command's name.
        name: String,
    },
    /// A node answered with a message that is not a valid reply.
    #[error("invalid reply from node: {0}")]
    Protocol(&'static str),
    /// Binding the listen address or another I/O operation failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A configuration file or value is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// The failed attempts of [`Error::NoSeedReachable`], one after another.
fn seed_failures(attempts: &[(String, Error)]) -> String {
    if attempts.is_empty() {
        return "no seed was tried".to_owned();
    }
    let all: Vec<String> = attempts
        .iter()
        .map(|(url, e)| match e {
            // It already names the URL.
            Error::Connect { .. } => e.to_string(),
            other => format!("{url}: {other}"),
        })
        .collect();
    all.join("; ")
}

/// `Result` with mpreg's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_as_snake_case() {
        for code in ErrorCode::ALL {
            let wire = serde_json::to_value(code).expect("serialize");
            assert_eq!(wire, Value::String(code.as_str().to_owned()));
            let back: ErrorCode = serde_json::from_value(wire).expect("deserialize");
            assert_eq!(back, code);
        }
    }

    #[test]
    fn unknown_code_from_newer_node_is_kept_as_unknown() {
        let e: RpcError =
            serde_json::from_str(r#"{"code":"brand_new","message":"m"}"#).expect("deserialize");
        assert_eq!(e.code, ErrorCode::Unknown);
    }

    #[test]
    fn any_error_object_reads() {
        let read = |text: &str| serde_json::from_str::<RpcError>(text).expect(text);
        // Both of this version's forms: `kind` first.
        let e = read(r#"{"code":"cycle","kind":"cycle","message":"m","details":{"cycle":["a"]}}"#);
        assert_eq!(e.code, ErrorCode::Cycle);
        assert_eq!(e.details, Some(serde_json::json!({"cycle": ["a"]})));
        let e = read(r#"{"code":1003,"kind":"bad_arguments","message":"m","command":"c"}"#);
        assert_eq!(e.code, ErrorCode::BadArguments);
        assert_eq!(e.command.as_deref(), Some("c"));
        // The original's: a number, `details` a string.
        let e = read(r#"{"code":1004,"message":"m","details":"t"}"#);
        assert_eq!(e.code, ErrorCode::BadRequest);
        // A code of any other shape, or none.
        assert_eq!(
            read(r#"{"code":null,"message":"m"}"#).code,
            ErrorCode::Unknown
        );
        assert_eq!(read(r#"{"code":1.5}"#).code, ErrorCode::Unknown);
        assert_eq!(
            read(r#"{"code":[1],"message":""}"#).code,
            ErrorCode::Unknown
        );
        assert_eq!(read("{}").message, "");
    }

    #[test]
    fn innermost_command_name_wins() {
        let e = RpcError::handler_failed("boom")
            .with_command("inner")
            .with_command("outer");
        assert_eq!(e.command.as_deref(), Some("inner"));
        assert_eq!(e.to_string(), "handler_failed: boom (command 'inner')");
    }
}
