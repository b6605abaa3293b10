#[mpreg::rpc]
const unsafe extern "C" fn answer(x: i32) -> i32 {
    x
}

fn main() {}
