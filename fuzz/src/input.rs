//! A cursor over a fuzz input: fixed-width little-endian knobs first, then the payload.
//!
//! Reads past the end yield zeros (and empty slices), so every byte string is a valid input
//! for every target: the mutator never has to keep a structure intact.

/// Reads knobs and payload from the front of a fuzz input.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Input<'a> {
    /// A cursor at the start of `data`.
    pub fn new(data: &'a [u8]) -> Input<'a> {
        Input { data, at: 0 }
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let end = self.at.saturating_add(n).min(self.data.len());
        let bytes = &self.data[self.at..end];
        self.at = end;
        bytes
    }

    fn fixed<const N: usize>(&mut self) -> [u8; N] {
        let mut raw = [0u8; N];
        let bytes = self.take(N);
        raw[..bytes.len()].copy_from_slice(bytes);
        raw
    }

    /// The next byte (0 past the end).
    pub fn u8(&mut self) -> u8 {
        self.fixed::<1>()[0]
    }

    /// The next little-endian u16 (zero-padded past the end).
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.fixed())
    }

    /// The next little-endian u32 (zero-padded past the end).
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.fixed())
    }

    /// The next little-endian u64 (zero-padded past the end).
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.fixed())
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        let bytes = &self.data[self.at..];
        self.at = self.data.len();
        bytes
    }

    /// Whether the whole input was read.
    pub fn is_empty(&self) -> bool {
        self.at >= self.data.len()
    }
}

/// `bytes` cut or zero-padded to exactly `len` bytes.
pub fn exact(bytes: &[u8], len: usize) -> Vec<u8> {
    let mut out = bytes[..bytes.len().min(len)].to_vec();
    out.resize(len, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_past_the_end_are_zero() {
        let mut input = Input::new(&[1, 2, 3]);
        assert_eq!(input.u16(), 0x0201);
        assert_eq!(input.u32(), 3);
        assert_eq!(input.u64(), 0);
        assert!(input.is_empty());
        assert_eq!(input.rest(), &[] as &[u8]);
        assert_eq!(exact(&[1, 2], 4), vec![1, 2, 0, 0]);
        assert_eq!(exact(&[1, 2, 3], 2), vec![1, 2]);
    }
}
