//! Bit arrays: [`BitSet`] for state owned by the metadata reactor, [`AtomicBitmap`] for the
//! used-cluster map that I/O reactors claim from without a lock.

use std::sync::atomic::{AtomicU64, Ordering};

/// A fixed-size bit array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitSet {
    words: Vec<u64>,
    len: u64,
}

impl BitSet {
    /// `len` clear bits.
    pub fn new(len: u64) -> BitSet {
        BitSet {
            words: vec![0; len.div_ceil(64) as usize],
            len,
        }
    }

    /// From LSB-first bytes (bits beyond `len` ignored). Word at a time: loading the
    /// used-cluster mask of a large device costs its bytes, not a loop per bit.
    pub fn from_bytes(len: u64, bytes: &[u8]) -> BitSet {
        let mut set = BitSet::new(len);
        let used = bytes.len().min(len.div_ceil(8) as usize);
        for (word, chunk) in set.words.iter_mut().zip(bytes[..used].chunks(8)) {
            let mut raw = [0u8; 8];
            raw[..chunk.len()].copy_from_slice(chunk);
            *word = u64::from_le_bytes(raw);
        }
        set.clear_tail();
        set
    }

    /// LSB-first bytes, `ceil(len/8)` of them.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes: Vec<u8> = self.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        bytes.truncate(self.len.div_ceil(8) as usize);
        bytes
    }

    /// Clears the bits of the last word past `len`.
    fn clear_tail(&mut self) {
        if !self.len.is_multiple_of(64) {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << (self.len % 64)) - 1;
            }
        }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it has no bits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether bit `bit` is set (false beyond the end).
    pub fn get(&self, bit: u64) -> bool {
        bit < self.len && self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    /// Sets bit `bit` (ignored beyond the end).
    pub fn set(&mut self, bit: u64) {
        if bit < self.len {
            self.words[(bit / 64) as usize] |= 1 << (bit % 64);
        }
    }

    /// Clears bit `bit`.
    pub fn clear(&mut self, bit: u64) {
        if bit < self.len {
            self.words[(bit / 64) as usize] &= !(1 << (bit % 64));
        }
    }

    /// Sets bits `start..start + count` (clipped at the end), a word at a time; returns
    /// whether every one of them was set already.
    pub fn set_range(&mut self, start: u64, count: u64) -> bool {
        let end = start.saturating_add(count).min(self.len);
        let mut all_set = true;
        let mut bit = start;
        while bit < end {
            let word = (bit / 64) as usize;
            let low = bit % 64;
            let high = (end - (bit - low)).min(64);
            let bits = if high - low == 64 {
                u64::MAX
            } else {
                ((1u64 << (high - low)) - 1) << low
            };
            all_set &= self.words[word] & bits == bits;
            self.words[word] |= bits;
            bit = (bit - low) + 64;
        }
        all_set
    }

    /// The first clear bit at or after `from`.
    pub fn first_clear(&self, from: u64) -> Option<u64> {
        let mut bit = from;
        while bit < self.len {
            let word = self.words[(bit / 64) as usize] | ((1u64 << (bit % 64)) - 1);
            if word != u64::MAX {
                let found = (bit / 64) * 64 + u64::from((!word).trailing_zeros());
                return (found < self.len).then_some(found);
            }
            bit = (bit / 64 + 1) * 64;
        }
        None
    }

    /// Number of set bits.
    pub fn count_set(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The set bits in ascending order.
    pub fn iter_set(&self) -> impl Iterator<Item = u64> + '_ {
        set_bits(self.words.iter().copied())
    }

    /// The bits set both here and in `other`, in ascending order (up to the shorter length).
    pub fn iter_set_and<'a>(&'a self, other: &'a BitSet) -> impl Iterator<Item = u64> + 'a {
        set_bits(self.words.iter().zip(&other.words).map(|(a, b)| a & b))
    }
}

/// The positions of the set bits of `words` (word `i` holds bits `64 i ..`), ascending.
fn set_bits(words: impl Iterator<Item = u64>) -> impl Iterator<Item = u64> {
    words.enumerate().flat_map(|(index, word)| {
        let mut rest = word;
        std::iter::from_fn(move || {
            if rest == 0 {
                return None;
            }
            let bit = u64::from(rest.trailing_zeros());
            rest &= rest - 1;
            Some(index as u64 * 64 + bit)
        })
    })
}

/// A bit array whose bits are claimed and released with atomic operations, so any reactor
/// can claim a free cluster without a lock. Tracks the number of clear bits.
#[derive(Debug)]
pub struct AtomicBitmap {
    words: Box<[AtomicU64]>,
    len: u64,
    free: AtomicU64,
}

impl AtomicBitmap {
    /// A copy of `set`.
    pub fn from_set(set: &BitSet) -> AtomicBitmap {
        let words: Box<[AtomicU64]> = set.words.iter().map(|&w| AtomicU64::new(w)).collect();
        AtomicBitmap {
            words,
            len: set.len,
            free: AtomicU64::new(set.len - set.count_set()),
        }
    }

    /// A plain copy of the bits as they are now.
    pub fn snapshot(&self) -> BitSet {
        BitSet {
            words: self
                .words
                .iter()
                .map(|w| w.load(Ordering::Acquire))
                .collect(),
            len: self.len,
        }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it has no bits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Clear bits now.
    pub fn free_count(&self) -> u64 {
        self.free.load(Ordering::Acquire)
    }

    /// Whether bit `bit` is set.
    pub fn get(&self, bit: u64) -> bool {
        bit < self.len
            && self.words[(bit / 64) as usize].load(Ordering::Acquire) & (1 << (bit % 64)) != 0
    }

    /// Claims the first clear bit at or after `from` (wrapping once); `None` when all are set.
    pub fn claim_first(&self, from: u64) -> Option<u64> {
        if self.free.load(Ordering::Acquire) == 0 {
            return None;
        }
        let words = self.words.len() as u64;
        let start_word = if self.len == 0 {
            0
        } else {
            (from.min(self.len - 1)) / 64
        };
        for step in 0..=words {
            let index = ((start_word + step) % words.max(1)) as usize;
            let word = &self.words[index];
            let mut current = word.load(Ordering::Acquire);
            loop {
                let valid = if (index as u64 + 1) * 64 <= self.len {
                    u64::MAX
                } else {
                    (1u64 << (self.len % 64)) - 1
                };
                let clear = !current & valid;
                if clear == 0 {
                    break;
                }
                let bit = clear.trailing_zeros();
                match word.compare_exchange_weak(
                    current,
                    current | (1 << bit),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => {
                        self.free.fetch_sub(1, Ordering::AcqRel);
                        return Some(index as u64 * 64 + u64::from(bit));
                    }
                    Err(now) => current = now,
                }
            }
        }
        None
    }

    /// Sets bit `bit`; returns whether it was clear before.
    pub fn set(&self, bit: u64) -> bool {
        if bit >= self.len {
            return false;
        }
        let before = self.words[(bit / 64) as usize].fetch_or(1 << (bit % 64), Ordering::AcqRel);
        let was_clear = before & (1 << (bit % 64)) == 0;
        if was_clear {
            self.free.fetch_sub(1, Ordering::AcqRel);
        }
        was_clear
    }

    /// Clears bit `bit`; returns whether it was set before.
    pub fn release(&self, bit: u64) -> bool {
        if bit >= self.len {
            return false;
        }
        let before =
            self.words[(bit / 64) as usize].fetch_and(!(1 << (bit % 64)), Ordering::AcqRel);
        let was_set = before & (1 << (bit % 64)) != 0;
        if was_set {
            self.free.fetch_add(1, Ordering::AcqRel);
        }
        was_set
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_range_sets_word_at_a_time_and_says_whether_all_were_set() {
        let mut set = BitSet::new(200);
        assert!(!set.set_range(3, 130));
        assert!((3..133).all(|bit| set.get(bit)));
        assert!(!set.get(2) && !set.get(133));
        assert!(set.set_range(3, 130));
        assert!(set.set_range(64, 64));
        assert!(!set.set_range(130, 10));
        assert!(!set.set_range(190, 100), "clipped at the end");
        assert!(set.get(199));
        assert!(set.set_range(10, 0));
        let mut full = BitSet::new(128);
        assert!(!full.set_range(0, 128));
        assert_eq!(full.count_set(), 128);
    }

    #[test]
    fn bitset_round_trips_bytes_and_finds_clear_bits() {
        let mut set = BitSet::new(130);
        for bit in [0, 1, 63, 64, 129] {
            set.set(bit);
        }
        assert_eq!(set.first_clear(0), Some(2));
        assert_eq!(set.first_clear(63), Some(65));
        assert_eq!(set.first_clear(129), None);
        assert_eq!(BitSet::from_bytes(130, &set.to_bytes()), set);
        assert_eq!(set.iter_set().collect::<Vec<_>>(), vec![0, 1, 63, 64, 129]);
        assert_eq!(set.count_set(), 5);
    }

    #[test]
    fn bytes_convert_word_at_a_time_with_the_tail_cleared() {
        // 70 bits: a whole word and 6 bits of the next; the source has bits past the end.
        let mut bytes = vec![0u8; 9];
        bytes[0] = 0b1000_0001; // bits 0 and 7
        bytes[7] = 0x80; // bit 63
        bytes[8] = 0xFF; // bits 64..72, of which 64..70 exist
        let set = BitSet::from_bytes(70, &bytes);
        assert_eq!(
            set.iter_set().collect::<Vec<_>>(),
            vec![0, 7, 63, 64, 65, 66, 67, 68, 69]
        );
        assert_eq!(set.count_set(), 9, "bits past the length are not kept");
        let back = set.to_bytes();
        assert_eq!(back.len(), 9);
        assert_eq!(back[..8], bytes[..8]);
        assert_eq!(back[8], 0x3F);
        // A short source: the missing bytes read as clear.
        let short = BitSet::from_bytes(200, &[0x01, 0x00, 0x02]);
        assert_eq!(short.iter_set().collect::<Vec<_>>(), vec![0, 17]);
        assert_eq!(short.to_bytes().len(), 25);
        // Intersection.
        let mut other = BitSet::new(70);
        other.set(7);
        other.set(64);
        other.set(3);
        assert_eq!(set.iter_set_and(&other).collect::<Vec<_>>(), vec![7, 64]);
    }

    #[test]
    fn atomic_claims_are_unique_across_threads_and_counted() {
        let map = std::sync::Arc::new(AtomicBitmap::from_set(&BitSet::new(1000)));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let map = std::sync::Arc::clone(&map);
                std::thread::spawn(move || {
                    (0..250)
                        .map(|_| map.claim_first(t * 200).unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<u64> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 1000);
        assert_eq!(map.free_count(), 0);
        assert_eq!(map.claim_first(0), None);
        assert!(map.release(5));
        assert!(!map.release(5));
        assert_eq!(map.claim_first(900), Some(5));
    }
}
