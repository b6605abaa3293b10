//! Every attribute argument, alone and together.

#[mpreg::rpc(name = "math.add")]
fn add(a: i32, b: i32) -> i32 {
    a + b
}

#[mpreg::rpc(datasets = ["model-a", "model-b"])]
fn predict(input: Vec<f32>) -> f32 {
    input.iter().sum()
}

#[mpreg::rpc(datasets = [])]
fn no_datasets() {}

#[mpreg::rpc(idempotent)]
fn get(key: String) -> String {
    key
}

#[mpreg::rpc(blocking)]
fn crunch(n: u64) -> u64 {
    (0..n).sum()
}

#[mpreg::rpc(name = "all", datasets = ["d"], idempotent, blocking, crate = ::mpreg,)]
fn everything(x: i32) -> Result<i32, String> {
    Ok(x)
}

fn main() {
    assert_eq!(add(1, 2), 3);
    assert_eq!(predict(vec![1.0]), 1.0);
    no_datasets();
    assert_eq!(get("k".into()), "k");
    assert_eq!(crunch(3), 3);
    assert_eq!(everything(1), Ok(1));
}
