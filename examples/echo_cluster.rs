//! Starts a small mpreg cluster on loopback and runs the five reference
//! requests of the original project through it, printing each request and its
//! result as JSON.
//!
//! ```text
//! cargo run --example echo_cluster
//! ```
//!
//! Every node listens on its own OS-chosen port.

use mpreg::{Client, Command, Node, Request};
use serde_json::{Value, json};

/// Upper-cases a string: a function of this binary, served by every node.
#[mpreg::rpc]
fn shout(text: String) -> String {
    text.to_uppercase()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let nodes = [
        Node::builder().name("balancer").start().await?,
        Node::builder()
            .name("worker-ab")
            .datasets(["model-a", "model-b"])
            .start()
            .await?,
        Node::builder()
            .name("worker-c")
            .datasets(["model-c"])
            .start()
            .await?,
    ];
    for node in &nodes {
        println!(
            "# node {} listening on {}",
            node.name(),
            node.url().expect("node listens")
        );
    }

    let client = Client::connect(&nodes[0].url().expect("node listens")).await?;
    for (i, example) in mpreg::demo::reference_examples().into_iter().enumerate() {
        let shown = json!({ "cmds": example.request.cmds });
        println!("request {}: {shown}", i + 1);
        let results = Value::Object(client.send(example.request).await?.into_map());
        println!("result  {}: {results}", i + 1);
        if results != example.expected {
            return Err(format!("expected {}", example.expected).into());
        }
    }

    // A request using a function of this binary and a dataset.
    let worker = Client::connect(&nodes[1].url().expect("node listens")).await?;
    let request = Request::new()
        .cmd(Command::new("greeting", "echo").arg("hello from mpreg"))
        .cmd(Command::new("loud", "shout").arg("greeting"))
        .cmd(Command::new("where", "mpreg.whoami").dataset("model-a"));
    println!("request 6: {}", json!({ "cmds": request.cmds }));
    let results = Value::Object(worker.send(request).await?.into_map());
    println!("result  6: {results}");

    for node in nodes {
        node.shutdown().await;
    }
    Ok(())
}
