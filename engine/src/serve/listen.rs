//! The accept loops: one task per listening address, on the first serving reactor. Each
//! accepted connection is counted against `--max-connections` (refused ones are closed at
//! once, with a log line) and handed to the next reactor in turn, where it is registered and
//! served. A stop ends the loops; dropping a listener closes it (a Unix socket's file is
//! removed).

use std::rc::Rc;
use std::time::Duration;

use spool_reactor::{reactor_id, send_msg, sleep, spawn_local};

use super::connection::serve_connection;
use super::local::ReactorServe;
use super::race::{race, Either};
use crate::net::{Accepted, Listener};

/// Pause after a failed accept (out of file descriptors, say) before trying again.
const ACCEPT_RETRY: Duration = Duration::from_millis(20);

/// Accepts on `listener` until the daemon stops.
pub(crate) async fn accept_loop(mut listener: Listener, state: Rc<ReactorServe>) {
    let address = listener
        .local_addr()
        .map_or_else(|_| "?".to_string(), |addr| addr.to_string());
    loop {
        let accepted = match race(listener.accept_unregistered(), state.stopped()).await {
            Either::Left(accepted) => accepted,
            Either::Right(()) => break,
        };
        match accepted {
            Ok(accepted) => hand_over(accepted, &state),
            Err(err) => {
                tracing::warn!(%address, %err, "accept failed");
                sleep(ACCEPT_RETRY).await;
            }
        }
    }
    tracing::info!(%address, "stopped listening");
}

/// Counts the connection in and starts serving it on the next reactor.
fn hand_over(accepted: Accepted, state: &Rc<ReactorServe>) {
    let shared = &state.shared;
    if !shared.try_open() {
        tracing::warn!(
            peer = accepted.peer(),
            max = shared.max_connections,
            "connection refused: --max-connections are open"
        );
        return;
    }
    let Some(target) = shared.next_reactor() else {
        shared.close();
        return;
    };
    if reactor_id().ok() == Some(target) {
        start(accepted, Rc::clone(state));
        return;
    }
    let fallback = std::sync::Arc::clone(shared);
    let sent = send_msg(target, move || match ReactorServe::current() {
        Some(state) => start(accepted, state),
        None => fallback.close(),
    });
    if let Err(err) = sent {
        tracing::error!(%err, "could not hand a connection to its reactor");
        shared.close();
    }
}

fn start(accepted: Accepted, state: Rc<ReactorServe>) {
    let peer = accepted.peer().to_string();
    match accepted.register() {
        Ok(stream) => drop(spawn_local(serve_connection(stream, peer, state))),
        Err(err) => {
            tracing::warn!(%peer, %err, "could not register the connection");
            state.shared.close();
        }
    }
}
