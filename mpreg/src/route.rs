//! Choosing where a command runs among the places that can run it.
//!
//! The policy is "power of two choices" on load (calls in flight from this
//! node to a peer, or running on this node), preferring this node when it is
//! not busier than the choice: two candidates are sampled at random and the
//! less loaded wins. It avoids herding on one node without any global load
//! information, and costs O(1).

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

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
