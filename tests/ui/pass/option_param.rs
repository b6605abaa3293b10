use std::collections::HashMap;

#[mpreg::rpc]
fn lookup(
    table: HashMap<String, Vec<i64>>,
    key: Option<String>,
    mut limit: Option<usize>,
) -> Option<i64> {
    limit.get_or_insert(1);
    table.get(key.as_deref()?)?.first().copied()
}

fn main() {
    assert_eq!(lookup(HashMap::new(), None, None), None);
}
