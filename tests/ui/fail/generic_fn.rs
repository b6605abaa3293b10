#[mpreg::rpc]
fn identity<T: serde::Serialize>(x: T) -> T {
    x
}

#[mpreg::rpc]
fn bounded(x: Vec<u8>) -> usize
where
    Vec<u8>: Clone,
{
    x.len()
}

fn main() {}
