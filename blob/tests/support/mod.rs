//! Shared helpers for the blobstore's integration tests. Include with `mod support;` and use
//! `support::fixtures::...`.

pub mod fixtures;
