//! Whom the reply to a frame that could not be read as a request answers
//! ([`reply_to`]): its request id, when it can be read, and the form of the
//! reply, found by a scan of the frame's bytes that builds no tree.

use serde_json::Value;

use super::reply::{Dialect, MARKER_FIELD, ReplyTo};

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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
}
