#[mpreg::rpc]
async fn fetch(key: String) -> Vec<String> {
    vec![key]
}

fn main() {
    let _future = fetch(String::new());
}
