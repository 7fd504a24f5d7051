//! A set of seqs kept as inclusive ranges: the one such set, used for the ranges an
//! ack carries ([`crate::wire::Ack`]), the agent's acked-but-not-deleted records, and
//! the seqs a backend store has taken per outbox epoch.
//!
//! An outbox sends its seqs nearly in order and acks come in runs, so a set of any size
//! is one range, or a few while a window fills. Input from outside can still ask for
//! many ranges; [`RangeSet::insert_capped`] refuses to open one past a cap.

use std::collections::BTreeMap;

/// Sorted, disjoint, non-adjacent inclusive ranges of `u64`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RangeSet {
    /// lo -> hi, disjoint and not adjacent: the fewest ranges for the set.
    ranges: BTreeMap<u64, u64>,
}

/// What [`RangeSet::insert_capped`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    New,
    Duplicate,
    /// It would have opened a range past the cap; nothing changed.
    Refused,
}

impl RangeSet {
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// How many ranges (not seqs) the set holds.
    pub fn range_count(&self) -> usize {
        self.ranges.len()
    }

    /// The last seq of the range holding `seq`, if any.
    pub fn range_end(&self, seq: u64) -> Option<u64> {
        let (_, &hi) = self.ranges.range(..=seq).next_back()?;
        (hi >= seq).then_some(hi)
    }

    pub fn contains(&self, seq: u64) -> bool {
        self.range_end(seq).is_some()
    }

    /// Adds `seq`; whether it was new.
    pub fn insert(&mut self, seq: u64) -> bool {
        self.insert_capped(seq, usize::MAX) == Insert::New
    }

    /// Adds `seq`, unless it is there or it would make more than `cap` ranges. A seq
    /// that extends or joins ranges is always taken.
    pub fn insert_capped(&mut self, seq: u64, cap: usize) -> Insert {
        let left = self.ranges.range(..=seq).next_back().map(|(&l, &h)| (l, h));
        if let Some((_, h)) = left {
            if h >= seq {
                return Insert::Duplicate;
            }
        }
        let joins_left = left.filter(|&(_, h)| h.checked_add(1) == Some(seq));
        let joins_right = seq
            .checked_add(1)
            .and_then(|n| self.ranges.get(&n).map(|&h| (n, h)));
        match (joins_left, joins_right) {
            (Some((l, _)), Some((r, rh))) => {
                self.ranges.remove(&r);
                self.ranges.insert(l, rh);
            }
            (Some((l, _)), None) => {
                self.ranges.insert(l, seq);
            }
            (None, Some((r, rh))) => {
                self.ranges.remove(&r);
                self.ranges.insert(seq, rh);
            }
            (None, None) if self.ranges.len() >= cap => return Insert::Refused,
            (None, None) => {
                self.ranges.insert(seq, seq);
            }
        }
        Insert::New
    }

    /// Adds every seq from `lo` to `hi` (nothing if `hi < lo`).
    pub fn insert_range(&mut self, mut lo: u64, mut hi: u64) {
        if hi < lo {
            return;
        }
        // Merge with a range that overlaps or touches on the left.
        if let Some((&l, &h)) = self.ranges.range(..=lo).next_back() {
            if h.saturating_add(1) >= lo {
                lo = l;
                hi = hi.max(h);
                self.ranges.remove(&l);
            }
        }
        // And with every range starting inside or just after.
        while let Some((&l, &h)) = self.ranges.range(lo..).next() {
            if l > hi.saturating_add(1) {
                break;
            }
            hi = hi.max(h);
            self.ranges.remove(&l);
        }
        self.ranges.insert(lo, hi);
    }

    /// The first range.
    pub fn first(&self) -> Option<(u64, u64)> {
        self.ranges.iter().next().map(|(&l, &h)| (l, h))
    }

    /// Removes every seq up to and including `upto` from the first range.
    pub fn trim_first(&mut self, upto: u64) {
        if let Some((lo, hi)) = self.first() {
            self.ranges.remove(&lo);
            if upto < hi {
                self.ranges.insert(upto + 1, hi);
            }
        }
    }

    /// The ranges, lowest first.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(&l, &h)| (l, h))
    }

    /// A set of exactly these ranges, if they are sorted, disjoint and not adjacent
    /// (as [`RangeSet::iter`] gives them); `None` otherwise.
    pub fn from_sorted(ranges: impl IntoIterator<Item = (u64, u64)>) -> Option<RangeSet> {
        let mut set = RangeSet::default();
        let mut last: Option<u64> = None;
        for (lo, hi) in ranges {
            let apart = last.is_none_or(|prev| prev.checked_add(1).is_some_and(|n| n < lo));
            if hi < lo || !apart {
                return None;
            }
            set.ranges.insert(lo, hi);
            last = Some(hi);
        }
        Some(set)
    }
}

impl FromIterator<u64> for RangeSet {
    fn from_iter<I: IntoIterator<Item = u64>>(seqs: I) -> RangeSet {
        let mut set = RangeSet::default();
        for s in seqs {
            set.insert(s);
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn merges_and_trims() {
        let mut s = RangeSet::default();
        s.insert_range(5, 9);
        s.insert(11);
        assert_eq!(s.range_count(), 2);
        s.insert(10);
        assert_eq!(s.first(), Some((5, 11)), "adjacent runs merge");
        s.insert_range(1, 4);
        s.insert_range(20, 30);
        s.insert_range(12, 19);
        assert_eq!(s.first(), Some((1, 30)));
        assert_eq!(s.range_count(), 1);
        assert!(s.contains(1) && s.contains(30) && !s.contains(0) && !s.contains(31));
        assert_eq!(s.range_end(7), Some(30));
        s.trim_first(10);
        assert_eq!(s.first(), Some((11, 30)));
        s.insert_range(40, 40);
        s.trim_first(30);
        assert_eq!(s.first(), Some((40, 40)));
        s.trim_first(40);
        assert!(s.is_empty());
        s.insert_range(3, 2);
        assert!(s.is_empty(), "an empty range adds nothing");
        s.insert_range(u64::MAX - 1, u64::MAX);
        s.insert(u64::MAX - 2);
        assert_eq!(s.first(), Some((u64::MAX - 2, u64::MAX)));
    }

    /// Random inserts against a `BTreeSet`, near 0 and near `u64::MAX`: the same
    /// members, the fewest ranges, and a round trip through `iter`/`from_sorted`.
    #[test]
    fn matches_a_plain_set() {
        let mut rng_state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            rng_state ^= rng_state << 13;
            rng_state ^= rng_state >> 7;
            rng_state ^= rng_state << 17;
            rng_state
        };
        for round in 0..200 {
            let mut set = RangeSet::default();
            let mut want = BTreeSet::new();
            let span = 1 + round % 60;
            for _ in 0..300 {
                let seq = next() % span + if round % 3 == 0 { u64::MAX - 70 } else { 0 };
                assert_eq!(set.insert(seq), want.insert(seq), "insert {seq}");
                let back = RangeSet::from_sorted(set.iter()).expect("round trip");
                assert_eq!(back, set);
            }
            let lo = *want.first().unwrap();
            let hi = *want.last().unwrap();
            for seq in lo.saturating_sub(2)..=hi.saturating_add(2).max(hi) {
                assert_eq!(set.contains(seq), want.contains(&seq), "contains {seq}");
            }
            let gaps = want
                .iter()
                .zip(want.iter().skip(1))
                .filter(|(a, b)| **b != **a + 1)
                .count();
            assert_eq!(set.range_count(), gaps + 1);
            assert_eq!(want.iter().copied().collect::<RangeSet>(), set);
        }
        assert!(
            RangeSet::from_sorted([(5, 9), (10, 12)]).is_none(),
            "adjacent ranges"
        );
        assert!(RangeSet::from_sorted([(9, 5)]).is_none(), "reversed range");
        assert!(
            RangeSet::from_sorted([(9, 12), (3, 5)]).is_none(),
            "unsorted"
        );
        assert!(
            RangeSet::from_sorted([(0, u64::MAX), (5, 5)]).is_none(),
            "past the end"
        );
    }

    #[test]
    fn stops_growing_at_the_cap() {
        let cap = 64;
        let mut set = RangeSet::default();
        let mut refused = 0;
        for seq in (0..1_000u64).rev().map(|i| 2 * i) {
            if set.insert_capped(seq, cap) == Insert::Refused {
                refused += 1;
            }
        }
        assert_eq!(set.range_count(), cap);
        assert_eq!(refused, 1_000 - cap);
        // At the cap, a seq that joins or extends a range is still taken, and a
        // duplicate is still a duplicate.
        let (lo, _) = set.first().unwrap();
        assert_eq!(set.insert_capped(lo, cap), Insert::Duplicate);
        assert_eq!(set.insert_capped(lo + 1, cap), Insert::New);
        assert_eq!(set.range_count(), cap - 1, "two ranges joined");
        assert_eq!(
            set.insert_capped(lo + 3, cap),
            Insert::New,
            "joins two more"
        );
        assert_eq!(set.range_count(), cap - 2);
        assert_eq!(set.insert_capped(1, cap), Insert::New);
        assert_eq!(set.insert_capped(3, cap), Insert::New);
        assert_eq!(set.insert_capped(1_000_000, cap), Insert::Refused);
        assert_eq!(set.range_count(), cap);
    }
}
