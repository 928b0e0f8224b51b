//! Guard rails: what a file holds, looked at before a command would overwrite it or copy it
//! as raw bytes. A blobstore's super block (`SPDKBLOB` at byte 0) before `init` or a `perf`
//! write; a disk image format (qcow2, VMDK, VHD, VHDX, VDI) before `import`, which would copy
//! the format's bytes and not the disk they describe; a missing path under `/dev`, which is a
//! typo for a device and not a place for a new file; and what a target really is, for reports.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use crate::EngineError;

/// The signature at byte 0 of a blobstore's super block.
pub const BLOBSTORE_SIGNATURE: &[u8; 8] = b"SPDKBLOB";

/// Refuses an existing `path` that is neither a regular file, a block device nor a directory
/// (a FIFO, a socket, a character device) before anything opens it: opening a FIFO waits
/// for a writer, so a command given one by mistake would hang. A missing path passes (the
/// caller says what it does with one), and so does a directory (said in its own words).
pub fn refuse_special_file(path: &Path) -> Result<(), EngineError> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    let kind = meta.file_type();
    if kind.is_file() || kind.is_block_device() || kind.is_dir() {
        return Ok(());
    }
    Err(EngineError::File {
        path: path.display().to_string(),
        reason: "not a regular file or block device: give the store's file or block device".into(),
        // Not a bad argument (exit 2) but a failure every command says alike (exit 1).
        errno: -libc::ENOTBLK,
    })
}

/// Opens `path` to look at its first bytes: only a regular file or a block device (a FIFO
/// would block the open; nothing else has bytes worth a look).
fn open_to_peek(path: &Path) -> Option<File> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() && !meta.file_type().is_block_device() {
        return None;
    }
    File::open(path).ok()
}

/// Reads up to `buf.len()` bytes at `offset` of `file`; how many were read.
fn read_at(file: &mut File, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
    file.seek(SeekFrom::Start(offset))?;
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        }
    }
    Ok(filled)
}

/// Whether the file or device at `path` starts with a blobstore's signature (`false` when it
/// cannot be read).
pub fn holds_blobstore(path: &Path) -> bool {
    let mut head = [0u8; 8];
    open_to_peek(path)
        .and_then(|mut file| read_at(&mut file, 0, &mut head).ok())
        .is_some_and(|n| n == head.len() && &head == BLOBSTORE_SIGNATURE)
}

/// The disk image format the file at `path` is in, by its magic (`None`: raw, or unreadable):
/// "qcow2" (or qcow), "QED", "Parallels", "VMDK", "VHDX", "VDI", or "VHD" (its `conectix` footer at the start, as
/// a dynamic VHD has a copy, or in its last 512 bytes, as every VHD has).
pub fn disk_image_format(path: &Path) -> Option<&'static str> {
    let mut file = open_to_peek(path)?;
    let mut head = [0u8; 512];
    let n = read_at(&mut file, 0, &mut head).ok()?;
    let head = &head[..n];
    let magics: [(&[u8], usize, &'static str); 10] = [
        (b"QFI\xfb", 0, "qcow2"),
        (b"QED\0", 0, "QED"),
        (b"WithoutFreeSpace", 0, "Parallels"),
        (b"WithouFreSpacExt", 0, "Parallels"),
        (b"KDMV", 0, "VMDK"),
        (b"# Disk DescriptorFile", 0, "VMDK"),
        (b"vhdxfile", 0, "VHDX"),
        (b"conectix", 0, "VHD"),
        (b"<<< ", 0, "VDI"),
        (b"\x7f\x10\xda\xbe", 0x40, "VDI"),
    ];
    for (magic, at, format) in magics {
        if head.get(at..at + magic.len()) == Some(magic) {
            if format == "VDI" && at == 0 && !head.windows(4).any(|w| w == b"VDI ") {
                continue;
            }
            return Some(format);
        }
    }
    let len = file.metadata().ok()?.len();
    if len >= 512 {
        let mut footer = [0u8; 8];
        if read_at(&mut file, len - 512, &mut footer).ok()? == 8 && &footer == b"conectix" {
            return Some("VHD");
        }
    }
    None
}

/// `path` resolved as the kernel would resolve it once created: its nearest existing
/// ancestor with every symlink and `..` resolved (`canonicalize`), then the missing rest
/// (which holds no symlink, so its `..` are lexical). `None` when no ancestor resolves.
fn resolve_missing(path: &Path) -> Option<(PathBuf, PathBuf)> {
    let absolute = std::path::absolute(path).ok()?;
    let mut existing = absolute.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            let mut resolved = real.clone();
            for part in rest.iter().rev() {
                match part {
                    Component::ParentDir => {
                        resolved.pop();
                    }
                    Component::CurDir => {}
                    other => resolved.push(other.as_os_str()),
                }
            }
            return Some((real, resolved));
        }
        let mut components = existing.components();
        rest.push(components.next_back()?);
        existing = components.as_path();
    }
}

/// Refuses to create a missing `path` under `/dev`: a name there that does not exist is a
/// mistyped device, and a file made there would live in RAM (devtmpfs). The path is resolved
/// first (`..`, symlinks: `/tmp/../dev/sdx` is under /dev), and "under /dev" means on the
/// filesystem /dev itself is: a filesystem mounted below it, such as the tmpfs at /dev/shm,
/// is a place for files.
pub fn refuse_new_file_in_dev(path: &Path) -> Result<(), EngineError> {
    if path.symlink_metadata().is_ok() {
        return Ok(());
    }
    let Some((ancestor, resolved)) = resolve_missing(path) else {
        return Ok(());
    };
    let on_dev = resolved.starts_with("/dev")
        && match (std::fs::metadata(&ancestor), std::fs::metadata("/dev")) {
            (Ok(at), Ok(dev)) => at.dev() == dev.dev(),
            _ => true,
        };
    if on_dev {
        return Err(EngineError::File {
            path: path.display().to_string(),
            reason: "no such device (a missing path under /dev is not created: check the device name, e.g. with lsblk)".into(),
            errno: -libc::ENODEV,
        });
    }
    Ok(())
}

/// What [`foreign_contents`] says of non-zero bytes it does not recognise.
pub const UNRECOGNISED_DATA: &str = "data (non-zero bytes in its first MiB)";

/// What the file or device at `path` holds at its start, when it is not a blobstore and
/// not blank: "an ext4 filesystem", "a GPT partition table", "a qcow2 image", ..., or "data
/// (non-zero bytes in its first MiB)". `None`: all zeros there (or missing, or unreadable),
/// or a blobstore (see [`holds_blobstore`]). Only the first MiB is read (and the last for a
/// GPT's backup header is not needed: the primary is at the start).
pub fn foreign_contents(path: &Path) -> Option<String> {
    const HEAD: usize = 1 << 20;
    let mut file = open_to_peek(path)?;
    let mut head = vec![0u8; HEAD];
    let n = read_at(&mut file, 0, &mut head).ok()?;
    let head = &head[..n];
    if head.iter().all(|&b| b == 0) || head.starts_with(BLOBSTORE_SIGNATURE) {
        return None;
    }
    let at = |offset: usize, magic: &[u8]| head.get(offset..offset + magic.len()) == Some(magic);
    let found = if at(1080, &[0x53, 0xEF]) {
        "an ext2/3/4 filesystem"
    } else if at(0, b"XFSB") {
        "an XFS filesystem"
    } else if at(0x10040, b"_BHRfS_M") {
        "a btrfs filesystem"
    } else if at(0, b"LUKS\xba\xbe") {
        "a LUKS encrypted volume"
    } else if at(4086, b"SWAPSPACE2") || at(4086, b"SWAP-SPACE") {
        "a swap area"
    } else if [0, 512, 1024, 1536]
        .iter()
        .any(|&label| at(label, b"LABELONE") && at(label + 24, b"LVM2 001"))
    {
        "an LVM2 physical volume"
    } else if at(4096, &[0xfc, 0x4e, 0x2b, 0xa9]) || at(0, &[0xfc, 0x4e, 0x2b, 0xa9]) {
        // md superblock 1.2 (4 KiB in) or 1.1 (at the start), little-endian magic a92b4efc.
        "an md RAID member"
    } else if at(0x8001, b"CD001") {
        "an ISO 9660 image"
    } else if at(512, b"EFI PART") {
        "a GPT partition table"
    } else if at(510, &[0x55, 0xAA]) {
        "a boot sector or MBR partition table"
    } else if let Some(format) = disk_image_format(path) {
        return Some(format!("a {format} image"));
    } else {
        UNRECOGNISED_DATA
    };
    Some(found.to_string())
}

/// What the path target at `path` really is, for reports: "block device", or "file on ext4"
/// (the filesystem's type from statfs: tmpfs and ramfs are said to be RAM).
pub fn describe_path(path: &Path) -> String {
    let is_block = std::fs::metadata(path).is_ok_and(|meta| meta.file_type().is_block_device());
    if is_block {
        return "block device".into();
    }
    match rustix::fs::statfs(path) {
        Ok(stat) => {
            // f_type is an i64 here but of another width on some architectures.
            #[allow(clippy::unnecessary_cast)]
            let magic = stat.f_type as i64;
            format!("file on {}", filesystem_name(magic))
        }
        Err(_) => "file".into(),
    }
}

/// A filesystem's name from its statfs magic number.
fn filesystem_name(magic: i64) -> String {
    let name = match magic {
        0xEF53 => "ext4",
        0x5846_5342 => "xfs",
        0x9123_683E => "btrfs",
        0x0102_1994 => "tmpfs (RAM)",
        0x8584_58F6 => "ramfs (RAM)",
        0x2FC1_2FC1 => "zfs",
        0x6969 => "nfs",
        0x794C_7630 => "overlayfs",
        0xF2F5_2010 => "f2fs",
        0x0000_4d44 => "vfat",
        0x6573_5546 => "fuse",
        0x0102_1997 => "9p",
        0x1CD1 => "devpts",
        _ => return format!("a filesystem of type {magic:#x}"),
    };
    name.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_image_magics_are_recognised_and_raw_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            path
        };
        let mut qcow = b"QFI\xfb\0\0\0\x03".to_vec();
        qcow.resize(4096, 0);
        assert_eq!(disk_image_format(&write("a.qcow2", &qcow)), Some("qcow2"));
        assert_eq!(
            disk_image_format(&write("a.vmdk", b"KDMV\x01")),
            Some("VMDK")
        );
        let mut fixed = vec![0u8; 8192];
        fixed[8192 - 512..8192 - 504].copy_from_slice(b"conectix");
        assert_eq!(disk_image_format(&write("a.vhd", &fixed)), Some("VHD"));
        assert_eq!(
            disk_image_format(&write("a.qed", b"QED\0\0\0\x01\0")),
            Some("QED")
        );
        assert_eq!(
            disk_image_format(&write("a.hds", b"WithouFreSpacExt\x02")),
            Some("Parallels")
        );
        let mut pv = vec![0u8; 4096];
        pv[512..520].copy_from_slice(b"LABELONE");
        pv[536..544].copy_from_slice(b"LVM2 001");
        assert_eq!(
            foreign_contents(&write("pv", &pv)).as_deref(),
            Some("an LVM2 physical volume")
        );
        let mut md = vec![0u8; 8192];
        md[4096..4100].copy_from_slice(&[0xfc, 0x4e, 0x2b, 0xa9]);
        assert_eq!(
            foreign_contents(&write("md", &md)).as_deref(),
            Some("an md RAID member")
        );
        let mut iso = vec![0u8; 0x9000];
        iso[0x8001..0x8006].copy_from_slice(b"CD001");
        assert_eq!(
            foreign_contents(&write("iso", &iso)).as_deref(),
            Some("an ISO 9660 image")
        );
        assert_eq!(disk_image_format(&write("raw", &[7u8; 9000])), None);
        assert_eq!(disk_image_format(&write("empty", b"")), None);
        assert!(!holds_blobstore(&write("short", b"SPDK")));
        assert!(holds_blobstore(&write("store", b"SPDKBLOB\x03")));
    }

    #[test]
    fn missing_paths_under_dev_are_refused() {
        let err = refuse_new_file_in_dev(Path::new("/dev/spool-no-such-device")).unwrap_err();
        assert_eq!(err.errno(), -libc::ENODEV);
        assert!(refuse_new_file_in_dev(Path::new("/dev/null")).is_ok());
        assert!(refuse_new_file_in_dev(Path::new("/tmp/spool-new-file")).is_ok());
        // Resolved, not compared as text: `..` back into /dev is under /dev.
        let dotdot = refuse_new_file_in_dev(Path::new("/tmp/../dev/spool-no-such-device"));
        assert_eq!(dotdot.unwrap_err().errno(), -libc::ENODEV);
        let missing_dir = Path::new("/dev/spool-no-such-dir/x/../y");
        assert_eq!(
            refuse_new_file_in_dev(missing_dir).unwrap_err().errno(),
            -libc::ENODEV
        );
        // A filesystem mounted under /dev (the tmpfs at /dev/shm) is a place for files.
        let dev_of = |path: &str| std::fs::metadata(path).ok().map(|meta| meta.dev());
        if dev_of("/dev/shm").is_some() && dev_of("/dev/shm") != dev_of("/dev") {
            assert!(refuse_new_file_in_dev(Path::new("/dev/shm/spool-new-file")).is_ok());
        }
    }
}
