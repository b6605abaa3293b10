//! A request can be followed across the cluster: the node that takes it
//! logs a `request` span with its id, and a node that runs part of it logs a
//! `job` span with the same id.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{RawWs, cmd, flat};
use mpreg::Node;
use serde_json::json;
use tracing_subscriber::fmt::format::FmtSpan;

/// Log lines, captured.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        let bytes = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_follows_the_request_to_the_node_that_runs_it() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_env_filter("mpreg=debug")
        .with_span_events(FmtSpan::CLOSE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let fast = |name: &str| {
        Node::builder()
            .name(name)
            .listen("127.0.0.1:0")
            .without_linked_functions()
            .failure_detection(Duration::from_millis(100), Duration::from_millis(500))
    };
    let a = fast("A").start().await.expect("A");
    let b = fast("B")
        .datasets(["b"])
        .peers([a.url().expect("listens")])
        .start()
        .await
        .expect("B");
    assert!(
        a.wait_for(Duration::from_secs(30), |v| v.nodes_with_dataset("b") > 0)
            .await
    );

    let mut ws = RawWs::connect(&a.url().expect("listens")).await;
    let mut whoami = cmd("w", "mpreg.whoami", json!([]));
    whoami["locs"] = json!(["b"]);
    let reply = ws.request(&flat("trace-me-42", json!([whoami]))).await;
    assert_eq!(reply["r"]["w"], "B");
    drop(ws);
    for n in [b, a] {
        n.shutdown().await;
    }

    let logs = captured.text();
    let on = |span: &str, node: &str| {
        logs.lines().any(|l| {
            l.contains(&format!("{span}{{"))
                && l.contains(&format!("node={node}"))
                && l.contains("id=trace-me-42")
        })
    };
    assert!(
        on("request", "A"),
        "A logs the request with its id:\n{logs}"
    );
    assert!(on("job", "B"), "B logs its part with the same id:\n{logs}");
}
