//! The well-behaved client, on a thread and runtime of its own.

use super::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_util::sync::CancellationToken;

/// One `echo` of "hi" as request `id` on `ws`: Ok, or why not and whether
/// the connection is still usable.
pub(super) async fn echo_once(
    ws: &mut Ws,
    template: &Template,
    id: u64,
) -> Result<(), (String, bool)> {
    if let Err(e) = ws.send(Message::text(template.frame(id))).await {
        return Err((format!("send failed: {}", gone_text(&e)), false));
    }
    let read = async {
        loop {
            let bytes = match ws.next().await {
                Some(Ok(Message::Text(t))) => Bytes::from(t),
                Some(Ok(Message::Binary(b))) => b,
                Some(Ok(Message::Close(f))) => {
                    return Err((
                        format!("the node closed the connection: {}", close_text(f.as_ref())),
                        false,
                    ));
                }
                Some(Ok(_)) => continue,
                None => return Err(("dropped (no close frame)".to_owned(), false)),
                Some(Err(e)) => return Err((gone_text(&e), false)),
            };
            match check_reply(&bytes) {
                Checked::Ok(u) if u == id => {
                    let v: Value = serde_json::from_slice(&bytes).unwrap_or_default();
                    return if v["r"]["a"] == "hi" {
                        Ok(())
                    } else {
                        Err((format!("wrong result: {}", v["r"]), true))
                    };
                }
                Checked::Failed(u, e) if u == id => return Err((e, true)),
                _ => continue,
            }
        }
    };
    match tokio::time::timeout(REPLY_WAIT, read).await {
        Ok(outcome) => outcome,
        Err(_) => Err((format!("no reply within {} s", REPLY_WAIT.as_secs()), false)),
    }
}

/// Sequential `echo` requests until `until` (or `stop`), on `first` and,
/// when a connection is lost, on a new one. Every request sent and every
/// connection that could not be opened is an attempt; `ok` of `sent`
/// succeeded.
pub(super) async fn well_behaved(
    url: &str,
    first: Result<Ws, String>,
    until: Instant,
    window: Duration,
    stop: &CancellationToken,
) -> Report {
    let template = Template::echo();
    let mut report = Report::new(window);
    let mut ws = match first {
        Ok(ws) => Some(ws),
        Err(e) => {
            report.sent += 1;
            report.error(1, format!("cannot connect: {e}"));
            None
        }
    };
    let mut id = 0;
    while Instant::now() < until && !stop.is_cancelled() {
        let Some(conn) = ws.as_mut() else {
            match open(url, Some(TOKEN), client_config()).await {
                Ok(new) => ws = Some(new),
                Err(e) => {
                    report.sent += 1;
                    report.error(1, format!("cannot connect: {e}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            continue;
        };
        id += 1;
        report.sent += 1;
        let at = Instant::now();
        let outcome = tokio::select! {
            outcome = echo_once(conn, &template, id) => outcome,
            _ = stop.cancelled() => Err(("the node is gone".to_owned(), false)),
        };
        match outcome {
            Ok(()) => {
                report.ok += 1;
                report.ok_total += 1;
                let us = u64::try_from(at.elapsed().as_micros()).unwrap_or(u64::MAX);
                report.latency.saturating_record(us.max(1));
            }
            Err((why, usable)) => {
                if why.starts_with("no reply within") {
                    report.timeouts += 1;
                    if report.first_error.is_none() {
                        report.first_error = Some(why);
                    }
                } else {
                    report.error(1, why);
                }
                if !usable {
                    ws = None;
                }
            }
        }
    }
    if let Some(mut ws) = ws {
        let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    }
    report
}

/// Runs the well-behaved client on a thread of its own, with its own
/// single-thread runtime, so that the attackers' work in this process does
/// not delay its tasks (they still share the machine's cores). Once it is
/// connected, `ready` gets the end of its run.
pub(super) fn client_thread(
    url: String,
    secs: Duration,
    stop: CancellationToken,
) -> BenchResult<(
    std::thread::JoinHandle<Report>,
    tokio::sync::oneshot::Receiver<Instant>,
)> {
    let (ready, connected) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("well-behaved".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let mut report = Report::new(secs);
                    report.sent = 1;
                    report.error(1, format!("cannot start the client's runtime: {e}"));
                    let _ = ready.send(Instant::now());
                    return report;
                }
            };
            runtime.block_on(async move {
                let first = open(&url, Some(TOKEN), client_config()).await;
                let until = Instant::now() + secs;
                let _ = ready.send(until);
                well_behaved(&url, first, until, secs, &stop).await
            })
        })?;
    Ok((thread, connected))
}

/// Waits for the client's thread (it stops by itself: at most a reply wait
/// and a connection attempt after `until`).
pub(super) async fn join_client(
    thread: std::thread::JoinHandle<Report>,
    until: Instant,
) -> BenchResult<Report> {
    let bound = tokio::time::Instant::from_std(until + REPLY_WAIT + CONNECT_WAIT * 2);
    match tokio::time::timeout_at(bound, tokio::task::spawn_blocking(move || thread.join())).await {
        Ok(Ok(Ok(report))) => Ok(report),
        Ok(Ok(Err(_))) => Err("the well-behaved client panicked".into()),
        Ok(Err(e)) => Err(format!("the well-behaved client's thread failed: {e}").into()),
        Err(_) => Err("the well-behaved client did not stop".into()),
    }
}

pub(super) fn success_pct(r: &Report) -> f64 {
    if r.sent == 0 {
        0.0
    } else {
        r.ok as f64 * 100.0 / r.sent as f64
    }
}

// ---------------------------------------------------------------------------
// The attackers
// ---------------------------------------------------------------------------
