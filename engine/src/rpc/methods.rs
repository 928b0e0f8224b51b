//! The method table: every JSON-RPC method the daemon answers, in one list, so
//! `rpc_get_methods` cannot drift from what [`dispatch`] runs. Methods take SPDK's parameter
//! names and give SPDK's result shapes where SPDK has the same operation; parameters are
//! decoded strictly (an unknown or wrongly-typed one is `-32602`, as SPDK's decoders do).
//! Operation failures answer the negative errno as the code (`-ENOENT`, `-EEXIST`, `-EBUSY`,
//! `-EINVAL`, ...) with a message naming what is wrong.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use super::jsonrpc::{codes, RpcError};
use super::{bdev, framework, lvol, nbd};
use crate::serve::shared::DaemonShared;
use crate::EngineError;

/// What every method may use (it runs on the metadata reactor).
pub(crate) struct RpcContext {
    /// The daemon's shared state (reactors, counters).
    pub(crate) shared: Arc<DaemonShared>,
    /// The cores the reactors run on, in reactor order.
    pub(crate) cores: Vec<usize>,
    /// RPC clients connected now.
    pub(crate) clients: Cell<usize>,
    /// Whether a method is running: methods run one at a time, whoever calls them (each
    /// reads the state, awaits, and changes it; interleaved, one would undo another).
    pub(crate) busy: Cell<bool>,
    /// Methods waiting for their turn.
    pub(crate) waiting: std::cell::RefCell<std::collections::VecDeque<std::task::Waker>>,
}

/// The turn of one method; the next waiter goes when it drops.
struct Turn<'a>(&'a RpcContext);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.0.busy.set(false);
        let next = self.0.waiting.borrow_mut().pop_front();
        if let Some(next) = next {
            next.wake();
        }
    }
}

impl RpcContext {
    /// A context for the daemon's reactors.
    pub(crate) fn new(shared: Arc<DaemonShared>, cores: Vec<usize>) -> RpcContext {
        RpcContext {
            shared,
            cores,
            clients: Cell::new(0),
            busy: Cell::new(false),
            waiting: std::cell::RefCell::new(std::collections::VecDeque::new()),
        }
    }

    async fn turn(&self) -> Turn<'_> {
        std::future::poll_fn(|cx| {
            if self.busy.get() {
                self.waiting.borrow_mut().push_back(cx.waker().clone());
                std::task::Poll::Pending
            } else {
                self.busy.set(true);
                std::task::Poll::Ready(())
            }
        })
        .await;
        Turn(self)
    }
}

/// A method's future.
pub(crate) type MethodFuture<'a> = Pin<Box<dyn Future<Output = Result<Value, RpcError>> + 'a>>;
/// A method: context and parameters in, result out.
pub(crate) type Handler = for<'a> fn(&'a RpcContext, Option<Value>) -> MethodFuture<'a>;

/// Every method, by name.
pub(crate) const METHODS: &[(&str, Handler)] = &[
    ("spdk_get_version", framework::spdk_get_version),
    ("rpc_get_methods", framework::rpc_get_methods),
    ("framework_get_reactors", framework::framework_get_reactors),
    ("spdk_kill_instance", framework::spdk_kill_instance),
    ("bdev_get_bdevs", bdev::bdev_get_bdevs),
    ("bdev_get_iostat", bdev::bdev_get_iostat),
    ("bdev_lvol_create_lvstore", lvol::create_lvstore),
    ("bdev_lvol_get_lvstores", lvol::get_lvstores),
    ("bdev_lvol_rename_lvstore", lvol::rename_lvstore),
    ("bdev_lvol_delete_lvstore", lvol::delete_lvstore),
    ("bdev_lvol_create", lvol::create),
    ("bdev_lvol_get_lvols", lvol::get_lvols),
    ("bdev_lvol_snapshot", lvol::snapshot),
    ("bdev_lvol_clone", lvol::clone),
    ("bdev_lvol_rename", lvol::rename),
    ("bdev_lvol_resize", lvol::resize),
    ("bdev_lvol_set_read_only", lvol::set_read_only),
    ("bdev_lvol_inflate", lvol::inflate),
    ("bdev_lvol_decouple_parent", lvol::decouple_parent),
    ("bdev_lvol_delete", lvol::delete),
    ("nbd_start_export", nbd::nbd_start_export),
    ("nbd_stop_export", nbd::nbd_stop_export),
    ("nbd_get_exports", nbd::nbd_get_exports),
];

/// Runs `method` with `params`.
pub(crate) async fn dispatch(
    context: &RpcContext,
    method: &str,
    params: Option<Value>,
) -> Result<Value, RpcError> {
    match METHODS.iter().find(|(name, _)| *name == method) {
        Some((_, handler)) => {
            let _turn = context.turn().await;
            handler(context, params).await
        }
        None => Err(RpcError::new(codes::METHOD_NOT_FOUND, "Method not found")),
    }
}

/// Decodes `params` into `T` (absent params decode as an empty object).
pub(crate) fn decode<T: DeserializeOwned>(params: Option<Value>) -> Result<T, RpcError> {
    serde_json::from_value(params.unwrap_or_else(|| json!({}))).map_err(RpcError::invalid_params)
}

/// An engine error as SPDK answers an operation's failure: the negative errno and a message.
pub(crate) fn failed(err: &EngineError) -> RpcError {
    RpcError::new(err.errno(), err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_names_are_unique() {
        for (i, (name, _)) in METHODS.iter().enumerate() {
            assert!(
                METHODS.iter().skip(i + 1).all(|(other, _)| other != name),
                "{name} twice"
            );
        }
    }
}
