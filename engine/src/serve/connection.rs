//! One NBD client on its reactor: the handshake (bounded by a timeout), then the
//! transmission phase as three kinds of task that share the connection's state:
//!
//! - the *reader* (this module's main loop) decodes requests from the socket and starts one
//!   task per request; a WRITE's payload is received straight into the DMA buffer the write
//!   goes to the device from (only bytes that arrived in the same socket read as a header are
//!   copied, out of the small staging buffer);
//! - each *request task* runs its request ([`super::execute`], which knows no socket) and
//!   queues the reply it returns;
//! - the *writer* sends queued replies in completion order, many per `writev`, a READ's data
//!   straight from the DMA buffer the device filled.
//!
//! Bounds: at most [`limits::MAX_REQUESTS_IN_FLIGHT`] requests run at once and at most
//! [`limits::MAX_CONNECTION_BUFFER_BYTES`] of request buffers are held (one request of any
//! allowed size always fits); past either, the reader stops reading the socket until
//! requests finish, so a client that sends faster than it reads replies is slowed, not
//! buffered for.
//!
//! Ending: the client's `NBD_CMD_DISC` or close, a protocol error (logged; the connection
//! closes), or a daemon stop. In every case the requests already started finish and are
//! answered if the socket still takes data (a write is never abandoned halfway), and only
//! then does the socket close. After a stop, new requests get `ESHUTDOWN` (a FLUSH is still
//! served) and the connection closes once idle for the shutdown grace period.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::task::{Poll, Waker};

use spool_bdev::dma::DmaBuf;
use spool_reactor::{sleep, spawn_local};

use super::execute::{self, Executed, Session};
use super::local::ReactorServe;
use super::race::{race, Either};
use crate::nbd::request::{Command, Event, Request, RequestDecoder};
use crate::nbd::{limits, Handshake, Negotiated, Outcome, ReplyEncoder};
use crate::net::{ReadHalf, Stream, WriteHalf};

/// Bytes of the socket read buffer for headers (and payload bytes that come with them).
const STAGING_BYTES: usize = 16 << 10;
/// Replies sent per `writev` at most (two slices each; under the kernel's IOV_MAX of 1024).
const REPLIES_PER_WRITE: usize = 256;

/// A reply waiting for the writer.
struct Reply {
    /// The reply header (or the whole reply, for all but a READ's data).
    head: Vec<u8>,
    /// A READ's data, sent after `head`.
    data: Option<DmaBuf>,
    /// Buffer bytes counted against the connection's bound until this reply is sent.
    held: usize,
}

/// What the reader, the request tasks and the writer of one connection share.
pub(crate) struct Conn {
    /// What its requests run against (state, volume, reply encoder, peer).
    session: Session,
    /// What was negotiated.
    negotiated: Negotiated,
    out: RefCell<VecDeque<Reply>>,
    writer_waker: RefCell<Option<Waker>>,
    room_waker: RefCell<Option<Waker>>,
    idle_waker: RefCell<Option<Waker>>,
    inflight: Cell<usize>,
    held_bytes: Cell<usize>,
    reading_done: Cell<bool>,
    broken: Cell<bool>,
    /// Writes admitted whose payload is still arriving (0 or 1).
    receiving: Cell<usize>,
    requests: Cell<u64>,
    failed: Cell<u64>,
}

fn wake(slot: &RefCell<Option<Waker>>) {
    let waker = slot.borrow_mut().take();
    if let Some(waker) = waker {
        waker.wake();
    }
}

fn park(slot: &RefCell<Option<Waker>>, cx: &std::task::Context<'_>) {
    let mut slot = slot.borrow_mut();
    match slot.as_ref() {
        Some(parked) if parked.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

impl Conn {
    /// Waits until one more request holding `bytes` fits the connection's bounds, then
    /// counts it in.
    async fn admit(&self, bytes: usize) {
        std::future::poll_fn(|cx| {
            let held = self.held_bytes.get();
            let room = self.inflight.get() < limits::MAX_REQUESTS_IN_FLIGHT
                && (held == 0 || held + bytes <= limits::MAX_CONNECTION_BUFFER_BYTES);
            if room {
                self.inflight.set(self.inflight.get() + 1);
                self.held_bytes.set(held + bytes);
                Poll::Ready(())
            } else {
                park(&self.room_waker, cx);
                Poll::Pending
            }
        })
        .await;
    }

    /// Releases `bytes` of held buffers.
    fn release(&self, bytes: usize) {
        self.held_bytes
            .set(self.held_bytes.get().saturating_sub(bytes));
        wake(&self.room_waker);
    }

    /// A request task is done: queues its reply. The request stays counted in flight, and
    /// its reply's bytes held, until the writer has sent the reply (or dropped it because
    /// the socket is gone): a client that does not read its replies stops being read.
    fn complete(&self, mut reply: Reply, failed: bool) {
        self.requests.set(self.requests.get() + 1);
        if failed {
            self.failed.set(self.failed.get() + 1);
        }
        self.held_bytes
            .set(self.held_bytes.get() + reply.head.len());
        reply.held += reply.head.len();
        self.queue(reply);
    }

    /// A reply was sent or dropped: its request is done.
    fn retire(&self, reply: Reply) {
        self.release(reply.held);
        if let Some(buf) = reply.data {
            self.session.state.buffers.give(buf);
        }
        self.inflight.set(self.inflight.get().saturating_sub(1));
        wake(&self.room_waker);
        if self.inflight.get() == self.receiving.get() {
            wake(&self.idle_waker);
        }
    }

    /// Counts out a request that was admitted but never started (its payload did not
    /// arrive), releasing its `bytes`.
    fn abandon(&self, bytes: usize) {
        self.inflight.set(self.inflight.get().saturating_sub(1));
        self.release(bytes);
        if self.inflight.get() == self.receiving.get() {
            wake(&self.idle_waker);
        }
    }

    /// Queues a reply for the writer.
    fn queue(&self, reply: Reply) {
        if self.broken.get() {
            self.retire(reply);
            return;
        }
        self.out.borrow_mut().push_back(reply);
        wake(&self.writer_waker);
    }

    /// Whether the writer has nothing left to do, ever.
    fn finished(&self) -> bool {
        self.reading_done.get() && self.inflight.get() == 0 && self.out.borrow().is_empty()
    }

    /// Waits until no started request is in flight (a write whose payload is still
    /// arriving does not count: it is dropped if the connection ends first).
    async fn idle(&self) {
        std::future::poll_fn(|cx| {
            if self.inflight.get() == self.receiving.get() {
                Poll::Ready(())
            } else {
                park(&self.idle_waker, cx);
                Poll::Pending
            }
        })
        .await;
    }
}

/// Serves one accepted connection on the calling reactor until it ends.
pub(crate) async fn serve_connection(stream: Stream, peer: String, state: Rc<ReactorServe>) {
    struct Counted(std::sync::Arc<super::shared::DaemonShared>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.close();
        }
    }
    let _counted = Counted(std::sync::Arc::clone(&state.shared));
    let (mut reader, mut writer) = stream.split();
    let timeout = state.shared.handshake_timeout;
    let handshaken = race(handshake(&mut reader, &mut writer, &state), sleep(timeout)).await;
    let (volume, negotiated, leftover) = match handshaken {
        Either::Left(Ok(Some(done))) => done,
        Either::Left(Ok(None)) => {
            tracing::info!(%peer, "client ended the handshake (NBD_OPT_ABORT or close)");
            return;
        }
        Either::Left(Err(why)) => {
            tracing::warn!(%peer, "handshake failed, connection closed: {why}");
            return;
        }
        Either::Right(()) => {
            tracing::warn!(%peer, ?timeout, "handshake timed out, connection closed");
            return;
        }
    };
    tracing::info!(
        %peer,
        export = %negotiated.export_name,
        size = negotiated.size_bytes,
        flags = format!("{:#x}", negotiated.transmission_flags),
        structured_replies = negotiated.structured_replies,
        base_allocation = negotiated.base_allocation.is_some(),
        block_size_agreed = negotiated.block_size_constraints_agreed,
        no_zeroes = negotiated.no_zeroes,
        via_go = negotiated.via_go,
        "client connected"
    );
    // Counted as a client of its volume (since the handshake) while it lives.
    let attached = volume;
    let volume = std::sync::Arc::clone(&attached.0);
    let conn = Rc::new(Conn {
        session: Session {
            encoder: ReplyEncoder::new(&negotiated),
            state: Rc::clone(&state),
            volume,
            peer: peer.clone(),
            testing_skip_flushes: false,
        },
        negotiated: negotiated.clone(),
        out: RefCell::new(VecDeque::new()),
        writer_waker: RefCell::new(None),
        room_waker: RefCell::new(None),
        idle_waker: RefCell::new(None),
        inflight: Cell::new(0),
        held_bytes: Cell::new(0),
        reading_done: Cell::new(false),
        broken: Cell::new(false),
        receiving: Cell::new(0),
        requests: Cell::new(0),
        failed: Cell::new(0),
    });
    let writer_task = spawn_local(write_replies(Rc::clone(&conn), writer));
    let grace = state.shared.shutdown_grace;
    let closer = async {
        state.stopped().await;
        // Started requests get some time to finish and be sent (a client that does not
        // read its replies gets no more than that), then the client its grace period.
        if let Either::Right(()) = race(conn.idle(), sleep(grace * 4)).await {
            tracing::warn!(peer = %conn.session.peer, "replies not taken in time after a stop: closing");
            return;
        }
        sleep(grace).await;
    };
    let decoder = RequestDecoder::new(negotiated);
    let ended = match race(read_requests(&conn, &mut reader, decoder, leftover), closer).await {
        Either::Left(Ok(())) => "client disconnected".to_string(),
        Either::Left(Err(why)) => {
            tracing::warn!(%peer, "connection closed: {why}");
            why
        }
        Either::Right(()) => "daemon stopping".to_string(),
    };
    // Requests already started finish (their replies go out if the socket takes them).
    conn.reading_done.set(true);
    if state.is_stopping() {
        // A stop does not wait for a client that does not read: shut the socket down, so
        // the writer fails and drops what is left.
        if let Either::Right(()) = race(conn.idle(), sleep(grace)).await {
            let _ = reader.shutdown();
        }
    }
    wake(&conn.writer_waker);
    let _ = writer_task.await;
    conn.idle().await;
    drop(reader);
    drop(attached);
    tracing::info!(
        %peer,
        export = %conn.negotiated.export_name,
        requests = conn.requests.get(),
        failed = conn.failed.get(),
        "connection closed ({ended})"
    );
}

/// A client counted on its volume; counted out when dropped (also when the handshake is
/// cut short after counting it).
pub(crate) struct Attached(std::sync::Arc<super::volumes::Volume>);

impl Drop for Attached {
    fn drop(&mut self) {
        self.0.detach();
    }
}

/// Runs the handshake; `Ok(Some((export, negotiated, bytes after it)))` to go on,
/// `Ok(None)` when the client aborted or left, `Err` with the reason to log.
async fn handshake(
    reader: &mut ReadHalf,
    writer: &mut WriteHalf,
    state: &Rc<ReactorServe>,
) -> Result<Option<(Attached, Negotiated, Vec<u8>)>, String> {
    let (mut handshake, greeting) = Handshake::new(
        state.exports().infos.clone(),
        state.shared.handshake.clone(),
    )
    .map_err(|err| format!("export configuration: {err}"))?;
    writer
        .write_all(&greeting)
        .await
        .map_err(|err| format!("sending the greeting: {err}"))?;
    let mut buf = vec![0u8; STAGING_BYTES];
    loop {
        let n = if state.is_stopping() {
            // Options now get NBD_REP_ERR_SHUTDOWN; a client that says nothing more is
            // closed after the grace period.
            handshake.begin_shutdown();
            match race(reader.read(&mut buf), sleep(state.shared.shutdown_grace)).await {
                Either::Left(read) => read,
                Either::Right(()) => return Err("the daemon is stopping".into()),
            }
        } else {
            match race(reader.read(&mut buf), state.stopped()).await {
                Either::Left(read) => read,
                Either::Right(()) => continue,
            }
        }
        .map_err(|err| format!("reading: {err}"))?;
        if n == 0 {
            return Ok(None);
        }
        let mut input = &buf[..n];
        while !input.is_empty() {
            // Options see the exports as they are now (management calls change them).
            let exports = state.exports();
            if let Err(err) = handshake.set_exports(exports.infos.clone()) {
                tracing::error!(%err, "the export list cannot be served");
            }
            let step = handshake
                .input(input)
                .map_err(|err| format!("handshake: {err}"))?;
            // Entering transmission: the client is counted on its volume before the server's
            // final answer goes out, and refused if the export is being stopped.
            let mut attached = None;
            if let Some(Outcome::Done { export, .. }) = &step.outcome {
                let volume = exports
                    .volumes
                    .get(*export)
                    .cloned()
                    .ok_or_else(|| format!("export {export} is not in the list"))?;
                if !volume.attach() {
                    return Err(format!(
                        "export {:?} was stopped during the handshake",
                        volume.info.name
                    ));
                }
                attached = Some(Attached(volume));
            }
            if !step.send.is_empty() {
                writer
                    .write_all(&step.send)
                    .await
                    .map_err(|err| format!("sending: {err}"))?;
            }
            input = input.get(step.consumed..).unwrap_or(&[]);
            match step.outcome {
                None => {}
                Some(Outcome::Done { negotiated, .. }) => {
                    let Some(volume) = attached else {
                        return Err("no volume attached".into());
                    };
                    return Ok(Some((volume, negotiated, input.to_vec())));
                }
                Some(Outcome::Aborted) => return Ok(None),
                Some(Outcome::Closed(reason)) => return Err(reason.to_string()),
            }
        }
    }
}

/// Buffer bytes a request holds while it runs.
fn held_by(request: &Request) -> usize {
    match request.command {
        Command::Read | Command::Write => request.length as usize,
        _ => 0,
    }
}

/// Starts a request task: runs the request, then queues its reply for the writer.
fn dispatch(conn: &Rc<Conn>, request: Request, payload: Option<DmaBuf>) {
    let conn = Rc::clone(conn);
    drop(spawn_local(async move {
        let Executed { head, data, failed } =
            execute::execute(&conn.session, request, payload).await;
        // A READ's buffer stays held until the writer has sent it; a WRITE's is free now.
        let held = match (&data, request.command) {
            (Some(_), _) => request.length as usize,
            (None, Command::Read | Command::Write) => {
                conn.release(request.length as usize);
                0
            }
            _ => 0,
        };
        conn.complete(Reply { head, data, held }, failed);
    }));
}

/// A WRITE whose payload is arriving, with the buffer it goes into. Dropped before it is
/// started (the client closed, a protocol error, a stop), it counts itself out.
struct Receiving {
    conn: Rc<Conn>,
    request: Request,
    buf: Option<DmaBuf>,
}

impl Receiving {
    fn buf(&mut self) -> &mut [u8] {
        self.buf.as_deref_mut().unwrap_or_default()
    }

    /// A write admitted by `conn` whose payload goes into `buf`.
    fn new(conn: &Rc<Conn>, request: Request, buf: DmaBuf) -> Receiving {
        conn.receiving.set(conn.receiving.get() + 1);
        Receiving {
            conn: Rc::clone(conn),
            request,
            buf: Some(buf),
        }
    }

    /// The payload is complete: start the write.
    fn start(mut self) {
        let buf = self.buf.take();
        self.conn
            .receiving
            .set(self.conn.receiving.get().saturating_sub(1));
        dispatch(&self.conn, self.request, buf);
    }
}

impl Drop for Receiving {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.conn
                .receiving
                .set(self.conn.receiving.get().saturating_sub(1));
            self.conn.abandon(held_by(&self.request));
            self.conn.session.state.buffers.give(buf);
        }
    }
}

/// The reader: decodes requests until `NBD_CMD_DISC` (`Ok`), the client's close (`Ok`), or a
/// fatal error (`Err` with the reason).
async fn read_requests(
    conn: &Rc<Conn>,
    reader: &mut ReadHalf,
    mut decoder: RequestDecoder,
    leftover: Vec<u8>,
) -> Result<(), String> {
    let mut staging = vec![0u8; STAGING_BYTES.max(leftover.len())];
    staging[..leftover.len()].copy_from_slice(&leftover);
    let mut filled = leftover.len();
    let mut start = 0;
    let mut receiving: Option<Receiving> = None;
    loop {
        while start < filled {
            let decoded = decoder
                .decode(&staging[start..filled])
                .map_err(|err| format!("protocol error: {err}"))?;
            let consumed = start..start + decoded.consumed;
            start += decoded.consumed;
            match decoded.event {
                None => {}
                Some(Event::Request(request)) => {
                    conn.admit(held_by(&request)).await;
                    if request.payload_len() > 0 {
                        let buf = match conn.session.state.buffers.take(request.length as usize) {
                            Ok(buf) => buf,
                            Err(err) => {
                                conn.abandon(held_by(&request));
                                return Err(format!("no buffer for a write: {err}"));
                            }
                        };
                        receiving = Some(Receiving::new(conn, request, buf));
                    } else {
                        dispatch(conn, request, None);
                    }
                }
                Some(Event::Payload {
                    at, len, complete, ..
                }) => {
                    let bytes = &staging[consumed];
                    let Some(write) = receiving.as_mut() else {
                        return Err("payload without a write".into());
                    };
                    let at = at as usize;
                    write.buf()[at..at + len].copy_from_slice(&bytes[bytes.len() - len..]);
                    if complete {
                        if let Some(write) = receiving.take() {
                            write.start();
                        }
                    }
                }
                Some(Event::Rejected(rejection)) => {
                    tracing::warn!(
                        peer = %conn.session.peer,
                        handle = rejection.handle,
                        command = rejection.command,
                        error = rejection.error.name(),
                        "request refused: {}",
                        rejection.reason
                    );
                    conn.admit(0).await;
                    let mut head = Vec::new();
                    conn.session.encoder.reject(&mut head, &rejection);
                    conn.complete(
                        Reply {
                            head,
                            data: None,
                            held: 0,
                        },
                        true,
                    );
                }
                Some(Event::Disconnect) => return Ok(()),
            }
        }
        start = 0;
        filled = 0;
        // The rest of a payload goes straight into its buffer.
        if let (Some(pending), Some(write)) = (decoder.payload_pending(), receiving.as_mut()) {
            if !pending.skip {
                let from = pending.received as usize;
                let to = from + pending.remaining as usize;
                let n = reader
                    .read(&mut write.buf()[from..to])
                    .await
                    .map_err(|err| format!("reading: {err}"))?;
                if n == 0 {
                    return Err(format!(
                        "the client closed in the middle of a write's payload ({} bytes missing)",
                        to - from
                    ));
                }
                let complete = decoder
                    .payload_received(n)
                    .map_err(|err| format!("protocol error: {err}"))?;
                if complete {
                    if let Some(write) = receiving.take() {
                        write.start();
                    }
                }
                continue;
            }
        }
        let n = reader
            .read(&mut staging)
            .await
            .map_err(|err| format!("reading: {err}"))?;
        if n == 0 {
            if receiving.is_some() || decoder.buffered_bytes() > 0 {
                return Err("the client closed in the middle of a request".into());
            }
            return Ok(());
        }
        filled = n;
    }
}

/// The writer: sends queued replies in order until the connection is finished or the socket
/// fails; then shuts the socket down.
async fn write_replies(conn: Rc<Conn>, mut writer: WriteHalf) {
    let mut batch: Vec<Reply> = Vec::with_capacity(REPLIES_PER_WRITE);
    loop {
        let more = std::future::poll_fn(|cx| {
            let mut out = conn.out.borrow_mut();
            if !out.is_empty() {
                let take = out.len().min(REPLIES_PER_WRITE);
                batch.extend(out.drain(..take));
                Poll::Ready(true)
            } else if conn.reading_done.get() && conn.inflight.get() == 0 || conn.broken.get() {
                Poll::Ready(false)
            } else {
                park(&conn.writer_waker, cx);
                Poll::Pending
            }
        })
        .await;
        if !more {
            break;
        }
        let mut slices: Vec<&[u8]> = Vec::with_capacity(batch.len() * 2);
        for reply in &batch {
            slices.push(&reply.head);
            if let Some(data) = &reply.data {
                slices.push(data);
            }
        }
        let sent = writer.write_all_vectored(&slices).await;
        drop(slices);
        for reply in batch.drain(..) {
            conn.retire(reply);
        }
        if let Err(err) = sent {
            if !conn.finished() {
                tracing::warn!(peer = %conn.session.peer, %err, "sending replies failed; replies still to come are dropped");
            }
            conn.broken.set(true);
            let dropped: Vec<Reply> = conn.out.borrow_mut().drain(..).collect();
            for reply in dropped {
                conn.retire(reply);
            }
            break;
        }
    }
    let _ = writer.shutdown();
}
