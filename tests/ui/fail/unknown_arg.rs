#[mpreg::rpc(nmae = "add")]
fn add(a: i32, b: i32) -> i32 {
    a + b
}

fn main() {
    // Still defined: no "cannot find function" error here.
    add(1, 2);
}
