//! A JSON value as the executor carries it: either a parsed tree or the raw
//! JSON text it arrived as.
//!
//! A node that only forwards a value (a client's argument sent on to a peer,
//! a peer's result sent back to the client) never needs its tree: it keeps
//! the text and copies it into the next message. A value is parsed only
//! where something reads it (a handler on this node).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use serde_json::value::RawValue;

/// One value: a tree, or JSON text already checked to be valid.
#[derive(Debug, Clone)]
pub(crate) enum Payload {
    /// A parsed value.
    Tree(Value),
    /// The value's JSON text, as received: valid JSON that parses into a
    /// [`Value`] (checked on receipt, see [`checked_raw`]).
    Raw(Box<RawValue>),
}

impl Payload {
    /// The value as a tree (parsing the text of a raw value).
    pub(crate) fn into_value(self) -> Result<Value, serde_json::Error> {
        match self {
            Payload::Tree(v) => Ok(v),
            Payload::Raw(raw) => serde_json::from_str(raw.get()),
        }
    }

    /// The value as a tree, borrowed when it is one.
    pub(crate) fn to_value(&self) -> Result<std::borrow::Cow<'_, Value>, serde_json::Error> {
        match self {
            Payload::Tree(v) => Ok(std::borrow::Cow::Borrowed(v)),
            Payload::Raw(raw) => serde_json::from_str(raw.get()).map(std::borrow::Cow::Owned),
        }
    }

    /// The string this value is, if it is a string.
    pub(crate) fn as_string(&self) -> Option<std::borrow::Cow<'_, str>> {
        match self {
            Payload::Tree(Value::String(s)) => Some(std::borrow::Cow::Borrowed(s.as_str())),
            Payload::Tree(_) => None,
            Payload::Raw(raw) => {
                let text = raw.get();
                if !text.starts_with('"') {
                    return None;
                }
                serde_json::from_str::<String>(text)
                    .ok()
                    .map(std::borrow::Cow::Owned)
            }
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
        match (self, other) {
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
