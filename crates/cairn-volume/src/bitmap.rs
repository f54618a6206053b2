//! A fixed-size bitmap of atomic words: set and tested from many threads without a lock.
//! Used for changed-block tracking (one bit per 64 KiB), copy-before-write state, and a
//! clone's hydration map (one bit per chunk).

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug)]
pub struct Bitmap {
    bits: u64,
    words: Vec<AtomicU64>,
}

fn words_for(bits: u64) -> usize {
    usize::try_from(bits.div_ceil(64)).expect("bitmap fits in memory")
}

impl Bitmap {
    pub fn new(bits: u64) -> Bitmap {
        Bitmap {
            bits,
            words: (0..words_for(bits)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// A bitmap of `bits` bits, all set.
    pub fn full(bits: u64) -> Bitmap {
        let b = Bitmap::new(bits);
        b.set_range(0, bits);
        b
    }

    /// From stored words; `None` if the word count does not match `bits`.
    pub fn from_words(bits: u64, words: &[u64]) -> Option<Bitmap> {
        if words.len() != words_for(bits) {
            return None;
        }
        let b = Bitmap {
            bits,
            words: words.iter().map(|&w| AtomicU64::new(w)).collect(),
        };
        // Bits past the end are ignored and kept clear.
        if !bits.is_multiple_of(64)
            && let Some(last) = b.words.last()
        {
            last.fetch_and((1u64 << (bits % 64)) - 1, Ordering::Relaxed);
        }
        Some(b)
    }

    pub fn words(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect()
    }

    pub fn len(&self) -> u64 {
        self.bits
    }

    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    fn at(i: u64) -> (usize, u64) {
        (usize::try_from(i / 64).expect("fits"), 1u64 << (i % 64))
    }

    pub fn get(&self, i: u64) -> bool {
        if i >= self.bits {
            return false;
        }
        let (w, m) = Self::at(i);
        self.words[w].load(Ordering::Acquire) & m != 0
    }

    /// Sets bit `i`; true if it was clear.
    pub fn set(&self, i: u64) -> bool {
        if i >= self.bits {
            return false;
        }
        let (w, m) = Self::at(i);
        self.words[w].fetch_or(m, Ordering::AcqRel) & m == 0
    }

    pub fn clear(&self, i: u64) {
        if i < self.bits {
            let (w, m) = Self::at(i);
            self.words[w].fetch_and(!m, Ordering::AcqRel);
        }
    }

    /// Sets bits `[from, to)`.
    pub fn set_range(&self, from: u64, to: u64) {
        let to = to.min(self.bits);
        let mut i = from;
        while i < to {
            if i.is_multiple_of(64) && to - i >= 64 {
                self.words[usize::try_from(i / 64).expect("fits")]
                    .store(u64::MAX, Ordering::Release);
                i += 64;
            } else {
                self.set(i);
                i += 1;
            }
        }
    }

    /// Whether any bit of `[from, to)` is set.
    pub fn any_in(&self, from: u64, to: u64) -> bool {
        let to = to.min(self.bits);
        let mut i = from;
        while i < to {
            let (w, _) = Self::at(i);
            let word = self.words[w].load(Ordering::Acquire);
            if i.is_multiple_of(64) && to - i >= 64 {
                if word != 0 {
                    return true;
                }
                i += 64;
            } else {
                if word & (1u64 << (i % 64)) != 0 {
                    return true;
                }
                i += 1;
            }
        }
        false
    }

    /// Whether every bit is set.
    pub fn all(&self) -> bool {
        self.count() == self.bits
    }

    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// Sets every bit set in `other` (same length).
    pub fn merge(&self, other: &Bitmap) {
        for (a, b) in self.words.iter().zip(&other.words) {
            a.fetch_or(b.load(Ordering::Acquire), Ordering::AcqRel);
        }
    }

    /// The set bits, in order.
    pub fn ones(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, w)| {
            let mut word = w.load(Ordering::Acquire);
            std::iter::from_fn(move || {
                if word == 0 {
                    return None;
                }
                let b = u64::from(word.trailing_zeros());
                word &= word - 1;
                Some(wi as u64 * 64 + b)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn ranges_match_a_reference(bits in 1u64..300, ops in proptest::collection::vec((0u64..300, 0u64..300), 0..20)) {
            let b = Bitmap::new(bits);
            let mut r = vec![false; usize::try_from(bits).unwrap()];
            for (x, y) in ops {
                let (lo, hi) = (x.min(y), x.max(y));
                b.set_range(lo, hi);
                for i in lo..hi.min(bits) { r[usize::try_from(i).unwrap()] = true; }
                prop_assert_eq!(b.any_in(lo, hi), r[usize::try_from(lo.min(bits)).unwrap()..usize::try_from(hi.min(bits)).unwrap()].iter().any(|&v| v));
            }
            let ones: Vec<u64> = b.ones().collect();
            let want: Vec<u64> = (0..bits).filter(|&i| r[usize::try_from(i).unwrap()]).collect();
            prop_assert_eq!(&ones, &want);
            prop_assert_eq!(b.count(), want.len() as u64);
            let c = Bitmap::from_words(bits, &b.words()).unwrap();
            prop_assert_eq!(c.ones().collect::<Vec<_>>(), want);
        }
    }
}
