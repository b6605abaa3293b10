//! Plain HTTP on the node's port: `/healthz`, `/metrics` (counts, outcomes
//! and histograms after real calls), `/status.json`, token protection, TLS,
//! bad request heads, and WebSocket clients and peers on the same port.
//! Requests are written by hand on a raw TCP (or TLS) stream.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{builder, client, guard, start_node};
use mpreg::{Command, ErrorCode, NodeHandle, Request};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response as read off the wire.
#[derive(Debug)]
struct Response {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }
}

/// Writes `request` as it is and reads the response until the node closes
/// the connection.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, request: &[u8]) -> Response {
    guard("HTTP exchange", async {
        stream.write_all(request).await.expect("write request");
        let mut raw = Vec::new();
        // The node closes after one response; a reset after it is fine.
        let _ = stream.read_to_end(&mut raw).await;
        parse_response(&raw)
    })
    .await
}

fn parse_response(raw: &[u8]) -> Response {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("a whole response head: {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a status line: {status_line:?}"));
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .expect("a content-length");
    // HEAD responses announce a length but carry no body.
    assert!(
        body.len() == length || body.is_empty(),
        "body of {length} bytes: {body:?}"
    );
    Response {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// Polls `/metrics` (every 10 ms, a bounded number of times) until `cond`
/// holds for its samples.
async fn eventually(
    node: &NodeHandle,
    what: &str,
    mut cond: impl FnMut(&BTreeMap<String, f64>) -> bool,
) {
    for _ in 0..1_000 {
        if cond(&samples(&get(node, "/metrics").await.body)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never held: {what}");
}

fn addr(node: &NodeHandle) -> SocketAddr {
    node.local_addr().expect("node listens")
}

/// A plain request with the given method, target and extra header lines.
async fn request(node: &NodeHandle, method: &str, target: &str, headers: &str) -> Response {
    let stream = guard("connect", TcpStream::connect(addr(node)))
        .await
        .expect("TCP connect");
    let text = format!("{method} {target} HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n");
    exchange(stream, text.as_bytes()).await
}

async fn get(node: &NodeHandle, target: &str) -> Response {
    request(node, "GET", target, "").await
}

/// The samples of a metrics text: series (name and labels as written) →
/// value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("series value");
            (series.to_owned(), value.parse().expect("a number"))
        })
        .collect()
}

fn sample(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("no sample {series} in {samples:#?}"))
}

/// The `_bucket` samples of `function`'s latency histogram, in order.
fn buckets(samples: &BTreeMap<String, f64>, function: &str) -> Vec<(f64, f64)> {
    let prefix =
        format!("mpreg_function_call_duration_seconds_bucket{{function=\"{function}\",le=\"");
    let mut buckets: Vec<(f64, f64)> = samples
        .iter()
        .filter_map(|(series, &n)| {
            let le = series.strip_prefix(&prefix)?.strip_suffix("\"}")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().expect("le is a number")
            };
            Some((le, n))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

#[tokio::test]
async fn healthz_answers_plain_text() {
    let node = start_node(builder()).await;
    let r = get(&node, "/healthz").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "ok\n");
    assert!(r.header("content-type").starts_with("text/plain"), "{r:?}");
    assert_eq!(r.header("connection"), "close");

    let r = request(&node, "HEAD", "/healthz", "").await;
    assert_eq!((r.status, r.body.as_str()), (200, ""), "HEAD has no body");
    assert_eq!(r.header("content-length"), "3");
    node.shutdown().await;
}

#[tokio::test]
async fn metrics_count_calls_by_outcome_with_histograms() {
    let (counting, _) = common::counting("add");
    let node = start_node(builder().function(counting)).await;
    let client = client(&node).await;
    for i in 0..5 {
        let r: Vec<i64> = guard("call", client.call("add", (i, 1)))
            .await
            .expect("add");
        assert_eq!(r, [i, 1]);
    }
    for _ in 0..2 {
        let e = guard("fail", client.call::<Value>("debug.fail", ("no",)))
            .await
            .expect_err("debug.fail fails");
        assert!(
            matches!(e, mpreg::Error::Rpc(ref e) if e.code == ErrorCode::HandlerFailed),
            "{e}"
        );
    }
    let e = guard("panic", client.call::<Value>("debug.panic", ()))
        .await
        .expect_err("debug.panic fails");
    assert!(
        matches!(e, mpreg::Error::Rpc(ref e) if e.code == ErrorCode::HandlerFailed),
        "{e}"
    );
    // A request whose deadline passes while its handler runs: cancelled.
    let late = Request::new()
        .cmd(Command::new("s", "debug.sleep").arg(20_000))
        .timeout(Duration::from_millis(50));
    let e = guard("timeout", client.send(late))
        .await
        .expect_err("times out");
    assert!(
        matches!(e, mpreg::Error::Rpc(ref e) if e.code == ErrorCode::Timeout),
        "{e}"
    );

    // The deadline drops the call at once, or aborts its task soon after.
    let calls_of = |s: &BTreeMap<String, f64>, f: &str, outcome: &str| {
        let series =
            format!("mpreg_function_calls_total{{function=\"{f}\",outcome=\"{outcome}\"}}");
        s.get(&series).copied().unwrap_or(0.0)
    };
    eventually(&node, "the late call ends as cancelled", |s| {
        calls_of(s, "debug.sleep", "cancelled") == 1.0
    })
    .await;
    let r = get(&node, "/metrics").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let s = samples(&r.body);
    let calls = |f: &str, outcome: &str| {
        sample(
            &s,
            &format!("mpreg_function_calls_total{{function=\"{f}\",outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!(calls("add", "ok"), 5.0);
    assert_eq!(
        sample(&s, "mpreg_function_calls_started_total{function=\"add\"}"),
        5.0
    );
    assert_eq!(
        sample(&s, "mpreg_function_calls_in_flight{function=\"add\"}"),
        0.0
    );
    assert_eq!(calls("debug.fail", "handler_failed"), 2.0);
    assert_eq!(calls("debug.fail", "ok"), 0.0);
    assert_eq!(
        calls("debug.panic", "handler_failed"),
        1.0,
        "a panic counts as handler_failed"
    );
    assert_eq!(
        calls("debug.sleep", "cancelled"),
        1.0,
        "a call dropped at its deadline"
    );
    assert_eq!(
        calls("echo", "ok"),
        0.0,
        "functions never called are listed"
    );

    for f in ["add", "debug.fail"] {
        let b = buckets(&s, f);
        assert_eq!(b.len(), 18, "{f}: 17 bounds and +Inf");
        assert!(
            b.windows(2).all(|w| w[0].1 <= w[1].1),
            "{f}: cumulative {b:?}"
        );
        let count = sample(
            &s,
            &format!("mpreg_function_call_duration_seconds_count{{function=\"{f}\"}}"),
        );
        assert_eq!(
            b.last().map(|&(le, n)| (le, n)),
            Some((f64::INFINITY, count)),
            "{f}: +Inf == count"
        );
        let sum = sample(
            &s,
            &format!("mpreg_function_call_duration_seconds_sum{{function=\"{f}\"}}"),
        );
        assert!(sum > 0.0, "{f}: time was spent");
    }
    assert_eq!(
        sample(
            &s,
            "mpreg_function_call_duration_seconds_count{function=\"add\"}"
        ),
        5.0
    );

    // Node-level: 9 requests, one connection, no peers.
    assert_eq!(sample(&s, "mpreg_requests_received_total"), 9.0);
    assert_eq!(sample(&s, "mpreg_requests_total{outcome=\"ok\"}"), 5.0);
    assert_eq!(
        sample(&s, "mpreg_requests_total{outcome=\"handler_failed\"}"),
        3.0
    );
    assert_eq!(sample(&s, "mpreg_requests_total{outcome=\"timeout\"}"), 1.0);
    assert_eq!(sample(&s, "mpreg_client_connections"), 1.0);
    assert_eq!(sample(&s, "mpreg_peers_linked"), 0.0);
    let info = format!(
        "mpreg_node_info{{node=\"{}\",version=\"{}\"}}",
        node.name(),
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(sample(&s, &info), 1.0);

    drop(client);
    // The client's connection closes in the background.
    eventually(&node, "the closed connection is no longer counted", |s| {
        sample(s, "mpreg_client_connections") == 0.0
    })
    .await;
    node.shutdown().await;
}

#[tokio::test]
async fn peers_on_the_same_port_and_status_json() {
    let a = start_node(builder().name("alpha")).await;
    let (f, _) = common::counting("predict");
    let b = start_node(
        builder()
            .name("beta")
            .peers([a.url().expect("url")])
            .function(f.datasets(["model-b"])),
    )
    .await;
    let linked = a
        .wait_for(common::HANG_GUARD, |v| v.nodes_with_dataset("model-b") > 0)
        .await;
    assert!(linked, "alpha learns beta's functions by gossip");
    // A call routed from alpha to beta: counted on beta, where it ran.
    let client = client(&a).await;
    let r: Vec<i64> = guard(
        "routed call",
        client.call_command(Command::new("p", "predict").arg(7).dataset("model-b")),
    )
    .await
    .expect("predict");
    assert_eq!(r, [7]);

    let s = samples(&get(&a, "/metrics").await.body);
    assert_eq!(sample(&s, "mpreg_peers_linked"), 1.0);
    assert!(
        !s.keys().any(|k| k.contains("\"predict\"")),
        "alpha does not serve predict itself"
    );
    let s = samples(&get(&b, "/metrics").await.body);
    assert_eq!(
        sample(
            &s,
            "mpreg_function_calls_total{function=\"predict\",outcome=\"ok\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(&s, "mpreg_requests_received_total"),
        0.0,
        "beta ran a job, not a client request"
    );

    let r = get(&a, "/status.json").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), "application/json");
    let status: Value = serde_json::from_str(&r.body).expect("JSON");
    assert_eq!(status["node"], "alpha");
    assert_eq!(status["peers"], 1);
    let names: Vec<&str> = status["cluster"]["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["name"].as_str())
        .collect();
    assert_eq!(names, ["alpha", "beta"]);
    let predict = status["functions"]
        .as_array()
        .expect("functions")
        .iter()
        .find(|f| f["name"] == "predict")
        .expect("predict is listed");
    assert_eq!(predict["nodes"][0]["node"], "beta");
    assert!(
        predict["nodes"][0]["datasets"]
            .to_string()
            .contains("model-b")
    );
    assert_eq!(status["metrics"]["requests_received"], 1);
    assert_eq!(status["metrics"]["requests"]["ok"], 1);
    assert_eq!(status["metrics"]["functions"]["echo"]["ended"], 0);
    assert_eq!(
        status["metrics"]["latency_bounds_seconds"]
            .as_array()
            .map(Vec::len),
        Some(18)
    );
    drop(client);
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test]
async fn client_tokens_guard_everything_but_healthz() {
    let node = start_node(builder().client_tokens(["t0ken"])).await;
    for path in ["/metrics", "/status.json", "/"] {
        let r = get(&node, path).await;
        assert_eq!(r.status, 401, "{path} without a token");
        assert_eq!(r.header("www-authenticate"), "Bearer");
        assert!(!r.body.contains("mpreg_"), "nothing leaks: {}", r.body);
        let r = request(&node, "GET", path, "Authorization: Bearer nope\r\n").await;
        assert_eq!(r.status, 401, "{path} with a wrong token");
        let r = request(&node, "GET", path, "Authorization: Bearer t0ken\r\n").await;
        assert_eq!(r.status, 200, "{path} with a bearer token");
        let r = get(&node, &format!("{path}?token=t0ken")).await;
        assert_eq!(r.status, 200, "{path} with ?token=");
    }
    assert_eq!(
        get(&node, "/healthz").await.status,
        200,
        "health stays open"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn unknown_paths_and_methods() {
    let node = start_node(builder()).await;
    let r = get(&node, "/nope").await;
    assert_eq!(r.status, 404);
    assert!(
        r.body.contains("/metrics"),
        "says what is served: {}",
        r.body
    );
    let r = request(&node, "POST", "/metrics", "Content-Length: 4\r\n").await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), "GET, HEAD");
    let r = get(&node, "/").await;
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").starts_with("text/html"));
    assert!(r.body.contains("<table id=\"nodes\">"), "the status page");
    assert!(
        !r.body.contains("http://") && !r.body.contains("https://"),
        "the page loads nothing from elsewhere"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn bad_heads_get_an_error_and_the_node_keeps_serving() {
    let node = start_node(builder()).await;
    let client = client(&node).await;
    // A connection that never finishes its head stays open meanwhile (up
    // to the handshake deadline) without holding anything else up.
    let mut slow = TcpStream::connect(addr(&node)).await.expect("connect");
    slow.write_all(b"GET /metr").await.expect("write");

    let garbage = TcpStream::connect(addr(&node)).await.expect("connect");
    let r = exchange(garbage, b"\x00\x01\x02 not http at all\r\n\r\n").await;
    assert_eq!(r.status, 400);

    let oversized = TcpStream::connect(addr(&node)).await.expect("connect");
    let big = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(20 << 10));
    let r = exchange(oversized, big.as_bytes()).await;
    assert_eq!(r.status, 431);

    let many = TcpStream::connect(addr(&node)).await.expect("connect");
    let headers: String = (0..200).map(|i| format!("X-{i}: y\r\n")).collect();
    let r = exchange(many, format!("GET / HTTP/1.1\r\n{headers}\r\n").as_bytes()).await;
    assert_eq!(r.status, 431);

    // A WebSocket upgrade that tungstenite refuses: still no crash.
    let bad_upgrade = TcpStream::connect(addr(&node)).await.expect("connect");
    let _ = exchange_or_close(bad_upgrade, b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n").await;

    let echoed: String = guard("echo", client.call("echo", ("still here",)))
        .await
        .expect("the client still works");
    assert_eq!(echoed, "still here");
    let other = common::client(&node).await;
    let echoed: String = guard("echo", other.call("echo", ("new client",)))
        .await
        .expect("new clients still connect");
    assert_eq!(echoed, "new client");
    assert_eq!(get(&node, "/healthz").await.status, 200);
    drop(slow);
    node.shutdown().await;
}

/// Writes `request` and reads until the connection ends, whatever comes.
async fn exchange_or_close(mut stream: TcpStream, request: &[u8]) -> Vec<u8> {
    guard("exchange", async {
        let _ = stream.write_all(request).await;
        let mut raw = Vec::new();
        let _ = stream.read_to_end(&mut raw).await;
        raw
    })
    .await
}

/// A CA and a certificate for 127.0.0.1 issued by it (cert, key, CA), PEM.
fn certificates() -> (String, String, String) {
    let mut ca = CertificateParams::new(Vec::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "http test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().expect("CA key");
    let ca_pem = ca.self_signed(&ca_key).expect("CA certificate").pem();
    let issuer = Issuer::new(ca, ca_key);
    let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()]).expect("params");
    leaf.distinguished_name.push(DnType::CommonName, "node");
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate().expect("leaf key");
    let cert = leaf.signed_by(&key, &issuer).expect("leaf certificate");
    (cert.pem(), key.serialize_pem(), ca_pem)
}

#[tokio::test]
async fn https_on_the_same_port() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};

    let (cert, key, ca) = certificates();
    let node = start_node(builder().tls_pem(cert, key).tls_ca_pem(ca.clone())).await;

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.as_bytes()).expect("CA PEM"))
        .expect("CA added");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let https = async |target: &str| {
        let tcp = TcpStream::connect(addr(&node)).await.expect("connect");
        let name = ServerName::try_from("127.0.0.1").expect("server name");
        let tls = guard("TLS handshake", connector.connect(name, tcp))
            .await
            .expect("TLS handshake");
        let text = format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        exchange(tls, text.as_bytes()).await
    };
    let r = https("/healthz").await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
    let r = https("/metrics").await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("mpreg_node_info"), "{}", r.body);

    // Plain HTTP to a TLS port is not answered as HTTP.
    let plain = TcpStream::connect(addr(&node)).await.expect("connect");
    let raw = exchange_or_close(plain, b"GET /healthz HTTP/1.1\r\n\r\n").await;
    assert!(
        !raw.starts_with(b"HTTP/1.1 200"),
        "no plain-text answer on a TLS port"
    );

    // wss:// clients still work on the same port.
    let client = guard(
        "wss client",
        mpreg::Client::builder()
            .tls_ca_pem(ca)
            .connect(&node.url().expect("url")),
    )
    .await
    .expect("wss client connects");
    let echoed: String = guard("echo", client.call("echo", ("tls",)))
        .await
        .expect("echo");
    assert_eq!(echoed, "tls");
    node.shutdown().await;
}
