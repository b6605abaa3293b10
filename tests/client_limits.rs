//! The Rust client's limits: every call has a deadline (a node that never
//! answers makes it fail with `Timeout`, not wait forever); the client
//! tells nodes the largest reply it takes (a larger one fails that call
//! only); and a connection the node closes for idleness is replaced
//! without a caller noticing, its requests in flight sent again.
//!
//! Fake nodes here are WebSocket servers written in the test (loopback,
//! ports from the OS), so the client's side is tested without the node's.

mod common;

use common::Hold;

use std::time::Duration;

use common::{builder, guard, start_default, start_node, url};
use futures_util::{SinkExt, StreamExt};
use mpreg::{Client, Error, ErrorCode};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// A listener on a free loopback port, and its `ws://` URL.
async fn listener() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local address");
    (listener, format!("ws://{addr}"))
}

/// Accepts the next WebSocket connection; hands the upgrade request's
/// headers (name, value) to `headers` when given.
async fn accept(
    listener: &TcpListener,
    headers: Option<oneshot::Sender<Vec<(String, String)>>>,
) -> WebSocketStream<TcpStream> {
    let (tcp, _) = guard("accept", listener.accept())
        .await
        .expect("accept a connection");
    // The error type is the WebSocket library's callback signature.
    #[allow(clippy::result_large_err)]
    let callback = move |request: &Request, response: Response| {
        if let Some(tx) = headers {
            let seen = request
                .headers()
                .iter()
                .map(|(k, v)| {
                    let value = String::from_utf8_lossy(v.as_bytes()).into_owned();
                    (k.as_str().to_owned(), value)
                })
                .collect();
            let _ = tx.send(seen);
        }
        Ok(response)
    };
    guard(
        "upgrade",
        tokio_tungstenite::accept_hdr_async(tcp, callback),
    )
    .await
    .expect("WebSocket upgrade")
}

/// The next request frame on `ws`, as JSON (skipping pings and pongs);
/// `None` when the connection ends first.
async fn next_request(ws: &mut WebSocketStream<TcpStream>) -> Option<Value> {
    // Bounded by the hang guard.
    guard("next request", async {
        while let Some(Ok(message)) = ws.next().await {
            match message {
                Message::Text(text) => return serde_json::from_str(text.as_str()).ok(),
                Message::Binary(bytes) => return serde_json::from_slice(&bytes).ok(),
                Message::Close(_) => return None,
                _ => continue,
            }
        }
        None
    })
    .await
}

/// Answers `request` (one command `result`, as `Client::call` sends) with
/// its first argument, as an echo would.
async fn answer_echo(ws: &mut WebSocketStream<TcpStream>, request: &Value) {
    let value = request["cmds"][0]["args"][0].clone();
    let reply =
        json!({"role": "rpc-response", "u": request["u"], "r": {"result": value}, "error": null});
    guard("reply", ws.send(Message::text(reply.to_string())))
        .await
        .expect("send the reply");
}

/// Closes `ws` as a node does when the connection stayed idle.
async fn close_idle(ws: &mut WebSocketStream<TcpStream>) {
    close_with(ws, mpreg::IDLE_CLOSE_REASON).await;
}

/// Closes `ws` with code 1000 and `reason`, then lets it go.
async fn close_with(ws: &mut WebSocketStream<TcpStream>, reason: &str) {
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: reason.to_owned().into(),
    };
    // The client may already be gone; the close is best effort.
    let _ = guard("close", ws.close(Some(frame))).await;
}

#[tokio::test]
async fn a_call_the_node_never_answers_fails_with_timeout() {
    let (listener, url) = listener().await;
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    // Reads every request, answers none; keeps the connection open.
    let silent = tokio::spawn(async move {
        let mut ws = accept(&listener, None).await;
        while let Ok(Some(request)) =
            tokio::time::timeout(Duration::from_secs(60), next_request(&mut ws)).await
        {
            let _ = seen_tx.send(request);
        }
    });
    let deadline = Duration::from_millis(200);
    let client = guard("connect", Client::builder().timeout(deadline).connect(&url))
        .await
        .expect("connects");
    let outcome = guard("call", client.call::<String>("echo", ("hi",))).await;
    match outcome {
        // The deadline plus the slack given to the node's own answer.
        Err(Error::Timeout(waited)) => assert!(waited >= deadline, "{waited:?}"),
        other => panic!("expected a client-side timeout, got {other:?}"),
    }
    let request = seen.recv().await.expect("the node read the request");
    assert_eq!(
        request["timeout_ms"], 200,
        "the deadline is sent: {request}"
    );
    silent.abort();
}

#[test]
fn calls_have_a_deadline_by_default() {
    // The node's default deadline, plus slack: never unbounded.
    assert_eq!(Client::DEFAULT_CALL_TIMEOUT, Duration::from_secs(305));
    assert!(Client::DEFAULT_CALL_TIMEOUT > mpreg::config::DEFAULT_REQUEST_TIMEOUT);
}

#[tokio::test]
async fn the_client_asks_for_its_reply_limit_at_the_upgrade() {
    let (listener, url) = listener().await;
    for (make, expected) in [
        (Client::builder().max_reply_bytes(64 << 10), 64u64 << 10),
        (Client::builder(), (64u64 << 20) - (64 << 10)),
        (
            Client::builder().max_message_size(1 << 20),
            (1 << 20) - (64 << 10),
        ),
    ] {
        let (headers_tx, headers) = oneshot::channel();
        let server = async {
            let ws = accept(&listener, Some(headers_tx)).await;
            headers.await.map(|h| (h, ws))
        };
        let (client, seen) = tokio::join!(guard("connect", make.connect(&url)), server);
        let _client = client.expect("connects");
        let (headers, _ws) = seen.expect("headers seen");
        let asked: Vec<&str> = headers
            .iter()
            .filter(|(name, _)| name.eq_ignore_ascii_case(mpreg::REPLY_LIMIT_HEADER))
            .map(|(_, value)| value.as_str())
            .collect();
        assert_eq!(asked, [expected.to_string()], "{headers:?}");
    }
}

#[tokio::test]
async fn a_node_takes_the_reply_limit_header_and_goes_on_serving() {
    // A node given the header, a malformed one or none serves calls that
    // fit; a malformed header is ignored.
    let node = start_default().await;
    let small = guard(
        "connect",
        Client::builder()
            .max_reply_bytes(64 << 10)
            .connect(&url(&node)),
    )
    .await
    .expect("connects");
    let said: String = guard("call", small.call("echo", ("hi",)))
        .await
        .expect("echo");
    assert_eq!(said, "hi");
    for header in ["not a number", "-1", "99999999999999999999999999999"] {
        let mut request =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url(
                &node,
            ))
            .expect("request");
        request.headers_mut().insert(
            mpreg::REPLY_LIMIT_HEADER,
            header.parse().expect("header value"),
        );
        let (mut ws, _) = guard("raw connect", tokio_tungstenite::connect_async(request))
            .await
            .expect("upgrade accepted");
        let frame = common::flat("x", json!([common::cmd("e", "echo", json!([1]))]));
        guard("send", ws.send(Message::text(frame.to_string())))
            .await
            .expect("send");
        let reply = guard("reply", ws.next()).await;
        let Some(Ok(Message::Text(text))) = reply else {
            panic!("expected a reply, got {reply:?}")
        };
        let reply: Value = serde_json::from_str(text.as_str()).expect("JSON");
        assert_eq!(
            common::ok_r(&reply, &json!("x")),
            json!({"e": 1}),
            "{header}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_over_the_client_limit_fails_that_call_only() {
    let hold = Hold::default();
    let node = start_node(builder().function(hold.function())).await;
    let client = guard(
        "connect",
        Client::builder()
            .max_reply_bytes(64 << 10)
            .connect(&url(&node)),
    )
    .await
    .expect("connects");
    // A call in flight on the same connection.
    let held = tokio::spawn({
        let client = client.clone();
        async move { client.call::<String>("hold", ()).await }
    });
    guard("hold started", hold.started.notified()).await;

    let big = "b".repeat(1 << 20);
    let e = common::rpc_error(
        guard("big call", client.call::<String>("echo", (big,))).await,
        ErrorCode::TooLarge,
    );
    assert_eq!(e.command.as_deref(), Some("result"), "{e}");

    // The connection stayed up: the call in flight and the next ones work.
    hold.release.notify_one();
    let released = guard("held call", held)
        .await
        .expect("task")
        .expect("the call in flight succeeds");
    assert_eq!(released, "released");
    let said: String = guard("next call", client.call("echo", ("small",)))
        .await
        .expect("the next call succeeds");
    assert_eq!(said, "small");
}

#[tokio::test]
async fn an_idle_close_sends_the_request_in_flight_again() {
    let (listener, url) = listener().await;
    let node = tokio::spawn(async move {
        // First connection: read the request, then close as idle (the
        // node's promise: that request was not processed).
        let mut first = accept(&listener, None).await;
        let lost = next_request(&mut first).await.expect("a request");
        close_idle(&mut first).await;
        // Second connection: the same request again, answered.
        let mut second = accept(&listener, None).await;
        let again = next_request(&mut second).await.expect("the request again");
        answer_echo(&mut second, &again).await;
        (lost, again, second)
    });
    // A client on one node (no failover) reconnects after an idle close.
    let client = guard("connect", Client::connect(&url))
        .await
        .expect("connects");
    let said: String = guard("call", client.call("echo", ("hi there!",)))
        .await
        .expect("the call succeeds on the new connection");
    assert_eq!(said, "hi there!");
    let (lost, again, _second) = guard("fake node", node).await.expect("fake node");
    assert_eq!(lost, again, "the same request was sent again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_idle_close_the_next_call_reconnects_to_the_same_node_first() {
    let (listener, fake_url) = listener().await;
    let real = start_default().await;
    let (closed_tx, closed) = oneshot::channel();
    let node = tokio::spawn(async move {
        // Idle with nothing in flight: close at once.
        let mut first = accept(&listener, None).await;
        close_idle(&mut first).await;
        let _ = closed_tx.send(());
        // Then serve the reconnection.
        let mut second = accept(&listener, None).await;
        let request = next_request(&mut second).await.expect("a request");
        answer_echo(&mut second, &request).await;
        second
    });
    // Failover to a real node is possible, but the idle node comes first.
    let client = guard(
        "connect",
        Client::connect_any([fake_url.clone(), url(&real)]),
    )
    .await
    .expect("connects");
    assert_eq!(client.url(), fake_url);
    guard("idle close", closed).await.expect("closed");
    let said: String = guard("call", client.call("echo", ("from the fake",)))
        .await
        .expect("the next call succeeds");
    assert_eq!(said, "from the fake");
    assert_eq!(client.url(), fake_url, "back on the same node");
    let _second = guard("fake node", node).await.expect("fake node");
}

#[tokio::test]
async fn another_close_still_fails_the_calls_in_flight() {
    let (listener, url) = listener().await;
    let (resent_tx, mut resent) = mpsc::unbounded_channel::<Value>();
    let node = tokio::spawn(async move {
        let mut first = accept(&listener, None).await;
        next_request(&mut first).await.expect("a request");
        // Not an idle close: the request may have run.
        close_with(&mut first, "going away for now").await;
        drop(first);
        // Nothing may come back on its own; report anything that does.
        if let Ok((tcp, _)) = listener.accept().await
            && let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await
            && let Some(request) = next_request(&mut ws).await
        {
            let _ = resent_tx.send(request);
        }
    });
    let client = guard("connect", Client::connect(&url))
        .await
        .expect("connects");
    let outcome = guard("call", client.call::<String>("echo", ("hi",))).await;
    assert!(matches!(outcome, Err(Error::Closed)), "{outcome:?}");
    // A client on one node stays lost.
    let next = guard("next call", client.call::<String>("echo", ("again",))).await;
    assert!(matches!(next, Err(Error::Closed)), "{next:?}");
    assert!(resent.try_recv().is_err(), "nothing was sent again");
    node.abort();
}

#[tokio::test]
async fn a_stream_in_flight_survives_an_idle_close() {
    let (listener, url) = listener().await;
    let node = tokio::spawn(async move {
        let mut first = accept(&listener, None).await;
        next_request(&mut first).await.expect("a request");
        close_idle(&mut first).await;
        let mut second = accept(&listener, None).await;
        let request = next_request(&mut second).await.expect("the request again");
        assert_eq!(request["stream"], true, "{request}");
        let u = &request["u"];
        for message in [
            json!({"role": "rpc-progress", "u": u, "name": "first", "value": 1}),
            json!({"role": "rpc-response", "u": u, "r": {"second": 2}, "error": null}),
        ] {
            guard("send", second.send(Message::text(message.to_string())))
                .await
                .expect("send");
        }
        second
    });
    let client = guard("connect", Client::connect(&url))
        .await
        .expect("connects");
    let request = mpreg::Request::new()
        .cmd(mpreg::Command::new("first", "echo").arg(1))
        .cmd(mpreg::Command::new("second", "echo").arg(2));
    let mut events = guard("stream", client.stream(request)).await.expect("sent");
    let progress = match guard("progress", events.next()).await {
        Some(Ok(mpreg::Event::Progress(p))) => p,
        other => panic!("expected progress, got {other:?}"),
    };
    assert_eq!((progress.name(), progress.value()), ("first", &json!(1)));
    let results = match guard("done", events.next()).await {
        Some(Ok(mpreg::Event::Done(results))) => results,
        other => panic!("expected the results, got {other:?}"),
    };
    assert_eq!(results.get::<i64>("second").expect("second"), 2);
    let _second = guard("fake node", node).await.expect("fake node");
}
