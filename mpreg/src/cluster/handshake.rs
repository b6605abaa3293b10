//! The opening of a peer link, as two pure state machines (no sockets):
//! [`Dialer`] and [`Acceptor`] take the other side's messages and say what
//! to send, until a verdict: linked (with the other side's hello) or
//! refused (with a reason).
//!
//! With a cluster secret, neither side says who it is (name, address,
//! generation, catalog) before the other has proven the secret:
//!
//! ```text
//! dialer                                    acceptor
//!   peer-open  {protocol, nonce: Nd}   ->
//!                                      <-   peer-proof {nonce: Na, proof: Pa}
//!   (checks Pa)
//!   peer-proof {proof: Pd}             ->   (checks Pd)
//!   peer-hello {..}                    ->
//!                                      <-   peer-hello {..}
//! ```
//!
//! where `Pa` and `Pd` are HMAC-SHA256 with the secret over the side's label
//! and both nonces ([`Secret::proof`]). The acceptor speaks only after the
//! dialer's challenge and proves first, so a dialer that cannot prove the
//! secret learns nothing but a nonce and a proof it cannot use; the dialer
//! sends its hello only after checking the acceptor's proof.
//!
//! Without a secret: `peer-open {protocol}` and the dialer's hello at once,
//! then the acceptor's hello.

use crate::auth::{self, Secret, Side};
use crate::protocol::peer::{Hello, Open, PEER_PROTOCOL, PeerMessage, Proof};

/// Why a link was not opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The other side speaks another peer protocol version.
    Protocol { theirs: u32 },
    /// This node (the acceptor) requires client tokens and has no cluster
    /// secret: peers cannot be checked, so none may link (else tokens
    /// could be bypassed by posing as a peer).
    TokensWithoutSecret,
    /// The dialer sent no challenge while this node requires the secret.
    NoChallenge,
    /// The dialer sent a challenge while this node has no secret to answer
    /// it with.
    UnexpectedChallenge,
    /// A nonce or proof that is not what it should be (hex of 32 bytes).
    Malformed(&'static str),
    /// The other side's proof does not check: it does not know our secret.
    BadProof,
    /// The other side sent `got` where `expected` was due.
    OutOfOrder {
        expected: &'static str,
        got: &'static str,
    },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Protocol { theirs } => write!(
                f,
                "peer protocol {theirs} is not spoken here (this node speaks {PEER_PROTOCOL})"
            ),
            Refusal::TokensWithoutSecret => f.write_str(
                "this node requires client tokens and has no cluster secret to check peers with",
            ),
            Refusal::NoChallenge => {
                f.write_str("no challenge: this node requires the cluster secret")
            }
            Refusal::UnexpectedChallenge => {
                f.write_str("a challenge, but this node has no cluster secret")
            }
            Refusal::Malformed(what) => write!(f, "malformed {what}"),
            Refusal::BadProof => f.write_str("it did not prove the cluster secret"),
            Refusal::OutOfOrder { expected, got } => {
                write!(f, "expected {expected}, got {got}")
            }
        }
    }
}

impl std::error::Error for Refusal {}

/// What one side does after a message.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Send these (maybe none), then wait for the next message.
    Send(Vec<PeerMessage>),
    /// Send these (maybe none); the link is open with the peer that said
    /// `theirs`.
    Linked {
        send: Vec<PeerMessage>,
        theirs: Box<Hello>,
    },
    /// Send nothing more: the link must close, for this reason.
    Refused(Refusal),
}

/// The role of a message, for refusals.
fn role(message: &PeerMessage) -> &'static str {
    match message {
        PeerMessage::PeerOpen(_) => "peer-open",
        PeerMessage::PeerProof(_) => "peer-proof",
        PeerMessage::PeerHello(_) => "peer-hello",
        PeerMessage::Catalog(_) => "catalog",
        PeerMessage::Run { .. } => "run",
        PeerMessage::Done { .. } => "done",
        PeerMessage::Cancel { .. } => "cancel",
        PeerMessage::Idle => "idle",
        PeerMessage::IdleOk => "idle-ok",
        PeerMessage::IdleNo => "idle-no",
    }
}

fn out_of_order(expected: &'static str, got: &PeerMessage) -> Outcome {
    Outcome::Refused(Refusal::OutOfOrder {
        expected,
        got: role(got),
    })
}

/// A nonce in hex: exactly 32 bytes.
fn nonce_of(hex: &str) -> Option<[u8; 32]> {
    auth::unhex(hex).and_then(|n| n.try_into().ok())
}

/// The other side's hello, checked for the protocol version.
fn their_hello(hello: Hello, send: Vec<PeerMessage>) -> Outcome {
    if hello.protocol != PEER_PROTOCOL {
        return Outcome::Refused(Refusal::Protocol {
            theirs: hello.protocol,
        });
    }
    Outcome::Linked {
        send,
        theirs: Box::new(hello),
    }
}

/// Either side of an opening, as its driver sees it.
pub(crate) trait Handshake {
    /// Takes the other side's next message.
    fn receive(&mut self, message: PeerMessage) -> Outcome;
    /// Whether the other side has proven the secret (or there is none):
    /// only then may it send large messages, or be registered.
    fn proven(&self) -> bool;
}

impl Handshake for Dialer {
    fn receive(&mut self, message: PeerMessage) -> Outcome {
        Dialer::receive(self, message)
    }
    fn proven(&self) -> bool {
        Dialer::proven(self)
    }
}

impl Handshake for Acceptor {
    fn receive(&mut self, message: PeerMessage) -> Outcome {
        Acceptor::receive(self, message)
    }
    fn proven(&self) -> bool {
        Acceptor::proven(self)
    }
}

#[derive(Debug)]
enum DialerState {
    /// Waiting for the acceptor's proof (with a secret).
    Proof { secret: Secret, nonce: [u8; 32] },
    /// Waiting for the acceptor's hello.
    Hello,
    /// A verdict was given.
    Done,
}

/// The dialing side of a link's opening.
#[derive(Debug)]
pub(crate) struct Dialer {
    state: DialerState,
    ours: Option<Hello>,
}

impl Dialer {
    /// A dialer that will say `ours` once the acceptor proved itself (at
    /// once without a secret), with `nonce` (fresh random bytes) as its
    /// challenge. Returns the messages that open the link.
    pub(crate) fn new(
        secret: Option<Secret>,
        ours: Hello,
        nonce: [u8; 32],
    ) -> (Self, Vec<PeerMessage>) {
        match secret {
            Some(secret) => {
                let open = PeerMessage::PeerOpen(Open {
                    protocol: PEER_PROTOCOL,
                    nonce: Some(auth::hex(&nonce)),
                });
                let dialer = Self {
                    state: DialerState::Proof { secret, nonce },
                    ours: Some(ours),
                };
                (dialer, vec![open])
            }
            None => {
                let open = PeerMessage::PeerOpen(Open {
                    protocol: PEER_PROTOCOL,
                    nonce: None,
                });
                let dialer = Self {
                    state: DialerState::Hello,
                    ours: None,
                };
                (dialer, vec![open, PeerMessage::PeerHello(ours)])
            }
        }
    }

    /// Whether the acceptor has proven the secret (or there is none), so
    /// that it may send large messages.
    pub(crate) fn proven(&self) -> bool {
        !matches!(self.state, DialerState::Proof { .. })
    }

    /// Takes the acceptor's next message.
    pub(crate) fn receive(&mut self, message: PeerMessage) -> Outcome {
        match std::mem::replace(&mut self.state, DialerState::Done) {
            DialerState::Proof { secret, nonce } => {
                let PeerMessage::PeerProof(proof) = message else {
                    return out_of_order("peer-proof", &message);
                };
                let Some(theirs) = proof.nonce.as_deref().and_then(nonce_of) else {
                    return Outcome::Refused(Refusal::Malformed("nonce"));
                };
                let Some(their_proof) = auth::unhex(&proof.proof) else {
                    return Outcome::Refused(Refusal::Malformed("proof"));
                };
                if !secret.verify(Side::Acceptor, &nonce, &theirs, &their_proof) {
                    return Outcome::Refused(Refusal::BadProof);
                }
                let mine = secret.proof(Side::Dialer, &nonce, &theirs);
                let mut send = vec![PeerMessage::PeerProof(Proof {
                    nonce: None,
                    proof: auth::hex(&mine),
                })];
                send.extend(self.ours.take().map(PeerMessage::PeerHello));
                self.state = DialerState::Hello;
                Outcome::Send(send)
            }
            DialerState::Hello => match message {
                PeerMessage::PeerHello(hello) => their_hello(hello, Vec::new()),
                other => out_of_order("peer-hello", &other),
            },
            DialerState::Done => out_of_order("nothing", &message),
        }
    }
}

#[derive(Debug)]
enum AcceptorState {
    /// Waiting for the dialer's `peer-open`.
    Open,
    /// Waiting for the dialer's proof (with a secret).
    Proof {
        secret: Secret,
        theirs: [u8; 32],
        nonce: [u8; 32],
    },
    /// Waiting for the dialer's hello.
    Hello,
    /// A verdict was given.
    Done,
}

/// The accepting side of a link's opening.
#[derive(Debug)]
pub(crate) struct Acceptor {
    secret: Option<Secret>,
    tokens_required: bool,
    state: AcceptorState,
    ours: Option<Hello>,
    nonce: [u8; 32],
}

impl Acceptor {
    /// An acceptor that will say `ours` once the dialer proved itself (at
    /// once without a secret), with `nonce` (fresh random bytes) as its
    /// challenge. `tokens_required`: this node requires client tokens (then
    /// peers are refused without a secret).
    pub(crate) fn new(
        secret: Option<Secret>,
        tokens_required: bool,
        ours: Hello,
        nonce: [u8; 32],
    ) -> Self {
        Self {
            secret,
            tokens_required,
            state: AcceptorState::Open,
            ours: Some(ours),
            nonce,
        }
    }

    /// Whether the dialer has proven the secret (or there is none): only
    /// then may it send large messages, and be registered.
    pub(crate) fn proven(&self) -> bool {
        matches!(self.state, AcceptorState::Hello)
    }

    /// Takes the dialer's next message (the first is its `peer-open`).
    pub(crate) fn receive(&mut self, message: PeerMessage) -> Outcome {
        match std::mem::replace(&mut self.state, AcceptorState::Done) {
            AcceptorState::Open => {
                let PeerMessage::PeerOpen(open) = message else {
                    return out_of_order("peer-open", &message);
                };
                if open.protocol != PEER_PROTOCOL {
                    return Outcome::Refused(Refusal::Protocol {
                        theirs: open.protocol,
                    });
                }
                match (&self.secret, open.nonce) {
                    (None, _) if self.tokens_required => {
                        Outcome::Refused(Refusal::TokensWithoutSecret)
                    }
                    (None, Some(_)) => Outcome::Refused(Refusal::UnexpectedChallenge),
                    (None, None) => {
                        self.state = AcceptorState::Hello;
                        Outcome::Send(Vec::new())
                    }
                    (Some(_), None) => Outcome::Refused(Refusal::NoChallenge),
                    (Some(secret), Some(theirs)) => {
                        let Some(theirs) = nonce_of(&theirs) else {
                            return Outcome::Refused(Refusal::Malformed("nonce"));
                        };
                        let proof = secret.proof(Side::Acceptor, &theirs, &self.nonce);
                        let answer = PeerMessage::PeerProof(Proof {
                            nonce: Some(auth::hex(&self.nonce)),
                            proof: auth::hex(&proof),
                        });
                        self.state = AcceptorState::Proof {
                            secret: secret.clone(),
                            theirs,
                            nonce: self.nonce,
                        };
                        Outcome::Send(vec![answer])
                    }
                }
            }
            AcceptorState::Proof {
                secret,
                theirs,
                nonce,
            } => {
                let PeerMessage::PeerProof(proof) = message else {
                    return out_of_order("peer-proof", &message);
                };
                let valid = auth::unhex(&proof.proof)
                    .is_some_and(|p| secret.verify(Side::Dialer, &theirs, &nonce, &p));
                if !valid {
                    return Outcome::Refused(Refusal::BadProof);
                }
                self.state = AcceptorState::Hello;
                Outcome::Send(Vec::new())
            }
            AcceptorState::Hello => match message {
                PeerMessage::PeerHello(hello) => {
                    let send = self.ours.take().map(PeerMessage::PeerHello);
                    their_hello(hello, send.into_iter().collect())
                }
                other => out_of_order("peer-hello", &other),
            },
            AcceptorState::Done => out_of_order("nothing", &message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::peer::{Ability, Catalog};

    fn hello(name: &str, port: u16) -> Hello {
        Hello {
            protocol: PEER_PROTOCOL,
            name: name.into(),
            addr: Some(([127, 0, 0, 1], port).into()),
            generation: 42,
            catalog: Catalog {
                version: 1,
                functions: vec![Ability {
                    fun: format!("{name}.secret_fn"),
                    datasets: [format!("{name}-data")].into(),
                    idempotent: false,
                    params: Vec::new(),
                    returns: String::new(),
                    doc: format!("{name} documentation"),
                }],
            },
        }
    }

    /// What one side received, as text on the wire.
    #[derive(Default)]
    struct Wire {
        to_acceptor: Vec<String>,
        to_dialer: Vec<String>,
    }

    fn text(m: &PeerMessage) -> String {
        m.encode()
            .into_text()
            .map(|t| t.to_string())
            .unwrap_or_default()
    }

    /// Runs both sides against each other until a verdict on each (or one
    /// refuses). Returns each side's verdict and what crossed the wire.
    fn run(
        dialer_secret: Option<&str>,
        acceptor_secret: Option<&str>,
        tokens_required: bool,
    ) -> (Result<Hello, Refusal>, Result<Hello, Refusal>, Wire) {
        let (mut dialer, opening) = Dialer::new(
            dialer_secret.map(Secret::new),
            hello("dialer-node", 1000),
            [1; 32],
        );
        let mut acceptor = Acceptor::new(
            acceptor_secret.map(Secret::new),
            tokens_required,
            hello("acceptor-node", 2000),
            [2; 32],
        );
        let mut wire = Wire::default();
        let mut to_acceptor: std::collections::VecDeque<PeerMessage> = opening.into();
        let mut to_dialer = std::collections::VecDeque::new();
        let mut dialer_verdict = None;
        let mut acceptor_verdict = None;
        // Bounded: a handshake is a handful of messages.
        for _ in 0..16 {
            if let Some(m) = to_acceptor.pop_front() {
                wire.to_acceptor.push(text(&m));
                match acceptor.receive(m) {
                    Outcome::Send(send) => to_dialer.extend(send),
                    Outcome::Linked { send, theirs } => {
                        to_dialer.extend(send);
                        acceptor_verdict = Some(Ok(*theirs));
                    }
                    Outcome::Refused(r) => {
                        acceptor_verdict = Some(Err(r));
                        to_acceptor.clear();
                    }
                }
            } else if let Some(m) = to_dialer.pop_front() {
                wire.to_dialer.push(text(&m));
                match dialer.receive(m) {
                    Outcome::Send(send) => to_acceptor.extend(send),
                    Outcome::Linked { send, theirs } => {
                        to_acceptor.extend(send);
                        dialer_verdict = Some(Ok(*theirs));
                    }
                    Outcome::Refused(r) => {
                        dialer_verdict = Some(Err(r));
                        to_dialer.clear();
                    }
                }
            } else {
                break;
            }
            if matches!(acceptor_verdict, Some(Err(_))) || matches!(dialer_verdict, Some(Err(_))) {
                break;
            }
        }
        // A side without a verdict was left waiting: the other closed.
        let waiting = Refusal::OutOfOrder {
            expected: "more",
            got: "close",
        };
        (
            dialer_verdict.unwrap_or(Err(waiting.clone())),
            acceptor_verdict.unwrap_or(Err(waiting)),
            wire,
        )
    }

    fn reveals_nothing(messages: &[String], who: &str) {
        for m in messages {
            for secret in [
                who,
                "secret_fn",
                "documentation",
                "-data",
                "127.0.0.1",
                "generation",
                "s3cret",
            ] {
                assert!(!m.contains(secret), "{m} reveals {secret}");
            }
            assert!(m.len() < 300, "pre-proof messages are small: {m}");
        }
    }

    #[test]
    fn same_secret_links_both_sides() {
        let (dialer, acceptor, wire) = run(Some("s3cret"), Some("s3cret"), true);
        assert_eq!(dialer.expect("dialer linked").name, "acceptor-node");
        assert_eq!(acceptor.expect("acceptor linked").name, "dialer-node");
        // open, proof, hello; proof, hello.
        assert_eq!(wire.to_acceptor.len(), 3);
        assert_eq!(wire.to_dialer.len(), 2);
        // Before the proofs, nothing about either node crossed.
        reveals_nothing(&wire.to_acceptor[..2], "dialer-node");
        reveals_nothing(&wire.to_dialer[..1], "acceptor-node");
        assert!(wire.to_acceptor[0].starts_with(r#"{"role":"peer-open""#));
        assert!(wire.to_dialer[0].starts_with(r#"{"role":"peer-proof""#));
        assert!(wire.to_acceptor[1].starts_with(r#"{"role":"peer-proof""#));
    }

    #[test]
    fn wrong_secret_is_refused_by_the_dialer() {
        // The acceptor answers with a proof under another secret: the
        // dialer refuses it and never says who it is.
        let (dialer, acceptor, wire) = run(Some("s3cret"), Some("other"), false);
        assert_eq!(dialer.expect_err("refused"), Refusal::BadProof);
        assert!(acceptor.is_err());
        assert_eq!(wire.to_acceptor.len(), 1, "only the opening");
        reveals_nothing(&wire.to_acceptor, "dialer-node");
        reveals_nothing(&wire.to_dialer, "acceptor-node");
    }

    #[test]
    fn wrong_secret_is_refused_by_the_acceptor() {
        // A dialer that accepts any proof from the acceptor (as a hostile
        // one would) still cannot prove itself.
        let mut acceptor = Acceptor::new(
            Some(Secret::new("s3cret")),
            false,
            hello("acceptor-node", 2000),
            [2; 32],
        );
        let open = PeerMessage::PeerOpen(Open {
            protocol: PEER_PROTOCOL,
            nonce: Some(auth::hex(&[1; 32])),
        });
        let Outcome::Send(answer) = acceptor.receive(open) else {
            panic!("the acceptor answers a challenge");
        };
        reveals_nothing(
            &answer.iter().map(text).collect::<Vec<_>>(),
            "acceptor-node",
        );
        let Some(PeerMessage::PeerProof(Proof {
            nonce: Some(theirs),
            ..
        })) = answer.first()
        else {
            panic!("a proof with a nonce: {answer:?}");
        };
        let theirs = nonce_of(theirs).expect("nonce");
        let forged = Secret::new("other").proof(Side::Dialer, &[1; 32], &theirs);
        let proof = PeerMessage::PeerProof(Proof {
            nonce: None,
            proof: auth::hex(&forged),
        });
        assert!(matches!(
            acceptor.receive(proof),
            Outcome::Refused(Refusal::BadProof)
        ));
        assert!(!acceptor.proven());
        // Nothing more is taken.
        assert!(matches!(
            acceptor.receive(PeerMessage::PeerHello(hello("x", 3))),
            Outcome::Refused(_)
        ));
    }

    #[test]
    fn dialer_that_skips_its_proof_is_refused_and_learns_nothing() {
        let mut acceptor = Acceptor::new(
            Some(Secret::new("s3cret")),
            true,
            hello("acceptor-node", 2000),
            [2; 32],
        );
        let open = PeerMessage::PeerOpen(Open {
            protocol: PEER_PROTOCOL,
            nonce: Some(auth::hex(&[1; 32])),
        });
        let Outcome::Send(answer) = acceptor.receive(open) else {
            panic!("the acceptor answers a challenge");
        };
        reveals_nothing(
            &answer.iter().map(text).collect::<Vec<_>>(),
            "acceptor-node",
        );
        // Straight to the hello, without a proof.
        let outcome = acceptor.receive(PeerMessage::PeerHello(hello("intruder", 3000)));
        assert!(
            matches!(
                outcome,
                Outcome::Refused(Refusal::OutOfOrder {
                    expected: "peer-proof",
                    got: "peer-hello"
                })
            ),
            "{outcome:?}"
        );
        assert!(!acceptor.proven());

        // Or with no challenge at all: refused at once, with nothing sent.
        let (dialer, acceptor, wire) = run(None, Some("s3cret"), false);
        assert_eq!(acceptor.expect_err("refused"), Refusal::NoChallenge);
        assert!(dialer.is_err());
        assert!(wire.to_dialer.is_empty(), "the acceptor said nothing");

        // A malformed challenge or proof.
        let mut acceptor = Acceptor::new(
            Some(Secret::new("s3cret")),
            false,
            hello("acceptor-node", 2000),
            [2; 32],
        );
        let short = PeerMessage::PeerOpen(Open {
            protocol: PEER_PROTOCOL,
            nonce: Some("abcd".into()),
        });
        assert!(matches!(
            acceptor.receive(short),
            Outcome::Refused(Refusal::Malformed("nonce"))
        ));
    }

    #[test]
    fn without_a_secret_hellos_are_exchanged() {
        let (dialer, acceptor, wire) = run(None, None, false);
        assert_eq!(dialer.expect("dialer linked").name, "acceptor-node");
        assert_eq!(acceptor.expect("acceptor linked").name, "dialer-node");
        assert_eq!(wire.to_acceptor.len(), 2, "open and hello");
        assert_eq!(wire.to_dialer.len(), 1, "hello");
    }

    #[test]
    fn mismatched_setups_are_refused() {
        // The dialer has a secret, the acceptor none: the acceptor cannot
        // prove anything and says nothing.
        let (dialer, acceptor, wire) = run(Some("s3cret"), None, false);
        assert_eq!(acceptor.expect_err("refused"), Refusal::UnexpectedChallenge);
        assert!(dialer.is_err());
        assert!(wire.to_dialer.is_empty());
        // Tokens without a secret: no peer links at all.
        let (_, acceptor, wire) = run(None, None, true);
        assert_eq!(acceptor.expect_err("refused"), Refusal::TokensWithoutSecret);
        assert!(wire.to_dialer.is_empty());
        // Another protocol version.
        let mut acceptor = Acceptor::new(None, false, hello("a", 1), [2; 32]);
        let open = PeerMessage::PeerOpen(Open {
            protocol: 1,
            nonce: None,
        });
        assert_eq!(
            match acceptor.receive(open) {
                Outcome::Refused(r) => r,
                other => panic!("{other:?}"),
            },
            Refusal::Protocol { theirs: 1 }
        );
    }
}
