//! TLS (`wss://`): clients and peers over TLS, with certificates made at
//! run time (a CA and leaf certificates for 127.0.0.1).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{guard, member as node, url};
use mpreg::{Client, Command, Config, Error, Node, NodeBuilder, NodeHandle};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// A certificate authority made for one test.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for 127.0.0.1 (server and client use) and its key, PEM.
    fn leaf(&self, name: &str) -> (String, String) {
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        (cert.pem(), key.serialize_pem())
    }
}

/// A node with a certificate from `ca`, trusting `ca`.
fn tls_node(name: &str, ca: &Ca) -> NodeBuilder {
    let (cert, key) = ca.leaf(name);
    node(name).tls_pem(cert, key).tls_ca_pem(ca.pem.clone())
}

async fn tls_client(node: &NodeHandle, ca: &Ca) -> Client {
    guard(
        "connect",
        Client::builder()
            .tls_ca_pem(ca.pem.clone())
            .connect(&url(node)),
    )
    .await
    .expect("client connects over wss")
}

/// A fresh directory for PEM files, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("mpreg-tls-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write PEM");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn whoami(client: &Client, dataset: &str) -> Result<String, Error> {
    client
        .call_command(Command::new("w", "mpreg.whoami").dataset(dataset))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_node_serves_the_reference_examples_over_wss() {
    let ca = Ca::new("test CA");
    let a = guard("start", tls_node("A", &ca).start())
        .await
        .expect("start");
    assert!(url(&a).starts_with("wss://127.0.0.1:"), "{}", url(&a));
    let client = tls_client(&a, &ca).await;
    for example in mpreg::demo::reference_examples() {
        let results = guard("request", client.send(example.request.clone()))
            .await
            .expect("request");
        assert_eq!(Value::Object(results.into_map()), example.expected);
    }
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_tls_or_trust_fail_and_the_node_keeps_serving() {
    let ca = Ca::new("test CA");
    let other = Ca::new("other CA");
    let a = guard("start", tls_node("A", &ca).start())
        .await
        .expect("start");
    let good = tls_client(&a, &ca).await;
    let addr = a.local_addr().expect("addr");

    // Plain WebSocket to the TLS port: the handshake fails.
    let plain = guard("plain", Client::connect(&format!("ws://{addr}"))).await;
    assert!(
        matches!(plain, Err(Error::Connect { .. })),
        "{:?}",
        plain.err()
    );
    // wss:// without a CA to trust: refused before dialing anything.
    let no_ca = guard("no CA", Client::connect(&url(&a))).await;
    assert!(
        matches!(no_ca, Err(Error::Connect { .. })),
        "{:?}",
        no_ca.err()
    );
    // wss:// trusting another CA: the node's certificate is rejected.
    let untrusting = guard(
        "untrusting",
        Client::builder()
            .tls_ca_pem(other.pem.clone())
            .connect(&url(&a)),
    )
    .await;
    assert!(
        matches!(untrusting, Err(Error::Connect { .. })),
        "{:?}",
        untrusting.err()
    );
    // A CA that is not PEM is a configuration error.
    let garbage = guard(
        "garbage CA",
        Client::builder()
            .tls_ca_pem(b"not a certificate".to_vec())
            .connect(&url(&a)),
    )
    .await;
    assert!(
        matches!(garbage, Err(Error::Config(_))),
        "{:?}",
        garbage.err()
    );

    // The good client never noticed.
    let said: String = guard("echo", good.call("echo", ("still here",)))
        .await
        .expect("echo");
    assert_eq!(said, "still here");
    // Nor do the failed clients count as refused peers.
    assert_eq!(common::refused_peer_links(&a.cluster_view()), 0);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_nodes_with_the_same_ca_form_a_cluster() {
    let ca = Ca::new("cluster CA");
    let a = guard("start A", tls_node("A", &ca).datasets(["only-a"]).start())
        .await
        .expect("start A");

    // B reads its TLS settings from a config file, with PEM files.
    let dir = TempDir::new("cluster");
    let (cert, key) = ca.leaf("B");
    let cert = dir.write("b.pem", &cert);
    let key = dir.write("b.key", &key);
    let ca_path = dir.write("ca.pem", &ca.pem);
    let toml = format!(
        "name = \"B\"\nlisten = \"127.0.0.1:0\"\ndatasets = [\"only-b\"]\npeers = [{:?}]\n\
         probe_interval_ms = 100\nsuspect_timeout_ms = 500\n\
         tls_cert = {:?}\ntls_key = {:?}\ntls_ca = {:?}\n",
        url(&a),
        cert.display().to_string(),
        key.display().to_string(),
        ca_path.display().to_string(),
    );
    let config = Config::from_toml_str(&toml).expect("config");
    let shown = format!("{config:?}");
    assert!(!shown.contains("PRIVATE KEY"), "{shown}");
    let b = guard(
        "start B",
        Node::builder()
            .config(config)
            .without_linked_functions()
            .start(),
    )
    .await
    .expect("start B");
    assert!(url(&b).starts_with("wss://"));

    assert!(
        a.wait_for(WAIT, |v| v.node_names() == ["A", "B"]).await,
        "A sees B: {}",
        a.cluster_view()
    );
    let client = tls_client(&a, &ca).await;
    let who = guard("whoami", whoami(&client, "only-b"))
        .await
        .expect("routed to B");
    assert_eq!(who, "B");
    assert_eq!(common::refused_peer_links(&a.cluster_view()), 0);
    assert_eq!(common::refused_peer_links(&b.cluster_view()), 0);

    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_certificate_from_another_ca_cannot_link() {
    let ca = Ca::new("cluster CA");
    let other = Ca::new("other CA");
    let a = guard("start A", tls_node("A", &ca).start())
        .await
        .expect("start A");
    // C trusts both CAs, but its own certificate is from the other one:
    // whichever side dials, A refuses (C's server certificate when A
    // dials, C's client certificate when C dials).
    let (cert, key) = other.leaf("C");
    let c = guard(
        "start C",
        node("C")
            .tls_pem(cert, key)
            .tls_ca_pem(format!("{}{}", ca.pem, other.pem))
            .datasets(["only-c"])
            .peers([url(&a)])
            .start(),
    )
    .await
    .expect("start C");

    // Gossip (not TLS) makes them members, and brings C's card; but a
    // call for C's dataset needs a link, which A refuses to open (C's
    // server certificate is not from A's CA): `node_lost`, each time.
    assert!(
        a.wait_for(WAIT, |v| v.offers("mpreg.whoami", &["only-c"]))
            .await,
        "A has C's card: {}",
        a.cluster_view()
    );
    let client = tls_client(&a, &ca).await;
    for _ in 0..2 {
        let e = guard("whoami", whoami(&client, "only-c"))
            .await
            .expect_err("C is not reachable through A");
        assert!(
            matches!(&e, Error::Rpc(e) if e.code == mpreg::ErrorCode::NodeLost
                && e.message.contains("cannot link")),
            "{e:?}"
        );
    }
    assert!(
        common::refused_peer_links(&a.cluster_view()) >= 2,
        "A refused C's certificate each time: {}",
        a.cluster_view()
    );
    assert!(!a.cluster_view().node("C").is_some_and(|n| n.linked));

    c.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialing_peers_must_present_a_certificate_from_the_ca() {
    let ca = Ca::new("cluster CA");
    let other = Ca::new("other CA");
    let a = guard("start A", tls_node("A", &ca).start())
        .await
        .expect("start A");
    // Dial-out-only nodes always dial, so each case exercises the
    // accepting side.

    // No certificate at all (it trusts A's CA): refused on the hello.
    let anonymous = guard(
        "start anonymous",
        node("anonymous")
            .dial_out_only()
            .tls_ca_pem(ca.pem.clone())
            .peers([url(&a)])
            .start(),
    )
    .await
    .expect("start anonymous");
    assert!(
        a.wait_for(WAIT, |v| common::refused_peer_links(v) >= 1)
            .await,
        "A refuses a peer without a certificate: {}",
        a.cluster_view()
    );
    anonymous.shutdown().await;

    // A certificate from another CA: refused in the TLS handshake.
    let before = common::refused_peer_links(&a.cluster_view());
    let (cert, key) = other.leaf("stranger");
    let stranger = guard(
        "start stranger",
        node("stranger")
            .dial_out_only()
            .tls_pem(cert, key)
            .tls_ca_pem(ca.pem.clone())
            .peers([url(&a)])
            .start(),
    )
    .await
    .expect("start stranger");
    assert!(
        a.wait_for(WAIT, |v| common::refused_peer_links(v) > before)
            .await,
        "A refuses a certificate from another CA: {}",
        a.cluster_view()
    );
    assert!(
        stranger
            .wait_for(WAIT, |v| common::refused_peer_links(v) >= 1)
            .await,
        "the stranger hears it was refused: {}",
        stranger.cluster_view()
    );
    stranger.shutdown().await;
    assert_eq!(a.cluster_view().node_names(), ["A"]);

    // A certificate from the CA: linked, and served through A.
    let (cert, key) = ca.leaf("friend");
    let friend = guard(
        "start friend",
        node("friend")
            .dial_out_only()
            .tls_pem(cert, key)
            .tls_ca_pem(ca.pem.clone())
            .datasets(["only-friend"])
            .peers([url(&a)])
            .start(),
    )
    .await
    .expect("start friend");
    assert!(
        a.wait_for(WAIT, |v| v.node_names() == ["A", "friend"])
            .await,
        "A links the friend: {}",
        a.cluster_view()
    );
    let client = tls_client(&a, &ca).await;
    let who = guard("whoami", whoami(&client, "only-friend"))
        .await
        .expect("routed to the friend");
    assert_eq!(who, "friend");

    friend.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_settings_fail_at_start_with_the_setting_named() {
    let ca = Ca::new("test CA");
    let (cert, key) = ca.leaf("A");

    // A certificate without a CA to verify peers against.
    let e = node("A")
        .tls_pem(cert.clone(), key.clone())
        .start()
        .await
        .expect_err("tls_ca is required");
    assert!(
        matches!(
            e,
            Error::Config(mpreg::config::ConfigError::Invalid {
                setting: "tls_ca",
                ..
            })
        ),
        "{e}"
    );

    // A file that does not exist.
    let e = node("A")
        .tls("/nonexistent/mpreg-cert.pem", "/nonexistent/mpreg-key.pem")
        .tls_ca_pem(ca.pem.clone())
        .start()
        .await
        .expect_err("missing file");
    assert!(
        matches!(
            e,
            Error::Config(mpreg::config::ConfigError::TlsFile {
                setting: "tls_cert",
                ..
            })
        ),
        "{e}"
    );

    // A key that is not PEM, and a key that does not match the certificate.
    let e = node("A")
        .tls_pem(cert.clone(), b"garbage".to_vec())
        .tls_ca_pem(ca.pem.clone())
        .start()
        .await
        .expect_err("no key");
    assert!(
        matches!(
            e,
            Error::Config(mpreg::config::ConfigError::Tls {
                setting: "tls_key",
                ..
            })
        ),
        "{e}"
    );
    let (_, other_key) = ca.leaf("B");
    let e = node("A")
        .tls_pem(cert, other_key)
        .tls_ca_pem(ca.pem.clone())
        .start()
        .await
        .expect_err("mismatched key");
    assert!(
        matches!(
            e,
            Error::Config(mpreg::config::ConfigError::Tls {
                setting: "tls_key",
                ..
            })
        ),
        "{e}"
    );
    assert!(!e.to_string().contains("PRIVATE KEY"), "{e}");

    // A wss:// peer without a CA to trust.
    let e = node("A")
        .peers(["wss://127.0.0.1:1"])
        .start()
        .await
        .expect_err("wss peer needs a CA");
    assert!(
        matches!(
            e,
            Error::Config(mpreg::config::ConfigError::Invalid {
                setting: "tls_ca",
                ..
            })
        ),
        "{e}"
    );
}
