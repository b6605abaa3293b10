//! The dataflow executor: work starts the moment its last input is ready;
//! independent work runs concurrently, as separate tasks.
//!
//! Before anything runs, every step is **placed** (the [`Dispatch`] says
//! where it runs) and steps are grouped into **units**: a local step is a
//! unit of its own; consecutive dependent steps placed on the same remote
//! node form one unit, sent there as one [`Job`] (one round trip for a
//! chain, not one per step). A unit starts when every input from outside it
//! is ready.
//!
//! Dropping the future returned by [`execute`] cancels every unit still
//! running (their tasks are aborted): that is how request deadlines and
//! client disconnects cancel work.
//!
//! [`execute_with_progress`] also reports each step's result to a
//! [`ResultSink`] the moment it is recorded (a streaming request). It never
//! ships chains: every step is a unit of its own, so each result is known
//! (and reported) when its step finishes, not when a whole chain does.
//!
//! [`execute_timed`] also says when each step's result was known here (a
//! step of a shipped chain: when the chain's job answered), for the level
//! report of the original project's later client.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use futures_util::future::Either;
use serde_json::Value;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::error::{ErrorCode, RpcError};
use crate::payload::Payload;
use crate::plan::{Arg, Plan, Step};

/// Decides where steps run, and runs jobs there.
pub(crate) trait Dispatch: Sync {
    /// A place to run work (this node, a peer, ...).
    type Target: Clone + PartialEq + Send + std::fmt::Debug + 'static;

    /// Where `step` runs. An error fails the request before anything runs.
    fn place(&self, step: &Step) -> Result<Self::Target, RpcError>;

    /// Whether dependent steps placed on `target` travel there together as
    /// one job (worth it when reaching `target` costs a network hop).
    fn ships_chains(&self, target: &Self::Target) -> bool;

    /// Runs `job` at `target`; resolves to the values of `job.outputs`, in
    /// order. The future must not borrow `self`: it runs on its own task.
    fn run(
        &self,
        target: Self::Target,
        job: Job,
    ) -> BoxFuture<'static, Result<Vec<Payload>, RpcError>>;
}

/// Steps sent to one place together. References point only at earlier steps
/// of the same job; inputs from elsewhere are already values.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Job {
    pub(crate) steps: Vec<Step>,
    /// The steps whose results the sender needs back.
    pub(crate) outputs: Vec<usize>,
}

/// Which results a run returns.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Wanted {
    /// The sinks' (what a client gets by default).
    Sinks,
    /// Every step's.
    All,
    /// These steps', in this order (a job's outputs).
    These(Vec<usize>),
}

/// One unit: steps that run together at one target.
#[derive(Debug, Clone, PartialEq)]
struct Unit {
    /// Its steps, each after its inputs.
    steps: Vec<usize>,
    /// Steps outside the unit whose results it needs (sorted, distinct).
    inputs: Vec<usize>,
}

/// Groups steps into units: a step joins the unit of one of its inputs when
/// both are placed on the same shipping target and every input of the step
/// is inside that unit or already among the unit's inputs. The inputs of a
/// unit are thus those of its first step, so units never wait on each other
/// in a cycle.
fn group<T: PartialEq>(
    steps: &[Step],
    order: &[usize],
    targets: &[T],
    ships: impl Fn(&T) -> bool,
) -> (Vec<Unit>, Vec<usize>) {
    let mut units: Vec<Unit> = Vec::new();
    let mut unit_of = vec![usize::MAX; steps.len()];
    for &s in order {
        let deps = &steps[s].deps;
        let joined = ships(&targets[s])
            .then(|| {
                deps.iter().map(|&d| unit_of[d]).find(|&u| {
                    targets[units[u].steps[0]] == targets[s]
                        && deps
                            .iter()
                            .all(|x| unit_of[*x] == u || units[u].inputs.binary_search(x).is_ok())
                })
            })
            .flatten();
        match joined {
            Some(u) => {
                units[u].steps.push(s);
                unit_of[s] = u;
            }
            None => {
                unit_of[s] = units.len();
                units.push(Unit {
                    steps: vec![s],
                    inputs: deps.clone(),
                });
            }
        }
    }
    (units, unit_of)
}

/// What a run yields: the wanted results with their command names.
pub(crate) type RunResults = Result<Vec<(String, Payload)>, RpcError>;

/// What a timed run yields: the wanted results with their command names,
/// and for every step (by index) when its result was known here, from the
/// start of the run.
pub(crate) type Timed = (Vec<(String, Payload)>, Vec<Duration>);

/// What [`execute_many`] yields: the wanted results, and in a timed run
/// when each step's result was known.
type ManyResults = (Vec<(String, Payload)>, Option<Vec<Duration>>);

/// What a unit's task yields: the unit's index and its outputs' values.
type Finished = (usize, Result<Vec<Payload>, RpcError>);

/// Receives each step's result as soon as the executor records it: how a
/// streaming request sends per-command results ahead of its reply.
pub(crate) trait ResultSink: Sync {
    /// Step `name` produced `value`. The executor waits for the returned
    /// future before it goes on (units already running keep running), so a
    /// slow receiver slows the request down instead of piling results up.
    fn report<'a>(&'a self, name: &'a str, value: &'a Payload) -> BoxFuture<'a, ()>;
}

/// Runs `plan` to completion and returns the wanted results with their
/// command names. The first failing unit fails the whole run, with the
/// failing command's name in the error; units still running are cancelled.
pub(crate) fn execute<D: Dispatch>(
    plan: Plan,
    dispatcher: &D,
    wanted: Wanted,
) -> impl Future<Output = Result<Vec<(String, Payload)>, RpcError>> + '_ {
    execute_with_progress(plan, dispatcher, wanted, None)
}

/// [`execute`], reporting every step's result to `progress` (when given) as
/// soon as it is recorded. With `progress`, chains are not shipped: each
/// step is a unit of its own, so its result is reported when it finishes
/// (a chain on a peer then costs a round trip per step). A value is lent to
/// `progress`, never copied for it.
pub(crate) fn execute_with_progress<'a, D: Dispatch>(
    plan: Plan,
    dispatcher: &'a D,
    wanted: Wanted,
    progress: Option<&'a dyn ResultSink>,
) -> impl Future<Output = Result<Vec<(String, Payload)>, RpcError>> + 'a {
    let single = plan.steps.len() == 1
        && progress.is_none()
        && match &wanted {
            Wanted::Sinks | Wanted::All => true,
            Wanted::These(these) => these[..] == [0],
        };
    if single {
        return Either::Left(execute_one(plan, dispatcher));
    }
    // Boxed: the state of a whole dataflow run would otherwise make the
    // future of every request that large, single commands included.
    let run = Box::pin(execute_many(plan, dispatcher, wanted, progress, false));
    Either::Right(run.map(|outcome| outcome.map(|(results, _)| results)))
}

/// [`execute_with_progress`], also saying when each step's result was known
/// (see [`Timed`]). The wanted results come in the order of `wanted` (step
/// order for [`Wanted::All`]).
pub(crate) async fn execute_timed<D: Dispatch>(
    plan: Plan,
    dispatcher: &D,
    wanted: Wanted,
    progress: Option<&dyn ResultSink>,
) -> Result<Timed, RpcError> {
    let started = Instant::now();
    if plan.steps.len() == 1 && progress.is_none() {
        let results = execute_one(plan, dispatcher).await?;
        return Ok((results, vec![started.elapsed()]));
    }
    let (results, done) = Box::pin(execute_many(plan, dispatcher, wanted, progress, true)).await?;
    Ok((results, done.unwrap_or_default()))
}

/// A plan of one step whose result is wanted once: the step is placed and
/// its job started as the executor would (the same job, span, panic guard
/// and errors), without the dataflow's bookkeeping. Placement happens now;
/// the returned future keeps only the call and the command's name.
pub(crate) fn execute_one<D: Dispatch>(
    plan: Plan,
    dispatcher: &D,
) -> Either<
    std::future::Ready<RunResults>,
    impl Future<Output = RunResults> + Send + 'static + use<D>,
> {
    let Some(mut step) = plan.steps.into_iter().next() else {
        let never = RpcError::new(ErrorCode::Internal, "a command never ran");
        return Either::Left(std::future::ready(Err(never)));
    };
    let target = match dispatcher.place(&step) {
        Ok(target) => target,
        Err(e) => return Either::Left(std::future::ready(Err(e.with_command(step.name)))),
    };
    let name = step.name.clone();
    // One step has no references (a plan never lets a step name itself).
    step.deps.clear();
    let span = tracing::debug_span!(
        "command",
        name = %step.name,
        fun = %step.fun,
        steps = 1usize,
        at = ?target,
    );
    let job = Job {
        steps: vec![step],
        outputs: vec![0],
    };
    let call = tracing::Instrument::instrument(guarded(dispatcher.run(target, job)), span);
    // A combinator, not an async block: awaiting a captured future would
    // keep room for it twice.
    Either::Right(call.map(move |values| {
        let values = values.map_err(|e| e.with_command(&name))?;
        match <[Payload; 1]>::try_from(values) {
            Ok([value]) => Ok(vec![(name, value)]),
            Err(values) => Err(RpcError::new(
                ErrorCode::Internal,
                format!("expected 1 results, got {}", values.len()),
            )
            .with_command(name)),
        }
    }))
}

/// [`execute_with_progress`] for any plan; when `timed`, also when each
/// step's result was known (see [`Timed`]).
async fn execute_many<D: Dispatch>(
    plan: Plan,
    dispatcher: &D,
    wanted: Wanted,
    progress: Option<&dyn ResultSink>,
    timed: bool,
) -> Result<ManyResults, RpcError> {
    let Plan {
        steps,
        dependents: _,
        sinks,
        order,
    } = plan;
    let n = steps.len();
    let targets = steps
        .iter()
        .map(|s| dispatcher.place(s).map_err(|e| e.with_command(&s.name)))
        .collect::<Result<Vec<_>, _>>()?;
    let wanted: Vec<usize> = match wanted {
        Wanted::Sinks => sinks,
        Wanted::All => (0..n).collect(),
        Wanted::These(these) => these,
    };
    let streaming = progress.is_some();
    let (units, unit_of) = group(&steps, &order, &targets, |t| {
        !streaming && dispatcher.ships_chains(t)
    });

    // Per step: how many times its result will still be read from outside
    // its unit (each reference, plus once for the reply). The last reader
    // takes the value; earlier ones copy it.
    let mut reads_left = vec![0usize; n];
    for &w in &wanted {
        reads_left[w] += 1;
    }
    for (i, step) in steps.iter().enumerate() {
        for arg in step.all_args() {
            if let Arg::Ref(j) = *arg
                && unit_of[j] != unit_of[i]
            {
                reads_left[j] += 1;
            }
        }
    }
    // A unit returns the results read from outside it (every result, when
    // they are reported).
    let outputs: Vec<Vec<usize>> = units
        .iter()
        .map(|u| {
            u.steps
                .iter()
                .copied()
                .filter(|&s| streaming || reads_left[s] > 0)
                .collect()
        })
        .collect();
    // Which units wait for each step's result.
    let mut consumers: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (u, unit) in units.iter().enumerate() {
        for &input in &unit.inputs {
            consumers[input].push(u);
        }
    }

    let mut run = Dataflow {
        waiting: units.iter().map(|u| u.inputs.len()).collect(),
        results: vec![None; n],
        reads_left,
        steps: steps.into_iter().map(Some).collect(),
        unit_of,
        position: vec![usize::MAX; n],
        targets,
        running: JoinSet::new(),
        dispatcher,
        started: Instant::now(),
        done_at: timed.then(|| vec![Duration::ZERO; n]),
    };
    // Units start when their inputs are ready. When exactly one unit is
    // ready and nothing else runs (a single command, each link of a chain),
    // it runs inline: no task, no scheduling. Otherwise each ready unit gets
    // a task of its own, so independent work runs in parallel.
    let mut ready: Vec<usize> = (0..units.len()).filter(|&u| run.waiting[u] == 0).collect();
    loop {
        while let ([u], true) = (&ready[..], run.running.is_empty()) {
            let u = *u;
            ready.clear();
            let values = run.prepare(u, &units[u], &outputs[u]).await;
            run.complete(&units[u], &outputs[u], values, &consumers, &mut ready)?;
            if let Some(progress) = progress {
                run.report(progress, &outputs[u]).await;
            }
        }
        for u in ready.drain(..) {
            run.start(u, &units[u], &outputs[u]);
        }
        let Some(joined) = run.running.join_next().await else {
            break;
        };
        let (u, outcome) = joined
            .map_err(|e| RpcError::new(ErrorCode::Internal, format!("command task failed: {e}")))?;
        run.complete(&units[u], &outputs[u], outcome, &consumers, &mut ready)?;
        if let Some(progress) = progress {
            run.report(progress, &outputs[u]).await;
        }
    }
    run.finish(wanted)
}

/// The state of one execution.
struct Dataflow<'d, D: Dispatch> {
    /// Steps not yet sent; a step's name stays for error messages until the
    /// end.
    steps: Vec<Option<Step>>,
    unit_of: Vec<usize>,
    targets: Vec<D::Target>,
    /// Inputs each unit still waits for.
    waiting: Vec<usize>,
    /// Finished results, until their last reader takes them.
    results: Vec<Option<Payload>>,
    reads_left: Vec<usize>,
    /// A step's index within its job (scratch space for `start`).
    position: Vec<usize>,
    /// The units running now; dropping the set aborts them.
    running: JoinSet<Finished>,
    dispatcher: &'d D,
    /// When the run started.
    started: Instant,
    /// In a timed run, per step, when its unit finished (from `started`).
    done_at: Option<Vec<Duration>>,
}

impl<D: Dispatch> Dataflow<'_, D> {
    fn name(&self, step: usize) -> String {
        self.steps[step]
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_default()
    }

    /// Takes one read of step `j`'s result.
    fn take(&mut self, j: usize) -> Option<Payload> {
        self.reads_left[j] -= 1;
        if self.reads_left[j] == 0 {
            self.results[j].take()
        } else {
            self.results[j].clone()
        }
    }

    /// Records a unit's outcome; the units it was the last input of are
    /// pushed on `ready`. An error names the unit's first command.
    fn complete(
        &mut self,
        unit: &Unit,
        outputs: &[usize],
        outcome: Result<Vec<Payload>, RpcError>,
        consumers: &[Vec<usize>],
        ready: &mut Vec<usize>,
    ) -> Result<(), RpcError> {
        let first = unit.steps[0];
        let values = outcome.map_err(|e| e.with_command(self.name(first)))?;
        if let Some(done_at) = &mut self.done_at {
            let now = self.started.elapsed();
            for &s in &unit.steps {
                done_at[s] = now;
            }
        }
        if values.len() != outputs.len() {
            return Err(RpcError::new(
                ErrorCode::Internal,
                format!("expected {} results, got {}", outputs.len(), values.len()),
            )
            .with_command(self.name(first)));
        }
        for (&o, value) in outputs.iter().zip(values) {
            self.results[o] = Some(value);
            for &c in &consumers[o] {
                self.waiting[c] -= 1;
                if self.waiting[c] == 0 {
                    ready.push(c);
                }
            }
        }
        Ok(())
    }

    /// Reports the just recorded results of `outputs` (before any reader
    /// can take them).
    async fn report(&self, progress: &dyn ResultSink, outputs: &[usize]) {
        for &o in outputs {
            if let (Some(step), Some(value)) = (&self.steps[o], &self.results[o]) {
                progress.report(&step.name, value).await;
            }
        }
    }

    /// The wanted results, with their command names (and, in a timed run,
    /// when each step finished).
    fn finish(mut self, wanted: Vec<usize>) -> Result<ManyResults, RpcError> {
        let results = wanted
            .into_iter()
            .map(|w| {
                let value = self.take(w);
                let name = self.steps[w].take().map(|s| s.name).unwrap_or_default();
                value
                    .map(|v| (name, v))
                    .ok_or_else(|| RpcError::new(ErrorCode::Internal, "a command never ran"))
            })
            .collect::<Result<_, _>>()?;
        Ok((results, self.done_at.take()))
    }

    /// Sends unit `u`, whose inputs are all ready, to its target, on a task
    /// of its own.
    fn start(&mut self, u: usize, unit: &Unit, outputs: &[usize]) {
        let call = self.prepare(u, unit, outputs);
        self.running.spawn(async move { (u, call.await) });
    }

    /// The call that runs unit `u` (inputs ready) at its target, with the
    /// values of `outputs` as its result.
    fn prepare(
        &mut self,
        u: usize,
        unit: &Unit,
        outputs: &[usize],
    ) -> impl Future<Output = Result<Vec<Payload>, RpcError>> + Send + 'static {
        let mut job_steps = Vec::with_capacity(unit.steps.len());
        for (pos, &s) in unit.steps.iter().enumerate() {
            self.position[s] = pos;
            let Some(template) = self.steps[s].as_mut() else {
                continue;
            };
            // Move the payload out; the name stays for error messages.
            let mut step = Step {
                name: template.name.clone(),
                fun: std::mem::take(&mut template.fun),
                locs: std::mem::take(&mut template.locs),
                deps: std::mem::take(&mut template.deps),
                args: std::mem::take(&mut template.args),
                kwargs: std::mem::take(&mut template.kwargs),
            };
            step.deps.retain(|&d| self.unit_of[d] == u);
            for d in &mut step.deps {
                *d = self.position[*d];
            }
            step.args = std::mem::take(&mut step.args)
                .into_iter()
                .map(|a| self.localize(u, a))
                .collect();
            step.kwargs = std::mem::take(&mut step.kwargs)
                .into_iter()
                .map(|(k, a)| (k, self.localize(u, a)))
                .collect();
            job_steps.push(step);
        }
        let job = Job {
            steps: job_steps,
            outputs: outputs.iter().map(|&o| self.position[o]).collect(),
        };
        let target = self.targets[unit.steps[0]].clone();
        let span = tracing::debug_span!(
            "command",
            name = %job.steps.first().map_or("", |s| s.name.as_str()),
            fun = %job.steps.first().map_or("", |s| s.fun.as_str()),
            steps = job.steps.len(),
            at = ?target,
        );
        tracing::Instrument::instrument(guarded(self.dispatcher.run(target, job)), span)
    }

    /// An argument as seen from inside unit `u`: a reference into the unit
    /// becomes a reference to the step's place in the job; any other
    /// reference becomes the (ready) value.
    fn localize(&mut self, u: usize, arg: Arg) -> Arg {
        match arg {
            Arg::Ref(j) if self.unit_of[j] == u => Arg::Ref(self.position[j]),
            Arg::Ref(j) => Arg::Value(self.take(j).unwrap_or(Payload::Tree(Value::Null))),
            value => value,
        }
    }
}

/// Turns a panic inside a handler into a `handler_failed` error, so one bad
/// handler never takes down a connection or the node.
pub(crate) async fn guarded<T>(
    call: BoxFuture<'static, Result<T, RpcError>>,
) -> Result<T, RpcError> {
    match AssertUnwindSafe(call).catch_unwind().await {
        Ok(outcome) => outcome,
        Err(payload) => Err(RpcError::handler_failed(format!(
            "handler panicked: {}",
            panic_message(&*payload)
        ))),
    }
}

/// The message of a panic payload (`&str` or `String`), or a placeholder.
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(non-string panic payload)"
    }
}

#[cfg(test)]
mod tests;
