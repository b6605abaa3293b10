struct Point {
    x: i32,
}

#[mpreg::rpc]
fn origin(x: i32) -> Point {
    Point { x }
}

#[mpreg::rpc]
fn checked_origin(x: i32) -> Result<Point, String> {
    Ok(Point { x })
}

fn main() {}
