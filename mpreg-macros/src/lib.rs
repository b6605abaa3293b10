//! Implementation detail of mpreg: the `#[mpreg::rpc]` attribute.
//!
//! Use it through `mpreg`, which documents it: `#[mpreg::rpc]`.

#![deny(missing_docs)]

mod args;
mod expand;
mod validate;

use proc_macro::TokenStream;

/// Registers a function to be served by mpreg nodes. See `mpreg::rpc`.
#[proc_macro_attribute]
pub fn rpc(args: TokenStream, item: TokenStream) -> TokenStream {
    let item = proc_macro2::TokenStream::from(item);
    match expand::expand(args.into(), item.clone()) {
        Ok(tokens) => tokens.into(),
        Err(e) => {
            // Keep the item as written, so that the only errors are ours and
            // not "cannot find function" wherever it is used.
            let mut tokens = e.to_compile_error();
            tokens.extend(item);
            tokens.into()
        }
    }
}
