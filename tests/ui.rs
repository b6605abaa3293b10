//! What `#[mpreg::rpc]` accepts, and the errors it gives for what it does not.
//!
//! The expected compiler output is in `tests/ui/fail/*.stderr`; regenerate it
//! with `TRYBUILD=overwrite cargo test --test ui` and review the diff. It
//! depends on the compiler version.

#[test]
fn ui() {
    // trybuild resolves paths from the package directory (`mpreg/`).
    let t = trybuild::TestCases::new();
    t.pass("../tests/ui/pass/*.rs");
    t.compile_fail("../tests/ui/fail/*.rs");
}
