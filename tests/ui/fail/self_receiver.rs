struct Service;

impl Service {
    #[mpreg::rpc]
    fn method(&self, x: i32) -> i32 {
        x
    }
}

fn main() {}
