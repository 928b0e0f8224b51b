//! The bytes SPDK's lvol layer (lib/lvol, v24.01) keeps in xattrs, as pure encode/decode with
//! no I/O: names and uuids of the store (in its super blob) and of each lvol (in its blob).
//!
//! Byte map (verified against the SPDK-written fixture p2-lvs-thin-snap):
//!
//! | blob | xattr | bytes | written by SPDK as |
//! |---|---|---|---|
//! | super blob | `uuid` | 37: 36 lowercase hyphenated hex + NUL | `spdk_uuid_fmt_lower`, `sizeof(uuid)` |
//! | super blob | `name` | len + 1: the name + NUL | `strnlen(name, 64) + 1` |
//! | lvol at creation (also snapshot, clone) | `name` | 64: the name, NUL-padded | `SPDK_LVOL_NAME_MAX` of the zeroed name buffer |
//! | lvol at creation | `uuid` | 37: as the store's | `sizeof(uuid_str)` |
//! | lvol after a rename | `name` | len + 1: the name + NUL | `strlen(new_name) + 1` |
//!
//! The super blob's xattrs are set `uuid` then `name`; an lvol's `name` then `uuid` (the order
//! the descriptors have on disk). A name is 1 to 63 bytes (`SPDK_LVOL_NAME_MAX` and
//! `SPDK_LVS_NAME_MAX` are 64 with the NUL); SPDK's loader takes a stored name of at most 64
//! bytes up to its first NUL, and refuses a longer one.

use uuid::Uuid;

use crate::error::{BlobError, Result};

/// The bstype of an lvol store (`LVOLSTORE`, NUL-padded to 16 bytes on disk).
pub const LVS_BSTYPE: &str = "LVOLSTORE";
/// The xattr holding a name (the store's, in its super blob; an lvol's, in its blob).
pub const NAME_XATTR: &str = "name";
/// The xattr holding a uuid as text.
pub const UUID_XATTR: &str = "uuid";
/// Bytes of SPDK's name buffers, NUL included (`SPDK_LVOL_NAME_MAX`, `SPDK_LVS_NAME_MAX`).
pub const NAME_BYTES_MAX: usize = 64;
/// Longest name, in bytes: the buffer less its NUL.
pub const NAME_LEN_MAX: usize = NAME_BYTES_MAX - 1;
/// Bytes of a stored uuid: 36 characters and a NUL (`SPDK_UUID_STRING_LEN`).
pub const UUID_XATTR_BYTES: usize = 37;
/// Characters of a uuid as text.
const UUID_TEXT_LEN: usize = UUID_XATTR_BYTES - 1;

const _: () = assert!(NAME_BYTES_MAX == 64);
const _: () = assert!(UUID_XATTR_BYTES == 37);

/// Checks a new name (of an lvol, or of a store: `what` says which) as SPDK does: 1 to 63
/// bytes (-EINVAL otherwise), and no NUL (a C string cannot hold one).
pub fn check_name(name: &str, what: &str) -> Result<()> {
    if name.is_empty() {
        return Err(BlobError::InvalidArgument(format!("{what} name is empty")));
    }
    if name.len() > NAME_LEN_MAX {
        return Err(BlobError::InvalidArgument(format!(
            "{what} name is {} bytes; at most {NAME_LEN_MAX} fit SPDK's {NAME_BYTES_MAX}-byte name",
            name.len()
        )));
    }
    if name.as_bytes().contains(&0) {
        return Err(BlobError::InvalidArgument(format!(
            "{what} name contains a NUL byte"
        )));
    }
    Ok(())
}

/// An lvol's `name` as SPDK writes it at creation (create, snapshot, clone): the name,
/// NUL-padded to 64 bytes. The caller checked it with [`check_name`].
pub fn lvol_name_value(name: &str) -> Vec<u8> {
    let mut value = name.as_bytes().to_vec();
    value.resize(NAME_BYTES_MAX, 0);
    value
}

/// A `name` as SPDK writes it for a store, and for an lvol it renames: the name and one NUL.
pub fn terminated_name_value(name: &str) -> Vec<u8> {
    let mut value = name.as_bytes().to_vec();
    value.push(0);
    value
}

/// A `uuid` as SPDK writes it: lowercase hyphenated text and a NUL (37 bytes).
pub fn uuid_value(uuid: &Uuid) -> Vec<u8> {
    let mut value = uuid.hyphenated().to_string().into_bytes();
    value.push(0);
    debug_assert_eq!(value.len(), UUID_XATTR_BYTES);
    value
}

/// A stored `name` read back as SPDK's loader does, or `None` when it would refuse it (more
/// than 64 bytes): the bytes up to the first NUL, at most 63 (what `snprintf` keeps of an
/// unterminated 64-byte value). Bytes that are not UTF-8 are replaced (U+FFFD).
pub fn parse_name(value: &[u8]) -> Option<String> {
    if value.len() > NAME_BYTES_MAX {
        return None;
    }
    let end = value
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(value.len())
        .min(NAME_LEN_MAX);
    let text = value.get(..end)?;
    Some(String::from_utf8_lossy(text).into_owned())
}

/// A stored `uuid` read back as SPDK's loader does, or `None` when it would refuse it: exactly
/// 37 bytes, the last a NUL, the first 36 a hyphenated uuid (either case).
pub fn parse_uuid(value: &[u8]) -> Option<Uuid> {
    if value.len() != UUID_XATTR_BYTES || value.get(UUID_TEXT_LEN) != Some(&0) {
        return None;
    }
    let text = value.get(..UUID_TEXT_LEN)?;
    // 36 characters can only be the hyphenated form; check the hyphens anyway, as libuuid's
    // uuid_parse does, so nothing else of that length slips through.
    let hyphens_ok = text
        .iter()
        .enumerate()
        .all(|(at, &b)| matches!(at, 8 | 13 | 18 | 23) == (b == b'-'));
    if !hyphens_ok {
        return None;
    }
    Uuid::try_parse_ascii(text).ok()
}

/// The id SPDK gives an lvol whose uuid is missing or bad (its bdev name then): the store's
/// uuid, `_`, and the blob id in decimal.
pub fn fallback_unique_id(store_uuid: &Uuid, blob_id: u64) -> String {
    format!("{}_{blob_id}", store_uuid.hyphenated())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_as_spdk_checks_them() {
        assert!(check_name("lv0", "lvol").is_ok());
        assert!(check_name(&"x".repeat(63), "lvol").is_ok());
        let long = check_name(&"x".repeat(64), "lvol").unwrap_err();
        assert_eq!(long.errno(), -libc::EINVAL);
        assert!(long.to_string().contains("64 bytes"), "{long}");
        assert_eq!(check_name("", "lvol").unwrap_err().errno(), -libc::EINVAL);
        assert_eq!(
            check_name("a\0b", "lvol").unwrap_err().errno(),
            -libc::EINVAL
        );
    }

    #[test]
    fn a_new_lvol_name_is_nul_padded_to_64_bytes() {
        let value = lvol_name_value("lv0");
        assert_eq!(value.len(), 64);
        assert_eq!(&value[..3], b"lv0");
        assert!(value[3..].iter().all(|&b| b == 0));
        assert_eq!(terminated_name_value("lvs0"), b"lvs0\0");
    }

    #[test]
    fn uuids_round_trip_as_37_bytes_of_lowercase_text() {
        let uuid = Uuid::parse_str("0CF49F18-109D-41F6-8323-44E8A9306D37").unwrap();
        let value = uuid_value(&uuid);
        assert_eq!(value, b"0cf49f18-109d-41f6-8323-44e8a9306d37\0");
        assert_eq!(parse_uuid(&value), Some(uuid));
        // Upper case parses (libuuid does).
        assert_eq!(
            parse_uuid(b"0CF49F18-109D-41F6-8323-44E8A9306D37\0"),
            Some(uuid)
        );
    }

    #[test]
    fn bad_uuids_are_refused() {
        let good = b"0cf49f18-109d-41f6-8323-44e8a9306d37\0";
        assert!(parse_uuid(&good[..36]).is_none(), "no NUL");
        let mut longer = good.to_vec();
        longer.push(0);
        assert!(parse_uuid(&longer).is_none(), "38 bytes");
        let mut bad = *good;
        bad[0] = b'g';
        assert!(parse_uuid(&bad).is_none(), "not hex");
        let mut moved = *good;
        moved.swap(8, 9);
        assert!(parse_uuid(&moved).is_none(), "hyphen misplaced");
        assert!(parse_uuid(&[0; 37]).is_none(), "all NUL");
    }

    #[test]
    fn stored_names_read_back_as_spdk_reads_them() {
        assert_eq!(parse_name(&lvol_name_value("lv0")).as_deref(), Some("lv0"));
        assert_eq!(parse_name(b"lvs0\0").as_deref(), Some("lvs0"));
        assert_eq!(parse_name(b"plain").as_deref(), Some("plain"));
        assert_eq!(parse_name(&[b'x'; 64]), Some("x".repeat(63)));
        assert_eq!(parse_name(&[b'x'; 65]), None);
        assert_eq!(parse_name(b"a\0b").as_deref(), Some("a"));
        assert_eq!(parse_name(b"").as_deref(), Some(""));
    }

    #[test]
    fn a_missing_uuid_gives_spdks_fallback_id() {
        let lvs = Uuid::parse_str("0cf49f18-109d-41f6-8323-44e8a9306d37").unwrap();
        assert_eq!(
            fallback_unique_id(&lvs, 0x1_0000_0001),
            "0cf49f18-109d-41f6-8323-44e8a9306d37_4294967297"
        );
    }
}
