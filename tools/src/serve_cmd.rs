//! `spool serve`: the daemon's command line. Parses the arguments into the engine's
//! [`ServeOptions`], runs the daemon until SIGINT or SIGTERM, and prints where it listens
//! and what it exports (one line each, on stdout, once clients can connect).

use std::path::{Path, PathBuf};
use std::time::Duration;

use spool_engine::net::ListenAddr;
use spool_engine::serve::{run_until_signal, ServeOptions};
use spool_engine::EngineError;
use spool_reactor::IdleMode;

use crate::cli::{IdleArg, ServeArgs};
use crate::error::ToolError;
use crate::perf::parse_cores;

/// Parses `--listen ADDR:PORT` (an IPv6 address in brackets: `[::1]:10809`).
fn parse_listen(text: &str) -> Result<ListenAddr, ToolError> {
    text.parse().map(ListenAddr::Tcp).map_err(|_| {
        ToolError::Usage(format!(
            "--listen {text:?}: expected ADDRESS:PORT, e.g. 127.0.0.1:10809 or [::1]:10809"
        ))
    })
}

/// Where a socket path points, for comparing two of them: absolute, with its directory
/// resolved (`./s.sock`, `s.sock` and `dir/../s.sock` are one path).
fn socket_key(path: &str) -> PathBuf {
    let path = Path::new(path);
    let absolute = match std::env::current_dir() {
        Ok(cwd) if path.is_relative() => cwd.join(path),
        _ => path.to_path_buf(),
    };
    match (absolute.parent(), absolute.file_name()) {
        (Some(dir), Some(name)) => std::fs::canonicalize(dir)
            .map(|dir| dir.join(name))
            .unwrap_or(absolute),
        _ => absolute,
    }
}

/// Refuses two sockets at one path (exit 2): a `--socket` given twice, or the NBD socket and
/// the JSON-RPC socket (`--rpc`, on by default) sharing a path. Both would bind it; the
/// second would find the first listening and say another process does.
fn refuse_shared_socket_paths(args: &ServeArgs) -> Result<(), ToolError> {
    for (index, socket) in args.socket.iter().enumerate() {
        let key = socket_key(socket);
        if !args.no_rpc && key == socket_key(&args.rpc) {
            return Err(ToolError::Usage(format!(
                "--socket {socket} and --rpc {}: the NBD socket and the JSON-RPC socket cannot share a path; give --rpc another path (or --no-rpc)",
                args.rpc
            )));
        }
        if let Some(other) = args.socket[..index]
            .iter()
            .find(|other| socket_key(other) == key)
        {
            return Err(ToolError::Usage(format!(
                "--socket {other} and --socket {socket}: two NBD sockets cannot share a path; give each its own"
            )));
        }
    }
    Ok(())
}

/// The engine's options for `args`.
pub fn options(args: &ServeArgs) -> Result<ServeOptions, ToolError> {
    refuse_shared_socket_paths(args)?;
    let mut listen = Vec::new();
    for text in &args.listen {
        listen.push(parse_listen(text)?);
    }
    for path in &args.socket {
        listen.push(ListenAddr::Unix(PathBuf::from(path)));
    }
    if listen.is_empty() {
        listen.push(spool_engine::serve::default_listen());
    }
    if !(args.handshake_timeout > 0.0 && args.handshake_timeout <= 3600.0) {
        return Err(ToolError::Usage(format!(
            "--handshake-timeout {}: above 0 and at most 3600 seconds",
            args.handshake_timeout
        )));
    }
    Ok(ServeOptions {
        image: args.image.clone(),
        listen,
        cores: parse_cores(&args.cores)?,
        exports: args.export.clone(),
        max_connections: args.max_connections as usize,
        idle: match args.idle {
            IdleArg::Busy => IdleMode::Busy,
            IdleArg::Sleep => IdleMode::Sleep,
            IdleArg::Adaptive => IdleMode::Adaptive,
            IdleArg::Interrupt => IdleMode::Interrupt,
        },
        pin: !args.no_pin,
        handshake_timeout: Duration::from_secs_f64(args.handshake_timeout),
        rpc: (!args.no_rpc).then(|| PathBuf::from(&args.rpc)),
        ..ServeOptions::default()
    })
}

/// A failure to open or load the store, said as every blobstore command says it: naming
/// IMAGE, and "not a blobstore: no SPDKBLOB signature" for a file without one. Other
/// failures (an address to listen on, a socket) name what they are about already.
fn name_the_store(args: &ServeArgs, err: EngineError) -> ToolError {
    let image = args
        .image
        .clone()
        .unwrap_or_else(|| spool_engine::serve::DEFAULT_IMAGE.to_string());
    let about_the_store = matches!(
        err,
        EngineError::Blob(_) | EngineError::Bdev(_) | EngineError::Step { .. }
    );
    if !about_the_store {
        return err.into();
    }
    // A new store in RAM that could not be made (with its volume) was too small for one.
    if image.starts_with("malloc:") {
        return ToolError::Failed(format!(
            "{image}: too small for a store with a volume ({}): give a larger size, e.g. malloc:64M",
            spool_engine::words::scrub(&err.to_string())
        ));
    }
    crate::blob_cmd::name_image(&image, err.into())
}

/// Runs `spool serve`.
pub fn serve(args: &ServeArgs) -> Result<(), ToolError> {
    let options = options(args)?;
    let summary = run_until_signal(&options, |daemon| {
        let start = daemon.start_info();
        let how = if start.created {
            "created".to_string()
        } else if start.load_report.as_ref().is_some_and(|r| r.recovered) {
            "recovered (it was not unloaded cleanly)".to_string()
        } else {
            "loaded".to_string()
        };
        println!("spool serve: store {} {how}", start.image);
        for export in daemon.exports() {
            println!(
                "spool serve: export {} (blob {:#x}, {} bytes{}{})",
                export.name,
                export.blob_id,
                export.size_bytes,
                if export.thin { ", thin" } else { "" },
                if export.read_only { ", read-only" } else { "" },
            );
        }
        for addr in daemon.listening() {
            let url = match addr {
                ListenAddr::Tcp(addr) => format!("nbd://{addr}/"),
                ListenAddr::Unix(path) => format!("nbd+unix:///?socket={}", path.display()),
            };
            println!("spool serve: listening on {addr} ({url})");
        }
        if let Some(path) = daemon.rpc_socket() {
            println!("spool serve: JSON-RPC on {}", path.display());
        }
        println!("spool serve: ready (Ctrl-C or SIGTERM stops it cleanly)");
    })
    .map_err(|err| name_the_store(args, err))?;
    println!(
        "spool serve: stopped cleanly after {} connection(s){}",
        summary.connections,
        if summary.refused > 0 {
            format!(", {} refused", summary.refused)
        } else {
            String::new()
        }
    );
    Ok(())
}
