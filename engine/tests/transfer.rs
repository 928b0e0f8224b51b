//! Goal: the engine's import and export copy files into blobs and back byte for byte, with a
//! partial last io_unit read-modify-written, progress reported up to the total, and refused
//! ranges refused before anything is written or created. Method: a store on a file image,
//! run offline, files from a seeded generator.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use spool_blob::{BlobOptions, InitOptions, LoadOptions};
use spool_engine::transfer::{self, ExportSink, ImportSource, Progress};
use spool_engine::{prepare_file, run_offline, EngineError, StoreOpen};

fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(..)).collect()
}

/// An image with a store holding one 4-cluster blob; returns the image and the blob's id.
fn store(dir: &Path) -> (PathBuf, u64) {
    let image = dir.join("store.img");
    prepare_file(&image, 32 << 20, |_| {}).unwrap();
    let id = run_offline(
        &image,
        StoreOpen::Init(InitOptions::default()),
        |store, _| async move {
            store
                .create_blob(&BlobOptions {
                    num_clusters: 4,
                    ..BlobOptions::default()
                })
                .await
                .map_err(EngineError::from)
        },
    )
    .unwrap();
    (image, id)
}

fn import(image: &Path, id: u64, file: &Path, offset: u64) -> Result<Vec<Progress>, EngineError> {
    let source = ImportSource::open(file)?;
    run_offline(
        image,
        StoreOpen::Load(LoadOptions::default()),
        move |store, _| async move {
            let blob = store.open_blob(id).await?;
            let mut seen = Vec::new();
            let result =
                transfer::import(&store, &blob, &source, offset, &mut |p| seen.push(p)).await;
            blob.close().await?;
            result.map(|()| seen)
        },
    )
}

fn export(
    image: &Path,
    id: u64,
    offset: u64,
    length: Option<u64>,
    sink: ExportSink,
) -> Result<Vec<Progress>, EngineError> {
    run_offline(
        image,
        StoreOpen::Load(LoadOptions::default()),
        move |store, _| async move {
            let blob = store.open_blob(id).await?;
            let mut seen = Vec::new();
            let result =
                transfer::export(&store, &blob, offset, length, sink, &mut |p| seen.push(p)).await;
            blob.close().await?;
            result.map(|()| seen)
        },
    )
}

#[test]
fn import_then_export_round_trips_with_a_partial_last_io_unit() {
    let dir = tempfile::tempdir().unwrap();
    let (image, id) = store(dir.path());
    let under = dir.path().join("under.bin");
    std::fs::write(&under, bytes(1, 3 << 20)).unwrap();
    import(&image, id, &under, 0).unwrap();
    // 1.5 MiB + 100 bytes at 4 KiB: two chunks, the last io_unit only partly from the file.
    let len = (3 << 19) + 100;
    let over = dir.path().join("over.bin");
    let over_bytes = bytes(2, len);
    std::fs::write(&over, &over_bytes).unwrap();
    let seen = import(&image, id, &over, 4096).unwrap();
    assert_eq!(seen.first().map(|p| p.done), Some(0));
    assert_eq!(
        seen.last(),
        Some(&Progress {
            done: len as u64,
            total: len as u64
        })
    );
    let out = dir.path().join("out.bin");
    let seen = export(&image, id, 0, Some(3 << 20), ExportSink::File(out.clone())).unwrap();
    assert_eq!(
        seen.last().map(|p| (p.done, p.total)),
        Some((3 << 20, 3 << 20))
    );
    let mut expected = bytes(1, 3 << 20);
    expected[4096..4096 + len].copy_from_slice(&over_bytes);
    let got = std::fs::read(&out).unwrap();
    assert!(
        got == expected,
        "the blob holds the second file over the first"
    );
}

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_stream_gets_exactly_the_bytes_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let (image, id) = store(dir.path());
    let file = dir.path().join("in.bin");
    let data = bytes(3, 2 << 20);
    std::fs::write(&file, &data).unwrap();
    import(&image, id, &file, 0).unwrap();
    let shared = Shared::default();
    let sink = ExportSink::Stream {
        writer: Box::new(shared.clone()),
        name: "test stream".into(),
    };
    export(&image, id, 8192, Some(1_000_001), sink).unwrap();
    let got = shared.0.lock().unwrap().clone();
    assert!(
        got == data[8192..8192 + 1_000_001],
        "the bytes of the range"
    );
}

#[test]
fn refused_ranges_write_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (image, id) = store(dir.path());
    let file = dir.path().join("in.bin");
    std::fs::write(&file, bytes(4, 4096)).unwrap();
    let err = import(&image, id, &file, 100).unwrap_err();
    assert!(matches!(err, EngineError::InvalidArgument(_)), "{err:?}");
    assert!(err.to_string().contains("io_unit"), "{err}");
    let err = import(&image, id, &file, 4 << 20).unwrap_err();
    assert!(err.to_string().contains("past the end"), "{err}");
    let out = dir.path().join("out.bin");
    let err = export(
        &image,
        id,
        0,
        Some((4 << 20) + 1),
        ExportSink::File(out.clone()),
    )
    .unwrap_err();
    assert!(matches!(err, EngineError::InvalidArgument(_)), "{err:?}");
    assert!(!out.exists(), "no file for a refused export");
    let err = ImportSource::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("not a regular file"), "{err}");
    let err = ImportSource::open(&dir.path().join("missing")).unwrap_err();
    assert_eq!(err.errno(), -libc::ENOENT);
}
