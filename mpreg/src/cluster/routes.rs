//! The route table and the choice among its places: pure, no IO.
//!
//! The table maps a function name to every place it runs (this node, a
//! member by its card, a leaf by its link), with the datasets it has there.
//! Names and dataset sets are interned ([`Interner`]): a thousand members
//! offering `echo` on their datasets share one `echo` string, and routes
//! share their dataset sets with the members' cards, so a rebuild copies
//! pointers, not strings.
//!
//! The policy is "power of two choices" on load (calls in flight from this
//! node to a peer, or running on this node), preferring this node when it is
//! not busier than the choice: two candidates are sampled at random and the
//! less loaded wins. It avoids herding on one node without any global load
//! information, and costs O(1).

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::Arc;

/// A set of dataset names, sorted, shared by every route and card that has
/// it (as are the names: a set of one name is one small allocation, where a
/// `BTreeSet` was a 300-byte node, a third of a megabyte per node at 1,000
/// members).
pub(crate) type Datasets = Arc<[Arc<str>]>;

/// Whether `set` has dataset `name`.
pub(crate) fn has(set: &Datasets, name: &str) -> bool {
    set.binary_search_by(|d| (**d).cmp(name)).is_ok()
}

/// One function of a peer, interned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Offer {
    pub(crate) fun: Arc<str>,
    /// The function's number (see [`Interner::name`]).
    pub(crate) fun_id: u32,
    pub(crate) datasets: Datasets,
    pub(crate) idempotent: bool,
}

/// Shares equal names and dataset sets, and numbers function names, so
/// building the route table hashes no string.
#[derive(Debug, Default)]
pub(crate) struct Interner {
    /// Function names and their numbers (kept: a cluster has few distinct
    /// function names, and the numbers must stay stable).
    names: HashMap<Arc<str>, u32>,
    sets: HashSet<Datasets>,
    /// Each dataset name in `sets` (shared with them), with how many of
    /// them name it.
    dataset_names: HashMap<Arc<str>, usize>,
}

impl Interner {
    /// The shared copy of function name `name`, and its number.
    pub(crate) fn name(&mut self, name: &str) -> (Arc<str>, u32) {
        if let Some((shared, &id)) = self.names.get_key_value(name) {
            return (shared.clone(), id);
        }
        let shared: Arc<str> = Arc::from(name);
        let id = u32::try_from(self.names.len()).unwrap_or(u32::MAX);
        self.names.insert(shared.clone(), id);
        (shared, id)
    }

    /// Every function name and its number.
    pub(crate) fn names(&self) -> HashMap<Arc<str>, u32> {
        self.names.clone()
    }

    /// The shared copy of the set of `names` (sorted, without repeats, as
    /// a `BTreeSet` gives them).
    pub(crate) fn datasets<'a>(&mut self, names: impl IntoIterator<Item = &'a str>) -> Datasets {
        let names: Vec<Arc<str>> = names
            .into_iter()
            .map(|name| match self.dataset_names.get_key_value(name) {
                Some((shared, _)) => shared.clone(),
                None => {
                    let shared: Arc<str> = Arc::from(name);
                    // Counted below: a set with a name never seen is new.
                    self.dataset_names.insert(shared.clone(), 0);
                    shared
                }
            })
            .collect();
        if let Some(shared) = self.sets.get(&names[..]) {
            return shared.clone();
        }
        for name in &names {
            if let Some(count) = self.dataset_names.get_mut(name) {
                *count += 1;
            }
        }
        let shared: Datasets = names.into();
        self.sets.insert(shared.clone());
        shared
    }

    /// Forgets the dataset sets nobody else holds any more.
    pub(crate) fn prune(&mut self) {
        let names = &mut self.dataset_names;
        self.sets.retain(|s| {
            let held = Arc::strong_count(s) > 1;
            if !held {
                for name in s.iter() {
                    if let Some(count) = names.get_mut(name) {
                        *count -= 1;
                        if *count == 0 {
                            names.remove(name);
                        }
                    }
                }
            }
            held
        });
    }

    /// Distinct dataset names in the sets held: once pruned after a route
    /// table is built and published, the datasets that table has.
    pub(crate) fn dataset_names(&self) -> usize {
        self.dataset_names.len()
    }

    /// Names and sets held.
    #[cfg(test)]
    fn len(&self) -> (usize, usize) {
        (self.names.len(), self.sets.len())
    }
}

/// One place a function can run.
#[derive(Debug, Clone)]
pub(crate) struct Route<T> {
    pub(crate) target: T,
    pub(crate) datasets: Datasets,
    pub(crate) idempotent: bool,
    /// Served here through a leaf's link: counts as "here" for jobs that
    /// peers send to this node.
    pub(crate) via_leaf: bool,
}

/// Function name → every place it runs. Rebuilt whenever a card, a leaf
/// or the node's own functions change; readers share it as a snapshot.
#[derive(Debug)]
pub(crate) struct Routes<T> {
    /// Function names and their numbers.
    names: HashMap<Arc<str>, u32>,
    /// Places, by function number.
    places: Vec<Vec<Route<T>>>,
    /// Distinct datasets any place has: told by the interner once the
    /// table is published (counting them at every rebuild hashed every
    /// dataset name, a large part of a 1,000-node cluster's CPU while it
    /// formed), else counted when first asked for.
    datasets: std::sync::OnceLock<usize>,
}

/// Distinct datasets in `places` (each interned set looked into once).
fn count_datasets<T>(places: &[Vec<Route<T>>]) -> usize {
    let mut sets: HashSet<*const [Arc<str>]> = HashSet::new();
    let mut names: HashSet<&str> = HashSet::new();
    for route in places.iter().flatten() {
        if sets.insert(Arc::as_ptr(&route.datasets)) {
            names.extend(route.datasets.iter().map(|d| &**d));
        }
    }
    names.len()
}

impl<T> Default for Routes<T> {
    fn default() -> Self {
        Self {
            names: HashMap::new(),
            places: Vec::new(),
            datasets: std::sync::OnceLock::new(),
        }
    }
}

impl<T: Copy> Routes<T> {
    /// The table of `places`: each a target, whether it is served through
    /// a leaf, and what it offers; `names` numbers the functions (the
    /// interner's). Copies a pointer per offer and hashes nothing.
    pub(crate) fn build<'a>(
        names: HashMap<Arc<str>, u32>,
        places: impl Iterator<Item = (T, bool, &'a [Offer])>,
    ) -> Self {
        let mut by_id: Vec<Vec<Route<T>>> = Vec::new();
        by_id.resize_with(names.len(), Vec::new);
        for (target, via_leaf, offers) in places {
            for offer in offers {
                if let Some(list) = by_id.get_mut(offer.fun_id as usize) {
                    list.push(Route {
                        target,
                        datasets: offer.datasets.clone(),
                        idempotent: offer.idempotent,
                        via_leaf,
                    });
                }
            }
        }
        Self {
            names,
            places: by_id,
            datasets: std::sync::OnceLock::new(),
        }
    }

    /// Distinct datasets any place has (counted once per table, unless
    /// told by [`Routes::know_datasets`] first).
    pub(crate) fn datasets(&self) -> usize {
        *self.datasets.get_or_init(|| count_datasets(&self.places))
    }

    /// Records the table's count of distinct datasets, known from the
    /// interner ([`Interner::dataset_names`]), so that asking for it costs
    /// nothing.
    pub(crate) fn know_datasets(&self, count: usize) {
        let _ = self.datasets.set(count);
    }

    /// Every place `fun` runs, if any.
    pub(crate) fn get(&self, fun: &str) -> Option<&[Route<T>]> {
        let id = *self.names.get(fun)?;
        self.places
            .get(id as usize)
            .map(Vec::as_slice)
            .filter(|places| !places.is_empty())
    }
}

/// One place that can run a command, with its current load.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Candidate<T> {
    pub(crate) target: T,
    pub(crate) load: usize,
    /// This node itself (preferred on ties: no network hop).
    pub(crate) local: bool,
}

/// Picks a candidate's index; `None` only when there is none. `random(n)`
/// returns a number below `n`.
pub(crate) fn choose<T>(
    candidates: &[Candidate<T>],
    mut random: impl FnMut(usize) -> usize,
) -> Option<usize> {
    let n = candidates.len();
    if n <= 1 {
        return (n == 1).then_some(0);
    }
    let a = random(n);
    let b = (a + 1 + random(n - 1)) % n; // distinct from `a`
    let mut pick = if candidates[b].load < candidates[a].load {
        b
    } else {
        a
    };
    if let Some(local) = candidates.iter().position(|c| c.local)
        && candidates[local].load <= candidates[pick].load
    {
        pick = local;
    }
    Some(pick)
}

thread_local! {
    /// xorshift64* state, seeded per thread from the std hasher's random keys.
    static RNG: Cell<u64> = Cell::new(RandomState::new().hash_one(0u64) | 1);
}

/// A fast, non-cryptographic random number below `n` (`n > 0`).
pub(crate) fn random_below(n: usize) -> usize {
    RNG.with(|state| {
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1) as u64) as usize
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interned_names_and_sets_are_shared_and_pruned() {
        let mut interner = Interner::default();
        let set = || ["model-a"];
        let ((a, id), (b, id_b)) = (interner.name("echo"), interner.name("echo"));
        assert!(Arc::ptr_eq(&a, &b) && id == id_b);
        assert_eq!(interner.name("echos").1, id + 1);
        let (x, y) = (interner.datasets(set()), interner.datasets(set()));
        assert!(Arc::ptr_eq(&x, &y));
        let offers = [Offer {
            fun: a.clone(),
            fun_id: id,
            datasets: x.clone(),
            idempotent: true,
        }];
        let routes = Routes::build(
            interner.names(),
            [(1u8, false, &offers[..]), (2, false, &offers[..])].into_iter(),
        );
        assert_eq!(routes.get("echo").map(<[_]>::len), Some(2));
        assert!(routes.get("echos").is_none(), "numbered, offered nowhere");
        assert!(routes.get("nope").is_none());
        assert_eq!(routes.datasets(), 1);
        drop((x, y, offers, routes));
        interner.prune();
        assert_eq!(interner.len(), (2, 0), "names stay, sets go");
    }

    fn cands(loads: &[usize], local: Option<usize>) -> Vec<Candidate<usize>> {
        loads
            .iter()
            .enumerate()
            .map(|(i, &load)| Candidate {
                target: i,
                load,
                local: local == Some(i),
            })
            .collect()
    }

    #[test]
    fn none_and_one() {
        assert_eq!(choose::<usize>(&[], random_below), None);
        assert_eq!(choose(&cands(&[7], None), random_below), Some(0));
    }

    #[test]
    fn most_loaded_of_distinct_loads_is_never_chosen() {
        let c = cands(&[5, 1, 9], None);
        for _ in 0..1000 {
            assert_ne!(choose(&c, random_below), Some(2));
        }
    }

    #[test]
    fn local_wins_unless_busier_than_the_sampled_choice() {
        let idle_local = cands(&[3, 0, 3], Some(1));
        for _ in 0..100 {
            assert_eq!(choose(&idle_local, random_below), Some(1));
        }
        let tied_local = cands(&[2, 2], Some(0));
        for _ in 0..100 {
            assert_eq!(choose(&tied_local, random_below), Some(0));
        }
        // Local busier than both remotes: a remote is chosen.
        let busy_local = cands(&[1, 9, 1], Some(1));
        for _ in 0..100 {
            assert_ne!(choose(&busy_local, random_below), Some(1));
        }
    }

    #[test]
    fn equal_loads_spread_over_every_candidate() {
        let c = cands(&[0, 0, 0, 0], None);
        let mut seen = [0usize; 4];
        for _ in 0..4000 {
            seen[choose(&c, random_below).unwrap_or(0)] += 1;
        }
        // Each should get about 1000; any reasonable spread passes.
        assert!(seen.iter().all(|&k| k > 500), "{seen:?}");
    }

    #[test]
    fn scripted_samples_pick_the_lighter() {
        let c = cands(&[4, 2, 8], None);
        // Samples 0 and then (0 + 1 + 1) % 3 = 2: loads 4 and 8 → 0.
        let mut script = [0, 1].into_iter();
        assert_eq!(choose(&c, |_| script.next().unwrap_or(0)), Some(0));
        // Samples 2 and (2 + 1 + 1) % 3 = 1: loads 8 and 2 → 1.
        let mut script = [2, 1].into_iter();
        assert_eq!(choose(&c, |_| script.next().unwrap_or(0)), Some(1));
    }

    #[test]
    fn random_below_stays_in_range() {
        for n in 1..50 {
            for _ in 0..50 {
                assert!(random_below(n) < n);
            }
        }
    }
}
