#[mpreg::rpc]
fn greet(name: &str, bytes: Option<&[u8]>) -> usize {
    name.len() + bytes.map_or(0, <[u8]>::len)
}

fn main() {}
