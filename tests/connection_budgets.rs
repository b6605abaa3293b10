//! Connection-level budgets: what a hostile or broken client can make a
//! node hold, and for how long. Each test runs the attack, then checks the
//! bound held, the offender got its error or close, and another client was
//! served throughout. Memory is measured on a node in its own process (the
//! `mpreg server` binary); bounds are generous and no assertion is on time.

mod common;

use std::time::Duration;

use common::{RawWs, guard};
use futures_util::{SinkExt, StreamExt};
use mpreg::Config;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use common::process::Server;

/// One plain HTTP GET of `path` on `addr`, with a bearer `token`: the
/// status code and the body.
async fn http_get(addr: &str, path: &str, token: Option<&str>) -> (u16, String) {
    guard("http get", async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("write request");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.expect("read response");
        let text = String::from_utf8_lossy(&raw).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("status line in {text:?}"));
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    })
    .await
}

/// `mpreg_connections_refused_total{reason="REASON"}` on the node at `addr`.
async fn refused(addr: &str, token: Option<&str>, reason: &str) -> u64 {
    let (status, body) = http_get(addr, "/metrics", token).await;
    assert_eq!(status, 200, "{body}");
    let sample = format!("mpreg_connections_refused_total{{reason=\"{reason}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(sample.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {sample} in /metrics:\n{body}"))
}

/// Waits (polling `/metrics`, bounded) until `reason` was counted `n` times.
async fn wait_refused(addr: &str, token: Option<&str>, reason: &str, n: u64) {
    guard("refusal counted", async {
        for _ in 0..1_000 {
            if refused(addr, token, reason).await >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{reason} never reached {n}");
    })
    .await
}

/// Asserts `/healthz` answers 200.
async fn healthy(addr: &str) {
    let (status, body) = http_get(addr, "/healthz", None).await;
    assert_eq!(status, 200, "{body}");
}

/// A raw connection with `token` in its upgrade request that runs one echo.
async fn served(url: &str, token: Option<&str>, n: u64) {
    let url = match token {
        Some(t) => format!("{url}/?token={t}"),
        None => url.to_owned(),
    };
    let mut ws = RawWs::connect(&url).await;
    let reply = ws
        .request(
            &json!({"role": "rpc", "u": n, "cmds": [{"name": "e", "fun": "echo", "args": [n]}]}),
        )
        .await;
    assert_eq!(reply["r"]["e"], n, "{reply}");
    ws.close().await;
}

/// A test node from `config` (loopback, free port, diagnostics on).
async fn node(config: Config) -> mpreg::NodeHandle {
    common::start_node(
        mpreg::Node::builder()
            .config(config)
            .listen("127.0.0.1:0")
            .without_linked_functions()
            .diagnostics(true),
    )
    .await
}

/// Opens a TCP connection from `source` (a loopback address) to `addr`
/// and asks for a WebSocket upgrade: the WebSocket, or the refusal's status
/// and body.
async fn upgrade_from(
    source: &str,
    addr: &str,
) -> Result<tokio_tungstenite::WebSocketStream<TcpStream>, (u16, String)> {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{source}:0").parse().expect("address"))
        .expect("bind");
    let stream = guard(
        "connect",
        socket.connect(addr.parse().expect("node address")),
    )
    .await
    .expect("connect");
    let request = format!("ws://{addr}/")
        .into_client_request()
        .expect("request");
    match guard("upgrade", tokio_tungstenite::client_async(request, stream)).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let body = response
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            Err((status, body))
        }
        Err(e) => panic!("upgrade failed: {e}"),
    }
}

/// Finding: thousands of WebSocket connections that upgrade and never send
/// were never closed, and at the fd limit token clients and `/healthz`
/// timed out. Now connections that have not authenticated are capped per
/// address and in total (HTTP 503 past the caps), a silent connection is
/// closed at the handshake deadline, and a client with a token in its
/// upgrade request is never refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_upgrades_are_capped_refused_with_503_and_closed_at_the_deadline() {
    let mut config = Config::default();
    config.client_tokens = vec!["tok".into()];
    config.max_unauthenticated_connections = 24;
    config.max_unauthenticated_per_address = 16;
    config.handshake_timeout_ms = 1_500;
    let a = node(config).await;
    let addr = a.local_addr().expect("listens").to_string();
    let url = common::url(&a);

    // 20 from one address: 16 admitted, 4 refused for the address.
    let mut silent = Vec::new();
    let mut refusals = Vec::new();
    for _ in 0..20 {
        match upgrade_from("127.0.0.1", &addr).await {
            Ok(ws) => silent.push(ws),
            Err(refusal) => refusals.push(refusal),
        }
    }
    assert_eq!(silent.len(), 16);
    assert_eq!(refusals.len(), 4);
    for (status, body) in &refusals {
        assert_eq!(*status, 503);
        assert!(body.contains("from this address"), "{body}");
    }
    // 12 from another: 8 admitted, then the node's total cap.
    let mut other = 0;
    for _ in 0..12 {
        match upgrade_from("127.0.0.2", &addr).await {
            Ok(ws) => {
                other += 1;
                silent.push(ws);
            }
            Err((status, body)) => {
                assert_eq!(status, 503);
                assert!(body.contains("waiting to authenticate"), "{body}");
            }
        }
    }
    assert_eq!(other, 8);
    assert_eq!(refused(&addr, Some("tok"), "unauthenticated_cap").await, 8);
    let (_, metrics) = http_get(&addr, "/metrics", Some("tok")).await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "mpreg_unauthenticated_connections 24"),
        "{metrics}"
    );

    // Meanwhile: a client with its token in the upgrade, /healthz, and the
    // Rust client with a token are all served.
    served(&url, Some("tok"), 1).await;
    healthy(&addr).await;
    let client = guard(
        "connect",
        mpreg::Client::builder().token("tok").connect(&url),
    )
    .await
    .expect("connect");
    let n: i64 = guard("call", client.call("echo", (2,)))
        .await
        .expect("served");
    assert_eq!(n, 2);

    // Every silent connection is closed at the deadline.
    for ws in &mut silent {
        let end = guard("silent connection closed", ws.next()).await;
        assert!(
            matches!(end, None | Some(Err(_)) | Some(Ok(Message::Close(_)))),
            "{end:?}"
        );
    }
    wait_refused(&addr, Some("tok"), "handshake_timeout", 24).await;
    // Room again for a connection without a token in its upgrade.
    let mut ws = RawWs::connect(&url).await;
    ws.send_json(&json!({"role": "auth", "token": "tok"})).await;
    assert_eq!(ws.recv_json().await, json!({"role": "auth", "ok": true}));
    let n: i64 = guard("call", client.call("echo", (3,)))
        .await
        .expect("served");
    assert_eq!(n, 3);
    a.shutdown().await;
}

/// The finding at its scale: 3,000 connections from one address upgrade
/// and never send, to a node with the default caps (in its own process).
/// All but 256 are refused with 503, a client with a token and `/healthz`
/// are served throughout, and the rest are closed at the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_thousand_silent_upgrades_leave_token_clients_and_healthz_served() {
    let server = Server::start(&[
        ("MPREG_CLIENT_TOKENS", "tok"),
        ("MPREG_HANDSHAKE_TIMEOUT_MS", "3000"),
    ])
    .await;
    let addr = server.addr.clone();
    let (rss_before, _) = server.memory_kib();
    let mut tasks = tokio::task::JoinSet::new();
    // 3,000 upgrades, 50 at a time.
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(50));
    for _ in 0..3_000 {
        let addr = addr.clone();
        let gate = gate.clone();
        tasks.spawn(async move {
            let _turn = gate.acquire_owned().await.expect("gate");
            upgrade_from("127.0.0.1", &addr).await
        });
    }
    let mut silent = Vec::new();
    let mut refused_503 = 0;
    while let Some(done) = guard("upgrades", tasks.join_next()).await {
        match done.expect("upgrade task") {
            Ok(ws) => silent.push(ws),
            Err((status, _)) => {
                assert_eq!(status, 503);
                refused_503 += 1;
            }
        }
    }
    // Those admitted first may already be closed by their deadline.
    assert!(silent.len() <= 256 + 64, "{} admitted", silent.len());
    assert!(refused_503 >= 2_600, "{refused_503} refused");
    served(&server.url, Some("tok"), 1).await;
    healthy(&addr).await;
    for ws in &mut silent {
        let end = guard("silent connection closed", ws.next()).await;
        assert!(
            matches!(end, None | Some(Err(_)) | Some(Ok(Message::Close(_)))),
            "{end:?}"
        );
    }
    served(&server.url, Some("tok"), 2).await;
    let (rss_after, peak) = server.memory_kib();
    eprintln!(
        "3,000 silent upgrades: {} admitted, {refused_503} refused; RSS before {rss_before} KiB, after {rss_after} KiB, peak {peak} KiB",
        silent.len()
    );
    assert!(peak < rss_before + 200 * 1024);
    server.terminate().await;
}

/// A node without tokens closes a connection that sends nothing at the
/// handshake deadline too; a connection that sent its first request is not
/// bound by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_a_first_message_is_closed_at_the_deadline() {
    let mut config = Config::default();
    config.handshake_timeout_ms = 500;
    let a = node(config).await;
    let addr = a.local_addr().expect("listens").to_string();
    let url = common::url(&a);
    let mut silent = upgrade_from("127.0.0.1", &addr).await.expect("upgrade");
    let mut active = RawWs::connect(&url).await;
    let reply = active
        .request(&json!({"u": 1, "cmds": [{"name": "e", "fun": "echo", "args": [1]}]}))
        .await;
    assert_eq!(reply["r"]["e"], 1);
    let end = guard("silent connection closed", silent.next()).await;
    assert!(
        matches!(end, None | Some(Err(_)) | Some(Ok(Message::Close(_)))),
        "{end:?}"
    );
    assert_eq!(refused(&addr, None, "handshake_timeout").await, 1);
    // Well past the deadline, the active connection still serves.
    let reply = active
        .request(&json!({"u": 2, "cmds": [{"name": "e", "fun": "echo", "args": [2]}]}))
        .await;
    assert_eq!(reply["r"]["e"], 2);
    a.shutdown().await;
}

/// A client connection with no request in flight for the idle timeout is
/// closed with code 1000 and the reason "idle timeout"; one with a request
/// running is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_with_the_idle_reason() {
    let mut config = Config::default();
    config.idle_timeout_ms = 300;
    let a = node(config).await;
    let addr = a.local_addr().expect("listens").to_string();
    let url = common::url(&a);

    let mut idle = RawWs::connect(&url).await;
    let reply = idle
        .request(&json!({"u": 1, "cmds": [{"name": "e", "fun": "echo", "args": [1]}]}))
        .await;
    assert_eq!(reply["r"]["e"], 1);
    // A request that runs longer than the idle timeout keeps its
    // connection open until it is answered.
    let mut busy = RawWs::connect(&url).await;
    let reply = busy
        .request(&json!({"u": 2, "cmds": [{"name": "s", "fun": "debug.sleep", "args": [900]}]}))
        .await;
    assert_eq!(reply["r"]["s"], 900, "{reply}");

    match idle.next_frame().await {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(u16::from(frame.code), 1000);
            assert_eq!(frame.reason.as_str(), "idle timeout");
        }
        other => panic!("expected the idle close, got {other:?}"),
    }
    match busy.next_frame().await {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(frame.reason.as_str(), "idle timeout");
        }
        other => panic!("expected the idle close after the reply, got {other:?}"),
    }
    assert!(refused(&addr, None, "idle_timeout").await >= 2);
    served(&url, None, 3).await;
    a.shutdown().await;
}

/// Finding: a token in the query beside `Authorization: Basic ...` was
/// refused at the upgrade. A valid token in the header or the query is
/// enough.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_token_in_the_header_or_the_query_is_accepted() {
    let mut config = Config::default();
    config.client_tokens = vec!["tok".into()];
    let a = node(config).await;
    let addr = a.local_addr().expect("listens").to_string();
    let cases = [
        ("/?token=tok", Some("Basic dXNlcjpwdw==")),
        ("/?token=wrong", Some("Bearer tok")),
        ("/", Some("Bearer tok")),
        ("/?token=tok", None),
    ];
    for (i, (path, authorization)) in cases.into_iter().enumerate() {
        let mut request = format!("ws://{addr}{path}")
            .into_client_request()
            .expect("request");
        if let Some(value) = authorization {
            request
                .headers_mut()
                .insert("authorization", value.parse().expect("header value"));
        }
        let (mut ws, _) = guard("connect", tokio_tungstenite::connect_async(request))
            .await
            .expect("upgrade accepted");
        let request = json!({"u": i, "cmds": [{"name": "e", "fun": "echo", "args": [i]}]});
        guard("send", ws.send(Message::text(request.to_string())))
            .await
            .expect("send");
        let reply = guard("reply", ws.next()).await;
        let Some(Ok(Message::Text(text))) = reply else {
            panic!("case {i}: expected a reply, got {reply:?}");
        };
        let reply: Value = serde_json::from_str(text.as_str()).expect("JSON");
        assert_eq!(reply["r"]["e"], i, "case {i}: {reply}");
    }
    a.shutdown().await;
}

/// A first message larger than the pre-authentication allowance, from a
/// client without a token, is never read whole: the client gets
/// `unauthorized` (when it reads it in time) and the connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_first_message_before_authenticating_is_cut_short() {
    let mut config = Config::default();
    config.client_tokens = vec!["tok".into()];
    let a = node(config).await;
    let addr = a.local_addr().expect("listens").to_string();
    let url = common::url(&a);
    let mut ws = RawWs::connect(&url).await;
    let big = "x".repeat(64 << 10);
    let request =
        json!({"role": "rpc", "u": "big", "cmds": [{"name": "e", "fun": "echo", "args": [big]}]});
    // The send may fail: the node stops reading and closes.
    let _ = ws.try_send(Message::text(request.to_string())).await;
    match ws.next_frame().await {
        Some(Ok(Message::Text(text))) => {
            let reply: Value = serde_json::from_str(text.as_str()).expect("JSON");
            assert_eq!(reply["error"]["code"], "unauthorized", "{reply}");
            assert_eq!(ws.expect_closed().await, Some(1008));
        }
        // The reset may overtake the reply.
        None | Some(Err(_)) | Some(Ok(Message::Close(_))) => {}
        other => panic!("expected unauthorized or the end, got {other:?}"),
    }
    assert_eq!(refused(&addr, Some("tok"), "pre_auth_limit").await, 1);
    served(&url, Some("tok"), 1).await;
    a.shutdown().await;
}

/// Finding: four 60 MiB first messages from clients without a token were
/// parsed into trees before authentication (2 GiB RSS). Now each is cut at
/// the pre-authentication allowance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_first_messages_without_a_token_do_not_grow_the_node() {
    let server = Server::start(&[("MPREG_CLIENT_TOKENS", "tok")]).await;
    served(&server.url, Some("tok"), 0).await;
    let (rss_before, _) = server.memory_kib();
    let big = std::sync::Arc::new(format!(
        "{{\"role\":\"rpc\",\"u\":1,\"cmds\":[{{\"name\":\"e\",\"fun\":\"echo\",\"args\":[\"{}\"]}}]}}",
        "x".repeat(60 << 20)
    ));
    let mut attackers = Vec::new();
    for _ in 0..4 {
        let url = server.url.clone();
        let big = big.clone();
        attackers.push(tokio::spawn(async move {
            let mut ws = RawWs::connect(&url).await;
            let _ = ws.try_send(Message::text(big.as_str())).await;
        }));
    }
    // Another client is served meanwhile.
    served(&server.url, Some("tok"), 1).await;
    for attacker in attackers {
        guard("attacker", attacker).await.expect("attacker task");
    }
    wait_refused(&server.addr, Some("tok"), "pre_auth_limit", 4).await;
    served(&server.url, Some("tok"), 2).await;
    let (rss_after, peak) = server.memory_kib();
    eprintln!("pre-auth: RSS before {rss_before} KiB, after {rss_after} KiB, peak {peak} KiB");
    assert!(
        peak < rss_before + 200 * 1024,
        "peak {peak} KiB vs {rss_before} KiB before"
    );
    server.terminate().await;
}

/// A streaming request: a chain of `n` commands, each result `size` bytes
/// (the first command echoes a string of that size, each next one the
/// result before it), so the request itself holds one or two results at a
/// time and what piles up is its progress.
fn streaming_chain(u: &str, n: usize, size: usize) -> Value {
    let mut cmds = vec![json!({"name": "b0", "fun": "echo", "args": ["y".repeat(size)]})];
    for i in 1..n {
        cmds.push(json!({"name": format!("b{i}"), "fun": "echo", "args": [format!("b{}", i - 1)]}));
    }
    json!({"role": "rpc", "u": u, "stream": true, "cmds": cmds})
}

/// Finding: a `stream: true` request with many commands from a client that
/// never reads made the node hold +550 MiB to 1 GiB (the queue was bounded
/// in messages). Now the queue is bounded in bytes and a connection whose
/// queue stays full past the slow-reader timeout is closed, its requests
/// cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_is_bounded_then_closed() {
    let server = Server::start(&[
        ("MPREG_MAX_OUTGOING_BYTES", "1048576"),
        ("MPREG_SLOW_READER_TIMEOUT_MS", "1000"),
    ])
    .await;
    served(&server.url, None, 0).await;
    let (rss_before, _) = server.memory_kib();
    // 1,000 results of 256 KiB: 250 MiB of progress, never read (a queue
    // of 1,024 messages held all of it).
    let mut slow = RawWs::connect(&server.url).await;
    slow.send_json(&streaming_chain("slow", 1_000, 256 << 10))
        .await;
    wait_refused(&server.addr, None, "slow_reader", 1).await;
    // Another client is served.
    served(&server.url, None, 1).await;
    let (rss_after, peak) = server.memory_kib();
    eprintln!("slow reader: RSS before {rss_before} KiB, after {rss_after} KiB, peak {peak} KiB");
    assert!(
        peak < rss_before + 100 * 1024,
        "peak {peak} KiB vs {rss_before} KiB before"
    );
    // The slow reader finds, after what was already on its way, the close
    // (or the end of the connection), and never the reply.
    let mut close = None;
    for _ in 0..1_000 {
        match slow.next_frame().await {
            Some(Ok(Message::Text(text))) => {
                let m: Value = serde_json::from_str(text.as_str()).expect("JSON");
                assert_eq!(m["role"], "rpc-progress", "only progress came");
            }
            Some(Ok(Message::Close(frame))) => {
                close = frame;
                break;
            }
            None | Some(Err(_)) => break,
            Some(Ok(other)) => panic!("unexpected {other:?}"),
        }
    }
    eprintln!("slow reader: close frame {close:?}");
    if let Some(frame) = close {
        assert_eq!(frame.reason.as_str(), "slow reader");
    }
    served(&server.url, None, 2).await;
    server.terminate().await;
}

/// Finding: pings never read grew the node's pong buffer without bound.
/// Now the write buffer is bounded and a ping flood closes the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_flood_is_bounded_and_closed() {
    let server = Server::start(&[("MPREG_MAX_MESSAGE_SIZE", "65536")]).await;
    served(&server.url, None, 0).await;
    let (rss_before, _) = server.memory_kib();
    let config = WebSocketConfig::default().write_buffer_size(0);
    let (mut flood, _) = guard(
        "connect",
        tokio_tungstenite::connect_async_with_config(&server.url, Some(config), true),
    )
    .await
    .expect("connect");
    // Bounded: at most 200,000 pings, or until the node closes.
    let mut sent = 0u32;
    let payload = vec![7u8; 100];
    for _ in 0..200_000 {
        match tokio::time::timeout(
            Duration::from_secs(5),
            flood.send(Message::Ping(payload.clone().into())),
        )
        .await
        {
            Ok(Ok(())) => sent += 1,
            // Closed (or stuck: the node no longer reads).
            _ => break,
        }
    }
    wait_refused(&server.addr, None, "ping_flood", 1).await;
    served(&server.url, None, 1).await;
    let (rss_after, peak) = server.memory_kib();
    eprintln!(
        "ping flood: {sent} pings sent; RSS before {rss_before} KiB, after {rss_after} KiB, peak {peak} KiB"
    );
    assert!(
        peak < rss_before + 64 * 1024,
        "peak {peak} KiB vs {rss_before} KiB before"
    );
    server.terminate().await;
}

/// Finding: pipelined large requests never read, then SIGTERM: the node
/// never exited (its reader waited for queue space outside the shutdown
/// select). Now every wait of a connection ends with the shutdown grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_a_node_whose_client_never_reads() {
    let server = Server::start(&[("MPREG_SHUTDOWN_GRACE_MS", "1000")]).await;
    served(&server.url, None, 0).await;
    let mut stuck = RawWs::connect(&server.url).await;
    let big = "z".repeat(64 << 10);
    // Pipelined until the node stops reading (bounded in count and time):
    // more replies than a queue of 1,024 messages held.
    let mut sent = 0;
    for i in 0..3_000 {
        let request = json!({"u": i, "cmds": [{"name": "e", "fun": "echo", "args": [big]}]});
        let send = stuck.try_send(Message::text(request.to_string()));
        match tokio::time::timeout(Duration::from_secs(2), send).await {
            Ok(Ok(())) => sent += 1,
            _ => break,
        }
    }
    eprintln!("sigterm: {sent} requests of 64 KiB pipelined before the node stopped reading");
    served(&server.url, None, 1).await;
    // Exits cleanly (the guard is the bound: far more than the grace).
    server.terminate().await;
    drop(stuck);
}
