//! The generated code uses absolute paths only, so it works without the
//! prelude and with mpreg under another name.
#![no_implicit_prelude]

extern crate mpreg as rpc_runtime;
extern crate std;

/// A documented function.
#[rpc_runtime::rpc(crate = ::rpc_runtime, datasets = ["d"], idempotent)]
fn sync_fn(a: ::std::string::String, b: ::std::option::Option<i32>) -> ::std::vec::Vec<i32> {
    let _ = a;
    ::std::vec![b.unwrap_or(0)]
}

#[rpc_runtime::rpc(crate = ::rpc_runtime)]
async fn async_fn(x: u8) -> ::std::result::Result<u8, ::std::string::String> {
    ::std::result::Result::Ok(x)
}

#[rpc_runtime::rpc(crate = ::rpc_runtime, blocking)]
fn blocking_fn() {}

fn main() {
    let _ = sync_fn(::std::string::String::new(), ::std::option::Option::None);
    let _ = async_fn(1);
    blocking_fn();
}
