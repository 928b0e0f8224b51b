//! The mutator: byte-level mutations (bit flips, byte sets, interesting values, arithmetic,
//! dictionary tokens, block copies, splicing, truncation and extension), descriptor-aware
//! ones (retype, resize, insert, delete or replace the descriptor at a header boundary), and
//! for the store target structure-aware patches to the base image.

use fastrand::Rng;

use spool_blob::format::descriptor::{
    TYPE_EXTENT_PAGE, TYPE_EXTENT_RLE, TYPE_EXTENT_TABLE, TYPE_FLAGS, TYPE_XATTR,
    TYPE_XATTR_INTERNAL,
};
use spool_blob::format::md_page::DESC_AREA_LEN;
use spool_blob::format::PAGE_SIZE;

use crate::store::{base_index, bases, Base, SPOOL_BASES};
use crate::{Shape, Target};

/// Interesting 8-bit values.
pub const INTERESTING_8: &[u8] = &[
    0, 1, 2, 3, 4, 5, 6, 7, 8, 0x10, 0x18, 0x20, 0x40, 0x7F, 0x80, 0xFE, 0xFF,
];
/// Interesting 16-bit values (lengths near the page and descriptor-area sizes).
pub const INTERESTING_16: &[u16] = &[
    0, 1, 2, 4, 8, 0x7F, 0x80, 0xFF, 0x100, 0x1FF, 0x200, 0x201, 0x3FF, 0x400, 0xFFF, 4063, 4064,
    4067, 4068, 4071, 4072, 4073, 4076, 4088, 4091, 4092, 4095, 4096, 4097, 0x7FFF, 0x8000, 0xFFFE,
    0xFFFF,
];
/// Interesting 32-bit values.
pub const INTERESTING_32: &[u32] = &[
    0,
    1,
    2,
    3,
    4,
    5,
    8,
    24,
    63,
    64,
    65,
    511,
    512,
    513,
    1023,
    1024,
    4067,
    4068,
    4072,
    4073,
    4092,
    4096,
    0xFFFF,
    0x1_0000,
    (1 << 20) - 1,
    1 << 20,
    (1 << 28) - 1,
    1 << 28,
    (1 << 28) + 1,
    0x7FFF_FFFF,
    0x8000_0000,
    0xFFFF_FFFE,
    0xFFFF_FFFF,
];
/// Interesting 64-bit values (blob ids, the invalid id, sizes).
pub const INTERESTING_64: &[u64] = &[
    0,
    1,
    7,
    1 << 28,
    (1 << 28) + 1,
    0xFFFF_FFFF,
    1 << 32,
    (1 << 32) | 1,
    (1 << 32) | 2,
    (1 << 32) | 3,
    (1 << 32) | 4,
    (1 << 32) | 0xFFFF_FFFF,
    1 << 33,
    1 << 63,
    u64::MAX - 1,
    u64::MAX,
];

/// Tokens worth dropping in anywhere.
pub fn dictionary() -> Vec<Vec<u8>> {
    let mut tokens: Vec<Vec<u8>> = [
        &b"SPDKBLOB"[..],
        b"LVOLSTORE",
        b"SNAP",
        b"SNAPTMP",
        b"name",
        b"uuid",
        &[TYPE_FLAGS, 24, 0, 0, 0],
        &[0, 0, 0, 0, 0],
        &[0xFF, 0xFF, 0xFF, 0xFF],
        &[0, 0x10, 0, 0],
    ]
    .iter()
    .map(|t| t.to_vec())
    .collect();
    for page in 0..8u64 {
        tokens.push(((1u64 << 32) | page).to_le_bytes().to_vec());
    }
    // NBD: magics (big-endian, as on the wire), option and command codes, lengths.
    for token in [
        &b"IHAVEOPT"[..],
        b"NBDMAGIC",
        &[0x25, 0x60, 0x95, 0x13],
        &[0, 0, 0, 7],
        &[0, 0, 0, 10],
        &[0, 1, 0, 1],
        &[0, 0, 0x10, 0],
        &[0x02, 0, 0, 0],
        b"base:allocation",
    ] {
        tokens.push(token.to_vec());
    }
    tokens
}

/// Tokens for the JSON-RPC target (instead of the binary formats' ones): JSON-RPC's keys and
/// values, structure, escapes, numbers at the edges of `f64` and whitespace.
pub fn json_dictionary() -> Vec<Vec<u8>> {
    [
        &br#""jsonrpc":"2.0""#[..],
        br#""method":"#,
        br#""params":"#,
        br#""id":"#,
        br#"{"jsonrpc":"2.0","method":"a","id":1}"#,
        b"\"2.0\"",
        b"{",
        b"}",
        b"[",
        b"]",
        b"\":",
        b"\",",
        b"\"",
        b"\\u",
        b"\\uD83D\\uDE00",
        b"\\uDC00",
        b"\\\"",
        b"true",
        b"false",
        b"null",
        b"-0",
        b"1e400",
        b"1e-400",
        b"18446744073709551616",
        b"0.",
        b"\r\n",
        b"\x0c",
        b"\xc3\xa9",
        b"\xf0\x9f\x98\x80",
        b"\xed\xa0\x80",
        b"\xef\xbb\xbf",
    ]
    .iter()
    .map(|t| t.to_vec())
    .collect()
}

/// Builds mutants for one target.
#[derive(Debug)]
pub struct Mutator {
    shape: Shape,
    max_len: usize,
    dictionary: Vec<Vec<u8>>,
    /// Whole descriptors (header and body) seen in the seeds, for splicing.
    descriptors: Vec<Vec<u8>>,
}

impl Mutator {
    /// A mutator for `target`, learning descriptors from `seeds`.
    pub fn new(target: &Target, seeds: &[Vec<u8>]) -> Mutator {
        let mut mutator = Mutator {
            shape: target.shape,
            max_len: target.max_len,
            dictionary: if target.shape == Shape::RpcRequest {
                json_dictionary()
            } else {
                dictionary()
            },
            descriptors: Vec::new(),
        };
        for seed in seeds {
            mutator.learn(seed);
        }
        mutator
    }

    /// Remembers the descriptors of an input that reached a new outcome.
    pub fn learn(&mut self, input: &[u8]) {
        if self.descriptors.len() >= 512 {
            return;
        }
        for start in self.shape.areas(input.len()) {
            let end = area_end(self.shape, start, input.len());
            let bounds = boundaries(input, start, end);
            for (i, &at) in bounds.iter().enumerate() {
                let stop = bounds.get(i + 1).copied().unwrap_or(end).min(at + 600);
                if stop > at + 5 && !self.descriptors.iter().any(|d| d[..] == input[at..stop]) {
                    self.descriptors.push(input[at..stop].to_vec());
                }
            }
        }
    }

    /// A random input (used only when there are no seeds).
    pub fn fresh(&self, rng: &mut Rng) -> Vec<u8> {
        let len = rng.usize(..=self.max_len.min(PAGE_SIZE + 64));
        (0..len).map(|_| rng.u8(..)).collect()
    }

    /// A mutant of `parent`; `corpus` feeds splicing.
    pub fn mutate(&self, parent: &[u8], corpus: &[Vec<u8>], rng: &mut Rng) -> Vec<u8> {
        if self.shape == Shape::Store {
            return match bases() {
                Ok(bases) => mutate_store(parent, bases, rng, self),
                Err(_) => parent.to_vec(),
            };
        }
        let mut data = parent.to_vec();
        let rounds = 1 + if rng.u8(..4) == 0 {
            rng.usize(..8)
        } else {
            rng.usize(..2)
        };
        for _ in 0..rounds {
            self.mutate_once(&mut data, corpus, rng);
        }
        data.truncate(self.max_len);
        data
    }

    fn mutate_once(&self, data: &mut Vec<u8>, corpus: &[Vec<u8>], rng: &mut Rng) {
        let knobs = self.shape.knobs();
        let roll = rng.u32(..100);
        if data.is_empty() {
            data.extend((0..rng.usize(1..64)).map(|_| rng.u8(..)));
            return;
        }
        match roll {
            0..=9 if knobs > 0 => {
                let at = rng.usize(..knobs.min(data.len()));
                if rng.bool() {
                    data[at] ^= 1 << rng.u8(..8);
                } else {
                    data[at] = rng.u8(..);
                }
            }
            0..=21 => {
                let at = self.offset(data.len(), rng);
                data[at] ^= 1 << rng.u8(..8);
                if rng.u8(..4) == 0 {
                    let at = self.offset(data.len(), rng);
                    data[at] ^= 1 << rng.u8(..8);
                }
            }
            22..=29 => {
                let at = self.offset(data.len(), rng);
                data[at] = rng.u8(..);
            }
            30..=44 => {
                let at = self.offset(data.len(), rng);
                write_interesting(data, at, rng);
            }
            45..=50 => {
                let at = self.offset(data.len(), rng);
                arith(data, at, rng);
            }
            51..=68 if !self.shape.areas(data.len()).is_empty() => {
                self.descriptor_op(data, rng);
            }
            51..=74 => {
                let token = &self.dictionary[rng.usize(..self.dictionary.len())];
                let at = self.offset(data.len(), rng);
                overwrite(data, at, token);
            }
            75..=80 => {
                // Copy a block within the input.
                let len = 1 + rng.usize(..64.min(data.len()));
                let from = rng.usize(..=data.len() - len);
                let to = rng.usize(..=data.len() - len);
                data.copy_within(from..from + len, to);
            }
            81..=86 if !corpus.is_empty() => {
                // Splice: a range of another input at the same offset, or its tail.
                let other = &corpus[rng.usize(..corpus.len())];
                if other.is_empty() {
                    return;
                }
                let at = rng.usize(..other.len());
                if rng.bool() {
                    data.truncate(at);
                    data.extend_from_slice(&other[at..]);
                } else {
                    let len = 1 + rng.usize(..(other.len() - at).min(512));
                    overwrite(data, at, &other[at..at + len]);
                }
            }
            87..=89 => {
                // Truncate (page targets read the missing tail as zeros).
                let keep = if rng.bool() {
                    rng.usize(..=data.len())
                } else {
                    data.len().saturating_sub(1 + rng.usize(..16))
                };
                data.truncate(keep.max(knobs.min(data.len())));
            }
            90..=92 => {
                // Extend with zeros or random bytes.
                let len = rng.usize(1..256);
                if rng.bool() {
                    data.resize(data.len() + len, 0);
                } else {
                    data.extend((0..len).map(|_| rng.u8(..)));
                }
            }
            93..=95 => {
                // Zero a range.
                let at = self.offset(data.len(), rng);
                let len = 1 + rng.usize(..256);
                let end = (at + len).min(data.len());
                data[at..end].fill(0);
            }
            _ => {
                // Insert or delete bytes: shifts the rest of the page (page inputs) or of
                // the input.
                let at = self.offset(data.len(), rng);
                let len = 1 + rng.usize(..16);
                let knobs = self.shape.knobs();
                if self.shape.areas(data.len()).is_empty() || at < knobs {
                    if rng.bool() {
                        let end = (at + len).min(data.len());
                        data.drain(at..end);
                    } else {
                        let bytes: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
                        data.splice(at..at, bytes);
                    }
                } else {
                    let page_start = knobs + (at - knobs) / PAGE_SIZE * PAGE_SIZE;
                    let page_end = (page_start + PAGE_SIZE).min(data.len());
                    let page = &mut data[at..page_end];
                    let len = len.min(page.len());
                    if rng.bool() {
                        page.copy_within(len.., 0);
                        let n = page.len();
                        page[n - len..].fill(0);
                    } else {
                        let n = page.len();
                        page.copy_within(..n - len, len);
                        page[..len].iter_mut().for_each(|b| *b = rng.u8(..));
                    }
                }
            }
        }
    }

    /// An offset in the payload, biased towards the used (non-zero) part of the input.
    fn offset(&self, len: usize, rng: &mut Rng) -> usize {
        let low = self.shape.knobs().min(len - 1);
        rng.usize(low..len)
    }

    fn descriptor_op(&self, data: &mut [u8], rng: &mut Rng) {
        let areas = self.shape.areas(data.len());
        let start = areas[rng.usize(..areas.len())];
        let end = area_end(self.shape, start, data.len());
        let bounds = boundaries(data, start, end);
        let at = if bounds.is_empty() || rng.u8(..8) == 0 {
            start + rng.usize(..(end - start).max(1))
        } else {
            bounds[rng.usize(..bounds.len())]
        };
        if at >= end {
            return;
        }
        let area = &mut data[at..end];
        descriptor_edit(area, rng, &self.descriptors);
    }
}

/// Applies one descriptor-level edit at the start of `area` (a header boundary, usually).
fn descriptor_edit(area: &mut [u8], rng: &mut Rng, known: &[Vec<u8>]) {
    let room = area.len();
    match rng.u32(..8) {
        0 => {
            // Retype.
            if let Some(b) = area.first_mut() {
                *b = rng.u8(..8);
            }
        }
        1 | 2 => {
            // Resize: lengths around what is left, and the usual suspects.
            let rest = room.saturating_sub(5) as u32;
            let choices = [
                0,
                1,
                4,
                8,
                16,
                24,
                rest,
                rest.wrapping_sub(1),
                rest + 1,
                rest.wrapping_sub(4),
                rest + 4,
                u32::MAX,
                0x8000_0000,
                rng.u32(..64),
            ];
            let len = choices[rng.usize(..choices.len())];
            overwrite(area, 1, &len.to_le_bytes());
        }
        3 | 4 => {
            // Replace with a synthesised descriptor.
            let desc = synth_descriptor(rng);
            overwrite(area, 0, &desc);
        }
        5 if !known.is_empty() => {
            let desc = &known[rng.usize(..known.len())];
            overwrite(area, 0, desc);
        }
        5 | 6 => {
            // Insert a descriptor, shifting the rest of the area right.
            let desc = if !known.is_empty() && rng.bool() {
                known[rng.usize(..known.len())].clone()
            } else {
                synth_descriptor(rng)
            };
            let len = desc.len().min(room);
            area.copy_within(0..room - len, len);
            area[..len].copy_from_slice(&desc[..len]);
        }
        _ => {
            // Delete the descriptor here (shift left, zero the tail), or end the page here.
            if rng.bool() && room >= 5 {
                let len = u32::from_le_bytes([area[1], area[2], area[3], area[4]]) as usize;
                let cut = (5 + len).min(room);
                area.copy_within(cut.., 0);
                area[room - cut..].fill(0);
            } else {
                overwrite(area, 0, &[0, 0, 0, 0, 0]);
            }
        }
    }
}

/// A plausible (sometimes slightly wrong) descriptor of a random type.
pub fn synth_descriptor(rng: &mut Rng) -> Vec<u8> {
    let kind = match rng.u8(..10) {
        0 => TYPE_EXTENT_RLE,
        1 | 2 => TYPE_XATTR,
        3 => TYPE_XATTR_INTERNAL,
        4 => TYPE_FLAGS,
        5 | 6 => TYPE_EXTENT_TABLE,
        7 => TYPE_EXTENT_PAGE,
        8 => 0,
        _ => rng.u8(7..),
    };
    let small = |rng: &mut Rng| -> u32 {
        if rng.bool() {
            rng.u32(..16)
        } else {
            INTERESTING_32[rng.usize(..INTERESTING_32.len())]
        }
    };
    let mut body = Vec::new();
    match kind {
        TYPE_EXTENT_RLE => {
            for _ in 0..1 + rng.usize(..6) {
                body.extend_from_slice(&small(rng).to_le_bytes());
                body.extend_from_slice(&small(rng).to_le_bytes());
            }
        }
        TYPE_XATTR | TYPE_XATTR_INTERNAL => {
            let names: [&[u8]; 4] = [b"SNAP", b"SNAPTMP", b"name", b"x"];
            let name = names[rng.usize(..names.len())];
            let value: Vec<u8> = if rng.bool() {
                ((1u64 << 32) | rng.u64(..8)).to_le_bytes().to_vec()
            } else {
                (0..rng.usize(..32)).map(|_| rng.u8(..)).collect()
            };
            body.extend_from_slice(&(name.len() as u16).to_le_bytes());
            body.extend_from_slice(&(value.len() as u16).to_le_bytes());
            body.extend_from_slice(name);
            body.extend_from_slice(&value);
        }
        TYPE_FLAGS => {
            for _ in 0..3 {
                let bits = [0u64, 1, 2, 4, 8, 5, 7, 1 << 63, rng.u64(..)];
                body.extend_from_slice(&bits[rng.usize(..bits.len())].to_le_bytes());
            }
        }
        TYPE_EXTENT_TABLE => {
            let sizes = [
                0u64,
                1,
                8,
                511,
                512,
                513,
                1024,
                1 << 28,
                (1 << 28) + 1,
                u64::MAX,
            ];
            body.extend_from_slice(&sizes[rng.usize(..sizes.len())].to_le_bytes());
            for _ in 0..rng.usize(..5) {
                let page = if rng.bool() { 0 } else { small(rng) };
                body.extend_from_slice(&page.to_le_bytes());
                body.extend_from_slice(&small(rng).to_le_bytes());
            }
        }
        TYPE_EXTENT_PAGE => {
            body.extend_from_slice(&(512 * rng.u32(..3)).to_le_bytes());
            for _ in 0..rng.usize(..16) {
                body.extend_from_slice(&small(rng).to_le_bytes());
            }
        }
        _ => body.extend((0..rng.usize(..16)).map(|_| rng.u8(..))),
    }
    let mut len = body.len() as u32;
    if rng.u8(..10) == 0 {
        len = if rng.bool() {
            len.wrapping_add(1)
        } else {
            len.wrapping_sub(1)
        };
    }
    let mut desc = vec![kind];
    desc.extend_from_slice(&len.to_le_bytes());
    desc.extend_from_slice(&body);
    desc
}

/// The end of the descriptor area starting at `start`.
fn area_end(shape: Shape, start: usize, len: usize) -> usize {
    match shape {
        Shape::Descriptors => len,
        _ => (start + DESC_AREA_LEN).min(len),
    }
}

/// Offsets of the descriptor headers in `data[start..end]`, as a walk finds them.
pub fn boundaries(data: &[u8], start: usize, end: usize) -> Vec<usize> {
    let mut bounds = Vec::new();
    let mut at = start;
    while at + 5 <= end && bounds.len() < 1024 {
        bounds.push(at);
        let kind = data[at];
        let len = u32::from_le_bytes([data[at + 1], data[at + 2], data[at + 3], data[at + 4]]);
        if kind == 0 && len == 0 {
            break;
        }
        at = match at.checked_add(5 + len as usize) {
            Some(next) => next,
            None => break,
        };
    }
    bounds
}

fn overwrite(data: &mut [u8], at: usize, bytes: &[u8]) {
    if at >= data.len() {
        return;
    }
    let len = bytes.len().min(data.len() - at);
    data[at..at + len].copy_from_slice(&bytes[..len]);
}

fn write_interesting(data: &mut [u8], at: usize, rng: &mut Rng) {
    match rng.u8(..4) {
        0 => overwrite(data, at, &[INTERESTING_8[rng.usize(..INTERESTING_8.len())]]),
        1 => overwrite(
            data,
            at,
            &INTERESTING_16[rng.usize(..INTERESTING_16.len())].to_le_bytes(),
        ),
        2 => overwrite(
            data,
            at,
            &INTERESTING_32[rng.usize(..INTERESTING_32.len())].to_le_bytes(),
        ),
        _ => overwrite(
            data,
            at,
            &INTERESTING_64[rng.usize(..INTERESTING_64.len())].to_le_bytes(),
        ),
    }
}

fn arith(data: &mut [u8], at: usize, rng: &mut Rng) {
    let delta = rng.u32(1..17);
    if at + 4 <= data.len() && rng.bool() {
        let value = u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]);
        let value = if rng.bool() {
            value.wrapping_add(delta)
        } else {
            value.wrapping_sub(delta)
        };
        data[at..at + 4].copy_from_slice(&value.to_le_bytes());
    } else if rng.bool() {
        data[at] = data[at].wrapping_add(delta as u8);
    } else {
        data[at] = data[at].wrapping_sub(delta as u8);
    }
}

// ---------------------------------------------------------------------------------------------
// store inputs
// ---------------------------------------------------------------------------------------------

/// A store input: base, flags, patches `(page, offset, bytes)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreInput {
    /// Base selector.
    pub base: u8,
    /// Flag bits (see [`crate::store`]).
    pub flags: u8,
    /// Patches in order.
    pub patches: Vec<(u16, u16, Vec<u8>)>,
}

impl StoreInput {
    /// Parses an input as the store target reads it.
    pub fn parse(data: &[u8]) -> StoreInput {
        let mut input = crate::input::Input::new(data);
        let base = input.u8();
        let flags = input.u8();
        let mut patches = Vec::new();
        while !input.is_empty() {
            let page = input.u16();
            let offset = input.u16();
            let len = usize::from(input.u8());
            patches.push((page, offset, input.take(len).to_vec()));
        }
        StoreInput {
            base,
            flags,
            patches,
        }
    }

    /// The input bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![self.base, self.flags];
        for (page, offset, bytes) in &self.patches {
            out.extend_from_slice(&page.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            let len = bytes.len().min(255);
            out.push(len as u8);
            out.extend_from_slice(&bytes[..len]);
        }
        out
    }
}

/// Offsets of the super block's fields, with their widths.
const SUPER_FIELDS: &[(usize, usize)] = &[
    (8, 4),
    (12, 4),
    (16, 4),
    (20, 8),
    (28, 4),
    (32, 4),
    (36, 4),
    (40, 4),
    (44, 4),
    (48, 4),
    (52, 4),
    (56, 8),
    (72, 4),
    (76, 4),
    (80, 8),
    (88, 4),
];

fn mutate_store(parent: &[u8], bases: &[Base], rng: &mut Rng, mutator: &Mutator) -> Vec<u8> {
    let mut input = StoreInput::parse(parent);
    for _ in 0..1 + rng.usize(..3) {
        match rng.u32(..100) {
            0..=59 => {
                let base = &bases[base_index(input.base, bases.len())];
                if let Some(patch) = smart_patch(base, rng, mutator) {
                    // Usually reseal what was patched, so the parsers behind the CRC check
                    // see the change.
                    if rng.u8(..8) != 0 {
                        input.flags |= if patch.0 == 0 {
                            2
                        } else if usize::from(patch.0) >= base.md_start {
                            4
                        } else {
                            0
                        };
                    }
                    input.patches.push(patch);
                }
            }
            60..=69 if !input.patches.is_empty() => {
                let at = rng.usize(..input.patches.len());
                input.patches.remove(at);
            }
            60..=79 if !input.patches.is_empty() => {
                let at = rng.usize(..input.patches.len());
                let patch = &mut input.patches[at];
                if patch.2.is_empty() || rng.u8(..4) == 0 {
                    patch.1 = patch.1.wrapping_add(rng.u16(..8)).wrapping_sub(4);
                } else {
                    let i = rng.usize(..patch.2.len());
                    patch.2[i] ^= 1 << rng.u8(..8);
                }
            }
            60..=94 => {
                // Flags: the reseal and recovery bits matter most.
                let bit = if rng.u8(..3) == 0 {
                    rng.u8(..8)
                } else {
                    rng.u8(..3)
                };
                input.flags ^= 1 << bit;
            }
            _ => {
                input.base = if rng.u8(..4) == 0 {
                    rng.u8(..8)
                } else {
                    rng.u8(..SPOOL_BASES as u8)
                };
            }
        }
    }
    input.patches.truncate(32);
    input.encode()
}

/// A patch aimed where it matters: a used metadata page, within its used bytes.
fn smart_patch(base: &Base, rng: &mut Rng, mutator: &Mutator) -> Option<(u16, u16, Vec<u8>)> {
    let meta_pages = base.meta_pages.max(1);
    let (page, used) = if rng.u8(..4) == 0 {
        // The super block: every field steers the whole load.
        (0, 96)
    } else if !base.used_pages.is_empty() && rng.u8(..8) != 0 {
        base.used_pages[rng.usize(..base.used_pages.len())]
    } else {
        (rng.usize(..meta_pages), PAGE_SIZE)
    };
    let bytes = &base.image[page * PAGE_SIZE..(page + 1) * PAGE_SIZE];
    let mut offset = rng.usize(..used.max(1));
    if page == 0 && rng.bool() {
        let (field, width) = SUPER_FIELDS[rng.usize(..SUPER_FIELDS.len())];
        let mut value = bytes[field..field + width].to_vec();
        write_interesting(&mut value, 0, rng);
        return Some((0, field as u16, value));
    }
    let patch = match rng.u32(..100) {
        0..=34 => {
            let len = 1 + rng.usize(..2);
            let end = (offset + len).min(PAGE_SIZE);
            let mut value = bytes[offset..end].to_vec();
            let i = rng.usize(..value.len());
            value[i] ^= 1 << rng.u8(..8);
            value
        }
        35..=54 => {
            let mut value = bytes[offset..(offset + 8).min(PAGE_SIZE)].to_vec();
            write_interesting(&mut value, 0, rng);
            let width = [1usize, 2, 4, 8][rng.usize(..4)].min(value.len());
            value.truncate(width);
            value
        }
        62..=69 if page >= base.md_start => {
            // An xattr edit: a name the store acts on (SNAP, SNAPTMP) of the same length, or
            // an 8-byte value that is a blob id of this store.
            let bounds = boundaries(bytes, 16, 16 + DESC_AREA_LEN);
            let xattrs: Vec<usize> = bounds
                .into_iter()
                .filter(|&at| {
                    (bytes[at] == TYPE_XATTR || bytes[at] == TYPE_XATTR_INTERNAL)
                        && at + 9 <= 16 + DESC_AREA_LEN
                })
                .collect();
            let at = *xattrs.get(rng.usize(..xattrs.len().max(1)))?;
            let name_len = usize::from(u16::from_le_bytes([bytes[at + 5], bytes[at + 6]]));
            let value_len = usize::from(u16::from_le_bytes([bytes[at + 7], bytes[at + 8]]));
            let name_at = at + 9;
            if rng.bool() && (name_len == 4 || name_len == 7) {
                offset = name_at;
                b"SNAPTMP"[..name_len].to_vec()
            } else if value_len == 8 {
                offset = name_at + name_len;
                let id = if !base.blob_ids.is_empty() && rng.u8(..4) != 0 {
                    base.blob_ids[rng.usize(..base.blob_ids.len())]
                } else {
                    INTERESTING_64[rng.usize(..INTERESTING_64.len())]
                };
                id.to_le_bytes().to_vec()
            } else {
                return None;
            }
        }
        55..=69 => mutator.dictionary[rng.usize(..mutator.dictionary.len())].clone(),
        70..=89 if page >= base.md_start => {
            // A descriptor edit at a header boundary of this md page.
            let bounds = boundaries(bytes, 16, 16 + DESC_AREA_LEN);
            let at = if bounds.is_empty() {
                16
            } else {
                bounds[rng.usize(..bounds.len())]
            };
            let mut area = bytes[at..16 + DESC_AREA_LEN].to_vec();
            descriptor_edit(&mut area, rng, &mutator.descriptors);
            // Only the bytes that changed (at most a patch's worth).
            let first = area.iter().zip(&bytes[at..]).position(|(a, b)| a != b)?;
            let last = area
                .iter()
                .zip(&bytes[at..])
                .rposition(|(a, b)| a != b)
                .unwrap_or(first);
            offset = at + first;
            area[first..=last.min(first + 254)].to_vec()
        }
        70..=94 => (0..1 + rng.usize(..8)).map(|_| rng.u8(..)).collect(),
        _ => Vec::new(),
    };
    Some((page as u16, offset as u16, patch))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_inputs_round_trip() {
        let input = StoreInput {
            base: 1,
            flags: 6,
            patches: vec![(3, 17, vec![1, 2, 3]), (0, 0, vec![])],
        };
        assert_eq!(StoreInput::parse(&input.encode()), input);
    }

    #[test]
    fn boundaries_follow_lengths() {
        let mut area = vec![0u8; 64];
        area[0] = 3;
        area[1] = 24;
        area[29] = 2;
        area[30] = 6;
        assert_eq!(boundaries(&area, 0, 64), vec![0, 29, 40]);
    }

    #[test]
    fn synthesised_descriptors_have_headers() {
        let mut rng = Rng::with_seed(3);
        for _ in 0..100 {
            assert!(synth_descriptor(&mut rng).len() >= 5);
        }
    }
}
