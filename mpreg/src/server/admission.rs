//! Opening a connection: TLS, the request head and the WebSocket upgrade,
//! with admission (tokens, peer tickets, the caps on unauthenticated
//! connections). The auth message itself is read in `protocol/auth.rs`.

use crate::budget::{Allowance, Metered, Pending, Refusal};
use crate::config::PRE_AUTH_BYTES;
use crate::http::Peeked;
use crate::metrics::Refused;
use crate::node::RunningNode;
use crate::ws::{self};
use std::net::IpAddr;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode, header};

use super::*;

/// The client tokens an upgrade request presents: `Authorization: Bearer
/// TOKEN` headers, and `token` query parameters.
pub(super) fn request_tokens(request: &Request) -> impl Iterator<Item = &str> {
    let bearer = request
        .headers()
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter_map(|value| value.to_str().ok()?.strip_prefix("Bearer "));
    let query = request
        .uri()
        .query()
        .into_iter()
        .flat_map(|query| query.split('&'))
        .filter_map(|pair| pair.strip_prefix("token="));
    bearer.chain(query)
}

/// Whether an upgrade request presents a valid client token, in a header
/// or in the query (whichever is present: another `Authorization` scheme
/// beside a valid `?token=` is fine).
pub(super) fn token_ok(state: &RunningNode, request: &Request) -> bool {
    state.tokens.required() && request_tokens(request).any(|t| state.tokens.accepts(t))
}

/// TLS, the request head and, for a WebSocket, the upgrade with admission
/// (see [`admit`]). The caller bounds the time it may take.
pub(super) async fn open(
    stream: crate::transport::Conn,
    address: IpAddr,
    state: &RunningNode,
) -> Result<Opened, WsError> {
    // Counted from the start: connections still in TLS or sending their
    // head count too.
    let admitted = state.unauthenticated.admit(address);
    let stream = crate::tls::accept(stream, state.tls.acceptor.as_ref()).await?;
    let stream = match crate::http::peek(stream).await? {
        // Plain HTTP: no longer counted (`admitted` is dropped).
        Peeked::Http(stream, head) => return Ok(Opened::Http(stream, head)),
        Peeked::WebSocket(stream) => stream,
    };
    // The head read so far is not counted against the allowance.
    let allowance = if state.tokens.required() {
        Allowance::new(PRE_AUTH_BYTES.saturating_add(stream.buffered()))
    } else {
        Allowance::unlimited()
    };
    let transport = Metered::new(stream, allowance.clone());
    let mut admission = None;
    let mut reply_limit = state.config.reply_budget();
    // The error type is the WebSocket library's callback signature.
    #[allow(clippy::result_large_err)]
    let check = |request: &Request, response: Response| {
        admission = Some(admit(state, request, address, admitted, &allowance)?);
        let asked = request.headers().get(crate::protocol::REPLY_LIMIT_HEADER);
        reply_limit = crate::protocol::reply_limit(asked.map(|v| v.as_bytes()), reply_limit);
        Ok(response)
    };
    let config = ws::config_for(state.config.max_message_size, state.config.reply_budget());
    let ws =
        tokio_tungstenite::accept_hdr_async_with_config(transport, check, Some(config)).await?;
    let Some((pending, token_in_upgrade)) = admission else {
        // The library calls the callback before any upgrade succeeds.
        return Err(WsError::Io(std::io::Error::other(
            "upgrade without a request",
        )));
    };
    Ok(Opened::WebSocket(Box::new(Upgraded {
        ws,
        pending,
        allowance,
        token_in_upgrade,
        reply_limit,
    })))
}

/// Admission at the upgrade: a client with a valid token is exempt (not
/// counted, not refused, not metered), and so is a peer with a valid
/// ticket, except that it stays metered until its link's proof; any
/// other connection must have found room among the unauthenticated
/// connections (`admitted`, counted when it connected; asked again now in
/// case room was made since), else it is refused with HTTP 503. Returns the
/// connection's count and whether its upgrade carried a valid token.
#[allow(clippy::result_large_err)]
pub(super) fn admit(
    state: &RunningNode,
    request: &Request,
    address: IpAddr,
    admitted: Result<Pending, Refusal>,
    allowance: &Allowance,
) -> Result<(Pending, bool), ErrorResponse> {
    if token_ok(state, request) {
        allowance.lift();
        return Ok((Pending::exempt(), true));
    }
    // A peer's ticket proves the secret only as far as the caps go: its
    // link still proves it before reading more (`cluster::accept` lifts
    // the allowance then).
    if crate::auth::peer_ticket_ok(state, request) {
        return Ok((Pending::exempt(), false));
    }
    match admitted.or_else(|_| state.unauthenticated.admit(address)) {
        Ok(pending) => Ok((pending, false)),
        Err(refusal) => {
            state.metrics.refused(Refused::UnauthenticatedCap);
            tracing::debug!(%address, %refusal, "upgrade refused");
            Err(unavailable(refusal))
        }
    }
}

/// The HTTP 503 answer to an upgrade refused for `refusal`.
pub(super) fn unavailable(refusal: Refusal) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(format!(
        "{refusal}: authenticate in the upgrade request (Authorization: Bearer TOKEN) or try again later\n"
    )));
    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uri: &str, authorization: Option<&str>) -> Request {
        let mut builder = Request::builder().uri(uri);
        if let Some(value) = authorization {
            builder = builder.header("authorization", value);
        }
        builder.body(()).expect("request")
    }

    #[test]
    fn tokens_come_from_the_header_or_the_query() {
        let tokens = |r: &Request| request_tokens(r).map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(tokens(&request("/", Some("Bearer a"))), ["a"]);
        assert_eq!(tokens(&request("/?x=1&token=b", None)), ["b"]);
        assert_eq!(
            tokens(&request("/?token=b", Some("Basic dXNlcjpwdw=="))),
            ["b"],
            "another scheme does not hide the query token"
        );
        assert_eq!(tokens(&request("/?token=b", Some("Bearer a"))), ["a", "b"]);
        assert!(tokens(&request("/", Some("Basic dXNlcjpwdw=="))).is_empty());
    }

    #[test]
    fn the_refusal_is_a_503_with_a_reason() {
        let response = unavailable(Refusal::PerAddress(2));
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = response.body().as_deref().unwrap_or_default();
        assert!(body.contains("2 connections from this address"), "{body}");
    }
}
