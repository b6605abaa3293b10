struct Model;

#[mpreg::rpc]
fn predict(model: mpreg::Dataset<&Model>) -> i32 {
    let _ = model;
    0
}

fn main() {}
