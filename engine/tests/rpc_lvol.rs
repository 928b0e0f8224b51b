//! Goal: SPDK's `bdev_lvol_*` calls manage the daemon's lvol store while volumes are
//! served: results in SPDK's shapes, SPDK's error codes for bad names and unknown stores,
//! snapshots that are point-in-time images of a volume being written, clones that can be
//! exported and written on their own, resizes and read-only flags that new clients see,
//! exported volumes that cannot be deleted, and a store that can be deleted and made again.
//!
//! Method: a daemon on a RAM store (created as the embedded default is: lvol store `lvs0`
//! with thin lvol `vol0`), driven by the engine's RPC client and the NBD test client.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use spool_engine::net::ListenAddr;
use spool_engine::rpc::client::call;
use spool_engine::serve::{Daemon, ServeOptions};
use spool_reactor::IdleMode;
use support::nbd_client::{pattern, Ask, Client};

const MIB: u64 = 1 << 20;

fn start(dir: &Path) -> (Daemon, PathBuf) {
    let socket = dir.join("rpc.sock");
    let daemon = Daemon::start(&ServeOptions {
        image: Some("malloc:128M".into()),
        listen: vec![ListenAddr::Tcp("127.0.0.1:0".parse().unwrap())],
        idle: IdleMode::Sleep,
        pin: false,
        shutdown_grace: Duration::from_millis(100),
        rpc: Some(socket.clone()),
        ..ServeOptions::default()
    })
    .unwrap();
    (daemon, socket)
}

fn rpc(socket: &Path, method: &str, params: Value) -> Result<Value, (i32, String)> {
    let params = (!params.is_null()).then_some(params);
    call(socket, method, params, Duration::from_secs(30))
        .expect("the daemon answers")
        .map_err(|err| (err.code, err.message))
}

fn code(result: Result<Value, (i32, String)>) -> i32 {
    result.expect_err("an error").0
}

fn lvol<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("{name} in {list}"))
}

#[test]
fn lvol_stores_and_lvols_are_managed_with_spdks_calls() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, socket) = start(dir.path());
    let stores = rpc(&socket, "bdev_lvol_get_lvstores", Value::Null).unwrap();
    assert_eq!(stores[0]["name"], "lvs0");
    assert_eq!(stores[0]["cluster_size"], MIB);
    let lvs_uuid = stores[0]["uuid"].as_str().unwrap().to_string();
    assert_eq!(lvs_uuid.len(), 36);
    let free_before = stores[0]["free_clusters"].as_u64().unwrap();
    // Create: by store name or uuid; the answer is the lvol's bdev name (its uuid).
    let lv1 = rpc(
        &socket,
        "bdev_lvol_create",
        json!({"lvol_name": "lv1", "size_in_mib": 8, "lvs_name": "lvs0"}),
    )
    .unwrap();
    assert_eq!(lv1.as_str().unwrap().len(), 36);
    let thin = rpc(
        &socket,
        "bdev_lvol_create",
        json!({"lvol_name": "thin1", "size_in_mib": 16, "thin_provision": true, "uuid": lvs_uuid}),
    )
    .unwrap();
    let lvols = rpc(&socket, "bdev_lvol_get_lvols", json!({"lvs_name": "lvs0"})).unwrap();
    assert_eq!(lvol(&lvols, "lv1")["alias"], "lvs0/lv1");
    assert_eq!(lvol(&lvols, "lv1")["uuid"], lv1);
    assert_eq!(lvol(&lvols, "lv1")["is_thin_provisioned"], false);
    assert_eq!(lvol(&lvols, "thin1")["is_thin_provisioned"], true);
    assert_eq!(lvol(&lvols, "thin1")["uuid"], thin);
    let stores = rpc(&socket, "bdev_lvol_get_lvstores", json!({"uuid": lvs_uuid})).unwrap();
    assert_eq!(
        stores[0]["free_clusters"].as_u64().unwrap(),
        free_before - 8,
        "thick lv1 took 8"
    );
    // Bad input: a taken name, a name too long, an unknown store, missing parameters.
    let taken = json!({"lvol_name": "lv1", "size_in_mib": 1, "lvs_name": "lvs0"});
    assert_eq!(code(rpc(&socket, "bdev_lvol_create", taken)), -libc::EEXIST);
    let long = json!({"lvol_name": "x".repeat(64), "size_in_mib": 1, "lvs_name": "lvs0"});
    assert_eq!(code(rpc(&socket, "bdev_lvol_create", long)), -libc::EINVAL);
    let nowhere = json!({"lvol_name": "y", "size_in_mib": 1, "lvs_name": "nope"});
    assert_eq!(
        code(rpc(&socket, "bdev_lvol_create", nowhere)),
        -libc::ENODEV
    );
    assert_eq!(
        code(rpc(
            &socket,
            "bdev_lvol_create",
            json!({"lvol_name": "y", "size_in_mib": 1})
        )),
        -32602
    );
    assert_eq!(
        code(rpc(
            &socket,
            "bdev_lvol_create",
            json!({"lvol_name": "y", "size_in_mib": "big", "lvs_name": "lvs0"})
        )),
        -32602
    );
    assert_eq!(
        code(rpc(
            &socket,
            "bdev_lvol_resize",
            json!({"name": "lvs0/none", "size_in_mib": 2})
        )),
        -libc::ENODEV
    );
    // Resize and rename, seen by bdev_get_bdevs under the new alias.
    rpc(
        &socket,
        "bdev_lvol_resize",
        json!({"name": "lvs0/lv1", "size_in_mib": 12}),
    )
    .unwrap();
    rpc(
        &socket,
        "bdev_lvol_rename",
        json!({"old_name": "lvs0/lv1", "new_name": "lv2"}),
    )
    .unwrap();
    let bdev = rpc(&socket, "bdev_get_bdevs", json!({"name": "lvs0/lv2"})).unwrap();
    assert_eq!(bdev[0]["num_blocks"], 12 * MIB / 4096);
    assert_eq!(bdev[0]["name"], lv1);
    assert_eq!(bdev[0]["aliases"], json!(["lvs0/lv2"]));
    // The store renamed; deleting it is refused while anything is exported.
    rpc(
        &socket,
        "bdev_lvol_rename_lvstore",
        json!({"old_name": "lvs0", "new_name": "pool"}),
    )
    .unwrap();
    assert_eq!(
        code(rpc(
            &socket,
            "bdev_lvol_delete_lvstore",
            json!({"lvs_name": "pool"})
        )),
        -libc::EBUSY
    );
    rpc(&socket, "nbd_stop_export", json!({"export_name": "vol0"})).unwrap();
    rpc(
        &socket,
        "bdev_lvol_delete_lvstore",
        json!({"lvs_name": "pool"}),
    )
    .unwrap();
    assert_eq!(
        rpc(&socket, "bdev_lvol_get_lvstores", Value::Null).unwrap(),
        json!([])
    );
    assert_eq!(
        code(rpc(
            &socket,
            "bdev_lvol_get_lvstores",
            json!({"lvs_name": "pool"})
        )),
        -libc::ENODEV
    );
    // A new store on the same device; an unknown device is refused.
    let wrong = json!({"bdev_name": "nvme9n1", "lvs_name": "lvs1"});
    assert_eq!(
        code(rpc(&socket, "bdev_lvol_create_lvstore", wrong)),
        -libc::ENODEV
    );
    let again = json!({"bdev_name": "malloc0", "lvs_name": "lvs1", "cluster_sz": 4 * MIB});
    let uuid = rpc(&socket, "bdev_lvol_create_lvstore", again.clone()).unwrap();
    assert_ne!(uuid, json!(lvs_uuid));
    assert_eq!(
        code(rpc(&socket, "bdev_lvol_create_lvstore", again)),
        -libc::EEXIST
    );
    let stores = rpc(&socket, "bdev_lvol_get_lvstores", Value::Null).unwrap();
    assert_eq!(
        (stores[0]["name"].clone(), stores[0]["cluster_size"].clone()),
        (json!("lvs1"), json!(4 * MIB))
    );
    rpc(
        &socket,
        "bdev_lvol_create",
        json!({"lvol_name": "fresh", "size_in_mib": 8, "lvs_name": "lvs1"}),
    )
    .unwrap();
    rpc(
        &socket,
        "nbd_start_export",
        json!({"bdev_name": "lvs1/fresh"}),
    )
    .unwrap();
    let mut client = Client::connect(&daemon.listening()[0], "lvs1/fresh", Ask::default());
    assert_eq!(client.write(MIB, &pattern(5, 8192), cf_fua()), 0);
    assert_eq!(client.read(MIB, 8192).unwrap(), pattern(5, 8192));
    client.disconnect();
    daemon.stop().unwrap();
}

fn cf_fua() -> u16 {
    spool_engine::nbd::wire::command_flags::FUA
}

#[test]
fn snapshots_and_clones_of_a_volume_being_served() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, socket) = start(dir.path());
    let at = daemon.listening()[0].clone();
    let mut writer = Client::connect(&at, "vol0", Ask::default());
    assert_eq!(writer.write(0, &pattern(1, 2 * MIB as usize), 0), 0);
    // The snapshot while the client stays connected: it holds what was written before.
    let snap = rpc(
        &socket,
        "bdev_lvol_snapshot",
        json!({"lvol_name": "lvs0/vol0", "snapshot_name": "snap0"}),
    )
    .unwrap();
    assert_eq!(snap.as_str().unwrap().len(), 36);
    assert_eq!(writer.write(0, &pattern(2, MIB as usize), 0), 0);
    assert_eq!(
        writer.read(0, MIB as u32).unwrap(),
        pattern(2, MIB as usize)
    );
    rpc(
        &socket,
        "nbd_start_export",
        json!({"bdev_name": "lvs0/snap0", "export_name": "snap0"}),
    )
    .unwrap();
    let mut snap_client = Client::connect(&at, "snap0", Ask::default());
    assert_ne!(snap_client.flags & 2, 0, "a snapshot is exported read-only");
    assert_eq!(
        snap_client.read(0, 2 * MIB as u32).unwrap(),
        pattern(1, 2 * MIB as usize)
    );
    snap_client.disconnect();
    // A clone, exported and written on its own.
    rpc(
        &socket,
        "bdev_lvol_clone",
        json!({"snapshot_name": "lvs0/snap0", "clone_name": "clone0"}),
    )
    .unwrap();
    rpc(&socket, "nbd_start_export", json!({"bdev_name": "clone0"})).unwrap();
    let mut clone = Client::connect(&at, "clone0", Ask::default());
    assert_eq!(
        clone.read(MIB, 4096).unwrap(),
        pattern(1, 2 * MIB as usize)[MIB as usize..MIB as usize + 4096].to_vec()
    );
    assert_eq!(clone.write(MIB, &pattern(3, 4096), 0), 0);
    assert_eq!(clone.read(MIB, 4096).unwrap(), pattern(3, 4096));
    assert_eq!(
        writer.read(MIB, 4096).unwrap(),
        pattern(1, 2 * MIB as usize)[MIB as usize..MIB as usize + 4096].to_vec(),
        "the origin is untouched"
    );
    let lvols = rpc(&socket, "bdev_lvol_get_lvols", Value::Null).unwrap();
    assert_eq!(lvol(&lvols, "snap0")["is_snapshot"], true);
    assert_eq!(lvol(&lvols, "clone0")["is_clone"], true);
    // Exported: not deletable. The snapshot has two clones (vol0, clone0): not deletable.
    assert_eq!(
        code(rpc(
            &socket,
            "bdev_lvol_delete",
            json!({"name": "lvs0/clone0"})
        )),
        -libc::EBUSY
    );
    assert!(rpc(&socket, "bdev_lvol_delete", json!({"name": "lvs0/snap0"})).is_err());
    // Inflating the clone would need a cluster for all of it: the store is too small.
    assert_eq!(
        code(rpc(
            &socket,
            "bdev_lvol_inflate",
            json!({"name": "lvs0/clone0"})
        )),
        -libc::ENOSPC
    );
    // Decoupling copies only what its parent owns; the served origin is resized.
    rpc(
        &socket,
        "bdev_lvol_decouple_parent",
        json!({"name": "lvs0/clone0"}),
    )
    .unwrap();
    assert_eq!(clone.read(MIB, 4096).unwrap(), pattern(3, 4096));
    clone.disconnect();
    rpc(
        &socket,
        "bdev_lvol_resize",
        json!({"name": "lvs0/vol0", "size_in_mib": 64}),
    )
    .unwrap();
    let fresh = Client::connect(&at, "vol0", Ask::default());
    assert_eq!(fresh.size, 64 * MIB, "a new client sees the new size");
    fresh.disconnect();
    // Read-only from now on, for new clients.
    rpc(
        &socket,
        "bdev_lvol_set_read_only",
        json!({"name": "lvs0/vol0"}),
    )
    .unwrap();
    let mut late = Client::connect(&at, "vol0", Ask::default());
    assert_ne!(late.flags & 2, 0);
    assert_eq!(late.write(0, &pattern(9, 4096), 0), 1, "EPERM");
    late.disconnect();
    assert_eq!(
        writer.write(0, &pattern(9, 4096), 0),
        1,
        "EPERM for the old client too"
    );
    writer.disconnect();
    // Once nothing is exported, the clone goes.
    rpc(&socket, "nbd_stop_export", json!({"export_name": "clone0"})).unwrap();
    rpc(&socket, "bdev_lvol_delete", json!({"name": "lvs0/clone0"})).unwrap();
    rpc(&socket, "nbd_stop_export", json!({"export_name": "snap0"})).unwrap();
    rpc(&socket, "nbd_stop_export", json!({"export_name": "vol0"})).unwrap();
    // A read-only volume is not decoupled (-EPERM); the snapshot keeps its one clone.
    assert_eq!(
        code(rpc(
            &socket,
            "bdev_lvol_decouple_parent",
            json!({"name": "lvs0/vol0"})
        )),
        -libc::EPERM
    );
    let lvols = rpc(&socket, "bdev_lvol_get_lvols", Value::Null).unwrap();
    assert_eq!(
        lvols.as_array().unwrap().len(),
        2,
        "vol0 and snap0: {lvols}"
    );
    daemon.stop().unwrap();
}
