//! Layer compression (zstd multithreaded, xz with a CRC32 check, gzip, the
//! kernel's legacy lz4 framing, none) and decompression of inputs.

use anyhow::{Context, Result};
use lifeboat_contract::Compression;
use std::io::{self, BufRead, Read, Write};
use std::path::Path;

/// A compressing sink that must be finished explicitly.
pub enum Encoder<W: Write> {
    None(W),
    Zstd(zstd::stream::write::Encoder<'static, W>),
    Xz(liblzma::write::XzEncoder<W>),
    Gzip(flate2::write::GzEncoder<W>),
    Lz4(Lz4Legacy<W>),
}

impl<W: Write> Encoder<W> {
    pub fn new(out: W, c: Compression, level: Option<i32>, threads: u32) -> Result<Encoder<W>> {
        Ok(match c {
            Compression::None => Encoder::None(out),
            Compression::Zstd => {
                let mut e = zstd::stream::write::Encoder::new(out, level.unwrap_or(6))?;
                if threads > 1 {
                    e.multithread(threads)?;
                }
                e.include_checksum(true)?;
                Encoder::Zstd(e)
            }
            Compression::Xz => {
                // The kernel's xz decoder supports only CRC32 (and none): never the default CRC64.
                let preset = level.unwrap_or(6).clamp(0, 9) as u32;
                let mut opts = liblzma::stream::LzmaOptions::new_preset(preset)?;
                opts.dict_size(1 << 20);
                let mut filters = liblzma::stream::Filters::new();
                filters.x86();
                filters.lzma2(&opts);
                let stream = liblzma::stream::Stream::new_stream_encoder(
                    &filters,
                    liblzma::stream::Check::Crc32,
                )?;
                Encoder::Xz(liblzma::write::XzEncoder::new_stream(out, stream))
            }
            Compression::Gzip => {
                // mtime 0 and no file name keep the output reproducible.
                let lvl = flate2::Compression::new(level.unwrap_or(6).clamp(0, 9) as u32);
                Encoder::Gzip(flate2::GzBuilder::new().mtime(0).write(out, lvl))
            }
            Compression::Lz4 => Encoder::Lz4(Lz4Legacy::new(out)),
        })
    }

    pub fn finish(self) -> io::Result<W> {
        match self {
            Encoder::None(w) => Ok(w),
            Encoder::Zstd(e) => e.finish(),
            Encoder::Xz(e) => e.finish(),
            Encoder::Gzip(e) => e.finish(),
            Encoder::Lz4(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::None(w) => w.write(b),
            Encoder::Zstd(e) => e.write(b),
            Encoder::Xz(e) => e.write(b),
            Encoder::Gzip(e) => e.write(b),
            Encoder::Lz4(e) => e.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::None(w) => w.flush(),
            Encoder::Zstd(e) => e.flush(),
            Encoder::Xz(e) => e.flush(),
            Encoder::Gzip(e) => e.flush(),
            Encoder::Lz4(e) => e.flush(),
        }
    }
}

const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

/// The lz4 "legacy" frame the kernel's unlz4 reads: magic, then blocks of
/// at most 8 MiB input, each preceded by its compressed size.
pub struct Lz4Legacy<W: Write> {
    out: W,
    buf: Vec<u8>,
    started: bool,
}

impl<W: Write> Lz4Legacy<W> {
    pub fn new(out: W) -> Self {
        Lz4Legacy {
            out,
            buf: Vec::with_capacity(LZ4_LEGACY_BLOCK),
            started: false,
        }
    }
    fn emit(&mut self) -> io::Result<()> {
        if !self.started {
            self.out.write_all(&LZ4_LEGACY_MAGIC.to_le_bytes())?;
            self.started = true;
        }
        if self.buf.is_empty() {
            return Ok(());
        }
        let c = lz4_flex::block::compress(&self.buf);
        self.out.write_all(&(c.len() as u32).to_le_bytes())?;
        self.out.write_all(&c)?;
        self.buf.clear();
        Ok(())
    }
    pub fn finish(mut self) -> io::Result<W> {
        self.emit()?;
        self.out.flush()?;
        Ok(self.out)
    }
}

impl<W: Write> Write for Lz4Legacy<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let room = LZ4_LEGACY_BLOCK - self.buf.len();
        let n = room.min(b.len());
        self.buf.extend_from_slice(&b[..n]);
        if self.buf.len() == LZ4_LEGACY_BLOCK {
            self.emit()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A reader that undoes any of our compressions.
pub fn decoder<'a, R: Read + 'a>(inp: R, c: Compression) -> Result<Box<dyn Read + 'a>> {
    Ok(match c {
        Compression::None => Box::new(inp),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(inp)?),
        Compression::Xz => Box::new(liblzma::read::XzDecoder::new_multi_decoder(inp)),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(inp)),
        Compression::Lz4 => Box::new(Lz4LegacyReader::new(inp)),
    })
}

/// A decoder of exactly one compressed stream at the start of `inp`,
/// leaving whatever follows it (the next member of a concatenated
/// initramfs) unread in `inp`. An lz4 legacy stream has no end marker: it
/// runs to the end of the input.
pub fn single_stream_decoder<'a, R: BufRead + 'a>(
    inp: R,
    c: Compression,
) -> Result<Box<dyn Read + 'a>> {
    Ok(match c {
        Compression::None => Box::new(inp),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::with_buffer(inp)?.single_frame())
        }
        Compression::Xz => Box::new(liblzma::bufread::XzDecoder::new(inp)),
        Compression::Gzip => Box::new(flate2::bufread::GzDecoder::new(inp)),
        Compression::Lz4 => Box::new(Lz4LegacyReader::new(inp)),
    })
}

pub struct Lz4LegacyReader<R: Read> {
    inp: R,
    buf: Vec<u8>,
    pos: usize,
    started: bool,
}

impl<R: Read> Lz4LegacyReader<R> {
    pub fn new(inp: R) -> Self {
        Lz4LegacyReader {
            inp,
            buf: Vec::new(),
            pos: 0,
            started: false,
        }
    }
}

impl<R: Read> Read for Lz4LegacyReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            let mut w = [0u8; 4];
            if !self.started {
                self.inp.read_exact(&mut w)?;
                if u32::from_le_bytes(w) != LZ4_LEGACY_MAGIC {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "not an lz4 legacy stream",
                    ));
                }
                self.started = true;
            }
            match self.inp.read_exact(&mut w) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            let n = u32::from_le_bytes(w) as usize;
            if n == LZ4_LEGACY_MAGIC as usize {
                continue;
            }
            let mut c = vec![0u8; n];
            self.inp.read_exact(&mut c)?;
            self.buf = lz4_flex::block::decompress(&c, LZ4_LEGACY_BLOCK)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            self.pos = 0;
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// The compression of a layer, from its first bytes.
pub fn detect_magic(head: &[u8]) -> Compression {
    if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else if head.starts_with(b"\xfd7zXZ\0") {
        Compression::Xz
    } else if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&LZ4_LEGACY_MAGIC.to_le_bytes()) {
        Compression::Lz4
    } else {
        Compression::None
    }
}

/// The compression of the file at `path`, from its first bytes.
pub fn detect(path: &Path) -> Result<Compression> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut head = [0u8; 6];
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(detect_magic(&head[..n]))
}

/// Read a file, decompressing it when its name says xz, zst or gz.
pub fn read_maybe_compressed(path: &Path) -> Result<Vec<u8>> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let name = path.to_string_lossy();
    let c = if name.ends_with(".xz") {
        Compression::Xz
    } else if name.ends_with(".zst") {
        Compression::Zstd
    } else if name.ends_with(".gz") {
        Compression::Gzip
    } else {
        Compression::None
    };
    let mut out = Vec::new();
    decoder(io::BufReader::new(f), c)?
        .read_to_end(&mut out)
        .with_context(|| format!("cannot decompress {}", path.display()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_compression_roundtrips() {
        let data: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        for c in [
            Compression::None,
            Compression::Zstd,
            Compression::Xz,
            Compression::Gzip,
            Compression::Lz4,
        ] {
            let mut e = Encoder::new(Vec::new(), c, None, 2).unwrap();
            e.write_all(&data).unwrap();
            let out = e.finish().unwrap();
            // Layers fetched by the rescue init are told apart by their magic.
            assert_eq!(detect_magic(&out), c);
            let mut back = Vec::new();
            decoder(&out[..], c)
                .unwrap()
                .read_to_end(&mut back)
                .unwrap();
            assert_eq!(back, data, "{c:?}");
        }
    }

    #[test]
    fn xz_uses_crc32_check() {
        let mut e = Encoder::new(Vec::new(), Compression::Xz, None, 1).unwrap();
        e.write_all(b"hello").unwrap();
        let out = e.finish().unwrap();
        // Stream flags byte 7: check type; 0x01 = CRC32.
        assert_eq!(&out[..6], b"\xfd7zXZ\0");
        assert_eq!(out[7], 0x01);
    }
}
