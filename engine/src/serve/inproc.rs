//! The daemon's NBD front end with no socket, for the deterministic simulation
//! (`spool-fuzz sim`): a connection is fed the client's bytes and returns the server's. The
//! same pieces as the daemon's connection run underneath: [`Handshake`], the
//! [`RequestDecoder`], the request execution (`execute`, on the calling reactor's blob
//! channel) and the [`ReplyEncoder`]. Only the socket I/O and the connection's flow control
//! (`connection`) are left out.
//!
//! The requests decoded from one call to [`Connection::input`] run at once, each as a task on
//! the calling reactor (as the daemon runs them), and their replies come back in completion
//! order.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use spool_bdev::dma::DmaBuf;
use spool_blob::{Blob, Blobstore};

use super::execute::{self, Executed, Session};
use super::local::ReactorServe;
use super::shared::DaemonShared;
use super::volumes::{volume_of, ExportSet, Volume};
use crate::nbd::request::{Event, Request, RequestDecoder};
use crate::nbd::{Handshake, HandshakeOptions, Outcome, ReplyEncoder};

/// One volume to export: made on the store's metadata reactor, served on any reactor.
pub struct Export {
    volume: Arc<Volume>,
}

impl Export {
    /// Exports open `blob` of `store` under `name`, as the daemon would (read-only for a
    /// snapshot). Call on the store's metadata reactor.
    pub fn new(store: &Blobstore, blob: &Blob, name: &str) -> Export {
        Export {
            volume: Arc::new(volume_of(store, blob, name.to_string())),
        }
    }
}

/// A server of one export on the calling reactor: its own reactor state (blob channel,
/// buffer cache), not the daemon's thread-local one.
pub struct Server {
    state: Rc<ReactorServe>,
    volume: Arc<Volume>,
}

impl Server {
    /// A server of `export` on the calling reactor.
    pub fn new(export: Export) -> Server {
        let shared = Arc::new(DaemonShared::new(
            Vec::new(),
            1,
            Duration::from_secs(crate::nbd::limits::HANDSHAKE_TIMEOUT_SECS),
            Duration::from_secs(1),
            HandshakeOptions::default(),
        ));
        let exports = Arc::new(ExportSet::of(vec![Arc::clone(&export.volume)]));
        Server {
            state: ReactorServe::new(exports, shared),
            volume: export.volume,
        }
    }

    /// A new connection and the server's greeting, its first bytes to the client.
    pub fn connect(&self) -> Result<(Connection, Vec<u8>), String> {
        let (handshake, greeting) = Handshake::new(
            self.state.exports().infos.clone(),
            self.state.shared.handshake.clone(),
        )
        .map_err(|err| format!("export configuration: {err}"))?;
        let connection = Connection {
            state: Rc::clone(&self.state),
            volume: Arc::clone(&self.volume),
            phase: Phase::Handshake(Box::new(handshake)),
            testing_skip_flushes: false,
        };
        Ok((connection, greeting))
    }
}

enum Phase {
    Handshake(Box<Handshake>),
    Transmission {
        session: Rc<Session>,
        decoder: RequestDecoder,
        /// A WRITE whose payload is arriving, with its buffer.
        receiving: Option<(Request, DmaBuf)>,
    },
    /// Ended: the client aborted or disconnected.
    Closed,
}

/// One client's connection.
pub struct Connection {
    state: Rc<ReactorServe>,
    volume: Arc<Volume>,
    phase: Phase,
    testing_skip_flushes: bool,
}

impl Connection {
    /// Plants a bug for the simulation's self-test: FLUSH and FUA are acknowledged without
    /// a device flush. Set before the handshake ends.
    pub fn testing_skip_flushes(&mut self, skip: bool) {
        self.testing_skip_flushes = skip;
    }

    /// Whether the connection has ended (`NBD_OPT_ABORT` or `NBD_CMD_DISC`).
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// Takes the client's `bytes` and returns the server's answer: option replies, and the
    /// replies of every request these bytes complete (each run to its end). `Err` with the
    /// reason on a protocol error (the daemon would close the connection).
    pub async fn input(&mut self, mut bytes: &[u8]) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        if let Phase::Handshake(handshake) = &mut self.phase {
            while !bytes.is_empty() {
                let step = handshake
                    .input(bytes)
                    .map_err(|err| format!("handshake: {err}"))?;
                out.extend_from_slice(&step.send);
                bytes = bytes.get(step.consumed..).unwrap_or(&[]);
                match step.outcome {
                    None => {}
                    Some(Outcome::Done { negotiated, .. }) => {
                        let session = Session {
                            state: Rc::clone(&self.state),
                            volume: Arc::clone(&self.volume),
                            encoder: ReplyEncoder::new(&negotiated),
                            peer: "sim".into(),
                            testing_skip_flushes: self.testing_skip_flushes,
                        };
                        self.phase = Phase::Transmission {
                            session: Rc::new(session),
                            decoder: RequestDecoder::new(negotiated),
                            receiving: None,
                        };
                        break;
                    }
                    Some(Outcome::Aborted) => {
                        self.phase = Phase::Closed;
                        return Ok(out);
                    }
                    Some(Outcome::Closed(reason)) => return Err(reason.to_string()),
                }
            }
        }
        let Phase::Transmission {
            session,
            decoder,
            receiving,
        } = &mut self.phase
        else {
            return if bytes.is_empty() {
                Ok(out)
            } else {
                Err("input after the connection ended".into())
            };
        };
        let replies = Rc::new(RefCell::new(out));
        let mut tasks = Vec::new();
        let start = |session: &Rc<Session>, request: Request, payload: Option<DmaBuf>| {
            let session = Rc::clone(session);
            let replies = Rc::clone(&replies);
            spool_reactor::spawn_local(async move {
                let Executed { head, data, .. } =
                    execute::execute(&session, request, payload).await;
                let mut out = replies.borrow_mut();
                out.extend_from_slice(&head);
                if let Some(data) = data {
                    out.extend_from_slice(&data);
                    session.state.buffers.give(data);
                }
            })
        };
        let mut disconnected = false;
        while !bytes.is_empty() {
            let decoded = decoder
                .decode(bytes)
                .map_err(|err| format!("protocol error: {err}"))?;
            let consumed = &bytes[..decoded.consumed];
            bytes = &bytes[decoded.consumed..];
            match decoded.event {
                None => {}
                Some(Event::Request(request)) if request.payload_len() > 0 => {
                    let buf = session
                        .state
                        .buffers
                        .take(request.length as usize)
                        .map_err(|err| format!("no buffer for a write: {err}"))?;
                    *receiving = Some((request, buf));
                }
                Some(Event::Request(request)) => tasks.push(start(session, request, None)),
                Some(Event::Payload {
                    at, len, complete, ..
                }) => {
                    let Some((_, buf)) = receiving.as_mut() else {
                        return Err("payload without a write".into());
                    };
                    let at = at as usize;
                    buf[at..at + len].copy_from_slice(&consumed[consumed.len() - len..]);
                    if complete {
                        if let Some((request, buf)) = receiving.take() {
                            tasks.push(start(session, request, Some(buf)));
                        }
                    }
                }
                Some(Event::Rejected(rejection)) => {
                    session
                        .encoder
                        .reject(&mut replies.borrow_mut(), &rejection);
                }
                Some(Event::Disconnect) => disconnected = true,
            }
        }
        for task in tasks {
            task.await.map_err(|err| format!("request task: {err}"))?;
        }
        if disconnected {
            self.phase = Phase::Closed;
        }
        let out = std::mem::take(&mut *replies.borrow_mut());
        Ok(out)
    }
}
