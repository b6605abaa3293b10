//! The attackers, each bounded in count and time, and what each saw.

use futures_util::future::join_all;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::http::header::AUTHORIZATION;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Bytes, Error as WsError, Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;

use super::*;

/// `a = echo("x" * 100)`, then `l1 = echos(a, a)`, ...,
/// `l<levels> = echos(l<levels-1>, l<levels-1>)`: each level doubles the
/// result (2^levels copies of `a` at the end).
pub(super) fn doubling_request(u: &str, levels: usize) -> String {
    let mut cmds = vec![json!({"name": "a", "fun": "echo", "args": ["x".repeat(100)]})];
    for i in 1..=levels {
        let prev = if i == 1 {
            "a".to_owned()
        } else {
            format!("l{}", i - 1)
        };
        cmds.push(json!({"name": format!("l{i}"), "fun": "echos", "args": [prev, prev]}));
    }
    json!({"role": "rpc", "u": u, "cmds": cmds}).to_string()
}

/// A request whose one argument is `depth` nested arrays (`u` first, so
/// that a reader can find it before the nesting).
pub(super) fn nested_request(u: &str, depth: usize) -> String {
    let mut out = String::with_capacity(2 * depth + 128);
    let _ = write!(
        out,
        "{{\"u\":{},\"role\":\"rpc\",\"cmds\":[{{\"name\":\"a\",\"fun\":\"echo\",\"args\":[",
        Value::from(u)
    );
    out.extend(std::iter::repeat_n('[', depth));
    out.extend(std::iter::repeat_n(']', depth));
    out.push_str("]}]}");
    out
}

/// A streaming request with a `u` of `u_bytes` bytes and `commands`
/// independent `echo` commands: every progress message carries the `u`.
pub(super) fn stream_request(u_bytes: usize, commands: usize) -> String {
    let cmds: Vec<Value> = (0..commands)
        .map(|i| json!({"name": format!("c{i}"), "fun": "echo", "args": [i]}))
        .collect();
    json!({"role": "rpc", "u": "u".repeat(u_bytes), "stream": true, "cmds": cmds}).to_string()
}

/// A request of about `bytes` bytes: one `echo` of a long string.
pub(super) fn echo_of_size(u: &str, bytes: usize) -> String {
    json!({"role": "rpc", "u": u, "cmds": [{"name": "a", "fun": "echo", "args": ["x".repeat(bytes)]}]})
        .to_string()
}

/// A peer's hello that proves nothing (with a challenge `nonce`, as a
/// dialer of a cluster with a secret sends, or without).
pub(super) fn peer_hello(nonce: Option<&str>) -> String {
    let mut body = json!({
        "protocol": 1,
        "name": "x",
        "addr": null,
        "generation": 1,
        "catalog": {"version": 1, "functions": []},
    });
    if let Some(nonce) = nonce {
        body["nonce"] = json!(nonce);
    }
    json!({"role": "peer-hello", "body": body}).to_string()
}

/// The opening of a link as this release's dialer sends it (`peer-open`),
/// with a challenge nonce: an acceptor answers with its proof, and must
/// say nothing about itself before the dialer's.
pub(super) fn peer_open(nonce: &str) -> String {
    json!({"role": "peer-open", "body": {"protocol": 2, "nonce": nonce}}).to_string()
}

/// A 32-byte challenge nonce in hex, different for each `n`.
pub(super) fn nonce_hex(n: u64) -> String {
    let mut x = n ^ 0x9e37_79b9_7f4a_7c15;
    let mut out = String::with_capacity(64);
    for _ in 0..4 {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let _ = write!(out, "{x:016x}");
    }
    out
}

// ---------------------------------------------------------------------------
// What attackers see (pure)
// ---------------------------------------------------------------------------

/// What a message from the node is: `error CODE`, `reply ok`, `progress`,
/// `ROLE message`...
pub(super) fn message_label(bytes: &[u8]) -> String {
    let Ok(v) = serde_json::from_slice::<Value>(bytes) else {
        return "a message that is not JSON".into();
    };
    if let Some(e) = v.get("error").filter(|e| !e.is_null()) {
        // mpreg's code is `kind` in either reply form (`code` is a number
        // in the form of the original project's later client).
        let code = [e.get("kind"), e.get("code")]
            .into_iter()
            .flatten()
            .find_map(Value::as_str)
            .unwrap_or("?");
        return format!("error {code}");
    }
    match v.get("role").and_then(Value::as_str) {
        Some("rpc-progress") => "progress".into(),
        Some("rpc-response") => "reply ok".into(),
        None if v.get("r").is_some() => "reply ok".into(),
        Some(role) => format!("{role} message"),
        None => "a message without a role".into(),
    }
}

/// The reply to request `u` in `bytes`: its label, with `, u null` when the
/// reply lost the id; `None` for a message that answers another request.
pub(super) fn reply_label(bytes: &[u8], u: &str) -> Option<String> {
    let Ok(v) = serde_json::from_slice::<Value>(bytes) else {
        return Some("a reply that is not JSON".into());
    };
    let id = v.get("u").unwrap_or(&Value::Null);
    if !id.is_null() && id.as_str() != Some(u) {
        return None;
    }
    let label = message_label(bytes);
    if label == "progress" {
        return None;
    }
    Some(if id.is_null() {
        format!("{label}, u null")
    } else {
        label
    })
}

pub(super) fn close_text(frame: Option<&CloseFrame>) -> String {
    match frame {
        Some(f) if f.reason.is_empty() => format!("closed {}", u16::from(f.code)),
        Some(f) => format!("closed {} \"{}\"", u16::from(f.code), f.reason.as_str()),
        None => "closed (no code)".into(),
    }
}

pub(super) fn gone_text(e: &WsError) -> String {
    match e {
        WsError::ConnectionClosed | WsError::AlreadyClosed => "connection closed".into(),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            "dropped (no close frame)".into()
        }
        WsError::Io(io) => format!("connection failed: {}", io.kind()),
        WsError::Protocol(p) => format!("protocol error: {p}"),
        WsError::Capacity(c) => format!("too big for this client: {c}"),
        other => other.to_string(),
    }
}

/// What happened to one attacker (or one kind of attacker).
#[derive(Debug, Default)]
pub(super) struct Tally {
    /// Requests, messages or connections sent.
    pub(super) sent: u64,
    /// What it saw, and how many times.
    pub(super) seen: BTreeMap<String, u64>,
    pub(super) notes: Vec<String>,
}

impl Tally {
    pub(super) fn saw(&mut self, what: impl Into<String>) {
        self.saw_n(what, 1);
    }

    pub(super) fn saw_n(&mut self, what: impl Into<String>, n: u64) {
        if n > 0 {
            *self.seen.entry(what.into()).or_default() += n;
        }
    }

    pub(super) fn merge(&mut self, other: Tally) {
        self.sent += other.sent;
        for (what, n) in other.seen {
            self.saw_n(what, n);
        }
        self.notes.extend(other.notes);
    }

    pub(super) fn failed(why: String) -> Self {
        let mut t = Self::default();
        t.saw(why);
        t
    }

    /// `most seen x N; next x M; note`.
    pub(super) fn summary(&self) -> String {
        let mut seen: Vec<(&String, &u64)> = self.seen.iter().collect();
        seen.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let mut parts: Vec<String> = seen
            .into_iter()
            .map(|(what, &n)| {
                if n == 1 {
                    what.clone()
                } else {
                    format!("{what} x{}", thousands(n))
                }
            })
            .collect();
        parts.extend(self.notes.iter().cloned());
        if parts.is_empty() {
            "nothing".into()
        } else {
            parts.join("; ")
        }
    }
}

// ---------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------

/// Attackers accept messages up to 128 MiB (a larger one is an error, not
/// memory of this process).
pub(super) fn attack_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(128 << 20))
        .max_frame_size(Some(128 << 20))
}

/// Opens a WebSocket to `url`, with `Authorization: Bearer TOKEN` when
/// `token` is given. The error is a label: `refused: HTTP 503`, ...
pub(super) async fn open(
    url: &str,
    token: Option<&str>,
    config: WebSocketConfig,
) -> Result<Ws, String> {
    let mut request = url
        .into_client_request()
        .map_err(|e| format!("bad URL: {e}"))?;
    if let Some(token) = token {
        let value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|e| e.to_string())?;
        request.headers_mut().insert(AUTHORIZATION, value);
    }
    let connect = tokio_tungstenite::connect_async_with_config(request, Some(config), true);
    match tokio::time::timeout(CONNECT_WAIT, connect).await {
        Err(_) => Err(format!(
            "upgrade not answered within {} s",
            CONNECT_WAIT.as_secs()
        )),
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(WsError::Http(response))) => {
            Err(format!("refused: HTTP {}", response.status().as_u16()))
        }
        Ok(Err(e)) => Err(format!("upgrade failed: {}", gone_text(&e))),
    }
}

/// Reads until the reply to `u`, the end of the connection, or `wait`.
/// Returns the reply's label and whether the connection is still usable.
pub(super) async fn reply_to(ws: &mut Ws, u: &str, wait: Duration) -> (String, bool) {
    let read = async {
        loop {
            let bytes = match ws.next().await {
                Some(Ok(Message::Text(t))) => Bytes::from(t),
                Some(Ok(Message::Binary(b))) => b,
                Some(Ok(Message::Close(f))) => return (close_text(f.as_ref()), false),
                Some(Ok(_)) => continue,
                None => return ("dropped (no close frame)".to_owned(), false),
                Some(Err(e)) => return (gone_text(&e), false),
            };
            if let Some(label) = reply_label(&bytes, u) {
                return (label, true);
            }
        }
    };
    match tokio::time::timeout(wait, read).await {
        Ok(seen) => seen,
        Err(_) => (format!("no reply within {} s", wait.as_secs()), false),
    }
}

/// Reads what the node sends on a connection for at most `budget`, until
/// it closes; records each kind of message (prefixed) and how it ended.
pub(super) async fn drain(ws: &mut Ws, budget: Duration, prefix: &str, tally: &mut Tally) {
    let end = tokio::time::Instant::now() + budget;
    let mut read: BTreeMap<String, u64> = BTreeMap::new();
    loop {
        let bytes = match tokio::time::timeout_at(end, ws.next()).await {
            Err(_) => {
                tally.saw(format!(
                    "still open after {:.0} s of reading",
                    budget.as_secs_f64()
                ));
                break;
            }
            Ok(Some(Ok(Message::Text(t)))) => Bytes::from(t),
            Ok(Some(Ok(Message::Binary(b)))) => b,
            Ok(Some(Ok(Message::Pong(_)))) => {
                *read.entry("pong".into()).or_default() += 1;
                continue;
            }
            Ok(Some(Ok(Message::Ping(_) | Message::Frame(_)))) => continue,
            Ok(Some(Ok(Message::Close(f)))) => {
                tally.saw(close_text(f.as_ref()));
                break;
            }
            Ok(None) => {
                tally.saw("dropped (no close frame)");
                break;
            }
            Ok(Some(Err(e))) => {
                tally.saw(gone_text(&e));
                break;
            }
        };
        *read.entry(message_label(&bytes)).or_default() += 1;
    }
    for (what, n) in read {
        tally.saw_n(format!("{prefix}{what}"), n);
    }
}

// ---------------------------------------------------------------------------
// The node and its memory
// ---------------------------------------------------------------------------

/// What every attacker shares: where, until when, and the emergency stop.
pub(super) struct Ctx {
    pub(super) url: String,
    pub(super) until: Instant,
    pub(super) stop: CancellationToken,
}

impl Ctx {
    pub(super) fn over(&self) -> bool {
        self.stop.is_cancelled() || Instant::now() >= self.until
    }

    /// Returns at the end of the attack run (or at the emergency stop).
    pub(super) async fn ended(&self) {
        tokio::select! {
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(self.until)) => {}
            _ = self.stop.cancelled() => {}
        }
    }

    pub(super) async fn pause(&self, d: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.ended() => {}
        }
    }
}

/// Sends `request(n)` over and over (with a token), one at a time, each
/// reply awaited; reconnects when the node closes the connection.
pub(super) async fn repeat_requests(
    ctx: Arc<Ctx>,
    pace: Duration,
    request: fn(&str) -> String,
) -> Tally {
    let mut tally = Tally::default();
    let mut ws: Option<Ws> = None;
    let mut n = 0u64;
    while !ctx.over() {
        let Some(conn) = ws.as_mut() else {
            match open(&ctx.url, Some(TOKEN), attack_config()).await {
                Ok(new) => ws = Some(new),
                Err(e) => {
                    tally.saw(e);
                    ctx.pause(Duration::from_millis(100)).await;
                }
            }
            continue;
        };
        n += 1;
        let u = format!("h-{n}");
        tally.sent += 1;
        if let Err(e) = conn.send(Message::text(request(&u))).await {
            tally.saw(format!("send failed: {}", gone_text(&e)));
            ws = None;
            continue;
        }
        let (seen, usable) = reply_to(conn, &u, REPLY_WAIT).await;
        tally.saw(seen);
        if !usable {
            ws = None;
        }
        ctx.pause(pace).await;
    }
    tally
}

pub(super) async fn doubling(ctx: Arc<Ctx>) -> Tally {
    repeat_requests(ctx, Duration::ZERO, |u| {
        doubling_request(u, DOUBLING_LEVELS)
    })
    .await
}

pub(super) async fn deep_nesting(ctx: Arc<Ctx>) -> Tally {
    let mut tally = repeat_requests(ctx, Duration::from_millis(50), |u| {
        nested_request(u, NESTING)
    })
    .await;
    let kept = tally
        .seen
        .iter()
        .filter(|(what, _)| what.starts_with("error bad_request") && !what.ends_with("u null"))
        .map(|(_, n)| n)
        .sum::<u64>();
    tally.notes.push(format!(
        "bad_request with its u: {} of {}",
        thousands(kept),
        thousands(tally.sent)
    ));
    tally
}

/// Opens `want` connections without a token (200 upgrades at a time),
/// never sends,
/// and holds them until the end of the run.
pub(super) async fn silent(ctx: Arc<Ctx>, want: usize) -> Tally {
    let mut tally = Tally::default();
    let mut holders: Vec<JoinHandle<(Vec<String>, Option<Duration>)>> = Vec::new();
    let started = Instant::now();
    let mut upgrades = futures_util::stream::iter(0..want)
        .map(|_| open(&ctx.url, None, attack_config()))
        .buffer_unordered(200);
    loop {
        let opened = tokio::select! {
            opened = upgrades.next() => opened,
            _ = ctx.ended() => None,
        };
        let Some(opened) = opened else { break };
        tally.sent += 1;
        match opened {
            Ok(ws) => holders.push(tokio::spawn(hold(ws, ctx.clone(), started))),
            Err(e) => tally.saw(e),
        }
    }
    // Upgrades still under way at the end are dropped.
    drop(upgrades);
    let upgraded = holders.len();
    let mut first_close: Option<Duration> = None;
    for holder in holders {
        match holder.await {
            Ok((seen, closed_at)) => {
                for what in seen {
                    tally.saw(what);
                }
                if let Some(at) = closed_at {
                    first_close = Some(first_close.map_or(at, |f| f.min(at)));
                }
            }
            Err(e) => tally.saw(format!("holder failed: {e}")),
        }
    }
    tally
        .notes
        .push(format!("{} upgraded", thousands(upgraded as u64)));
    if (tally.sent as usize) < want {
        tally.notes.push(format!(
            "{} upgrades not done by the end (dropped)",
            thousands((want - tally.sent as usize) as u64)
        ));
    }
    if let Some(at) = first_close {
        tally.notes.push(format!(
            "first closed by the node {:.1} s after the first upgrade",
            at.as_secs_f64()
        ));
    }
    tally
}

pub(super) async fn hold(
    mut ws: Ws,
    ctx: Arc<Ctx>,
    started: Instant,
) -> (Vec<String>, Option<Duration>) {
    let mut seen = Vec::new();
    loop {
        let message = tokio::select! {
            m = ws.next() => m,
            _ = ctx.ended() => {
                seen.push("open at the end".to_owned());
                return (seen, None);
            }
        };
        let end = match message {
            Some(Ok(Message::Text(t))) => {
                seen.push(message_label(t.as_bytes()));
                continue;
            }
            Some(Ok(Message::Close(f))) => close_text(f.as_ref()),
            Some(Ok(_)) => continue,
            None => "dropped (no close frame)".to_owned(),
            Some(Err(e)) => gone_text(&e),
        };
        seen.push(end);
        return (seen, Some(started.elapsed()));
    }
}

/// One streaming request with a 1 MiB `u` and 1,500 commands; never reads.
pub(super) async fn stream_never_read(ctx: Arc<Ctx>) -> Tally {
    let mut tally = Tally::default();
    let mut ws = match open(&ctx.url, Some(TOKEN), attack_config()).await {
        Ok(ws) => ws,
        Err(e) => return Tally::failed(e),
    };
    let request = stream_request(STREAM_U_BYTES, STREAM_COMMANDS);
    tally.sent = 1;
    tokio::select! {
        sent = ws.send(Message::text(request)) => {
            if let Err(e) = sent {
                tally.saw(format!("send failed: {}", gone_text(&e)));
                return tally;
            }
        }
        _ = ctx.ended() => tally.saw("request still being sent at the end"),
    }
    ctx.ended().await;
    drain(&mut ws, DRAIN, "read at the end: ", &mut tally).await;
    tally
}

/// One 60 MiB request as the first message of a connection without a
/// token; then what the node answers.
pub(super) async fn big_first(ctx: Arc<Ctx>, payload: Utf8Bytes) -> Tally {
    let mut tally = Tally::default();
    let mut ws = match open(&ctx.url, None, attack_config()).await {
        Ok(ws) => ws,
        Err(e) => return Tally::failed(e),
    };
    tally.sent = 1;
    // The node may take long to read it: the send may finish a little
    // after the end of the run, to see what the node makes of it.
    let bound = tokio::time::Instant::from_std(ctx.until + BIG_FIRST_OVERTIME);
    tokio::select! {
        sent = ws.send(Message::Text(payload)) => {
            if let Err(e) = sent {
                tally.saw(format!("send failed: {}", gone_text(&e)));
            }
        }
        _ = tokio::time::sleep_until(bound) => {
            tally.saw(format!("still sending {} s after the end", BIG_FIRST_OVERTIME.as_secs()));
            return tally;
        }
        _ = ctx.stop.cancelled() => {
            tally.saw("still sending at the emergency stop");
            return tally;
        }
    }
    drain(&mut ws, Duration::from_secs(5), "", &mut tally).await;
    tally
}

pub(super) async fn big_first_messages(ctx: Arc<Ctx>) -> Tally {
    let payload = Utf8Bytes::from(echo_of_size("big", BIG_FIRST_BYTES));
    let mut tally = Tally::default();
    for t in join_all((0..BIG_FIRST_CLIENTS).map(|_| big_first(ctx.clone(), payload.clone()))).await
    {
        tally.merge(t);
    }
    tally
}

/// `peer-hello` without proof, over and over (every other one with a
/// challenge nonce); what the node answers, and whether it names itself.
pub(super) async fn peer_hellos(ctx: Arc<Ctx>) -> Tally {
    let mut tally = Tally::default();
    let mut revealed = 0u64;
    while !ctx.over() {
        tally.sent += 1;
        // Three kinds in turn: the previous release's hello with and
        // without a nonce, and this release's opening, then a hello that
        // skips the proof.
        let (kind, first, then) = match tally.sent % 3 {
            0 => (
                "old hello, nonce",
                peer_hello(Some(&nonce_hex(tally.sent))),
                None,
            ),
            1 => ("old hello", peer_hello(None), None),
            _ => (
                "open, no proof",
                peer_open(&nonce_hex(tally.sent)),
                Some(peer_hello(None)),
            ),
        };
        let mut ws = match open(&ctx.url, None, attack_config()).await {
            Ok(ws) => ws,
            Err(e) => {
                tally.saw(format!("{kind}: {e}"));
                ctx.pause(Duration::from_millis(100)).await;
                continue;
            }
        };
        if let Err(e) = ws.send(Message::text(first)).await {
            tally.saw(format!("{kind}: send failed: {}", gone_text(&e)));
            continue;
        }
        // Everything the node says, up to its close (at most 3 messages,
        // 1 s each); any mention of its name counts as revealed.
        let mut seen = Vec::new();
        let mut then = then;
        for _ in 0..3 {
            let (text, more) = match tokio::time::timeout(Duration::from_secs(1), ws.next()).await {
                Err(_) => ("no answer within 1 s".to_owned(), false),
                Ok(Some(Ok(Message::Text(t)))) if t.as_str().contains(NODE_NAME) => {
                    revealed += 1;
                    (format!("its name ({})", message_label(t.as_bytes())), true)
                }
                Ok(Some(Ok(Message::Text(t)))) => (message_label(t.as_bytes()), true),
                Ok(Some(Ok(Message::Close(f)))) => (close_text(f.as_ref()), false),
                Ok(Some(Ok(other))) => (format!("{} frame", message_kind(&other)), true),
                Ok(None) => ("dropped (no close frame)".to_owned(), false),
                Ok(Some(Err(e))) => (gone_text(&e), false),
            };
            seen.push(text);
            if !more {
                break;
            }
            if let Some(next) = then.take()
                && ws.send(Message::text(next)).await.is_err()
            {
                break;
            }
        }
        let seen = seen.join(", then ");
        tally.saw(format!("{kind}: {seen}"));
        let _ = tokio::time::timeout(Duration::from_millis(200), ws.close(None)).await;
        ctx.pause(Duration::from_millis(20)).await;
    }
    tally.notes.push(format!(
        "name revealed in {} of {}",
        thousands(revealed),
        thousands(tally.sent)
    ));
    tally
}

pub(super) fn message_kind(m: &Message) -> &'static str {
    match m {
        Message::Text(_) => "text",
        Message::Binary(_) => "binary",
        Message::Ping(_) => "ping",
        Message::Pong(_) => "pong",
        Message::Close(_) => "close",
        Message::Frame(_) => "raw",
    }
}

/// 200 pipelined 1 MiB `echo` requests; never reads.
pub(super) async fn pipelined(ctx: Arc<Ctx>) -> Tally {
    let mut tally = Tally::default();
    let mut ws = match open(&ctx.url, Some(TOKEN), attack_config()).await {
        Ok(ws) => ws,
        Err(e) => return Tally::failed(e),
    };
    let template = echo_of_size("TEMPLATE-U", PIPELINED_BYTES);
    for i in 0..PIPELINED {
        if ctx.over() {
            break;
        }
        let frame = template.replacen("TEMPLATE-U", &format!("pipe-{i}"), 1);
        tokio::select! {
            sent = ws.send(Message::text(frame)) => {
                if let Err(e) = sent {
                    tally.saw(format!("send failed: {}", gone_text(&e)));
                    break;
                }
                tally.sent += 1;
            }
            _ = ctx.ended() => {
                tally.saw("writes blocked at the end");
                break;
            }
        }
    }
    ctx.ended().await;
    drain(&mut ws, DRAIN, "read at the end: ", &mut tally).await;
    tally
}

/// Up to 2 million 8-byte pings (1,000 per flush); never reads.
pub(super) async fn ping_flood(ctx: Arc<Ctx>) -> Tally {
    const BATCH: u64 = 1000;
    let mut tally = Tally::default();
    let mut ws = match open(&ctx.url, Some(TOKEN), attack_config()).await {
        Ok(ws) => ws,
        Err(e) => return Tally::failed(e),
    };
    while tally.sent < PINGS && !ctx.over() {
        let batch = async {
            for _ in 0..BATCH {
                ws.feed(Message::Ping(Bytes::from_static(b"hostile!")))
                    .await?;
            }
            ws.flush().await
        };
        let sent = tokio::select! {
            sent = batch => sent,
            _ = ctx.ended() => {
                tally.saw("writes blocked at the end");
                break;
            }
        };
        match sent {
            Ok(()) => tally.sent += BATCH,
            Err(e) => {
                tally.saw(format!("send failed: {}", gone_text(&e)));
                break;
            }
        }
    }
    ctx.ended().await;
    drain(&mut ws, DRAIN, "read at the end: ", &mut tally).await;
    tally
}

/// One row of the attackers' table.
pub(super) struct Attacker {
    pub(super) name: &'static str,
    pub(super) what: String,
    pub(super) tally: Tally,
}

pub(super) fn start_attackers(ctx: &Arc<Ctx>) -> Vec<(&'static str, String, JoinHandle<Tally>)> {
    let limit = open_files_limit();
    let silent_count = match limit {
        Some(l) => {
            SILENT_CONNECTIONS.min(usize::try_from(l.saturating_sub(400)).unwrap_or(usize::MAX))
        }
        None => SILENT_CONNECTIONS,
    };
    let mut silent_what = format!(
        "{} upgrades without a token, never send",
        thousands(silent_count as u64)
    );
    if silent_count < SILENT_CONNECTIONS {
        let _ = write!(silent_what, " (open-files limit {limit:?})");
    }
    let c = || ctx.clone();
    vec![
        (
            "doubling references",
            format!(
                "{} B request, {DOUBLING_LEVELS} levels echos(l, l), repeated",
                doubling_request("h-1", DOUBLING_LEVELS).len()
            ),
            tokio::spawn(doubling(c())),
        ),
        (
            "silent connections",
            silent_what,
            tokio::spawn(silent(c(), silent_count)),
        ),
        (
            "stream, never read",
            format!(
                "stream: true, {} KiB u, {} commands",
                STREAM_U_BYTES >> 10,
                thousands(STREAM_COMMANDS as u64)
            ),
            tokio::spawn(stream_never_read(c())),
        ),
        (
            "huge first messages",
            format!(
                "{BIG_FIRST_CLIENTS} x {} MiB first message, no token",
                BIG_FIRST_BYTES >> 20
            ),
            tokio::spawn(big_first_messages(c())),
        ),
        (
            "peer-hello, no proof",
            "repeated, with and without a nonce".to_owned(),
            tokio::spawn(peer_hellos(c())),
        ),
        (
            "pipelined, never read",
            format!("{PIPELINED} x {} MiB echo", PIPELINED_BYTES >> 20),
            tokio::spawn(pipelined(c())),
        ),
        (
            "ping flood, never read",
            format!("up to {} pings", thousands(PINGS)),
            tokio::spawn(ping_flood(c())),
        ),
        (
            "deep nesting",
            format!(
                "argument {} levels deep, repeated",
                thousands(NESTING as u64)
            ),
            tokio::spawn(deep_nesting(c())),
        ),
    ]
}

// ---------------------------------------------------------------------------
// The command
// ---------------------------------------------------------------------------
