//! Goal: the CLI makes and reads lvol stores as SPDK's lvol layer does: `init --lvs` writes
//! the store's name and uuid in the super blob, `create`/`snapshot`/`clone --name` make lvols
//! (name NUL-padded to 64 bytes, a 37-byte uuid), `ls`/`info` show names, uuids and aliases
//! (SPDK's p2 fixture's as its manifest has them), lvols resolve by alias and uuid, and
//! `init --block-size 512` makes a store with a 512-byte io_unit. Method: run the built
//! binary on temporary images and a copy of the p2 fixture; raw bytes through `xattr --hex`.

mod support;

use support::{fails_in, fixture_image, json, manifest, ok_in, spool_in};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn padded_hex(name: &str) -> String {
    let mut value = name.as_bytes().to_vec();
    value.resize(64, 0);
    hex(&value)
}

fn ls(dir: &std::path::Path, image: &str) -> Vec<serde_json::Value> {
    json(&ok_in(dir, &["ls", image, "--json"]))
        .as_array()
        .unwrap()
        .clone()
}

fn id_of(run: &support::Run) -> String {
    run.text().trim_end().to_string()
}

#[test]
fn init_lvs_makes_an_lvol_store_and_lvols_with_spdks_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = ok_in(d, &["init", "lvs.img", "--size", "64M", "--lvs", "lvs0"]);
    let text = run.text();
    let mut lines = text.lines();
    assert_eq!(
        lines.next().unwrap(),
        "initialized lvs.img: 67108864 bytes, 64 clusters of 1 MiB (63 for data), md_start 4, md_len 64"
    );
    let uuid = lines
        .next()
        .unwrap()
        .strip_prefix("lvol store lvs0 uuid ")
        .unwrap()
        .to_string();
    assert_eq!(uuid.len(), 36);
    let info = json(&ok_in(d, &["info", "lvs.img", "--json"]));
    assert_eq!(info["bstype"], "LVOLSTORE");
    assert_eq!(info["super_blob"], 0x1_0000_0000u64);
    assert_eq!(info["lvs_name"], "lvs0");
    assert_eq!(info["lvs_uuid"], uuid.as_str());
    assert_eq!(info["num_lvols"], 0);
    assert_eq!(
        ok_in(
            d,
            &["xattr", "lvs.img", "0x100000000", "get", "name", "--hex"]
        )
        .text(),
        "6c76733000\n",
        "the store's name: 'lvs0' and a NUL, as SPDK writes it"
    );
    assert_eq!(
        ok_in(
            d,
            &["xattr", "lvs.img", "0x100000000", "get", "uuid", "--hex"]
        )
        .text(),
        format!("{}00\n", hex(uuid.as_bytes()))
    );

    let lv0 = id_of(&ok_in(
        d,
        &[
            "create", "lvs.img", "--size", "4M", "--thin", "--name", "lv0",
        ],
    ));
    assert_eq!(lv0, "0x100000001");
    let line = fails_in(
        d,
        &[
            "create", "lvs.img", "--size", "4M", "--thin", "--name", "lv0",
        ],
    );
    assert_eq!(
        line,
        "error: lvs.img: lvol 'lv0' already exists in lvol store 'lvs0'"
    );
    let line = fails_in(d, &["create", "lvs.img", "--size", "4M"]);
    assert_eq!(
        line,
        "error: lvol store 'lvs0': an lvol needs a name (--name)"
    );
    let long = "x".repeat(64);
    // A name that breaks the rules is a bad argument: exit 2.
    let run = spool_in(d, &["create", "lvs.img", "--size", "4M", "--name", &long]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("64 bytes"), "{}", run.stderr);
    let snap = id_of(&ok_in(
        d,
        &["snapshot", "lvs.img", "lvs0/lv0", "--name", "snap0"],
    ));
    let line = fails_in(d, &["clone", "lvs.img", "snap0"]);
    assert_eq!(
        line,
        "error: lvol store 'lvs0': a clone needs a name (--name)"
    );
    let clone = id_of(&ok_in(d, &["clone", "lvs.img", &snap, "--name", "clone0"]));

    let rows = ls(d, "lvs.img");
    assert_eq!(rows.len(), 4);
    assert_eq!(
        rows[0]["uuid"],
        uuid.as_str(),
        "the super blob: the store's uuid"
    );
    assert_eq!(rows[0]["alias"], serde_json::Value::Null);
    for (row, (name, id)) in
        rows[1..]
            .iter()
            .zip([("lv0", &lv0), ("snap0", &snap), ("clone0", &clone)])
    {
        assert_eq!(row["id_hex"], id.as_str());
        assert_eq!(row["name"], name);
        assert_eq!(row["alias"], format!("lvs0/{name}"));
        let uuid = row["uuid"].as_str().unwrap();
        assert_eq!(row["xattrs"]["name"], padded_hex(name), "{name}: 64 bytes");
        assert_eq!(
            row["xattrs"]["uuid"],
            format!("{}00", hex(uuid.as_bytes())),
            "{name}: 36 characters and a NUL"
        );
        // An lvol resolves by its uuid and its alias.
        for text in [uuid.to_string(), format!("lvs0/{name}")] {
            let got = ok_in(d, &["xattr", "lvs.img", &text, "get", "name"]).text();
            assert_eq!(got, format!("{name}\n"), "{text}");
        }
    }
    assert_eq!(rows[2]["snapshot"], true);
    assert_eq!(rows[3]["clone"], true);
    let table = ok_in(d, &["ls", "lvs.img"]).text();
    assert!(table.lines().next().unwrap().ends_with("UUID"), "{table}");
    let line = fails_in(d, &["delete", "lvs.img", "snap0"]);
    assert!(line.contains("2 clones"), "{line}");
}

#[test]
fn init_block_size_512_makes_a_512_byte_io_unit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = ok_in(
        d,
        &[
            "init",
            "small.img",
            "--size",
            "16M",
            "--block-size",
            "512",
            "--lvs",
            "lvs512",
        ],
    );
    assert!(run.text().contains(", io_unit 512\n"), "{}", run.text());
    let info = json(&ok_in(d, &["info", "small.img", "--json"]));
    assert_eq!(info["io_unit_size"], 512);
    ok_in(d, &["create", "small.img", "--size", "1M", "--name", "lv"]);
    std::fs::write(d.join("in.bin"), [0x5a_u8; 512]).unwrap();
    ok_in(
        d,
        &["import", "small.img", "lv", "in.bin", "--offset", "1536"],
    );
    ok_in(
        d,
        &[
            "export",
            "small.img",
            "lvs512/lv",
            "out.bin",
            "--offset",
            "1536",
            "--length",
            "512",
        ],
    );
    assert_eq!(std::fs::read(d.join("out.bin")).unwrap(), [0x5a_u8; 512]);
    let usage = spool_in(
        d,
        &["init", "bad.img", "--size", "16M", "--block-size", "1024"],
    );
    assert_eq!(usage.code, Some(2), "a usage error");
    assert!(usage.stderr.contains("512 or 4096"), "{}", usage.stderr);
    assert!(!d.join("bad.img").exists());
    let line = fails_in(
        d,
        &[
            "init", "b.img", "--size", "16M", "--lvs", "x", "--bstype", "BLOBFS",
        ],
    );
    assert_eq!(
        line,
        "error: --lvs makes a store of bstype LVOLSTORE, not 'BLOBFS'"
    );
}

#[test]
fn spdks_p2_lists_its_lvols_with_the_manifests_uuids_and_aliases() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = fixture_image("p2-lvs-thin-snap", d);
    let image = image.to_str().unwrap();
    let truth = manifest("p2-lvs-thin-snap");
    let info = json(&ok_in(d, &["info", image, "--json"]));
    assert_eq!(info["lvs_name"], "lvs0");
    assert_eq!(info["lvs_uuid"], "0cf49f18-109d-41f6-8323-44e8a9306d37");
    assert_eq!(info["num_lvols"], 3);
    let rows = ls(d, image);
    for blob in truth["blobs"].as_array().unwrap() {
        let row = rows.iter().find(|row| row["id"] == blob["id"]).unwrap();
        let text = blob["xattrs_as_text"]["uuid"].as_str().unwrap();
        let uuid = text.split(' ').next().unwrap();
        assert_eq!(row["uuid"], uuid);
        let alias = &row["alias"];
        match row["name"].as_str().unwrap() {
            "lvs0" => assert_eq!(*alias, serde_json::Value::Null),
            name => {
                assert_eq!(*alias, format!("lvs0/{name}"));
                let found = ok_in(d, &["xattr", image, uuid, "get", "name"]).text();
                assert_eq!(found, format!("{name}\n"));
            }
        }
    }
}
