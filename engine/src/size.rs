//! Human-readable sizes: a number with an optional unit suffix.
//!
//! `K`, `M`, `G`, `T`, `P` and `KiB` ... `PiB` are powers of 1024; `KB`, `MB`, `GB`, `TB`,
//! `PB` are powers of 1000, as `dd` and `truncate` read them (any case: `100mb` is 100 MB,
//! 100,000,000 bytes). A plain `B` means bytes. [`parse_size`] is for sizes that must be
//! positive (devices, clusters, blocks); [`parse_bytes`] also takes 0 (offsets, lengths, a
//! blob's new size).

use crate::EngineError;

/// Parses "4096", "4k", "512M", "1G", "1GiB", "2T" (powers of 1024), "100MB", "1GB"
/// (powers of 1000), "512B" (bytes), or a hex number "0x1000" (no suffix); case
/// insensitive. Zero, negative numbers and overflow are errors.
pub fn parse_size(text: &str) -> Result<u64, EngineError> {
    let size = parse_bytes(text)?;
    if size == 0 {
        return Err(EngineError::InvalidArgument(format!(
            "size cannot be 0 ('{}'): give a size of at least one byte",
            text.trim()
        )));
    }
    Ok(size)
}

/// Like [`parse_size`], but 0 is accepted: for offsets, lengths and sizes that may be empty.
pub fn parse_bytes(text: &str) -> Result<u64, EngineError> {
    let trimmed = text.trim();
    let bad = || bad_size(trimmed);
    // "-0" is zero, not a negative size.
    if let Some(rest) = trimmed.strip_prefix('-').filter(|rest| is_zero(rest)) {
        return parse_bytes(rest);
    }
    if trimmed.starts_with('-') && trimmed.len() > 1 {
        return Err(EngineError::InvalidArgument(format!(
            "size cannot be negative ('{trimmed}')"
        )));
    }
    if let Some(hex) = trimmed
        .strip_prefix("0x")
        .or_else(|| trimmed.strip_prefix("0X"))
    {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        return u64::from_str_radix(hex, 16).map_err(|_| bad());
    }
    let lower = trimmed.to_ascii_lowercase();
    // "KiB" is binary, "KB" decimal, "K" binary; a plain "B" after the digits is bytes.
    let (body, decimal) = if let Some(body) = lower.strip_suffix("ib") {
        (body, false)
    } else if let Some(body) = lower.strip_suffix('b') {
        (body, true)
    } else {
        (lower.as_str(), false)
    };
    let (digits, power) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 1),
        Some('m') => (&body[..body.len() - 1], 2),
        Some('g') => (&body[..body.len() - 1], 3),
        Some('t') => (&body[..body.len() - 1], 4),
        Some('p') => (&body[..body.len() - 1], 5),
        _ => (body, 0),
    };
    let digits = digits.trim();
    // "iB" alone after the digits ("4iB") is not a size; a bare "B" is ("512B").
    if lower.ends_with("ib") && power == 0 {
        return Err(bad());
    }
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let number: u64 = digits.parse().map_err(|_| bad())?;
    let base: u64 = if decimal { 1000 } else { 1024 };
    number.checked_mul(base.pow(power)).ok_or_else(bad)
}

/// Whether `text` is a zero size ("0", "0K", "0x0", ...), whatever its unit.
fn is_zero(text: &str) -> bool {
    !text.starts_with('-') && parse_bytes(text).is_ok_and(|size| size == 0)
}

fn bad_size(text: &str) -> EngineError {
    EngineError::InvalidArgument(format!(
        "bad size '{text}' (expected e.g. 4096, 64K, 16MiB, 1G, 0x1000, or 100MB for 10^6 units)"
    ))
}

#[cfg(test)]
mod tests {
    use super::{parse_bytes, parse_size};

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("64K").unwrap(), 64 << 10);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("16MiB").unwrap(), 16 << 20);
        assert_eq!(parse_size("16mib").unwrap(), 16 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(
            parse_size("1GB").unwrap(),
            1_000_000_000,
            "GB is decimal, as dd reads it"
        );
        assert_eq!(parse_size("100MB").unwrap(), 100_000_000);
        assert_eq!(parse_size("100mb").unwrap(), 100_000_000);
        assert_eq!(parse_size("2TB").unwrap(), 2_000_000_000_000);
        assert_eq!(parse_size("4KB").unwrap(), 4000);
        assert_eq!(parse_size("100MiB").unwrap(), 100 << 20);
        assert_eq!(parse_size("2T").unwrap(), 2 << 40);
        assert_eq!(parse_size("1P").unwrap(), 1 << 50);
        assert_eq!(parse_size("512B").unwrap(), 512);
        assert_eq!(parse_size(" 8 M ").unwrap(), 8 << 20);
        assert_eq!(parse_size("0x1000").unwrap(), 4096);
        assert_eq!(
            parse_size("0X1b").unwrap(),
            0x1b,
            "hex digits, not a suffix"
        );
    }

    #[test]
    fn bad_sizes_are_einval() {
        for text in [
            "",
            "0",
            "G",
            "-1",
            "+1",
            "1.5G",
            "99999999999T",
            "12Q",
            "4iB",
            "0x",
            "0xg",
            "0x0",
            "1e6",
            "M1",
            "1 2",
        ] {
            let err = parse_size(text).unwrap_err();
            assert_eq!(err.errno(), -libc::EINVAL, "{text}");
            let said = err.to_string();
            assert!(
                said.contains("bad size")
                    || said.contains("cannot be negative")
                    || said.contains("cannot be 0"),
                "{said}"
            );
        }
    }

    #[test]
    fn zero_is_said_as_zero_and_minus_zero_is_not_negative() {
        for text in ["0", "-0", "0K", "0x0"] {
            assert_eq!(
                parse_size(text).unwrap_err().to_string(),
                format!("size cannot be 0 ('{text}'): give a size of at least one byte")
            );
        }
        assert_eq!(parse_bytes("-0").unwrap(), 0);
        assert_eq!(parse_bytes("-0K").unwrap(), 0);
    }

    #[test]
    fn negative_sizes_say_so() {
        for text in ["-1", "-4096", "-1M"] {
            let err = parse_bytes(text).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("size cannot be negative ('{text}')")
            );
        }
    }

    #[test]
    fn bytes_accept_zero_and_refuse_the_rest_alike() {
        assert_eq!(parse_bytes("0").unwrap(), 0);
        assert_eq!(parse_bytes("0K").unwrap(), 0);
        assert_eq!(parse_bytes("0x0").unwrap(), 0);
        assert_eq!(parse_bytes("12288").unwrap(), 12288);
        assert_eq!(parse_bytes("3M").unwrap(), 3 << 20);
        for text in [
            "",
            "-4096",
            "x",
            "18446744073709551616",
            "0x10000000000000000",
        ] {
            assert!(parse_bytes(text).is_err(), "{text}");
        }
    }
}
