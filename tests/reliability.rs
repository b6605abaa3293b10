//! Faults a node must survive: links that stall without closing.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::guard;
use mpreg::{Client, Command, ErrorCode, Function, Node, NodeHandle};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(30);

/// A TCP proxy on loopback that forwards to `target` until `stall` is set;
/// then it stops forwarding in both directions but keeps every socket open
/// (no FIN, no RST), like a frozen peer or a middlebox dropping packets.
async fn stalling_proxy(
    target: std::net::SocketAddr,
    stall: Arc<AtomicBool>,
) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let addr = listener.local_addr().expect("proxy addr");
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let Ok(outbound) = TcpStream::connect(target).await else {
                continue;
            };
            let (ri, wi) = inbound.into_split();
            let (ro, wo) = outbound.into_split();
            tokio::spawn(pump(ri, wo, stall.clone()));
            tokio::spawn(pump(ro, wi, stall.clone()));
        }
    });
    addr
}

/// Copies `from` to `to` until the proxy stalls; then holds both open.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    stall: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            break;
        }
        if stall.load(Ordering::SeqCst) {
            // Swallow everything from now on, and keep the sockets open.
            while !matches!(from.read(&mut buf).await, Ok(0) | Err(_)) {}
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
}

fn fast(name: &str) -> mpreg::NodeBuilder {
    Node::builder()
        .name(name)
        .listen("127.0.0.1:0")
        .without_linked_functions()
        .failure_detection(Duration::from_millis(100), Duration::from_millis(500))
        .keepalive(Duration::from_millis(100), Duration::from_millis(600))
}

/// Waits until `node` has a call in flight on the peer named `peer`.
async fn busy(node: &NodeHandle, peer: &str) {
    let ok = node
        .wait_for(WAIT, |v| v.node(peer).is_some_and(|n| n.load == 1))
        .await;
    assert!(ok, "{peer} never got the call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_link_is_detected_by_keepalive() {
    let gateway = fast("G").start().await.expect("start gateway");
    let stall = Arc::new(AtomicBool::new(false));
    let proxy = stalling_proxy(gateway.local_addr().expect("listens"), stall.clone()).await;
    let sleepy = Function::new("leaf.sleep", |args: mpreg::Args| async move {
        let ms = args
            .positional()
            .first()
            .and_then(Value::as_u64)
            .unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(Value::from(ms))
    });
    let leaf = fast("L")
        .dial_out_only()
        .function(sleepy)
        .peers([format!("ws://{proxy}")])
        .start()
        .await
        .expect("start leaf");
    let offers = |v: &mpreg::ClusterView| v.offers("leaf.sleep", &[]);
    assert!(
        gateway.wait_for(WAIT, offers).await,
        "the gateway serves the leaf"
    );

    let client = guard("connect", Client::connect(&gateway.url().expect("listens")))
        .await
        .expect("connect");
    let call = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .call_command::<u64>(Command::new("s", "leaf.sleep").arg(60_000))
                .await
        }
    });
    busy(&gateway, "L").await;
    stall.store(true, Ordering::SeqCst);

    // No FIN, no RST: only keepalive can tell the link is gone.
    let e = common::rpc_error(
        guard("call over a stalled link", call).await.expect("join"),
        ErrorCode::NodeLost,
    );
    assert_eq!(e.code, ErrorCode::NodeLost);
    assert!(
        gateway.wait_for(WAIT, |v| !offers(v)).await,
        "the leaf's function is gone"
    );
    // The gateway still serves everyone else.
    let n: i64 = guard("echo", client.call("echo", (3,)))
        .await
        .expect("echo");
    assert_eq!(n, 3);
    leaf.kill().await;
    gateway.shutdown().await;
}

/// Counts calls that started and handler futures that were dropped
/// (finished or cancelled).
#[derive(Default, Clone)]
struct Held {
    started: Arc<std::sync::atomic::AtomicUsize>,
    dropped: Arc<std::sync::atomic::AtomicUsize>,
}

struct DropCount(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for DropCount {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl Held {
    /// `held()`: waits a minute, unless its future is dropped first.
    fn function(&self) -> Function {
        let this = self.clone();
        Function::new("held", move |_args: mpreg::Args| {
            let this = this.clone();
            async move {
                this.started.fetch_add(1, Ordering::SeqCst);
                let _count = DropCount(this.dropped.clone());
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok(Value::Null)
            }
        })
        .datasets(["b"])
    }

    async fn wait_dropped(&self) {
        nonzero("the remote handler is cancelled", &self.dropped).await;
    }
}

/// Waits (bounded by the hang guard) until `counter` is not zero.
async fn nonzero(what: &str, counter: &std::sync::atomic::AtomicUsize) {
    guard(what, async {
        while counter.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// A and B, B serving `held` with dataset "b".
async fn pair(held: &Held) -> (NodeHandle, NodeHandle) {
    let a = fast("A").start().await.expect("A");
    let b = fast("B")
        .function(held.function())
        .peers([a.url().expect("listens")])
        .start()
        .await
        .expect("B");
    assert!(a.wait_for(WAIT, |v| v.offers("held", &[])).await);
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_cancels_work_on_the_remote_node() {
    let held = Held::default();
    let (a, b) = pair(&held).await;
    let client = guard("connect", Client::connect(&a.url().expect("listens")))
        .await
        .expect("connect");
    let request = mpreg::Request::new()
        .cmd(Command::new("h", "held").dataset("b"))
        .timeout(Duration::from_millis(300));
    let e = guard("call", client.send(request))
        .await
        .expect_err("deadline");
    assert!(
        matches!(e, mpreg::Error::Rpc(ref e) if e.code == ErrorCode::Timeout),
        "{e:?}"
    );
    assert_eq!(held.started.load(Ordering::SeqCst), 1, "it ran on B");
    held.wait_dropped().await;
    for n in [b, a] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_cancels_work_on_the_remote_node() {
    let held = Held::default();
    let (a, b) = pair(&held).await;
    let client = guard("connect", Client::connect(&a.url().expect("listens")))
        .await
        .expect("connect");
    let call = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .call_command::<Value>(Command::new("h", "held").dataset("b"))
                .await
        }
    });
    // Wait until the handler runs on B (not only until A has counted the
    // call: the job may not have left A yet).
    nonzero("the call starts on B", &held.started).await;
    // The client goes away with its call in flight.
    call.abort();
    drop(client);
    held.wait_dropped().await;
    assert_eq!(held.started.load(Ordering::SeqCst), 1);
    for n in [b, a] {
        n.shutdown().await;
    }
}
