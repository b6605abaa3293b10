//! Code generation: the user's function unchanged, then one `const _: () =
//! { .. };` holding everything else (a type-erased shim, the parameter list,
//! compile-time trait checks and the `inventory` registration).

use proc_macro2::{Span, TokenStream};
use quote::{ToTokens, format_ident, quote, quote_spanned};
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{FnArg, Ident, ItemFn, Pat, ReturnType, Type};

use crate::args::RpcArgs;
use crate::validate;

/// Expands `#[mpreg::rpc(args)] item`. On error the caller still emits
/// `item`, so that the function exists and its callers compile.
pub(crate) fn expand(args: TokenStream, item: TokenStream) -> syn::Result<TokenStream> {
    let args = syn::parse2::<RpcArgs>(args);
    let f = syn::parse2(item).and_then(validate::function);
    match (args, f) {
        (Ok(args), Ok(f)) => {
            validate::signature(&args, &f)?;
            Ok(generate(&args, &f))
        }
        // Check the function anyway, so that every problem shows at once.
        (Err(mut e), Ok(f)) => {
            if let Err(more) = validate::signature(&RpcArgs::default(), &f) {
                e.combine(more);
            }
            Err(e)
        }
        (Err(mut e), Err(more)) => {
            e.combine(more);
            Err(e)
        }
        (Ok(_), Err(e)) => Err(e),
    }
}

/// One argument of the user's function.
struct Arg<'a> {
    /// The name, without `mut`.
    name: String,
    ty: &'a Type,
    /// The local variable the shim decodes it into.
    local: Ident,
    kind: ArgKind<'a>,
}

/// Where an argument's value comes from.
#[derive(Clone, Copy)]
enum ArgKind<'a> {
    /// The request: the `index`th parameter on the wire.
    Wire(usize),
    /// The call's `Context`.
    Context,
    /// The state of the dataset the command named, of this type
    /// (`Dataset<T>`).
    Dataset(&'a Type),
}

impl<'a> ArgKind<'a> {
    /// `Context` and `Dataset<T>` are recognized by name (with any path
    /// before it, such as `mpreg::`); every other type is a wire parameter.
    fn of(ty: &'a Type, wire_index: usize) -> Self {
        if let Type::Path(p) = ungroup(ty)
            && p.qself.is_none()
            && let Some(last) = p.path.segments.last()
        {
            if last.ident == "Context" && last.arguments.is_none() {
                return Self::Context;
            }
            if last.ident == "Dataset"
                && let syn::PathArguments::AngleBracketed(args) = &last.arguments
                && args.args.len() == 1
                && let Some(inner) = first_type_argument(&last.arguments)
            {
                return Self::Dataset(inner);
            }
        }
        Self::Wire(wire_index)
    }
}

fn generate(args: &RpcArgs, f: &ItemFn) -> TokenStream {
    let krate = match &args.krate {
        Some(path) => path.to_token_stream(),
        None => quote!(::mpreg),
    };
    let private = quote!(#krate::__private);
    let ident = &f.sig.ident;
    let name = match &args.name {
        Some(name) => name.value(),
        None => ident.unraw().to_string(),
    };
    let mut wire_count = 0;
    let fn_args: Vec<Arg<'_>> = f
        .sig
        .inputs
        .iter()
        .enumerate()
        .filter_map(|(i, input)| match input {
            FnArg::Typed(arg) => match &*arg.pat {
                Pat::Ident(pat) => {
                    let kind = ArgKind::of(&arg.ty, wire_count);
                    if let ArgKind::Wire(_) = kind {
                        wire_count += 1;
                    }
                    Some(Arg {
                        name: pat.ident.unraw().to_string(),
                        ty: &arg.ty,
                        local: format_ident!("__mpreg_arg{}", i, span = Span::mixed_site()),
                        kind,
                    })
                }
                // Rejected by validation.
                _ => None,
            },
            FnArg::Receiver(_) => None,
        })
        .collect();
    let wire_args = || {
        fn_args
            .iter()
            .filter(|a| matches!(a.kind, ArgKind::Wire(_)))
    };

    let params = wire_args().map(|a| {
        let ty = type_string(&a.ty.to_token_stream());
        let name = &a.name;
        quote!(#private::Param::new(#name, #ty))
    });

    let mut_args = if wire_count == 0 {
        quote!()
    } else {
        quote!(mut)
    };
    let args_var = Ident::new("__mpreg_args", Span::mixed_site());
    let error_var = Ident::new("__mpreg_error", Span::mixed_site());
    let value_var = Ident::new("__mpreg_value", Span::mixed_site());
    let decode = fn_args.iter().map(|a| {
        let Arg { ty, local, .. } = a;
        let take = match a.kind {
            ArgKind::Wire(i) => {
                quote_spanned!(ty.span()=> #args_var.__take::<#ty>(#i, &__MPREG_PARAMS[#i]))
            }
            ArgKind::Context => quote_spanned!(ty.span()=> #args_var.__context()),
            ArgKind::Dataset(inner) => {
                quote_spanned!(ty.span()=> #args_var.__dataset::<#inner>())
            }
        };
        quote! {
            let #local = match #take {
                #private::Result::Ok(#value_var) => #value_var,
                #private::Result::Err(#error_var) => {
                    return #private::Box::pin(async move { #private::Result::Err(#error_var) });
                }
            };
        }
    });

    let locals = fn_args.iter().map(|a| &a.local);
    let mut call = quote!(#ident(#(#locals),*));
    if f.sig.asyncness.is_some() {
        call = quote!(#call.await);
    }
    if args.blocking.is_some() {
        call = quote!(#private::spawn_blocking(move || #call).await?);
    }
    let output = ReturnKind::of(&f.sig.output);
    let encode = match output {
        // `ret_value(f())` would pass a unit value as an argument.
        ReturnKind::Unit => quote!({
            #call;
            #private::ret_value(())
        }),
        ReturnKind::Value(ty) => quote_spanned!(ty.span()=> #private::ret_value::<#ty>(#call)),
        ReturnKind::Result { ok: Some(ok), .. } => {
            quote_spanned!(ok.span()=> #private::ret_result::<#ok, _>(#call))
        }
        ReturnKind::Result { ty, ok: None } => {
            quote_spanned!(ty.span()=> #private::ret_result(#call))
        }
    };
    let returns = match output {
        ReturnKind::Unit => "()".to_owned(),
        ReturnKind::Value(ty) | ReturnKind::Result { ty, .. } => type_string(&ty.to_token_stream()),
    };

    let arg_checks = wire_args().map(|a| {
        let ty = a.ty;
        quote_spanned!(ty.span()=> #private::assert_deserialize::<#ty>();)
    });
    let ret_check = match output {
        ReturnKind::Value(ty) | ReturnKind::Result { ok: Some(ty), .. } => {
            quote_spanned!(ty.span()=> #private::assert_serialize::<#ty>();)
        }
        ReturnKind::Unit | ReturnKind::Result { ok: None, .. } => quote!(),
    };

    let datasets = &args.datasets;
    let doc = doc_string(&f.attrs);
    let idempotent = args.idempotent;

    quote! {
        #f

        const _: () = {
            const __MPREG_PARAMS: &[#private::Param] = &[#(#params),*];

            fn __mpreg_shim(
                #mut_args #args_var: #private::Args,
            ) -> #private::BoxFuture<
                'static,
                #private::Result<#private::serde_json::Value, #private::RpcError>,
            > {
                // No-ops that put a missing `Deserialize`/`Serialize` error on
                // the user's type. Being in this body, they also keep rustc
                // from reporting it a second time for the calls below.
                #(#arg_checks)*
                #ret_check
                if let #private::Result::Err(#error_var) = #args_var.__check(__MPREG_PARAMS) {
                    return #private::Box::pin(async move { #private::Result::Err(#error_var) });
                }
                #(#decode)*
                #private::Box::pin(async move { #encode })
            }

            #private::inventory::submit! {
                #private::Registration::new(#name, __mpreg_shim)
                    .datasets(&[#(#datasets),*])
                    .params(__MPREG_PARAMS)
                    .returns(#returns)
                    .doc(#doc)
                    .idempotent(#idempotent)
            }
        };
    }
}

/// How a function's return value is encoded.
#[derive(Clone, Copy)]
enum ReturnKind<'a> {
    /// No return type (or `()`): the result is `null`.
    Unit,
    /// Any other value, encoded with `Serialize`.
    Value(&'a Type),
    /// A `Result`, recognized by name: `Ok` is encoded, `Err` becomes a
    /// `handler_failed` error. `ok` is the `Ok` type if it is written out.
    Result { ty: &'a Type, ok: Option<&'a Type> },
}

impl<'a> ReturnKind<'a> {
    fn of(output: &'a ReturnType) -> Self {
        let ty = match output {
            ReturnType::Default => return Self::Unit,
            ReturnType::Type(_, ty) => &**ty,
        };
        match ungroup(ty) {
            Type::Tuple(t) if t.elems.is_empty() => Self::Unit,
            Type::Path(p) if p.qself.is_none() => match p.path.segments.last() {
                Some(last) if last.ident == "Result" => Self::Result {
                    ty,
                    ok: first_type_argument(&last.arguments),
                },
                _ => Self::Value(ty),
            },
            _ => Self::Value(ty),
        }
    }
}

fn ungroup(ty: &Type) -> &Type {
    match ty {
        Type::Group(g) => ungroup(&g.elem),
        Type::Paren(p) => ungroup(&p.elem),
        _ => ty,
    }
}

fn first_type_argument(arguments: &syn::PathArguments) -> Option<&Type> {
    match arguments {
        syn::PathArguments::AngleBracketed(args) => args.args.iter().find_map(|arg| match arg {
            syn::GenericArgument::Type(t) => Some(t),
            _ => None,
        }),
        _ => None,
    }
}

/// The `///` doc comment: its lines joined with `\n`, each without the one
/// space that follows `///`, and the whole trimmed.
fn doc_string(attrs: &[syn::Attribute]) -> String {
    let lines: Vec<String> = attrs
        .iter()
        .filter(|attr| attr.path().is_ident("doc"))
        .filter_map(|attr| match &attr.meta {
            syn::Meta::NameValue(syn::MetaNameValue {
                value:
                    syn::Expr::Lit(syn::ExprLit {
                        lit: syn::Lit::Str(s),
                        ..
                    }),
                ..
            }) => Some(s.value()),
            // `#[doc = include_str!(..)]` and the like: cannot be read here.
            _ => None,
        })
        .collect();
    let lines: Vec<&str> = lines
        .iter()
        .flat_map(|doc| doc.split('\n'))
        .map(|line| line.strip_prefix(' ').unwrap_or(line))
        .collect();
    lines.join("\n").trim().to_owned()
}

/// A type as its author would write it: `Option<String>` rather than the
/// token printer's `Option < String >`.
///
/// Drops the spaces after `<`, `&`, `(`, `[` and `::`, and before `<`, `>`,
/// `,`, `;`, `)`, `]` and `::` (but not around `->`), and between a name and
/// its parenthesized arguments.
pub(crate) fn type_string(tokens: &TokenStream) -> String {
    let text = tokens.to_string();
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    for (i, &c) in chars.iter().enumerate() {
        if c == ' ' {
            let before = &chars[..i];
            let after = &chars[i + 1..];
            let drop_after = matches!(before.last(), Some('<' | '&' | '(' | '['))
                || before.ends_with(&[':', ':']);
            let drop_before = matches!(after.first(), Some('<' | '>' | ',' | ';' | ')' | ']'))
                || after.starts_with(&[':', ':'])
                || after.first() == Some(&'(') && calls_with_parens(before);
            if drop_after || drop_before {
                continue;
            }
        }
        out.push(c);
    }
    out
}

/// Whether `before` ends in a name that takes parenthesized arguments
/// (`Fn(i32)`, `fn(u8)`), rather than a keyword followed by a tuple type.
fn calls_with_parens(before: &[char]) -> bool {
    let start = before
        .iter()
        .rposition(|c| !(c.is_alphanumeric() || *c == '_'))
        .map_or(0, |i| i + 1);
    let word: String = before[start..].iter().collect();
    !word.is_empty() && !matches!(word.as_str(), "mut" | "dyn" | "impl" | "as")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_strings_read_like_source() {
        let cases = [
            (quote!(i32), "i32"),
            (quote!(Option<String>), "Option<String>"),
            (quote!(Vec<Option<u8>>), "Vec<Option<u8>>"),
            (
                quote!(::std::collections::HashMap<String, Vec<i64> >),
                "::std::collections::HashMap<String, Vec<i64>>",
            ),
            (quote!((i32, String)), "(i32, String)"),
            (quote!([u8; 4]), "[u8; 4]"),
            (quote!(&'static str), "&'static str"),
            (quote!(<T as Trait>::Assoc), "<T as Trait>::Assoc"),
            (
                quote!(Box<dyn Fn(i32) -> i32 + Send>),
                "Box<dyn Fn(i32) -> i32 + Send>",
            ),
            (quote!(std::io::Result<()>), "std::io::Result<()>"),
            (quote!(&mut (u8, u8)), "&mut (u8, u8)"),
            (quote!(fn(u8) -> (u8, u8)), "fn(u8) -> (u8, u8)"),
        ];
        for (tokens, expected) in cases {
            assert_eq!(type_string(&tokens), expected, "from {tokens}");
        }
    }

    #[test]
    fn type_string_is_idempotent_on_compact_input() {
        // What rustc's own token printer may already produce.
        let compact: TokenStream = "Option<Vec<String>>".parse().expect("tokens");
        assert_eq!(type_string(&compact), "Option<Vec<String>>");
    }

    #[test]
    fn results_are_recognized_by_name() {
        let output = |t: TokenStream| -> ReturnType { syn::parse2(t).expect("a return type") };
        let kind_of = |t| match ReturnKind::of(&output(t)) {
            ReturnKind::Unit => "unit".to_owned(),
            ReturnKind::Value(_) => "value".to_owned(),
            ReturnKind::Result { ok, .. } => {
                format!(
                    "result of {}",
                    ok.map_or("?".to_owned(), |t| type_string(&t.to_token_stream()))
                )
            }
        };
        assert_eq!(kind_of(quote!()), "unit");
        assert_eq!(kind_of(quote!(-> ())), "unit");
        assert_eq!(kind_of(quote!(-> i32)), "value");
        assert_eq!(kind_of(quote!(-> Option<Result<i32, String>>)), "value");
        assert_eq!(kind_of(quote!(-> Result<i32, String>)), "result of i32");
        assert_eq!(
            kind_of(quote!(-> std::io::Result<Vec<u8>>)),
            "result of Vec<u8>"
        );
        assert_eq!(kind_of(quote!(-> anyhow::Result<()>)), "result of ()");
        assert_eq!(kind_of(quote!(-> Result)), "result of ?");
    }

    #[test]
    fn doc_lines_are_joined_and_trimmed() {
        let f: ItemFn = syn::parse2(quote! {
            /// Adds two numbers.
            ///
            ///     indented
            #[doc = include_str!("x")]
            #[inline]
            fn f() {}
        })
        .expect("a function");
        assert_eq!(doc_string(&f.attrs), "Adds two numbers.\n\n    indented");
        let undocumented: ItemFn = syn::parse2(quote!(
            fn f() {}
        ))
        .expect("a function");
        assert_eq!(doc_string(&undocumented.attrs), "");
    }
}
