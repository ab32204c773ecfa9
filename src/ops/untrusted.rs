//! Reading a file a request names (a bundle and its signature by `path`).
//!
//! The path is the requester's: it may name a FIFO (an open that waits for
//! a writer), a device (`/dev/zero`: endless, with a length of 0), a
//! symbolic link swapped in after a check, or a file still growing. So the
//! file is opened without following a final symbolic link and without
//! waiting (`O_NOFOLLOW | O_NONBLOCK`), its type is checked on the opened
//! descriptor (no window between check and use), and the read stops one
//! byte past the limit whatever the metadata says. Callers run it off the
//! async runtime with a deadline.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("not a regular file ({0})")]
    NotRegular(&'static str),
    #[error("larger than {0} bytes")]
    TooLarge(u64),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn kind(ft: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else {
        "not a file"
    }
}

/// The contents of the regular file at `path`, at most `limit` bytes.
pub fn read_regular(path: &Path, limit: u64) -> Result<Vec<u8>, Refused> {
    let flags =
        rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NOCTTY;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits() as i32)
        .open(path)
        .map_err(|e| {
            // ELOOP: the last component is a symbolic link.
            if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
                Refused::NotRegular("a symbolic link")
            } else {
                Refused::Io(e)
            }
        })?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(Refused::NotRegular(kind(meta.file_type())));
    }
    if meta.len() > limit {
        return Err(Refused::TooLarge(limit));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(Refused::TooLarge(limit));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifos_devices_links_and_directories_are_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("x.eib");
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .unwrap();
        // Without O_NONBLOCK this open would wait for a writer forever.
        assert!(matches!(
            read_regular(&fifo, 1 << 20),
            Err(Refused::NotRegular("a FIFO"))
        ));
        assert!(matches!(
            read_regular(Path::new("/dev/zero"), 1 << 20),
            Err(Refused::NotRegular("a character device"))
        ));
        assert!(matches!(
            read_regular(dir.path(), 1 << 20),
            Err(Refused::NotRegular("a directory"))
        ));
        let file = dir.path().join("b.eib");
        std::fs::write(&file, b"bundle").unwrap();
        let link = dir.path().join("link.eib");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(matches!(
            read_regular(&link, 1 << 20),
            Err(Refused::NotRegular("a symbolic link"))
        ));
        assert_eq!(read_regular(&file, 6).unwrap(), b"bundle");
        assert!(matches!(read_regular(&file, 5), Err(Refused::TooLarge(5))));
    }

    #[test]
    fn a_file_whose_length_lies_is_bounded_as_it_is_read() {
        // /proc files say 0 bytes and hold more.
        let p = Path::new("/proc/self/status");
        assert!(read_regular(p, 1 << 20).unwrap().len() > 64);
        assert!(matches!(read_regular(p, 16), Err(Refused::TooLarge(16))));
    }
}
