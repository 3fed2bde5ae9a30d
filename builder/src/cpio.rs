//! A small streaming writer and reader for the "newc" cpio format
//! (`070701`), the format the kernel's initramfs unpacker understands.
//!
//! The writer never accepts a short write (everything goes through
//! `write_all`) and refuses names or sizes the format cannot represent.

use std::io::{self, Read, Write};

pub const MAGIC: &[u8; 6] = b"070701";
pub const TRAILER: &str = "TRAILER!!!";
const HEADER_LEN: usize = 110;

pub const S_IFMT: u32 = 0o170000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFCHR: u32 = 0o020000;
pub const S_IFBLK: u32 = 0o060000;

/// One header as written to or read from an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub ino: u32,
    /// File type and permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub mtime: u32,
    pub filesize: u32,
    pub rdev_major: u32,
    pub rdev_minor: u32,
}

fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

/// Streaming newc writer. Tracks how many bytes went out so every entry can
/// be padded to four bytes.
pub struct Writer<W: Write> {
    out: W,
    written: u64,
    entries: u64,
}

impl<W: Write> Writer<W> {
    pub fn new(out: W) -> Self {
        Writer {
            out,
            written: 0,
            entries: 0,
        }
    }

    /// Number of entries written so far (the trailer not counted).
    pub fn entries(&self) -> u64 {
        self.entries
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = pad4(self.written as usize);
        self.put(&[0u8; 3][..n])
    }

    /// Write a header (name included, padded); the caller then writes
    /// exactly `h.filesize` bytes with [`Writer::data`] and calls [`Writer::finish_entry`].
    pub fn header(&mut self, h: &Header) -> io::Result<()> {
        if h.name.as_bytes().contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("NUL in archive name {:?}", h.name),
            ));
        }
        let namesize = h.name.len() + 1;
        let mut head = String::with_capacity(HEADER_LEN);
        head.push_str("070701");
        for v in [
            h.ino,
            h.mode,
            h.uid,
            h.gid,
            h.nlink,
            h.mtime,
            h.filesize,
            0, // devmajor
            0, // devminor
            h.rdev_major,
            h.rdev_minor,
            namesize as u32,
            0, // check
        ] {
            head.push_str(&format!("{v:08x}"));
        }
        debug_assert_eq!(head.len(), HEADER_LEN);
        self.put(head.as_bytes())?;
        self.put(h.name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        if h.name != TRAILER {
            self.entries += 1;
        }
        Ok(())
    }

    pub fn data(&mut self, b: &[u8]) -> io::Result<()> {
        self.put(b)
    }

    /// Copy exactly `len` bytes from `r`; a source that is shorter or longer
    /// than announced is an error (it changed while we read it).
    pub fn data_from(&mut self, r: &mut dyn Read, len: u64, what: &str) -> io::Result<()> {
        let mut buf = vec![0u8; 256 * 1024];
        let mut left = len;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = r.read(&mut buf[..want])?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{what} shrank while being archived ({left} bytes missing)"),
                ));
            }
            self.put(&buf[..n])?;
            left -= n as u64;
        }
        let mut probe = [0u8; 1];
        if r.read(&mut probe)? != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{what} grew while being archived"),
            ));
        }
        Ok(())
    }

    pub fn finish_entry(&mut self) -> io::Result<()> {
        self.pad()
    }

    /// Write the trailer and return the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        let h = Header {
            name: TRAILER.to_string(),
            ino: 0,
            mode: 0,
            uid: 0,
            gid: 0,
            nlink: 1,
            mtime: 0,
            filesize: 0,
            rdev_major: 0,
            rdev_minor: 0,
        };
        self.header(&h)?;
        // Pad the archive to 512 bytes with zeros, as GNU cpio does: tools
        // such as unmkinitramfs find the boundary between concatenated
        // archives by that zero padding, and the kernel skips it.
        let n = (512 - self.written % 512) % 512;
        self.put(&vec![0u8; n as usize])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Streaming newc reader (used by `image ls/unpack`).
pub struct Reader<R: Read> {
    inp: R,
    pos: u64,
}

fn hex_field(b: &[u8]) -> io::Result<u32> {
    let s = std::str::from_utf8(b).map_err(|_| bad("non-ASCII header field"))?;
    u32::from_str_radix(s, 16).map_err(|_| bad(&format!("bad hex header field {s:?}")))
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

impl<R: Read> Reader<R> {
    pub fn new(inp: R) -> Self {
        Reader { inp, pos: 0 }
    }

    fn read_exact(&mut self, b: &mut [u8]) -> io::Result<()> {
        self.inp.read_exact(b)?;
        self.pos += b.len() as u64;
        Ok(())
    }

    fn skip_pad(&mut self) -> io::Result<()> {
        let n = pad4(self.pos as usize);
        let mut p = [0u8; 3];
        self.read_exact(&mut p[..n])
    }

    /// Read the next header. Returns `None` at the trailer. Zero padding
    /// between concatenated archives is skipped.
    pub fn next_header(&mut self) -> io::Result<Option<Header>> {
        let mut head = [0u8; HEADER_LEN];
        // Skip NUL padding (allowed between concatenated archives).
        loop {
            let mut first = [0u8; 1];
            match self.inp.read(&mut first)? {
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "archive ends without TRAILER!!!",
                    ))
                }
                _ => {
                    self.pos += 1;
                    if first[0] != 0 {
                        head[0] = first[0];
                        break;
                    }
                }
            }
        }
        self.read_exact(&mut head[1..])?;
        if &head[..6] != MAGIC {
            return Err(bad(&format!(
                "bad cpio magic {:?} (only newc 070701 is supported)",
                String::from_utf8_lossy(&head[..6])
            )));
        }
        let f = |i: usize| hex_field(&head[6 + i * 8..6 + (i + 1) * 8]);
        let namesize = f(11)? as usize;
        if namesize == 0 || namesize > 4096 {
            return Err(bad(&format!("bad name size {namesize}")));
        }
        let mut name = vec![0u8; namesize];
        self.read_exact(&mut name)?;
        name.pop();
        let name = String::from_utf8(name).map_err(|_| bad("non-UTF-8 name"))?;
        self.skip_pad()?;
        let h = Header {
            name,
            ino: f(0)?,
            mode: f(1)?,
            uid: f(2)?,
            gid: f(3)?,
            nlink: f(4)?,
            mtime: f(5)?,
            filesize: f(6)?,
            rdev_major: f(9)?,
            rdev_minor: f(10)?,
        };
        if h.name == TRAILER {
            return Ok(None);
        }
        Ok(Some(h))
    }

    /// Read the data of the current entry (after `next_header`).
    /// The buffer grows with the data read: a header that claims gigabytes
    /// in a short (or hostile) archive fails at its end instead of
    /// allocating what it claims up front.
    pub fn read_data(&mut self, h: &Header) -> io::Result<Vec<u8>> {
        let want = h.filesize as u64;
        let mut data = Vec::with_capacity(want.min(1 << 20) as usize);
        let got = (&mut self.inp).take(want).read_to_end(&mut data)? as u64;
        self.pos += got;
        if got != want {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{}: the archive ends after {got} of its {want} bytes",
                    h.name
                ),
            ));
        }
        self.skip_pad()?;
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the cpio_reader fuzz target: a header claiming 2.4 GB made
    /// the reader allocate it before reading a byte.
    #[test]
    fn a_huge_claimed_size_in_a_short_archive_is_an_error_not_an_allocation() {
        let mut a = Vec::new();
        a.extend_from_slice(b"070701");
        for (i, v) in [1u32, 0o100644, 0, 0, 1, 0, 0x9999_9999, 0, 0, 0, 0, 2, 0]
            .iter()
            .enumerate()
        {
            let _ = i;
            a.extend_from_slice(format!("{v:08X}").as_bytes());
        }
        a.extend_from_slice(b"x\0");
        a.extend_from_slice(b"short data");
        let mut r = Reader::new(&a[..]);
        let h = r.next_header().unwrap().unwrap();
        assert_eq!(h.filesize, 0x9999_9999);
        let e = r.read_data(&h).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(e.to_string().contains("ends after 10 of its"), "{e}");
    }

    fn hdr(name: &str, mode: u32, size: u32) -> Header {
        Header {
            name: name.into(),
            ino: 1,
            mode,
            uid: 0,
            gid: 0,
            nlink: 1,
            mtime: 0,
            filesize: size,
            rdev_major: 0,
            rdev_minor: 0,
        }
    }

    #[test]
    fn roundtrip_and_padding() {
        let mut w = Writer::new(Vec::new());
        w.header(&hdr("a", S_IFDIR | 0o755, 0)).unwrap();
        w.finish_entry().unwrap();
        w.header(&hdr("a/bcd", S_IFREG | 0o644, 5)).unwrap();
        w.data(b"hello").unwrap();
        w.finish_entry().unwrap();
        let out = w.finish().unwrap();
        assert_eq!(out.len() % 512, 0);
        let mut r = Reader::new(&out[..]);
        let h = r.next_header().unwrap().unwrap();
        assert_eq!(h.name, "a");
        let _ = r.read_data(&h).unwrap();
        let h = r.next_header().unwrap().unwrap();
        assert_eq!(h.name, "a/bcd");
        assert_eq!(r.read_data(&h).unwrap(), b"hello");
        assert!(r.next_header().unwrap().is_none());
    }

    #[test]
    fn short_source_is_an_error() {
        let mut w = Writer::new(Vec::new());
        w.header(&hdr("f", S_IFREG | 0o644, 10)).unwrap();
        let mut src: &[u8] = b"short";
        let e = w.data_from(&mut src, 10, "f").unwrap_err();
        assert!(e.to_string().contains("shrank"));
    }

    #[test]
    fn truncated_archive_is_an_error() {
        let mut w = Writer::new(Vec::new());
        w.header(&hdr("f", S_IFREG | 0o644, 0)).unwrap();
        w.finish_entry().unwrap();
        let out = w.finish().unwrap();
        let cut = &out[..out.len() - 400];
        let mut r = Reader::new(cut);
        r.next_header().unwrap();
        assert!(r.next_header().is_err());
    }
}
