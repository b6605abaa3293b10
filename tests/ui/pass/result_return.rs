#[derive(Debug)]
struct MyError;

impl std::fmt::Display for MyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("my error")
    }
}

#[mpreg::rpc]
fn checked(x: u8) -> Result<u8, MyError> {
    x.checked_add(1).ok_or(MyError)
}

#[mpreg::rpc]
fn read(path: String) -> std::io::Result<Vec<u8>> {
    std::fs::read(path)
}

mod aliased {
    type Result<T> = std::result::Result<T, String>;

    #[mpreg::rpc]
    pub(crate) async fn aliased() -> Result<()> {
        Ok(())
    }
}

fn main() {
    assert!(checked(255).is_err());
    let _ = read(String::new());
    let _ = aliased::aliased();
}
