//! A client given several seed URLs: it connects to the first that answers,
//! fails calls in flight when its node goes away (without resending them),
//! reconnects to another seed on the next call, one reconnection at a time,
//! and says which seeds failed when none answers.

mod common;

use common::Hold;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{builder, guard, start_node, url};
use mpreg::{Client, Error, NodeBuilder, NodeHandle};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

/// Three nodes `n0`, `n1`, `n2` (not clustered: a client needs none of
/// that), each also given what `extra` adds.
async fn three(extra: impl Fn(NodeBuilder) -> NodeBuilder) -> Vec<Option<NodeHandle>> {
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(Some(
            start_node(extra(builder().name(format!("n{i}")))).await,
        ));
    }
    nodes
}

/// Kills the node listening at `at` (taking it out of `nodes`); returns its
/// index.
async fn kill_at(nodes: &mut [Option<NodeHandle>], at: &str) -> usize {
    let i = nodes
        .iter()
        .position(|n| n.as_ref().is_some_and(|n| url(n) == at))
        .unwrap_or_else(|| panic!("no node at {at}"));
    let node = nodes[i].take().expect("node still running");
    guard("kill", node.kill()).await;
    i
}

/// Starts a `hold` call through `client`, kills the nodes at `urls` while
/// it runs, and checks that the call fails with the connection-lost error
/// (it is never resent).
async fn lose_call_in_flight(
    client: &Client,
    hold: &Hold,
    nodes: &mut [Option<NodeHandle>],
    urls: &[String],
) {
    let in_flight = tokio::spawn({
        let client = client.clone();
        async move { client.call::<String>("hold", ()).await }
    });
    guard("hold started", hold.started.notified()).await;
    for url in urls {
        kill_at(nodes, url).await;
    }
    let outcome = guard("in-flight call", in_flight)
        .await
        .expect("task joins");
    assert!(
        matches!(outcome, Err(Error::Closed)),
        "the call in flight fails with the connection-lost error, got {outcome:?}"
    );
}

async fn whoami(client: &Client) -> Result<String, Error> {
    guard("whoami", client.call("mpreg.whoami", ())).await
}

/// A loopback address where nothing listens (bound by the OS, then closed).
async fn dead_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    format!("ws://{addr}")
}

/// A TCP proxy to `target` that counts the connections it accepts.
async fn counting_proxy(target: SocketAddr) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let addr = listener.local_addr().expect("proxy addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let Ok(mut outbound) = TcpStream::connect(target).await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    (format!("ws://{addr}"), accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_call_fails_and_the_next_call_runs_on_another_node() {
    let hold = Hold::default();
    let mut nodes = three(|b| b.function(hold.function())).await;
    let seeds: Vec<String> = nodes.iter().flatten().map(url).collect();
    let client = guard("connect", Client::connect_any(seeds.clone()))
        .await
        .expect("connects");
    assert_eq!(client.url(), seeds[0], "the first seed that answers");
    assert_eq!(whoami(&client).await.expect("call works"), "n0");

    // A call that is running on the node when it dies.
    let lost = client.url();
    lose_call_in_flight(&client, &hold, &mut nodes, std::slice::from_ref(&lost)).await;
    let killed = seeds.iter().position(|s| *s == lost).expect("a seed");

    // The next call reconnects to the next seed.
    let now = whoami(&client).await.expect("next call succeeds");
    assert_eq!(now, format!("n{}", (killed + 1) % 3));
    assert_ne!(client.url(), lost);
    assert_eq!(client.url(), seeds[(killed + 1) % 3]);
    // And stays there.
    assert_eq!(whoami(&client).await.expect("again"), now);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_first_seed_at_connect_time_is_skipped() {
    let nodes = three(|b| b).await;
    let dead = dead_url().await;
    let seeds = [dead, url(nodes[1].as_ref().expect("n1"))];
    let client = guard("connect", Client::connect_any(seeds.clone()))
        .await
        .expect("connects to the second seed");
    assert_eq!(client.url(), seeds[1]);
    assert_eq!(whoami(&client).await.expect("call works"), "n1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_seed_answering_is_a_typed_error_naming_each_seed() {
    let hold = Hold::default();
    let mut nodes = three(|b| b.function(hold.function())).await;
    let seeds: Vec<String> = nodes.iter().flatten().map(url).collect();
    // Should a dying node's listener still take a connection, the attempt
    // ends at the connect timeout.
    let client = guard(
        "connect",
        Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .connect_any(seeds.clone()),
    )
    .await
    .expect("connects");

    // Everything goes down while a call runs on the client's node.
    lose_call_in_flight(&client, &hold, &mut nodes, &seeds).await;

    // The next call tries every seed once: the others first, the lost one
    // last.
    let e = whoami(&client).await.expect_err("nothing answers");
    let Error::NoSeedReachable { attempts } = &e else {
        panic!("expected NoSeedReachable, got {e:?}");
    };
    let tried: Vec<&str> = attempts.iter().map(|(u, _)| u.as_str()).collect();
    assert_eq!(tried, [&seeds[1], &seeds[2], &seeds[0]]);
    for (seed, why) in attempts {
        assert!(
            matches!(why, Error::Connect { url, .. } if url == seed),
            "{why:?}"
        );
    }
    let text = e.to_string();
    for seed in &seeds {
        assert!(text.contains(seed.as_str()), "{text} names {seed}");
    }

    // A new client fails the same way, in the order given.
    let e = guard(
        "connect",
        Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .connect_any(seeds.clone()),
    )
    .await
    .expect_err("nothing answers");
    let Error::NoSeedReachable { attempts } = e else {
        panic!("expected NoSeedReachable, got {e:?}");
    };
    let tried: Vec<&String> = attempts.iter().map(|(u, _)| u).collect();
    assert_eq!(tried, seeds.iter().collect::<Vec<_>>());

    // No seeds at all is a configuration error.
    let e = Client::connect_any(Vec::<String>::new())
        .await
        .expect_err("no seeds");
    assert!(matches!(e, Error::Config(_)), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_during_failover_share_one_new_connection() {
    let hold = Hold::default();
    let mut nodes = three(|b| b.function(hold.function())).await;
    let n1 = nodes[1]
        .as_ref()
        .expect("n1")
        .local_addr()
        .expect("listens");
    // n1 is reached through a proxy that counts connections.
    let (proxied, accepted) = counting_proxy(n1).await;
    let seeds = [
        url(nodes[0].as_ref().expect("n0")),
        proxied.clone(),
        url(nodes[2].as_ref().expect("n2")),
    ];
    let client = guard("connect", Client::connect_any(seeds.clone()))
        .await
        .expect("connects");
    assert_eq!(client.url(), seeds[0]);

    lose_call_in_flight(&client, &hold, &mut nodes, std::slice::from_ref(&seeds[0])).await;

    // Many calls at once find the connection lost: one reconnects, the
    // others wait for it, and all succeed on the one new connection.
    let calls: Vec<_> = (0..16)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { client.call::<Value>("echo", (i,)).await })
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        let got = guard("call", call).await.expect("task joins");
        assert_eq!(got.expect("call succeeds after failover"), json!(i));
    }
    assert_eq!(client.url(), proxied);
    assert_eq!(whoami(&client).await.expect("whoami"), "n1");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one connection for every caller"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_presented_to_every_seed() {
    let hold = Hold::default();
    let mut nodes = three(|b| b.client_tokens(["s3cret"]).function(hold.function())).await;
    let seeds: Vec<String> = nodes.iter().flatten().map(url).collect();
    let client = guard(
        "connect",
        Client::builder().token("s3cret").connect_any(seeds.clone()),
    )
    .await
    .expect("connects");
    assert_eq!(whoami(&client).await.expect("authorized"), "n0");

    lose_call_in_flight(&client, &hold, &mut nodes, std::slice::from_ref(&seeds[0])).await;
    assert_eq!(
        whoami(&client).await.expect("authorized on the next seed"),
        "n1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_on_one_url_does_not_fail_over() {
    let hold = Hold::default();
    let mut nodes = three(|b| b.function(hold.function())).await;
    let only = url(nodes[0].as_ref().expect("n0"));
    let client = guard("connect", Client::connect(&only))
        .await
        .expect("connects");
    lose_call_in_flight(&client, &hold, &mut nodes, std::slice::from_ref(&only)).await;
    let after = whoami(&client).await;
    assert!(matches!(after, Err(Error::Closed)), "{after:?}");
    assert_eq!(client.url(), only);
}
