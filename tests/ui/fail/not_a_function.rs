#[mpreg::rpc]
struct Handler {
    x: i32,
}

fn main() {}
