//! Who may talk to a node: client tokens and the cluster secret.

mod common;

use std::time::Duration;

use common::{RawWs, guard, member as node, url};
use mpreg::ClusterView;
use mpreg::{Client, ErrorCode};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

/// Gossip packets the viewing node dropped.
fn dropped(view: &ClusterView) -> u64 {
    view.this()
        .and_then(|n| n.gossip)
        .map_or(0, |g| g.dropped_packets)
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_tokens_are_required_when_configured() {
    let a = node("A")
        .cluster_secret("s3cret")
        .client_tokens(["tok-1", "tok-2"])
        .start()
        .await
        .expect("start");

    // No token: the first request is refused, with its id, and the
    // connection closes.
    let anonymous = guard("connect", Client::connect(&url(&a)))
        .await
        .expect("connect");
    let e = guard("call", anonymous.call::<i64>("echo", (1,)))
        .await
        .expect_err("refused");
    assert!(
        matches!(e, mpreg::Error::Rpc(ref e) if e.code == ErrorCode::Unauthorized),
        "{e:?}"
    );

    // A token in the upgrade request.
    let client = guard(
        "connect",
        Client::builder().token("tok-2").connect(&url(&a)),
    )
    .await
    .expect("connect");
    let n: i64 = guard("call", client.call("echo", (2,)))
        .await
        .expect("authorized");
    assert_eq!(n, 2);
    let wrong = guard(
        "connect",
        Client::builder().token("tok-3").connect(&url(&a)),
    )
    .await
    .expect("connect");
    assert!(
        guard("call", wrong.call::<i64>("echo", (3,)))
            .await
            .is_err()
    );

    // A token in the query string.
    let mut ws = RawWs::connect(&format!("{}/?token=tok-1", url(&a))).await;
    let reply = ws
        .request(&json!({"u": "q", "cmds": [{"name": "e", "fun": "echo", "args": [4]}]}))
        .await;
    assert_eq!(reply["r"]["e"], 4);

    // A token in a first message.
    let mut ws = RawWs::connect(&url(&a)).await;
    ws.send_json(&json!({"role": "auth", "token": "tok-1"}))
        .await;
    assert_eq!(ws.recv_json().await, json!({"role": "auth", "ok": true}));
    let reply = ws
        .request(&json!({"u": "m", "cmds": [{"name": "e", "fun": "echo", "args": [5]}]}))
        .await;
    assert_eq!(reply["r"]["e"], 5);

    // A wrong token in a first message: unauthorized, then closed.
    let mut ws = RawWs::connect(&url(&a)).await;
    ws.send_json(&json!({"role": "auth", "token": "nope"}))
        .await;
    let reply = ws.recv_json().await;
    assert_eq!(reply["error"]["code"], "unauthorized");
    assert_eq!(ws.expect_closed().await, Some(1008));

    // A request without any token: refused with its own id, in its form
    // (mpreg's with the marker, the original's later client's without).
    let cmds = json!([{"name": "e", "fun": "echo", "args": [6]}]);
    for (request, code) in [
        (
            json!({"role": "rpc", "mpreg": 1, "u": "r1", "cmds": cmds}),
            json!("unauthorized"),
        ),
        (json!({"role": "rpc", "u": "r1", "cmds": cmds}), json!(403)),
    ] {
        let mut ws = RawWs::connect(&url(&a)).await;
        ws.send_json(&request).await;
        let reply = ws.recv_json().await;
        assert_eq!(reply["u"], "r1");
        assert_eq!(reply["error"]["code"], code, "{reply}");
        assert_eq!(reply["error"]["kind"], "unauthorized", "{reply}");
        assert_eq!(ws.expect_closed().await, Some(1008));
    }
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_secret_admits_only_nodes_that_know_it() {
    let a = node("A").cluster_secret("s3cret").start().await.expect("A");
    let b = node("B")
        .cluster_secret("s3cret")
        .datasets(["b"])
        .peers([url(&a)])
        .start()
        .await
        .expect("B");
    assert!(
        a.wait_for(WAIT, |v| v.node_names() == ["A", "B"]).await,
        "B joins"
    );
    let client = guard("connect", Client::connect(&url(&a)))
        .await
        .expect("connect");
    let who: String = guard(
        "whoami",
        client.call_command(mpreg::Command::new("w", "mpreg.whoami").dataset("b")),
    )
    .await
    .expect("routed to B");
    assert_eq!(who, "B");

    // A node with another secret: its gossip is dropped and counted, and
    // it never joins.
    let c = node("C")
        .cluster_secret("other")
        .datasets(["c"])
        .peers([url(&a)])
        .start()
        .await
        .expect("C");
    assert!(
        a.wait_for(WAIT, |v| dropped(v) > 0).await,
        "A drops C's packets"
    );
    assert_eq!(
        a.cluster_view().node_names(),
        ["A", "B"],
        "C is not a member"
    );

    // Peers that cannot prove the secret are refused on the link too.
    let open = |nonce: Option<&str>| {
        let mut o = json!({"role": "peer-open", "body": {"protocol": 3}});
        if let Some(n) = nonce {
            o["body"]["nonce"] = json!(n);
        }
        o
    };
    // No challenge: closed at once, with nothing said.
    let mut ws = RawWs::connect(&url(&a)).await;
    ws.send_json(&open(None)).await;
    assert_eq!(ws.expect_closed().await, Some(1008));
    // A challenge: A proves itself, and says nothing else.
    let mut ws = RawWs::connect(&url(&a)).await;
    ws.send_json(&open(Some(&"ab".repeat(32)))).await;
    let theirs = ws.recv_json().await;
    assert_eq!(theirs["role"], "peer-proof");
    assert!(theirs["body"]["proof"].is_string() && theirs["body"]["nonce"].is_string());
    let text = theirs.to_string();
    assert!(
        !text.contains("s3cret"),
        "the secret never crosses the wire"
    );
    assert!(!text.contains('A') && !text.contains("127.0.0.1"), "{text}");
    ws.send_json(&json!({"role": "peer-proof", "body": {"proof": "00".repeat(32)}}))
        .await;
    assert_eq!(ws.expect_closed().await, Some(1008));
    assert!(common::refused_peer_links(&a.cluster_view()) >= 2);
    assert_eq!(a.cluster_view().node_names(), ["A", "B"]);

    for n in [c, b, a] {
        n.shutdown().await;
    }
}
