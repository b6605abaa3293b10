//! The `mpreg` command.
fn main() {}
