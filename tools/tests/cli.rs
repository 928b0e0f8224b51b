//! Goal: `spool perf` keeps its command-line contract: the JSON shape, the created file,
//! exit codes and one-line errors. Method: run the built binary on short jobs.

use std::process::{Command, Output};

fn spool(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_spool"))
        .args(args)
        .output()
        .expect("spool runs")
}

fn json_of(output: &Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("stdout is one JSON object")
}

fn assert_figures(figures: &serde_json::Value) {
    for key in ["iops", "mib_s"] {
        assert!(
            figures[key].as_f64().expect(key) > 0.0,
            "{key} in {figures}"
        );
    }
    let lat = &figures["lat_us"];
    for key in ["mean", "p50", "p99", "p999", "max"] {
        assert!(
            lat[key].as_f64().expect(key) > 0.0,
            "lat_us.{key} in {figures}"
        );
    }
    assert!(lat["p50"].as_f64() <= lat["p99"].as_f64());
    assert!(lat["p99"].as_f64() <= lat["p999"].as_f64());
    assert!(lat["p999"].as_f64() <= lat["max"].as_f64());
}

#[test]
fn perf_null_json_has_total_and_per_core_figures() {
    let output = spool(&[
        "perf", "--target", "null", "--rw", "randread", "--bs", "4096", "--qd", "8", "--time",
        "0.3", "--cores", "0", "--json", "--quiet",
    ]);
    let report = json_of(&output);
    assert_figures(&report["total"]);
    let cores = report["cores"].as_array().expect("cores array");
    assert_eq!(cores.len(), 1);
    assert_eq!(cores[0]["core"], 0);
    assert_figures(&cores[0]);
    let mib_s = report["total"]["mib_s"].as_f64().unwrap();
    let iops = report["total"]["iops"].as_f64().unwrap();
    assert!(
        (mib_s - iops * 4096.0 / 1048576.0).abs() < 1e-6 * mib_s.max(1.0),
        "MiB/s follows from IOPS and bs"
    );
}

#[test]
fn perf_malloc_randrw_and_sequential_jobs_run() {
    for rw in ["randrw", "write", "read", "randwrite"] {
        let output = spool(&[
            "perf",
            "--target",
            "malloc:64M",
            "--rw",
            rw,
            "--rwmix",
            "50",
            "--qd",
            "4",
            "--time",
            "0.2",
            "--json",
            "--quiet",
        ]);
        let report = json_of(&output);
        assert_figures(&report["total"]);
        assert_eq!(report["config"]["rw"], rw);
    }
}

#[test]
fn perf_creates_a_missing_file_fully_written_then_reuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dev.img");
    let path_text = path.to_str().unwrap();
    let output = spool(&[
        "perf",
        "--target",
        path_text,
        "--size",
        "8M",
        "--rw",
        "randwrite",
        "--qd",
        "4",
        "--time",
        "0.3",
        "--json",
        "--quiet",
    ]);
    let report = json_of(&output);
    assert_figures(&report["total"]);
    assert!(
        report["config"]["kind"]
            .as_str()
            .unwrap()
            .starts_with("uring, file on "),
        "{report}"
    );
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), 8 << 20);
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.blocks() * 512 >= 8 << 20,
        "the created file is fully allocated"
    );
    // An existing path is used as it is: --size does not change it.
    let output = spool(&[
        "perf", "--target", path_text, "--size", "64M", "--qd", "2", "--time", "0.2", "--json",
        "--quiet",
    ]);
    let report = json_of(&output);
    assert_eq!(report["config"]["size_bytes"], 8 << 20);
}

#[test]
fn bad_arguments_exit_2_with_one_line_errors() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["perf", "--target", "null", "--bs", "1000", "--time", "0.1"],
            "multiple of the block size",
        ),
        (
            &["perf", "--target", "malloc", "--time", "0.1"],
            "malloc needs a size",
        ),
        (
            &["perf", "--target", "malloc:huge", "--time", "0.1"],
            "bad size",
        ),
        (
            &[
                "perf", "--target", "null", "--cores", "0,0", "--time", "0.1",
            ],
            "core 0 given twice",
        ),
        (
            &[
                "perf", "--target", "null", "--cores", "4096", "--time", "0.1",
            ],
            "not available",
        ),
        (
            &["perf", "--target", "null", "--cores", "x", "--time", "0.1"],
            "bad core list",
        ),
        (&["perf", "--target", "null", "--time", "0"], "--time"),
    ];
    for (args, needle) in cases {
        let output = spool(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        let line = stderr.lines().last().unwrap_or_default();
        assert!(line.starts_with("error: "), "{args:?}: {stderr}");
        assert!(
            line.contains(needle),
            "{args:?}: expected '{needle}' in {line}"
        );
        assert!(
            output.stdout.is_empty(),
            "nothing on stdout for a refused run"
        );
    }
}

#[test]
fn an_unusable_path_is_a_clear_error() {
    let output = spool(&[
        "perf",
        "--target",
        "/nonexistent-dir/spool.img",
        "--time",
        "0.1",
        "--quiet",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("/nonexistent-dir/spool.img"),
        "the error names the path: {stderr}"
    );
    let dir = tempfile::tempdir().unwrap();
    let output = spool(&[
        "perf",
        "--target",
        dir.path().to_str().unwrap(),
        "--time",
        "0.1",
        "--quiet",
    ]);
    assert_ne!(output.status.code(), Some(0), "a directory is not a device");
}

/// `--plot FILE.svg` draws the run: a latency histogram and IOPS over time, one labelled line
/// per core in each panel.
#[test]
fn perf_plot_writes_an_svg_with_a_latency_and_an_iops_series_per_core() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.svg");
    let output = spool(&[
        "perf",
        "--target",
        "null",
        "--qd",
        "4",
        "--time",
        "0.5",
        "--cores",
        "0,1",
        "--quiet",
        "--json",
        "--plot",
        path.to_str().unwrap(),
    ]);
    let report = json_of(&output);
    assert!(
        report.get("series").is_none(),
        "the series stay out of the JSON"
    );
    let svg = std::fs::read_to_string(&path).expect("the SVG was written");
    assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
    assert!(svg.trim_end().ends_with("</svg>"));
    assert!(
        svg.contains("latency: null randread bs=4096 qd=4"),
        "latency caption"
    );
    assert!(
        svg.contains("IOPS over time: null randread"),
        "IOPS caption"
    );
    for core in ["core 0", "core 1"] {
        assert_eq!(
            svg.matches(core).count(),
            2,
            "{core} labels a line in both panels' legends"
        );
    }
    // Data lines (many points), as opposed to axis ticks and legend swatches (two).
    let data_lines = svg
        .split("<polyline")
        .skip(1)
        .filter(|element| {
            let points = element.split("points=\"").nth(1).unwrap_or("");
            points
                .split('"')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .count()
                >= 4
        })
        .count();
    assert!(data_lines >= 4, "{data_lines} data lines: two per core");
    // A metadata run has nothing to plot: a usage error (exit 2), nothing written.
    let md = dir.path().join("md.svg");
    let output = spool(&[
        "perf",
        "--target",
        "malloc:64M",
        "--layer",
        "md",
        "--plot",
        md.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(!md.exists());
}
