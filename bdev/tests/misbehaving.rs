//! Goal: a backend written in safe code outside the crate, wrapping the io_uring bdev and
//! misbehaving in every way the public API allows, gets an error for its requests and never
//! makes the kernel touch memory a live request does not own (issue 15). What it can no longer
//! do at all (change a request's length or buffers, complete a slot, forge or duplicate a
//! submission) is shown by the `compile_fail` examples in `spool_bdev::io`.
//!
//! Method: a wrapper `Bdev` whose channel does one wrong thing per mode, on a real reactor and
//! a temp file, next to a well-behaved channel of the same reactor whose data is checked byte
//! for byte.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use spool_bdev::{
    Bdev, BdevDesc, BdevError, ChannelBackend, DmaBuf, IoSlots, Submission, UringBdev, UringOptions,
};
use spool_reactor::{IdleMode, PollStatus, ReactorId, Runtime, RuntimeOptions};

/// What the wrapper's channel does with each submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Forwards it (the control).
    Forward,
    /// Drops it.
    Drop,
    /// Completes it with success without starting it.
    CompleteOk,
    /// Forwards it to an inner channel created with another channel's request table (the
    /// first table this wrapper ever saw on the reactor).
    ForeignTable,
}

thread_local! {
    /// The first request table the wrapper was handed on this reactor.
    static FIRST_TABLE: RefCell<Option<Rc<IoSlots>>> = const { RefCell::new(None) };
}

struct Wrapper {
    name: String,
    inner: Arc<UringBdev>,
    mode: Mode,
}

impl Bdev for Wrapper {
    fn name(&self) -> &str {
        &self.name
    }

    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }

    fn block_count(&self) -> u64 {
        self.inner.block_count()
    }

    fn iov_len_align(&self) -> u32 {
        self.inner.iov_len_align()
    }

    fn create_channel(&self, slots: Rc<IoSlots>) -> Result<Box<dyn ChannelBackend>, BdevError> {
        let first =
            FIRST_TABLE.with(|first| Rc::clone(first.borrow_mut().get_or_insert(slots.clone())));
        let table = if self.mode == Mode::ForeignTable {
            first
        } else {
            slots
        };
        Ok(Box::new(WrapperChannel {
            inner: self.inner.create_channel(table)?,
            mode: self.mode,
        }))
    }
}

struct WrapperChannel {
    inner: Box<dyn ChannelBackend>,
    mode: Mode,
}

impl ChannelBackend for WrapperChannel {
    fn submit(&mut self, io: Submission<'_>) {
        match self.mode {
            Mode::Forward | Mode::ForeignTable => self.inner.submit(io),
            Mode::Drop => drop(io),
            Mode::CompleteOk => io.complete(0),
        }
    }

    fn poll(&mut self) -> PollStatus {
        self.inner.poll()
    }
}

fn runtime() -> Runtime {
    Runtime::start(&RuntimeOptions {
        cores: vec![0],
        idle: IdleMode::Sleep,
        pin: false,
    })
    .expect("runtime")
}

fn filled(len: usize, byte: u8) -> DmaBuf {
    let mut buf = DmaBuf::alloc(len).expect("alloc");
    buf.fill(byte);
    buf
}

fn errno_of(result: Result<(), BdevError>) -> Option<i32> {
    result.err().map(|err| err.errno())
}

#[test]
fn a_misbehaving_wrapper_gets_errors_and_never_a_stray_kernel_write() {
    let rt = runtime();
    let file = tempfile::NamedTempFile::new_in(std::env::temp_dir()).expect("tempfile");
    file.as_file().set_len(1 << 20).expect("set_len");
    let inner = Arc::new(UringBdev::open(file.path(), &UringOptions::default()).expect("open"));
    let wrap = |mode: Mode| -> BdevDesc {
        BdevDesc::open(Arc::new(Wrapper {
            name: format!("wrapper-{mode:?}"),
            inner: Arc::clone(&inner),
            mode,
        }))
        .expect("open bdev")
    };
    // The first channel made on the reactor is the control's: its table is the "foreign" one.
    let (control, dropping, faking, foreign) = (
        wrap(Mode::Forward),
        wrap(Mode::Drop),
        wrap(Mode::CompleteOk),
        wrap(Mode::ForeignTable),
    );
    rt.block_on(ReactorId(0), move || async move {
        let control = control.channel().expect("control channel");
        let (r, _) = control.write(filled(4096, 0x11), 0).await;
        r.expect("control write");

        let dropping = dropping.channel().expect("channel");
        let (r, buf) = dropping.read(filled(4096, 0x22), 0).await;
        assert_eq!(
            errno_of(r),
            Some(-libc::ECANCELED),
            "a dropped request is cancelled"
        );
        assert!(buf.iter().all(|&b| b == 0x22), "and its buffer untouched");

        let faking = faking.channel().expect("channel");
        let (r, buf) = faking.read(filled(4096, 0x33), 0).await;
        assert!(r.is_ok(), "completing without starting is allowed");
        assert!(
            buf.iter().all(|&b| b == 0x33),
            "the kernel never saw the buffer"
        );

        // A control write is in flight in slot 0 of the control's table while the foreign
        // wrapper forwards its own requests to a uring channel of that table: each must fail
        // with -EINVAL, never start (or complete) the control's request.
        let foreign = foreign.channel().expect("channel");
        let in_flight = control.write(filled(4096, 0x44), 4096);
        let (r, buf) = foreign.read(filled(4096, 0x55), 0).await;
        assert_eq!(
            errno_of(r),
            Some(-libc::EINVAL),
            "a foreign submission fails"
        );
        assert!(buf.iter().all(|&b| b == 0x55), "and its buffer untouched");
        let (r, _) = foreign.write(filled(4096, 0x66), 8192).await;
        assert_eq!(errno_of(r), Some(-libc::EINVAL));
        let (r, buf) = in_flight.await;
        r.expect("the control's write completes normally");
        assert!(buf.iter().all(|&b| b == 0x44));

        let (r, buf) = control
            .read(DmaBuf::alloc_zeroed(12288).expect("alloc"), 0)
            .await;
        r.expect("control read");
        assert!(buf[..4096].iter().all(|&b| b == 0x11));
        assert!(buf[4096..8192].iter().all(|&b| b == 0x44));
        assert!(
            buf[8192..].iter().all(|&b| b == 0),
            "the foreign write never reached the file"
        );
        assert_eq!(control.in_flight(), 0);
    })
    .expect("reactor");
}
