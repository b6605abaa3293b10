struct Point {
    x: i32,
}

#[mpreg::rpc]
fn norm(p: Point, scale: i32) -> i32 {
    p.x * scale
}

fn main() {}
