//! Where the commands of a request (or of a job a peer sent) run, and
//! running them there: the [`Dispatcher`] the executor dispatches through,
//! jobs sent to peers (over a link opened on demand, retried once elsewhere
//! when idempotent), jobs peers send here, and `mpreg.functions`.

use super::peering::dial;
use super::{RunningNode, run_local};
use crate::cluster::{PeerKey, Scope, Target, function_table};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::budget::ResultBudget;
use crate::cluster::routes::{Candidate, choose, random_below};
use crate::error::{ErrorCode, RpcError};
use crate::exec::{Dispatch, Job, Wanted, execute};
use crate::link::{Link, LinkHandler};
use crate::payload::Payload;
use crate::plan::{Plan, Step};
use crate::protocol::peer::{Ability, Catalog, JobLimits};

/// A dial in progress, shared by everyone waiting for it.
type Dialing = futures_util::future::Shared<BoxFuture<'static, Result<Link, Arc<str>>>>;

/// Links being opened, by address: everyone who needs a link to that node
/// waits for the same dial.
pub(crate) type Dials = std::sync::Mutex<HashMap<SocketAddr, Dialing>>;

/// Every function in the cluster as this node sees it, described, with the
/// nodes that run it (what `mpreg.functions` returns). Members' cards carry
/// no descriptions: a function described nowhere at hand is described by
/// one node that runs it (`mpreg.describe`, over a link), at most
/// [`DESCRIBE_AT_ONCE`] nodes asked at once; a node that cannot answer
/// leaves its functions undescribed.
pub(crate) async fn describe_functions(state: &Arc<RunningNode>) -> Value {
    let registry = state.registry();
    let places = state.cluster.places(&state.own(&registry));
    let (mut by_fun, mut described) = function_table(&places);
    // One node to ask per function still undescribed, each node once.
    let mut ask: HashMap<PeerKey, Vec<String>> = HashMap::new();
    for (_, key, a) in &places {
        if let Some(key) = key
            && !described.contains(&a.fun)
        {
            described.insert(a.fun.clone());
            ask.entry(*key).or_default().push(a.fun.clone());
        }
    }
    let dispatcher = Dispatcher {
        state: state.clone(),
        scope: Scope::Cluster,
        deadline: Instant::now() + DESCRIBE_TIMEOUT,
        trace: Arc::from("mpreg.functions"),
        budget: ResultBudget::new(state.config.reply_budget(), state.inflight_bytes.clone()),
    };
    let answers = futures_util::stream::iter(ask)
        .map(|(key, names)| {
            let dispatcher = dispatcher.clone();
            async move {
                let step = Step {
                    name: "describe".to_owned(),
                    fun: DESCRIBE.to_owned(),
                    args: vec![crate::plan::Arg::Value(Payload::from(json!(names)))],
                    kwargs: Vec::new(),
                    locs: Vec::new(),
                    deps: Vec::new(),
                };
                let job = Job {
                    steps: vec![step],
                    outputs: vec![0],
                };
                attempt(&dispatcher, key, &job).await
            }
        })
        .buffer_unordered(DESCRIBE_AT_ONCE)
        .collect::<Vec<_>>()
        .await;
    for answer in answers {
        let Ok(values) = answer else { continue };
        for value in values {
            let abilities = value
                .into_value()
                .ok()
                .and_then(|v| serde_json::from_value::<Vec<Ability>>(v).ok());
            let Some(abilities) = abilities else { continue };
            for a in abilities {
                if let Some(entry) = by_fun.get_mut(&a.fun) {
                    entry["params"] = json!(a.params);
                    entry["returns"] = json!(a.returns);
                    entry["doc"] = json!(a.doc);
                }
            }
        }
    }
    Value::Array(by_fun.into_values().collect())
}

/// The built-in that describes functions of the node it runs on (local
/// only, not advertised): `mpreg.functions` asks it of peers.
pub(crate) const DESCRIBE: &str = "mpreg.describe";
/// How long `mpreg.functions` waits for descriptions.
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Nodes asked for descriptions at once.
const DESCRIBE_AT_ONCE: usize = 16;

/// Places and runs the commands of one request (or of one job a peer
/// sent), within its deadline.
#[derive(Debug, Clone)]
pub(crate) struct Dispatcher {
    pub(crate) state: Arc<RunningNode>,
    pub(crate) scope: Scope,
    pub(crate) deadline: Instant,
    /// The request's id, carried to peers so one request can be followed
    /// across the cluster's logs.
    pub(crate) trace: Arc<str>,
    /// The bytes of results the request (or job) may hold.
    pub(crate) budget: Arc<ResultBudget>,
}

impl Dispatch for Dispatcher {
    type Target = Target;

    fn place(&self, step: &Step) -> Result<Target, RpcError> {
        let candidates = self.state.cluster.candidates(
            self.state.local_load(),
            &step.fun,
            &step.locs,
            self.scope,
            None,
        )?;
        let pick = choose(&candidates, random_below).unwrap_or(0);
        Ok(candidates[pick].target)
    }

    fn ships_chains(&self, target: &Target) -> bool {
        matches!(target, Target::Peer(_))
    }

    fn run(&self, target: Target, job: Job) -> BoxFuture<'static, Result<Vec<Payload>, RpcError>> {
        match target {
            Target::Local => run_local(self, job),
            Target::Peer(key) => Box::pin(run_remote(self.clone(), key, job)),
        }
    }
}

/// Runs a job on a peer. If the peer is lost and every function of the
/// job is idempotent, runs it once more elsewhere.
async fn run_remote(
    dispatcher: Dispatcher,
    key: PeerKey,
    job: Job,
) -> Result<Vec<Payload>, RpcError> {
    let cluster = &dispatcher.state.cluster;
    // The job is encoded from a borrow, so it is still here for a retry.
    let retry = cluster.idempotent(&job);
    let first = attempt(&dispatcher, key, &job).await;
    let Err(e) = &first else {
        return first;
    };
    if !retry || e.code != ErrorCode::NodeLost {
        return first;
    }
    // Somewhere else that can run every step of the job.
    let mut options: Option<Vec<Candidate<Target>>> = None;
    for step in &job.steps {
        let here = cluster
            .candidates(
                dispatcher.state.local_load(),
                &step.fun,
                &step.locs,
                dispatcher.scope,
                Some(Target::Peer(key)),
            )
            .unwrap_or_default();
        options = Some(match options {
            None => here,
            Some(prev) => prev
                .into_iter()
                .filter(|c| here.iter().any(|h| h.target == c.target))
                .collect(),
        });
    }
    let options = options.unwrap_or_default();
    let Some(pick) = choose(&options, random_below) else {
        return first;
    };
    tracing::debug!(error = %e, "retrying an idempotent job on another node");
    let target = options[pick].target;
    match target {
        Target::Local => run_local(&dispatcher, job).await,
        // Boxed: a retry is rare, and its state would otherwise double
        // that of every forwarded job.
        Target::Peer(other) => Box::pin(attempt(&dispatcher, other, &job)).await,
    }
}

async fn attempt(
    dispatcher: &Dispatcher,
    key: PeerKey,
    job: &Job,
) -> Result<Vec<Payload>, RpcError> {
    // A link that starts closing for being idle just as the job would go
    // takes no job (nothing was sent): a fresh link to the node does.
    for _ in 0..3 {
        let link = match dispatcher.state.cluster.link(key) {
            Some(link) => link,
            None => connect(&dispatcher.state, key, dispatcher.deadline).await?,
        };
        let Some(slot) = link.reserve() else {
            continue;
        };
        let left = dispatcher
            .deadline
            .saturating_duration_since(Instant::now());
        let limits = JobLimits {
            max_message: dispatcher.state.config.max_message_size,
            // What the job's results may add to what the request holds.
            budget: dispatcher.budget.left(),
        };
        let values = link
            .run_job(slot, job, left, &dispatcher.trace, limits)
            .await?;
        // The peer kept within `budget`; other parts of the request may
        // have taken some of it meanwhile.
        return values
            .into_iter()
            .map(|v| {
                let bytes = v.json_len();
                Payload::held(v, bytes, &dispatcher.budget)
            })
            .collect();
    }
    Err(RpcError::new(
        ErrorCode::NodeLost,
        "every link to the node closed before the call could go",
    ))
}

/// Opens a link to the member `key` (or waits for the dial another call
/// started), within `deadline`: links open when a command must go there.
async fn connect(
    state: &Arc<RunningNode>,
    key: PeerKey,
    deadline: Instant,
) -> Result<Link, RpcError> {
    let Some((addr, name)) = state.cluster.member_addr(key) else {
        return Err(RpcError::new(
            ErrorCode::NodeLost,
            "the node left before the call",
        ));
    };
    let dialing = {
        let mut dialing = state.dialing.lock().unwrap_or_else(PoisonError::into_inner);
        dialing
            .entry(addr)
            .or_insert_with(|| {
                let state = state.clone();
                let dial: BoxFuture<'static, Result<Link, Arc<str>>> = Box::pin(async move {
                    let url = format!("{}://{addr}", state.tls.scheme());
                    let linked = dial(&state, &url).await.map(|(_, link)| link);
                    state
                        .dialing
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&addr);
                    linked.map_err(Arc::from)
                });
                futures_util::FutureExt::shared(dial)
            })
            .clone()
    };
    match tokio::time::timeout_at(deadline, dialing).await {
        Ok(Ok(link)) => Ok(link),
        Ok(Err(e)) => Err(RpcError::new(
            ErrorCode::NodeLost,
            format!("cannot link to node '{name}' at {addr}: {e}"),
        )),
        Err(_) => Err(RpcError::new(
            ErrorCode::Timeout,
            format!("no link to node '{name}' at {addr} before the deadline"),
        )),
    }
}

/// Serves a peer's messages for this node.
pub(super) struct Served {
    pub(super) state: Arc<RunningNode>,
    pub(super) key: PeerKey,
}

impl LinkHandler for Served {
    fn run(
        &self,
        job: Job,
        timeout: Duration,
        trace: Option<String>,
        budget: Option<u64>,
    ) -> BoxFuture<'static, Result<Vec<Payload>, RpcError>> {
        let trace: Arc<str> = trace.unwrap_or_default().into();
        let span = tracing::debug_span!("job", node = %self.state.name, id = %trace, steps = job.steps.len());
        // What the sender accepts, within this node's own budgets.
        let config = &self.state.config;
        let limit = budget
            .map_or(usize::MAX, |b| usize::try_from(b).unwrap_or(usize::MAX))
            .min(config.reply_budget())
            .min(config.max_message_size);
        let dispatcher = Dispatcher {
            state: self.state.clone(),
            scope: Scope::Here,
            deadline: crate::node::far_enough(timeout),
            trace,
            budget: ResultBudget::new(limit, self.state.inflight_bytes.clone()),
        };
        Box::pin(tracing::Instrument::instrument(
            async move {
                if let Some(bad) = job.outputs.iter().find(|&&o| o >= job.steps.len()) {
                    return Err(RpcError::bad_request(format!(
                        "job output {bad} names no step (the job has {})",
                        job.steps.len()
                    )));
                }
                let plan = Plan::from_steps(job.steps)?;
                let run = execute(plan, &dispatcher, Wanted::These(job.outputs));
                match tokio::time::timeout(timeout, run).await {
                    Ok(out) => Ok(out?.into_iter().map(|(_, v)| v).collect()),
                    Err(_) => Err(RpcError::new(
                        ErrorCode::Timeout,
                        format!("job did not finish within {} ms", timeout.as_millis()),
                    )),
                }
            },
            span,
        ))
    }

    fn max_answer(&self) -> usize {
        self.state.config.max_message_size
    }

    fn catalog(&self, catalog: Catalog) {
        if let Some(is_leaf) = self.state.cluster.take_catalog(self.key, catalog) {
            self.state.routing_changed(is_leaf);
        }
    }
}
