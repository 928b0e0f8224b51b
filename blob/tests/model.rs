//! Goal: whatever sequence of operations runs, the store holds exactly what a trivial model
//! says, across unloads, loads and crashes. Method: proptest generates sequences of create,
//! resize, write, xattr set/remove, delete, sync, unload+load and crash+recover; after each
//! reload every blob (size, thinness, xattrs, every byte) and the free-cluster count are
//! compared with the model.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::{buf_of, pattern, read};
use proptest::prelude::*;
use spool_bdev::{Bdev, BdevDesc, MallocBdev};
use spool_blob::{BlobOptions, Blobstore, ExtentForm, InitOptions, LoadOptions};

const CLUSTER: u64 = 64 << 10;
const DEVICE: u64 = 8 << 20;
const UNIT: u64 = 4096;

#[derive(Debug, Clone)]
enum Op {
    Create {
        clusters: u64,
        thin: bool,
        rle: bool,
    },
    Resize {
        pick: usize,
        clusters: u64,
    },
    Write {
        pick: usize,
        unit: u64,
        units: u64,
        seed: u64,
    },
    SetXattr {
        pick: usize,
        key: u8,
        len: usize,
    },
    RemoveXattr {
        pick: usize,
        key: u8,
    },
    Delete {
        pick: usize,
    },
    Reload,
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u64..6, any::<bool>(), any::<bool>()).prop_map(|(clusters, thin, rle)| Op::Create { clusters, thin, rle }),
        2 => (any::<usize>(), 0u64..8).prop_map(|(pick, clusters)| Op::Resize { pick, clusters }),
        5 => (any::<usize>(), 0u64..128, 1u64..40, any::<u64>()).prop_map(|(pick, unit, units, seed)| Op::Write { pick, unit, units, seed }),
        2 => (any::<usize>(), 0u8..6, 0usize..900).prop_map(|(pick, key, len)| Op::SetXattr { pick, key, len }),
        1 => (any::<usize>(), 0u8..6).prop_map(|(pick, key)| Op::RemoveXattr { pick, key }),
        1 => any::<usize>().prop_map(|pick| Op::Delete { pick }),
        1 => Just(Op::Reload),
        1 => Just(Op::Crash),
    ]
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ModelBlob {
    thin: bool,
    xattrs: BTreeMap<String, Vec<u8>>,
    data: Vec<u8>,
}

impl ModelBlob {
    fn clusters(&self) -> u64 {
        self.data.len() as u64 / CLUSTER
    }
}

fn pick(ids: &BTreeMap<u64, ModelBlob>, pick: usize) -> Option<u64> {
    if ids.is_empty() {
        None
    } else {
        ids.keys().nth(pick % ids.len()).copied()
    }
}

async fn check(store: &Blobstore, model: &BTreeMap<u64, ModelBlob>) {
    assert_eq!(store.blob_ids(), model.keys().copied().collect::<Vec<_>>());
    let mut allocated = 0;
    let channel = store.channel().unwrap();
    for (&id, expected) in model {
        let blob = store.open_blob(id).await.unwrap();
        assert_eq!(
            blob.num_clusters(),
            expected.clusters(),
            "blob {id:#x} size"
        );
        assert_eq!(blob.is_thin(), expected.thin);
        let xattrs: BTreeMap<String, Vec<u8>> = blob
            .xattrs()
            .into_iter()
            .map(|(k, v)| (String::from_utf8(k).unwrap(), v))
            .collect();
        assert_eq!(xattrs, expected.xattrs, "blob {id:#x} xattrs");
        if !expected.data.is_empty() {
            let data = read(&channel, &blob.io(), 0, expected.data.len()).await;
            assert!(data == expected.data, "blob {id:#x} data");
        }
        allocated += blob.num_allocated_clusters();
        blob.close().await.unwrap();
    }
    assert_eq!(
        store.free_cluster_count(),
        store.total_data_cluster_count() - allocated
    );
}

async fn run_ops(ops: Vec<Op>) {
    let mut bdev = Arc::new(MallocBdev::new("m", 4096, DEVICE / 4096).unwrap());
    let options = InitOptions {
        cluster_size: CLUSTER,
        ..InitOptions::default()
    };
    let mut store = Blobstore::init(
        BdevDesc::open(Arc::clone(&bdev) as Arc<dyn Bdev>).expect("open bdev"),
        &options,
    )
    .await
    .unwrap();
    let mut model: BTreeMap<u64, ModelBlob> = BTreeMap::new();
    for op in ops {
        match op {
            Op::Create {
                clusters,
                thin,
                rle,
            } => {
                let result = store
                    .create_blob(&BlobOptions {
                        num_clusters: clusters,
                        thin,
                        form: if rle {
                            ExtentForm::Rle
                        } else {
                            ExtentForm::Table
                        },
                        ..BlobOptions::default()
                    })
                    .await;
                match result {
                    Ok(id) => {
                        model.insert(
                            id,
                            ModelBlob {
                                thin,
                                xattrs: BTreeMap::new(),
                                data: vec![0; (clusters * CLUSTER) as usize],
                            },
                        );
                    }
                    Err(err) => assert_eq!(err.errno(), -libc::ENOSPC, "{err}"),
                }
            }
            Op::Resize { pick: p, clusters } => {
                let Some(id) = pick(&model, p) else { continue };
                let blob = store.open_blob(id).await.unwrap();
                match blob.resize(clusters).await {
                    Ok(()) => {
                        let entry = model.get_mut(&id).unwrap();
                        entry.data.resize((clusters * CLUSTER) as usize, 0);
                    }
                    Err(err) => assert_eq!(err.errno(), -libc::ENOSPC, "{err}"),
                }
                blob.close().await.unwrap();
            }
            Op::Write {
                pick: p,
                unit,
                units,
                seed,
            } => {
                let Some(id) = pick(&model, p) else { continue };
                let entry = model.get_mut(&id).unwrap();
                let size_units = entry.data.len() as u64 / UNIT;
                if size_units == 0 {
                    continue;
                }
                let unit = unit % size_units;
                let units = units.min(size_units - unit);
                let data = pattern(seed, (units * UNIT) as usize);
                let blob = store.open_blob(id).await.unwrap();
                let channel = store.channel().unwrap();
                let (result, _) = channel.write(&blob.io(), unit, buf_of(&data)).await;
                match result {
                    Ok(()) => {
                        entry.data[(unit * UNIT) as usize..((unit + units) * UNIT) as usize]
                            .copy_from_slice(&data);
                    }
                    Err(err) => assert_eq!(err.errno(), -libc::ENOSPC, "{err}"),
                }
                blob.close().await.unwrap();
            }
            Op::SetXattr { pick: p, key, len } => {
                let Some(id) = pick(&model, p) else { continue };
                let blob = store.open_blob(id).await.unwrap();
                let value = pattern(u64::from(key) + len as u64, len);
                blob.set_xattr(&format!("key{key}"), &value).unwrap();
                model
                    .get_mut(&id)
                    .unwrap()
                    .xattrs
                    .insert(format!("key{key}"), value);
                blob.close().await.unwrap();
            }
            Op::RemoveXattr { pick: p, key } => {
                let Some(id) = pick(&model, p) else { continue };
                let blob = store.open_blob(id).await.unwrap();
                let existed = model
                    .get_mut(&id)
                    .unwrap()
                    .xattrs
                    .remove(&format!("key{key}"))
                    .is_some();
                let result = blob.remove_xattr(&format!("key{key}"));
                assert_eq!(result.is_ok(), existed);
                blob.close().await.unwrap();
            }
            Op::Delete { pick: p } => {
                let Some(id) = pick(&model, p) else { continue };
                store.delete_blob(id).await.unwrap();
                model.remove(&id);
            }
            Op::Reload => {
                let desc = BdevDesc::open(Arc::clone(&bdev) as Arc<dyn Bdev>).expect("open bdev");
                store.unload().await.unwrap();
                let (loaded, report) = Blobstore::load(desc, &LoadOptions::default())
                    .await
                    .unwrap();
                assert!(!report.recovered);
                store = loaded;
                check(&store, &model).await;
            }
            Op::Crash => {
                let image = bdev.snapshot();
                std::mem::forget(store);
                bdev = Arc::new(MallocBdev::from_image("m", 4096, &image).unwrap());
                let desc = BdevDesc::open(Arc::clone(&bdev) as Arc<dyn Bdev>).expect("open bdev");
                // Recovery runs unless nothing changed since the last clean unload.
                let (loaded, _report) = Blobstore::load(desc, &LoadOptions::default())
                    .await
                    .unwrap();
                store = loaded;
                check(&store, &model).await;
            }
        }
    }
    check(&store, &model).await;
    store.unload().await.unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        let rt = common::runtime();
        let result = rt.block_on(rt.reactors()[0], move || run_ops(ops));
        rt.stop();
        prop_assert!(result.is_ok(), "reactor task failed: {result:?}");
    }
}
