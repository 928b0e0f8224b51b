//! Goal: the request path (validation, slots, poller completion, buffer hand-back) works on
//! the null bdev, on real reactors and under simulation. Method: many requests at depth,
//! then the -EINVAL cases, then a dropped in-flight request.

use std::sync::Arc;

use spool_bdev::{BdevDesc, DmaBuf, NullBdev};
use spool_reactor::{IdleMode, ReactorId, Runtime, RuntimeOptions, Sim, SimOptions};

fn null_desc() -> BdevDesc {
    BdevDesc::open(Arc::new(NullBdev::new("null0", 4096, 1 << 18).unwrap())).expect("open bdev")
}

#[test]
fn null_requests_complete_and_return_their_buffers() {
    let runtime = Runtime::start(&RuntimeOptions {
        cores: vec![0],
        idle: IdleMode::Sleep,
        pin: false,
    })
    .unwrap();
    let desc = null_desc();
    let completed = runtime
        .block_on(ReactorId(0), move || async move {
            let channel = desc.channel().unwrap();
            let mut buf = DmaBuf::alloc(4096).unwrap();
            let address = buf.as_ptr() as usize;
            let mut completed = 0;
            for index in 0..10_000u64 {
                let (result, back) = channel.read(buf, (index % 1000) * 4096).await;
                result.unwrap();
                assert_eq!(
                    back.as_ptr() as usize,
                    address,
                    "the same buffer comes back"
                );
                buf = back;
                completed += 1;
            }
            let (result, _bufs) = channel
                .writev(
                    vec![DmaBuf::alloc(8192).unwrap(), DmaBuf::alloc(4096).unwrap()],
                    0,
                )
                .await;
            result.unwrap();
            channel.flush().await.unwrap();
            channel.unmap(0, 1 << 20).await.unwrap();
            channel.write_zeroes(4096, 4096).await.unwrap();
            assert_eq!(channel.in_flight(), 0);
            completed
        })
        .unwrap();
    assert_eq!(completed, 10_000);
    assert_eq!(runtime.stop().leaked_channels, 0);
}

#[test]
fn bad_requests_get_einval_and_never_reach_the_device() {
    let mut sim = Sim::new(SimOptions {
        seed: 5,
        reactors: 1,
    });
    let desc = null_desc();
    sim.block_on(ReactorId(0), move || async move {
        let channel = desc.channel().unwrap();
        let size = channel.size_bytes();
        let cases: Vec<(u64, usize)> = vec![
            (1, 4096),
            (512, 4096),
            (0, 1000),
            (size, 4096),
            (size - 4096, 8192),
            (u64::MAX - 4095, 4096),
        ];
        for (offset, len) in cases {
            let (result, buf) = channel.read(DmaBuf::alloc(len).unwrap(), offset).await;
            let err = result.unwrap_err();
            assert_eq!(err.errno(), -libc::EINVAL, "read {len} at {offset}: {err}");
            assert_eq!(buf.len(), len, "the caller's buffer comes back on failure");
            assert_eq!(channel.in_flight(), 0, "nothing reached the device");
        }
        assert_eq!(
            channel.unmap(4096, 0).await.unwrap_err().errno(),
            -libc::EINVAL
        );
        assert_eq!(
            channel.write_zeroes(size, 4096).await.unwrap_err().errno(),
            -libc::EINVAL
        );
    })
    .unwrap();
}

#[test]
fn a_dropped_request_parks_its_buffer_until_completion() {
    let mut sim = Sim::new(SimOptions {
        seed: 9,
        reactors: 1,
    });
    let desc = null_desc();
    sim.block_on(ReactorId(0), move || async move {
        let channel = desc.channel().unwrap();
        let future = channel.read(DmaBuf::alloc(4096).unwrap(), 0);
        assert_eq!(channel.in_flight(), 1);
        drop(future);
        assert_eq!(
            channel.in_flight(),
            1,
            "the slot stays busy until the device completes"
        );
        for _ in 0..1000 {
            if channel.in_flight() == 0 {
                break;
            }
            spool_reactor::sleep(std::time::Duration::from_micros(10)).await;
        }
        assert_eq!(
            channel.in_flight(),
            0,
            "completion released the abandoned slot"
        );
        let (result, _) = channel.read(DmaBuf::alloc(4096).unwrap(), 0).await;
        result.unwrap();
    })
    .unwrap();
}
