//! `#[mpreg::rpc]` end to end, without a network: the functions stay
//! callable, are registered with their metadata, and their registered
//! handlers decode arguments, run the function and encode its result.

use mpreg::__private::{Registration, registrations};
use mpreg::{Args, ErrorCode, RpcError};
use serde_json::{Value, json};

/// Adds two numbers.
///
/// Both are integers.
#[mpreg::rpc(name = "math.add", datasets = ["numbers", "more-numbers"], idempotent)]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

#[mpreg::rpc]
fn greet(name: String, punctuation: Option<String>) -> String {
    format!("hello {name}{}", punctuation.as_deref().unwrap_or(""))
}

#[mpreg::rpc]
fn divide(a: f64, b: f64) -> Result<f64, String> {
    if b == 0.0 {
        Err("division by zero".to_owned())
    } else {
        Ok(a / b)
    }
}

#[mpreg::rpc]
async fn slow_double(mut x: u32) -> u32 {
    tokio::task::yield_now().await;
    x *= 2;
    x
}

#[mpreg::rpc(blocking)]
fn checksum(bytes: Vec<u8>) -> u64 {
    std::thread::sleep(std::time::Duration::from_millis(1));
    bytes.iter().map(|b| u64::from(*b)).sum()
}

#[mpreg::rpc(blocking)]
fn blocking_fails(fail: bool) -> std::io::Result<()> {
    if fail {
        Err(std::io::Error::other("disk on fire"))
    } else {
        Ok(())
    }
}

#[mpreg::rpc]
fn nothing() {}

fn registration(name: &str) -> &'static Registration {
    registrations()
        .find(|r| r.name() == name)
        .unwrap_or_else(|| panic!("`{name}` is not registered"))
}

async fn call(name: &str, positional: Value, named: Value) -> Result<Value, RpcError> {
    let positional = positional.as_array().cloned().unwrap_or_default();
    let named = named.as_object().cloned().unwrap_or_default();
    registration(name).call(Args::new(positional, named)).await
}

fn bad_arguments(result: Result<Value, RpcError>) -> String {
    let error = result.expect_err("bad arguments");
    assert_eq!(error.code, ErrorCode::BadArguments, "{error}");
    error.message
}

#[test]
fn functions_stay_callable() {
    assert_eq!(add(1, 2), 3);
    assert_eq!(greet("x".into(), None), "hello x");
    assert_eq!(divide(1.0, 0.0), Err("division by zero".to_owned()));
    assert_eq!(checksum(vec![1, 2]), 3);
    nothing();
}

#[tokio::test]
async fn async_functions_stay_callable() {
    assert_eq!(slow_double(4).await, 8);
}

#[test]
fn registrations_carry_metadata() {
    let r = registration("math.add");
    assert_eq!(r.dataset_names(), ["numbers", "more-numbers"]);
    assert!(r.is_idempotent());
    assert_eq!(r.doc_text(), "Adds two numbers.\n\nBoth are integers.");
    assert_eq!(r.return_type(), "i64");
    let params: Vec<_> = r.param_list().iter().map(|p| (p.name, p.ty)).collect();
    assert_eq!(params, [("a", "i64"), ("b", "i64")]);
    assert!(
        registrations().all(|r| r.name() != "add"),
        "`name =` replaces the function's name"
    );

    let r = registration("greet");
    assert!(r.dataset_names().is_empty());
    assert!(!r.is_idempotent());
    assert_eq!(r.doc_text(), "");
    assert_eq!(r.param_list()[1].ty, "Option<String>");
    assert_eq!(registration("divide").return_type(), "Result<f64, String>");
    assert_eq!(registration("nothing").return_type(), "()");
    assert_eq!(registration("slow_double").param_list()[0].name, "x");
}

#[tokio::test]
async fn handlers_take_positional_and_named_arguments() {
    assert_eq!(
        call("math.add", json!([1, 2]), json!({})).await,
        Ok(json!(3))
    );
    assert_eq!(
        call("math.add", json!([]), json!({"b": 2, "a": 40})).await,
        Ok(json!(42))
    );
    assert_eq!(
        call("math.add", json!([1]), json!({"b": 2})).await,
        Ok(json!(3))
    );
    assert_eq!(
        call("greet", json!(["ann"]), json!({})).await,
        Ok(json!("hello ann")),
        "a missing `Option` is `None`"
    );
    assert_eq!(
        call("greet", json!(["ann", "!"]), json!({})).await,
        Ok(json!("hello ann!"))
    );
    assert_eq!(call("nothing", json!([]), json!({})).await, Ok(Value::Null));
}

#[tokio::test]
async fn bad_arguments_name_the_parameter_and_its_type() {
    assert_eq!(
        bad_arguments(call("math.add", json!([1]), json!({})).await),
        "missing argument `b` (expected `i64`)"
    );
    let message = bad_arguments(call("math.add", json!([1, "two"]), json!({})).await);
    assert!(
        message.starts_with("argument `b` is not a valid `i64`"),
        "{message}"
    );
    let message = bad_arguments(call("greet", json!([]), json!({"name": 7})).await);
    assert!(
        message.starts_with("argument `name` is not a valid `String`"),
        "{message}"
    );
    let message = bad_arguments(call("math.add", json!([1, 2, 3]), json!({})).await);
    assert_eq!(
        message,
        "expected at most 2 argument(s) (a: i64, b: i64), got 3"
    );
    let message = bad_arguments(call("math.add", json!([1, 2]), json!({"c": 3})).await);
    assert!(message.contains("unknown argument `c`"), "{message}");
    let message = bad_arguments(call("nothing", json!([null]), json!({})).await);
    assert!(
        message.starts_with("expected at most 0 argument(s)"),
        "{message}"
    );
}

#[tokio::test]
async fn result_errors_are_handler_failures() {
    assert_eq!(
        call("divide", json!([1.0, 4.0]), json!({})).await,
        Ok(json!(0.25))
    );
    let error = call("divide", json!([1.0, 0.0]), json!({}))
        .await
        .expect_err("division by zero");
    assert_eq!(error.code, ErrorCode::HandlerFailed);
    assert_eq!(error.message, "division by zero");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_and_blocking_functions_run() {
    assert_eq!(
        call("slow_double", json!([21]), json!({})).await,
        Ok(json!(42))
    );
    assert_eq!(
        call("checksum", json!([[1, 2, 3]]), json!({})).await,
        Ok(json!(6))
    );
    assert_eq!(
        call("blocking_fails", json!([false]), json!({})).await,
        Ok(Value::Null)
    );
    let error = call("blocking_fails", json!([true]), json!({}))
        .await
        .expect_err("fails");
    assert_eq!(error.code, ErrorCode::HandlerFailed);
    assert_eq!(error.message, "disk on fire");
}

#[mpreg::rpc]
fn r#match(r#type: String) -> String {
    r#type
}

#[tokio::test]
async fn raw_identifiers_are_registered_without_prefix() {
    assert_eq!(registration("match").param_list()[0].name, "type");
    assert_eq!(
        call("match", json!([]), json!({"type": "t"})).await,
        Ok(json!("t"))
    );
}
