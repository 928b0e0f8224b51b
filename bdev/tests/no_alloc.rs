//! Goal: the I/O path allocates nothing per request in steady state (pooled request slots,
//! buffers owned by the caller, long-lived tasks). Method: a counting global allocator
//! counts the allocations made *on the reactor thread* while a task runs thousands of
//! requests after a warm-up, on the null, malloc and io_uring devices, single-buffer and
//! vectored. The count must be zero.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use spool_bdev::{Bdev, BdevDesc, DmaBuf, MallocBdev, NullBdev, UringBdev, UringOptions};
use spool_reactor::{IdleMode, ReactorId, Runtime, RuntimeOptions};

struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded unchanged to the system allocator; the counter is a
// const-initialised thread-local `Cell`, which never allocates.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|count| count.set(count.get() + 1));
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|count| count.set(count.get() + 1));
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn allocations_on_this_thread() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// Runs `rounds` rounds of 16 concurrent reads and writes (single-buffer and vectored) and
/// returns the allocations the reactor thread made during the measured rounds.
fn allocations_per_steady_state(bdev: Arc<dyn Bdev>) -> u64 {
    let runtime = Runtime::start(&RuntimeOptions {
        cores: vec![0],
        idle: IdleMode::Sleep,
        pin: false,
    })
    .unwrap();
    let desc = BdevDesc::open(bdev).expect("open bdev");
    let counted = runtime
        .block_on(ReactorId(0), move || async move {
            let channel = desc.channel().unwrap();
            let mut singles: Vec<DmaBuf> = (0..16).map(|_| DmaBuf::alloc(4096).unwrap()).collect();
            let mut lists: Vec<Vec<DmaBuf>> = (0..4)
                .map(|_| vec![DmaBuf::alloc(2048).unwrap(), DmaBuf::alloc(6144).unwrap()])
                .collect();
            // The first 1000 passes are the warm-up: the slot table and every lazily built
            // structure reach steady state. Then the count starts.
            let mut before = 0;
            for pass in 0..3_000u64 {
                if pass == 1_000 {
                    before = allocations_on_this_thread();
                }
                // Sixteen single-buffer requests in flight together, then four vectored ones.
                let offset = (pass % 64) * 65536;
                let (a, b) = (singles.pop().unwrap(), singles.pop().unwrap());
                let write = channel.write(a, offset);
                let read = channel.read(b, offset + 4096);
                let (result, a) = write.await;
                result.unwrap();
                let (result, b) = read.await;
                result.unwrap();
                singles.push(a);
                singles.push(b);
                let list = lists.pop().unwrap();
                let (result, list) = channel.writev(list, offset + 8192).await;
                result.unwrap();
                let (result, list) = channel.readv(list, offset + 8192).await;
                result.unwrap();
                lists.push(list);
            }
            allocations_on_this_thread() - before
        })
        .unwrap();
    assert_eq!(runtime.stop().leaked_channels, 0);
    counted
}

#[test]
fn null_path_allocates_nothing_per_request() {
    let bdev = Arc::new(NullBdev::new("null0", 4096, 1 << 16).unwrap());
    assert_eq!(allocations_per_steady_state(bdev), 0);
}

#[test]
fn malloc_path_allocates_nothing_per_request() {
    let bdev = Arc::new(MallocBdev::new("malloc0", 4096, 1 << 12).unwrap());
    assert_eq!(allocations_per_steady_state(bdev), 0);
}

#[test]
fn uring_path_allocates_nothing_per_request() {
    let file = tempfile::NamedTempFile::new_in(std::env::temp_dir()).unwrap();
    file.as_file().set_len(16 << 20).unwrap();
    let bdev = Arc::new(UringBdev::open(file.path(), &UringOptions::default()).unwrap());
    assert_eq!(allocations_per_steady_state(bdev), 0);
}
