//! Human-readable sizes: a number with an optional binary suffix.

use crate::EngineError;

/// Parses "4096", "4k", "512M", "1G", "1GiB", "2T" (suffixes are powers of 1024, case
/// insensitive, optional "iB"/"B"). Zero and overflow are errors.
pub fn parse_size(text: &str) -> Result<u64, EngineError> {
    let trimmed = text.trim();
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
        _ => (body, 0),
    };
    let bad = || {
        EngineError::InvalidArgument(format!(
            "bad size '{trimmed}' (expected e.g. 4096, 64M, 1G)"
        ))
    };
    let number: u64 = digits.trim().parse().map_err(|_| bad())?;
    let size = number.checked_mul(1u64 << shift).ok_or_else(bad)?;
    if size == 0 {
        return Err(bad());
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("2TB").unwrap(), 2 << 40);
    }

    #[test]
    fn bad_sizes_are_einval() {
        for text in ["", "0", "G", "-1", "1.5G", "99999999999T", "12Q"] {
            let err = parse_size(text).unwrap_err();
            assert_eq!(err.errno(), -libc::EINVAL, "{text}");
            assert!(err.to_string().contains("bad size"), "{err}");
        }
    }
}
