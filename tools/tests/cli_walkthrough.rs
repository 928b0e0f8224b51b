//! Goal: docs/cli.md stays true: every command it shows runs, in order, and prints what the
//! page says. Method: extract the `$ ` lines of its ```console blocks and run them with
//! `sh -c` in an empty directory, the `spool` just built first on PATH (the conventions are
//! at the end of docs/cli.md).

use std::path::Path;
use std::process::Command;

/// Where the expected lines are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

/// One `$ ` line and what must come of it.
#[derive(Debug)]
struct Step {
    /// Line number in docs/cli.md (1-based).
    line: usize,
    command: String,
    expected: Vec<String>,
    exit: i32,
    stream: Stream,
}

/// `# exit N` or `# stderr` at the end of a command.
fn markers(command: &str) -> (i32, Stream) {
    let Some((_, comment)) = command.rsplit_once(" # ") else {
        return (0, Stream::Stdout);
    };
    let comment = comment.trim();
    if comment == "stderr" {
        return (0, Stream::Stderr);
    }
    match comment
        .strip_prefix("exit ")
        .and_then(|n| n.trim().parse().ok())
    {
        Some(code) => (code, Stream::Stderr),
        None => (0, Stream::Stdout),
    }
}

fn parse(doc: &str) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    let mut fence: Option<bool> = None; // Some(is_console) inside a block
    for (index, line) in doc.lines().enumerate() {
        let number = index + 1;
        if let Some(info) = line.trim_start().strip_prefix("```") {
            fence = match fence {
                None => Some(info.trim() == "console"),
                Some(_) => None,
            };
            continue;
        }
        if fence != Some(true) {
            continue;
        }
        if let Some(command) = line.strip_prefix("$ ") {
            let (exit, stream) = markers(command);
            steps.push(Step {
                line: number,
                command: command.to_string(),
                expected: Vec::new(),
                exit,
                stream,
            });
        } else {
            let step = steps
                .last_mut()
                .filter(|step| step.line < number)
                .unwrap_or_else(|| panic!("docs/cli.md:{number}: output before any command"));
            step.expected.push(line.trim_end().to_string());
        }
    }
    assert!(fence.is_none(), "docs/cli.md: a code block is not closed");
    steps
}

/// Whether `actual` lines match `expected`, where a `...` line matches any lines.
fn matches(expected: &[String], actual: &[&str]) -> bool {
    match expected.split_first() {
        None => actual.is_empty(),
        Some((first, rest)) if first == "..." => {
            (0..=actual.len()).any(|skip| matches(rest, &actual[skip..]))
        }
        Some((first, rest)) => actual
            .split_first()
            .is_some_and(|(line, more)| line == first && matches(rest, more)),
    }
}

fn lines(text: &str) -> Vec<&str> {
    let mut lines: Vec<&str> = text.lines().map(str::trim_end).collect();
    while lines.last() == Some(&"") {
        lines.pop();
    }
    lines
}

fn run(step: &Step, dir: &Path, path: &str) {
    let output = Command::new("sh")
        .arg("-c")
        .arg(&step.command)
        .current_dir(dir)
        .env("PATH", path)
        .env_remove("SPOOL_LOG")
        .output()
        .expect("sh runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let context = format!(
        "docs/cli.md:{}: $ {}\n--- stdout\n{stdout}--- stderr\n{stderr}",
        step.line, step.command
    );
    assert!(!stderr.contains("panicked"), "{context}");
    assert_eq!(
        output.status.code(),
        Some(step.exit),
        "exit status of {context}"
    );
    let actual = match step.stream {
        Stream::Stdout => lines(&stdout),
        Stream::Stderr => lines(&stderr),
    };
    assert!(
        matches(&step.expected, &actual),
        "{context}--- expected ({:?})\n{}\n",
        step.stream,
        step.expected.join("\n")
    );
}

#[test]
fn every_command_of_docs_cli_md_runs_as_shown() {
    let doc_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/cli.md");
    let doc = std::fs::read_to_string(&doc_path).expect("docs/cli.md");
    let steps = parse(&doc);
    // The page walks through every blobstore command.
    for command in [
        "init",
        "info",
        "ls",
        "create",
        "resize",
        "delete",
        "set-read-only",
        "xattr",
        "super",
        "import",
        "export",
        "dump",
    ] {
        let prefix = format!("spool {command} ");
        assert!(
            steps.iter().any(|step| step.command.starts_with(&prefix)),
            "docs/cli.md shows no `$ spool {command}`"
        );
    }
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_spool"))
        .parent()
        .expect("the binary's folder");
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into())
    );
    let dir = tempfile::tempdir().unwrap();
    for step in &steps {
        run(step, dir.path(), &path);
    }
}

#[test]
fn the_conventions_parse_as_documented() {
    let doc = "text\n```console\n$ spool a\nout\n...\n$ b   # exit 1\nerror: x\n```\n```text\n$ not run\n```\n$ outside\n```console\n$ c # stderr\n```\n";
    let steps = parse(doc);
    assert_eq!(steps.len(), 3);
    assert_eq!(steps[0].command, "spool a");
    assert_eq!(steps[0].expected, ["out", "..."]);
    assert_eq!((steps[0].exit, steps[0].stream), (0, Stream::Stdout));
    assert_eq!((steps[1].exit, steps[1].stream), (1, Stream::Stderr));
    assert_eq!(steps[1].expected, ["error: x"]);
    assert_eq!((steps[2].exit, steps[2].stream), (0, Stream::Stderr));
    let expected = |lines: &[&str]| lines.iter().map(|l| l.to_string()).collect::<Vec<_>>();
    assert!(matches(
        &expected(&["a", "...", "z"]),
        &["a", "b", "c", "z"]
    ));
    assert!(matches(&expected(&["a", "...", "z"]), &["a", "z"]));
    assert!(!matches(&expected(&["a", "...", "z"]), &["a", "b"]));
    assert!(matches(&expected(&[]), &[]));
    assert!(!matches(&expected(&[]), &["x"]));
}
