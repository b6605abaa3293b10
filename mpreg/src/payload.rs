//! A JSON value as the executor carries it: either a parsed tree or the raw
//! JSON text it arrived as.
//!
//! A node that only forwards a value (a client's argument sent on to a peer,
//! a peer's result sent back to the client) never needs its tree: it keeps
//! the text and copies it into the next message. A value is parsed only
//! where something reads it (a handler on this node).
//!
//! A result is [`Payload::Held`]: counted against its request's
//! [`ResultBudget`] from when it is produced until its last reader lets it
//! go, and shared by its readers (a clone is a reference, never a copy of
//! the value).

use std::borrow::Cow;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::budget::ResultBudget;
use crate::error::RpcError;

/// One value: a tree, or JSON text already checked to be valid.
#[derive(Debug, Clone)]
pub(crate) enum Payload {
    /// A parsed value.
    Tree(Value),
    /// The value's JSON text, as received: valid JSON that parses into a
    /// [`Value`] (checked on receipt, see [`checked_raw`]).
    Raw(Box<RawValue>),
    /// A result held against its request's budget, shared by its readers.
    Held(Arc<Held>),
}

/// A result counted against a [`ResultBudget`] while it lives: the bytes
/// are given back when the last reader drops it (or takes its value).
#[derive(Debug)]
pub(crate) struct Held {
    /// A tree or raw text, never another `Held`.
    payload: Payload,
    /// Its size as compact JSON text.
    bytes: usize,
    budget: Arc<ResultBudget>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

impl Payload {
    /// `payload` (a tree or raw text, `bytes` long as JSON) as a result
    /// held against `budget`: `too_large` when the request would hold more
    /// than its budget, `overloaded` when the node would.
    pub(crate) fn held(
        payload: Payload,
        bytes: usize,
        budget: &Arc<ResultBudget>,
    ) -> Result<Payload, RpcError> {
        match budget.hold(bytes) {
            Ok(()) => Ok(Payload::Held(Arc::new(Held {
                payload: payload.unheld(),
                bytes,
                budget: budget.clone(),
            }))),
            Err(over) => Err(over.error(bytes)),
        }
    }

    /// The tree or raw text itself (a held value's, copied when others
    /// still read it).
    fn unheld(self) -> Payload {
        match self {
            Payload::Held(held) => match Arc::try_unwrap(held) {
                Ok(mut held) => std::mem::replace(&mut held.payload, Payload::Tree(Value::Null)),
                Err(shared) => shared.payload.clone(),
            },
            other => other,
        }
    }

    /// The value's length as JSON text: known for raw text and held
    /// results, measured for a tree (`usize::MAX` for one nested too deep
    /// to be sent).
    pub(crate) fn json_len(&self) -> usize {
        match self {
            Payload::Tree(v) => {
                encoded_len(v, crate::protocol::MAX_RESULT_DEPTH).unwrap_or(usize::MAX)
            }
            Payload::Raw(raw) => raw.get().len(),
            Payload::Held(held) => held.bytes,
        }
    }

    /// The tree or raw text, borrowed.
    fn inner(&self) -> &Payload {
        match self {
            Payload::Held(held) => &held.payload,
            other => other,
        }
    }

    /// The value as a tree (parsing the text of a raw value; copying a
    /// held value that other readers still share).
    pub(crate) fn into_value(self) -> Result<Value, serde_json::Error> {
        match self.unheld() {
            Payload::Tree(v) => Ok(v),
            Payload::Raw(raw) => serde_json::from_str(raw.get()),
            Payload::Held(_) => unreachable!("unheld never returns Held"),
        }
    }

    /// The value as a tree, borrowed when it is one.
    pub(crate) fn to_value(&self) -> Result<Cow<'_, Value>, serde_json::Error> {
        match self.inner() {
            Payload::Tree(v) => Ok(Cow::Borrowed(v)),
            Payload::Raw(raw) => serde_json::from_str(raw.get()).map(Cow::Owned),
            Payload::Held(_) => unreachable!("a Held never holds a Held"),
        }
    }

    /// The string this value is, if it is a string.
    pub(crate) fn as_string(&self) -> Option<Cow<'_, str>> {
        match self.inner() {
            Payload::Tree(Value::String(s)) => Some(Cow::Borrowed(s.as_str())),
            Payload::Raw(raw) => {
                let text = raw.get();
                if !text.starts_with('"') {
                    return None;
                }
                serde_json::from_str::<String>(text).ok().map(Cow::Owned)
            }
            _ => None,
        }
    }
}

impl From<Value> for Payload {
    fn from(value: Value) -> Self {
        Payload::Tree(value)
    }
}

/// Equal when the values are (a raw value is compared by its tree).
impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        match (self.inner(), other.inner()) {
            (Payload::Tree(a), Payload::Tree(b)) => a == b,
            (Payload::Raw(a), Payload::Raw(b)) if a.get() == b.get() => true,
            _ => match (self.to_value(), other.to_value()) {
                (Ok(a), Ok(b)) => a == b,
                _ => false,
            },
        }
    }
}

impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Payload::Tree(v) => v.serialize(s),
            Payload::Raw(raw) => raw.serialize(s),
            Payload::Held(held) => held.payload.serialize(s),
        }
    }
}

/// Reads a tree: what a node receives to run here.
impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Value::deserialize(d).map(Payload::Tree)
    }
}

/// Reads optional values as raw text (`Done` values, which the receiver
/// usually only forwards). Valid only with `serde_json`'s text
/// deserializers.
pub(crate) fn raw_payloads<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<Payload>>, D::Error> {
    let raw: Option<Vec<Box<RawValue>>> = Option::deserialize(d)?;
    Ok(raw.map(|values| values.into_iter().map(Payload::Raw).collect()))
}

/// The length of `value` written as compact JSON (as `serde_json` writes
/// it), or `None` when it nests deeper than `max_depth` arrays and
/// objects. One pass, iterative (it must not overflow the stack on the
/// values it rejects); a scalar costs no allocation.
pub(crate) fn encoded_len(value: &Value, max_depth: usize) -> Option<usize> {
    if !matches!(value, Value::Array(_) | Value::Object(_)) {
        return Some(scalar_len(value));
    }
    let mut total = 0usize;
    let mut stack: Vec<(&Value, usize)> = vec![(value, 0)];
    while let Some((v, depth)) = stack.pop() {
        let len = match v {
            Value::Array(items) => {
                if depth >= max_depth {
                    return None;
                }
                stack.extend(items.iter().map(|c| (c, depth + 1)));
                // Brackets and commas.
                2 + items.len().saturating_sub(1)
            }
            Value::Object(map) => {
                if depth >= max_depth {
                    return None;
                }
                stack.extend(map.values().map(|c| (c, depth + 1)));
                // Braces, commas, and each key with its colon.
                2 + map.len().saturating_sub(1)
                    + map.keys().map(|k| string_len(k) + 1).sum::<usize>()
            }
            scalar => scalar_len(scalar),
        };
        total = total.saturating_add(len);
    }
    Some(total)
}

fn scalar_len(value: &Value) -> usize {
    match value {
        Value::Null | Value::Bool(true) => 4,
        Value::Bool(false) => 5,
        Value::String(s) => string_len(s),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                return digits(u);
            }
            if let Some(i) = n.as_i64() {
                return 1 + digits(i.unsigned_abs());
            }
            // A float: `Number`'s `Display` writes what serialization
            // writes.
            let mut count = Counter(0);
            let _ = std::fmt::Write::write_fmt(&mut count, format_args!("{n}"));
            count.0
        }
        Value::Array(_) | Value::Object(_) => 0,
    }
}

/// The number of decimal digits of `n`.
fn digits(n: u64) -> usize {
    n.checked_ilog10().map_or(1, |d| d as usize + 1)
}

/// A JSON string's length with its quotes and escapes.
pub(crate) fn string_len(s: &str) -> usize {
    let escapes: usize = s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 1,
            0..=0x1f => 5,
            _ => 0,
        })
        .sum();
    s.len() + 2 + escapes
}

/// Counts what is written to it.
struct Counter(usize);

impl std::fmt::Write for Counter {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0 += s.len();
        Ok(())
    }
}

/// Whether `raw` surely parses into a [`Value`] nesting at most
/// `max_depth` arrays and objects. `raw` is valid JSON already (its
/// reading checked the syntax); what a [`Value`] parse also rejects is a
/// number out of `f64` range, a lone surrogate escape and nesting past its
/// limit. This scan answers `false` for anything that might be one of
/// those: about 190 digits in a row or more, an exponent of three digits or
/// more, any `\uD...` escape, nesting past `max_depth`. A `false` is thus
/// "maybe not", never a verdict. One pass, no recursion; outside strings it
/// looks at 8 bytes at a time.
pub(crate) fn checked_raw(raw: &RawValue, max_depth: usize) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Nonzero when a byte of `v` is zero; its lowest set bit marks the
    // first such byte.
    let zero_byte = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    // 24 words of digits in a row hold 192 digits: an integer part that
    // long, or an exponent of three digits, could be out of `f64` range;
    // less cannot (10^200 * 10^99 is in range).
    const MAX_DIGIT_WORDS: usize = 24;
    let bytes = raw.get().as_bytes();
    let mut depth = 0usize;
    let mut digit_words = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        if let Some(word) = bytes
            .get(i..i + 8)
            .and_then(|w| <[u8; 8]>::try_from(w).ok())
        {
            let x = u64::from_le_bytes(word);
            // Outside strings every byte is ASCII. `| 0x20` folds `[` into
            // `{`, `]` into `}` and `E` into `e` (and nothing else valid
            // here into any of those or `"`).
            let y = x | (0x20 * ONES);
            let special = zero_byte(y ^ (b'"' as u64 * ONES))
                | zero_byte(y ^ (b'{' as u64 * ONES))
                | zero_byte(y ^ (b'}' as u64 * ONES))
                | zero_byte(y ^ (b'e' as u64 * ONES));
            if special == 0 {
                let digits =
                    (x.wrapping_add(0x46 * ONES) | !((x | HIGH).wrapping_sub(0x30 * ONES))) & HIGH
                        == 0;
                if digits {
                    digit_words += 1;
                    if digit_words >= MAX_DIGIT_WORDS {
                        return false;
                    }
                } else {
                    digit_words = 0;
                }
                i += 8;
                continue;
            }
            // Up to the first byte that matters (a digit run ends there).
            i += special.trailing_zeros() as usize / 8;
        }
        digit_words = 0;
        match bytes[i] {
            b'e' | b'E' if i > 0 && bytes[i - 1].is_ascii_digit() => {
                // An exponent (a letter after a digit is nothing else).
                let start = i + 1 + usize::from(matches!(bytes.get(i + 1), Some(b'+' | b'-')));
                let len = bytes[start.min(bytes.len())..]
                    .iter()
                    .take_while(|b| b.is_ascii_digit())
                    .count();
                if len >= 3 {
                    return false;
                }
            }
            b'"' => {
                i += 1;
                loop {
                    let Some(k) = bytes[i.min(bytes.len())..]
                        .iter()
                        .position(|&b| b == b'"' || b == b'\\')
                    else {
                        return false;
                    };
                    i += k;
                    if bytes[i] == b'"' {
                        break;
                    }
                    if bytes.get(i + 1) == Some(&b'u')
                        && matches!(bytes.get(i + 2), Some(b'd' | b'D'))
                    {
                        return false;
                    }
                    i += 2;
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            // A digit run in the last bytes: fewer than 8 of them.
            _ => {}
        }
        i += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn raw(text: &str) -> Box<RawValue> {
        serde_json::from_str(text).expect("raw")
    }

    #[test]
    fn checked_raw_accepts_what_a_value_parse_accepts() {
        for ok in [
            "1",
            "-2.5e10",
            "\"a\\u00e9\"",
            "[1,{\"a\":[null,true]}]",
            "{}",
        ] {
            assert!(checked_raw(&raw(ok), 8), "{ok}");
            assert!(serde_json::from_str::<Value>(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn checked_raw_rejects_what_a_value_parse_rejects() {
        // Accepted as raw text, but not as a `Value`.
        for bad in ["1e999", "[-1e400]", "\"\\ud800\"", "{\"k\":\"\\udc00x\"}"] {
            assert!(serde_json::from_str::<Value>(bad).is_err(), "{bad}");
            assert!(!checked_raw(&raw(bad), 8), "{bad}");
        }
    }

    #[test]
    fn checked_raw_is_cautious_with_numbers_and_escapes() {
        // Parse fine, but the scan cannot tell cheaply: it says "maybe not".
        let long = "9".repeat(250);
        for unsure in [long.as_str(), "1e100", "\"\\ud83d\\ude00\""] {
            assert!(serde_json::from_str::<Value>(unsure).is_ok(), "{unsure}");
            assert!(!checked_raw(&raw(unsure), 8), "{unsure}");
        }
        // Letters after digits only in exponents; `true`/`false` are fine.
        assert!(checked_raw(
            &raw("[true,false,1e99,2E-5,\"e123\",\"\\\"\"]"),
            8
        ));
        // Control characters never reach the scan: reading raw text rejects them.
        assert!(serde_json::from_str::<Box<RawValue>>("\"a\u{1}\"").is_err());
    }

    #[test]
    fn checked_raw_counts_digits_across_chunks() {
        // Runs of digits around the 8-byte steps of the scan: up to 190 in
        // a row always pass, 199 (24 whole words at any offset) never do.
        for at in 0..9 {
            let text = format!("[{}{},1]", " ".repeat(at), "7".repeat(190));
            assert!(checked_raw(&raw(&text), 8), "{at}");
            let text = format!("[{}{},1]", " ".repeat(at), "7".repeat(199));
            assert!(!checked_raw(&raw(&text), 8), "{at}");
        }
        // Many short numbers pass; brackets and exponents past a chunk count.
        let many = format!("[{}1]", "1234567890,".repeat(1000));
        assert!(checked_raw(&raw(&many), 1));
        let nested = format!("[{}[1]]", "1,".repeat(40));
        assert!(!checked_raw(&raw(&nested), 1));
        let exp = format!("[{}1e999]", "1,".repeat(40));
        assert!(!checked_raw(&raw(&exp), 8));
    }

    #[test]
    fn checked_raw_limits_nesting() {
        assert!(checked_raw(&raw("[[1]]"), 2));
        assert!(!checked_raw(&raw("[[1]]"), 1));
        assert!(!checked_raw(&raw("{\"a\":{\"b\":1}}"), 1));
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(!checked_raw(&raw(&deep), 100));
    }

    #[test]
    fn encoded_len_is_the_length_serde_json_writes() {
        let values = [
            json!(null),
            json!(true),
            json!(false),
            json!(0),
            json!(-17),
            json!(u64::MAX),
            json!(i64::MIN),
            json!(9),
            json!(10),
            json!(-10),
            json!(1.5),
            json!(-2.5e-300),
            json!(1e300),
            json!(0.1),
            json!(""),
            json!("hi \"there\"\\ \n\t\u{1}\u{7f} é 漢"),
            json!([]),
            json!({}),
            json!([1, [2, [3, {"a": "b", "c\"d": [null]}]], "x"]),
            json!({"k": {"k": {"k": [1, 2, 3]}}, "z": 1.25}),
        ];
        for v in values {
            let written = serde_json::to_string(&v).expect("encode").len();
            assert_eq!(encoded_len(&v, 128), Some(written), "{v}");
        }
    }

    #[test]
    fn encoded_len_limits_nesting_without_recursing() {
        assert_eq!(encoded_len(&json!([[1]]), 2), Some(5));
        assert_eq!(encoded_len(&json!([[1]]), 1), None);
        assert_eq!(encoded_len(&json!({"a": {"b": 1}}), 1), None);
        let mut deep = json!(1);
        for _ in 0..100_000 {
            deep = Value::Array(vec![deep]);
        }
        assert_eq!(encoded_len(&deep, 128), None);
        // Dropped without recursing (a plain drop would overflow the stack).
        let mut stack = vec![deep];
        while let Some(mut v) = stack.pop() {
            if let Value::Array(items) = &mut v {
                stack.append(items);
            }
        }
    }

    #[test]
    fn held_results_are_shared_and_give_their_bytes_back() {
        use crate::budget::{ByteBudget, ResultBudget};
        let node = ByteBudget::new(1000);
        let budget = ResultBudget::new(100, node.clone());
        let big = Payload::held(Payload::from(json!("x".repeat(50))), 52, &budget).expect("fits");
        let copies: Vec<Payload> = (0..10).map(|_| big.clone()).collect();
        assert_eq!(budget.left(), 48, "ten readers, held once");
        let e = Payload::held(Payload::from(json!("y".repeat(60))), 62, &budget).expect_err("over");
        assert_eq!(e.code, crate::ErrorCode::TooLarge);
        assert_eq!(copies[0], Payload::from(json!("x".repeat(50))));
        assert_eq!(
            serde_json::to_string(&copies[3]).expect("encode"),
            format!("\"{}\"", "x".repeat(50))
        );
        drop(copies);
        assert_eq!(budget.left(), 48, "still held by `big`");
        let value = big.into_value().expect("tree");
        assert_eq!(value, json!("x".repeat(50)));
        assert_eq!(budget.left(), 100, "the last reader took it");
        assert_eq!(node.used(), 0);
    }

    #[test]
    fn raw_and_tree_compare_and_encode_alike() {
        let tree = Payload::from(json!({"a": [1, 2]}));
        let text = Payload::Raw(raw("{\"a\":[1,2]}"));
        assert_eq!(tree, text);
        assert_eq!(
            serde_json::to_string(&tree).expect("encode"),
            serde_json::to_string(&text).expect("encode")
        );
        assert_eq!(text.into_value().expect("parse"), json!({"a": [1, 2]}));
        assert_eq!(
            Payload::Raw(raw("\"first\"")).as_string().as_deref(),
            Some("first")
        );
        assert_eq!(Payload::Raw(raw("1")).as_string(), None);
    }
}
