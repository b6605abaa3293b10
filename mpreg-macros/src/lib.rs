//! Implementation detail of mpreg: the `#[mpreg::rpc]` attribute.
use proc_macro::TokenStream;

/// See `mpreg::rpc`.
#[proc_macro_attribute]
pub fn rpc(_args: TokenStream, item: TokenStream) -> TokenStream {
    item
}
