//! Framework methods: version, method list, reactors, and stopping the daemon.

use serde::Deserialize;
use serde_json::{json, Value};

use super::jsonrpc::RpcError;
use super::methods::{decode, MethodFuture, RpcContext, METHODS};
use crate::signals::{request_stop, StopSignal};

/// `spdk_get_version`: Spool's version in SPDK's shape.
pub(crate) fn spdk_get_version(_: &RpcContext, params: Option<Value>) -> MethodFuture<'_> {
    Box::pin(async move {
        decode::<Empty>(params)?;
        let version = env!("CARGO_PKG_VERSION");
        let mut parts = version.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
        Ok(json!({
            "version": format!("Spool v{version}"),
            "fields": {
                "major": parts.next().unwrap_or(0),
                "minor": parts.next().unwrap_or(0),
                "patch": parts.next().unwrap_or(0),
                "suffix": "",
            }
        }))
    })
}

/// No parameters (any given is an error).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Empty {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[expect(
    dead_code,
    reason = "accepted as SPDK's parameters; they change nothing here"
)]
struct GetMethods {
    #[serde(default)]
    current: bool,
    #[serde(default)]
    include_aliases: bool,
}

/// `rpc_get_methods`: every method name (all run in any state: `current` changes nothing).
pub(crate) fn rpc_get_methods(_: &RpcContext, params: Option<Value>) -> MethodFuture<'_> {
    Box::pin(async move {
        decode::<GetMethods>(params)?;
        Ok(json!(METHODS
            .iter()
            .map(|(name, _)| *name)
            .collect::<Vec<_>>()))
    })
}

/// `framework_get_reactors`: one entry per reactor, with its core.
pub(crate) fn framework_get_reactors(
    context: &RpcContext,
    params: Option<Value>,
) -> MethodFuture<'_> {
    Box::pin(async move {
        decode::<Empty>(params)?;
        let reactors: Vec<Value> = context
            .shared
            .reactors
            .iter()
            .zip(&context.cores)
            .map(|(reactor, core)| {
                json!({
                    "lcore": core,
                    "busy": 0,
                    "idle": 0,
                    "in_interrupt": false,
                    "irq_count": 0,
                    "sys_stat": 0,
                    "usr_stat": 0,
                    "lw_threads": [{
                        "name": format!("reactor_{}", reactor.index()),
                        "id": reactor.index(),
                        "cpumask": format!("{:x}", 1u128 << (core % 128)),
                        "elapsed": 0,
                    }],
                })
            })
            .collect();
        Ok(json!({
            "tick_rate": 1_000_000_000u64,
            "pid": std::process::id(),
            "reactors": reactors,
        }))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Kill {
    sig_name: String,
}

/// `spdk_kill_instance`: SIGTERM or SIGINT stop the daemon cleanly (after this answer);
/// SIGKILL ends it at once (the store is recovered at the next start).
pub(crate) fn spdk_kill_instance(_: &RpcContext, params: Option<Value>) -> MethodFuture<'_> {
    Box::pin(async move {
        let Kill { sig_name } = decode(params)?;
        match sig_name.trim_start_matches("SIG") {
            "TERM" => request_stop(StopSignal::Terminate),
            "INT" => request_stop(StopSignal::Interrupt),
            "KILL" => {
                let _ = signal_hook::low_level::raise(libc::SIGKILL);
            }
            _ => {
                return Err(RpcError::invalid_params(format!(
                    "sig_name {sig_name:?}: SIGTERM, SIGINT or SIGKILL"
                )))
            }
        }
        Ok(json!(true))
    })
}
