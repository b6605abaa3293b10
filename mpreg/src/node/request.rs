//! How a node answers a client's request: parse, plan, place, run within
//! the deadline, and the reply in the client's form.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::{BoxFuture, Either};
use serde_json::{Value, json};
use tokio::time::error::Elapsed;
use tokio_tungstenite::tungstenite::{Bytes, Message};

use super::RunningNode;
use super::dispatcher::Dispatcher;
use super::local::far_enough;
use crate::budget::ResultBudget;
use crate::client::Results;
use crate::cluster::Scope;
use crate::error::{Error, ErrorCode, RpcError};
use crate::exec::{
    ResultSink, RunResults, Wanted, execute_one, execute_timed, execute_with_progress,
};
use crate::payload::Payload;
use crate::plan::Plan;
use crate::protocol::later::{Report, Timing};
use crate::protocol::{
    Answer, IncomingRequest, ProgressMessage, Rejected, ReplyShape, ReplyTo, Request, parse_request,
};

/// Answers one client frame with the encoded reply. A request that asks for
/// `stream` sends its progress messages to `outgoing` (the connection's
/// queue) before the reply is returned. `reply_limit` is the connection's
/// reply budget (see [`crate::protocol::reply_limit`]), which the request
/// carries as its [`reply_budget`](IncomingRequest::reply_budget).
pub(crate) async fn handle_frame(
    state: &Arc<RunningNode>,
    frame: Bytes,
    outgoing: &crate::ws::Outgoing,
    reply_limit: usize,
) -> String {
    let counted = state.metrics.request();
    let size = frame.len();
    // The frame, and what is planned from it, is held until the reply is
    // written: node-wide, requests hold at most `max_inflight_bytes`.
    let Some(_frame_bytes) = state.inflight_bytes.charge(size) else {
        counted.end(Some(ErrorCode::Overloaded));
        let limit = state.inflight_bytes.limit();
        let error = crate::budget::Over::Node { limit }.error(size);
        return Answer::err(crate::protocol::reply_to(&frame), error).encode();
    };
    let parsed = crate::ws::cpu_bound(size, move || parse_request(&frame)).await;
    let stopping = || {
        Answer::err(
            ReplyTo::mpreg(Value::Null),
            RpcError::new(ErrorCode::Internal, "the node is stopping"),
        )
    };
    let reply = match parsed {
        Some(Ok(mut incoming)) => {
            incoming.reply_budget = reply_limit;
            handle(state, incoming, Some(outgoing)).await
        }
        Some(Err(Rejected { to, error })) => Answer::err(to, *error),
        None => stopping(),
    };
    counted.end(reply.error.as_ref().map(|e| e.code));
    // A large request usually has a large reply.
    match crate::ws::cpu_bound(size, move || reply.encode()).await {
        Some(text) => text,
        None => stopping().encode(),
    }
}

/// Runs `request` (with id `u`) through this node, in process (without
/// streaming: `stream` is ignored).
pub(crate) async fn send(
    state: &Arc<RunningNode>,
    u: Value,
    request: Request,
) -> Result<Results, Error> {
    let mut incoming = IncomingRequest::new(u, request);
    incoming.reply_budget = state.config.reply_budget();
    let answer = handle(state, incoming, None).await;
    crate::client::results_of(answer.into_reply())
}

/// Sends each result of a streaming request to its connection as a
/// progress message, through the connection's bounded queue: when the client
/// reads slowly, the request waits rather than piling messages up.
struct ToConnection<'a> {
    u: &'a Value,
    outgoing: &'a crate::ws::Outgoing,
}

impl ResultSink for ToConnection<'_> {
    fn report<'a>(&'a self, name: &'a str, value: &'a Payload) -> BoxFuture<'a, ()> {
        let text = ProgressMessage::new(self.u, name, value).encode();
        Box::pin(async move {
            // Fails only when the connection is already gone.
            let _ = self.outgoing.send(Message::text(text)).await;
        })
    }
}

/// Plans, places and runs a request within its deadline. When the request
/// asks for `stream` and `progress_to` is a connection's queue, each
/// command's result is sent there as soon as it exists.
///
/// Planning (and, for a single command, placing it and starting its call)
/// happens at once; the returned future then holds little more than the
/// call, so that a connection's future per request stays small. Requests of
/// several commands, and streaming ones, run the executor on a future of
/// their own.
pub(crate) fn handle<'a>(
    state: &'a Arc<RunningNode>,
    incoming: IncomingRequest,
    progress_to: Option<&'a crate::ws::Outgoing>,
) -> impl Future<Output = Answer> + Send + 'a {
    let request = incoming;
    let shape = request.shape();
    let to = request.reply_to();
    // The bytes of results the request may hold: its reply's budget
    // (the node's, or less when the client asked for less).
    let reply_budget = request.reply_budget.min(state.config.reply_budget());
    let deadline = request
        .timeout
        .unwrap_or_else(|| state.config.request_timeout());
    let plan = match Plan::new(request.cmds, state.config.max_commands_per_request) {
        Ok(plan) => plan,
        Err(e) => return Either::Left(std::future::ready(Answer::err(to, e))),
    };
    let progress_to = progress_to.filter(|_| request.stream);
    // Each on a future of its own: the later client's timed run would
    // make every multi-command request's future larger.
    if shape.timed() {
        let run = run_timed(state, to, plan, shape, deadline, reply_budget, progress_to);
        return Either::Right(Either::Right(Box::pin(run) as BoxFuture<'a, Answer>));
    }
    if plan.steps.len() != 1 || progress_to.is_some() {
        let run = run_request(state, to, plan, shape, deadline, reply_budget, progress_to);
        return Either::Right(Either::Right(Box::pin(run) as BoxFuture<'a, Answer>));
    }
    let (dispatcher, span) = dispatcher_for(state, &to.u, deadline, reply_budget);
    let call = {
        let _in_span = span.enter();
        execute_one(plan, &dispatcher)
    };
    let run =
        tracing::Instrument::instrument(tokio::time::timeout_at(dispatcher.deadline, call), span);
    // A combinator, not an async block: awaiting a captured future would
    // keep room for it twice.
    let reply = move |outcome: Result<RunResults, Elapsed>| {
        reply_of(
            state,
            to,
            deadline,
            outcome.map(|ran| ran.map(Ran::Results)),
        )
    };
    Either::Right(Either::Left(futures_util::FutureExt::map(run, reply)))
}

/// How a run that did not fail ended: its wanted results, or with a
/// report for the later client (see [`crate::protocol::later`]).
enum Ran {
    Results(Vec<(String, Payload)>),
    Reported(Vec<(String, Payload)>, Report),
}

/// The dispatcher of a client request with id `u`, and its span.
fn dispatcher_for(
    state: &Arc<RunningNode>,
    u: &Value,
    deadline: Duration,
    reply_budget: usize,
) -> (Dispatcher, tracing::Span) {
    let trace: Arc<str> = match u {
        Value::String(s) => s.as_str().into(),
        other => other.to_string().into(),
    };
    let span = tracing::debug_span!("request", node = %state.name, id = %trace);
    let dispatcher = Dispatcher {
        state: state.clone(),
        scope: Scope::Cluster,
        deadline: far_enough(deadline),
        trace,
        budget: ResultBudget::new(reply_budget, state.inflight_bytes.clone()),
    };
    (dispatcher, span)
}

/// [`handle`] for any plan: through the executor, with progress messages
/// to `progress_to` when given.
async fn run_request(
    state: &Arc<RunningNode>,
    to: ReplyTo,
    plan: Plan,
    shape: ReplyShape,
    deadline: Duration,
    reply_budget: usize,
    progress_to: Option<&crate::ws::Outgoing>,
) -> Answer {
    let (dispatcher, span) = dispatcher_for(state, &to.u, deadline, reply_budget);
    let progress = progress_to.map(|outgoing| ToConnection { u: &to.u, outgoing });
    let progress = progress.as_ref().map(|p| p as &dyn ResultSink);
    let run = tokio::time::timeout_at(
        dispatcher.deadline,
        execute_with_progress(plan, &dispatcher, wanted(shape), progress),
    );
    let outcome = tracing::Instrument::instrument(run, span).await;
    reply_of(
        state,
        to,
        deadline,
        outcome.map(|ran| ran.map(Ran::Results)),
    )
}

/// [`run_request`] for the later client's levels or execution summary:
/// timed, and answered with a report (see [`crate::protocol::later`]).
async fn run_timed(
    state: &Arc<RunningNode>,
    to: ReplyTo,
    plan: Plan,
    shape: ReplyShape,
    deadline: Duration,
    reply_budget: usize,
    progress_to: Option<&crate::ws::Outgoing>,
) -> Answer {
    let (dispatcher, span) = dispatcher_for(state, &to.u, deadline, reply_budget);
    let progress = progress_to.map(|outgoing| ToConnection { u: &to.u, outgoing });
    let progress = progress.as_ref().map(|p| p as &dyn ResultSink);
    let depths = plan.depths();
    let started = std::time::SystemTime::now();
    let clock = tokio::time::Instant::now();
    // The deadline is the dispatcher's (one clock read).
    let run = tokio::time::timeout_at(
        dispatcher.deadline,
        execute_timed(plan, &dispatcher, wanted(shape), progress),
    );
    let outcome = tracing::Instrument::instrument(run, span).await;
    let outcome = outcome.map(|ran| {
        ran.map(|(mut results, done)| {
            let timing = Timing {
                depths,
                done,
                total: clock.elapsed(),
                started,
            };
            let report = Report::new(&to.u, &mut results, &timing, shape.levels, shape.summary);
            Ran::Reported(results, report)
        })
    });
    reply_of(state, to, deadline, outcome)
}

/// The results a request of `shape` wants: every command's, or the sinks'.
fn wanted(shape: ReplyShape) -> Wanted {
    if shape.all {
        Wanted::All
    } else {
        Wanted::Sinks
    }
}

/// The answer to request `to` from how its run ended.
fn reply_of(
    state: &RunningNode,
    to: ReplyTo,
    deadline: Duration,
    outcome: Result<Result<Ran, RpcError>, Elapsed>,
) -> Answer {
    match outcome {
        Ok(Ok(Ran::Results(results))) => Answer::ok(to, results),
        // A level report repeats results: the whole reply must still fit
        // in one message.
        Ok(Ok(Ran::Reported(results, report))) => {
            Answer::reported(to, results, report, state.config.max_message_size)
        }
        Ok(Err(e)) => {
            tracing::debug!(node = %state.name, u = %to.u, error = %e, "request failed");
            Answer::err(to, e)
        }
        Err(_) => Answer::err(
            to,
            RpcError::new(
                ErrorCode::Timeout,
                format!("request did not finish within {} ms", deadline.as_millis()),
            )
            .with_details(json!({ "timeout_ms": deadline.as_millis() as u64 })),
        ),
    }
}
