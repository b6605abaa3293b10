//! Replies, from a node to a client: their form (the request's
//! [`Dialect`], chosen by mpreg's marker, and [`ReplyShape`]), whom they
//! answer ([`ReplyTo`]), a reply as a client reads it ([`Reply`]; a frame
//! from a node is first read as an [`Incoming`], which may also be a
//! progress message) and as a node sends it ([`Answer`], with results that
//! may still be raw JSON text), the `error` object in either form
//! ([`ErrorOut`]), and results as a JSON object ([`ResultMap`]).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::later;
use crate::error::RpcError;
use crate::payload::Payload;

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

/// The deepest nesting a result may have: what every JSON parser of the
/// protocol accepts (serde_json's default limit), so every reply can be read.
pub(crate) const MAX_RESULT_DEPTH: usize = 128;

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

/// A message from a node, as the client reads it: a reply, or the progress
/// of a streaming request.
#[derive(Deserialize)]
pub(crate) struct Incoming {
    #[serde(default)]
    pub(crate) role: Role,
    pub(crate) u: Value,
    #[serde(default)]
    pub(crate) r: Option<Map<String, Value>>,
    #[serde(default)]
    pub(crate) error: Option<RpcError>,
    /// A progress message's command name.
    #[serde(default)]
    pub(crate) name: Option<String>,
    /// A progress message's value (`null` reads as `None`).
    #[serde(default)]
    pub(crate) value: Option<Value>,
}

/// The `role` of a message a client reads ([`Incoming`]).
#[derive(Deserialize, Default)]
pub(crate) enum Role {
    #[serde(rename = "rpc-progress")]
    Progress,
    /// `rpc-response`, or none (the original reply shape).
    #[default]
    #[serde(other)]
    Reply,
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
