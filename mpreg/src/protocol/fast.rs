//! The one-pass reading of a well-formed client frame.
//!
//! It accepts exactly what the plain reading (through a [`Value`] tree)
//! accepts, and reads it the same; whatever it is unsure of (any error, a
//! duplicate field, nesting past [`MAX_ARG_DEPTH`]) makes it give up, and
//! the plain reading decides and words the error.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;

use super::{Dialect, IncomingRequest, MARKER_FIELD, ParsedCommand};
use crate::payload::{Payload, checked_raw};

/// The deepest nesting of an argument (or an unknown field) read here.
/// Below the 128 levels a whole frame may have, minus its envelope, so that
/// whatever passes here passes the plain reading too.
const MAX_ARG_DEPTH: usize = 100;

/// Reads a frame, or `None` when the plain reading must decide.
pub(super) fn parse(bytes: &[u8]) -> Option<IncomingRequest> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let outer = EnvelopeSeed { nested: false }.deserialize(&mut de).ok()?;
    de.end().ok()?;
    if let Some(role) = &outer.role
        && role != "rpc"
    {
        return None;
    }
    // A marker the plain reading refuses: it words the error.
    let dialect = Dialect::of_envelope(outer.rpc.is_some(), outer.mpreg.as_ref()).ok()?;
    let body = match outer.rpc {
        Some(inner) => *inner,
        None => outer,
    };
    let u = match body.u {
        Some(u @ (Value::String(_) | Value::Number(_))) => u,
        _ => return None,
    };
    let timeout = match body.timeout_ms {
        None | Some(Value::Null) => None,
        Some(v) => Some(Duration::from_millis(v.as_u64()?)),
    };
    Some(IncomingRequest {
        u,
        cmds: body.cmds?,
        timeout,
        return_intermediate_results: flag(body.return_intermediate_results)?,
        stream: flag(body.stream)?,
        include_execution_summary: flag(body.include_execution_summary)?,
        dialect,
        reply_budget: usize::MAX,
    })
}

/// An optional boolean field (`null` is absent).
fn flag(value: Option<Value>) -> Option<bool> {
    match value {
        None | Some(Value::Null) => Some(false),
        Some(Value::Bool(b)) => Some(b),
        Some(_) => None,
    }
}

/// The fields of either envelope (`rpc` holds the nested one).
#[derive(Default)]
struct Envelope {
    role: Option<Value>,
    rpc: Option<Box<Envelope>>,
    u: Option<Value>,
    cmds: Option<Vec<ParsedCommand>>,
    timeout_ms: Option<Value>,
    return_intermediate_results: Option<Value>,
    stream: Option<Value>,
    include_execution_summary: Option<Value>,
    /// The marker ([`MARKER_FIELD`]); read at the top level only.
    mpreg: Option<Value>,
}

/// A field name of an envelope or a command (without allocating it).
enum Field {
    Role,
    Rpc,
    U,
    Cmds,
    TimeoutMs,
    ReturnIntermediateResults,
    Stream,
    IncludeExecutionSummary,
    Marker,
    Name,
    Fun,
    Args,
    Kwargs,
    Locs,
    Other,
}

impl<'de> de::Deserialize<'de> for Field {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_identifier(FieldVisitor)
    }
}

struct FieldVisitor;

impl Visitor<'_> for FieldVisitor {
    type Value = Field;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E>(self, name: &str) -> Result<Field, E> {
        Ok(match name {
            "role" => Field::Role,
            "rpc" => Field::Rpc,
            "u" => Field::U,
            "cmds" => Field::Cmds,
            "timeout_ms" => Field::TimeoutMs,
            "return_intermediate_results" => Field::ReturnIntermediateResults,
            "stream" => Field::Stream,
            "include_execution_summary" => Field::IncludeExecutionSummary,
            MARKER_FIELD => Field::Marker,
            "name" => Field::Name,
            "fun" => Field::Fun,
            "args" => Field::Args,
            "kwargs" => Field::Kwargs,
            "locs" => Field::Locs,
            _ => Field::Other,
        })
    }
}

/// Gives up on a field seen twice (the plain reading keeps the last).
fn once<T, E: de::Error>(slot: &mut Option<T>, value: T) -> Result<(), E> {
    if slot.is_some() {
        return Err(E::custom("duplicate field"));
    }
    *slot = Some(value);
    Ok(())
}

/// Skips a value the reading does not use, checking it as the plain
/// reading would.
fn skip<'de, A: MapAccess<'de>>(map: &mut A) -> Result<(), A::Error> {
    let raw: Box<RawValue> = map.next_value()?;
    if checked_raw(&raw, MAX_ARG_DEPTH) {
        Ok(())
    } else {
        Err(de::Error::custom("value needs the plain reading"))
    }
}

struct EnvelopeSeed {
    nested: bool,
}

impl<'de> DeserializeSeed<'de> for EnvelopeSeed {
    type Value = Envelope;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Envelope, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EnvelopeSeed {
    type Value = Envelope;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a request object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Envelope, A::Error> {
        let mut e = Envelope::default();
        while let Some(key) = map.next_key::<Field>()? {
            match key {
                Field::Role => once(&mut e.role, map.next_value()?)?,
                Field::Rpc if !self.nested => {
                    let inner = map.next_value_seed(EnvelopeSeed { nested: true })?;
                    once(&mut e.rpc, Box::new(inner))?;
                }
                Field::U => once(&mut e.u, map.next_value()?)?,
                Field::Cmds => once(&mut e.cmds, map.next_value_seed(CommandsSeed)?)?,
                Field::TimeoutMs => once(&mut e.timeout_ms, map.next_value()?)?,
                Field::ReturnIntermediateResults => {
                    once(&mut e.return_intermediate_results, map.next_value()?)?
                }
                Field::Stream => once(&mut e.stream, map.next_value()?)?,
                Field::IncludeExecutionSummary => {
                    once(&mut e.include_execution_summary, map.next_value()?)?
                }
                Field::Marker => once(&mut e.mpreg, map.next_value()?)?,
                _ => skip(&mut map)?,
            }
        }
        Ok(e)
    }
}

struct CommandsSeed;

impl<'de> DeserializeSeed<'de> for CommandsSeed {
    type Value = Vec<ParsedCommand>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for CommandsSeed {
    type Value = Vec<ParsedCommand>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of commands")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut cmds = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(c) = seq.next_element_seed(CommandSeed)? {
            cmds.push(c);
        }
        Ok(cmds)
    }
}

struct CommandSeed;

impl<'de> DeserializeSeed<'de> for CommandSeed {
    type Value = ParsedCommand;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<ParsedCommand, D::Error> {
        // Objects only (a derived struct would also read an array).
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for CommandSeed {
    type Value = ParsedCommand;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a command object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ParsedCommand, A::Error> {
        let mut name: Option<String> = None;
        let mut fun: Option<String> = None;
        let mut args: Option<Vec<Payload>> = None;
        let mut kwargs: Option<Vec<(String, Payload)>> = None;
        let mut locs: Option<Vec<String>> = None;
        while let Some(key) = map.next_key::<Field>()? {
            match key {
                Field::Name => once(&mut name, map.next_value()?)?,
                Field::Fun => once(&mut fun, map.next_value()?)?,
                Field::Args => {
                    let raw: Vec<Box<RawValue>> = map.next_value()?;
                    once(&mut args, checked(raw)?)?;
                }
                Field::Kwargs => {
                    // Last wins and name order, as a `Map` has them.
                    let raw: BTreeMap<String, Box<RawValue>> = map.next_value()?;
                    let (names, values): (Vec<String>, Vec<Box<RawValue>>) =
                        raw.into_iter().unzip();
                    let named = names.into_iter().zip(checked(values)?).collect();
                    once(&mut kwargs, named)?;
                }
                Field::Locs => once(&mut locs, map.next_value()?)?,
                _ => skip(&mut map)?,
            }
        }
        Ok(ParsedCommand {
            name: name.ok_or_else(|| de::Error::missing_field("name"))?,
            fun: fun.ok_or_else(|| de::Error::missing_field("fun"))?,
            args: args.unwrap_or_default(),
            kwargs: kwargs.unwrap_or_default(),
            locs: locs.unwrap_or_default(),
        })
    }
}

/// Raw arguments, each checked to read as a `Value` would.
fn checked<E: de::Error>(raw: Vec<Box<RawValue>>) -> Result<Vec<Payload>, E> {
    raw.into_iter()
        .map(|r| {
            if checked_raw(&r, MAX_ARG_DEPTH) {
                Ok(Payload::Raw(r))
            } else {
                Err(E::custom("argument needs the plain reading"))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::request::parse_request_slowly;
    use super::*;

    /// Every frame here reads the same both ways, or the fast reading gives
    /// up and the plain one decides.
    #[test]
    fn agrees_with_the_plain_reading() {
        let frames = [
            r#"{"role":"rpc","u":"1","cmds":[{"name":"a","fun":"echo","args":[[1,2,{"x":"y"}]],"locs":["b"]}]}"#,
            r#"{"role":"rpc","rpc":{"u":7,"cmds":[{"name":"a","fun":"f","kwargs":{"z":1,"b":"a"}}]}}"#,
            r#"{"u":"x","cmds":[],"timeout_ms":250,"return_intermediate_results":true,"stream":null}"#,
            r#"{"u":"x","cmds":[{"name":"a","fun":"f","extra":{"deep":[1]}}],"other":2}"#,
            r#"{"u":"x","cmds":[{"name":"a","fun":"f","args":["\u00e9"]}]}"#,
            r#"{"role":"rpc","mpreg":1,"u":"x","cmds":[],"include_execution_summary":true}"#,
            r#"{"u":"x","cmds":[{"name":"a","fun":"f","mpreg":1}],"mpreg":null}"#,
            r#"{"mpreg":"ignored","rpc":{"u":"x","cmds":[],"mpreg":0,"include_execution_summary":false}}"#,
        ];
        for frame in frames {
            let fast = parse(frame.as_bytes()).expect(frame);
            let slow = parse_request_slowly(frame.as_bytes()).expect(frame);
            assert_eq!(fast, slow, "{frame}");
        }
    }

    #[test]
    fn gives_up_on_what_it_cannot_decide() {
        let deep = format!("{}1{}", "[".repeat(120), "]".repeat(120));
        let frames = [
            "{not json".to_owned(),
            r#"{"role":"other","u":"1","cmds":[]}"#.to_owned(),
            r#"{"role":null,"u":"1","cmds":[]}"#.to_owned(),
            r#"{"rpc":null,"u":"1","cmds":[]}"#.to_owned(),
            r#"{"u":null,"cmds":[]}"#.to_owned(),
            r#"{"u":"1","u":"2","cmds":[]}"#.to_owned(),
            r#"{"u":"1","cmds":[["a","echo",["hi"]]]}"#.to_owned(),
            r#"{"u":"1","cmds":[{"name":"a","fun":"f","args":[1e999]}]}"#.to_owned(),
            r#"{"u":"1","cmds":[{"name":"a","fun":"f","args":["\ud800"]}]}"#.to_owned(),
            r#"{"u":"1","cmds":[{"name":"a","fun":"f","name":"b"}]}"#.to_owned(),
            r#"{"u":"1","cmds":[],"timeout_ms":-1}"#.to_owned(),
            r#"{"u":"1","cmds":[],"stream":"yes"}"#.to_owned(),
            r#"{"u":"1","cmds":[],"include_execution_summary":1}"#.to_owned(),
            r#"{"u":"1","cmds":[],"mpreg":0}"#.to_owned(),
            r#"{"u":"1","cmds":[],"mpreg":1,"mpreg":1}"#.to_owned(),
            format!(r#"{{"u":"1","cmds":[{{"name":"a","fun":"f","args":[{deep}]}}]}}"#),
            format!(r#"{{"u":"1","cmds":[],"x":{deep}}}"#),
        ];
        for frame in &frames {
            assert!(parse(frame.as_bytes()).is_none(), "{frame}");
        }
    }

    #[test]
    fn keeps_arguments_as_raw_text() {
        let frame = r#"{"u":"1","cmds":[{"name":"a","fun":"f","args":[ [1, 2] ]}]}"#;
        let read = parse(frame.as_bytes()).expect("fast");
        match &read.cmds[0].args[0] {
            Payload::Raw(raw) => assert_eq!(raw.get(), "[1, 2]"),
            other => panic!("expected raw text, got {other:?}"),
        }
    }
}
