/// Says hello.
///
/// Attributes and docs are kept on the function.
#[mpreg::rpc]
#[must_use]
#[inline]
pub fn hello(name: String) -> String {
    format!("hello {name}")
}

mod nested {
    /// Inside a module, private.
    #[mpreg::rpc]
    fn private(x: u8) -> u8 {
        x
    }

    pub(crate) fn call() -> u8 {
        private(1)
    }
}

fn main() {
    let _ = hello("x".into());
    assert_eq!(nested::call(), 1);
}
