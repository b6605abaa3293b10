//! Plain HTTP on the node's port: `/healthz`, `/metrics` (Prometheus), the
//! status page `/` and the data it polls, `/status.json`.
//!
//! Every connection starts with an HTTP request head, WebSocket or not.
//! [`peek`] reads that head (at most [`MAX_HEAD`] bytes) and looks for
//! `Upgrade: websocket`: a WebSocket connection goes on to the WebSocket
//! handshake with the bytes read so far put back in front of the stream
//! ([`Rewind`]); anything else is answered here by [`answer`], one request
//! per connection, and closed. This runs after the TLS handshake, so with
//! TLS the same paths are served over `https://`.
//!
//! When the node requires client tokens, everything but `/healthz` needs
//! one too: `Authorization: Bearer TOKEN` or `?token=TOKEN`, checked as for
//! WebSocket clients.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::metrics::{BUCKETS, Exposition, FunctionSnapshot, bucket_bound};
use crate::node::RunningNode;

/// The largest request head read, in bytes; a longer one gets `431`.
pub(crate) const MAX_HEAD: usize = 16 << 10;

/// Most headers in a request head (as many as the WebSocket library takes).
const MAX_HEADERS: usize = 124;

/// The status page, one self-contained file.
const STATUS_PAGE: &str = include_str!("status.html");

/// What a connection turned out to be.
#[derive(Debug)]
pub(crate) enum Peeked<S> {
    /// A WebSocket upgrade: the stream, with the head read so far put back.
    WebSocket(Rewind<S>),
    /// A plain HTTP request (or a head that is not valid HTTP: the status to
    /// answer with).
    Http(S, Result<Head, Status>),
}

/// The parts of a plain HTTP request head that matter here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Head {
    method: String,
    path: String,
    query: Option<String>,
    /// The token of an `Authorization: Bearer TOKEN` header.
    bearer: Option<String>,
}

/// An HTTP status code with its reason phrase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Status(u16, &'static str);

const OK: Status = Status(200, "OK");
const BAD_REQUEST: Status = Status(400, "Bad Request");
const UNAUTHORIZED: Status = Status(401, "Unauthorized");
const NOT_FOUND: Status = Status(404, "Not Found");
const METHOD_NOT_ALLOWED: Status = Status(405, "Method Not Allowed");
const HEAD_TOO_LARGE: Status = Status(431, "Request Header Fields Too Large");
const UNAVAILABLE: Status = Status(503, "Service Unavailable");

/// Reads a connection's request head and tells a WebSocket upgrade from a
/// plain HTTP request. Fails when the connection ends (or breaks) before a
/// whole head arrived. The caller bounds the time it may take.
pub(crate) async fn peek<S: AsyncRead + Unpin>(mut stream: S) -> io::Result<Peeked<S>> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let start = buf.len();
        buf.resize((start + 2048).min(MAX_HEAD), 0);
        let n = stream.read(&mut buf[start..]).await?;
        buf.truncate(start + n);
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        // Parse only when a line ended, so a head sent byte by byte costs
        // one parse per line, not one per byte.
        if !buf[start..].contains(&b'\n') && buf.len() < MAX_HEAD {
            continue;
        }
        match parse(&buf) {
            Parsed::Partial if buf.len() < MAX_HEAD => continue,
            Parsed::Partial => return Ok(Peeked::Http(stream, Err(HEAD_TOO_LARGE))),
            Parsed::Invalid(status) => return Ok(Peeked::Http(stream, Err(status))),
            Parsed::Upgrade => return Ok(Peeked::WebSocket(Rewind::new(buf, stream))),
            Parsed::Plain(head) => return Ok(Peeked::Http(stream, Ok(head))),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// More bytes are needed.
    Partial,
    Invalid(Status),
    /// A complete head asking for a WebSocket.
    Upgrade,
    Plain(Head),
}

fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Partial) => Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => Parsed::Invalid(HEAD_TOO_LARGE),
        Err(_) => Parsed::Invalid(BAD_REQUEST),
        Ok(httparse::Status::Complete(_)) => {
            let header = |name| header_values(request.headers, name);
            let upgrade = header("upgrade")
                .flat_map(|v| v.split(','))
                .any(|t| t.trim().eq_ignore_ascii_case("websocket"));
            if upgrade {
                return Parsed::Upgrade;
            }
            let bearer = header("authorization")
                .find_map(|v| v.strip_prefix("Bearer "))
                .map(|t| t.trim().to_owned());
            // A complete parse always has a method and a target.
            let (Some(method), Some(target)) = (request.method, request.path) else {
                return Parsed::Invalid(BAD_REQUEST);
            };
            let (path, query) = match target.split_once('?') {
                Some((path, query)) => (path, Some(query.to_owned())),
                None => (target, None),
            };
            Parsed::Plain(Head {
                method: method.to_owned(),
                path: path.to_owned(),
                query,
                bearer,
            })
        }
    }
}

/// The values of the headers named `name` (any case) that are text.
fn header_values<'a>(
    headers: &'a [httparse::Header<'a>],
    name: &'static str,
) -> impl Iterator<Item = &'a str> {
    headers
        .iter()
        .filter(move |h| h.name.eq_ignore_ascii_case(name))
        .filter_map(|h| std::str::from_utf8(h.value).ok())
}

/// What the routes need from a node (a trait, so they are tested without
/// one).
trait Site {
    /// Whether the node is stopping (`/healthz` says 503).
    fn stopping(&self) -> bool;
    /// Whether clients must present a token.
    fn tokens_required(&self) -> bool;
    /// Whether `token` is one of the client tokens.
    fn accepts(&self, token: &str) -> bool;
    /// The `/metrics` text.
    fn metrics(&self) -> String;
    /// The `/status.json` document.
    fn status(&self) -> Value;
}

/// One response.
#[derive(Debug)]
struct Response {
    status: Status,
    content_type: &'static str,
    body: Vec<u8>,
    /// Extra header lines, each ending in CRLF.
    headers: &'static str,
}

impl Response {
    fn text(status: Status, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into().into_bytes(),
            headers: "",
        }
    }

    fn with(mut self, content_type: &'static str, headers: &'static str) -> Self {
        self.content_type = content_type;
        self.headers = headers;
        self
    }

    /// The bytes on the wire; without the body for `HEAD`.
    fn encode(&self, with_body: bool) -> Vec<u8> {
        let Status(code, reason) = self.status;
        let mut out = format!(
            "HTTP/1.1 {code} {reason}\r\ncontent-type: {}\r\ncontent-length: {}\r\ncache-control: no-store\r\nx-content-type-options: nosniff\r\nconnection: close\r\n{}\r\n",
            self.content_type,
            self.body.len(),
            self.headers
        )
        .into_bytes();
        if with_body {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

/// The answer to a request `head` (or to a head that failed to parse).
fn route(head: &Result<Head, Status>, site: &dyn Site) -> Response {
    let head = match head {
        Ok(head) => head,
        Err(status) if *status == HEAD_TOO_LARGE => {
            return Response::text(
                *status,
                format!(
                    "request head larger than {MAX_HEAD} bytes or with more than {MAX_HEADERS} headers\n"
                ),
            );
        }
        Err(status) => return Response::text(*status, "not a valid HTTP/1.1 request head\n"),
    };
    let protected = match head.path.as_str() {
        "/healthz" => false,
        "/" | "/metrics" | "/status.json" => true,
        _ => {
            return Response::text(
                NOT_FOUND,
                "not found: this node serves /, /status.json, /metrics and /healthz over HTTP, and WebSocket clients\n",
            );
        }
    };
    if head.method != "GET" && head.method != "HEAD" {
        return Response::text(METHOD_NOT_ALLOWED, "only GET and HEAD\n")
            .with("text/plain; charset=utf-8", "allow: GET, HEAD\r\n");
    }
    if protected && site.tokens_required() {
        let query_token = head
            .query
            .as_deref()
            .and_then(|q| q.split('&').find_map(|pair| pair.strip_prefix("token=")));
        let authorized = [head.bearer.as_deref(), query_token]
            .into_iter()
            .flatten()
            .any(|t| site.accepts(t));
        if !authorized {
            return Response::text(
                UNAUTHORIZED,
                "a client token is required: `Authorization: Bearer TOKEN` or `?token=TOKEN`\n",
            )
            .with("text/plain; charset=utf-8", "www-authenticate: Bearer\r\n");
        }
    }
    match head.path.as_str() {
        "/healthz" if site.stopping() => Response::text(UNAVAILABLE, "stopping\n"),
        "/healthz" => Response::text(OK, "ok\n"),
        "/metrics" => Response::text(OK, site.metrics()).with("text/plain; version=0.0.4; charset=utf-8", ""),
        "/status.json" => Response::text(OK, site.status().to_string()).with("application/json", ""),
        _ => Response::text(OK, STATUS_PAGE).with(
            "text/html; charset=utf-8",
            // The page is self-contained: nothing but itself and its data.
            "content-security-policy: default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:\r\n",
        ),
    }
}

impl Site for RunningNode {
    fn stopping(&self) -> bool {
        self.is_stopping()
    }

    fn tokens_required(&self) -> bool {
        self.tokens.required()
    }

    fn accepts(&self, token: &str) -> bool {
        self.tokens.accepts(token)
    }

    fn metrics(&self) -> String {
        let registry = self.registry();
        Exposition {
            node: &self.name,
            counts: self.metrics.snapshot(),
            peers: self
                .cluster
                .view(&self.own(&registry))
                .nodes
                .iter()
                .filter(|n| n.linked)
                .count(),
            refused_peer_links: self
                .cluster
                .refused
                .load(std::sync::atomic::Ordering::Relaxed),
            unauthenticated: self.unauthenticated.count(),
            functions: registry
                .iter()
                .map(|f| (f.name(), f.metrics.snapshot()))
                .collect(),
        }
        .render()
    }

    fn status(&self) -> Value {
        let registry = self.registry();
        let counts = self.metrics.snapshot();
        let functions: Map<String, Value> = registry
            .iter()
            .map(|f| (f.name.clone(), function_status(&f.metrics.snapshot())))
            .collect();
        let view = self.cluster_view();
        json!({
            "node": self.name,
            "version": env!("CARGO_PKG_VERSION"),
            "stopping": self.is_stopping(),
            "peers": view.nodes.len().saturating_sub(1),
            "cluster": view,
            "functions": self.cluster_functions(),
            "metrics": {
                "requests_received": counts.received,
                "requests_answered": counts.answered(),
                "requests": counts.outcomes().collect::<BTreeMap<_, _>>(),
                "client_connections": counts.connections,
                "latency_bounds_seconds": (0..BUCKETS).map(bucket_bound).collect::<Vec<_>>(),
                "functions": functions,
            },
        })
    }
}

fn function_status(s: &FunctionSnapshot) -> Value {
    json!({
        "started": s.started,
        "ended": s.ended(),
        "in_flight": s.in_flight(),
        "outcomes": s.outcomes().collect::<BTreeMap<_, _>>(),
        "latency_cumulative": s.cumulative,
        "latency_sum_seconds": s.sum_seconds,
    })
}

/// How long a closed connection's unread bytes are drained, so that the
/// client sees the response rather than a reset.
const LINGER: Duration = Duration::from_secs(1);

/// Answers one plain HTTP request and closes the connection. The caller
/// bounds the time it may take.
pub(crate) async fn answer<S>(mut stream: S, head: Result<Head, Status>, state: &RunningNode)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let response = route(&head, state);
    let with_body = !matches!(&head, Ok(h) if h.method == "HEAD");
    tracing::debug!(
        path = head.as_ref().map_or("", |h| h.path.as_str()),
        status = response.status.0,
        "HTTP request"
    );
    if stream.write_all(&response.encode(with_body)).await.is_err() {
        return;
    }
    let _ = stream.shutdown().await;
    // Closing with unread bytes (the rest of an oversized head, a body)
    // would reset the connection and could lose the response: read them
    // first, for a moment and up to a bound.
    let mut sink = [0u8; 4096];
    let drain = async {
        for _ in 0..64 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// A stream with bytes already read from it put back in front.
#[derive(Debug)]
pub(crate) struct Rewind<S> {
    prefix: Vec<u8>,
    /// How much of `prefix` was read again.
    read: usize,
    inner: S,
}

impl<S> Rewind<S> {
    fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            read: 0,
            inner,
        }
    }

    /// The stream underneath.
    pub(crate) fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Bytes put back and not yet read again.
    pub(crate) fn buffered(&self) -> usize {
        self.prefix.len() - self.read
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.read < this.prefix.len() {
            let rest = &this.prefix[this.read..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.read += n;
            if this.read == this.prefix.len() {
                // Done with it: free the memory.
                this.prefix = Vec::new();
                this.read = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake {
        stopping: bool,
        token: Option<&'static str>,
    }

    impl Site for Fake {
        fn stopping(&self) -> bool {
            self.stopping
        }
        fn tokens_required(&self) -> bool {
            self.token.is_some()
        }
        fn accepts(&self, token: &str) -> bool {
            self.token == Some(token)
        }
        fn metrics(&self) -> String {
            "# metrics\n".into()
        }
        fn status(&self) -> Value {
            json!({"node": "fake"})
        }
    }

    const OPEN: Fake = Fake {
        stopping: false,
        token: None,
    };

    fn head(text: &str) -> Result<Head, Status> {
        match parse(text.as_bytes()) {
            Parsed::Plain(head) => Ok(head),
            Parsed::Invalid(status) => Err(status),
            other => panic!("not a plain request: {other:?}"),
        }
    }

    fn get(site: &Fake, request: &str) -> Response {
        route(&head(request), site)
    }

    #[test]
    fn parses_heads() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost: x\r\n"), Parsed::Partial);
        assert_eq!(
            parse(b"GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: WebSocket\r\n\r\n"),
            Parsed::Upgrade
        );
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nupgrade: h2c, websocket\r\n\r\n"),
            Parsed::Upgrade
        );
        assert_eq!(
            parse(b"\x16\x03\x01\x02\x00 binary\r\n\r\n"),
            Parsed::Invalid(BAD_REQUEST)
        );
        assert_eq!(
            head("GET /metrics?token=a%20b&x=1 HTTP/1.0\r\nAuthorization: Bearer t0k\r\n\r\n"),
            Ok(Head {
                method: "GET".into(),
                path: "/metrics".into(),
                query: Some("token=a%20b&x=1".into()),
                bearer: Some("t0k".into()),
            })
        );
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("x-{i}: y\r\n"))
            .collect();
        assert_eq!(
            parse(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()),
            Parsed::Invalid(HEAD_TOO_LARGE)
        );
    }

    #[test]
    fn routes() {
        let r = get(&OPEN, "GET /healthz HTTP/1.1\r\n\r\n");
        assert_eq!((r.status, r.body.as_slice()), (OK, &b"ok\n"[..]));
        assert!(r.content_type.starts_with("text/plain"));
        let r = get(&OPEN, "GET /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(r.content_type, "text/plain; version=0.0.4; charset=utf-8");
        let r = get(&OPEN, "GET /status.json HTTP/1.1\r\n\r\n");
        assert_eq!(r.content_type, "application/json");
        let r = get(&OPEN, "GET / HTTP/1.1\r\n\r\n");
        assert!(r.content_type.starts_with("text/html"));
        assert!(String::from_utf8_lossy(&r.body).contains("status.json"));
        assert_eq!(get(&OPEN, "GET /nope HTTP/1.1\r\n\r\n").status, NOT_FOUND);
        let r = get(&OPEN, "DELETE /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(r.status, METHOD_NOT_ALLOWED);
        assert!(r.headers.contains("allow: GET, HEAD"));
        assert_eq!(route(&Err(BAD_REQUEST), &OPEN).status, BAD_REQUEST);
        assert_eq!(route(&Err(HEAD_TOO_LARGE), &OPEN).status, HEAD_TOO_LARGE);
    }

    #[test]
    fn healthz_fails_while_stopping() {
        let stopping = Fake {
            stopping: true,
            token: None,
        };
        assert_eq!(
            get(&stopping, "GET /healthz HTTP/1.1\r\n\r\n").status,
            UNAVAILABLE
        );
    }

    #[test]
    fn tokens_guard_everything_but_healthz() {
        let guarded = Fake {
            stopping: false,
            token: Some("s3cret"),
        };
        for path in ["/", "/metrics", "/status.json"] {
            let r = get(&guarded, &format!("GET {path} HTTP/1.1\r\n\r\n"));
            assert_eq!(r.status, UNAUTHORIZED, "{path}");
            assert!(r.headers.contains("www-authenticate: Bearer"));
            let r = get(
                &guarded,
                &format!("GET {path}?token=wrong HTTP/1.1\r\n\r\n"),
            );
            assert_eq!(r.status, UNAUTHORIZED, "{path} with a wrong token");
            let r = get(
                &guarded,
                &format!("GET {path}?a=1&token=s3cret HTTP/1.1\r\n\r\n"),
            );
            assert_eq!(r.status, OK, "{path} with ?token=");
            let r = get(
                &guarded,
                &format!("GET {path} HTTP/1.1\r\nAuthorization: Bearer s3cret\r\n\r\n"),
            );
            assert_eq!(r.status, OK, "{path} with a bearer token");
        }
        assert_eq!(get(&guarded, "GET /healthz HTTP/1.1\r\n\r\n").status, OK);
    }

    #[test]
    fn head_requests_have_no_body() {
        let r = get(&OPEN, "HEAD /healthz HTTP/1.1\r\n\r\n");
        let bytes = r.encode(false);
        let text = String::from_utf8(bytes).expect("text");
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("content-length: 3\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n"), "no body: {text:?}");
    }

    #[tokio::test]
    async fn rewind_replays_then_reads_on() {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b" world").await.expect("write");
        drop(client);
        let mut stream = Rewind::new(b"hello".to_vec(), server);
        let mut all = String::new();
        stream.read_to_string(&mut all).await.expect("read");
        assert_eq!(all, "hello world");
    }

    #[tokio::test]
    async fn peek_tells_websocket_from_http() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let upgrade =
            "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nFRAME";
        client.write_all(upgrade.as_bytes()).await.expect("write");
        let Ok(Peeked::WebSocket(mut stream)) = peek(server).await else {
            panic!("an upgrade");
        };
        drop(client);
        let mut again = String::new();
        stream.read_to_string(&mut again).await.expect("read");
        assert_eq!(again, upgrade, "every byte read is replayed");

        let (mut client, server) = tokio::io::duplex(1 << 16);
        client
            .write_all(&vec![b'a'; MAX_HEAD + 10])
            .await
            .expect("write");
        let Ok(Peeked::Http(_, Err(status))) = peek(server).await else {
            panic!("too large");
        };
        assert_eq!(status, HEAD_TOO_LARGE);

        let (mut client, server) = tokio::io::duplex(1 << 16);
        client.write_all(b"GET /he").await.expect("write");
        drop(client);
        assert!(peek(server).await.is_err(), "ended before the head did");
    }
}
