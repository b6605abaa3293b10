//! What `#[mpreg::rpc]` accepts: a free function, sync or `async`, whose
//! arguments are plain names with owned, concrete types. Every problem is
//! reported at once, each on the tokens at fault.

use quote::ToTokens;
use syn::{FnArg, Item, ItemFn, Pat, Type};

use crate::args::RpcArgs;

/// Collects errors so that all of them are reported together.
#[derive(Default)]
struct Errors(Option<syn::Error>);

impl Errors {
    fn add(&mut self, tokens: impl ToTokens, message: impl std::fmt::Display) {
        let error = syn::Error::new_spanned(tokens, message);
        match &mut self.0 {
            Some(errors) => errors.combine(error),
            None => self.0 = Some(error),
        }
    }

    fn finish(self) -> syn::Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}

/// The function under the attribute, or an error on an item of another kind.
pub(crate) fn function(item: Item) -> syn::Result<ItemFn> {
    const MESSAGE: &str = "#[mpreg::rpc] can only be used on functions";
    let head = match item {
        Item::Fn(f) => return Ok(f),
        Item::Struct(i) => kw_and_name(&i.struct_token, &i.ident),
        Item::Enum(i) => kw_and_name(&i.enum_token, &i.ident),
        Item::Union(i) => kw_and_name(&i.union_token, &i.ident),
        Item::Trait(i) => kw_and_name(&i.trait_token, &i.ident),
        Item::Mod(i) => kw_and_name(&i.mod_token, &i.ident),
        Item::Const(i) => kw_and_name(&i.const_token, &i.ident),
        Item::Static(i) => kw_and_name(&i.static_token, &i.ident),
        Item::Type(i) => kw_and_name(&i.type_token, &i.ident),
        Item::Impl(i) => {
            return Err(syn::Error::new_spanned(
                kw_and_name(&i.impl_token, &i.self_ty),
                format!("{MESSAGE}; put it on each free function, not on an `impl` block"),
            ));
        }
        other => other.to_token_stream(),
    };
    Err(syn::Error::new_spanned(head, MESSAGE))
}

/// The tokens to underline for an item: its keyword and its name.
fn kw_and_name(keyword: &impl ToTokens, name: &impl ToTokens) -> proc_macro2::TokenStream {
    quote::quote!(#keyword #name)
}

/// Checks the function's signature and the arguments that depend on it.
pub(crate) fn signature(args: &RpcArgs, f: &ItemFn) -> syn::Result<()> {
    let sig = &f.sig;
    let mut errors = Errors::default();
    if let Some(constness) = &sig.constness {
        errors.add(constness, "#[mpreg::rpc] cannot be used on a `const fn`");
    }
    if let Some(unsafety) = &sig.unsafety {
        errors.add(unsafety, "#[mpreg::rpc] cannot be used on an `unsafe fn`");
    }
    if let Some(abi) = &sig.abi {
        errors.add(abi, "#[mpreg::rpc] cannot be used on an `extern` function");
    }
    if !sig.generics.params.is_empty() {
        errors.add(
            &sig.generics,
            "#[mpreg::rpc] cannot be used on a generic function: \
             every argument type must be known to decode it",
        );
    }
    if let Some(where_clause) = &sig.generics.where_clause {
        errors.add(
            where_clause,
            "#[mpreg::rpc] cannot be used on a function with a `where` clause",
        );
    }
    if let Some(variadic) = &sig.variadic {
        errors.add(
            variadic,
            "#[mpreg::rpc] cannot be used on a variadic function",
        );
    }
    if let (Some(blocking), Some(_)) = (&args.blocking, &sig.asyncness) {
        errors.add(
            blocking,
            "`blocking` can only be used on a sync function: \
             remove `async`, or remove `blocking` if the body awaits instead of blocking",
        );
    }
    for input in &sig.inputs {
        match input {
            FnArg::Receiver(receiver) => errors.add(
                receiver,
                "#[mpreg::rpc] cannot be used on a method: \
                 remove `self` and make it a free function",
            ),
            FnArg::Typed(arg) => {
                if !is_plain_name(&arg.pat) {
                    errors.add(
                        &arg.pat,
                        "#[mpreg::rpc] arguments must be plain names (`x: T`), \
                         because they can be passed by name; patterns are not supported",
                    );
                }
                check_owned(&arg.ty, &mut errors);
            }
        }
    }
    if let syn::ReturnType::Type(_, ty) = &sig.output
        && let Some(impl_trait) = find_impl_trait(ty)
    {
        errors.add(
            impl_trait,
            "#[mpreg::rpc] functions cannot return `impl Trait`: use a concrete type",
        );
    }
    errors.finish()
}

/// `x` or `mut x`, and nothing else (`ref x`, `x @ ..`, tuples, structs, `_`).
fn is_plain_name(pat: &Pat) -> bool {
    matches!(pat, Pat::Ident(p) if p.by_ref.is_none() && p.subpat.is_none())
}

/// Reports references and `impl Trait` anywhere inside an argument type.
fn check_owned(ty: &Type, errors: &mut Errors) {
    match ty {
        Type::Reference(r) => errors.add(
            r,
            format!(
                "#[mpreg::rpc] arguments cannot be references, because they are decoded \
                 from JSON: use an owned type such as {}",
                owned_suggestion(&r.elem)
            ),
        ),
        Type::ImplTrait(i) => errors.add(
            i,
            "#[mpreg::rpc] arguments cannot be `impl Trait`: use a concrete type",
        ),
        _ => for_each_inner_type(ty, |inner| check_owned(inner, errors)),
    }
}

/// `String` for `&str`, `Vec<T>` for `&[T]`, else `T` for `&T`.
fn owned_suggestion(elem: &Type) -> String {
    let borrowed = crate::expand::type_string(&elem.to_token_stream());
    let owned = match elem {
        Type::Path(p) if p.qself.is_none() && p.path.is_ident("str") => "String".to_owned(),
        Type::Slice(s) => format!(
            "Vec<{}>",
            crate::expand::type_string(&s.elem.to_token_stream())
        ),
        _ => borrowed.clone(),
    };
    format!("`{owned}` instead of `&{borrowed}`")
}

/// The first `impl Trait` inside `ty`, if any.
fn find_impl_trait(ty: &Type) -> Option<&Type> {
    if let Type::ImplTrait(_) = ty {
        return Some(ty);
    }
    let mut found = None;
    for_each_inner_type(ty, |inner| {
        if found.is_none() {
            found = find_impl_trait(inner);
        }
    });
    found
}

/// Calls `f` on the types directly inside `ty` (generic arguments, elements).
fn for_each_inner_type<'a>(ty: &'a Type, mut f: impl FnMut(&'a Type)) {
    match ty {
        Type::Array(a) => f(&a.elem),
        Type::Slice(s) => f(&s.elem),
        Type::Group(g) => f(&g.elem),
        Type::Paren(p) => f(&p.elem),
        Type::Ptr(p) => f(&p.elem),
        Type::Reference(r) => f(&r.elem),
        Type::Tuple(t) => t.elems.iter().for_each(f),
        Type::Path(p) => {
            if let Some(qself) = &p.qself {
                f(&qself.ty);
            }
            for segment in &p.path.segments {
                if let syn::PathArguments::AngleBracketed(args) = &segment.arguments {
                    for arg in &args.args {
                        if let syn::GenericArgument::Type(t) = arg {
                            f(t);
                        }
                    }
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(f: proc_macro2::TokenStream) -> Vec<String> {
        let f: ItemFn = syn::parse2(f).expect("a function");
        match signature(&RpcArgs::default(), &f) {
            Ok(()) => Vec::new(),
            Err(e) => e.into_iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn accepts_plain_functions() {
        assert!(
            check(quote::quote!(
                fn f(mut a: i32, b: Option<Vec<String>>) -> u8 {
                    0
                }
            ))
            .is_empty()
        );
        assert!(
            check(quote::quote!(
                async fn f() {}
            ))
            .is_empty()
        );
    }

    #[test]
    fn reports_every_problem() {
        let errors = check(quote::quote!(
            unsafe fn f<T>((a, b): (i32, i32), c: &str, d: Vec<&[u8]>, e: impl Clone) {}
        ));
        assert_eq!(errors.len(), 6, "{errors:#?}");
        assert!(
            errors[4].ends_with("`Vec<u8>` instead of `&[u8]`"),
            "{}",
            errors[4]
        );
    }

    #[test]
    fn rejects_variadics() {
        let errors = check(quote::quote!(
            unsafe extern "C" fn f(x: i32, ...) {}
        ));
        assert_eq!(errors.len(), 3, "{errors:#?}");
        assert!(errors[2].contains("variadic"), "{}", errors[2]);
    }

    #[test]
    fn suggests_owned_types() {
        let suggest =
            |t: proc_macro2::TokenStream| owned_suggestion(&syn::parse2(t).expect("a type"));
        assert_eq!(suggest(quote::quote!(str)), "`String` instead of `&str`");
        assert_eq!(suggest(quote::quote!([u8])), "`Vec<u8>` instead of `&[u8]`");
        assert_eq!(
            suggest(quote::quote!(Option<i32>)),
            "`Option<i32>` instead of `&Option<i32>`"
        );
    }
}
