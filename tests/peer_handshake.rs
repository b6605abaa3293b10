//! The opening of peer links, seen from outside: with a cluster secret a
//! peer that cannot prove it learns nothing; without one, a peer cannot
//! take the place of a live member; dialers carry a peer ticket.

mod common;

use std::time::Duration;

use common::{RawWs, guard, member as node, url};
use mpreg::{Client, Command, Function, Node, NodeHandle};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(30);

fn refused(node: &NodeHandle) -> u64 {
    common::refused_peer_links(&node.cluster_view())
}
/// Everything the node sends until it closes the connection: the text of
/// its messages, and the close frame's code and reason.
async fn until_closed(ws: &mut RawWs) -> (Vec<String>, Option<(u16, String)>) {
    let mut texts = Vec::new();
    // Bounded by the hang guard in `next_frame`, and by frame count here.
    for _ in 0..64 {
        match ws.next_frame().await {
            Some(Ok(Message::Text(t))) => texts.push(t.to_string()),
            Some(Ok(Message::Binary(b))) => texts.push(String::from_utf8_lossy(&b).into_owned()),
            Some(Ok(Message::Close(frame))) => {
                return (
                    texts,
                    frame.map(|f| (u16::from(f.code), f.reason.to_string())),
                );
            }
            None | Some(Err(_)) => return (texts, None),
            Some(Ok(_)) => continue,
        }
    }
    panic!("connection neither closed nor ended");
}

async fn whoami(client: &Client, dataset: &str) -> Result<String, mpreg::Error> {
    client
        .call_command(Command::new("w", "mpreg.whoami").dataset(dataset))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_the_secret_learns_nothing() {
    let private = Function::new("alpha.private_fn", |_args: mpreg::Args| async {
        Ok(Value::from("private"))
    })
    .doc("alpha documentation");
    let a = node("alpha-node")
        .cluster_secret("s3cret")
        .client_tokens(["tok"])
        .datasets(["alpha-private-data"])
        .function(private)
        .start()
        .await
        .expect("start A");
    let addr = a.local_addr().expect("A listens").to_string();
    let client = guard("connect", Client::builder().token("tok").connect(&url(&a)))
        .await
        .expect("connect");
    let served = || async {
        let n: i64 = guard("echo", client.call("echo", (7,)))
            .await
            .expect("the token client is served");
        assert_eq!(n, 7);
    };
    served().await;
    let reveals = |texts: &[String]| {
        texts.iter().find_map(|t| {
            [
                "alpha-node",
                addr.as_str(),
                "alpha.private_fn",
                "alpha documentation",
                "alpha-private-data",
                "generation",
                "catalog",
                "s3cret",
            ]
            .into_iter()
            .find(|secret| t.contains(secret))
            .map(|secret| format!("{t} reveals {secret}"))
        })
    };

    // An opening without a challenge: closed, with nothing said.
    let mut ws = RawWs::connect(&url(&a)).await;
    ws.send_json(&json!({"role": "peer-open", "body": {"protocol": 3}}))
        .await;
    let (texts, close) = until_closed(&mut ws).await;
    assert!(texts.is_empty(), "{texts:?}");
    assert_eq!(close.map(|c| c.0), Some(1008));

    // A hello with no proof at all, as protocol 1 opened: closed.
    let mut ws = RawWs::connect(&url(&a)).await;
    ws.send_json(
        &json!({"role": "peer-hello", "body": {"protocol": 1, "name": "intruder",
        "addr": null, "generation": 1, "catalog": {"version": 1, "functions": []}}}),
    )
    .await;
    let (texts, close) = until_closed(&mut ws).await;
    assert!(texts.is_empty(), "{texts:?}");
    assert_eq!(close.map(|c| c.0), Some(1008));
    served().await;

    // A challenge: A proves itself (a nonce and a proof, nothing else);
    // a hello without the dialer's proof then closes the link.
    let mut ws = RawWs::connect(&url(&a)).await;
    ws.send_json(&json!({"role": "peer-open", "body": {"protocol": 3, "nonce": "ab".repeat(32)}}))
        .await;
    let proof = ws.recv_json().await;
    assert_eq!(proof["role"], "peer-proof");
    let body = proof["body"].as_object().expect("a body");
    let mut keys: Vec<&str> = body.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["nonce", "proof"]);
    assert!(proof.to_string().len() < 300, "{proof}");
    ws.send_json(
        &json!({"role": "peer-hello", "body": {"protocol": 3, "name": "intruder",
        "addr": null, "generation": 1, "catalog": {"version": 1, "functions": []}}}),
    )
    .await;
    let (mut texts, close) = until_closed(&mut ws).await;
    texts.push(proof.to_string());
    assert_eq!(reveals(&texts), None);
    let (code, reason) = close.expect("a close frame");
    assert_eq!(code, 1008);
    assert!(reason.contains("peer-proof"), "{reason}");

    // A first peer message too large to read before a proof: closed
    // without being decoded.
    let mut ws = RawWs::connect(&url(&a)).await;
    let padding = "x".repeat(8 << 10);
    ws.send_text(&format!(
        r#"{{"role":"peer-open","body":{{"protocol":2,"nonce":"{padding}"}}}}"#
    ))
    .await;
    let (texts, close) = until_closed(&mut ws).await;
    assert!(texts.is_empty(), "{texts:?}");
    assert_eq!(close.map(|c| c.0), Some(1008));
    assert!(refused(&a) >= 4, "{:?}", a.cluster_view());
    assert_eq!(a.cluster_view().node_names(), ["alpha-node"]);
    served().await;

    // A real peer with the secret still links, and is routed to.
    let b = node("B")
        .cluster_secret("s3cret")
        .datasets(["b-data"])
        .peers([url(&a)])
        .start()
        .await
        .expect("start B");
    assert!(
        a.wait_for(WAIT, |v| v.node_names() == ["B", "alpha-node"])
            .await,
        "B links: {}",
        a.cluster_view()
    );
    assert_eq!(
        guard("routed to B", whoami(&client, "b-data"))
            .await
            .expect("B"),
        "B"
    );
    served().await;
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_secret_an_impostor_cannot_replace_a_live_member() {
    let a = node("A").start().await.expect("start A");
    let b = node("B")
        .datasets(["b-data"])
        .peers([url(&a)])
        .start()
        .await
        .expect("start B");
    let b_addr = b.local_addr().expect("B listens");
    assert!(
        a.wait_for(WAIT, |v| v.node_names() == ["A", "B"]).await,
        "B joins"
    );
    let client = guard("connect", Client::connect(&url(&a)))
        .await
        .expect("connect");
    assert_eq!(
        guard("whoami", whoami(&client, "b-data")).await.expect("B"),
        "B"
    );

    // An impostor claims B's address, as a newer generation, offering what
    // B offers.
    let before = refused(&a);
    let mut ws = RawWs::connect(&url(&a)).await;
    ws.send_json(&json!({"role": "peer-open", "body": {"protocol": 3}}))
        .await;
    ws.send_json(&json!({"role": "peer-hello", "body": {
        "protocol": 3, "name": "impostor", "addr": b_addr.to_string(),
        "generation": u64::MAX,
        "catalog": {"version": 1, "functions": [
            {"fun": "mpreg.whoami", "datasets": ["b-data"], "idempotent": true}
        ]}
    }}))
    .await;
    let (_, close) = until_closed(&mut ws).await;
    let (code, reason) = close.expect("a close frame");
    assert_eq!(code, 1008);
    assert!(reason.contains("live peer has this address"), "{reason}");
    assert_eq!(refused(&a), before + 1);

    // B is still the one at its address, and calls still go to it.
    let view = a.cluster_view();
    assert_eq!(view.node_names(), ["A", "B"], "{view}");
    assert!(!view.to_string().contains("impostor"), "{view}");
    for _ in 0..20 {
        assert_eq!(
            guard("whoami", whoami(&client, "b-data")).await.expect("B"),
            "B"
        );
    }

    // Once B is gone, a restart at its address is routable again.
    b.kill().await;
    assert!(
        a.wait_for(WAIT, |v| v.node_names() == ["A"]).await,
        "B leaves"
    );
    let b = node("B")
        .listen(b_addr.to_string())
        .datasets(["b-data"])
        .peers([url(&a)])
        .start()
        .await
        .expect("restart B");
    assert!(
        a.wait_for(WAIT, |v| v.node_names() == ["A", "B"]).await,
        "B is back"
    );
    assert_eq!(
        guard("whoami", whoami(&client, "b-data"))
            .await
            .expect("B again"),
        "B"
    );
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_need_the_same_secret_on_both_sides() {
    let a = node("A")
        .cluster_secret("s3cret")
        .start()
        .await
        .expect("start A");
    // Leaves dial A themselves (no gossip to filter them out first).
    let wrong = Node::builder()
        .name("wrong-leaf")
        .dial_out_only()
        .without_linked_functions()
        .cluster_secret("other")
        .peers([url(&a)])
        .start()
        .await
        .expect("start the wrong leaf");
    assert!(
        wrong
            .wait_for(WAIT, |v| common::refused_peer_links(v) > 0)
            .await,
        "the leaf refuses A's proof"
    );
    let right = Node::builder()
        .name("right-leaf")
        .dial_out_only()
        .without_linked_functions()
        .cluster_secret("s3cret")
        .peers([url(&a)])
        .start()
        .await
        .expect("start the right leaf");
    assert!(
        a.wait_for(WAIT, |v| v.node_names() == ["A", "right-leaf"])
            .await,
        "the leaf with the secret links: {}",
        a.cluster_view()
    );
    assert_eq!(wrong.cluster_view().node_names(), ["wrong-leaf"]);
    assert!(
        right
            .wait_for(WAIT, |v| v.node_names() == ["A", "right-leaf"])
            .await,
        "the leaf sees A"
    );
    for n in [wrong, right, a] {
        n.shutdown().await;
    }
}

/// The head of the upgrade request a node sends to a fake acceptor.
async fn upgrade_request_of(builder: mpreg::NodeBuilder) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let fake = listener.local_addr().expect("addr");
    let leaf = builder
        .dial_out_only()
        .without_linked_functions()
        .peers([format!("ws://{fake}")])
        .start()
        .await
        .expect("start the leaf");
    let (mut stream, _) = guard("the leaf dials", listener.accept())
        .await
        .expect("accept");
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    // Bounded: a request head is well under 64 KiB.
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 << 10 {
        let n = guard("read the request", stream.read(&mut buf))
            .await
            .expect("read");
        assert!(n > 0, "the request ended early");
        head.extend_from_slice(&buf[..n]);
    }
    leaf.kill().await;
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialers_carry_a_peer_ticket_only_with_a_secret() {
    let head = upgrade_request_of(Node::builder().cluster_secret("s3cret")).await;
    let ticket = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("mpreg-peer-ticket")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("no ticket in {head}"));
    let parts: Vec<&str> = ticket.split('.').collect();
    assert_eq!(parts.len(), 3, "{ticket}");
    let ms: u64 = parts[0].parse().expect("time in ms");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    assert!(ms.abs_diff(now) < 60_000, "{ms} vs {now}");
    let hex = |s: &str| s.bytes().all(|b| b.is_ascii_hexdigit());
    assert!(parts[1].len() == 32 && hex(parts[1]), "{ticket}");
    assert!(parts[2].len() == 64 && hex(parts[2]), "{ticket}");
    assert!(!head.contains("s3cret"));

    let head = upgrade_request_of(Node::builder()).await;
    assert!(
        !head.to_ascii_lowercase().contains("mpreg-peer-ticket"),
        "{head}"
    );
}
