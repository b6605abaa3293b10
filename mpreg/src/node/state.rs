//! The running node's shared state: what every connection, link and job
//! of a node reaches.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Secret, Tokens};
use crate::budget::{ByteBudget, Unauthenticated};
use crate::cluster::Cluster;
use crate::config::Config;
use crate::context::DatasetStates;
use crate::membership::{Membership, MembershipConfig};
use crate::metrics::NodeMetrics;
use crate::registry::Registry;

/// What every connection of a node shares.
#[derive(Debug)]
pub(crate) struct RunningNode {
    pub(crate) name: String,
    pub(crate) config: Config,
    /// The functions served here; replaced as a whole when they change.
    pub(super) registry: RwLock<Arc<Registry>>,
    pub(crate) cluster: Cluster,
    /// Where peers reach this node; `None` when it only dials out.
    pub(crate) advertise: Option<SocketAddr>,
    /// Distinguishes this run of the node from earlier ones at the same
    /// address.
    pub(crate) generation: u64,
    /// Gossip membership and failure detection (`None` for a dial-out-only
    /// node, which is not a member: its link is its liveness).
    pub(crate) membership: Option<Membership>,
    /// Jobs running on this node now: its load, as the router sees it.
    pub(super) local_load: AtomicUsize,
    /// Cancelled when the node is killed: nothing drains, nothing waits.
    pub(crate) killed: CancellationToken,
    /// Links to members being opened (see [`super::dispatcher::Dials`]).
    pub(crate) dialing: super::dispatcher::Dials,
    /// Peers must prove they know it (when set).
    pub(crate) secret: Option<Secret>,
    /// Clients must present one (when any are set).
    pub(crate) tokens: Tokens,
    /// How connections are accepted and peers dialed: TLS or not.
    pub(crate) tls: crate::tls::NodeTls,
    /// Where links are dialed: sockets, or the in-memory network.
    pub(crate) transport: crate::transport::Transport,
    /// The typed state of the node's datasets that have one.
    pub(crate) dataset_states: DatasetStates,
    /// Cancelled when the node stops (shutdown or kill).
    pub(super) stopping: CancellationToken,
    /// The node's background tasks, which shutdown waits for.
    pub(super) tasks: TaskTracker,
    /// Client requests and connections, counted for `/metrics`.
    pub(crate) metrics: NodeMetrics,
    /// Set when a graceful shutdown begins (`/healthz` then fails).
    pub(super) draining: AtomicBool,
    /// Bytes held for all requests (frames and results), node-wide.
    pub(crate) inflight_bytes: Arc<ByteBudget>,
    /// Connections that have not yet authenticated, in total and per
    /// source address.
    pub(crate) unauthenticated: Arc<Unauthenticated>,
}

impl RunningNode {
    /// The functions served here (a snapshot).
    pub(crate) fn registry(&self) -> Arc<Registry> {
        self.registry
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Runs `work` in the background until it ends or the node stops.
    pub(crate) fn spawn<F>(&self, work: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let stopping = self.stopping.clone();
        if stopping.is_cancelled() {
            return;
        }
        self.tasks.spawn(async move {
            tokio::select! {
                _ = stopping.cancelled() => {}
                _ = work => {}
            }
        });
    }

    /// Replaces the registry with `change(current).0`; when `.1` says it
    /// changed, tells the cluster. Returns `.1`.
    pub(super) fn update_registry(
        self: &Arc<Self>,
        change: impl FnOnce(&Registry) -> (Registry, bool),
    ) -> bool {
        let changed = {
            let mut registry = self
                .registry
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let (next, changed) = change(&registry);
            if changed {
                *registry = Arc::new(next);
            }
            changed
        };
        if changed {
            self.routing_changed(true);
        }
        changed
    }

    /// Whether the node is shutting down or killed.
    pub(crate) fn is_stopping(&self) -> bool {
        self.draining.load(Ordering::Relaxed) || self.stopping.is_cancelled()
    }

    pub(crate) fn local_load(&self) -> usize {
        self.local_load.load(Ordering::Relaxed)
    }

    /// This node as its cluster state's view needs it, with `registry`
    /// (a snapshot of [`registry`](Self::registry)).
    pub(crate) fn own<'a>(&'a self, registry: &'a Registry) -> crate::cluster::Own<'a> {
        crate::cluster::Own {
            name: &self.name,
            registry,
            addr: self.advertise,
            generation: self.generation,
            load: self.local_load(),
            gossip: self
                .membership
                .as_ref()
                .map(|m| crate::cluster::GossipStats {
                    identity_version: u64::from(m.id().version),
                    dropped_packets: m.dropped_packets(),
                }),
        }
    }

    /// The cluster as this node sees it (what `mpreg.cluster` returns).
    pub(crate) fn cluster_view(&self) -> crate::cluster::ClusterView {
        let registry = self.registry();
        self.cluster.view(&self.own(&registry))
    }

    /// Every function in the cluster as this node knows it without asking
    /// anyone (what the status page shows).
    pub(crate) fn cluster_functions(&self) -> Value {
        let registry = self.registry();
        self.cluster.functions(&self.own(&registry))
    }

    /// Rebuilds routing after a change of peers or catalogs. When what this
    /// node offers changed too (`ours`), tells every member peer.
    pub(crate) fn routing_changed(self: &Arc<Self>, ours: bool) {
        let registry = self.registry();
        self.cluster.rebuild(&registry);
        if ours {
            self.cluster.bump_version();
            let catalog = self.cluster.catalog(&registry);
            if let Some(m) = &self.membership {
                m.set_card(crate::cluster::Card::new(&self.name, &catalog.functions).encode());
            }
            let links = self.cluster.catalog_listeners(self.membership.is_some());
            // Also called from drop handlers: there may be no runtime left.
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                return;
            };
            runtime.spawn(async move {
                let message = crate::protocol::peer::PeerMessage::Catalog(catalog);
                for link in links {
                    link.send(&message).await;
                }
            });
        }
    }
}

/// Whether a node listening on `addr` is open to peers beyond this machine
/// with nothing to check them by (no cluster secret): it then warns at
/// start.
pub(super) fn unguarded(addr: SocketAddr, secret: bool) -> bool {
    !secret && !addr.ip().to_canonical().is_loopback()
}

/// Failure detection timings from the config.
pub(super) fn membership_config(config: &Config) -> MembershipConfig {
    let probe = Duration::from_millis(config.probe_interval_ms.max(10));
    MembershipConfig {
        probe_period: probe,
        probe_rtt: probe / 3,
        suspect_to_down: Duration::from_millis(config.suspect_timeout_ms.max(1)),
        gossip_interval: (probe / 5).max(Duration::from_millis(10)),
        secret: config.cluster_secret.as_deref().map(Secret::new),
    }
}

/// A number that grows with each start of a node: the wall clock in
/// microseconds (a restart cannot reuse it in practice).
pub(super) fn new_generation() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_beyond_loopback_without_a_secret_is_unguarded() {
        let addr = |a: &str| a.parse::<SocketAddr>().expect("addr");
        assert!(unguarded(addr("0.0.0.0:7773"), false));
        assert!(unguarded(addr("[::]:7773"), false));
        assert!(unguarded(addr("10.1.2.3:7773"), false));
        assert!(!unguarded(addr("10.1.2.3:7773"), true));
        assert!(!unguarded(addr("127.0.0.1:7773"), false));
        assert!(!unguarded(addr("[::1]:7773"), false));
        assert!(!unguarded(addr("[::ffff:127.0.0.1]:7773"), false));
    }
}
