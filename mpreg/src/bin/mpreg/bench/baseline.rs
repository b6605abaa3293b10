//! The baseline: a bare WebSocket server that does the least a server of
//! this protocol can do, for mpreg to be compared with.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// A bare tokio-tungstenite server: parses each frame into a JSON value,
/// takes its `u` and answers `{"u":..,"r":{"x":null},"error":null}`, with a
/// writer task per connection that writes what is queued and flushes once
/// (as mpreg's connections do). No routing, no planning, no task per request.
#[derive(Debug)]
pub(crate) struct Baseline {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Baseline {
    /// Starts on `127.0.0.1:0`.
    pub(crate) async fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => {
                            let _ = stream.set_nodelay(true);
                            connections.spawn(baseline_connection(stream));
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    },
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        Ok(Self { addr, task })
    }

    pub(crate) fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// Stops accepting and drops every connection.
    pub(crate) fn stop(self) {
        // Dropping the JoinSet with the task aborts the connections.
        self.task.abort();
    }
}

async fn baseline_connection(stream: TcpStream) {
    let config = WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20));
    let Ok(ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    let (mut sink, mut source) = ws.split();
    let (replies, mut queue) = mpsc::channel::<Message>(1024);
    let writer = tokio::spawn(async move {
        while let Some(first) = queue.recv().await {
            if sink.feed(first).await.is_err() {
                return;
            }
            while let Ok(next) = queue.try_recv() {
                if sink.feed(next).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
        let _ = sink.close().await;
    });
    while let Some(Ok(message)) = source.next().await {
        let bytes = match message {
            Message::Text(text) => tokio_tungstenite::tungstenite::Bytes::from(text),
            Message::Binary(bytes) => bytes,
            Message::Close(_) => break,
            _ => continue,
        };
        let u = match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(mut object)) => object.remove("u").unwrap_or(Value::Null),
            _ => Value::Null,
        };
        let reply = format!("{{\"u\":{u},\"r\":{{\"x\":null}},\"error\":null}}");
        if replies.send(Message::text(reply)).await.is_err() {
            break;
        }
    }
    drop(replies);
    let _ = writer.await;
}
