//! Functions every node serves: `echo`, `echos`, `mpreg.whoami`, and with
//! diagnostics on, `debug.sleep`, `debug.fail` and `debug.panic`.

use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use serde_json::Value;

use crate::error::RpcError;
use crate::node::RunningNode;
use crate::registry::{Args, Function, Param};

const ECHO_PARAMS: &[Param] = &[Param::new("arg", "any JSON value")];
const SLEEP_PARAMS: &[Param] = &[Param::new("ms", "u64")];
const FAIL_PARAMS: &[Param] = &[Param::new("message", "String")];
const DESCRIBE_PARAMS: &[Param] = &[Param::new("names", "Vec<String>")];

/// Where `mpreg.cluster` finds its node, once the node exists.
pub(crate) type NodeSlot = Arc<OnceLock<Weak<RunningNode>>>;

/// The built-in functions of a node named `name`.
pub(crate) fn functions(name: &str, diagnostics: bool, node: NodeSlot) -> Vec<Function> {
    let mut fns = vec![
        Function::new("echo", |mut args: Args| async move {
            args.__check(ECHO_PARAMS)?;
            if args.positional().is_empty() && args.named().is_empty() {
                return Err(RpcError::bad_arguments(
                    "missing argument `arg` (expected any JSON value)",
                ));
            }
            args.__take::<Value>(0, &ECHO_PARAMS[0])
        })
        .params(ECHO_PARAMS, "any JSON value")
        .doc("Returns its one argument unchanged.")
        .idempotent(),
        Function::new("echos", |args: Args| async move {
            let (positional, named) = args.into_parts();
            if let Some(key) = named.keys().next() {
                return Err(RpcError::bad_arguments(format!(
                    "echos takes positional arguments only, got `{key}`"
                )));
            }
            Ok(Value::Array(positional))
        })
        .returns("array")
        .doc("Returns its positional arguments as a list.")
        .idempotent(),
    ];
    let whoami = Value::String(name.to_owned());
    fns.push(
        Function::new("mpreg.whoami", move |args: Args| {
            let name = whoami.clone();
            async move {
                args.__check(&[])?;
                Ok(name)
            }
        })
        .returns("String")
        .doc("Returns the name of the node that ran it.")
        .idempotent(),
    );
    let slot = node.clone();
    fns.push(
        Function::new("mpreg.functions", move |args: Args| {
            let node = slot.get().and_then(Weak::upgrade);
            async move {
                args.__check(&[])?;
                let node = node.ok_or_else(|| {
                    RpcError::new(crate::ErrorCode::Internal, "the node is shutting down")
                })?;
                Ok(crate::node::describe_functions(&node).await)
            }
        })
        .returns("array")
        .doc("Every function in the cluster as the node that ran it sees it: parameters (names and types), return type, doc comment, and the nodes that run it with their datasets.")
        .idempotent()
        .local_only(),
    );
    let slot = node.clone();
    fns.push(
        Function::new(crate::node::DESCRIBE, move |mut args: Args| {
            let node = slot.get().and_then(Weak::upgrade);
            async move {
                args.__check(DESCRIBE_PARAMS)?;
                let names: Vec<String> = args.__take(0, &DESCRIBE_PARAMS[0])?;
                let node = node.ok_or_else(|| {
                    RpcError::new(crate::ErrorCode::Internal, "the node is shutting down")
                })?;
                let registry = node.registry();
                let described: Vec<crate::protocol::peer::Ability> = registry
                    .iter()
                    .filter(|f| names.contains(&f.name))
                    .map(crate::protocol::peer::Ability::of)
                    .collect();
                serde_json::to_value(described)
                    .map_err(|e| RpcError::new(crate::ErrorCode::Internal, e.to_string()))
            }
        })
        .params(DESCRIBE_PARAMS, "array")
        .doc("Describes the functions of the node that runs it, by name (what `mpreg.functions` asks of the nodes whose functions it has no description of).")
        .idempotent()
        .local_only(),
    );
    fns.push(
        Function::new("mpreg.cluster", move |args: Args| {
            let node = node.get().and_then(Weak::upgrade);
            async move {
                args.__check(&[])?;
                let node = node.ok_or_else(|| {
                    RpcError::new(crate::ErrorCode::Internal, "the node is shutting down")
                })?;
                serde_json::to_value(node.cluster_view())
                    .map_err(|e| RpcError::new(crate::ErrorCode::Internal, e.to_string()))
            }
        })
        .returns("object")
        .doc("The cluster as the node that ran it sees it: nodes, addresses, status, functions with datasets, load.")
        .idempotent()
        .local_only(),
    );
    if diagnostics {
        fns.extend(diagnostic_functions());
    }
    fns
}

fn diagnostic_functions() -> [Function; 3] {
    [
        Function::new("debug.sleep", |mut args: Args| async move {
            args.__check(SLEEP_PARAMS)?;
            let ms: u64 = args.__take(0, &SLEEP_PARAMS[0])?;
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(Value::from(ms))
        })
        .params(SLEEP_PARAMS, "u64")
        .doc("Sleeps `ms` milliseconds, then returns `ms`."),
        Function::new("debug.fail", |mut args: Args| async move {
            args.__check(FAIL_PARAMS)?;
            let message: String = args.__take(0, &FAIL_PARAMS[0])?;
            Err(RpcError::handler_failed(message))
        })
        .params(FAIL_PARAMS, "!")
        .doc("Fails with `message` (a handler_failed error)."),
        Function::new("debug.panic", |args: Args| async move {
            args.__check(&[])?;
            panic!("debug.panic was called")
        })
        .returns("!")
        .doc("Panics: the node must survive it and answer with an error."),
    ]
}
