#[mpreg::rpc(name = "a", idempotent, name = "b")]
fn add(a: i32, b: i32) -> i32 {
    a + b
}

fn main() {
    add(1, 2);
}
