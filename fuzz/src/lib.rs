//! Fuzzing of every parser of Spool's on-disk bytes, on the stable toolchain.
//!
//! - [`targets`]: one function per parser (`target_super_block`, `target_mask`,
//!   `target_descriptors`, `target_md_chain`, `target_extent_page`), each taking raw bytes,
//!   checking the invariants that hold whatever the bytes, and panicking only when the code
//!   under test breaks a promise.
//! - [`store`]: `target_store_load`, the whole-store target: patch a small store image,
//!   load it (clean or recovery), open and read every blob, unload, reload.
//! - [`check`]: `target_store_check`, `spool check`'s checker and repair on a patched store
//!   image: the repaired store must check clean of mask and super block problems and load.
//! - [`nbd`]: `target_nbd_handshake` and `target_nbd_request`, a hostile client's bytes into
//!   the NBD handshake and request decoder of `spool_engine::nbd`.
//! - [`rpc`]: `target_rpc_request`, a hostile client's bytes into the JSON-RPC framing
//!   decoder of `spool_engine::rpc::jsonrpc`.
//! - [`sim`]: the whole-engine deterministic simulation (`spool-fuzz sim`): seeded
//!   workloads and faults on simulated time, checked against a model after every restart.
//! - [`corpus`]: seeds cut from the SPDK fixture images and from stores Spool makes.
//! - [`mutate`]: the mutator (byte-level, descriptor-aware, and patch-level for stores).
//! - [`runner`]: the loop: mutate, run under `catch_unwind`, keep inputs reaching new outcome
//!   classes, minimise and write out the first failure; a watchdog turns hangs into failures.
//!
//! The same target functions back the optional libFuzzer targets in `fuzz/cargo-fuzz/`
//! (nightly and cargo-fuzz), outside the workspace. See `docs/fuzzing.md`.

#![warn(clippy::unwrap_used)]

pub mod check;
pub mod corpus;
pub mod hex;
pub mod input;
pub mod mutate;
pub mod nbd;
pub mod rpc;
pub mod runner;
pub mod sim;
pub mod store;
pub mod targets;

pub use check::target_store_check;
pub use nbd::{target_nbd_handshake, target_nbd_request};
pub use rpc::target_rpc_request;
pub use store::target_store_load;
pub use targets::{
    target_descriptors, target_extent_page, target_mask, target_md_chain, target_super_block,
};

/// How a target's input is laid out (what the mutator and the corpus need to know).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Knobs, then page 0.
    SuperBlock,
    /// Knobs, then a mask region.
    Mask,
    /// A bare descriptor area.
    Descriptors,
    /// Knobs, then up to 4 md pages.
    MdChain,
    /// Knobs, then one md page.
    ExtentPage,
    /// Base, flags, patches.
    Store,
    /// Knobs, then a client's handshake bytes.
    NbdHandshake,
    /// Knobs, then a client's request stream.
    NbdRequest,
    /// Knobs (split, pad), then a client's JSON-RPC stream.
    RpcRequest,
}

impl Shape {
    /// Bytes of knobs in front of the payload.
    pub fn knobs(self) -> usize {
        match self {
            Shape::SuperBlock => targets::SUPER_BLOCK_KNOBS,
            Shape::Mask => targets::MASK_KNOBS,
            Shape::Descriptors => 0,
            Shape::MdChain => targets::MD_CHAIN_KNOBS,
            Shape::ExtentPage => targets::EXTENT_PAGE_KNOBS,
            Shape::Store => store::STORE_KNOBS,
            Shape::NbdHandshake => nbd::NBD_HANDSHAKE_KNOBS,
            Shape::NbdRequest => nbd::NBD_REQUEST_KNOBS,
            Shape::RpcRequest => rpc::RPC_REQUEST_KNOBS,
        }
    }

    /// Offsets of the descriptor areas in an input of `len` bytes.
    pub fn areas(self, len: usize) -> Vec<usize> {
        let page_areas = |first: usize, pages: usize| -> Vec<usize> {
            (0..pages)
                .map(|i| first + i * spool_blob::format::PAGE_SIZE + 16)
                .filter(|&at| at + 5 <= len)
                .collect()
        };
        match self {
            Shape::Descriptors => vec![0],
            Shape::MdChain => page_areas(targets::MD_CHAIN_KNOBS, targets::MD_CHAIN_MAX_PAGES),
            Shape::ExtentPage => page_areas(targets::EXTENT_PAGE_KNOBS, 1),
            Shape::SuperBlock
            | Shape::Mask
            | Shape::Store
            | Shape::NbdHandshake
            | Shape::NbdRequest
            | Shape::RpcRequest => Vec::new(),
        }
    }
}

/// A fuzz target: its name, its function, and its input's shape.
#[derive(Debug)]
pub struct Target {
    /// The name on the command line.
    pub name: &'static str,
    /// What it covers (one line).
    pub about: &'static str,
    /// Runs one input; returns its outcome class.
    pub run: fn(&[u8]) -> String,
    /// The input's layout.
    pub shape: Shape,
    /// Longest input the mutator makes.
    pub max_len: usize,
}

const PAGE: usize = spool_blob::format::PAGE_SIZE;

/// Every target, in the order `--target all` runs them.
pub static TARGETS: &[Target] = &[
    Target {
        name: "super_block",
        about: "SuperBlock::decode, the encode round trip, check_geometry and what it promises",
        run: targets::super_block,
        shape: Shape::SuperBlock,
        max_len: targets::SUPER_BLOCK_KNOBS + PAGE + 64,
    },
    Target {
        name: "mask",
        about: "decode_mask for the three kinds, the encode round trip, BitSet::from_bytes",
        run: targets::mask,
        shape: Shape::Mask,
        max_len: targets::MASK_KNOBS + 4 * PAGE,
    },
    Target {
        name: "descriptors",
        about: "the descriptor walk, every field of every descriptor, the writer round trip",
        run: targets::descriptors,
        shape: Shape::Descriptors,
        max_len: PAGE + 64,
    },
    Target {
        name: "md_chain",
        about: "parse_chain, apply_extent_page for its extent pages, serialize_chain round trip",
        run: targets::md_chain,
        shape: Shape::MdChain,
        max_len: targets::MD_CHAIN_KNOBS + targets::MD_CHAIN_MAX_PAGES * PAGE,
    },
    Target {
        name: "extent_page",
        about: "apply_extent_page on blobs of up to 2048 clusters, thin and thick",
        run: targets::extent_page,
        shape: Shape::ExtentPage,
        max_len: targets::EXTENT_PAGE_KNOBS + PAGE,
    },
    Target {
        name: "store_load",
        about: "Blobstore::load of a patched image (clean and recovery), open and read every blob, unload, reload",
        run: store::store_load,
        shape: Shape::Store,
        max_len: store::STORE_KNOBS + 32 * (store::PATCH_HEADER + 255),
    },
    Target {
        name: "store_check",
        about: "spool check's checker and repair on a patched image: the repaired store checks clean of mask problems and loads",
        run: check::store_check,
        shape: Shape::Store,
        max_len: store::STORE_KNOBS + 32 * (store::PATCH_HEADER + 255),
    },
    Target {
        name: "nbd_handshake",
        about: "the NBD handshake on a client's bytes, whole and split: same answer, bounded buffers, replies that decode, consistent negotiation",
        run: nbd::nbd_handshake,
        shape: Shape::NbdHandshake,
        max_len: nbd::NBD_HANDSHAKE_KNOBS + 4096,
    },
    Target {
        name: "nbd_request",
        about: "the NBD request decoder on a request stream, whole and split: same events, bounded buffers, accepted requests obey the negotiation, replies decode",
        run: nbd::nbd_request,
        shape: Shape::NbdRequest,
        max_len: nbd::NBD_REQUEST_KNOBS + 4096,
    },
    Target {
        name: "rpc_request",
        about: "the JSON-RPC framing decoder on a request stream (padded up to past the 1 MiB cap), whole and split: same messages, nothing after a fatal error, bounded buffers, serde_json's verdicts, answers that parse",
        run: rpc::rpc_request,
        shape: Shape::RpcRequest,
        max_len: rpc::RPC_REQUEST_KNOBS + 4096,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}
