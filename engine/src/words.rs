//! Errors in words: the one place that turns an OS error (an errno, a [`std::io::Error`])
//! into the phrase a person reads, with no errno number and no Rust error tail. A full host
//! filesystem is said as such everywhere ("the host filesystem is full ...").

/// The phrase for a positive errno `code`: lower case, no number.
pub fn errno_words(code: i32) -> String {
    let phrase = match code {
        libc::ENOSPC => "no space left on the host filesystem",
        libc::EACCES => "permission denied",
        libc::EPERM => "operation not permitted (is it immutable? see lsattr)",
        libc::EROFS => "on a read-only filesystem",
        libc::ENOENT => "no such file or directory",
        libc::EISDIR => "is a directory",
        libc::ENOTDIR => "a part of the path is not a directory",
        libc::EEXIST => "exists already",
        libc::EBUSY => "in use by another process",
        libc::EPIPE => "the reader went away (broken pipe)",
        libc::EIO => "input/output error on the device",
        libc::EDQUOT => "disk quota exceeded on the host filesystem",
        libc::EFBIG => "the write reaches past the largest file size the host filesystem (or the file size limit, ulimit -f) allows",
        libc::ENODEV | libc::ENXIO => "no such device",
        libc::EOPNOTSUPP => "not supported by the host filesystem",
        libc::EADDRINUSE => "address already in use (another process listens there)",
        libc::EADDRNOTAVAIL => "this host has no such address (see ip addr)",
        libc::ECONNREFUSED => "connection refused: nothing listens there (is spool serve running?)",
        libc::ENOTSOCK => "not a socket",
        libc::EINTR => "interrupted by a signal",
        libc::ETIMEDOUT => "timed out",
        _ => return strip_os_error(&std::io::Error::from_raw_os_error(code).to_string()),
    };
    phrase.to_string()
}

/// The phrase for `err` (an OS error by its errno, any other by its text).
pub fn io_words(err: &std::io::Error) -> String {
    match err.raw_os_error() {
        Some(code) => errno_words(code),
        None => strip_os_error(&err.to_string()),
    }
}

/// What failed, in words: `"{what}: {reason}"`, except that a full host filesystem (ENOSPC,
/// EDQUOT) comes first, as every command says it: "the host filesystem is full: {what}
/// found no space left; free space on the host".
pub fn failure(what: &str, err: &std::io::Error) -> String {
    match err.raw_os_error() {
        Some(code) if code == libc::ENOSPC || code == libc::EDQUOT => host_full(what),
        _ => format!("{what}: {}", io_words(err)),
    }
}

/// "the host filesystem is full: {what} failed (No space left on device); free space on the
/// host, then run the command again".
pub fn host_full(what: &str) -> String {
    format!(
        "the host filesystem is full: {what} failed (No space left on device); free space on the host, then run the command again"
    )
}

/// `text` without the internals lower layers append: " (os error N)", " (errno -N)".
pub fn scrub(text: &str) -> String {
    let mut out = text.to_string();
    for marker in [" (os error ", " (errno "] {
        while let Some(start) = out.find(marker) {
            let rest = &out[start + marker.len()..];
            let Some(close) = rest.find(')') else { break };
            let inside = &rest[..close];
            if !inside
                .trim_start_matches('-')
                .bytes()
                .all(|b| b.is_ascii_digit())
            {
                break;
            }
            out.replace_range(start..start + marker.len() + close + 1, "");
        }
    }
    out
}

/// An io error's text without its " (os error N)" tail, first letter in lower case.
fn strip_os_error(text: &str) -> String {
    let text = scrub(text);
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internals_are_scrubbed_and_a_full_host_is_said() {
        assert_eq!(
            scrub("Write failed on the device: No space left on device (os error 28) (errno -28)"),
            "Write failed on the device: No space left on device"
        );
        assert_eq!(scrub("a (errno x) b"), "a (errno x) b");
        let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert!(failure("write", &full).starts_with("the host filesystem is full: write"));
        let perm = std::io::Error::from_raw_os_error(libc::EPERM);
        assert_eq!(
            failure("open", &perm),
            "open: operation not permitted (is it immutable? see lsattr)"
        );
        let busy = std::io::Error::from_raw_os_error(libc::EADDRINUSE);
        assert_eq!(
            failure("listen", &busy),
            "listen: address already in use (another process listens there)"
        );
        assert_eq!(
            errno_words(libc::ELOOP),
            "too many levels of symbolic links"
        );
    }
}
