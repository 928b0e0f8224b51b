//! The JSON-RPC socket: a Unix socket (mode 0600) served on the metadata reactor, where the
//! store lives, so every method runs next to the state it changes. Each client is its own
//! task: requests of one client run one at a time, in order (as SPDK's server does); a slow
//! or silent client holds only its own connection. Clients at most: [`MAX_RPC_CLIENTS`].

use std::rc::Rc;

use spool_reactor::spawn_local;

use super::jsonrpc::{error_response, response, Incoming, RpcDecoder};
use super::methods::{self, RpcContext};
use crate::net::{Listener, Stream};
use crate::serve::local::ReactorServe;

/// RPC clients connected at once at most; more are closed at accept.
pub const MAX_RPC_CLIENTS: usize = 64;

/// Accepts RPC clients on `listener` until the daemon stops.
pub(crate) async fn serve_rpc(mut listener: Listener, context: Rc<RpcContext>) {
    let Some(state) = ReactorServe::current() else {
        return;
    };
    loop {
        let accepted = match crate::serve::race::race(listener.accept(), state.stopped()).await {
            crate::serve::race::Either::Left(accepted) => accepted,
            crate::serve::race::Either::Right(()) => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                if context.clients.get() >= MAX_RPC_CLIENTS {
                    tracing::warn!(%peer, "RPC client refused: {MAX_RPC_CLIENTS} connected");
                    continue;
                }
                context.clients.set(context.clients.get() + 1);
                drop(spawn_local(rpc_client(stream, Rc::clone(&context))));
            }
            Err(err) => {
                tracing::warn!(%err, "RPC accept failed");
                spool_reactor::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
}

/// One RPC client: read, run each request, answer, until it leaves or breaks the protocol.
async fn rpc_client(mut stream: Stream, context: Rc<RpcContext>) {
    struct Counted(Rc<RpcContext>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.clients.set(self.0.clients.get().saturating_sub(1));
        }
    }
    let _counted = Counted(Rc::clone(&context));
    let mut decoder = RpcDecoder::new();
    let mut buf = vec![0u8; 16 << 10];
    loop {
        while let Some(incoming) = decoder.next_message() {
            let reply = match incoming {
                Incoming::Request(request) => {
                    let method = request.method.clone();
                    let result = methods::dispatch(&context, &request.method, request.params).await;
                    if let Err(error) = &result {
                        tracing::warn!(%method, code = error.code, "RPC failed: {}", error.message);
                    }
                    let Some(id) = request.id else {
                        continue; // a notification: no answer
                    };
                    match result {
                        Ok(value) => response(&id, value),
                        Err(error) => error_response(&id, &error),
                    }
                }
                Incoming::Invalid { id, error } => error_response(&id, &error),
                Incoming::Fatal(error) => {
                    let _ = stream
                        .write_all(&error_response(&serde_json::Value::Null, &error))
                        .await;
                    return;
                }
            };
            if stream.write_all(&reply).await.is_err() {
                return;
            }
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => decoder.input(&buf[..n]),
        }
    }
}
