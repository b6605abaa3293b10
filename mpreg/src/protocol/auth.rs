//! The auth message: a client's first message when the node requires a
//! client token and none came with the WebSocket upgrade
//! (`{"role":"auth","token":"TOKEN"}`), and the node's answer when it
//! accepts the token (`{"role":"auth","ok":true}`). Checking tokens is the
//! server's (`server/admission.rs`, with `auth.rs`).

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::reply::ReplyTo;

/// A client's first message when the node requires a token and none came
/// with the upgrade: `{"role":"auth","token":"TOKEN"}`. Decoded as is, never
/// as a tree: the id of a request sent instead is kept as raw text, for the
/// `unauthorized` reply.
#[derive(Deserialize)]
pub(crate) struct AuthMessage<'a> {
    #[serde(borrow, default)]
    pub(crate) role: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub(crate) token: Option<Cow<'a, str>>,
}

/// The token of an auth message; else whom the `unauthorized` reply
/// answers (the message's request id, or `null`, and the reply's form).
pub(crate) fn auth_token(message: &Message) -> Result<String, ReplyTo> {
    let bytes: &[u8] = match message {
        Message::Text(text) => text.as_bytes(),
        Message::Binary(bytes) => bytes,
        _ => return Err(ReplyTo::mpreg(Value::Null)),
    };
    match serde_json::from_slice::<AuthMessage<'_>>(bytes) {
        Ok(AuthMessage {
            role: Some(role),
            token: Some(token),
        }) if role == "auth" => Ok(token.into_owned()),
        _ => Err(crate::protocol::reply_to(bytes)),
    }
}

/// The node's answer to an auth message whose token it accepts.
pub(crate) fn auth_ok() -> String {
    json!({"role": "auth", "ok": true}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Dialect;
    use tokio_tungstenite::tungstenite::Bytes;

    #[test]
    fn auth_messages_are_read_without_a_tree() {
        let token = |text: &str| auth_token(&Message::text(text));
        assert_eq!(token(r#"{"role":"auth","token":"t1"}"#), Ok("t1".into()));
        assert_eq!(
            token(r#"{"role":"auth","token":"a\"b"}"#),
            Ok("a\"b".into())
        );
        let to = |u: Value, dialect| Err(ReplyTo { u, dialect });
        // A request instead: the refusal answers it, in its form.
        assert_eq!(
            token(r#"{"role":"rpc","u":"r1","cmds":[{"x":[1,2,{"y":3}]}]}"#),
            to(json!("r1"), Dialect::Later)
        );
        assert_eq!(
            token(r#"{"role":"rpc","mpreg":1,"u":"r1","cmds":[]}"#),
            to(json!("r1"), Dialect::Mpreg)
        );
        assert_eq!(
            token(r#"{"role":"rpc","rpc":{"u":7,"cmds":[]}}"#),
            to(json!(7), Dialect::Mpreg)
        );
        let none = to(Value::Null, Dialect::Mpreg);
        assert_eq!(token("not json"), none);
        assert_eq!(token(r#"{"role":"auth","token":5}"#), none);
        assert_eq!(auth_token(&Message::Ping(Bytes::new())), none);
    }

    #[test]
    fn the_answer_to_an_accepted_token() {
        let ok: Value = serde_json::from_str(&auth_ok()).expect("json");
        assert_eq!(ok, json!({"role": "auth", "ok": true}));
    }
}
