//! Test helpers shared by the engine's integration tests.

pub mod nbd_client;
