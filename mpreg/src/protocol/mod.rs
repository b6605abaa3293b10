//! Client wire messages: JSON objects, one per WebSocket frame.
//!
//! Both request envelopes of the original Python client are accepted
//! unchanged: the first release nested the request under `rpc`
//! (`{"role":"rpc","rpc":{"cmds":[..],"u":".."}}`), the later one is flat
//! (`{"role":"rpc","u":"..","cmds":[..]}`). Replies carry the request's `u`.
//! The full description is in `docs/PROTOCOL.md`.
//!
//! Replies take one of two forms, the request's [`Dialect`]: mpreg's own,
//! or the one the original project's later client reads (see [`later`]).
//! The dialect is decided when a frame is read and travels with the request
//! to its reply.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::RpcError;
use crate::payload::Payload;

mod fast;
pub(crate) mod later;

/// The field by which mpreg's own clients mark a flat-envelope request
/// (`"mpreg": 1`): its replies then take mpreg's form ([`Dialect::Mpreg`]).
/// A flat request without it is taken to come from the original project's
/// later client ([`Dialect::Later`]).
pub(crate) const MARKER_FIELD: &str = "mpreg";

/// The value mpreg's clients send in [`MARKER_FIELD`]: the version of
/// mpreg's reply form they read. Any positive integer is accepted (a node
/// answers in the form it knows).
pub(crate) const MARKER_VERSION: u64 = 1;

/// The form of a request's replies.
///
/// Chosen when the frame is read (see [`Dialect::of_envelope`]), and
/// carried with the request to every reply it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Dialect {
    /// mpreg's form: `error.code` is mpreg's string code; `r` holds the
    /// sinks, or every command with `return_intermediate_results`. For
    /// requests that carry the marker, for the first-release envelope, and
    /// for frames with no readable id.
    #[default]
    Mpreg,
    /// The form the original project's later client reads (a flat request
    /// without the marker): `error.code` is that project's number
    /// ([`later::code_number`]), `intermediate_results` and
    /// `execution_summary` are always present, and
    /// `return_intermediate_results` reports level by level.
    Later,
}

impl Dialect {
    /// The dialect of a request read in the first-release envelope
    /// (`nested`) or the flat one with `marker` (the value of
    /// [`MARKER_FIELD`], if any): mpreg's when nested or marked, the later
    /// client's otherwise. A marker that is neither `null` nor a positive
    /// integer is an error (worded for a `bad_request`).
    pub(crate) fn of_envelope(nested: bool, marker: Option<&Value>) -> Result<Self, String> {
        if nested {
            return Ok(Self::Mpreg);
        }
        match marker {
            None | Some(Value::Null) => Ok(Self::Later),
            Some(v) if v.as_u64().is_some_and(|n| n >= 1) => Ok(Self::Mpreg),
            Some(_) => Err(format!(
                "field `{MARKER_FIELD}` must be a positive integer (the reply form, {MARKER_VERSION})"
            )),
        }
    }
}

/// Whom a reply answers: the request's id (`null` when it could not be
/// read) and the form the reply takes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ReplyTo {
    pub(crate) u: Value,
    pub(crate) dialect: Dialect,
}

impl ReplyTo {
    /// A reply in mpreg's form to request `u`.
    pub(crate) fn mpreg(u: Value) -> Self {
        Self {
            u,
            dialect: Dialect::Mpreg,
        }
    }
}

/// One command of a request: run `fun` with `args` and `kwargs` on a node
/// that has every dataset in `locs`, and call the result `name`.
///
/// An argument (or kwarg value) that is a string equal to the name of
/// another command in the same request is replaced by that command's result.
///
/// ```
/// use mpreg::Command;
///
/// let c = Command::new("|third", "echos").arg("|first").arg("AND ME TOO");
/// assert_eq!(c.args.len(), 2);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Command {
    /// The command's name, unique in its request.
    pub name: String,
    /// The function to run.
    pub fun: String,
    /// Positional arguments.
    #[serde(default)]
    pub args: Vec<Value>,
    /// Arguments by parameter name.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub kwargs: Map<String, Value>,
    /// Datasets the running node must have (all of them).
    #[serde(default)]
    pub locs: Vec<String>,
}

impl Command {
    /// A command `name` that runs `fun` with no arguments.
    pub fn new(name: impl Into<String>, fun: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            fun: fun.into(),
            args: Vec::new(),
            kwargs: Map::new(),
            locs: Vec::new(),
        }
    }

    /// Appends a positional argument (a string equal to another command's
    /// name is a reference to that command's result).
    pub fn arg(mut self, value: impl Into<Value>) -> Self {
        self.args.push(value.into());
        self
    }

    /// Appends several positional arguments.
    pub fn args<I, V>(mut self, values: I) -> Self
    where
        I: IntoIterator<Item = V>,
        V: Into<Value>,
    {
        self.args.extend(values.into_iter().map(Into::into));
        self
    }

    /// Sets an argument by parameter name.
    pub fn kwarg(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        self.kwargs.insert(name.into(), value.into());
        self
    }

    /// Requires a dataset on the node that runs this command.
    pub fn dataset(mut self, dataset: impl Into<String>) -> Self {
        self.locs.push(dataset.into());
        self
    }

    /// Requires several datasets.
    pub fn datasets<I, S>(mut self, datasets: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.locs.extend(datasets.into_iter().map(Into::into));
        self
    }
}

/// A request: commands, plus options. Sent by [`Client::send`](crate::Client::send).
///
/// ```
/// use mpreg::{Command, Request};
/// use std::time::Duration;
///
/// let req = Request::new()
///     .cmd(Command::new("first", "echo").arg("hi there!"))
///     .cmd(Command::new("second", "echo").arg("first"))
///     .timeout(Duration::from_secs(5));
/// assert_eq!(req.cmds.len(), 2);
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct Request {
    /// The commands.
    pub cmds: Vec<Command>,
    /// Deadline for the whole request (`timeout_ms` on the wire).
    pub timeout: Option<Duration>,
    /// Return every command's result, not only the sinks'.
    pub return_intermediate_results: bool,
    /// Ask the node for each command's result as soon as it exists, ahead of
    /// the final reply (`stream` on the wire). [`Client::stream`] sets it
    /// and [`Client::send`] clears it, so it matters only to other users of
    /// the wire format.
    ///
    /// [`Client::stream`]: crate::Client::stream
    /// [`Client::send`]: crate::Client::send
    pub stream: bool,
}

impl Request {
    /// An empty request.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a command.
    pub fn cmd(mut self, command: Command) -> Self {
        self.cmds.push(command);
        self
    }

    /// Sets the deadline.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Asks for every command's result, not only the sinks'.
    pub fn return_intermediate_results(mut self, yes: bool) -> Self {
        self.return_intermediate_results = yes;
        self
    }

    /// Asks for each command's result as soon as it exists (see
    /// [`stream`](Self#structfield.stream)).
    pub fn stream(mut self, yes: bool) -> Self {
        self.stream = yes;
        self
    }
}

impl FromIterator<Command> for Request {
    fn from_iter<I: IntoIterator<Item = Command>>(iter: I) -> Self {
        Self {
            cmds: iter.into_iter().collect(),
            ..Self::default()
        }
    }
}

/// The flat ("later") envelope, as the Rust client writes it: with the
/// marker (first after `role`, so that even a frame the node cannot read
/// to its end is answered in mpreg's form).
#[derive(Serialize)]
pub(crate) struct OutgoingRequest<'a> {
    pub(crate) role: &'static str,
    /// Always [`MARKER_VERSION`].
    pub(crate) mpreg: u64,
    pub(crate) u: &'a str,
    pub(crate) cmds: &'a [Command],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) return_intermediate_results: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) stream: bool,
}

/// A command as the executor takes it: arguments may still be the raw JSON
/// text they arrived as (see [`Payload`]).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ParsedCommand {
    pub(crate) name: String,
    pub(crate) fun: String,
    pub(crate) args: Vec<Payload>,
    /// In name order (as a [`Command`]'s map has them).
    pub(crate) kwargs: Vec<(String, Payload)>,
    pub(crate) locs: Vec<String>,
}

impl From<Command> for ParsedCommand {
    fn from(c: Command) -> Self {
        Self {
            name: c.name,
            fun: c.fun,
            args: c.args.into_iter().map(Payload::Tree).collect(),
            kwargs: c
                .kwargs
                .into_iter()
                .map(|(k, v)| (k, Payload::Tree(v)))
                .collect(),
            locs: c.locs,
        }
    }
}

/// A request as a node received it, with its id.
#[derive(Debug, PartialEq)]
pub(crate) struct IncomingRequest {
    pub(crate) u: Value,
    pub(crate) cmds: Vec<ParsedCommand>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) return_intermediate_results: bool,
    pub(crate) stream: bool,
    /// The later client's `include_execution_summary` (read in any
    /// envelope; only the later client's replies carry a summary).
    pub(crate) include_execution_summary: bool,
    /// The form of the request's reply.
    pub(crate) dialect: Dialect,
    /// Most bytes of results the request's reply may carry: the smaller of
    /// the node's [`reply_budget`](crate::Config::reply_budget) and what the
    /// client asked for at its upgrade ([`REPLY_LIMIT_HEADER`]). Parsing
    /// leaves it unlimited (`usize::MAX`); `node::handle_frame` and
    /// `node::send` set it.
    pub(crate) reply_budget: usize,
}

impl IncomingRequest {
    /// A request made in process (its arguments are trees already), with
    /// no reply budget of its own (`usize::MAX`) until the caller sets one;
    /// its reply takes mpreg's form.
    pub(crate) fn new(u: Value, request: Request) -> Self {
        Self {
            u,
            cmds: request.cmds.into_iter().map(ParsedCommand::from).collect(),
            timeout: request.timeout,
            return_intermediate_results: request.return_intermediate_results,
            stream: request.stream,
            include_execution_summary: false,
            dialect: Dialect::Mpreg,
            reply_budget: usize::MAX,
        }
    }

    /// Whom the request's replies answer.
    pub(crate) fn reply_to(&self) -> ReplyTo {
        ReplyTo {
            u: self.u.clone(),
            dialect: self.dialect,
        }
    }

    /// What the request's reply holds (from its dialect and options).
    pub(crate) fn shape(&self) -> ReplyShape {
        match self.dialect {
            Dialect::Mpreg => ReplyShape {
                all: self.return_intermediate_results,
                levels: false,
                summary: false,
            },
            Dialect::Later => ReplyShape {
                all: self.return_intermediate_results,
                levels: self.return_intermediate_results,
                summary: self.include_execution_summary,
            },
        }
    }
}

/// What a request's reply holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReplyShape {
    /// Every command's result is needed, not only the sinks'.
    pub(crate) all: bool,
    /// The later client's level-by-level report: `r` holds the last level
    /// and `intermediate_results` one entry per level.
    pub(crate) levels: bool,
    /// The later client's `execution_summary`.
    pub(crate) summary: bool,
}

impl ReplyShape {
    /// Whether the run must be timed (for levels or a summary).
    pub(crate) fn timed(self) -> bool {
        self.levels || self.summary
    }
}

/// The longest request id accepted: 256 bytes of its JSON text as the node
/// writes it back (quotes and escapes included). A longer `u` is a
/// `bad_request` (whose reply still carries it, once): the id is copied into
/// every progress message of a streaming request, so its size multiplies.
pub const MAX_ID_BYTES: usize = 256;

/// The WebSocket upgrade request header in which a client tells the node the
/// largest reply it can take, in bytes (decimal): `mpreg-max-reply-bytes:
/// 1048576`. The node then keeps each reply on that connection within the
/// smaller of this and its own reply budget, and answers a request whose
/// results would cross it with `too_large`, instead of sending a message the
/// client would have to close the connection over.
pub const REPLY_LIMIT_HEADER: &str = "mpreg-max-reply-bytes";

/// The reason of the close frame (code 1000) a node sends when it closes a
/// client connection that stayed idle: no request sent on that connection
/// and left unanswered was processed, so a client may send them again.
pub const IDLE_CLOSE_REASON: &str = "idle timeout";

/// The reply budget of a connection whose upgrade request carried `header`
/// (the value of [`REPLY_LIMIT_HEADER`], if any), on a node whose own budget
/// is `node_budget`: the smaller of the two. A value that is not a decimal
/// number of bytes is ignored; one past `usize::MAX` is no limit of its own.
pub(crate) fn reply_limit(header: Option<&[u8]>, node_budget: usize) -> usize {
    let Some(text) = header.and_then(|h| std::str::from_utf8(h).ok()) else {
        return node_budget;
    };
    let text = text.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return node_budget;
    }
    // All digits: only overflow can fail, and that is no limit.
    text.parse::<usize>().unwrap_or(usize::MAX).min(node_budget)
}

/// The length of `u`'s JSON text as it is written in replies, or a number
/// over [`MAX_ID_BYTES`] as soon as it is certainly longer (without writing
/// a long string out).
fn id_len(u: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    if let Value::String(s) = u
        && s.len() + 2 > MAX_ID_BYTES
    {
        // Written with its quotes, and escapes only add to it.
        return s.len() + 2;
    }
    let mut count = Count(0);
    // Writing a string or a number to a counter cannot fail.
    match serde_json::to_writer(&mut count, u) {
        Ok(()) => count.0,
        Err(_) => usize::MAX,
    }
}

/// Whom the reply to a frame that could not be read as a request answers:
/// its request id, when its `u` (at the top level, or inside `rpc` when
/// `rpc` is an object) is a string or a number whose text can be read
/// (else `null`), and the form of the reply.
///
/// The form is the later client's ([`Dialect::Later`]) when the id was read
/// and the top level, as far as it could be read, has no `rpc` member and
/// no [`MARKER_FIELD`] other than `null`; otherwise mpreg's. A reply with
/// no id matches no request, so it takes mpreg's form.
///
/// A scan of the bytes, not a parse: it builds no tree, does not recurse
/// (nesting only moves a counter) and reads no more than the frame, so it
/// is safe on any input. It reads as the plain parse would: of two `u`s the
/// last counts, and escaped keys are decoded.
pub(crate) fn reply_to(bytes: &[u8]) -> ReplyTo {
    let top = IdScan { bytes, pos: 0 }.object(false);
    let u = match top.rpc {
        Some(inner) => inner,
        None => top.u,
    };
    let u = u
        .and_then(|text| match serde_json::from_slice::<Value>(text) {
            Ok(u @ (Value::String(_) | Value::Number(_))) => Some(u),
            _ => None,
        })
        .unwrap_or(Value::Null);
    let dialect = if u.is_null() || top.has_rpc || top.marked {
        Dialect::Mpreg
    } else {
        Dialect::Later
    };
    ReplyTo { u, dialect }
}

/// The request id of a frame (see [`reply_to`]).
#[cfg(test)]
pub(crate) fn request_id(bytes: &[u8]) -> Value {
    reply_to(bytes).u
}

/// The byte scan of [`reply_to`].
struct IdScan<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> IdScan<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    /// Consumes `byte` (after whitespace), or fails.
    fn expect(&mut self, byte: u8) -> Option<()> {
        self.skip_ws();
        (self.peek()? == byte).then(|| self.pos += 1)
    }

    /// Consumes a string at `pos` (which is at its opening quote); returns
    /// its text, quotes included.
    fn string(&mut self) -> Option<&'a [u8]> {
        let start = self.pos;
        if self.peek()? != b'"' {
            return None;
        }
        self.pos += 1;
        loop {
            match self.peek()? {
                b'"' => {
                    self.pos += 1;
                    return Some(&self.bytes[start..self.pos]);
                }
                b'\\' => self.pos += 2,
                _ => self.pos += 1,
            }
        }
    }

    /// Consumes one value at `pos`, whatever its nesting (a depth counter,
    /// no recursion); returns its text.
    fn value(&mut self) -> Option<&'a [u8]> {
        self.skip_ws();
        let start = self.pos;
        let mut depth = 0usize;
        loop {
            match self.peek()? {
                b'"' => {
                    self.string()?;
                }
                b'[' | b'{' => {
                    depth += 1;
                    self.pos += 1;
                }
                b']' | b'}' => {
                    depth = depth.checked_sub(1)?;
                    self.pos += 1;
                }
                // Inside an array or object: anything else goes by.
                _ if depth > 0 => self.pos += 1,
                _ => {
                    // A scalar at the top of this value: up to a delimiter.
                    while let Some(b) = self.peek() {
                        if matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                            break;
                        }
                        self.pos += 1;
                    }
                }
            }
            if depth == 0 {
                return (self.pos > start).then(|| &self.bytes[start..self.pos]);
            }
        }
    }

    /// Whether a key's text (quotes included) names `name`.
    fn is_key(text: &[u8], name: &str) -> bool {
        let inner = &text[1..text.len() - 1];
        if !inner.contains(&b'\\') {
            return inner == name.as_bytes();
        }
        serde_json::from_slice::<String>(text).is_ok_and(|k| k == name)
    }

    /// Reads the members of the object at `pos`: the text of its last `u`
    /// and, at the top level (`nested` false), the `u` of its last `rpc`
    /// member when that is an object (`Some(None)` when it has none), and
    /// whether the object was read to its end. Stops at the first thing
    /// that is not JSON, keeping what it read before.
    fn object(&mut self, nested: bool) -> Members<'a> {
        let mut m = Members::default();
        if self.expect(b'{').is_none() {
            return m;
        }
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            m.complete = true;
            return m;
        }
        loop {
            self.skip_ws();
            let Some(key) = self.string() else {
                return m;
            };
            if self.expect(b':').is_none() {
                return m;
            }
            self.skip_ws();
            if !nested && Self::is_key(key, "rpc") {
                m.has_rpc = true;
                if self.peek() == Some(b'{') {
                    let inner = self.object(true);
                    // Last wins, as in a map; an `rpc` cut short is still
                    // the one the plain parse would have failed on.
                    m.rpc = Some(inner.u);
                    if !inner.complete {
                        return m;
                    }
                } else {
                    m.rpc = None;
                    if self.value().is_none() {
                        return m;
                    }
                }
            } else {
                let Some(value) = self.value() else {
                    return m;
                };
                if Self::is_key(key, "u") {
                    m.u = Some(value);
                } else if !nested && Self::is_key(key, MARKER_FIELD) {
                    // Last wins; `null` is no marker.
                    m.marked = value != b"null";
                }
            }
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    m.complete = true;
                    return m;
                }
                _ => return m,
            }
        }
    }
}

/// What [`IdScan::object`] read of an object.
#[derive(Default)]
struct Members<'a> {
    /// The text of its last `u`.
    u: Option<&'a [u8]>,
    /// The `u` of its last `rpc` member, when that is an object.
    rpc: Option<Option<&'a [u8]>>,
    /// Whether the object was read to its closing brace.
    complete: bool,
    /// Whether it has an `rpc` member (of any type; top level only).
    has_rpc: bool,
    /// Whether its last [`MARKER_FIELD`] is other than `null` (top level
    /// only).
    marked: bool,
}

/// A request that could not be read: the error, and whom the reply
/// answers (with the request id when it could be read).
#[derive(Debug)]
pub(crate) struct Rejected {
    pub(crate) to: ReplyTo,
    /// Boxed: a parse's result stays small.
    pub(crate) error: Box<RpcError>,
}

/// Reads the id of a message, if it has a usable one.
fn read_id(obj: &Map<String, Value>) -> Option<Value> {
    match obj.get("u") {
        Some(u @ (Value::String(_) | Value::Number(_))) => Some(u.clone()),
        _ => None,
    }
}

/// Parses one client frame (either envelope).
///
/// A well-formed request is read in one pass that keeps each argument as
/// its raw JSON text (checked to parse, see [`checked_raw`]), so a node
/// that forwards a large argument never builds its tree. Anything unusual
/// (an error, a duplicate field, deep nesting) is read again the plain
/// way, which words the error.
///
/// Every rejection carries the request's id whenever one can be read, and
/// the form of its reply (see [`reply_to`]), whatever else is wrong with the
/// frame; an id longer than [`MAX_ID_BYTES`] is itself a rejection.
pub(crate) fn parse_request(bytes: &[u8]) -> Result<IncomingRequest, Rejected> {
    let read = match fast::parse(bytes) {
        Some(request) => Ok(request),
        None => parse_request_slowly(bytes),
    };
    match read {
        Ok(request) => {
            let len = id_len(&request.u);
            if len > MAX_ID_BYTES {
                return Err(Rejected {
                    error: Box::new(
                        RpcError::bad_request(format!(
                            "request id `u` is {len} bytes of JSON; the limit is {MAX_ID_BYTES}"
                        ))
                        .with_details(serde_json::json!({ "limit": MAX_ID_BYTES })),
                    ),
                    to: request.reply_to(),
                });
            }
            Ok(request)
        }
        Err(mut rejected) => {
            // The scan reads the id as the plain reading does, and decides
            // the form even when the frame is not JSON.
            let scanned = reply_to(bytes);
            if rejected.to.u.is_null() {
                rejected.to.u = scanned.u;
            }
            rejected.to.dialect = if rejected.to.u.is_null() {
                Dialect::Mpreg
            } else {
                scanned.dialect
            };
            Err(rejected)
        }
    }
}

/// Parses one client frame through a [`Value`] tree.
///
/// A rejection's form is left to [`parse_request`] (mpreg's here).
fn parse_request_slowly(bytes: &[u8]) -> Result<IncomingRequest, Rejected> {
    let reject = |u: Value, message: String| Rejected {
        to: ReplyTo::mpreg(u),
        error: Box::new(RpcError::bad_request(message)),
    };
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| reject(Value::Null, format!("message is not valid JSON: {e}")))?;
    let Value::Object(mut outer) = value else {
        return Err(reject(Value::Null, "message is not a JSON object".into()));
    };
    if let Some(role) = outer.get("role")
        && role != "rpc"
    {
        let u = read_id(&outer).unwrap_or(Value::Null);
        return Err(reject(
            u,
            format!("unsupported role {role}; expected \"rpc\""),
        ));
    }
    // First-release envelope: the request sits under `rpc`.
    let (mut body, dialect) = match outer.remove("rpc") {
        Some(Value::Object(inner)) => (inner, Dialect::Mpreg),
        Some(_) => {
            let u = read_id(&outer).unwrap_or(Value::Null);
            return Err(reject(u, "field `rpc` must be an object".into()));
        }
        None => match Dialect::of_envelope(false, outer.get(MARKER_FIELD)) {
            Ok(dialect) => (outer, dialect),
            Err(message) => {
                let u = read_id(&outer).unwrap_or(Value::Null);
                return Err(reject(u, message));
            }
        },
    };
    let Some(u) = read_id(&body) else {
        let msg = match body.get("u") {
            None => "missing request id `u`",
            Some(_) => "request id `u` must be a string or a number",
        };
        return Err(reject(Value::Null, msg.into()));
    };
    let (request, include_execution_summary) =
        read_body(&mut body).map_err(|message| reject(u.clone(), message))?;
    let mut incoming = IncomingRequest::new(u, request);
    incoming.dialect = dialect;
    incoming.include_execution_summary = include_execution_summary;
    Ok(incoming)
}

/// Reads a request's fields; also returns its `include_execution_summary`.
fn read_body(body: &mut Map<String, Value>) -> Result<(Request, bool), String> {
    let cmds = match body.remove("cmds") {
        Some(Value::Array(cmds)) => cmds,
        Some(_) => return Err("field `cmds` must be an array of commands".into()),
        None => return Err("missing field `cmds`".into()),
    };
    let cmds = cmds
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            // serde would also read a struct from an array; the protocol
            // says commands are objects.
            if !c.is_object() {
                return Err(format!("command #{i}: a command must be a JSON object"));
            }
            serde_json::from_value::<Command>(c).map_err(|e| format!("command #{i}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let timeout = match body.get("timeout_ms") {
        None | Some(Value::Null) => None,
        Some(v) => Some(Duration::from_millis(v.as_u64().ok_or(
            "field `timeout_ms` must be a non-negative integer (milliseconds)",
        )?)),
    };
    let return_intermediate_results = match body.get("return_intermediate_results") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err("field `return_intermediate_results` must be a boolean".into()),
    };
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err("field `stream` must be a boolean".into()),
    };
    let summary = match body.get("include_execution_summary") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err("field `include_execution_summary` must be a boolean".into()),
    };
    let request = Request {
        cmds,
        timeout,
        return_intermediate_results,
        stream,
    };
    Ok((request, summary))
}

/// The deepest nesting a result may have: what every JSON parser of the
/// protocol accepts (serde_json's default limit), so every reply can be read.
pub(crate) const MAX_RESULT_DEPTH: usize = 128;

/// One command's result, sent ahead of the final reply to a request that
/// asked for `stream`: `{"role":"rpc-progress","u":..,"name":..,"value":..}`.
#[derive(Debug, Serialize)]
pub(crate) struct ProgressMessage<'a> {
    pub(crate) role: &'static str,
    /// The request's id.
    pub(crate) u: &'a Value,
    /// The command's name.
    pub(crate) name: &'a str,
    /// Its result.
    pub(crate) value: &'a Payload,
}

/// The `role` of a progress message.
pub(crate) const PROGRESS_ROLE: &str = "rpc-progress";

impl<'a> ProgressMessage<'a> {
    pub(crate) fn new(u: &'a Value, name: &'a str, value: &'a Payload) -> Self {
        Self {
            role: PROGRESS_ROLE,
            u,
            name,
            value,
        }
    }

    /// Encodes the message. A `serde_json::Value` always encodes; should it
    /// ever fail, the result is sent as `null` rather than not at all.
    pub(crate) fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "progress message could not be encoded");
            let null = Payload::Tree(Value::Null);
            let fallback = ProgressMessage::new(self.u, self.name, &null);
            serde_json::to_string(&fallback).unwrap_or_default()
        })
    }
}

/// A reply to one request, as a client reads it (and as a request made in
/// process gets it).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Reply {
    #[serde(default, skip_deserializing)]
    pub(crate) role: ReplyRole,
    /// The request's id (`null` when it could not be read).
    pub(crate) u: Value,
    /// Results by command name, on success.
    pub(crate) r: Option<Map<String, Value>>,
    /// The error, on failure.
    #[serde(default, serialize_with = "mpreg_error")]
    pub(crate) error: Option<RpcError>,
}

/// Always serializes as `"rpc-response"`.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ReplyRole;

impl Serialize for ReplyRole {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("rpc-response")
    }
}

impl Reply {
    pub(crate) fn ok(u: Value, results: Map<String, Value>) -> Self {
        Self {
            role: ReplyRole,
            u,
            r: Some(results),
            error: None,
        }
    }

    pub(crate) fn err(u: Value, error: RpcError) -> Self {
        Self {
            role: ReplyRole,
            u,
            r: None,
            error: Some(error),
        }
    }

    /// Encodes the reply, in mpreg's form. Results are
    /// `serde_json::Value`s, whose encoding cannot fail; should it ever,
    /// the client still gets an error reply.
    pub(crate) fn encode(&self) -> String {
        encode_or_error(self, &ReplyTo::mpreg(self.u.clone()))
    }
}

/// Writes a reply's error in mpreg's form (see [`ErrorOut`]).
fn mpreg_error<S: serde::Serializer>(error: &Option<RpcError>, s: S) -> Result<S::Ok, S::Error> {
    error
        .as_ref()
        .map(|error| ErrorOut {
            error,
            dialect: Dialect::Mpreg,
        })
        .serialize(s)
}

/// A reply's `error` object, as a client of `dialect` reads it: `kind` is
/// always mpreg's string code; `code` is the same string in mpreg's form
/// and the original's number ([`later::code_number`]) in the later
/// client's, where `details` is always present (`null` when there are
/// none).
pub(crate) struct ErrorOut<'a> {
    pub(crate) error: &'a RpcError,
    pub(crate) dialect: Dialect,
}

impl Serialize for ErrorOut<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;

        let e = self.error;
        let mut map = s.serialize_map(None)?;
        match self.dialect {
            Dialect::Mpreg => map.serialize_entry("code", e.code.as_str())?,
            Dialect::Later => map.serialize_entry("code", &later::code_number(e.code))?,
        }
        map.serialize_entry("kind", e.code.as_str())?;
        map.serialize_entry("message", &e.message)?;
        if let Some(command) = &e.command {
            map.serialize_entry("command", command)?;
        }
        match (&e.details, self.dialect) {
            (Some(details), _) => map.serialize_entry("details", details)?,
            (None, Dialect::Later) => map.serialize_entry("details", &Value::Null)?,
            (None, Dialect::Mpreg) => {}
        }
        map.end()
    }
}

/// `reply` as JSON text; should encoding fail, an `internal` error reply
/// to `to` instead.
fn encode_or_error(reply: &impl Serialize, to: &ReplyTo) -> String {
    serde_json::to_string(reply).unwrap_or_else(|e| {
        let fallback = Answer::err(
            to.clone(),
            RpcError::new(
                crate::ErrorCode::Internal,
                format!("reply could not be encoded: {e}"),
            ),
        );
        // A reply of an id, a code and a string always encodes.
        serde_json::to_string(&fallback).unwrap_or_default()
    })
}

/// A reply as a node sends it, in the request's form: [`Reply`]'s wire
/// form, with results that may still be the raw JSON text a peer sent
/// (copied, never parsed).
#[derive(Debug)]
pub(crate) struct Answer {
    /// Whom it answers: the request's id (`null` when it could not be read)
    /// and the form of the reply.
    pub(crate) to: ReplyTo,
    /// Results by command name (sorted by name, or by level then name with
    /// a level report), on success.
    pub(crate) r: Option<Vec<(String, Payload)>>,
    /// The error, on failure.
    pub(crate) error: Option<RpcError>,
    /// The later client's level report and summary, when it asked for
    /// them (see [`later`]).
    pub(crate) report: Option<Box<later::Report>>,
}

impl Answer {
    pub(crate) fn ok(to: ReplyTo, mut results: Vec<(String, Payload)>) -> Self {
        // A map sorted by name, as `Reply` has it.
        results.sort_by(|a, b| a.0.cmp(&b.0));
        // Of two results with one name, the last stays (as in a map).
        results.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                std::mem::swap(later, kept);
            }
            same
        });
        Self {
            to,
            r: Some(results),
            error: None,
            report: None,
        }
    }

    pub(crate) fn err(to: ReplyTo, error: RpcError) -> Self {
        Self {
            to,
            r: None,
            error: Some(error),
            report: None,
        }
    }

    /// The answer to the later client's request for levels or a summary
    /// (`to` is in its form): `results` as [`later::Report::new`] leaves
    /// them, with `report`; `too_large` instead when the reply's text would
    /// be longer than `limit` (a result is written once per level from its
    /// own on, so the reply may be many times the results' size).
    pub(crate) fn reported(
        to: ReplyTo,
        results: Vec<(String, Payload)>,
        report: later::Report,
        limit: usize,
    ) -> Self {
        if let Err(e) = report.fits(&results, limit) {
            return Self::err(to, e);
        }
        Self {
            to,
            r: Some(results),
            error: None,
            report: Some(Box::new(report)),
        }
    }

    /// The reply with every result parsed (for a request made in process).
    pub(crate) fn into_reply(self) -> Reply {
        let u = self.to.u;
        let Some(results) = self.r else {
            return Reply {
                role: ReplyRole,
                u,
                r: None,
                error: self.error,
            };
        };
        let results = match &self.report {
            Some(report) => report.r(&results).to_vec(),
            None => results,
        };
        let mut r = Map::new();
        for (name, payload) in results {
            match payload.into_value() {
                Ok(value) => {
                    r.insert(name, value);
                }
                Err(e) => {
                    let error = RpcError::new(
                        crate::ErrorCode::Internal,
                        format!("result could not be read: {e}"),
                    )
                    .with_command(name);
                    return Reply::err(u, error);
                }
            }
        }
        Reply::ok(u, r)
    }

    /// Encodes the reply (as [`Reply::encode`] does, in the request's form).
    pub(crate) fn encode(&self) -> String {
        encode_or_error(self, &self.to)
    }
}

/// Results as a JSON object, in their order, without copying them.
pub(crate) struct ResultMap<'a>(pub(crate) &'a [(String, Payload)]);

impl Serialize for ResultMap<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;

        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (name, value) in self.0 {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

impl Serialize for Answer {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;

        let results = self.r.as_deref();
        let report = self.report.as_deref();
        let r = match (results, report) {
            (Some(results), Some(report)) => Some(ResultMap(report.r(results))),
            (results, _) => results.map(ResultMap),
        };
        let error = self.error.as_ref().map(|error| ErrorOut {
            error,
            dialect: self.to.dialect,
        });
        let later = self.to.dialect == Dialect::Later;
        let mut reply = s.serialize_struct("Reply", if later { 6 } else { 4 })?;
        reply.serialize_field("role", &ReplyRole)?;
        reply.serialize_field("u", &self.to.u)?;
        reply.serialize_field("r", &r)?;
        reply.serialize_field("error", &error)?;
        if later {
            // The later client's model has these fields: always written.
            match (results, report) {
                (Some(results), Some(report)) => {
                    reply.serialize_field("intermediate_results", &report.intermediate(results))?;
                    reply.serialize_field("execution_summary", &report.summary())?;
                }
                _ => {
                    reply.serialize_field("intermediate_results", &[(); 0])?;
                    reply.serialize_field("execution_summary", &())?;
                }
            }
        }
        reply.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;
    use serde_json::json;

    fn parse(v: Value) -> Result<IncomingRequest, Rejected> {
        parse_request(v.to_string().as_bytes())
    }

    #[test]
    fn both_envelopes_parse_the_same() {
        let cmd = json!({"name":"first","fun":"echo","args":["hi there!"],"locs":[]});
        let nested = parse(json!({"role":"rpc","rpc":{"cmds":[cmd],"u":"01J"}})).expect("nested");
        let flat = parse(json!({"role":"rpc","u":"01J","cmds":[cmd]})).expect("flat");
        assert_eq!(nested.u, json!("01J"));
        assert_eq!(nested.cmds, flat.cmds);
        assert_eq!(nested.timeout, flat.timeout);
        assert_eq!(flat.cmds[0].args, [Payload::from(json!("hi there!"))]);
    }

    #[test]
    fn defaults_for_missing_fields() {
        let r = parse(json!({"u": 7, "cmds":[{"name":"a","fun":"f"}]})).expect("valid");
        let c = &r.cmds[0];
        assert!(c.args.is_empty() && c.kwargs.is_empty() && c.locs.is_empty());
        assert_eq!(r.timeout, None);
        assert!(!r.return_intermediate_results);
    }

    #[test]
    fn options_are_read_in_either_envelope() {
        let r = parse(
            json!({"rpc":{"u":"x","cmds":[],"timeout_ms":250,"return_intermediate_results":true}}),
        )
        .expect("valid");
        assert_eq!(r.timeout, Some(Duration::from_millis(250)));
        assert!(r.return_intermediate_results);
    }

    #[test]
    fn stream_is_read_in_either_envelope_and_off_by_default() {
        let cmd = json!({"name":"a","fun":"echo","args":[1]});
        let flat = parse(json!({"u":"x","cmds":[cmd],"stream":true})).expect("flat");
        assert!(flat.stream);
        let nested = parse(json!({"rpc":{"u":"x","cmds":[cmd],"stream":true}})).expect("nested");
        assert!(nested.stream);
        let plain = parse(json!({"u":"x","cmds":[cmd]})).expect("plain");
        assert!(!plain.stream);
        let null = parse(json!({"u":"x","cmds":[cmd],"stream":null})).expect("null");
        assert!(!null.stream);
        let e = parse(json!({"u":"x","cmds":[cmd],"stream":"yes"})).expect_err("not a bool");
        assert_eq!(e.to.u, json!("x"));
        assert!(e.error.message.contains("`stream`"), "{}", e.error.message);
    }

    #[test]
    fn outgoing_request_mentions_stream_only_when_set() {
        let cmds = [Command::new("a", "echo")];
        let mut out = OutgoingRequest {
            role: "rpc",
            mpreg: MARKER_VERSION,
            u: "1",
            cmds: &cmds,
            timeout_ms: None,
            return_intermediate_results: false,
            stream: false,
        };
        let plain = serde_json::to_value(&out).expect("json");
        assert!(plain.get("stream").is_none(), "{plain}");
        out.stream = true;
        assert_eq!(serde_json::to_value(&out).expect("json")["stream"], true);
    }

    #[test]
    fn progress_message_shape() {
        let m: Value = serde_json::from_str(
            &ProgressMessage::new(&json!("u1"), "first", &json!([1, "x"]).into()).encode(),
        )
        .expect("json");
        assert_eq!(
            m,
            json!({"role":"rpc-progress","u":"u1","name":"first","value":[1,"x"]})
        );
    }

    #[test]
    fn malformed_input_is_rejected_with_id_when_readable() {
        let e = parse_request(b"{not json").expect_err("bad json");
        assert_eq!(e.to.u, Value::Null);
        assert_eq!(e.error.code, crate::ErrorCode::BadRequest);

        let e = parse(json!({"u":"k","cmds":"nope"})).expect_err("cmds not array");
        assert_eq!(e.to.u, json!("k"));

        let e = parse(json!({"u":"k","cmds":[{"name":"a","fun":"f","args":"x"}]}))
            .expect_err("args not array");
        assert!(
            e.error.message.starts_with("command #0"),
            "{}",
            e.error.message
        );

        let e = parse(json!({"cmds":[]})).expect_err("no id");
        assert_eq!(e.to.u, Value::Null);

        let e = parse(json!({"u":"k","cmds":[],"timeout_ms":"soon"})).expect_err("bad timeout");
        assert!(e.error.message.contains("timeout_ms"));
    }

    #[test]
    fn deeply_nested_json_is_an_error_not_a_crash() {
        let deep = "[".repeat(100_000);
        let e = parse_request(deep.as_bytes()).expect_err("too deep");
        assert_eq!(e.error.code, crate::ErrorCode::BadRequest);
    }

    #[test]
    fn commands_must_be_objects() {
        let e = parse(json!({"u": "x", "cmds": [["a", "echo", ["hi"]]]})).expect_err("array form");
        assert!(
            e.error.message.contains("must be a JSON object"),
            "{}",
            e.error.message
        );
    }

    #[test]
    fn ok_replies_encode_as_their_map_would() {
        let cases: [&[(&str, Value)]; 4] = [
            &[],
            &[("a", json!(1))],
            &[("b", json!(1)), ("a", json!([2]))],
            &[("x", json!(1)), ("a", json!(2)), ("x", json!({"k": 3}))],
        ];
        for case in cases {
            let results: Vec<(String, Value)> = case
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect();
            let map: Map<String, Value> = results.iter().cloned().collect();
            let payloads = results
                .into_iter()
                .map(|(k, v)| (k, Payload::Tree(v)))
                .collect();
            assert_eq!(
                Answer::ok(ReplyTo::mpreg(json!(7)), payloads).encode(),
                Reply::ok(json!(7), map).encode()
            );
        }
    }

    #[test]
    fn ids_survive_refusals() {
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        let cases: Vec<(String, Value)> = vec![
            // Nesting past the parser's limit, in either envelope, with
            // `u` before or after the deep value.
            (
                format!(r#"{{"u":"d1","cmds":[{{"name":"a","fun":"echo","args":[{deep}]}}]}}"#),
                json!("d1"),
            ),
            (
                format!(r#"{{"cmds":[{{"name":"a","fun":"echo","args":[{deep}]}}],"u":"d2"}}"#),
                json!("d2"),
            ),
            (
                format!(
                    r#"{{"role":"rpc","rpc":{{"cmds":[{{"name":"a","fun":"f","args":[{deep}]}}],"u":7}}}}"#
                ),
                json!(7),
            ),
            // Not JSON after the id, a number out of range, a lone surrogate.
            (r#"{"u":"g", "cmds": [garbage"#.into(), json!("g")),
            (
                r#"{"u":"r","cmds":[{"name":"a","fun":"f","args":[1e999]}]}"#.into(),
                json!("r"),
            ),
            (
                r#"{"u":"s","cmds":[{"name":"a","fun":"f","args":["\ud800"]}]}"#.into(),
                json!("s"),
            ),
            // Wrong types, escaped key, last of two, spaces.
            (r#"{"u":"t","cmds":[],"stream":"yes"}"#.into(), json!("t")),
            (r#"{"\u0075":"esc","cmds":7}"#.into(), json!("esc")),
            (r#"{"u":"first","u":"last","cmds":7}"#.into(), json!("last")),
            (" { \"u\" : \"sp\" , \"cmds\" : 7 } ".into(), json!("sp")),
            // `rpc` that is an object holds the id; one that is not does not.
            (r#"{"u":"outer","rpc":{"cmds":7}}"#.into(), Value::Null),
            (r#"{"u":"outer","rpc":[1]}"#.into(), json!("outer")),
            // No usable id.
            (r#"{"u":null,"cmds":[]}"#.into(), Value::Null),
            (r#"{"u":{"x":"y"},"cmds":[]}"#.into(), Value::Null),
            (
                r#"{"cmds":[{"u":"inner"}],"x":{"u":"deeper"}}"#.into(),
                Value::Null,
            ),
            (r#"{"u":"\ud800","cmds":[]}"#.into(), Value::Null),
            (r#"{"u":"cut"#.into(), Value::Null),
            (r#"["u","x"]"#.into(), Value::Null),
            (deep.clone(), Value::Null),
        ];
        for (frame, u) in cases {
            let e = parse_request(frame.as_bytes()).expect_err(&frame);
            assert_eq!(e.error.code, crate::ErrorCode::BadRequest, "{frame}");
            assert_eq!(e.to.u, u, "{frame}: {}", e.error.message);
        }
        // Too many commands are refused later, by the plan, with the id
        // the request carries.
        let ok = parse(json!({"u":"m","cmds":[]})).expect("parses");
        assert_eq!(ok.u, json!("m"));
    }

    #[test]
    fn reading_the_id_of_hostile_frames_is_bounded() {
        // A million levels, on a small stack: the scan only counts.
        let worker = std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(|| {
                let depth = 1_000_000;
                let frame = format!(
                    r#"{{"cmds":[{}1{}],"u":"deep"}}"#,
                    "[{\"a\":".repeat(depth),
                    "}]".repeat(depth)
                );
                assert_eq!(request_id(frame.as_bytes()), json!("deep"));
                let open = format!(r#"{{"u":"open","x":{}"#, "[".repeat(depth));
                assert_eq!(request_id(open.as_bytes()), json!("open"));
                assert_eq!(request_id("{".repeat(depth).as_bytes()), Value::Null);
            })
            .expect("spawn");
        worker.join().expect("no stack overflow");
    }

    #[test]
    fn ids_have_a_length_limit() {
        let cmd = json!({"name":"a","fun":"echo"});
        // Quotes included: 254 bytes of text is 256 of JSON.
        let at = "i".repeat(MAX_ID_BYTES - 2);
        let ok = parse(json!({"u": at, "cmds":[cmd]})).expect("at the limit");
        assert_eq!(ok.u, json!(at));
        let over = "i".repeat(MAX_ID_BYTES - 1);
        for frame in [
            json!({"u": over, "cmds":[cmd]}),
            json!({"role":"rpc","rpc":{"u": over, "cmds":[cmd]}}),
        ] {
            let e = parse(frame).expect_err("over the limit");
            assert_eq!(e.error.code, crate::ErrorCode::BadRequest);
            assert_eq!(e.to.u, json!(over), "the reply carries the id");
            assert!(e.error.message.contains("256"), "{}", e.error.message);
            assert_eq!(e.error.details, Some(json!({"limit": MAX_ID_BYTES})));
        }
        // Escapes count as written back: 200 quotes are 400 bytes.
        let quotes = "\"".repeat(200);
        let e = parse(json!({"u": quotes, "cmds":[cmd]})).expect_err("escaped");
        assert_eq!(e.to.u, json!(quotes));
        assert!(id_len(&json!(quotes)) > MAX_ID_BYTES);
        // Numbers are short.
        assert!(parse(json!({"u": u64::MAX, "cmds":[cmd]})).is_ok());
        assert_eq!(id_len(&json!("abc")), 5);
        // A long id on a frame refused for another reason is carried too.
        let e = parse(json!({"u": over, "cmds": 7})).expect_err("cmds");
        assert_eq!(e.to.u, json!(over));
    }

    #[test]
    fn reply_limit_is_the_smaller_of_the_header_and_the_node() {
        assert_eq!(reply_limit(None, 1000), 1000);
        assert_eq!(reply_limit(Some(b"500"), 1000), 500);
        assert_eq!(reply_limit(Some(b" 500 "), 1000), 500);
        assert_eq!(reply_limit(Some(b"5000"), 1000), 1000);
        assert_eq!(reply_limit(Some(b"0"), 1000), 0);
        assert_eq!(reply_limit(Some(b"99999999999999999999999999"), 1000), 1000);
        for bad in [&b""[..], b"-1", b"1e6", b"12kb", b"\xff"] {
            assert_eq!(reply_limit(Some(bad), 1000), 1000, "{bad:?}");
        }
    }

    #[test]
    fn parsed_requests_have_no_budget_until_given_one() {
        let r = parse(json!({"u":"x","cmds":[{"name":"a","fun":"f"}]})).expect("valid");
        assert_eq!(r.reply_budget, usize::MAX);
        let r = IncomingRequest::new(json!(1), Request::new());
        assert_eq!(r.reply_budget, usize::MAX);
    }

    #[test]
    fn reply_shapes_match_the_protocol() {
        let mut r = Map::new();
        r.insert("first".into(), json!("hi"));
        let ok: Value = serde_json::from_str(&Reply::ok(json!("u1"), r).encode()).expect("json");
        assert_eq!(
            ok,
            json!({"role":"rpc-response","u":"u1","r":{"first":"hi"},"error":null})
        );
        let err: Value =
            serde_json::from_str(&Reply::err(json!(null), RpcError::bad_request("x")).encode())
                .expect("json");
        assert_eq!(err["r"], Value::Null);
        assert_eq!(err["error"]["code"], "bad_request");
    }

    /// Whom the reply to `frame` answers, whether it parses or not.
    fn to_of(frame: &str) -> ReplyTo {
        match parse_request(frame.as_bytes()) {
            Ok(request) => request.reply_to(),
            Err(rejected) => rejected.to,
        }
    }

    #[test]
    fn the_envelope_and_the_marker_decide_the_form() {
        let later = |u: Value| ReplyTo {
            u,
            dialect: Dialect::Later,
        };
        let cases: Vec<(&str, ReplyTo)> = vec![
            // Requests that parse.
            (r#"{"role":"rpc","u":"a","cmds":[]}"#, later(json!("a"))),
            (
                r#"{"role":"rpc","mpreg":1,"u":"a","cmds":[]}"#,
                ReplyTo::mpreg(json!("a")),
            ),
            (
                r#"{"u":"a","cmds":[],"mpreg":7}"#,
                ReplyTo::mpreg(json!("a")),
            ),
            (r#"{"u":"a","cmds":[],"mpreg":null}"#, later(json!("a"))),
            (
                r#"{"role":"rpc","rpc":{"u":"a","cmds":[]}}"#,
                ReplyTo::mpreg(json!("a")),
            ),
            // In the first-release envelope a marker anywhere is ignored.
            (
                r#"{"mpreg":"x","rpc":{"u":"a","cmds":[],"mpreg":0}}"#,
                ReplyTo::mpreg(json!("a")),
            ),
            // Frames refused for something else keep their form.
            (r#"{"u":"a","cmds":7}"#, later(json!("a"))),
            (r#"{"u":"a","cmds":[garbage"#, later(json!("a"))),
            (r#"{"role":"peer","u":"a","cmds":[]}"#, later(json!("a"))),
            (
                r#"{"mpreg":1,"u":"a","cmds":[garbage"#,
                ReplyTo::mpreg(json!("a")),
            ),
            (
                r#"{"u":"a","mpreg":1,"mpreg":null,"cmds":7}"#,
                later(json!("a")),
            ),
            (r#"{"u":"a","rpc":[1]}"#, ReplyTo::mpreg(json!("a"))),
            (r#"{"rpc":{"u":"a","cmds":7}}"#, ReplyTo::mpreg(json!("a"))),
            // A marker that is not a positive integer is refused, in
            // mpreg's form.
            (
                r#"{"u":"a","cmds":[],"mpreg":0}"#,
                ReplyTo::mpreg(json!("a")),
            ),
            (
                r#"{"u":"a","cmds":[],"mpreg":"1"}"#,
                ReplyTo::mpreg(json!("a")),
            ),
            (
                r#"{"u":"a","cmds":[],"mpreg":1.5}"#,
                ReplyTo::mpreg(json!("a")),
            ),
            // No id: no request to match, mpreg's form.
            (r#"{"u":null,"cmds":[]}"#, ReplyTo::mpreg(Value::Null)),
            (r#"{"cmds":[garbage"#, ReplyTo::mpreg(Value::Null)),
            ("[1]", ReplyTo::mpreg(Value::Null)),
            ("not json", ReplyTo::mpreg(Value::Null)),
        ];
        for (frame, want) in cases {
            assert_eq!(to_of(frame), want, "{frame}");
        }
        for marker in ["0", "-1", "1.5", "\"1\"", "true", "[1]"] {
            let frame = format!(r#"{{"u":"a","cmds":[],"mpreg":{marker}}}"#);
            let e = parse_request(frame.as_bytes()).expect_err(&frame);
            assert!(e.error.message.contains("`mpreg`"), "{}", e.error.message);
        }
    }

    #[test]
    fn what_a_reply_holds_follows_its_form() {
        let read = |frame: Value| parse(frame).expect("valid").shape();
        let shape = |all, levels, summary| ReplyShape {
            all,
            levels,
            summary,
        };
        let cmds = json!([{"name":"a","fun":"f"}]);
        let both = |mut v: Value| {
            v["return_intermediate_results"] = json!(true);
            v["include_execution_summary"] = json!(true);
            v
        };
        // mpreg's clients: every result, never levels nor a summary.
        let marked = json!({"mpreg":1,"u":"a","cmds":cmds});
        assert_eq!(read(marked.clone()), shape(false, false, false));
        assert_eq!(read(both(marked)), shape(true, false, false));
        let nested = json!({"rpc":{"u":"a","cmds":cmds,"return_intermediate_results":true}});
        assert_eq!(read(nested), shape(true, false, false));
        // The later client's: levels and the summary, each when asked.
        let plain = json!({"u":"a","cmds":cmds});
        assert_eq!(read(plain.clone()), shape(false, false, false));
        assert_eq!(read(both(plain.clone())), shape(true, true, true));
        let mut summary = plain.clone();
        summary["include_execution_summary"] = json!(true);
        assert_eq!(read(summary), shape(false, false, true));
        assert!(shape(false, false, true).timed());
        assert!(!shape(true, false, false).timed());
        let mut bad = plain;
        bad["include_execution_summary"] = json!("yes");
        let e = parse(bad).expect_err("not a bool");
        assert!(e.error.message.contains("include_execution_summary"));
    }

    #[test]
    fn errors_in_both_forms() {
        let error = RpcError::new(ErrorCode::UnknownFunction, "no function 'f' on any node")
            .with_command("x");
        let mpreg: Value =
            serde_json::from_str(&Answer::err(ReplyTo::mpreg(json!("u1")), error.clone()).encode())
                .expect("json");
        assert_eq!(
            mpreg,
            json!({"role":"rpc-response","u":"u1","r":null,"error":{
                "code":"unknown_function","kind":"unknown_function",
                "message":"no function 'f' on any node","command":"x"}})
        );
        let to = ReplyTo {
            u: json!("u1"),
            dialect: Dialect::Later,
        };
        let later: Value =
            serde_json::from_str(&Answer::err(to.clone(), error).encode()).expect("json");
        assert_eq!(
            later,
            json!({"role":"rpc-response","u":"u1","r":null,"error":{
                "code":1001,"kind":"unknown_function",
                "message":"no function 'f' on any node","command":"x","details":null},
                "intermediate_results":[],"execution_summary":null})
        );
        // Details are kept as they are.
        let cycle = RpcError::new(ErrorCode::Cycle, "a cycle").with_details(json!({"cycle":["a"]}));
        let later: Value =
            serde_json::from_str(&Answer::err(to.clone(), cycle).encode()).expect("json");
        assert_eq!(later["error"]["code"], 1003);
        assert_eq!(later["error"]["details"], json!({"cycle":["a"]}));
        // Successes too carry the later client's fields.
        let ok = Answer::ok(to, vec![("a".into(), Payload::Tree(json!(1)))]);
        let ok: Value = serde_json::from_str(&ok.encode()).expect("json");
        assert_eq!(
            ok,
            json!({"role":"rpc-response","u":"u1","r":{"a":1},"error":null,
                "intermediate_results":[],"execution_summary":null})
        );
        // Every error reads back, whatever its form.
        for code in ErrorCode::ALL {
            for dialect in [Dialect::Mpreg, Dialect::Later] {
                let error = RpcError::new(code, "m");
                let out = serde_json::to_string(&ErrorOut {
                    error: &error,
                    dialect,
                })
                .expect("json");
                let back: RpcError = serde_json::from_str(&out).expect("reads");
                assert_eq!(back.code, code, "{out}");
            }
        }
    }

    #[test]
    fn a_level_report_answers_with_the_last_level() {
        use std::time::{Duration, UNIX_EPOCH};

        let to = ReplyTo {
            u: json!("lv"),
            dialect: Dialect::Later,
        };
        let mut results = vec![
            ("first".to_owned(), Payload::Tree(json!("hi"))),
            ("second".to_owned(), Payload::Tree(json!("hi"))),
        ];
        let timing = later::Timing {
            depths: vec![0, 1],
            done: vec![Duration::from_millis(1), Duration::from_millis(2)],
            total: Duration::from_millis(2),
            started: UNIX_EPOCH,
        };
        let report = later::Report::new(&to.u, &mut results, &timing, true, false);
        let answer = Answer::reported(to.clone(), results.clone(), report.clone(), usize::MAX);
        let reply: Value = serde_json::from_str(&answer.encode()).expect("json");
        assert_eq!(reply["r"], json!({"second": "hi"}));
        assert_eq!(reply["error"], Value::Null);
        assert_eq!(
            reply["intermediate_results"].as_array().map(Vec::len),
            Some(2)
        );
        assert_eq!(reply["execution_summary"], Value::Null);
        // In process, the same `r`.
        let in_process = Answer::reported(to.clone(), results.clone(), report.clone(), usize::MAX);
        let r = in_process.into_reply().r.expect("results");
        assert_eq!(Value::Object(r), json!({"second": "hi"}));
        // Over the limit: `too_large`, in the later form.
        let small = Answer::reported(to, results, report, 100);
        let reply: Value = serde_json::from_str(&small.encode()).expect("json");
        assert_eq!(reply["error"]["code"], 1003);
        assert_eq!(reply["error"]["kind"], "too_large");
        assert_eq!(reply["error"]["details"]["limit"], 100);
        assert_eq!(reply["intermediate_results"], json!([]));
    }
}
