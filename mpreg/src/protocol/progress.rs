//! Progress messages: each command's result, sent to a client that asked
//! for `stream` ahead of the final reply. (A client reads them as it reads
//! replies: see `Incoming` in `reply.rs`.)

use serde::Serialize;
use serde_json::Value;

use crate::payload::Payload;

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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
}
