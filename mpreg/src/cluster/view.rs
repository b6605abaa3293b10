//! The cluster as one node sees it: [`ClusterView`], its [`NodeView`]s and
//! their [`FunctionInfo`]. Plain data, built by the node from its peer
//! table and registry; `mpreg.cluster` answers with it as JSON.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// The cluster as one node sees it: the node itself, then every peer it
/// knows, by name. What [`NodeHandle::cluster_view`](crate::NodeHandle::cluster_view)
/// returns and [`NodeHandle::wait_for`](crate::NodeHandle::wait_for) tests;
/// the built-in `mpreg.cluster` answers with it as JSON (the field names
/// below, `self_name` as `"self"`).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), mpreg::Error> {
/// let node = mpreg::Node::builder().name("solo").datasets(["model-a"]).start().await?;
/// let view = node.cluster_view();
/// assert_eq!(view.self_name, "solo");
/// assert_eq!(view.node_names(), ["solo"]);
/// assert!(view.offers("echo", &["model-a"]));
/// assert!(!view.offers("echo", &["model-b"]));
/// # node.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ClusterView {
    /// The name of the node whose view this is.
    #[serde(rename = "self")]
    pub self_name: String,
    /// The node itself first, then its peers sorted by name.
    pub nodes: Vec<NodeView>,
}

/// A few counts of the cluster as one node sees it, cheap to take (no
/// copy of the view): what to poll when waiting for a large cluster to
/// converge. What [`NodeHandle::cluster_summary`](crate::NodeHandle::cluster_summary)
/// returns.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), mpreg::Error> {
/// let node = mpreg::Node::builder().datasets(["model-a"]).start().await?;
/// let summary = node.cluster_summary();
/// assert_eq!((summary.nodes, summary.linked, summary.datasets), (1, 0, 1));
/// # node.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ClusterSummary {
    /// Nodes known, the viewing node included: members by their gossiped
    /// cards, leaves by their links.
    pub nodes: usize,
    /// Peers the viewing node has a link to now.
    pub linked: usize,
    /// Distinct datasets offered anywhere in the cluster, as routing sees
    /// them.
    pub datasets: usize,
}

/// One node in a [`ClusterView`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct NodeView {
    /// The node's name.
    pub name: String,
    /// Where it listens; `None` for a node that only dials out (a leaf).
    pub addr: Option<SocketAddr>,
    /// How the viewing node knows it.
    pub status: NodeStatus,
    /// Grows at each start of the node.
    pub generation: u64,
    /// Jobs running there (the viewing node itself), or in flight to it
    /// over the link: the load routing balances on.
    pub load: usize,
    /// Jobs the viewing node sent to it so far over its current link
    /// (peers with a link only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jobs_sent: Option<u64>,
    /// Whether the viewing node has a link to it now (links open when a
    /// command must go there and close once idle; a member is routed to
    /// from its gossiped card, linked or not). Always true for a leaf.
    #[serde(default)]
    pub linked: bool,
    /// Every function it offers, with every dataset it has there.
    pub functions: Vec<FunctionInfo>,
    /// Gossip counters (the viewing node itself, when it is a member).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gossip: Option<GossipStats>,
    /// Security counters (the viewing node itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security: Option<SecurityStats>,
}

/// How the viewing node knows a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum NodeStatus {
    /// The viewing node itself.
    #[serde(rename = "self")]
    This,
    /// A member up (its card gossiped; linked or not, see
    /// [`NodeView::linked`]).
    Up,
    /// A node that only dials out, served through its link to the viewer.
    Leaf,
}

/// A function a node offers.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[non_exhaustive]
pub struct FunctionInfo {
    /// The function's name.
    pub fun: String,
    /// Every dataset the node has for it.
    pub datasets: BTreeSet<String>,
    /// Safe to run again after a lost node.
    #[serde(default)]
    pub idempotent: bool,
    /// The parameters, by name and Rust type (empty when not described).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub params: Vec<ParamInfo>,
    /// The return type, as written (empty when not described).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub returns: String,
    /// The doc comment (empty when not described).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub doc: String,
}

/// One parameter of a described function.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ParamInfo {
    /// The parameter's name (what `kwargs` names).
    pub name: String,
    /// Its Rust type, as written.
    #[serde(rename = "type")]
    pub ty: String,
}

/// Gossip counters of the viewing node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct GossipStats {
    /// The card version in the node's gossiped identity.
    pub identity_version: u64,
    /// Packets dropped (unauthenticated, malformed).
    pub dropped_packets: u64,
}

/// Security counters of the viewing node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SecurityStats {
    /// Peer links refused (a failed proof, a certificate from another CA,
    /// an impostor).
    pub refused_peer_links: u64,
}

/// The view as the JSON `mpreg.cluster` answers with (compact).
impl std::fmt::Display for ClusterView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = serde_json::to_string(self).map_err(|_| std::fmt::Error)?;
        f.write_str(&text)
    }
}

impl ClusterView {
    /// The node named `name`, if the view has it.
    pub fn node(&self, name: &str) -> Option<&NodeView> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The viewing node itself.
    pub fn this(&self) -> Option<&NodeView> {
        self.nodes.iter().find(|n| n.status == NodeStatus::This)
    }

    /// The names of every node, the viewer's included, sorted.
    pub fn node_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
        names.sort_unstable();
        names
    }

    /// Whether some node offers `fun` with every dataset of `datasets`.
    pub fn offers(&self, fun: &str, datasets: &[&str]) -> bool {
        self.nodes.iter().any(|n| n.offers(fun, datasets))
    }

    /// How many nodes offer some function with dataset `dataset`.
    pub fn nodes_with_dataset(&self, dataset: &str) -> usize {
        self.nodes
            .iter()
            .filter(|n| n.functions.iter().any(|f| f.datasets.contains(dataset)))
            .count()
    }
}

impl NodeView {
    /// Whether this node offers `fun` with every dataset of `datasets`.
    pub fn offers(&self, fun: &str, datasets: &[&str]) -> bool {
        self.functions
            .iter()
            .any(|f| f.fun == fun && datasets.iter().all(|d| f.datasets.contains(*d)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_json_shape_is_the_wire_shape_of_mpreg_cluster() {
        let view: ClusterView = serde_json::from_value(json!({
            "self": "A",
            "nodes": [
                {"name": "A", "addr": "127.0.0.1:7000", "status": "self", "generation": 1,
                 "load": 0, "functions": [{"fun": "echo", "datasets": ["d"]}],
                 "gossip": {"identity_version": 3, "dropped_packets": 0},
                 "security": {"refused_peer_links": 2}},
                {"name": "L", "addr": null, "status": "leaf", "generation": 2, "load": 1,
                 "jobs_sent": 5, "functions": [{"fun": "f", "datasets": [], "idempotent": true,
                  "params": [{"name": "x", "type": "i64"}], "returns": "i64", "doc": "Doubles."}]}
            ]
        }))
        .expect("the shape mpreg.cluster answers with");
        assert_eq!(view.node_names(), ["A", "L"]);
        assert_eq!(view.this().map(|n| n.name.as_str()), Some("A"));
        assert_eq!(view.node("L").and_then(|n| n.jobs_sent), Some(5));
        assert!(view.offers("echo", &["d"]) && !view.offers("echo", &["e"]));
        assert_eq!(view.nodes_with_dataset("d"), 1);
        let back = serde_json::to_value(&view).expect("encode");
        assert_eq!(back["nodes"][0]["status"], "self");
        assert_eq!(back["nodes"][1]["functions"][0]["params"][0]["type"], "i64");
        assert!(back["nodes"][0].get("jobs_sent").is_none());
        assert!(back["nodes"][1].get("gossip").is_none());
        let shown: serde_json::Value = serde_json::from_str(&view.to_string()).expect("JSON");
        assert_eq!(shown, back);
    }
}
