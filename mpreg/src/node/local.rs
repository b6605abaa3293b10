//! Running a job on this node: one step straight to its handler, several
//! through the executor; the node's load while they run.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::Value;

use super::dispatcher::Dispatcher;
use crate::cluster::Scope;
use crate::context::Context;
use crate::error::RpcError;
use crate::exec::{Job, Wanted, execute};
use crate::metrics::Outcome;
use crate::payload::{Payload, encoded_len};
use crate::plan::{Arg, Plan};
use crate::protocol::MAX_RESULT_DEPTH;
use crate::registry::Args;

/// Runs a job on this node: one step directly, several through the executor.
pub(crate) fn run_local(
    dispatcher: &Dispatcher,
    mut job: Job,
) -> BoxFuture<'static, Result<Vec<Payload>, RpcError>> {
    if job.steps.len() != 1 {
        let dispatcher = Dispatcher {
            scope: Scope::Here,
            ..dispatcher.clone()
        };
        return Box::pin(async move {
            let plan = Plan::from_steps(job.steps)?;
            let out = execute(plan, &dispatcher, Wanted::These(job.outputs)).await?;
            Ok(out.into_iter().map(|(_, v)| v).collect())
        });
    }
    let state = dispatcher.state.clone();
    let budget = dispatcher.budget.clone();
    let step = job.steps.remove(0);
    let (handler, metrics) = match state.registry().lookup(&step.fun, &step.locs) {
        Ok(f) => (f.handler.clone(), f.metrics.clone()),
        Err(why) => {
            let e = why.error(&step.fun, &step.locs);
            return Box::pin(async move { Err(e) });
        }
    };
    let context = Context {
        state: state.clone(),
        datasets: step.locs,
        deadline: dispatcher.deadline,
        request_id: dispatcher.trace.clone(),
    };
    let args = match read_args(step.args, step.kwargs) {
        Ok(args) => args.with_context(context),
        Err(e) => return Box::pin(async move { Err(e) }),
    };
    // The handler is called inside the future, so a panic while it builds
    // its future is caught like any other.
    Box::pin(async move {
        state.local_load.fetch_add(1, Ordering::Relaxed);
        let _done = LoadGuard(&state.local_load);
        // Ends as `cancelled` if this future is dropped first.
        let call = metrics.start();
        let result = async {
            let value = handler(args).await?;
            let Some(bytes) = encoded_len(&value, MAX_RESULT_DEPTH) else {
                dismantle(value);
                return Err(RpcError::handler_failed(format!(
                    "the result nests deeper than {MAX_RESULT_DEPTH} arrays and objects"
                )));
            };
            Ok(vec![Payload::held(Payload::Tree(value), bytes, &budget)?])
        }
        .await;
        call.end(Outcome::of(&result));
        result
    })
}

/// A step's arguments as a handler takes them (raw ones parsed).
fn read_args(args: Vec<Arg>, kwargs: Vec<(String, Arg)>) -> Result<Args, RpcError> {
    let unreadable =
        |e: serde_json::Error| RpcError::bad_request(format!("an argument could not be read: {e}"));
    let positional = args
        .into_iter()
        .map(Arg::into_value)
        .collect::<Result<_, _>>()
        .map_err(unreadable)?;
    let named = kwargs
        .into_iter()
        .map(|(k, a)| a.into_value().map(|v| (k, v)))
        .collect::<Result<_, _>>()
        .map_err(unreadable)?;
    Ok(Args::new(positional, named))
}

/// The instant `after` from now; past what the clock can represent, a
/// century from now (no deadline, in practice).
pub(crate) fn far_enough(after: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(after)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// Drops a value of any depth without recursing (a deep value's own drop
/// would overflow the stack).
fn dismantle(value: Value) {
    let mut stack = vec![value];
    while let Some(mut v) = stack.pop() {
        match &mut v {
            Value::Array(items) => stack.append(items),
            Value::Object(map) => stack.extend(std::mem::take(map).into_iter().map(|(_, v)| v)),
            _ => {}
        }
    }
}

/// Decrements a load counter when dropped (finished, failed or cancelled).
struct LoadGuard<'a>(&'a AtomicUsize);

impl Drop for LoadGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
