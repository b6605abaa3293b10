//! Helpers shared by the integration tests: starting nodes, a raw WebSocket
//! connection that speaks the wire protocol by hand, and hang guards.
#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use mpreg::{Args, Function, NodeBuilder, NodeHandle, RpcError};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub(crate) mod process;

/// The longest any single wait in a test may take: a hang guard only, never
/// a performance assertion.
pub(crate) const HANG_GUARD: Duration = Duration::from_secs(30);

/// Runs `fut`, panicking (instead of hanging) if it takes longer than
/// [`HANG_GUARD`].
pub(crate) async fn guard<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(HANG_GUARD, fut).await {
        Ok(out) => out,
        Err(_) => panic!("hang guard: {what} did not finish within {HANG_GUARD:?}"),
    }
}

/// A builder for a test node: loopback, port 0, no linked functions,
/// diagnostics (`debug.*`) on.
pub(crate) fn builder() -> NodeBuilder {
    mpreg::Node::builder()
        .listen("127.0.0.1:0")
        .without_linked_functions()
        .diagnostics(true)
}

/// A node for cluster tests: named, loopback, port 0, no linked functions,
/// and failure detection fast enough for tests (100 ms probes, 500 ms to
/// declare a silent member down).
pub(crate) fn member(name: &str) -> NodeBuilder {
    mpreg::Node::builder()
        .name(name)
        .listen("127.0.0.1:0")
        .without_linked_functions()
        .failure_detection(Duration::from_millis(100), Duration::from_millis(500))
}

/// Starts a node from `builder` (which should listen on `127.0.0.1:0`).
pub(crate) async fn start_node(builder: NodeBuilder) -> NodeHandle {
    guard("node start", builder.start())
        .await
        .expect("node starts")
}

/// Starts a default test node (see [`builder`]).
pub(crate) async fn start_default() -> NodeHandle {
    start_node(builder()).await
}

/// The URL of `node`, which listens.
pub(crate) fn url(node: &NodeHandle) -> String {
    node.url().expect("node listens")
}

/// The error of a request that must fail with an rpc error of `code`.
pub(crate) fn rpc_error<T: std::fmt::Debug>(
    result: Result<T, mpreg::Error>,
    code: mpreg::ErrorCode,
) -> RpcError {
    match result {
        Err(mpreg::Error::Rpc(e)) => {
            assert_eq!(e.code, code, "{e}");
            e
        }
        other => panic!("expected an rpc error {code:?}, got {other:?}"),
    }
}

/// Connects an `mpreg::Client` to `node`.
pub(crate) async fn client(node: &NodeHandle) -> mpreg::Client {
    guard(
        "client connect",
        mpreg::Client::connect(&node.url().expect("node listens")),
    )
    .await
    .expect("client connects")
}

/// A runtime function `name` that counts its calls in the returned counter
/// and returns its positional arguments as a list.
pub(crate) fn counting(name: &str) -> (Function, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let f = Function::new(name, move |args: Args| {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok::<_, RpcError>(Value::Array(args.positional().to_vec()))
        }
    });
    (f, calls)
}

/// Polls `cond` (every 10 ms, at most [`HANG_GUARD`] in total) until it holds.
pub(crate) async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    guard(what, async {
        // Bounded: 3,000 polls of 10 ms is the hang guard.
        for _ in 0..3_000 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition never held: {what}");
    })
    .await;
}

/// A request in the flat envelope as mpreg's clients send it: with the
/// marker `"mpreg": 1`, so the reply takes mpreg's form.
pub(crate) fn flat(u: impl Into<Value>, cmds: Value) -> Value {
    json!({"role": "rpc", "mpreg": 1, "u": u.into(), "cmds": cmds})
}

/// A request in the flat envelope as the original project's later client
/// sends it: no marker, so the reply takes that client's form (integer
/// `error.code`, `intermediate_results`, `execution_summary`).
pub(crate) fn later(u: impl Into<Value>, cmds: Value) -> Value {
    json!({"role": "rpc", "u": u.into(), "cmds": cmds})
}

/// A request in the first-release envelope (nested under `rpc`).
pub(crate) fn nested(u: impl Into<Value>, cmds: Value) -> Value {
    json!({"role": "rpc", "rpc": {"cmds": cmds, "u": u.into()}})
}

/// One command as JSON.
pub(crate) fn cmd(name: &str, fun: &str, args: Value) -> Value {
    json!({"name": name, "fun": fun, "args": args, "locs": []})
}

/// A hand-driven WebSocket connection to a node, for testing the wire format
/// the way a non-Rust (e.g. the original Python) client uses it.
pub(crate) struct RawWs {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl RawWs {
    /// Connects to `url` with no message or frame size limit on this side, so
    /// the node's limits are the ones under test.
    pub(crate) async fn connect(url: &str) -> Self {
        let config = WebSocketConfig::default()
            .max_message_size(None)
            .max_frame_size(None);
        let (ws, _) = guard(
            "raw connect",
            tokio_tungstenite::connect_async_with_config(url, Some(config), true),
        )
        .await
        .expect("raw WebSocket connects");
        Self { ws }
    }

    /// Sends one text frame.
    pub(crate) async fn send_text(&mut self, text: &str) {
        self.try_send(Message::text(text))
            .await
            .expect("send text frame");
    }

    /// Sends one binary frame.
    pub(crate) async fn send_binary(&mut self, bytes: &[u8]) {
        self.try_send(Message::binary(bytes.to_vec()))
            .await
            .expect("send binary frame");
    }

    /// Sends a JSON value as one text frame.
    pub(crate) async fn send_json(&mut self, value: &Value) {
        self.send_text(&value.to_string()).await;
    }

    /// Queues a text frame without flushing (for pipelining); call
    /// [`flush`](Self::flush) afterwards.
    pub(crate) async fn feed_json(&mut self, value: &Value) {
        guard("feed", self.ws.feed(Message::text(value.to_string())))
            .await
            .expect("feed text frame");
    }

    /// Flushes queued frames.
    pub(crate) async fn flush(&mut self) {
        guard("flush", self.ws.flush()).await.expect("flush");
    }

    /// Sends a message, returning the transport error if any.
    pub(crate) async fn try_send(&mut self, message: Message) -> Result<(), WsError> {
        guard("send", self.ws.send(message)).await
    }

    /// The next frame (or the end of the connection), skipping pings and
    /// pongs, with a hang guard.
    pub(crate) async fn next_frame(&mut self) -> Option<Result<Message, WsError>> {
        guard("next frame", async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    other => return other,
                }
            }
        })
        .await
    }

    /// The next frame of any kind, pings and pongs included, with a hang
    /// guard.
    pub(crate) async fn next_any_frame(&mut self) -> Option<Result<Message, WsError>> {
        guard("next frame", self.ws.next()).await
    }

    /// The next reply, decoded; accepts text or binary frames. Panics on
    /// anything else (close, error, not JSON) or after the hang guard.
    pub(crate) async fn recv_json(&mut self) -> Value {
        match self.next_frame().await {
            Some(Ok(Message::Text(text))) => {
                serde_json::from_str(text.as_str()).expect("reply is JSON")
            }
            Some(Ok(Message::Binary(bytes))) => {
                serde_json::from_slice(&bytes).expect("reply is JSON")
            }
            other => panic!("expected a reply frame, got {other:?}"),
        }
    }

    /// Sends `request` and returns the next reply.
    pub(crate) async fn request(&mut self, request: &Value) -> Value {
        self.send_json(request).await;
        self.recv_json().await
    }

    /// Waits until the node ends the connection; returns the close frame's
    /// code when one arrived. Panics if a data frame arrives first.
    pub(crate) async fn expect_closed(&mut self) -> Option<u16> {
        // Bounded by the hang guard in `next_frame`, and by frame count here.
        for _ in 0..16 {
            match self.next_frame().await {
                Some(Ok(Message::Close(frame))) => {
                    return frame.map(|f| u16::from(f.code));
                }
                None | Some(Err(_)) => return None,
                Some(Ok(Message::Frame(_))) => continue,
                Some(Ok(other)) => panic!("expected the connection to close, got {other:?}"),
            }
        }
        panic!("connection neither closed nor ended");
    }

    /// Closes the connection from this side.
    pub(crate) async fn close(mut self) {
        let _ = guard("close", self.ws.close(None)).await;
    }
}

/// Asserts `reply` is a success for request `u` and returns its `r`.
pub(crate) fn ok_r(reply: &Value, u: &Value) -> Value {
    assert_eq!(&reply["u"], u, "reply id in {reply}");
    assert_eq!(reply["error"], Value::Null, "no error in {reply}");
    assert!(
        reply.get("error").is_some(),
        "success replies carry `error: null`: {reply}"
    );
    assert!(reply["r"].is_object(), "`r` is an object in {reply}");
    reply["r"].clone()
}

/// Asserts `reply` is an error in mpreg's form for request `u` with `code`
/// (and `kind` the same, when present: a reply built in process from an
/// `RpcError` has none), and returns the error object.
pub(crate) fn err_of(reply: &Value, u: &Value, code: &str) -> Value {
    assert_eq!(&reply["u"], u, "reply id in {reply}");
    assert_eq!(reply["r"], Value::Null, "no results in {reply}");
    assert_eq!(reply["error"]["code"], code, "error code in {reply}");
    if let Some(kind) = reply["error"].get("kind") {
        assert_eq!(kind, code, "error kind in {reply}");
    }
    assert!(
        reply["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "error has a message: {reply}"
    );
    reply["error"].clone()
}

/// A function `hold` that says it started, then waits until released.
#[derive(Clone, Default)]
pub(crate) struct Hold {
    pub(crate) started: Arc<Notify>,
    pub(crate) release: Arc<Notify>,
}

impl Hold {
    pub(crate) fn function(&self) -> Function {
        let hold = self.clone();
        Function::new("hold", move |_args: Args| {
            let hold = hold.clone();
            async move {
                hold.started.notify_one();
                hold.release.notified().await;
                Ok::<_, RpcError>(json!("released"))
            }
        })
    }
}

/// Peer links the viewing node of `view` refused.
pub(crate) fn refused_peer_links(view: &mpreg::ClusterView) -> u64 {
    view.this()
        .and_then(|n| n.security)
        .map_or(0, |s| s.refused_peer_links)
}
