#[mpreg::rpc]
fn ping() {}

#[mpreg::rpc]
fn explicit_unit(_flag: bool) -> () {}

#[mpreg::rpc]
async fn async_unit() {}

fn main() {
    ping();
    explicit_unit(true);
    let _ = async_unit();
}
