//! hello_blob, as SPDK's example: init a blobstore on a file, create a blob, write a
//! pattern, read it back, compare, close, unload.
//!
//! Run: `cargo run -p spool-blob --example hello_blob [FILE]` (default: a temporary file).
//! It exits 0 and prints what it did, or exits 1 with the error.

use std::path::PathBuf;
use std::sync::Arc;

use spool_bdev::{BdevDesc, DmaBuf, UringBdev, UringOptions};
use spool_blob::{BlobOptions, Blobstore, InitOptions};
use spool_reactor::{IdleMode, Runtime, RuntimeOptions};

const FILE_BYTES: u64 = 64 << 20;

fn main() {
    if let Err(err) = run() {
        eprintln!("error: {err}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let path = match std::env::args().nth(1) {
        Some(path) => PathBuf::from(path),
        None => std::env::temp_dir().join(format!("hello_blob-{}.img", std::process::id())),
    };
    // The backing file: 64 MiB, created if missing.
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)?;
    if file.metadata()?.len() < FILE_BYTES {
        file.set_len(FILE_BYTES)?;
    }
    drop(file);
    let bdev = UringBdev::open(&path, &UringOptions::default())?;
    let desc = BdevDesc::open(Arc::new(bdev))?;
    let runtime = Runtime::start(&RuntimeOptions {
        cores: vec![0],
        idle: IdleMode::Sleep,
        pin: false,
    })?;
    let reactor = runtime.reactors()[0];
    let outcome = runtime.block_on(reactor, move || async move {
        async move {
            let store = Blobstore::init(desc, &InitOptions::default()).await?;
            println!(
                "initialised a blobstore: {} clusters of {} bytes, io_unit {} bytes",
                store.total_data_cluster_count(),
                store.cluster_size(),
                store.io_unit_size()
            );
            let id = store
                .create_blob(&BlobOptions {
                    num_clusters: 1,
                    ..BlobOptions::default()
                })
                .await?;
            println!("created blob {id:#x}");
            let blob = store.open_blob(id).await?;
            let channel = store.channel()?;
            let unit = store.io_unit_size() as usize;
            let mut write_buf = DmaBuf::alloc(unit)?;
            write_buf.fill(0x5A);
            let (result, write_buf) = channel.write(&blob.io(), 0, write_buf).await;
            result?;
            let (result, read_buf) = channel.read(&blob.io(), 0, DmaBuf::alloc(unit)?).await;
            result?;
            if read_buf[..] != write_buf[..] {
                return Err("read data differs from what was written".into());
            }
            println!("read back the {unit}-byte pattern: it matches");
            drop(channel);
            blob.close().await?;
            store.unload().await?;
            println!("closed the blob and unloaded the store");
            Ok::<(), Box<dyn std::error::Error>>(())
        }
        .await
        .map_err(|err| err.to_string())
    });
    runtime.stop();
    if std::env::args().nth(1).is_none() {
        let _ = std::fs::remove_file(&path);
    }
    outcome?.map_err(|err| err.into())
}
