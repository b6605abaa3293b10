//! `Context` and `Dataset<T>` parameters, in any position and under any
//! path, are taken from the call, not from the wire.

use mpreg::Context;

struct Model {
    bias: i32,
}

#[mpreg::rpc]
fn first(ctx: Context, x: i32) -> String {
    format!("{x} on {}", ctx.node_name())
}

#[mpreg::rpc]
async fn middle(
    x: i32,
    model: mpreg::Dataset<Model>,
    ctx: mpreg::Context,
    y: Option<i32>,
) -> Result<i32, mpreg::Error> {
    let more: i32 = ctx.call("echo", (x,)).await?;
    Ok(more + model.bias + y.unwrap_or(0))
}

#[mpreg::rpc(blocking)]
fn blocking(model: mpreg::Dataset<Model>) -> i32 {
    model.bias
}

fn main() {
    let _ = (first, middle, blocking, Model { bias: 0 }.bias);
}
