//! A writer for the `newc` cpio format, the one the Linux kernel unpacks as an initramfs
//! (`Documentation/driver-api/early-userspace/buffer-format.rst`).
//!
//! Each entry is a 110-byte ASCII header (`070701` and thirteen 8-digit hex fields), the
//! NUL-terminated name padded to a multiple of 4 bytes, then the data padded likewise;
//! the archive ends with an entry named `TRAILER!!!`. Every entry is owned by root with
//! mtime 0, so the same inputs give the same bytes.

use std::io::{self, Write};

const MAGIC: &[u8] = b"070701";
const TRAILER: &str = "TRAILER!!!";
const HEADER_LEN: usize = 110;

/// File type bits of `st_mode`.
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFCHR: u32 = 0o020_000;

/// Writes a newc archive entry by entry.
///
/// ```
/// let mut archive = qemu_harness::cpio::Writer::new(Vec::new());
/// archive.dir("dev", 0o755)?;
/// archive.char_device("dev/console", 0o600, 5, 1)?;
/// archive.file("init", 0o755, b"#!/bin/true\n")?;
/// let bytes = archive.finish()?;
/// assert!(bytes.starts_with(b"070701"));
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct Writer<W: Write> {
    out: W,
    written: usize,
    next_ino: u32,
}

impl<W: Write> Writer<W> {
    /// A writer over `out`.
    pub fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            next_ino: 1,
        }
    }

    /// Adds a directory. Parents must be added first; names have no leading `/`.
    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.entry(name, S_IFDIR | (perm & 0o7777), 2, (0, 0), &[])
    }

    /// Adds a regular file with `data`.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, S_IFREG | (perm & 0o7777), 1, (0, 0), data)
    }

    /// Adds a character device node (e.g. `dev/console`, 5:1).
    pub fn char_device(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, S_IFCHR | (perm & 0o7777), 1, (major, minor), &[])
    }

    /// Writes the trailer and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.next_ino = 0;
        self.entry(TRAILER, 0, 1, (0, 0), &[])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        if name.is_empty() || name.starts_with('/') || name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cpio entry name {name:?} must be relative, non-empty and without NUL"),
            ));
        }
        let too_big = |what: &str| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cpio entry {name:?}: {what} does not fit newc's 32-bit field"),
            )
        };
        let size = u32::try_from(data.len()).map_err(|_| too_big("the file size"))?;
        let name_size = u32::try_from(name.len() + 1).map_err(|_| too_big("the name"))?;
        let ino = self.next_ino;
        if ino != 0 {
            self.next_ino = ino.wrapping_add(1);
        }
        let fields = [
            ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, name_size, 0,
        ];
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(MAGIC);
        for field in fields {
            header.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.put(&header)?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len();
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let pad = (4 - self.written % 4) % 4;
        self.put(&[0; 3][..pad])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, mode, (rdevmajor, rdevminor), data).
    type Entry = (String, u32, (u32, u32), Vec<u8>);

    /// A minimal newc reader for the tests.
    fn read(mut bytes: &[u8]) -> Vec<Entry> {
        let total = bytes.len();
        let mut entries = Vec::new();
        loop {
            assert_eq!((total - bytes.len()) % 4, 0, "entry not 4-aligned");
            assert_eq!(&bytes[..6], MAGIC);
            let field = |i: usize| {
                let text = std::str::from_utf8(&bytes[6 + 8 * i..14 + 8 * i]).expect("ascii");
                u32::from_str_radix(text, 16).expect("hex")
            };
            let (mode, size, rdev) = (field(1), field(6) as usize, (field(9), field(10)));
            let name_size = field(11) as usize;
            let name = std::str::from_utf8(&bytes[HEADER_LEN..HEADER_LEN + name_size - 1])
                .expect("utf8")
                .to_owned();
            assert_eq!(bytes[HEADER_LEN + name_size - 1], 0);
            let data_at = (HEADER_LEN + name_size).next_multiple_of(4);
            let data = bytes[data_at..data_at + size].to_vec();
            bytes = &bytes[(data_at + size).next_multiple_of(4)..];
            if name == TRAILER {
                assert!(bytes.is_empty());
                return entries;
            }
            entries.push((name, mode, rdev, data));
        }
    }

    #[test]
    fn writes_entries_the_reader_understands() {
        let mut archive = Writer::new(Vec::new());
        archive.dir("dev", 0o755).expect("dir");
        archive
            .char_device("dev/console", 0o600, 5, 1)
            .expect("dev");
        archive.file("init", 0o755, b"12345").expect("file");
        archive.file("empty", 0o644, b"").expect("file");
        let bytes = archive.finish().expect("finish");
        let entries = read(&bytes);
        assert_eq!(
            entries,
            [
                ("dev".to_owned(), S_IFDIR | 0o755, (0, 0), vec![]),
                ("dev/console".to_owned(), S_IFCHR | 0o600, (5, 1), vec![]),
                (
                    "init".to_owned(),
                    S_IFREG | 0o755,
                    (0, 0),
                    b"12345".to_vec()
                ),
                ("empty".to_owned(), S_IFREG | 0o644, (0, 0), vec![]),
            ]
        );
    }

    #[test]
    fn header_is_110_bytes_and_deterministic() {
        let build = || {
            let mut archive = Writer::new(Vec::new());
            archive.file("a", 0o644, b"x").expect("file");
            archive.finish().expect("finish")
        };
        let bytes = build();
        assert_eq!(bytes, build());
        // header + "a\0" padded to 112, + "x" padded to 116, then the trailer.
        assert_eq!(&bytes[HEADER_LEN..HEADER_LEN + 2], b"a\0");
        assert_eq!(bytes[112], b'x');
        assert_eq!(&bytes[116..122], MAGIC);
    }

    #[test]
    fn rejects_bad_names() {
        let mut archive = Writer::new(Vec::new());
        assert!(archive.file("/init", 0o755, b"").is_err());
        assert!(archive.file("", 0o755, b"").is_err());
        assert!(archive.file("a\0b", 0o755, b"").is_err());
    }
}
