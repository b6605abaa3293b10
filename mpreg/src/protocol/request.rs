//! Requests, from a client to a node: the public [`Command`] and
//! [`Request`], the flat envelope the Rust client writes
//! ([`OutgoingRequest`]), a request as a node reads it ([`IncomingRequest`],
//! its commands as [`ParsedCommand`]s), the parsing of a client frame in
//! either envelope ([`parse_request`]; its one-pass reading is in
//! `fast.rs`), and the limits a request meets: the length of its id
//! ([`MAX_ID_BYTES`]), the largest reply its client takes
//! ([`REPLY_LIMIT_HEADER`], [`reply_limit`]), and the reason of the close of
//! an idle connection ([`IDLE_CLOSE_REASON`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::fast;
use super::reply::{Dialect, MARKER_FIELD, ReplyShape, ReplyTo};
use super::scan::reply_to;
use crate::error::RpcError;
use crate::payload::Payload;

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
    /// Always [`MARKER_VERSION`](super::MARKER_VERSION).
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
/// its raw JSON text (checked to parse, see
/// [`checked_raw`](crate::payload::checked_raw)), so a node that forwards a
/// large argument never builds its tree. Anything unusual
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
pub(super) fn parse_request_slowly(bytes: &[u8]) -> Result<IncomingRequest, Rejected> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::reply::MARKER_VERSION;
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
}
