//! Peer wire messages: what two nodes send each other over a link (see
//! `docs/PROTOCOL.md`, "Node to node"), and the functions that only encode
//! or decode them. The link itself (jobs in flight, keepalive, the reading
//! loop) is in `link.rs`; the opening's state machines are in
//! `cluster/handshake.rs`.
//!
//! A link opens with a small [`Open`] from the dialer, then, with a cluster
//! secret, a [`Proof`] from each side (the acceptor first), then a
//! [`Hello`] from each side (the dialer first). After that, messages are
//! [`PeerMessage`]s. What a node offers is a [`Catalog`] of [`Ability`]s
//! (in a hello, and over links between a leaf and its gateways).

use std::collections::BTreeSet;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::Message;

use crate::error::RpcError;
use crate::payload::Payload;
use crate::plan::Step;

/// Version of the node-to-node protocol spoken here. Version 2 opened links
/// with `peer-open` and proved the cluster secret before any hello (nodes
/// of version 1 opened with `peer-hello`); version 3 gossips abilities as
/// cards and closes idle links (`idle`, `idle-ok`, `idle-no`). Nodes of
/// other versions cannot link with it.
pub(crate) const PEER_PROTOCOL: u32 = 3;

/// The most bytes a peer message may have before the other side has proven
/// the cluster secret (`peer-open`, `peer-proof`): larger ones are refused
/// before they are decoded.
pub(crate) const PRE_PROOF_MAX: usize = 4096;

/// One function a node offers: its name, every dataset it has there, and
/// whether it is safe to retry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub(crate) struct Ability {
    pub(crate) fun: String,
    pub(crate) datasets: BTreeSet<String>,
    #[serde(default)]
    pub(crate) idempotent: bool,
    /// The parameters, by name and Rust type (what `kwargs` names).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) params: Vec<ParamDesc>,
    /// The return type, as written.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) returns: String,
    /// The function's doc comment.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) doc: String,
}

/// One parameter of a described function.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub(crate) struct ParamDesc {
    pub(crate) name: String,
    #[serde(rename = "type")]
    pub(crate) ty: String,
}

impl Ability {
    /// What `function` offers to the cluster.
    pub(crate) fn of(function: &crate::registry::Function) -> Self {
        Self {
            fun: function.name.clone(),
            datasets: function.datasets.clone(),
            idempotent: function.idempotent,
            params: function
                .params
                .iter()
                .map(|p| ParamDesc {
                    name: p.name.to_owned(),
                    ty: p.ty.to_owned(),
                })
                .collect(),
            returns: function.returns.clone(),
            doc: function.doc.clone(),
        }
    }
}

impl From<&Ability> for crate::cluster::FunctionInfo {
    fn from(a: &Ability) -> Self {
        Self {
            fun: a.fun.clone(),
            datasets: a.datasets.clone(),
            idempotent: a.idempotent,
            params: a
                .params
                .iter()
                .map(|p| crate::cluster::ParamInfo {
                    name: p.name.clone(),
                    ty: p.ty.clone(),
                })
                .collect(),
            returns: a.returns.clone(),
            doc: a.doc.clone(),
        }
    }
}

/// Everything a node offers, with a version that grows on every change.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Catalog {
    pub(crate) version: u64,
    pub(crate) functions: Vec<Ability>,
}

/// The first message of each side of a link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Hello {
    pub(crate) protocol: u32,
    pub(crate) name: String,
    /// Where the sender listens (also its membership address); `None` for
    /// a node that only dials out (a leaf, served through this link).
    pub(crate) addr: Option<SocketAddr>,
    /// Grows at each start of the sender.
    pub(crate) generation: u64,
    pub(crate) catalog: Catalog,
}

/// The dialer's first message: small, and says nothing about the dialer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Open {
    /// The peer protocol version the dialer speaks.
    pub(crate) protocol: u32,
    /// The dialer's challenge (32 random bytes, hex), when it has a cluster
    /// secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) nonce: Option<String>,
}

/// A proof of knowing the cluster secret: the acceptor's carries its own
/// challenge (`nonce`), the dialer's does not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Proof {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) nonce: Option<String>,
    /// HMAC-SHA256 (hex); see [`crate::auth::Secret::proof`].
    pub(crate) proof: String,
}

/// What the first message of a connection says about it, when it comes
/// from a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Opening {
    /// A peer opening a link.
    Open(Open),
    /// A peer message that cannot open a link: too large to be read before
    /// a proof, or a hello from a node of peer protocol 1.
    Refused(&'static str),
}

/// The first messages a peer may open with, decoded into typed values only.
#[derive(Deserialize)]
#[serde(tag = "role", content = "body", rename_all = "kebab-case")]
enum FirstPeerMessage {
    PeerOpen(Open),
    /// Protocol 1 opened with the hello; its body is not read.
    PeerHello(serde::de::IgnoredAny),
}

/// The messages of a link's opening: decoded into typed fields only (no
/// JSON values, unlike jobs), so whatever a peer sends before it proved
/// itself is never read into a tree.
#[derive(Deserialize)]
#[serde(tag = "role", content = "body")]
enum OpeningMessage {
    #[serde(rename = "peer-open")]
    Open(Open),
    #[serde(rename = "peer-proof")]
    Proof(Proof),
    #[serde(rename = "peer-hello")]
    Hello(Hello),
}

/// Decodes a message of a link's opening (`peer-open`, `peer-proof`,
/// `peer-hello`); any other message is an error. `None` for a control
/// frame.
pub(crate) fn decode_opening(message: &Message) -> Option<Result<PeerMessage, serde_json::Error>> {
    let decoded: Result<OpeningMessage, _> = match message {
        Message::Text(text) => serde_json::from_str(text.as_str()),
        Message::Binary(bytes) => serde_json::from_slice(bytes),
        _ => return None,
    };
    Some(decoded.map(|m| match m {
        OpeningMessage::Open(open) => PeerMessage::PeerOpen(open),
        OpeningMessage::Proof(proof) => PeerMessage::PeerProof(proof),
        OpeningMessage::Hello(hello) => PeerMessage::PeerHello(hello),
    }))
}

/// Whether `bytes` starts as a peer message (`{"role": "peer-...`), read
/// from the first bytes only.
fn starts_as_peer_message(bytes: &[u8]) -> bool {
    let mut rest = bytes;
    for token in [&b"{"[..], b"\"role\"", b":", b"\"peer-"] {
        let trimmed = rest.trim_ascii_start();
        match trimmed.strip_prefix(token) {
            Some(after) => rest = after,
            None => return false,
        }
    }
    true
}

/// Recognizes a connection's first message as a peer's: `None` when it is
/// not one (a client's). A message over [`PRE_PROOF_MAX`] bytes is never
/// decoded: it is refused when it starts as a peer message.
pub(crate) fn opening(message: &Message) -> Option<Opening> {
    let bytes: &[u8] = match message {
        Message::Text(text) => text.as_bytes(),
        Message::Binary(bytes) => bytes,
        _ => return None,
    };
    if bytes.len() > PRE_PROOF_MAX {
        return starts_as_peer_message(bytes).then_some(Opening::Refused(
            "a peer's first message must be at most 4096 bytes",
        ));
    }
    match serde_json::from_slice(bytes).ok()? {
        FirstPeerMessage::PeerOpen(open) => Some(Opening::Open(open)),
        FirstPeerMessage::PeerHello(_) => Some(Opening::Refused(
            "this node speaks peer protocol 3, which opens with peer-open",
        )),
    }
}

/// A message between nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
// Adjacently tagged, tag first: serde then decodes the body straight into
// its variant. (An internally tagged enum would first buffer the whole
// message, payloads included, into an intermediate tree.)
#[serde(tag = "role", content = "body", rename_all = "kebab-case")]
pub(crate) enum PeerMessage {
    /// The dialer's first message (see [`Open`]).
    PeerOpen(Open),
    /// A proof of the cluster secret (see [`Proof`]).
    PeerProof(Proof),
    /// Says who the sender is and what it offers (see [`Hello`]); sent
    /// once the proofs, if any, have checked.
    PeerHello(Hello),
    /// The sender's abilities changed.
    Catalog(Catalog),
    /// Run these steps here and answer with `Done` carrying `outputs`.
    Run {
        id: u64,
        steps: Vec<Step>,
        outputs: Vec<usize>,
        /// What is left of the request's deadline.
        timeout_ms: u64,
        /// The id of the request this job belongs to (for logs).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        trace: Option<String>,
        /// The most bytes of results the sender accepts for this job (as
        /// JSON text); more is a `too_large` answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        budget: Option<u64>,
    },
    /// The answer to `Run`: `values` (one per output) or `error`.
    Done {
        id: u64,
        /// Kept as raw JSON text on receipt: the receiver usually only
        /// forwards them (into its reply, or into another job).
        #[serde(default, deserialize_with = "crate::payload::raw_payloads")]
        values: Option<Vec<Payload>>,
        #[serde(default)]
        error: Option<RpcError>,
    },
    /// The sender no longer needs the answer to `Run { id }`: stop it.
    Cancel { id: u64 },
    /// The sender (the dialer) found the link idle and sends no more jobs
    /// on it; it asks to close it.
    Idle,
    /// The answer to `Idle` when nothing the receiver sent is in flight:
    /// it sends no more jobs on the link either, which may close.
    IdleOk,
    /// The answer to `Idle` when jobs the receiver sent are in flight: the
    /// link stays.
    IdleNo,
}

/// [`PeerMessage::Run`] made of borrowed parts: the same encoding, without
/// moving or copying the job (which a caller may still need, to retry it).
#[derive(Serialize)]
#[serde(tag = "role", content = "body", rename_all = "kebab-case")]
pub(crate) enum RunRef<'a> {
    Run {
        id: u64,
        steps: &'a [Step],
        outputs: &'a [usize],
        timeout_ms: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        trace: Option<&'a str>,
        budget: Option<u64>,
    },
}

/// The bounds of one job sent over a link.
#[derive(Debug, Clone, Copy)]
pub(crate) struct JobLimits {
    /// The largest message the link carries: a job that encodes larger
    /// fails (`too_large`) and is never sent, so it cannot close the link.
    pub(crate) max_message: usize,
    /// The most bytes of results the job may answer with.
    pub(crate) budget: usize,
}

impl RunRef<'_> {
    pub(crate) fn encode(&self) -> Message {
        // Only strings, numbers and JSON values: encoding cannot fail.
        Message::text(serde_json::to_string(self).unwrap_or_default())
    }
}

impl PeerMessage {
    pub(crate) fn encode(&self) -> Message {
        // Only strings, numbers and JSON values: encoding cannot fail.
        Message::text(serde_json::to_string(self).unwrap_or_default())
    }

    pub(crate) fn decode(message: &Message) -> Option<Result<Self, serde_json::Error>> {
        match message {
            Message::Text(text) => Some(serde_json::from_str(text.as_str())),
            Message::Binary(bytes) => Some(serde_json::from_slice(bytes)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Arg;
    use serde_json::{Value, json};

    #[test]
    fn messages_round_trip_and_keep_values_apart_from_references() {
        let run = PeerMessage::Run {
            id: 7,
            steps: vec![Step {
                name: "a".into(),
                fun: "echo".into(),
                args: vec![Arg::Value(json!("b").into()), Arg::Ref(0)],
                kwargs: vec![("k".into(), Arg::Value(json!(1).into()))],
                locs: vec!["d".into()],
                deps: vec![0],
            }],
            outputs: vec![0],
            timeout_ms: 5,
            trace: Some("req-1".into()),
            budget: Some(1 << 20),
        };
        let text = serde_json::to_string(&run).expect("encode");
        assert!(text.contains(r#""role":"run""#), "{text}");
        assert!(
            text.contains(r#"{"value":"b"}"#) && text.contains(r#"{"ref":0}"#),
            "{text}"
        );
        let back: PeerMessage = serde_json::from_str(&text).expect("decode");
        // `deps` is not sent: it is recomputed by the receiver.
        let PeerMessage::Run { steps, .. } = back else {
            panic!("not a run: {back:?}");
        };
        assert!(steps[0].deps.is_empty());
        assert_eq!(steps[0].args[1], Arg::Ref(0));
    }

    #[test]
    fn run_from_borrowed_parts_encodes_as_the_message() {
        let steps = vec![Step {
            name: "a".into(),
            fun: "echo".into(),
            args: vec![Arg::Value(json!({"x": [1, "b"]}).into()), Arg::Ref(0)],
            kwargs: vec![("k".into(), Arg::Value(json!(1).into()))],
            locs: vec!["d".into()],
            deps: vec![0],
        }];
        for trace in [Some("req-1"), None] {
            let borrowed = RunRef::Run {
                id: 9,
                steps: &steps,
                outputs: &[0],
                timeout_ms: 250,
                trace,
                budget: Some(4096),
            };
            let owned = PeerMessage::Run {
                id: 9,
                steps: steps.clone(),
                outputs: vec![0],
                timeout_ms: 250,
                trace: trace.map(str::to_owned),
                budget: Some(4096),
            };
            assert_eq!(borrowed.encode(), owned.encode());
        }
    }

    #[test]
    fn hello_shape() {
        let hello = PeerMessage::PeerHello(Hello {
            protocol: PEER_PROTOCOL,
            name: "n".into(),
            addr: None,
            generation: 3,
            catalog: Catalog::default(),
        });
        let v: Value = serde_json::to_value(&hello).expect("encode");
        assert_eq!(v["role"], "peer-hello");
        assert_eq!(v["body"]["addr"], Value::Null);
        let decoded = PeerMessage::decode(&hello.encode())
            .expect("text")
            .expect("valid");
        assert_eq!(decoded, hello);
    }

    #[test]
    fn openings_are_recognized_without_decoding_large_ones() {
        let open = PeerMessage::PeerOpen(Open {
            protocol: PEER_PROTOCOL,
            nonce: Some("ab".repeat(32)),
        });
        let encoded = open.encode();
        assert!(encoded.len() < 200, "{encoded}");
        let Some(Opening::Open(o)) = opening(&encoded) else {
            panic!("not an opening: {encoded}");
        };
        assert_eq!(o.protocol, PEER_PROTOCOL);
        // Spaces and a binary frame are fine.
        let spaced = Message::binary(&br#" { "role" : "peer-open", "body": {"protocol": 2}}"#[..]);
        assert!(matches!(opening(&spaced), Some(Opening::Open(_))));
        // A client's request is not a peer's.
        let rpc = Message::text(r#"{"role":"rpc","u":1,"cmds":[]}"#);
        assert_eq!(opening(&rpc), None);
        // A large peer message is refused, a large client message is not
        // a peer's.
        let padding = "x".repeat(PRE_PROOF_MAX);
        let big_peer = Message::text(format!(
            r#"{{"role":"peer-open","body":{{"protocol":2,"pad":"{padding}"}}}}"#
        ));
        assert!(matches!(opening(&big_peer), Some(Opening::Refused(_))));
        let big_rpc = Message::text(format!(r#"{{"role":"rpc","u":"{padding}","cmds":[]}}"#));
        assert_eq!(opening(&big_rpc), None);
        // Protocol 1 opened with the hello.
        let old = Message::text(r#"{"role":"peer-hello","body":{"protocol":1}}"#);
        assert!(matches!(opening(&old), Some(Opening::Refused(_))));
    }

    #[test]
    fn the_opening_decodes_only_its_own_messages() {
        let proof = PeerMessage::PeerProof(Proof {
            nonce: None,
            proof: "00".into(),
        });
        assert_eq!(
            decode_opening(&proof.encode()).map(Result::ok),
            Some(Some(proof))
        );
        // A job (whose values are JSON trees) is not part of an opening.
        let run = Message::text(
            r#"{"role":"run","body":{"id":1,"timeout_ms":5,"outputs":[],"steps":[]}}"#,
        );
        assert!(matches!(decode_opening(&run), Some(Err(_))));
        assert!(decode_opening(&Message::Ping(Default::default())).is_none());
    }
}
