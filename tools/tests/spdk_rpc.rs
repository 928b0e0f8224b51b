//! Goal: SPDK's own JSON-RPC client works unchanged against `spool serve` (issue 14): every
//! SPDK method the daemon takes, driven with `spdk-rpc` (SPDK's scripts/rpc.py, from PyPI's
//! `spdk`) in its own command-line syntax, gives the results SPDK's users expect (names,
//! uuids, sizes, flags, counts), changes the data as it should (snapshots are point-in-time,
//! clones take writes of their own), and fails with SPDK's error codes; `spool rpc` runs the
//! same scenario; and docs/operations.md's JSON-RPC walk-through runs as written.
//!
//! Method: a daemon on the embedded default (lvol store `lvs0`, thin lvol `vol0` exported as
//! `vol0`) in a temp dir, its RPC socket there. One scenario, each call spelled for both
//! clients (spdk-rpc's arguments and the JSON-RPC parameters they stand for), run once with
//! each client. spdk-rpc's successful calls go through one `spdk-rpc --server` process (each
//! input line is a command line, parsed and sent as `spdk-rpc -s SOCKET METHOD ARGS` would,
//! over a connection of its own; it saves a Python start per call); its failing calls, the
//! version call and the stop run as separate commands, so their exit status is checked.
//! Volumes are exported with `spool rpc nbd_start_export` (SPDK has no such call) and their
//! data checked with qemu-io. The walk-through is the ```sh block after "A walk-through" in
//! docs/operations.md, each line run with `sh -c` with the test's socket and port.

mod daemon;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use daemon::{require, run_client, spool, spool_json, ClientRun, Daemon};
use serde_json::{json, Value};
use spool_engine::serve::{DEFAULT_LISTEN, DEFAULT_RPC_SOCKET};

const MIB: u64 = 1 << 20;
/// How long one client run may take.
const LIMIT: Duration = Duration::from_secs(60);

/// The SPDK methods issue 14 says SPDK's client must drive unchanged.
const SPDK_METHODS: [&str; 20] = [
    "spdk_get_version",
    "rpc_get_methods",
    "framework_get_reactors",
    "bdev_get_bdevs",
    "bdev_get_iostat",
    "bdev_lvol_create_lvstore",
    "bdev_lvol_get_lvstores",
    "bdev_lvol_rename_lvstore",
    "bdev_lvol_delete_lvstore",
    "bdev_lvol_create",
    "bdev_lvol_get_lvols",
    "bdev_lvol_snapshot",
    "bdev_lvol_clone",
    "bdev_lvol_rename",
    "bdev_lvol_resize",
    "bdev_lvol_set_read_only",
    "bdev_lvol_inflate",
    "bdev_lvol_decouple_parent",
    "bdev_lvol_delete",
    "spdk_kill_instance",
];

/// Spool's own export methods (SPDK's nbd_start_disk binds a kernel device instead).
const SPOOL_METHODS: [&str; 3] = ["nbd_start_export", "nbd_stop_export", "nbd_get_exports"];

// ---------------------------------------------------------------------------------------
// One call, as each client spells it

/// A JSON-RPC call: spdk-rpc's command-line arguments after the method, and the parameters
/// they stand for (what spdk-rpc sends, defaults included; `spool rpc` sends them).
struct Call {
    method: &'static str,
    cli: Vec<String>,
    params: Value,
    /// `spool rpc` gets the parameters as one JSON object (else `--key value` pairs).
    json_form: bool,
}

fn call(method: &'static str, cli: &[&str], params: Value) -> Call {
    assert!(params.is_object(), "{method}: params must be an object");
    Call {
        method,
        cli: cli.iter().map(|arg| arg.to_string()).collect(),
        params,
        json_form: false,
    }
}

impl Call {
    /// `spool rpc METHOD '{...}'` rather than `--key value` pairs.
    fn in_json_form(mut self) -> Call {
        self.json_form = true;
        self
    }
}

/// A JSON-RPC client under test.
trait Client {
    /// For messages.
    fn label(&self) -> &'static str;
    /// Runs `call`, which must succeed; its result as the client prints it (parsed).
    fn ok(&mut self, call: &Call) -> Value;
    /// Runs `call`, which must fail; the JSON-RPC error's code and message.
    fn fails(&mut self, call: &Call) -> (i64, String);
    /// What a call answered with `true` prints: spdk-rpc prints nothing for those methods
    /// (`Null` here), `spool rpc` prints `true`.
    fn acked(&self) -> Value;
}

// ---------------------------------------------------------------------------------------
// spdk-rpc

/// A running `spdk-rpc --server`: one command line in, its output and `**STATUS=0|1` out.
struct SpdkServer {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    stderr: PathBuf,
}

impl SpdkServer {
    fn start(dir: &Path) -> SpdkServer {
        require("spdk-rpc");
        let stderr = dir.join("spdk-rpc-server.stderr");
        let mut child = Command::new("spdk-rpc")
            .arg("--server")
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::File::create(&stderr).expect("spdk-rpc's stderr file"),
            ))
            .spawn()
            .expect("spdk-rpc --server starts");
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        SpdkServer {
            stdin: child.stdin.take(),
            child,
            lines,
            stderr,
        }
    }

    /// Runs one command line; whether it succeeded, and what it printed.
    fn run(&mut self, args: &[String]) -> (bool, String) {
        for arg in args {
            assert!(
                !arg.is_empty()
                    && !arg.contains(|c: char| c.is_whitespace() || "'\"\\".contains(c)),
                "{arg:?} needs quoting on a spdk-rpc --server line"
            );
        }
        let line = args.join(" ");
        let stdin = self.stdin.as_mut().expect("open");
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .expect("spdk-rpc --server takes a line");
        let deadline = Instant::now() + LIMIT;
        let mut output = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(text) => match text.strip_prefix("**STATUS=") {
                    Some(status) => return (status == "0", output),
                    None => {
                        output.push_str(&text);
                        output.push('\n');
                    }
                },
                Err(_) => panic!(
                    "spdk-rpc --server gave no status for `{line}`; it printed:\n{output}\n{}",
                    std::fs::read_to_string(&self.stderr).unwrap_or_default()
                ),
            }
        }
    }
}

impl Drop for SpdkServer {
    fn drop(&mut self) {
        // End of input ends it; a stuck one is killed.
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// What spdk-rpc printed for a successful call: nothing (`Null`), JSON (its `print_dict`),
/// or a string without its quotes (its `print_json` of a string, e.g. a new lvol's uuid).
fn spdk_output(text: &str) -> Value {
    let text = text.trim();
    if text.is_empty() {
        return Value::Null;
    }
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

/// spdk-rpc's report of a JSON-RPC error: the request, "Got JSON-RPC error response", then
/// `response:` and the error object.
fn spdk_error(text: &str) -> (i64, String) {
    let at = text
        .find("Got JSON-RPC error response")
        .and_then(|at| text[at..].find("response:\n").map(|r| at + r))
        .unwrap_or_else(|| panic!("no JSON-RPC error in spdk-rpc's output:\n{text}"));
    let error: Value = serde_json::from_str(text[at + "response:\n".len()..].trim())
        .unwrap_or_else(|err| panic!("spdk-rpc's error is not JSON ({err}):\n{text}"));
    let code = error["code"].as_i64().expect("an error code");
    let message = error["message"].as_str().expect("an error message");
    (code, message.to_string())
}

/// SPDK's client, `spdk-rpc -s SOCKET METHOD ARGS`.
struct SpdkRpc {
    dir: PathBuf,
    socket: String,
    server: SpdkServer,
}

impl SpdkRpc {
    fn new(daemon: &Daemon) -> SpdkRpc {
        SpdkRpc {
            dir: daemon.dir.clone(),
            socket: daemon.rpc_socket().display().to_string(),
            server: SpdkServer::start(&daemon.dir),
        }
    }

    fn args(&self, call: &Call) -> Vec<String> {
        let mut args = vec!["-s".to_string(), self.socket.clone(), call.method.into()];
        args.extend(call.cli.iter().cloned());
        args
    }

    /// `spdk-rpc -s SOCKET METHOD ARGS` as a command of its own.
    fn command(&self, call: &Call) -> ClientRun {
        let args = self.args(call);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_client(&self.dir, "spdk-rpc", &args, LIMIT)
    }
}

impl Client for SpdkRpc {
    fn label(&self) -> &'static str {
        "spdk-rpc"
    }

    fn ok(&mut self, call: &Call) -> Value {
        // The first call and the stop are commands of their own; the rest share the server.
        if matches!(call.method, "spdk_get_version" | "spdk_kill_instance") {
            let run = self.command(call).ok();
            return spdk_output(&run.stdout);
        }
        let args = self.args(call);
        let (ok, output) = self.server.run(&args);
        assert!(ok, "spdk-rpc {} failed:\n{output}", args.join(" "));
        spdk_output(&output)
    }

    fn fails(&mut self, call: &Call) -> (i64, String) {
        let run = self.command(call);
        assert_eq!(
            run.status.code(),
            Some(1),
            "{} should fail with status 1: {run:?}",
            run.command
        );
        spdk_error(&run.stdout)
    }

    fn acked(&self) -> Value {
        Value::Null
    }
}

// ---------------------------------------------------------------------------------------
// spool rpc

/// Spool's client, `spool rpc -s SOCKET METHOD [--key value ... | JSON]`.
struct SpoolRpc {
    dir: PathBuf,
    socket: String,
}

impl SpoolRpc {
    fn new(daemon: &Daemon) -> SpoolRpc {
        SpoolRpc {
            dir: daemon.dir.clone(),
            socket: daemon.rpc_socket().display().to_string(),
        }
    }

    fn run(&self, call: &Call) -> std::process::Output {
        let mut args = vec![
            "rpc".to_string(),
            "-s".into(),
            self.socket.clone(),
            call.method.into(),
        ];
        let params = call.params.as_object().expect("an object");
        if call.json_form {
            args.push(call.params.to_string());
        } else {
            for (key, value) in params {
                args.push(format!("--{}", key.replace('_', "-")));
                args.push(match value {
                    Value::String(text) => {
                        assert!(
                            serde_json::from_str::<Value>(text).is_err(),
                            "{text:?} would be taken as JSON: use in_json_form()"
                        );
                        text.clone()
                    }
                    other => other.to_string(),
                });
            }
        }
        Command::new(env!("CARGO_BIN_EXE_spool"))
            .args(&args)
            .current_dir(&self.dir)
            .env_remove("SPOOL_LOG")
            .output()
            .expect("spool rpc runs")
    }
}

impl Client for SpoolRpc {
    fn label(&self) -> &'static str {
        "spool rpc"
    }

    fn ok(&mut self, call: &Call) -> Value {
        let output = self.run(call);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "spool rpc {} {} failed ({}): {stdout}{}",
            call.method,
            call.params,
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_str(&stdout)
            .unwrap_or_else(|err| panic!("spool rpc {}: not JSON ({err}): {stdout}", call.method))
    }

    fn fails(&mut self, call: &Call) -> (i64, String) {
        let output = self.run(call);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(1),
            "spool rpc {} {} should fail with status 1: {}{stderr}",
            call.method,
            call.params,
            String::from_utf8_lossy(&output.stdout)
        );
        // `error: METHOD failed: code N: MESSAGE`
        let (_, rest) = stderr
            .split_once("code ")
            .unwrap_or_else(|| panic!("no code in spool rpc's error: {stderr}"));
        let (code, message) = rest
            .split_once(": ")
            .unwrap_or_else(|| panic!("no message in spool rpc's error: {stderr}"));
        let code = code.parse().expect("the code is a number");
        (code, message.trim().to_string())
    }

    fn acked(&self) -> Value {
        json!(true)
    }
}

// ---------------------------------------------------------------------------------------
// Exports and data (no SPDK call exports a volume over NBD: `spool rpc` does it)

fn spool_rpc(daemon: &Daemon, method: &str, params: &[&str]) -> Value {
    let socket = daemon.rpc_socket();
    let mut args = vec!["rpc", "-s", socket.to_str().unwrap(), method];
    args.extend_from_slice(params);
    let text = spool(&daemon.dir, &args);
    serde_json::from_str(&text).unwrap_or_else(|err| panic!("{method}: not JSON ({err}): {text}"))
}

fn export(daemon: &Daemon, bdev: &str, name: &str) {
    let started = spool_rpc(
        daemon,
        "nbd_start_export",
        &["--bdev-name", bdev, "--export-name", name],
    );
    assert_eq!(started, name);
}

/// Stops an export; a client that just left may still be counted for a moment (-EBUSY).
fn unexport(daemon: &Daemon, name: &str) {
    let socket = daemon.rpc_socket();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let output = Command::new(env!("CARGO_BIN_EXE_spool"))
            .args(["rpc", "-s", socket.to_str().unwrap(), "nbd_stop_export"])
            .args(["--export-name", name])
            .output()
            .expect("spool rpc runs");
        if output.status.success() {
            return;
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("code -16") && Instant::now() < deadline,
            "nbd_stop_export {name}: {stderr}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// qemu-io on an export with `commands` (`-r`: read-only); every command must succeed
/// (pattern reads verify what they read).
fn qemu_io(daemon: &Daemon, export: &str, read_only: bool, commands: &[&str]) {
    let uri = daemon.uri(export);
    let mut args = vec!["-f", "raw"];
    if read_only {
        args.push("-r");
    }
    args.push(&uri);
    for command in commands {
        args.extend(["-c", command]);
    }
    let run = run_client(&daemon.dir, "qemu-io", &args, LIMIT).ok();
    for bad in ["failed", "error", "Error"] {
        assert!(
            !run.stdout.contains(bad) && !run.stderr.contains(bad),
            "{}: {bad}:\n{}\n{}",
            run.command,
            run.stdout,
            run.stderr
        );
    }
}

// ---------------------------------------------------------------------------------------
// The scenario

/// `bdev_lvol_get_lvols`, every lvol.
fn lvols(client: &mut dyn Client) -> Vec<Value> {
    let list = client.ok(&call("bdev_lvol_get_lvols", &[], json!({})));
    list.as_array().expect("a list of lvols").clone()
}

/// The lvol named `name` in `list`.
fn lvol<'a>(list: &'a [Value], name: &str) -> &'a Value {
    list.iter()
        .find(|lvol| lvol["name"] == name)
        .unwrap_or_else(|| panic!("no lvol {name} in {list:?}"))
}

/// `bdev_get_bdevs -b NAME`: the one bdev it names.
fn bdev(client: &mut dyn Client, name: &str) -> Value {
    let list = client.ok(&call(
        "bdev_get_bdevs",
        &["-b", name],
        json!({"name": name}),
    ));
    let list = list.as_array().expect("a list of bdevs");
    assert_eq!(list.len(), 1, "bdev_get_bdevs -b {name}: {list:?}");
    list[0].clone()
}

/// `bdev_lvol_get_lvstores`, the one store there is.
fn lvstore(client: &mut dyn Client) -> Value {
    let stores = client.ok(&call("bdev_lvol_get_lvstores", &[], json!({})));
    let stores = stores.as_array().expect("a list of stores");
    assert_eq!(stores.len(), 1, "{stores:?}");
    stores[0].clone()
}

/// A uuid as SPDK prints one.
fn assert_uuid(value: &Value) -> String {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("not a string: {value}"));
    let groups: Vec<usize> = text.split('-').map(str::len).collect();
    assert_eq!(groups, [8, 4, 4, 4, 12], "not a uuid: {text}");
    assert!(text.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
    text.to_string()
}

/// Checks that `call` fails with `code` (and a message).
fn fails_with(client: &mut dyn Client, call: Call, code: i32) {
    let (got, message) = client.fails(&call);
    assert_eq!(
        got,
        i64::from(code),
        "{} {}: {message}",
        client.label(),
        call.method
    );
    assert!(!message.is_empty(), "{}: an empty message", call.method);
}

fn acked(client: &mut dyn Client, call: Call) {
    let result = client.ok(&call);
    assert_eq!(result, client.acked(), "{} {}", client.label(), call.method);
}

/// Every SPDK method, its results and its errors, with `client`; ends with
/// `spdk_kill_instance SIGTERM` (the daemon then exits 0 with its store clean).
fn scenario(client: &mut dyn Client, daemon: Daemon) {
    let c = client;
    // An unknown lvol is -ENODEV, as SPDK's bdev_lvol_* calls answer it.
    let (enoent, eexist, ebusy, enodev) =
        (-libc::ENODEV, -libc::EEXIST, -libc::EBUSY, -libc::ENODEV);

    // Framework: the version, the method list, the reactors.
    let version = c.ok(&call("spdk_get_version", &[], json!({})));
    assert_eq!(
        version["version"],
        format!("Spool v{}", env!("CARGO_PKG_VERSION"))
    );
    let major: u64 = env!("CARGO_PKG_VERSION_MAJOR").parse().unwrap();
    assert_eq!(version["fields"]["major"], major);
    let methods = c.ok(&call(
        "rpc_get_methods",
        &[],
        json!({"current": false, "include_aliases": false}),
    ));
    let mut methods: Vec<&str> = methods
        .as_array()
        .expect("a list of methods")
        .iter()
        .map(|m| m.as_str().expect("a method name"))
        .collect();
    methods.sort_unstable();
    let mut expected: Vec<&str> = SPDK_METHODS.iter().chain(&SPOOL_METHODS).copied().collect();
    expected.sort_unstable();
    assert_eq!(methods, expected);
    let current = c.ok(&call(
        "rpc_get_methods",
        &["-c", "-i"],
        json!({"current": true, "include_aliases": true}),
    ));
    assert_eq!(current.as_array().map(Vec::len), Some(expected.len()));
    let reactors = c.ok(&call("framework_get_reactors", &[], json!({})));
    assert_eq!(reactors["tick_rate"], 1_000_000_000u64);
    assert_eq!(reactors["pid"], daemon.pid());
    let reactors = reactors["reactors"].as_array().expect("reactors");
    assert!(!reactors.is_empty());
    for reactor in reactors {
        assert!(reactor["lcore"].is_u64(), "{reactor}");
        assert_eq!(reactor["lw_threads"].as_array().map(Vec::len), Some(1));
    }

    // The embedded default: store lvs0 on spool.img, thin vol0 as large as its data.
    let store = lvstore(c);
    assert_eq!(store["name"], "lvs0");
    assert_eq!(store["base_bdev"], "spool.img");
    assert_eq!(store["cluster_size"], MIB);
    assert_eq!(store["block_size"], 4096);
    let lvs_uuid = assert_uuid(&store["uuid"]);
    let total = store["total_data_clusters"].as_u64().expect("total");
    assert_eq!(store["free_clusters"], total, "vol0 is thin and unwritten");
    for (cli, params) in [
        (["-u", lvs_uuid.as_str()], json!({"uuid": lvs_uuid})),
        (["-l", "lvs0"], json!({"lvs_name": "lvs0"})),
    ] {
        let chosen = c.ok(&call("bdev_lvol_get_lvstores", &cli, params));
        assert_eq!(chosen, json!([store]));
    }
    fails_with(
        c,
        call(
            "bdev_lvol_get_lvstores",
            &["-l", "nope"],
            json!({"lvs_name": "nope"}),
        ),
        enodev,
    );
    let all = lvols(c);
    assert_eq!(all.len(), 1, "{all:?}");
    let vol0 = lvol(&all, "vol0");
    let vol0_uuid = assert_uuid(&vol0["uuid"]);
    assert_eq!(vol0["alias"], "lvs0/vol0");
    assert_eq!(vol0["is_thin_provisioned"], true);
    assert_eq!(vol0["is_snapshot"], false);
    assert_eq!(vol0["is_clone"], false);
    assert_eq!(vol0["num_allocated_clusters"], 0);
    assert_eq!(vol0["lvs"], json!({"name": "lvs0", "uuid": lvs_uuid}));
    for (cli, params) in [
        (["-u", lvs_uuid.as_str()], json!({"lvs_uuid": lvs_uuid})),
        (["-l", "lvs0"], json!({"lvs_name": "lvs0"})),
    ] {
        let chosen = c.ok(&call("bdev_lvol_get_lvols", &cli, params));
        assert_eq!(chosen, json!(all));
    }
    fails_with(
        c,
        call(
            "bdev_lvol_get_lvols",
            &["-l", "nope"],
            json!({"lvs_name": "nope"}),
        ),
        enodev,
    );
    let bdevs = c.ok(&call("bdev_get_bdevs", &[], json!({})));
    assert_eq!(bdevs.as_array().map(Vec::len), Some(1), "{bdevs}");
    let vol0 = &bdevs[0];
    assert_eq!(vol0["name"], vol0_uuid);
    assert_eq!(vol0["uuid"], vol0_uuid);
    assert_eq!(vol0["aliases"], json!(["lvs0/vol0"]));
    assert_eq!(vol0["product_name"], "Logical Volume");
    assert_eq!(vol0["block_size"], 4096);
    assert_eq!(vol0["num_blocks"], total * MIB / 4096);
    assert_eq!(vol0["supported_io_types"]["write"], true);
    let lvol_info = &vol0["driver_specific"]["lvol"];
    assert_eq!(lvol_info["lvol_store_uuid"], lvs_uuid);
    assert_eq!(lvol_info["thin_provision"], true);
    assert_eq!(lvol_info["snapshot"], false);
    assert_eq!(lvol_info["clone"], false);
    assert_eq!(bdev(c, "lvs0/vol0"), *vol0);
    assert_eq!(bdev(c, &vol0_uuid), *vol0);
    fails_with(
        c,
        call("bdev_get_bdevs", &["-b", "nope"], json!({"name": "nope"})),
        enodev,
    );

    // Create: thin by store name, thick by store uuid; the answer is the new bdev's name.
    let lv1 = assert_uuid(&c.ok(&call(
        "bdev_lvol_create",
        &["-l", "lvs0", "-t", "lv1", "16"],
        json!({"lvol_name": "lv1", "size_in_mib": 16, "thin_provision": true, "lvs_name": "lvs0"}),
    )));
    let lv2 = assert_uuid(
        &c.ok(&call(
            "bdev_lvol_create",
            &["-u", &lvs_uuid, "lv2", "8"],
            json!({"lvol_name": "lv2", "size_in_mib": 8, "thin_provision": false, "uuid": lvs_uuid}),
        )
        .in_json_form()),
    );
    let lv1_bdev = bdev(c, "lvs0/lv1");
    assert_eq!(lv1_bdev["name"], lv1);
    assert_eq!(lv1_bdev["aliases"], json!(["lvs0/lv1"]));
    assert_eq!(lv1_bdev["num_blocks"], 16 * MIB / 4096);
    assert_eq!(lv1_bdev["driver_specific"]["lvol"]["thin_provision"], true);
    let lv2_bdev = bdev(c, &lv2);
    assert_eq!(lv2_bdev["aliases"], json!(["lvs0/lv2"]));
    assert_eq!(lv2_bdev["driver_specific"]["lvol"]["thin_provision"], false);
    assert_eq!(
        lv2_bdev["driver_specific"]["lvol"]["num_allocated_clusters"],
        8
    );
    assert_eq!(lvstore(c)["free_clusters"], total - 8);
    fails_with(
        c,
        call(
            "bdev_lvol_create",
            &["-l", "lvs0", "lv1", "4"],
            json!({"lvol_name": "lv1", "size_in_mib": 4, "thin_provision": false, "lvs_name": "lvs0"}),
        ),
        eexist,
    );
    fails_with(
        c,
        call(
            "bdev_lvol_create",
            &["-l", "nope", "lv3", "4"],
            json!({"lvol_name": "lv3", "size_in_mib": 4, "thin_provision": false, "lvs_name": "nope"}),
        ),
        enodev,
    );

    // Snapshot: point in time. lv1 gets 2 MiB of 0x11, is snapshotted, then overwritten.
    export(&daemon, "lvs0/lv1", "lv1");
    qemu_io(&daemon, "lv1", false, &["write -P 0x11 0 2M"]);
    let snap1 = assert_uuid(&c.ok(&call(
        "bdev_lvol_snapshot",
        &["lvs0/lv1", "snap1"],
        json!({"lvol_name": "lvs0/lv1", "snapshot_name": "snap1"}),
    )));
    qemu_io(&daemon, "lv1", false, &["write -P 0x22 0 4k"]);
    export(&daemon, "lvs0/snap1", "snap1");
    qemu_io(&daemon, "snap1", true, &["read -P 0x11 0 2M"]);
    qemu_io(
        &daemon,
        "lv1",
        true,
        &["read -P 0x22 0 4k", "read -P 0x11 4k 2044k"],
    );
    let all = lvols(c);
    let snap = lvol(&all, "snap1");
    assert_eq!(snap["uuid"], snap1);
    assert_eq!(snap["alias"], "lvs0/snap1");
    assert_eq!(snap["is_snapshot"], true);
    assert_eq!(snap["num_allocated_clusters"], 2);
    assert_eq!(lvol(&all, "lv1")["is_clone"], true);
    assert_eq!(lvol(&all, "lv1")["num_allocated_clusters"], 1);
    let snap_bdev = bdev(c, "lvs0/snap1");
    assert_eq!(snap_bdev["name"], snap1);
    assert_eq!(snap_bdev["supported_io_types"]["write"], false);
    assert_eq!(snap_bdev["driver_specific"]["lvol"]["snapshot"], true);
    assert_eq!(snap_bdev["driver_specific"]["lvol"]["clones"], json!([lv1]));
    let lv1_bdev = bdev(c, "lvs0/lv1");
    assert_eq!(lv1_bdev["driver_specific"]["lvol"]["clone"], true);
    assert_eq!(lv1_bdev["driver_specific"]["lvol"]["base_snapshot"], snap1);
    fails_with(
        c,
        call(
            "bdev_lvol_snapshot",
            &["lvs0/lv1", "lv2"],
            json!({"lvol_name": "lvs0/lv1", "snapshot_name": "lv2"}),
        ),
        eexist,
    );
    fails_with(
        c,
        call(
            "bdev_lvol_snapshot",
            &["lvs0/nope", "snap9"],
            json!({"lvol_name": "lvs0/nope", "snapshot_name": "snap9"}),
        ),
        enoent,
    );

    // Clone: reads the snapshot, takes writes of its own.
    let clone1 = assert_uuid(&c.ok(&call(
        "bdev_lvol_clone",
        &["lvs0/snap1", "clone1"],
        json!({"snapshot_name": "lvs0/snap1", "clone_name": "clone1"}),
    )));
    export(&daemon, "lvs0/clone1", "clone1");
    qemu_io(
        &daemon,
        "clone1",
        false,
        &[
            "read -P 0x11 0 2M",
            "write -P 0x33 0 4k",
            "read -P 0x33 0 4k",
        ],
    );
    qemu_io(&daemon, "snap1", true, &["read -P 0x11 0 4k"]);
    qemu_io(&daemon, "lv1", true, &["read -P 0x22 0 4k"]);
    let all = lvols(c);
    let clone = lvol(&all, "clone1");
    assert_eq!(clone["uuid"], clone1);
    assert_eq!(clone["is_clone"], true);
    assert_eq!(clone["is_thin_provisioned"], true);
    assert_eq!(clone["num_allocated_clusters"], 1);
    let mut clones: Vec<String> = bdev(c, &snap1)["driver_specific"]["lvol"]["clones"]
        .as_array()
        .expect("clones")
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    clones.sort_unstable();
    let mut want = vec![lv1.clone(), clone1.clone()];
    want.sort_unstable();
    assert_eq!(clones, want);
    fails_with(
        c,
        call(
            "bdev_lvol_clone",
            &["lvs0/snap1", "clone1"],
            json!({"snapshot_name": "lvs0/snap1", "clone_name": "clone1"}),
        ),
        eexist,
    );
    fails_with(
        c,
        call(
            "bdev_lvol_clone",
            &["lvs0/nope", "clone9"],
            json!({"snapshot_name": "lvs0/nope", "clone_name": "clone9"}),
        ),
        enoent,
    );

    // I/O statistics: what the clients above wrote, per volume (SPDK's newer client sends
    // `names`, SPDK v24.01's `name`).
    let stats = c.ok(&call("bdev_get_iostat", &[], json!({"per_channel": false})));
    assert_eq!(stats["tick_rate"], 1_000_000_000u64);
    let listed = stats["bdevs"].as_array().expect("bdevs");
    assert_eq!(listed.len(), 5, "vol0 lv1 lv2 snap1 clone1: {listed:?}");
    let stat = |name: &str| {
        listed
            .iter()
            .find(|b| b["name"] == name)
            .unwrap_or_else(|| panic!("no iostat for {name}"))
            .clone()
    };
    let lv1_stat = stat(&lv1);
    assert_eq!(lv1_stat["bytes_written"], 2 * MIB + 4096);
    assert!(lv1_stat["num_write_ops"].as_u64().unwrap() >= 2);
    assert!(lv1_stat["bytes_read"].as_u64().unwrap() >= 2 * MIB + 4096);
    assert!(lv1_stat["write_latency_ticks"].as_u64().unwrap() > 0);
    assert_eq!(stat(&clone1)["bytes_written"], 4096);
    assert_eq!(stat(&vol0_uuid)["num_write_ops"], 0);
    let names = format!("lvs0/clone1,{lv1}");
    let chosen = c.ok(&call(
        "bdev_get_iostat",
        &["--names", &names],
        json!({"per_channel": false, "names": ["lvs0/clone1", lv1]}),
    ));
    let chosen: Vec<&Value> = chosen["bdevs"]
        .as_array()
        .expect("bdevs")
        .iter()
        .map(|b| &b["name"])
        .collect();
    assert_eq!(chosen, [&json!(clone1), &json!(lv1)]);
    fails_with(
        c,
        call(
            "bdev_get_iostat",
            &["--names", "nope"],
            json!({"per_channel": false, "names": ["nope"]}),
        ),
        enodev,
    );

    // Rename: the uuid stays, the alias follows.
    acked(
        c,
        call(
            "bdev_lvol_rename",
            &["lvs0/lv2", "lv2b"],
            json!({"old_name": "lvs0/lv2", "new_name": "lv2b"}),
        ),
    );
    let all = lvols(c);
    let renamed = lvol(&all, "lv2b");
    assert_eq!(renamed["uuid"], lv2);
    assert_eq!(renamed["alias"], "lvs0/lv2b");
    assert!(all.iter().all(|l| l["name"] != "lv2"));
    fails_with(
        c,
        call(
            "bdev_lvol_rename",
            &["lvs0/lv2b", "lv1"],
            json!({"old_name": "lvs0/lv2b", "new_name": "lv1"}),
        ),
        eexist,
    );
    fails_with(
        c,
        call(
            "bdev_lvol_rename",
            &["lvs0/nope", "lv9"],
            json!({"old_name": "lvs0/nope", "new_name": "lv9"}),
        ),
        enoent,
    );

    // Resize: a thick lvol allocates; an exported one shows its new size to new clients.
    acked(
        c,
        call(
            "bdev_lvol_resize",
            &["lvs0/lv2b", "12"],
            json!({"name": "lvs0/lv2b", "size_in_mib": 12}),
        ),
    );
    let lv2_bdev = bdev(c, "lvs0/lv2b");
    assert_eq!(lv2_bdev["num_blocks"], 12 * MIB / 4096);
    assert_eq!(
        lv2_bdev["driver_specific"]["lvol"]["num_allocated_clusters"],
        12
    );
    acked(
        c,
        call(
            "bdev_lvol_resize",
            &[clone1.as_str(), "32"],
            json!({"name": clone1, "size_in_mib": 32}),
        ),
    );
    let exported = spool_rpc(&daemon, "nbd_get_exports", &["--export-name", "clone1"]);
    assert_eq!(exported[0]["size"], 32 * MIB);
    assert_eq!(bdev(c, "lvs0/clone1")["num_blocks"], 32 * MIB / 4096);
    qemu_io(
        &daemon,
        "clone1",
        false,
        &["write -P 0x44 31M 1M", "read -P 0x33 0 4k"],
    );
    fails_with(
        c,
        call(
            "bdev_lvol_resize",
            &["lvs0/nope", "4"],
            json!({"name": "lvs0/nope", "size_in_mib": 4}),
        ),
        enoent,
    );

    // Read-only: no more writes.
    acked(
        c,
        call(
            "bdev_lvol_set_read_only",
            &["lvs0/lv2b"],
            json!({"name": "lvs0/lv2b"}),
        ),
    );
    let io_types = &bdev(c, "lvs0/lv2b")["supported_io_types"];
    assert_eq!(io_types["write"], false);
    assert_eq!(io_types["unmap"], false);
    assert_eq!(io_types["read"], true);
    fails_with(
        c,
        call(
            "bdev_lvol_set_read_only",
            &["lvs0/nope"],
            json!({"name": "lvs0/nope"}),
        ),
        enoent,
    );

    // Inflate: clone1 owns all its clusters and has no parent; its data stays.
    acked(
        c,
        call(
            "bdev_lvol_inflate",
            &["lvs0/clone1"],
            json!({"name": "lvs0/clone1"}),
        ),
    );
    let all = lvols(c);
    let inflated = lvol(&all, "clone1");
    assert_eq!(inflated["is_clone"], false);
    assert_eq!(inflated["is_thin_provisioned"], false);
    assert_eq!(inflated["num_allocated_clusters"], 32);
    assert_eq!(
        bdev(c, &snap1)["driver_specific"]["lvol"]["clones"],
        json!([lv1])
    );
    qemu_io(
        &daemon,
        "clone1",
        true,
        &[
            "read -P 0x33 0 4k",
            "read -P 0x11 4k 2044k",
            "read -P 0x00 2M 29M",
            "read -P 0x44 31M 1M",
        ],
    );
    fails_with(
        c,
        call(
            "bdev_lvol_inflate",
            &["lvs0/nope"],
            json!({"name": "lvs0/nope"}),
        ),
        enoent,
    );

    // Decouple: lv1 copies the cluster only snap1 had; it stays thin, with no parent.
    acked(
        c,
        call(
            "bdev_lvol_decouple_parent",
            &["lvs0/lv1"],
            json!({"name": "lvs0/lv1"}),
        ),
    );
    let all = lvols(c);
    let decoupled = lvol(&all, "lv1");
    assert_eq!(decoupled["is_clone"], false);
    assert_eq!(decoupled["is_thin_provisioned"], true);
    assert_eq!(decoupled["num_allocated_clusters"], 2);
    // As in SPDK, a snapshot is a blob with clones: snap1, with none left, is a read-only
    // lvol.
    assert_eq!(lvol(&all, "snap1")["is_snapshot"], false);
    let snap_bdev = bdev(c, &snap1);
    assert_eq!(snap_bdev["driver_specific"]["lvol"]["snapshot"], false);
    assert_eq!(snap_bdev["driver_specific"]["lvol"]["clones"], Value::Null);
    assert_eq!(snap_bdev["supported_io_types"]["write"], false);
    qemu_io(
        &daemon,
        "lv1",
        true,
        &[
            "read -P 0x22 0 4k",
            "read -P 0x11 4k 2044k",
            "read -P 0x00 2M 14M",
        ],
    );
    fails_with(
        c,
        call(
            "bdev_lvol_decouple_parent",
            &["lvs0/nope"],
            json!({"name": "lvs0/nope"}),
        ),
        enoent,
    );

    // Delete: not while exported; then every lvol but vol0, and the clusters come back.
    fails_with(
        c,
        call(
            "bdev_lvol_delete",
            &["lvs0/lv1"],
            json!({"name": "lvs0/lv1"}),
        ),
        ebusy,
    );
    for name in ["lv1", "snap1", "clone1"] {
        unexport(&daemon, name);
    }
    for name in [lv1.as_str(), "lvs0/snap1", "lvs0/clone1", "lvs0/lv2b"] {
        acked(c, call("bdev_lvol_delete", &[name], json!({"name": name})));
    }
    fails_with(
        c,
        call(
            "bdev_lvol_delete",
            &["lvs0/lv2b"],
            json!({"name": "lvs0/lv2b"}),
        ),
        enoent,
    );
    let all = lvols(c);
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0]["uuid"], vol0_uuid);
    assert_eq!(lvstore(c)["free_clusters"], total);

    // The store: renamed (the aliases follow), not deleted while vol0 is exported, deleted,
    // made again.
    acked(
        c,
        call(
            "bdev_lvol_rename_lvstore",
            &["lvs0", "lvs1"],
            json!({"old_name": "lvs0", "new_name": "lvs1"}),
        ),
    );
    let store = lvstore(c);
    assert_eq!(store["name"], "lvs1");
    assert_eq!(store["uuid"], lvs_uuid);
    assert_eq!(lvols(c)[0]["alias"], "lvs1/vol0");
    assert_eq!(bdev(c, "lvs1/vol0")["aliases"], json!(["lvs1/vol0"]));
    fails_with(
        c,
        call(
            "bdev_lvol_rename_lvstore",
            &["lvs0", "lvs2"],
            json!({"old_name": "lvs0", "new_name": "lvs2"}),
        ),
        enodev,
    );
    fails_with(
        c,
        call(
            "bdev_lvol_delete_lvstore",
            &["-l", "lvs1"],
            json!({"lvs_name": "lvs1"}),
        ),
        ebusy,
    );
    unexport(&daemon, "vol0");
    acked(
        c,
        call(
            "bdev_lvol_delete_lvstore",
            &["-u", &lvs_uuid],
            json!({"uuid": lvs_uuid}),
        ),
    );
    assert_eq!(
        c.ok(&call("bdev_lvol_get_lvstores", &[], json!({}))),
        json!([])
    );
    assert_eq!(
        c.ok(&call("bdev_lvol_get_lvols", &[], json!({}))),
        json!([])
    );
    fails_with(
        c,
        call(
            "bdev_lvol_delete_lvstore",
            &["-l", "lvs1"],
            json!({"lvs_name": "lvs1"}),
        ),
        enodev,
    );
    fails_with(
        c,
        call(
            "bdev_lvol_create_lvstore",
            &["nope", "lvs2"],
            json!({"bdev_name": "nope", "lvs_name": "lvs2"}),
        ),
        enodev,
    );
    let lvs2 = assert_uuid(&c.ok(&call(
        "bdev_lvol_create_lvstore",
        &["spool.img", "lvs2"],
        json!({"bdev_name": "spool.img", "lvs_name": "lvs2"}),
    )));
    assert_ne!(lvs2, lvs_uuid);
    let store = lvstore(c);
    assert_eq!(store["name"], "lvs2");
    assert_eq!(store["uuid"], lvs2);
    assert_eq!(store["free_clusters"], store["total_data_clusters"]);
    fails_with(
        c,
        call(
            "bdev_lvol_create_lvstore",
            &["spool.img", "lvs3"],
            json!({"bdev_name": "spool.img", "lvs_name": "lvs3"}),
        ),
        eexist,
    );
    let fresh = assert_uuid(&c.ok(&call(
        "bdev_lvol_create",
        &["-l", "lvs2", "-t", "fresh", "4"],
        json!({"lvol_name": "fresh", "size_in_mib": 4, "thin_provision": true, "lvs_name": "lvs2"}),
    )));
    export(&daemon, "lvs2/fresh", "fresh");
    qemu_io(
        &daemon,
        "fresh",
        false,
        &[
            "read -P 0x00 0 4M",
            "write -P 0x55 1M 8k",
            "read -P 0x55 1M 8k",
        ],
    );
    assert_eq!(bdev(c, "lvs2/fresh")["uuid"], fresh);

    // Stop: the daemon exits 0, its store clean, with the new store and lvol in it.
    acked(
        c,
        call(
            "spdk_kill_instance",
            &["SIGTERM"],
            json!({"sig_name": "SIGTERM"}),
        ),
    );
    let dir = daemon.dir.clone();
    daemon.wait_stopped();
    let info = spool_json(&dir, &["info", "spool.img"]);
    assert_eq!(info["lvs_name"], "lvs2", "{info}");
    let listed = spool_json(&dir, &["ls", "spool.img"]);
    assert!(
        listed
            .as_array()
            .expect("blobs")
            .iter()
            .any(|blob| blob["alias"] == "lvs2/fresh"),
        "{listed}"
    );
}

#[test]
fn spdks_own_client_drives_every_spdk_method() {
    require("spdk-rpc");
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), "", &[]);
    let mut client = SpdkRpc::new(&daemon);
    scenario(&mut client, daemon);
}

#[test]
fn spool_rpc_drives_the_same_scenario() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), "", &[]);
    let mut client = SpoolRpc::new(&daemon);
    scenario(&mut client, daemon);
}

// ---------------------------------------------------------------------------------------
// docs/operations.md's walk-through

/// The lines of the ```sh block after "A walk-through" in docs/operations.md.
fn walkthrough() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md");
    let doc = std::fs::read_to_string(&path).expect("docs/operations.md");
    let after = doc
        .find("A walk-through")
        .map(|at| &doc[at..])
        .expect("docs/operations.md has \"A walk-through\"");
    let block = after
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .map(|(block, _)| block)
        .expect("a ```sh block after it");
    block
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(str::to_string)
        .collect()
}

#[test]
fn the_operations_walkthrough_runs_as_written() {
    require("spdk-rpc");
    require("qemu-io");
    let lines = walkthrough();
    // It starts the daemon, and stops it with SPDK's call.
    let (first, rest) = lines.split_first().expect("a walk-through");
    assert!(first.starts_with("spool serve &"), "{first}");
    assert!(
        rest.last()
            .is_some_and(|last| last.contains("spdk_kill_instance SIGTERM")),
        "{lines:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), "", &[]);
    assert!(
        daemon
            .banner
            .iter()
            .any(|line| line.starts_with("spool serve: export vol0 ")),
        "{:?}",
        daemon.banner
    );
    let socket = daemon.rpc_socket().display().to_string();
    let listen = format!("127.0.0.1:{}", daemon.port);
    let spool_dir = Path::new(env!("CARGO_BIN_EXE_spool"))
        .parent()
        .expect("the binary's directory")
        .display()
        .to_string();
    let mut ran = Vec::new();
    for line in rest {
        // The daemon's own socket and port; `spool rpc` told the socket (it takes the
        // default, /var/tmp/spool.sock, as the page's spdk-rpc lines name it).
        assert!(
            line.starts_with("spdk-rpc ")
                || line.starts_with("spool rpc ")
                || line.starts_with("qemu-io "),
            "a line the test does not know how to run: {line}"
        );
        let command = line
            .replace(DEFAULT_RPC_SOCKET, &socket)
            .replace(DEFAULT_LISTEN, &listen)
            .replace("spool rpc ", &format!("spool rpc -s {socket} "));
        let script = format!("PATH='{spool_dir}':\"$PATH\"; {command}");
        let mut run = run_client(dir.path(), "sh", &["-c", &script], LIMIT);
        // The qemu-io before it has exited, but the daemon may not have seen its connection
        // close yet: nbd_stop_export answers -EBUSY until it has (the page says to retry).
        let deadline = Instant::now() + Duration::from_secs(10);
        while line.contains("nbd_stop_export")
            && run.stderr.contains("code -16")
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
            run = run_client(dir.path(), "sh", &["-c", &script], LIMIT);
        }
        assert!(
            run.status.success(),
            "{line}\nran as {command}\nfailed ({}):\n{}\n{}",
            run.status,
            run.stdout,
            run.stderr
        );
        if line.starts_with("qemu-io ") {
            // Its pattern reads verify what they read.
            for bad in ["failed", "error", "Error"] {
                assert!(
                    !run.stdout.contains(bad) && !run.stderr.contains(bad),
                    "{line}: {bad}:\n{}\n{}",
                    run.stdout,
                    run.stderr
                );
            }
        }
        ran.push((line.clone(), run.stdout));
    }
    daemon.wait_stopped();
    // What some lines printed: the new lvols' uuids, the lvols, what vol0 was written.
    for (line, stdout) in &ran {
        if line.contains("bdev_lvol_snapshot")
            || line.contains("bdev_lvol_clone")
            || line.contains("bdev_lvol_create ")
        {
            let value = serde_json::from_str(stdout.trim())
                .unwrap_or_else(|_| Value::String(stdout.trim().to_string()));
            assert_uuid(&value);
        }
        if line.contains("bdev_lvol_get_lvols") {
            let lvols: Value = serde_json::from_str(stdout).expect("lvols as JSON");
            let mut names: Vec<&str> = lvols
                .as_array()
                .expect("lvols")
                .iter()
                .map(|l| l["name"].as_str().unwrap())
                .collect();
            names.sort_unstable();
            assert_eq!(names, ["clone1", "lv1", "snap0", "snap1", "vol0"], "{line}");
        }
        if line.contains("bdev_get_iostat") {
            let stats: Value = serde_json::from_str(stdout).expect("iostat as JSON");
            let written: u64 = stats["bdevs"]
                .as_array()
                .expect("bdevs")
                .iter()
                .map(|b| b["bytes_written"].as_u64().unwrap())
                .sum();
            assert_eq!(written, MIB + 4096, "{line}: {stats}");
        }
    }
}
