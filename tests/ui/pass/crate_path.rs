//! `crate = path` when mpreg is reachable under another name.

mod runtime {
    pub use ::mpreg as renamed;
}

#[mpreg::rpc(crate = ::mpreg)]
fn absolute(x: i32) -> i32 {
    x
}

#[mpreg::rpc(crate = crate::runtime::renamed)]
fn relative(x: i32) -> i32 {
    x
}

fn main() {
    assert_eq!(absolute(1) + relative(1), 2);
}
