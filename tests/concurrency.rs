//! Many requests at once on one connection, from the Rust client and from
//! raw frames, and a client vanishing mid-request.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{RawWs, builder, client, cmd, flat, guard, ok_r, start_node, wait_until};
use mpreg::{Args, Function, RpcError};
use serde_json::{Value, json};

const N: usize = 1_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_calls_over_one_client_connection() {
    let node = common::start_default().await;
    let client = client(&node).await;
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let got: (usize, String) = client.call("echos", (i, "x")).await?;
                Ok::<_, mpreg::Error>((i, got))
            })
        })
        .collect();
    let mut answered = vec![false; N];
    for task in tasks {
        let (i, got) = guard("task", task)
            .await
            .expect("task joins")
            .expect("call succeeds");
        assert_eq!(
            got,
            (i, "x".to_owned()),
            "task {i} got someone else's reply"
        );
        assert!(!answered[i]);
        answered[i] = true;
    }
    assert!(answered.iter().all(|&a| a));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_pipelined_raw_requests_each_answered_once() {
    let node = common::start_default().await;
    let mut ws = RawWs::connect(&node.url().expect("node listens")).await;
    for i in 0..N {
        ws.feed_json(&flat(
            format!("r{i}"),
            json!([cmd("e", "echos", json!([i, "x"]))]),
        ))
        .await;
    }
    ws.flush().await;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..N {
        let reply = ws.recv_json().await;
        let u = reply["u"].as_str().expect("string id").to_owned();
        let i: usize = u[1..].parse().expect("id r<i>");
        assert_eq!(ok_r(&reply, &json!(u)), json!({"e": [i, "x"]}), "{u}");
        *seen.entry(u).or_default() += 1;
    }
    assert_eq!(seen.len(), N, "every id answered");
    assert!(seen.values().all(|&n| n == 1), "each exactly once");
    // Nothing extra is pending: the next reply belongs to the next request.
    let reply = ws
        .request(&flat("tail", json!([cmd("e", "echo", json!([1]))])))
        .await;
    assert_eq!(ok_r(&reply, &json!("tail")), json!({"e": 1}));
}

/// Counts the futures of `hold` that were dropped before finishing.
struct DropCount(Arc<AtomicUsize>);

impl Drop for DropCount {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_dropping_mid_request_does_not_disturb_the_node() {
    let started = Arc::new(AtomicUsize::new(0));
    let dropped = Arc::new(AtomicUsize::new(0));
    let hold = Function::new("hold", {
        let started = started.clone();
        let dropped = dropped.clone();
        move |_args: Args| {
            let started = started.clone();
            let dropped = dropped.clone();
            async move {
                let _guard = DropCount(dropped);
                started.fetch_add(1, Ordering::SeqCst);
                // Far longer than the test: only cancellation ends it.
                std::future::pending::<()>().await;
                Ok::<_, RpcError>(Value::Null)
            }
        }
    });
    let node = start_node(builder().function(hold)).await;
    let steady = client(&node).await;

    let leaving = client(&node).await;
    let calls = [
        tokio::spawn({
            let c = leaving.clone();
            async move { c.call::<Value>("hold", ()).await }
        }),
        tokio::spawn({
            let c = leaving.clone();
            async move { c.call::<Value>("debug.sleep", (60_000,)).await }
        }),
    ];
    wait_until("hold started", || started.load(Ordering::SeqCst) == 1).await;

    // The leaving client goes away with both requests in flight.
    for call in &calls {
        call.abort();
    }
    for call in calls {
        let _ = guard("aborted call", call).await;
    }
    drop(leaving);

    // The node cancels the abandoned work...
    wait_until("abandoned handler cancelled", || {
        dropped.load(Ordering::SeqCst) == 1
    })
    .await;
    // ...and keeps serving the other client and new ones.
    let got: String = guard("steady echo", steady.call("echo", ("still here",)))
        .await
        .expect("other client works");
    assert_eq!(got, "still here");
    let fresh = client(&node).await;
    let got: Vec<i64> = guard("fresh echos", fresh.call("echos", (1, 2)))
        .await
        .expect("new client works");
    assert_eq!(got, [1, 2]);
    assert_eq!(started.load(Ordering::SeqCst), 1);
}
