#[mpreg::rpc(blocking)]
async fn fetch(key: String) -> String {
    key
}

fn main() {}
