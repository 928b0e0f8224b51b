//! Human-readable sizes: a number with an optional binary suffix.
//!
//! [`parse_size`] is for sizes that must be positive (devices, clusters, blocks);
//! [`parse_bytes`] also takes 0 (offsets, lengths, a blob's new size).

use crate::EngineError;

/// Parses "4096", "4k", "512M", "1G", "1GiB", "2T" (suffixes are powers of 1024, case
/// insensitive, optional "iB"/"B"; a trailing plain "B" means bytes: "512B"), or a hex
/// number "0x1000" (no suffix). Zero and overflow are errors.
pub fn parse_size(text: &str) -> Result<u64, EngineError> {
    let size = parse_bytes(text)?;
    if size == 0 {
        return Err(bad_size(text.trim()));
    }
    Ok(size)
}

/// Like [`parse_size`], but 0 is accepted: for offsets, lengths and sizes that may be empty.
pub fn parse_bytes(text: &str) -> Result<u64, EngineError> {
    let trimmed = text.trim();
    let bad = || bad_size(trimmed);
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
    let body = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (digits, shift) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 10),
        Some('m') => (&body[..body.len() - 1], 20),
        Some('g') => (&body[..body.len() - 1], 30),
        Some('t') => (&body[..body.len() - 1], 40),
        Some('p') => (&body[..body.len() - 1], 50),
        _ => (body, 0),
    };
    let digits = digits.trim();
    // "iB" alone after the digits ("4iB") is not a size; a bare "B" is ("512B").
    if lower.ends_with("ib") && shift == 0 {
        return Err(bad());
    }
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let number: u64 = digits.parse().map_err(|_| bad())?;
    number.checked_mul(1u64 << shift).ok_or_else(bad)
}

fn bad_size(text: &str) -> EngineError {
    EngineError::InvalidArgument(format!(
        "bad size '{text}' (expected e.g. 4096, 64K, 16MiB, 1G or 0x1000)"
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
        assert_eq!(parse_size("1GB").unwrap(), 1 << 30);
        assert_eq!(parse_size("2TB").unwrap(), 2 << 40);
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
            assert!(err.to_string().contains("bad size"), "{err}");
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
