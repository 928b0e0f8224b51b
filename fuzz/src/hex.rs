//! Hex encoding of fuzz inputs: the reproducer format the driver prints and writes.

/// Lower-case hex of `bytes`, no separators.
pub fn encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    out
}

/// Bytes of a hex string; whitespace and a leading `0x` are ignored.
pub fn decode(text: &str) -> Result<Vec<u8>, String> {
    let text = text.trim();
    let text = text.strip_prefix("0x").unwrap_or(text);
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !digits.len().is_multiple_of(2) {
        return Err(format!("odd number of hex digits ({})", digits.len()));
    }
    let value = |d: u8| -> Result<u8, String> {
        char::from(d)
            .to_digit(16)
            .map(|v| v as u8)
            .ok_or_else(|| format!("{:?} is not a hex digit", char::from(d)))
    };
    digits
        .chunks_exact(2)
        .map(|pair| Ok(value(pair[0])? << 4 | value(pair[1])?))
        .collect()
}

/// A readable form: the whole hex for short inputs; otherwise the length and the runs of
/// non-zero bytes as `offset: hex` lines (zero gaps shorter than 16 bytes are kept inside a
/// run), which is how md pages are easiest to read.
pub fn describe(bytes: &[u8]) -> String {
    if bytes.len() <= 256 {
        return format!("hex ({} bytes): {}", bytes.len(), encode(bytes));
    }
    let mut out = format!(
        "{} bytes, all zero except (offset: hex; full hex in the .hex file):",
        bytes.len()
    );
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] == 0 {
            at += 1;
            continue;
        }
        let start = at;
        let mut end = at;
        while at < bytes.len() && at - end < 16 {
            if bytes[at] != 0 {
                end = at + 1;
            }
            at += 1;
        }
        for piece in (start..end).step_by(64) {
            let stop = (piece + 64).min(end);
            out.push_str(&format!("\n  {piece:6}: {}", encode(&bytes[piece..stop])));
        }
        at = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let bytes = [0u8, 1, 0xAB, 0xFF];
        assert_eq!(encode(&bytes), "0001abff");
        assert_eq!(decode("0x00 01\nab ff").unwrap(), bytes);
        assert!(decode("abc").is_err());
        assert!(decode("zz").is_err());
        let mut long = vec![0u8; 1000];
        long[500] = 7;
        assert!(describe(&long).contains("   500: 07"));
    }
}
