//! What a handler may know about the call it serves: the node, the datasets
//! the command named, the deadline, typed dataset state, and a way to call
//! other functions in the cluster within the same deadline.

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::client::Results;
use crate::error::{Error, ErrorCode, RpcError};
use crate::node::RunningNode;
use crate::protocol::{Command, Request};

/// The context of one call, for handlers that take a `ctx: mpreg::Context`
/// parameter (in any position; it is not a wire argument).
///
/// It tells the node's name, the datasets the command named, the request's
/// deadline and id; it gives the typed state of a dataset
/// ([`dataset`](Self::dataset)); and it calls other functions anywhere in
/// the cluster ([`call`](Self::call), [`send`](Self::send)) within what is
/// left of the deadline. Work started that way is cancelled with the call:
/// when the request times out or its client goes away, the handler's future
/// is dropped, and with it every call it was waiting for (on peers too).
/// A `blocking` handler runs on tokio's blocking pool, where
/// `tokio::runtime::Handle::current().block_on(ctx.call(..))` waits for a
/// call.
///
/// ```
/// use mpreg::{Context, Dataset};
///
/// /// A language model, loaded once per node.
/// struct Model {
///     greeting: String,
/// }
///
/// /// Greets `who` with the model the command named, and says where it ran.
/// #[mpreg::rpc]
/// async fn greet(ctx: Context, who: String) -> Result<String, mpreg::Error> {
///     let model: Dataset<Model> = ctx.dataset()?;
///     let shout: String = ctx.call("shout", (&who,)).await?;
///     Ok(format!("{} {shout} (from {} on {})", model.greeting, model.name(), ctx.node_name()))
/// }
///
/// #[mpreg::rpc]
/// fn shout(text: String) -> String {
///     text.to_uppercase()
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), mpreg::Error> {
/// let node = mpreg::Node::builder()
///     .name("n1")
///     .dataset("model-en", Model { greeting: "hello".into() })
///     .start()
///     .await?;
/// let said: String = node
///     .send(mpreg::Request::new().cmd(
///         mpreg::Command::new("g", "greet").arg("ann").dataset("model-en"),
///     ))
///     .await?
///     .get("g")?;
/// assert_eq!(said, "hello ANN (from model-en on n1)");
/// node.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Context {
    pub(crate) state: Arc<RunningNode>,
    pub(crate) datasets: Vec<String>,
    pub(crate) deadline: Instant,
    pub(crate) request_id: Arc<str>,
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("node", &self.state.name)
            .field("datasets", &self.datasets)
            .field("remaining", &self.remaining())
            .field("request_id", &self.request_id)
            .finish()
    }
}

impl Context {
    /// The name of the node running the call.
    pub fn node_name(&self) -> &str {
        &self.state.name
    }

    /// The datasets the command named (its `locs`), in the order given.
    pub fn datasets(&self) -> &[String] {
        &self.datasets
    }

    /// When the request's deadline passes (as a `std` instant).
    pub fn deadline(&self) -> std::time::Instant {
        self.deadline.into_std()
    }

    /// How much of the deadline is left (zero once it passed).
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// The request's id as its client sent it (a string's text, other JSON
    /// as written), the same on every node the request reaches, as in the
    /// `request` and `job` log spans.
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The state of type `T` of the one dataset the command named that has
    /// state of that type (given with
    /// [`NodeBuilder::dataset`](crate::NodeBuilder::dataset)).
    ///
    /// Fails with `bad_arguments` when the command named no such dataset
    /// (the message lists those this node has), or several of them (name
    /// exactly one).
    pub fn dataset<T: Any + Send + Sync>(&self) -> Result<Dataset<T>, RpcError> {
        let states = &self.state.dataset_states;
        let mut fitting = self
            .datasets
            .iter()
            .filter_map(|name| Some((name, states.get(name)?.value.clone().downcast::<T>().ok()?)));
        match (fitting.next(), fitting.next()) {
            (Some((name, value)), None) => Ok(Dataset {
                name: name.clone(),
                value,
            }),
            (None, _) => {
                let offered = states.names_of::<T>();
                Err(RpcError::bad_arguments(format!(
                    "this function needs a dataset holding `{ty}`; the command named {named}: \
                     name one of {offered:?} in its datasets",
                    ty = std::any::type_name::<T>(),
                    named = if self.datasets.is_empty() {
                        "none".to_owned()
                    } else {
                        format!("only {:?}", self.datasets)
                    },
                ))
                .with_details(json!({
                    "type": std::any::type_name::<T>(),
                    "named": self.datasets,
                    "datasets": offered,
                })))
            }
            (Some(_), Some(_)) => {
                let named: Vec<&String> = self
                    .datasets
                    .iter()
                    .filter(|d| states.get(d).is_some_and(|s| s.value.is::<T>()))
                    .collect();
                Err(RpcError::bad_arguments(format!(
                    "the command named {} datasets holding `{}` ({named:?}): name exactly one",
                    named.len(),
                    std::any::type_name::<T>(),
                ))
                .with_details(json!({
                    "type": std::any::type_name::<T>(),
                    "named": self.datasets,
                    "datasets": named,
                })))
            }
        }
    }

    /// Calls `fun` somewhere in the cluster with positional `args` (as for
    /// [`Client::call`](crate::Client::call)) and decodes its result.
    pub async fn call<T: DeserializeOwned>(
        &self,
        fun: &str,
        args: impl Serialize,
    ) -> Result<T, Error> {
        let command = Command::new("result", fun).args(crate::client::positional(args)?);
        self.call_command(command).await
    }

    /// Runs one command (with datasets or kwargs) in the cluster and decodes
    /// its result.
    pub async fn call_command<T: DeserializeOwned>(&self, command: Command) -> Result<T, Error> {
        let name = command.name.clone();
        self.send(Request::new().cmd(command)).await?.get(&name)
    }

    /// Runs a request of any number of commands in the cluster, entering at
    /// this node, with at most what is left of this call's deadline (less
    /// if the request sets a shorter timeout). The request's id is this
    /// call's, so its log spans can be followed as one.
    pub async fn send(&self, mut request: Request) -> Result<Results, Error> {
        let left = self.remaining();
        if left.is_zero() {
            return Err(Error::Rpc(RpcError::new(
                ErrorCode::Timeout,
                "the calling request's deadline has passed",
            )));
        }
        request.timeout = Some(request.timeout.map_or(left, |t| t.min(left)));
        crate::node::send(&self.state, Value::from(&*self.request_id), request).await
    }
}

/// The typed state of one dataset, as a handler parameter
/// (`model: Dataset<Model>`) or from [`Context::dataset`]: the value given
/// with [`NodeBuilder::dataset`](crate::NodeBuilder::dataset) for the
/// dataset the command named. Dereferences to `T`.
///
/// A handler with a `Dataset<T>` parameter fails with `bad_arguments`, and
/// does not run, when the command names no dataset holding a `T`, or
/// several (see [`Context::dataset`]).
///
/// ```
/// use mpreg::Dataset;
///
/// struct Weights(Vec<f64>);
///
/// /// Scores `x` with the weights of the dataset the command named.
/// #[mpreg::rpc]
/// fn score(weights: Dataset<Weights>, x: Vec<f64>) -> f64 {
///     weights.0.iter().zip(&x).map(|(w, x)| w * x).sum()
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), mpreg::Error> {
/// use mpreg::{Command, Request};
/// let node = mpreg::Node::builder()
///     .dataset("small", Weights(vec![1.0, 2.0]))
///     .dataset("large", Weights(vec![10.0, 20.0]))
///     .start()
///     .await?;
/// let run = |dataset: &str| {
///     Request::new().cmd(Command::new("s", "score").arg(vec![1.0, 1.0]).dataset(dataset))
/// };
/// assert_eq!(node.send(run("small")).await?.get::<f64>("s")?, 3.0);
/// assert_eq!(node.send(run("large")).await?.get::<f64>("s")?, 30.0);
/// // Naming no dataset is a clear error, not a guess.
/// let e = node.send(Request::new().cmd(Command::new("s", "score").arg(vec![1.0]))).await;
/// assert!(e.is_err());
/// node.shutdown().await;
/// # Ok(()) }
/// ```
pub struct Dataset<T> {
    name: String,
    value: Arc<T>,
}

impl<T> Dataset<T> {
    /// The dataset's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The shared state itself (to keep beyond the call).
    pub fn shared(&self) -> Arc<T> {
        self.value.clone()
    }
}

impl<T> Clone for Dataset<T> {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            value: self.value.clone(),
        }
    }
}

impl<T> Deref for Dataset<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T> fmt::Debug for Dataset<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dataset")
            .field("name", &self.name)
            .field("type", &std::any::type_name::<T>())
            .finish()
    }
}

/// A dataset's state: the value and its type's name (for messages).
#[derive(Clone)]
pub(crate) struct DatasetState {
    pub(crate) value: Arc<dyn Any + Send + Sync>,
    pub(crate) type_name: &'static str,
}

/// The typed state of a node's datasets, by dataset name.
#[derive(Clone, Default)]
pub(crate) struct DatasetStates(BTreeMap<String, DatasetState>);

impl DatasetStates {
    pub(crate) fn insert<T: Any + Send + Sync>(&mut self, name: String, value: T) {
        self.0.insert(
            name,
            DatasetState {
                value: Arc::new(value),
                type_name: std::any::type_name::<T>(),
            },
        );
    }

    pub(crate) fn get(&self, name: &str) -> Option<&DatasetState> {
        self.0.get(name)
    }

    /// The names of the datasets holding a `T`.
    fn names_of<T: Any>(&self) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(_, s)| s.value.is::<T>())
            .map(|(name, _)| name.as_str())
            .collect()
    }
}

impl fmt::Debug for DatasetStates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(name, s)| (name, s.type_name)))
            .finish()
    }
}
