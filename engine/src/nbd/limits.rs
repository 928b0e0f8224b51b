//! Every limit the NBD code enforces, in one place, with the reason for its value.
//!
//! Invariant: per connection, the handshake buffers at most [`MAX_HANDSHAKE_BUFFER`] bytes
//! and the request decoder at most [`REQUEST_HEADER_BUFFER`]; WRITE payloads are never
//! buffered by the decoder (the connection receives them into its own buffers, and stops
//! reading when [`MAX_REQUESTS_IN_FLIGHT`] or [`MAX_CONNECTION_BUFFER_BYTES`] is reached).

/// Longest option data the handshake buffers (64 KiB). The protocol's strings are at most
/// 4096 bytes, so this fits any legal option (a GO with its name and every info request, a
/// meta-context query list of a dozen names). Longer options are skipped without buffering
/// and answered `NBD_REP_ERR_TOO_BIG`; an `NBD_OPT_EXPORT_NAME` that long cannot be
/// answered with an error, so the session is closed.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// Longest option the handshake skips to answer `NBD_REP_ERR_TOO_BIG` (1 MiB); a longer one
/// is treated as a denial of service and the session is closed (the protocol allows a hard
/// disconnect then).
pub const MAX_OPTION_DISCARD: u32 = 1024 * 1024;

/// Options one handshake answers before it is closed as a denial of service (the protocol
/// lets a server hard-disconnect a client that will not stop sending options).
pub const MAX_OPTIONS: u32 = 1024;

/// Bytes the handshake buffers at most: one option header and one option's data.
pub const MAX_HANDSHAKE_BUFFER: usize = OPTION_HEADER_LEN + MAX_OPTION_LEN as usize;

/// Longest string (export name, description, query, error message) the protocol allows.
pub const MAX_STRING_LEN: usize = 4096;

/// Largest READ or WRITE payload (32 MiB = 2^25): the maximum payload advertised in
/// `NBD_INFO_BLOCK_SIZE`, and the default every client may assume when none is advertised.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// Requests one connection has in flight at most; the connection stops reading requests
/// (backpressure, not an error) while it has this many.
pub const MAX_REQUESTS_IN_FLIGHT: usize = 128;

/// Payload bytes (WRITE data received, READ data not yet sent) one connection holds at most
/// (64 MiB, two maximum requests); the connection stops reading while it holds more.
pub const MAX_CONNECTION_BUFFER_BYTES: usize = 64 * 1024 * 1024;

/// Most extents in one `NBD_REPLY_TYPE_BLOCK_STATUS` chunk (2^20, the protocol's SHOULD).
pub const MAX_BLOCK_STATUS_EXTENTS: usize = 1 << 20;

/// Bytes the request decoder buffers at most: one request header.
pub const REQUEST_HEADER_BUFFER: usize = REQUEST_HEADER_LEN;

/// Seconds a client has to finish the handshake before the connection is closed (enforced
/// by the connection, which owns the clock).
pub const HANDSHAKE_TIMEOUT_SECS: u64 = 10;

const OPTION_HEADER_LEN: usize = 16;
const REQUEST_HEADER_LEN: usize = 28;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::wire;

    #[test]
    fn buffer_limits_match_the_wire_sizes() {
        assert_eq!(OPTION_HEADER_LEN, wire::OptionHeader::LEN);
        assert_eq!(REQUEST_HEADER_LEN, wire::RequestHeader::LEN);
        const {
            assert!(MAX_OPTION_LEN as usize >= 4 + MAX_STRING_LEN + 2 + 2 * 16);
            assert!(MAX_OPTION_DISCARD >= MAX_OPTION_LEN);
            assert!(MAX_PAYLOAD == 1 << 25);
        }
    }
}
