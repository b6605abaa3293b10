//! The attribute's arguments: `#[mpreg::rpc(name = "..", datasets = [..],
//! idempotent, blocking, crate = path)]`.

use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::{LitStr, Path, Token};

mod kw {
    syn::custom_keyword!(name);
    syn::custom_keyword!(datasets);
    syn::custom_keyword!(idempotent);
    syn::custom_keyword!(blocking);
}

/// The parsed arguments of one `#[mpreg::rpc(..)]`. Every key is optional and
/// may be given at most once.
#[derive(Default)]
pub(crate) struct RpcArgs {
    /// `name = ".."`: the registered name (default: the function's name).
    pub(crate) name: Option<LitStr>,
    /// `datasets = [..]`: the datasets the function always has.
    pub(crate) datasets: Vec<LitStr>,
    /// `idempotent`: the function is safe to run again after a failure.
    pub(crate) idempotent: bool,
    /// `blocking`: run the (sync) body on the blocking thread pool. Kept as
    /// the keyword so that a misuse can be reported on it.
    pub(crate) blocking: Option<kw::blocking>,
    /// `crate = path`: where the runtime crate is (default: `::mpreg`).
    pub(crate) krate: Option<Path>,
}

impl Parse for RpcArgs {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let mut args = Self::default();
        let mut seen_datasets = false;
        let mut seen_idempotent = false;
        while !input.is_empty() {
            let lookahead = input.lookahead1();
            if lookahead.peek(kw::name) {
                let key: kw::name = input.parse()?;
                once(args.name.is_some(), key, "name")?;
                input.parse::<Token![=]>()?;
                let name: LitStr = input.parse()?;
                if name.value().is_empty() {
                    return Err(syn::Error::new_spanned(&name, "`name` must not be empty"));
                }
                args.name = Some(name);
            } else if lookahead.peek(kw::datasets) {
                let key: kw::datasets = input.parse()?;
                once(seen_datasets, key, "datasets")?;
                seen_datasets = true;
                input.parse::<Token![=]>()?;
                let content;
                syn::bracketed!(content in input);
                let list = Punctuated::<LitStr, Token![,]>::parse_terminated(&content)?;
                for dataset in list {
                    if dataset.value().is_empty() {
                        return Err(syn::Error::new_spanned(
                            &dataset,
                            "dataset names must not be empty",
                        ));
                    }
                    args.datasets.push(dataset);
                }
            } else if lookahead.peek(kw::idempotent) {
                let key: kw::idempotent = input.parse()?;
                once(seen_idempotent, key, "idempotent")?;
                seen_idempotent = true;
                args.idempotent = true;
            } else if lookahead.peek(kw::blocking) {
                let key: kw::blocking = input.parse()?;
                once(args.blocking.is_some(), key, "blocking")?;
                args.blocking = Some(key);
            } else if lookahead.peek(Token![crate]) {
                let key: Token![crate] = input.parse()?;
                once(args.krate.is_some(), key, "crate")?;
                input.parse::<Token![=]>()?;
                args.krate = Some(input.call(Path::parse_mod_style)?);
            } else {
                return Err(lookahead.error());
            }
            if !input.is_empty() {
                input.parse::<Token![,]>()?;
            }
        }
        Ok(args)
    }
}

/// An error at `key` if it was already given.
fn once(seen: bool, key: impl quote::ToTokens, name: &str) -> syn::Result<()> {
    if seen {
        Err(syn::Error::new_spanned(
            key,
            format!("`{name}` is specified more than once"),
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(tokens: proc_macro2::TokenStream) -> syn::Result<RpcArgs> {
        syn::parse2(tokens)
    }

    #[test]
    fn empty_is_all_defaults() {
        let args = parse(quote::quote!()).expect("parses");
        assert!(args.name.is_none() && args.datasets.is_empty() && !args.idempotent);
        assert!(args.blocking.is_none() && args.krate.is_none());
    }

    #[test]
    fn every_key() {
        let args = parse(quote::quote!(
            name = "math.add",
            datasets = ["a", "b",],
            idempotent,
            blocking,
            crate = ::my::mpreg,
        ))
        .expect("parses");
        assert_eq!(args.name.map(|n| n.value()).as_deref(), Some("math.add"));
        let datasets: Vec<String> = args.datasets.iter().map(LitStr::value).collect();
        assert_eq!(datasets, ["a", "b"]);
        assert!(args.idempotent && args.blocking.is_some());
        assert!(args.krate.is_some());
    }

    #[test]
    fn errors() {
        let err = |t| parse(t).err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(
            err(quote::quote!(idempotent, idempotent)),
            "`idempotent` is specified more than once"
        );
        assert_eq!(
            err(quote::quote!(nme = "x")),
            "expected one of: `name`, `datasets`, `idempotent`, `blocking`, `crate`"
        );
        assert_eq!(err(quote::quote!(name = "")), "`name` must not be empty");
        assert_eq!(
            err(quote::quote!(datasets = [1])),
            "expected string literal"
        );
    }
}
