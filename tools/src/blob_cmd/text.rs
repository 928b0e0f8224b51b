//! Text helpers: byte strings shown safely on one line, hex, sizes, and stdout that does not
//! panic on a closed pipe.

use std::fmt::Write as _;
use std::io::Write as _;

use crate::error::ToolError;

/// Lowercase hex of `bytes`, two digits a byte.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

/// Parses lowercase or uppercase hex ("68656c6c6f00"); `None` unless it is whole bytes.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(&text[at..at + 2], 16).ok())
        .collect()
}

/// `bytes` without its trailing NULs, and how many there were.
pub fn strip_nuls(bytes: &[u8]) -> (&[u8], usize) {
    let end = bytes
        .iter()
        .rposition(|&b| b != 0)
        .map_or(0, |last| last + 1);
    (&bytes[..end], bytes.len() - end)
}

/// `bytes` as one line of text: valid UTF-8 as it is, except backslash, `\0`, `\n`, `\t`,
/// `\r`, and other control characters and invalid bytes, which are escaped as `\xNN` (each
/// byte).
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for ch in chunk.valid().chars() {
            match ch {
                '\\' => out.push_str("\\\\"),
                '\0' => out.push_str("\\0"),
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                '\r' => out.push_str("\\r"),
                ch if ch.is_control() => {
                    let mut utf8 = [0u8; 4];
                    for byte in ch.encode_utf8(&mut utf8).bytes() {
                        let _ = write!(out, "\\x{byte:02x}");
                    }
                }
                ch => out.push(ch),
            }
        }
        for byte in chunk.invalid() {
            let _ = write!(out, "\\x{byte:02x}");
        }
    }
    out
}

/// A value as `ls` shows it: escaped, trailing NULs counted instead of shown.
pub fn show_value(value: &[u8]) -> String {
    let (text, nuls) = strip_nuls(value);
    match nuls {
        0 => escape(text),
        count => format!("{} (+{count} NUL)", escape(text)),
    }
}

/// A name value (xattr `name`) as text: trailing NULs stripped, lossy UTF-8.
pub fn name_of(value: &[u8]) -> String {
    String::from_utf8_lossy(strip_nuls(value).0).into_owned()
}

/// Bytes in the largest binary unit that divides them exactly ("4 MiB", "12 KiB", "5000 B").
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u32); 5] = [
        ("PiB", 50),
        ("TiB", 40),
        ("GiB", 30),
        ("MiB", 20),
        ("KiB", 10),
    ];
    if bytes == 0 {
        return "0 B".into();
    }
    for (unit, shift) in UNITS {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{} {unit}", bytes >> shift);
        }
    }
    format!("{bytes} B")
}

/// A blob id as SPDK prints it (`0x100000000`).
pub fn id_hex(id: u64) -> String {
    format!("{id:#x}")
}

/// Writes `text` to stdout. A closed pipe (`spool ls | head -1`) ends the output quietly;
/// other write errors are reported.
pub fn emit(text: &str) -> Result<(), ToolError> {
    emit_bytes(text.as_bytes())
}

/// Writes `bytes` to stdout, as [`emit`] does.
pub fn emit_bytes(bytes: &[u8]) -> Result<(), ToolError> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(err) => Err(ToolError::Failed(format!(
            "stdout: {}",
            spool_engine::words::failure("write", &err)
        ))),
    }
}

/// Rows of cells as a table: columns padded to their widest cell, two spaces apart, no
/// trailing spaces.
pub fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|col| {
            rows.iter()
                .filter_map(|row| row.get(col))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (col, cell) in row.iter().enumerate() {
            if col > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            if col + 1 < row.len() {
                let pad = widths[col].saturating_sub(cell.chars().count());
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_keeps_one_line_and_every_byte_visible() {
        assert_eq!(escape(b"hello"), "hello");
        assert_eq!(escape(b"a\0b\n\\"), "a\\0b\\n\\\\");
        assert_eq!(escape(&[0xff, b'x']), "\\xffx");
        assert_eq!(escape("café".as_bytes()), "café");
        assert_eq!(escape(b"\x1b"), "\\x1b");
        assert_eq!(escape(b"\x03\0\0\0\x01"), "\\x03\\0\\0\\0\\x01");
        assert_eq!(escape("\u{85}".as_bytes()), "\\xc2\\x85");
        assert_eq!(show_value(b"hello\0"), "hello (+1 NUL)");
        assert_eq!(show_value(b""), "");
        assert_eq!(name_of(b"lv0\0\0\0"), "lv0");
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(hex(b"hello\0"), "68656c6c6f00");
        assert_eq!(unhex("68656C6c6f00").unwrap(), b"hello\0");
        assert_eq!(unhex("").unwrap(), b"");
        assert!(unhex("abc").is_none());
        assert!(unhex("zz").is_none());
        assert!(unhex("é1").is_none());
    }

    #[test]
    fn sizes_use_the_largest_exact_unit() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(4096), "4 KiB");
        assert_eq!(human_bytes(4 << 20), "4 MiB");
        assert_eq!(human_bytes(1536 << 10), "1536 KiB");
        assert_eq!(human_bytes(5000), "5000 B");
        assert_eq!(human_bytes(1 << 30), "1 GiB");
    }

    #[test]
    fn tables_align_columns() {
        let rows = vec![
            vec!["ID".to_string(), "NAME".into(), "X".into()],
            vec!["0x1".to_string(), "a".into(), "-".into()],
        ];
        assert_eq!(table(&rows), "ID   NAME  X\n0x1  a     -\n");
    }
}
