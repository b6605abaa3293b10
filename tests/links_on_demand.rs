//! Members route to each other from their gossiped cards, without links;
//! a link opens when a command must go to a node and closes once idle, by
//! agreement, so no call is lost to the closing.

mod common;

use std::time::Duration;

use common::{guard, member, start_node};
use mpreg::{ClusterView, Command, NodeHandle, Request};

/// Only to stop a broken test from hanging; nothing is timed with it.
const CONVERGE: Duration = Duration::from_secs(30);

fn url(node: &NodeHandle) -> String {
    node.url().expect("listens")
}

/// Whether `view` shows a link to the node `name`.
fn linked(view: &ClusterView, name: &str) -> bool {
    view.node(name).is_some_and(|n| n.linked)
}

/// A cluster of `names`, joined through the first, each with a dataset of
/// its own name in lower case; links close after `idle`.
async fn cluster(names: &[&str], idle: Duration) -> Vec<NodeHandle> {
    let mut nodes: Vec<NodeHandle> = Vec::new();
    for name in names {
        let mut builder = member(name)
            .datasets([name.to_lowercase()])
            .keepalive(Duration::from_millis(20), Duration::from_secs(5))
            .link_idle_timeout(idle);
        if let Some(seed) = nodes.first() {
            builder = builder.peers([url(seed)]);
        }
        nodes.push(start_node(builder).await);
    }
    let datasets: Vec<String> = names.iter().map(|n| n.to_lowercase()).collect();
    for node in &nodes {
        let every = node
            .wait_for(CONVERGE, |view| {
                datasets.iter().all(|d| view.offers("echo", &[d.as_str()]))
            })
            .await;
        assert!(
            every,
            "{} never saw every dataset: {}",
            node.name(),
            node.cluster_view()
        );
    }
    nodes
}

async fn echo_on(entry: &NodeHandle, dataset: &str, value: u64) {
    let request = Request::new().cmd(Command::new("e", "echo").arg(value).dataset(dataset));
    let results = guard("echo", entry.send(request))
        .await
        .unwrap_or_else(|e| panic!("echo on {dataset} failed: {e}"));
    assert_eq!(results.get::<u64>("e").expect("a number"), value);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_route_by_card_and_links_follow_traffic() {
    let nodes = cluster(&["A", "B", "C", "D"], Duration::from_millis(300)).await;
    let a = &nodes[0];
    // Every node routes to every dataset, and nobody linked to anybody:
    // the cards came by gossip.
    for node in &nodes {
        let view = node.cluster_view();
        for other in ["A", "B", "C", "D"] {
            assert!(
                !linked(&view, other),
                "{} linked to {other}: {view}",
                node.name()
            );
        }
    }

    // A call for C's dataset opens a link from A to C, and only that one.
    echo_on(a, "c", 1).await;
    let view = a.cluster_view();
    assert!(linked(&view, "C"), "{view}");
    assert!(!linked(&view, "B") && !linked(&view, "D"), "{view}");
    assert_eq!(view.node("C").and_then(|n| n.jobs_sent), Some(1));

    // Idle, it closes, on both sides.
    let closed = a.wait_for(CONVERGE, |view| !linked(view, "C")).await;
    assert!(closed, "the idle link stayed: {}", a.cluster_view());
    let c_closed = nodes[2].wait_for(CONVERGE, |view| !linked(view, "A")).await;
    assert!(c_closed, "C kept its side: {}", nodes[2].cluster_view());

    // And opens again when needed.
    echo_on(a, "c", 2).await;
    assert!(linked(&a.cluster_view(), "C"));
    for node in nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_around_the_idle_close_are_never_lost() {
    let idle = Duration::from_millis(60);
    let nodes = cluster(&["A", "B"], idle).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    // Calls in both directions, spaced around the idle time, so some meet
    // a link that is deciding to close: each one must succeed.
    for i in 0..40u64 {
        let pause = idle * u32::try_from(5 + i % 11).expect("small") / 10;
        tokio::time::sleep(pause).await;
        let (entry, dataset) = if i % 3 == 0 { (b, "a") } else { (a, "b") };
        echo_on(entry, dataset, i).await;
    }
    for node in nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_member_leaves_the_views_without_ever_being_linked() {
    let nodes = cluster(&["A", "B", "C"], Duration::from_secs(60)).await;
    let mut nodes = nodes.into_iter();
    let (a, b, c) = (
        nodes.next().expect("A"),
        nodes.next().expect("B"),
        nodes.next().expect("C"),
    );
    c.kill().await;
    for node in [&a, &b] {
        let gone = node
            .wait_for(CONVERGE, |view| view.node("C").is_none())
            .await;
        assert!(gone, "C stayed in {}'s view", node.name());
        assert!(!node.cluster_view().offers("echo", &["c"]));
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaf_keeps_its_link_to_its_gateway_however_idle() {
    let idle = Duration::from_millis(50);
    let gateway = start_node(
        member("G")
            .keepalive(Duration::from_millis(20), Duration::from_secs(5))
            .link_idle_timeout(idle),
    )
    .await;
    let leaf = start_node(
        mpreg::Node::builder()
            .name("L")
            .without_linked_functions()
            .dial_out_only()
            .peers([url(&gateway)])
            .datasets(["leaf-data"])
            .keepalive(Duration::from_millis(20), Duration::from_secs(5))
            .link_idle_timeout(idle),
    )
    .await;
    let gateway_with_leaf =
        |view: &ClusterView| linked(view, "L") && view.offers("echo", &["leaf-data"]);
    assert!(gateway.wait_for(CONVERGE, gateway_with_leaf).await);
    // For ten idle times (the leaf dialed, but never closes its link to
    // its gateway), looked at every 10 ms: linked throughout (a closed
    // link would show, the leaf redials only after 100 ms or more).
    let closed = gateway
        .wait_for(idle * 10, |view| !gateway_with_leaf(view))
        .await;
    assert!(
        !closed,
        "the leaf's link closed: {}",
        gateway.cluster_view()
    );
    echo_on(&gateway, "leaf-data", 7).await;
    leaf.shutdown().await;
    gateway.shutdown().await;
}
