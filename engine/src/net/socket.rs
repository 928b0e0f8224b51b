//! Non-blocking TCP and Unix sockets driven by the calling reactor ([`super::readiness`]):
//! a listener that accepts, and a stream with reads and writes as futures. Dropping a
//! future leaves nothing behind (its waker is replaced by the next one); dropping a socket
//! deregisters it and closes it.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::Token;

use super::readiness::{retry, Direction, Readiness};

/// Where a listener listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address (`127.0.0.1:10809`).
    Tcp(SocketAddr),
    /// A Unix socket path (made with mode 0600).
    Unix(PathBuf),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

enum ListenerKind {
    Tcp(TcpListener),
    /// The listener, its path, and the socket file's identity when bound.
    Unix(UnixListener, PathBuf, Option<(u64, u64)>),
}

/// A listening socket on the calling reactor.
pub struct Listener {
    kind: ListenerKind,
    token: Token,
    readiness: Rc<Readiness>,
}

impl Listener {
    /// Binds `addr` on the calling reactor. A Unix socket path that exists as a socket is
    /// replaced (a stale one from a killed daemon); the new one gets mode 0600.
    pub fn bind(addr: &ListenAddr) -> io::Result<Listener> {
        let readiness = Readiness::current()?;
        let mut kind = match addr {
            ListenAddr::Tcp(addr) => ListenerKind::Tcp(TcpListener::bind(*addr)?),
            ListenAddr::Unix(path) => {
                let listener = bind_unix(path)?;
                ListenerKind::Unix(listener, path.clone(), identity(path))
            }
        };
        let token = match &mut kind {
            ListenerKind::Tcp(listener) => readiness.register(listener)?,
            ListenerKind::Unix(listener, ..) => readiness.register(listener)?,
        };
        Ok(Listener {
            kind,
            token,
            readiness,
        })
    }

    /// The address it listens on (the port the kernel chose for port 0).
    pub fn local_addr(&self) -> io::Result<ListenAddr> {
        match &self.kind {
            ListenerKind::Tcp(listener) => listener.local_addr().map(ListenAddr::Tcp),
            ListenerKind::Unix(_, path, _) => Ok(ListenAddr::Unix(path.clone())),
        }
    }

    /// Waits for the next connection: the stream (on this reactor) and the peer's name for
    /// the log.
    pub async fn accept(&mut self) -> io::Result<(Stream, String)> {
        let accepted = self.accept_unregistered().await?;
        let peer = accepted.peer.clone();
        Ok((accepted.register()?, peer))
    }

    /// Waits for the next connection and returns it not yet tied to a reactor, so it can be
    /// sent to the reactor that will serve it ([`Accepted`] is `Send`).
    pub async fn accept_unregistered(&mut self) -> io::Result<Accepted> {
        let (readiness, token) = (Rc::clone(&self.readiness), self.token);
        match &mut self.kind {
            ListenerKind::Tcp(listener) => {
                let (stream, peer) =
                    retry(&readiness, token, Direction::Read, listener, |l| l.accept()).await?;
                stream.set_nodelay(true)?;
                Ok(Accepted {
                    kind: StreamKind::Tcp(stream),
                    peer: peer.to_string(),
                })
            }
            ListenerKind::Unix(listener, path, _) => {
                let (stream, _) =
                    retry(&readiness, token, Direction::Read, listener, |l| l.accept()).await?;
                Ok(Accepted {
                    kind: StreamKind::Unix(stream),
                    peer: format!("unix:{}", path.display()),
                })
            }
        }
    }
}

/// A connection accepted but not yet registered on a reactor; `Send`, so the accepting
/// reactor can hand it to another one.
pub struct Accepted {
    kind: StreamKind,
    peer: String,
}

impl Accepted {
    /// The peer's name for the log (`ip:port`, or `unix:PATH` of the listening socket).
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Registers the connection on the calling reactor.
    pub fn register(self) -> io::Result<Stream> {
        Stream::new(self.kind)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        match &mut self.kind {
            ListenerKind::Tcp(listener) => self.readiness.deregister(listener, self.token),
            ListenerKind::Unix(listener, path, bound) => {
                self.readiness.deregister(listener, self.token);
                // Only our own socket file: another process may have bound the path since.
                if bound.is_some() && identity(path) == *bound {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }
}

/// The identity of a file (device, inode), to tell ours from a later one at the same path.
fn identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|meta| (meta.dev(), meta.ino()))
}

fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            // A live socket belongs to a running process: never take it over. A stale one
            // (its process is gone: nobody accepts) is replaced.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "{} is a live socket: another process listens on it",
                        path.display()
                    ),
                ));
            }
            std::fs::remove_file(path)?;
        } else {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

enum StreamKind {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for StreamKind {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            StreamKind::Tcp(stream) => stream.read(buf),
            StreamKind::Unix(stream) => stream.read(buf),
        }
    }
}

impl Write for StreamKind {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            StreamKind::Tcp(stream) => stream.write(buf),
            StreamKind::Unix(stream) => stream.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            StreamKind::Tcp(stream) => stream.write_vectored(bufs),
            StreamKind::Unix(stream) => stream.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The socket of a [`Stream`] and of its halves: borrowed only for each non-blocking call,
/// never across an await, so a read half and a write half can wait at the same time.
struct StreamShared {
    kind: RefCell<StreamKind>,
    token: Token,
    readiness: Rc<Readiness>,
}

impl StreamShared {
    async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        retry(
            &self.readiness,
            self.token,
            Direction::Read,
            &mut (),
            |()| self.kind.borrow_mut().read(buf),
        )
        .await
    }

    async fn read_exact(&self, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.read(&mut buf[done..]).await? {
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the peer closed after {done} of {} bytes", buf.len()),
                    ))
                }
                n => done += n,
            }
        }
        Ok(())
    }

    async fn write_all_vectored(&self, bufs: &[&[u8]]) -> io::Result<()> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut done = 0;
        while done < total {
            let slices = remaining(bufs, done);
            let n = retry(
                &self.readiness,
                self.token,
                Direction::Write,
                &mut (),
                |()| self.kind.borrow_mut().write_vectored(&slices),
            )
            .await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the peer stopped taking data",
                ));
            }
            done += n;
        }
        Ok(())
    }

    fn shutdown(&self, how: std::net::Shutdown) -> io::Result<()> {
        match &*self.kind.borrow() {
            StreamKind::Tcp(stream) => stream.shutdown(how),
            StreamKind::Unix(stream) => stream.shutdown(how),
        }
    }
}

impl Drop for StreamShared {
    fn drop(&mut self) {
        match self.kind.get_mut() {
            StreamKind::Tcp(stream) => self.readiness.deregister(stream, self.token),
            StreamKind::Unix(stream) => self.readiness.deregister(stream, self.token),
        }
    }
}

/// A connected, non-blocking stream on the calling reactor.
pub struct Stream {
    shared: Rc<StreamShared>,
}

impl Stream {
    fn new(mut kind: StreamKind) -> io::Result<Stream> {
        let readiness = Readiness::current()?;
        let token = match &mut kind {
            StreamKind::Tcp(stream) => readiness.register(stream)?,
            StreamKind::Unix(stream) => readiness.register(stream)?,
        };
        Ok(Stream {
            shared: Rc::new(StreamShared {
                kind: RefCell::new(kind),
                token,
                readiness,
            }),
        })
    }

    /// Connects to `addr` (for tests and tools; the daemon only accepts).
    pub async fn connect(addr: &ListenAddr) -> io::Result<Stream> {
        let stream = match addr {
            ListenAddr::Tcp(addr) => {
                let std_stream = std::net::TcpStream::connect(addr)?;
                std_stream.set_nonblocking(true)?;
                std_stream.set_nodelay(true)?;
                StreamKind::Tcp(TcpStream::from_std(std_stream))
            }
            ListenAddr::Unix(path) => StreamKind::Unix(UnixStream::connect(path)?),
        };
        Stream::new(stream)
    }

    /// Reads what is there (at least one byte, waiting for it); 0 at the peer's close.
    pub async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.shared.read(buf).await
    }

    /// Fills `buf`; `UnexpectedEof` if the peer closes first.
    pub async fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.shared.read_exact(buf).await
    }

    /// Writes all of `bufs`, in order, with vectored writes.
    pub async fn write_all_vectored(&mut self, bufs: &[&[u8]]) -> io::Result<()> {
        self.shared.write_all_vectored(bufs).await
    }

    /// Writes all of `buf`.
    pub async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.shared.write_all_vectored(&[buf]).await
    }

    /// Splits the stream into a half that reads and a half that writes, which can wait at
    /// the same time (in two tasks of this reactor). The socket closes when both are dropped.
    pub fn split(self) -> (ReadHalf, WriteHalf) {
        (
            ReadHalf {
                shared: Rc::clone(&self.shared),
            },
            WriteHalf {
                shared: self.shared,
            },
        )
    }
}

/// The reading half of a [`Stream::split`].
pub struct ReadHalf {
    shared: Rc<StreamShared>,
}

impl ReadHalf {
    /// Reads what is there (at least one byte, waiting for it); 0 at the peer's close.
    pub async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.shared.read(buf).await
    }

    /// Fills `buf`; `UnexpectedEof` if the peer closes first.
    pub async fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.shared.read_exact(buf).await
    }

    /// Shuts both directions of the socket down now (a write waiting on the other half
    /// fails at once).
    pub fn shutdown(&self) -> io::Result<()> {
        self.shared.shutdown(std::net::Shutdown::Both)
    }
}

/// The writing half of a [`Stream::split`].
pub struct WriteHalf {
    shared: Rc<StreamShared>,
}

impl WriteHalf {
    /// Writes all of `bufs`, in order, with vectored writes.
    pub async fn write_all_vectored(&mut self, bufs: &[&[u8]]) -> io::Result<()> {
        self.shared.write_all_vectored(bufs).await
    }

    /// Writes all of `buf`.
    pub async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.shared.write_all_vectored(&[buf]).await
    }

    /// Shuts both directions of the socket down now (the peer sees the close at once, even
    /// while the read half lives on).
    pub fn shutdown(&self) -> io::Result<()> {
        self.shared.shutdown(std::net::Shutdown::Both)
    }
}

/// The parts of `bufs` after the first `skip` bytes.
fn remaining<'a>(bufs: &[&'a [u8]], mut skip: usize) -> Vec<io::IoSlice<'a>> {
    let mut out = Vec::with_capacity(bufs.len());
    for buf in bufs {
        if skip >= buf.len() {
            skip -= buf.len();
            continue;
        }
        out.push(io::IoSlice::new(&buf[skip..]));
        skip = 0;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_skips_whole_and_partial_buffers() {
        let (a, b) = (&b"abc"[..], &b"defg"[..]);
        let left = remaining(&[a, b], 4);
        assert_eq!(left.len(), 1);
        assert_eq!(&*left[0], b"efg");
        assert_eq!(remaining(&[a, b], 7).len(), 0);
        assert_eq!(remaining(&[a, b], 0).len(), 2);
    }
}
