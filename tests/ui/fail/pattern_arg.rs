#[mpreg::rpc]
fn sum((a, b): (i32, i32), _: u8) -> i32 {
    a + b
}

fn main() {}
