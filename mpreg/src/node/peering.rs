//! The cluster's IO: opening links (driving the handshake's state machines
//! over a connection), serving them, dialing and accepting, keeping seeds
//! joined, and following membership. The state it feeds lives in the
//! parent module; the cores it drives (`handshake.rs`, `routes.rs`,
//! `card.rs`, `view.rs`) do no IO.

use super::RunningNode;
use super::dispatcher::Served;
use crate::cluster::{NotRegistered, PeerKey};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::auth;
use crate::budget::Allowance;
use crate::cluster::handshake::{Acceptor, Dialer, Handshake, Outcome, Refusal};
use crate::cluster::routes::random_below;
use crate::link::{self, Link};
use crate::membership::MemberEvent;
use crate::protocol::peer::{Hello, Opening, PEER_PROTOCOL, PRE_PROOF_MAX, PeerMessage};
use crate::ws;

/// How long the other side of a new link may take to open it (proofs and
/// hellos).
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnection backoff: first delay, and the cap.
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The cap of the backoff between announces to a seed.
const ANNOUNCE_MAX: Duration = Duration::from_secs(1);

/// Why the opening of a link failed.
#[derive(Debug)]
enum OpenError {
    /// This side refused the other.
    Refused(Refusal),
    /// A message over [`PRE_PROOF_MAX`] bytes before the other side proved
    /// itself (never decoded).
    TooLarge(usize),
    /// Not a peer message.
    Invalid,
    /// The other side closed the connection, with this reason if any.
    Closed(String),
    /// The other side took longer than [`HELLO_TIMEOUT`].
    TimedOut,
    /// The connection failed.
    Transport(String),
}

impl OpenError {
    /// The close frame this side sends (refusals only).
    fn close_frame(&self) -> Option<CloseFrame> {
        let (code, reason) = match self {
            OpenError::Refused(r) => (CloseCode::Policy, r.to_string()),
            OpenError::TooLarge(_) => (
                CloseCode::Size,
                format!("a peer message before its proof must be at most {PRE_PROOF_MAX} bytes"),
            ),
            OpenError::Invalid => (CloseCode::Policy, "not a peer message".to_owned()),
            _ => return None,
        };
        Some(CloseFrame {
            code,
            reason: reason.into(),
        })
    }

    /// Whether this counts as a refused peer link.
    fn refused(&self) -> bool {
        matches!(
            self,
            OpenError::Refused(_) | OpenError::TooLarge(_) | OpenError::Invalid
        )
    }
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Refused(r) => write!(f, "refused: {r}"),
            OpenError::TooLarge(n) => write!(
                f,
                "refused: a {n}-byte message before its proof (at most {PRE_PROOF_MAX})"
            ),
            OpenError::Invalid => f.write_str("refused: not a peer message"),
            OpenError::Closed(reason) if reason.is_empty() => {
                f.write_str("the other side closed the connection")
            }
            OpenError::Closed(reason) => {
                write!(f, "the other side closed the connection: {reason}")
            }
            OpenError::TimedOut => write!(f, "no answer within {} s", HELLO_TIMEOUT.as_secs()),
            OpenError::Transport(e) => write!(f, "connection failed: {e}"),
        }
    }
}

impl std::error::Error for OpenError {}

/// Runs one side of a link's opening over a connection: sends what
/// `outcome` says, reads the other side's messages into `side`, until a
/// verdict. `proven` runs once, when the other side has proven the secret
/// (at once without one). Messages before that are at most
/// [`PRE_PROOF_MAX`] bytes; all are decoded into the opening's typed
/// messages only ([`protocol::peer::decode_opening`](crate::protocol::peer::decode_opening)). The caller bounds it in time.
async fn open_link<H, Si, St>(
    side: &mut H,
    mut outcome: Outcome,
    sink: &mut Si,
    source: &mut St,
    mut proven: impl FnMut(),
) -> Result<Hello, OpenError>
where
    H: Handshake,
    Si: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
    St: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    use futures_util::SinkExt;
    let mut was_proven = false;
    loop {
        if !was_proven && side.proven() {
            was_proven = true;
            proven();
        }
        let (send, linked) = match outcome {
            Outcome::Send(send) => (send, None),
            Outcome::Linked { send, theirs } => (send, Some(theirs)),
            Outcome::Refused(r) => return Err(OpenError::Refused(r)),
        };
        for message in send {
            sink.feed(message.encode())
                .await
                .map_err(|e| OpenError::Transport(e.to_string()))?;
        }
        sink.flush()
            .await
            .map_err(|e| OpenError::Transport(e.to_string()))?;
        if let Some(theirs) = linked {
            return Ok(*theirs);
        }
        let message = loop {
            match source.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Close(frame))) => {
                    return Err(OpenError::Closed(
                        frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                    ));
                }
                Some(Ok(m)) => break m,
                Some(Err(e)) => return Err(OpenError::Transport(e.to_string())),
                None => return Err(OpenError::Closed(String::new())),
            }
        };
        let size = message.len();
        if !side.proven() && size > PRE_PROOF_MAX {
            return Err(OpenError::TooLarge(size));
        }
        let decoded = crate::ws::cpu_bound(size, move || {
            crate::protocol::peer::decode_opening(&message)
        })
        .await;
        let Some(Some(Ok(message))) = decoded else {
            return Err(OpenError::Invalid);
        };
        outcome = side.receive(message);
    }
}

/// Our hello to a peer.
fn hello(state: &RunningNode) -> Hello {
    Hello {
        protocol: PEER_PROTOCOL,
        name: state.name.clone(),
        addr: state.advertise,
        generation: state.generation,
        catalog: state.cluster.catalog(&state.registry()),
    }
}

/// Runs a link whose hellos were exchanged: registers the peer, reads until
/// the link closes, then forgets the peer.
async fn run_link<Si, St>(
    state: Arc<RunningNode>,
    sink: Si,
    source: St,
    theirs: Hello,
    dialed: bool,
    sent_version: u64,
    registered: Option<oneshot::Sender<Link>>,
) where
    Si: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error>
        + Unpin
        + Send
        + 'static,
    St: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    if theirs.protocol != PEER_PROTOCOL {
        tracing::warn!(peer = %theirs.name, protocol = theirs.protocol, "peer speaks another protocol version");
        return;
    }
    let (outgoing, queue) = mpsc::channel(ws::OUTGOING_QUEUE);
    let writer = tokio::spawn(ws::write_loop(sink, queue));
    let name = theirs.name.clone();
    let leaf = theirs.addr.is_none();
    let link = Link::new(name.clone(), outgoing);
    let proven = state.secret.is_some();
    let outcome = state
        .cluster
        .register(state.advertise, theirs, link.clone(), dialed, proven);
    let key = match outcome {
        Ok(key) => key,
        Err(why) => {
            match why {
                NotRegistered::Duplicate => {
                    tracing::debug!(peer = %name, "duplicate link closed");
                }
                NotRegistered::AddressInUse(addr) => {
                    state.cluster.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(node = %state.name, peer = %name, %addr,
                        "peer link refused: it claims the address of a peer whose link is still up (without a cluster secret, anyone may claim any address; the live peer stays until its link closes or membership declares it down)");
                }
            }
            link.close_with(CloseCode::Policy, why.reason()).await;
            drop(link);
            let _ = tokio::time::timeout(HELLO_TIMEOUT, writer).await;
            return;
        }
    };
    tracing::debug!(node = %state.name, peer = %name, leaf, dialed, "peer linked");
    state.routing_changed(leaf);
    if let Some(registered) = registered {
        let _ = registered.send(link.clone());
    }
    // Our catalog may have changed since our hello went out, before this
    // peer was registered to hear about changes.
    let catalog = state.cluster.catalog(&state.registry());
    if catalog.version != sent_version {
        link.send(&PeerMessage::Catalog(catalog)).await;
    }
    let keepalive = state.config.keepalive();
    // Whatever ends this link (the peer, an error, or this future being
    // dropped at shutdown), its callers hear `node_lost` and it leaves the
    // routes.
    let _unlink = Unlink {
        state: state.clone(),
        key,
        link: link.clone(),
        leaf,
        name: name.clone(),
        writer,
    };
    link::read_loop(
        &link,
        source,
        Served {
            state: state.clone(),
            key,
        },
        link::Keepalive {
            // Only the side that dialed closes an idle link, and only
            // between members: a leaf's link to its gateway is its
            // membership (the gateway serves it, and offers its functions,
            // only while it is up).
            idle: if dialed && !leaf && state.advertise.is_some() {
                keepalive.idle
            } else {
                None
            },
            ..keepalive
        },
    )
    .await;
}

/// Forgets a peer when its link ends.
struct Unlink {
    state: Arc<RunningNode>,
    key: PeerKey,
    link: Link,
    leaf: bool,
    name: String,
    writer: tokio::task::JoinHandle<()>,
}

impl Drop for Unlink {
    fn drop(&mut self) {
        self.link.close();
        self.writer.abort();
        if self.state.cluster.remove(self.key).is_some() {
            tracing::info!(node = %self.state.name, peer = %self.name, "peer link closed");
            self.state.routing_changed(self.leaf);
        }
    }
}

/// Logs, counts and answers a failed opening (`side`: "dialed" or
/// "accepted").
async fn failed_opening<Si>(state: &RunningNode, sink: &mut Si, error: &OpenError, side: &str)
where
    Si: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    use futures_util::SinkExt;
    if error.refused() {
        state.cluster.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(node = %state.name, link = side, %error, "peer link refused");
    } else {
        tracing::debug!(node = %state.name, link = side, %error, "peer link did not open");
    }
    if let Some(frame) = error.close_frame() {
        // Best effort, and bounded: the other side may be gone or not
        // reading.
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            sink.send(Message::Close(Some(frame))),
        )
        .await;
    }
}

/// Serves a link a peer opened to us (its first message was `peer-open`,
/// or a peer message that cannot open one: see [`protocol::peer::opening`](crate::protocol::peer::opening)).
///
/// With a cluster secret, nothing about this node is sent, and nothing
/// about the peer is registered, before the peer proved the secret; only
/// then is the connection's read `allowance` lifted (at once without a
/// secret).
pub(crate) async fn accept<Si, St>(
    state: Arc<RunningNode>,
    mut sink: Si,
    mut source: St,
    opening: Opening,
    allowance: Allowance,
) where
    Si: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error>
        + Unpin
        + Send
        + 'static,
    St: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let open = match opening {
        Opening::Open(open) => open,
        Opening::Refused(why) => {
            state.cluster.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(node = %state.name, "peer link refused: {why}");
            let frame = CloseFrame {
                code: CloseCode::Policy,
                reason: why.into(),
            };
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                futures_util::SinkExt::send(&mut sink, Message::Close(Some(frame))),
            )
            .await;
            return;
        }
    };
    let nonce = match auth::nonce() {
        Ok(nonce) => nonce,
        Err(e) => {
            tracing::warn!(node = %state.name, error = %e, "peer link refused: no random numbers available");
            return;
        }
    };
    let ours = hello(&state);
    let sent_version = ours.catalog.version;
    let mut acceptor = Acceptor::new(state.secret.clone(), state.tokens.required(), ours, nonce);
    let first = acceptor.receive(PeerMessage::PeerOpen(open));
    let opened = tokio::time::timeout(
        HELLO_TIMEOUT,
        open_link(&mut acceptor, first, &mut sink, &mut source, || {
            allowance.lift()
        }),
    )
    .await
    .unwrap_or(Err(OpenError::TimedOut));
    match opened {
        Ok(theirs) => run_link(state, sink, source, theirs, false, sent_version, None).await,
        Err(e) => failed_opening(&state, &mut sink, &e, "accepted").await,
    }
}

/// Dials a peer (`ws://` or, verifying its certificate against the node's
/// `tls_ca`, `wss://`), opens the link (proving the cluster secret, and
/// with a peer ticket in the upgrade request, when there is one), and
/// serves the link on a new task. Returns once the link is up (or failed
/// to come up).
/// On success, returns the address the peer advertises (which may differ
/// from the URL's, e.g. through a proxy or NAT), and the link once
/// registered. A link not registered (another link to that node is kept)
/// is an error.
pub(super) async fn dial(
    state: &Arc<RunningNode>,
    url: &str,
) -> Result<(Option<SocketAddr>, Link), String> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let config = ws::config(state.config.max_message_size);
    let mut request = url.into_client_request().map_err(|e| e.to_string())?;
    if let Some(secret) = &state.secret {
        // Exempts this connection from the acceptor's caps on
        // unauthenticated connections (many nodes may share an address).
        let ticket = secret.ticket().map_err(|e| e.to_string())?;
        let value = tokio_tungstenite::tungstenite::http::HeaderValue::from_str(&ticket)
            .map_err(|e| e.to_string())?;
        request.headers_mut().insert(auth::TICKET_HEADER, value);
    }
    let connect = crate::tls::connect(
        &state.transport,
        request,
        state.tls.connector.as_ref(),
        config,
    );
    let (stream, _) = tokio::time::timeout(HELLO_TIMEOUT, connect)
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| {
            if crate::tls::rejected_certificate(&e) || crate::tls::certificate_refused(&e) {
                state.cluster.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(node = %state.name, peer = %url, error = %e,
                    "peer link refused: certificate not trusted");
            }
            e.to_string()
        })?;
    let (mut sink, mut source) = stream.split();
    let nonce = auth::nonce().map_err(|e| e.to_string())?;
    let ours = hello(state);
    let sent_version = ours.catalog.version;
    let (mut dialer, opening) = Dialer::new(state.secret.clone(), ours, nonce);
    let opened = tokio::time::timeout(
        HELLO_TIMEOUT,
        open_link(
            &mut dialer,
            Outcome::Send(opening),
            &mut sink,
            &mut source,
            || {},
        ),
    )
    .await
    .unwrap_or(Err(OpenError::TimedOut));
    let theirs = match opened {
        Ok(theirs) => theirs,
        Err(e) => {
            failed_opening(state, &mut sink, &e, "dialed").await;
            return Err(e.to_string());
        }
    };
    let advertised = theirs.addr;
    let (registered, link) = oneshot::channel();
    state.spawn(run_link(
        state.clone(),
        sink,
        source,
        theirs,
        true,
        sent_version,
        Some(registered),
    ));
    match link.await {
        Ok(link) => Ok((advertised, link)),
        Err(_) => Err("the link was not kept (another link to that node is)".to_owned()),
    }
}

/// Keeps a configured peer (`url`) joined. A member announces itself to
/// the peer over UDP until the peer is a member (membership then brings
/// every member's card; links open when commands need them); a leaf, which
/// is no member, keeps a link to the peer itself. Retries after a jittered, growing delay; ends
/// with the node.
pub(crate) async fn keep_linked(state: Arc<RunningNode>, url: String) {
    let mut delay = BACKOFF_START;
    let mut addr = url_addr(&url);
    // Announcing is one cheap UDP packet: retry it sooner than a dial.
    let cap = if state.membership.is_some() {
        ANNOUNCE_MAX
    } else {
        BACKOFF_MAX
    };
    // Where the peer says it listens, once a dial reached it: the URL may
    // name another address (a proxy, NAT).
    let mut advertised: Option<SocketAddr> = None;
    loop {
        if addr.is_none() {
            // A host name: resolve it (it may not resolve yet).
            addr = resolve(&url).await;
        }
        let done = match (&state.membership, addr) {
            (Some(m), Some(a)) => {
                let member = m.members().await.iter().any(|id| id.addr == a);
                if !member {
                    m.announce(a);
                }
                member
            }
            (Some(_), None) => false,
            // A leaf keeps a link to its gateway itself.
            (None, _) => {
                let target = advertised.or(addr);
                if target.is_some_and(|a| state.cluster.linked(a)) {
                    true
                } else {
                    // A fresh link registers on its own task: count it as
                    // done; the next look checks it under its real address.
                    match dial(&state, &url).await {
                        Ok((peer, _)) => {
                            advertised = peer.or(advertised);
                            true
                        }
                        Err(e) => {
                            tracing::debug!(peer = %url, error = %e, "cannot link to peer yet");
                            false
                        }
                    }
                }
            }
        };
        // Joined: look again on a change, or now and then. Not yet: back
        // off, with jitter so restarted nodes do not retry in step.
        let wait = if done {
            delay = BACKOFF_START;
            BACKOFF_MAX
        } else {
            let jitter = random_below(delay.as_millis() as usize / 2 + 1) as u64;
            let wait = delay + Duration::from_millis(jitter);
            delay = (delay * 2).min(cap);
            wait
        };
        let mut changes = state.cluster.subscribe();
        let _ = tokio::time::timeout(wait, changes.changed()).await;
    }
}

/// How often, at most, routing is rebuilt for what membership reports:
/// cards arriving together (a thousand at join) make one rebuild.
const REBUILD_AT_MOST_EVERY: Duration = Duration::from_millis(50);
/// What each member adds to the time between two rebuilds.
const REBUILD_PER_MEMBER: Duration = Duration::from_micros(250);
/// Rebuilding takes at most one part in this many of the time: in a large
/// cluster (a rebuild copies a pointer per function per member), rebuilds
/// space out as they grow.
const REBUILD_SHARE: u32 = 20;

/// Follows membership: takes the cards of members (routing to them needs
/// no link), and forgets members that fail, leave or restart, closing
/// their links. Events that arrive together are taken together, and
/// routing is rebuilt once for them.
pub(crate) async fn follow_membership(
    state: Arc<RunningNode>,
    mut events: mpsc::Receiver<MemberEvent>,
) {
    let mut next_rebuild = Instant::now();
    loop {
        let Some(first) = events.recv().await else {
            return;
        };
        // Rebuilding at most every so often: wait for the rest of a burst.
        tokio::time::sleep_until(next_rebuild).await;
        let mut changed = follow(&state, first);
        while let Ok(event) = events.try_recv() {
            changed |= follow(&state, event);
        }
        if changed {
            let started = Instant::now();
            state.cluster.rebuild(&state.registry());
            let took = started.elapsed();
            // Each member adds a little wait: in a large cluster, a node
            // rebuilds a few times a second while cards pour in, not
            // twenty (many nodes may share a machine).
            let members = u32::try_from(state.cluster.members()).unwrap_or(u32::MAX);
            let floor = REBUILD_AT_MOST_EVERY + REBUILD_PER_MEMBER.saturating_mul(members);
            next_rebuild = Instant::now() + floor.max(took * REBUILD_SHARE);
        }
    }
}

/// Applies one membership event; returns whether routing changed.
fn follow(state: &RunningNode, event: MemberEvent) -> bool {
    tracing::debug!(node = %state.name, ?event, "membership");
    match event {
        // Routing waits for the card.
        MemberEvent::Up(_) => false,
        MemberEvent::Down(id) => {
            state.cluster.drop_member(id.addr, id.generation);
            true
        }
        MemberEvent::Changed { old, new } => {
            // Restarted: the old node, its card and its links are gone. A
            // new version alone: its card is on the way.
            let restarted = new.generation != old.generation;
            if restarted {
                state.cluster.drop_member(old.addr, old.generation);
            }
            restarted
        }
        MemberEvent::Card { id, card } => state.cluster.take_card(id, &card),
    }
}

/// The first address a `ws://host:port` (or `wss://`) URL's host name
/// resolves to.
async fn resolve(url: &str) -> Option<SocketAddr> {
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("wss://"))?;
    let hostport = rest.split('/').next()?;
    tokio::net::lookup_host(hostport).await.ok()?.next()
}

/// The socket address of a `ws://host:port` (or `wss://`) URL, when it
/// names one directly.
pub(crate) fn url_addr(url: &str) -> Option<SocketAddr> {
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("wss://"))?;
    let hostport = rest.split('/').next()?;
    hostport.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn host_names_resolve() {
        let addr = resolve("ws://localhost:7773/")
            .await
            .expect("localhost resolves");
        assert!(addr.ip().is_loopback());
        assert_eq!(addr.port(), 7773);
        assert_eq!(resolve("not a url").await, None);
    }

    #[test]
    fn url_addresses() {
        assert_eq!(
            url_addr("ws://127.0.0.1:7773/"),
            Some("127.0.0.1:7773".parse().expect("addr"))
        );
        assert_eq!(
            url_addr("ws://[::1]:1"),
            Some("[::1]:1".parse().expect("addr"))
        );
        assert_eq!(
            url_addr("wss://127.0.0.1:7773"),
            Some("127.0.0.1:7773".parse().expect("addr"))
        );
        assert_eq!(url_addr("ws://localhost:1"), None);
        assert_eq!(url_addr("http://127.0.0.1:1"), None);
    }
}
