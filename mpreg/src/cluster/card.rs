//! A node's card: what routing needs of it, gossiped to every member
//! (membership pulls it from its owner, see `membership/cards.rs`).
//!
//! The card holds the node's name and, per function, its name, datasets
//! and whether it is idempotent: no descriptions (parameters, docs), which
//! `mpreg.functions` fetches on demand. It is encoded with postcard, each
//! dataset name once (functions name them by index), so a node with ten
//! functions on one dataset has a card of a few hundred bytes.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::protocol::peer::Ability;

/// What a node offers, as gossiped.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Card {
    /// The node's name.
    pub(crate) name: String,
    /// Every dataset named by a function below.
    pub(crate) datasets: Vec<String>,
    /// The functions, by name.
    pub(crate) functions: Vec<CardFunction>,
}

/// One function on a card.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CardFunction {
    pub(crate) name: String,
    /// Indexes into the card's `datasets`.
    pub(crate) datasets: Vec<u32>,
    pub(crate) idempotent: bool,
}

impl Card {
    /// The card of a node named `name` offering `abilities`.
    pub(crate) fn new(name: &str, abilities: &[Ability]) -> Self {
        let datasets: Vec<String> = abilities
            .iter()
            .flat_map(|a| a.datasets.iter().cloned())
            .collect::<BTreeSet<String>>()
            .into_iter()
            .collect();
        let index = |d: &String| {
            datasets
                .binary_search(d)
                .ok()
                .and_then(|i| u32::try_from(i).ok())
        };
        let functions = abilities
            .iter()
            .map(|a| CardFunction {
                name: a.fun.clone(),
                datasets: a.datasets.iter().filter_map(index).collect(),
                idempotent: a.idempotent,
            })
            .collect();
        Self {
            name: name.to_owned(),
            datasets,
            functions,
        }
    }

    /// The card as gossiped.
    pub(crate) fn encode(&self) -> Arc<[u8]> {
        // Strings, integers and booleans: encoding cannot fail.
        postcard::to_allocvec(self).unwrap_or_default().into()
    }

    /// A card as gossiped; `None` when malformed.
    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        postcard::from_bytes(bytes).ok()
    }

    /// The abilities on the card (without descriptions). A dataset index
    /// out of range is left out. (The cluster reads cards into interned
    /// offers instead.)
    #[cfg(test)]
    pub(crate) fn abilities(&self) -> Vec<Ability> {
        self.functions
            .iter()
            .map(|f| Ability {
                fun: f.name.clone(),
                datasets: f
                    .datasets
                    .iter()
                    .filter_map(|&i| self.datasets.get(i as usize).cloned())
                    .collect(),
                idempotent: f.idempotent,
                params: Vec::new(),
                returns: String::new(),
                doc: String::new(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ability(fun: &str, datasets: &[&str], idempotent: bool) -> Ability {
        Ability {
            fun: fun.into(),
            datasets: datasets.iter().map(|d| (*d).to_owned()).collect(),
            idempotent,
            params: vec![crate::protocol::peer::ParamDesc {
                name: "x".into(),
                ty: "f64".into(),
            }],
            returns: "f64".into(),
            doc: "not on the card".into(),
        }
    }

    #[test]
    fn a_card_round_trips_without_descriptions() {
        let abilities = vec![
            ability("echo", &["model-a"], true),
            ability("predict", &["model-a", "model-b"], false),
            ability("plain", &[], false),
        ];
        let card = Card::new("n1", &abilities);
        assert_eq!(card.datasets, ["model-a", "model-b"], "each dataset once");
        let bytes = card.encode();
        assert!(bytes.len() < 60, "compact: {} bytes", bytes.len());
        let back = Card::decode(&bytes).expect("decodes");
        assert_eq!(back, card);
        let read = back.abilities();
        assert_eq!(read.len(), 3);
        for (a, b) in read.iter().zip(&abilities) {
            assert_eq!(
                (&a.fun, &a.datasets, a.idempotent),
                (&b.fun, &b.datasets, b.idempotent)
            );
            assert!(a.params.is_empty() && a.doc.is_empty());
        }
    }

    #[test]
    fn malformed_cards_are_refused_and_bad_indexes_dropped() {
        assert_eq!(Card::decode(&[0xff, 0xff, 0xff]), None);
        let card = Card {
            name: "n".into(),
            datasets: vec!["a".into()],
            functions: vec![CardFunction {
                name: "f".into(),
                datasets: vec![0, 7],
                idempotent: false,
            }],
        };
        let abilities = card.abilities();
        assert_eq!(abilities[0].datasets, BTreeSet::from(["a".to_owned()]));
    }
}
