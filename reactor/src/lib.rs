//! Reactor.
