//! Tape: `BACKUP_URL=tape:///dev/nst0` (a non-rewinding tape device), or
//! `tape:///path/file.tap`, a tape image in the SIMH format (the format
//! tape emulators use; records framed by their 32-bit little-endian length
//! before and after, padded to an even size; a zero length is a filemark).
//! The image is the stand-in the tests use, and a way to prepare a tape
//! elsewhere.
//!
//! What is on the tape (one full backup set per tape):
//!
//! | tape file | contents |
//! |---|---|
//! | 0 | label: one record, JSON `{"lifeboat_tape": 1, "id": …, "hostname": …}` |
//! | 1 … n | the set's volumes, in the manifest's order (archive by archive) |
//! | n + 1 | the manifest (`backup.json`) |
//!
//! then two filemarks (end of data). Positioning uses the MTIOCTOP ioctl
//! (`MTREW`, `MTFSF`, `MTWEOF`), as `mt rewind` / `mt fsf N` / `mt weof` do;
//! records are written in variable-block mode, [`RECORD`] bytes each.

use anyhow::{bail, Context, Result};
use lifeboat_contract::BackupManifest;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Bytes per tape record.
pub const RECORD: usize = 256 * 1024;

/// A tape drive, or its stand-in.
pub trait Tape: Send {
    fn rewind(&mut self) -> Result<()>;
    /// Skip forward over `n` filemarks.
    fn fsf(&mut self, n: u32) -> Result<()>;
    fn weof(&mut self) -> Result<()>;
    fn write_record(&mut self, data: &[u8]) -> Result<()>;
    /// The next record into `buf`; `false` at a filemark or the end of data.
    fn read_record(&mut self, buf: &mut Vec<u8>) -> Result<bool>;
}

/// A tape image file in the SIMH format.
pub struct SimhFile {
    f: std::fs::File,
    name: String,
}

impl SimhFile {
    pub fn open(p: &Path, write: bool) -> Result<SimhFile> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .create(write)
            .truncate(write)
            .open(p)
            .with_context(|| format!("cannot open the tape image {}", p.display()))?;
        Ok(SimhFile {
            f,
            name: p.display().to_string(),
        })
    }

    fn marker(&mut self) -> Result<Option<u32>> {
        let mut b = [0u8; 4];
        match self.f.read_exact(&mut b) {
            Ok(()) => Ok(Some(u32::from_le_bytes(b))),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", self.name)),
        }
    }
}

const SIMH_EOM: u32 = 0xFFFF_FFFF;

impl Tape for SimhFile {
    fn rewind(&mut self) -> Result<()> {
        self.f.seek(SeekFrom::Start(0))?;
        Ok(())
    }

    fn fsf(&mut self, n: u32) -> Result<()> {
        let mut left = n;
        while left > 0 {
            match self.marker()? {
                None | Some(SIMH_EOM) => bail!(
                    "{}: the end of data came before filemark {} of {n}",
                    self.name,
                    n - left + 1
                ),
                Some(0) => left -= 1,
                Some(m) => {
                    let len = (m & 0x00FF_FFFF) as i64;
                    self.f.seek(SeekFrom::Current(len + (len & 1) + 4))?;
                }
            }
        }
        Ok(())
    }

    fn weof(&mut self) -> Result<()> {
        self.f.write_all(&0u32.to_le_bytes())?;
        Ok(())
    }

    fn write_record(&mut self, data: &[u8]) -> Result<()> {
        if data.is_empty() || data.len() > 0x00FF_FFFF {
            bail!("a tape record of {} bytes cannot be written", data.len());
        }
        let len = (data.len() as u32).to_le_bytes();
        self.f.write_all(&len)?;
        self.f.write_all(data)?;
        if data.len() % 2 == 1 {
            self.f.write_all(&[0])?;
        }
        self.f.write_all(&len)?;
        Ok(())
    }

    fn read_record(&mut self, buf: &mut Vec<u8>) -> Result<bool> {
        match self.marker()? {
            None | Some(0) | Some(SIMH_EOM) => Ok(false),
            Some(m) => {
                if m >> 24 != 0 {
                    bail!(
                        "{}: a bad record (class {:#x}) on the tape",
                        self.name,
                        m >> 24
                    );
                }
                let len = m as usize;
                buf.resize(len, 0);
                self.f
                    .read_exact(buf)
                    .with_context(|| format!("{}: a record is cut short", self.name))?;
                if len % 2 == 1 {
                    self.f.seek(SeekFrom::Current(1))?;
                }
                if self.marker()? != Some(m) {
                    bail!("{}: a record's trailing length does not match", self.name);
                }
                Ok(true)
            }
        }
    }
}

/// A tape device driven with MTIOCTOP (Linux st driver, `/dev/nstN`).
pub struct Device {
    f: std::fs::File,
    name: String,
}

#[repr(C)]
struct MtOp {
    op: libc::c_short,
    count: libc::c_int,
}

const MTIOCTOP: libc::c_ulong = 0x4008_6d01; // _IOW('m', 1, struct mtop)
const MTFSF: libc::c_short = 1;
const MTWEOF: libc::c_short = 5;
const MTREW: libc::c_short = 6;
const MTSETBLK: libc::c_short = 20;

impl Device {
    pub fn open(p: &Path, write: bool) -> Result<Device> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(p)
            .with_context(|| {
                format!(
                    "cannot open the tape device {} (is a tape loaded? `mt -f {} status`)",
                    p.display(),
                    p.display()
                )
            })?;
        let mut d = Device {
            f,
            name: p.display().to_string(),
        };
        d.op(MTSETBLK, 0, "set variable block mode")?;
        Ok(d)
    }

    fn op(&mut self, op: libc::c_short, count: i32, what: &str) -> Result<()> {
        use std::os::fd::AsRawFd;
        let m = MtOp { op, count };
        // SAFETY: MTIOCTOP with a valid struct mtop on an open tape fd.
        let rc = unsafe { libc::ioctl(self.f.as_raw_fd(), MTIOCTOP as _, &m) };
        if rc != 0 {
            bail!(
                "{}: {what} failed: {}",
                self.name,
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }
}

impl Tape for Device {
    fn rewind(&mut self) -> Result<()> {
        self.op(MTREW, 1, "rewind")
    }
    fn fsf(&mut self, n: u32) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.op(MTFSF, n as i32, "skipping filemarks (fsf)")
    }
    fn weof(&mut self) -> Result<()> {
        self.op(MTWEOF, 1, "writing a filemark")
    }
    fn write_record(&mut self, data: &[u8]) -> Result<()> {
        let n = self
            .f
            .write(data)
            .with_context(|| format!("{}: cannot write", self.name))?;
        if n != data.len() {
            bail!(
                "{}: the drive took {n} of {} bytes (end of tape?)",
                self.name,
                data.len()
            );
        }
        Ok(())
    }
    fn read_record(&mut self, buf: &mut Vec<u8>) -> Result<bool> {
        buf.resize(RECORD * 4, 0);
        let n = self
            .f
            .read(buf)
            .with_context(|| format!("{}: cannot read", self.name))?;
        buf.truncate(n);
        Ok(n > 0)
    }
}

/// The tape behind a `tape://` URL: a character device, else an image file.
pub fn open(url: &str, write: bool) -> Result<Box<dyn Tape>> {
    let p = path_of(url)?;
    use std::os::unix::fs::FileTypeExt;
    let is_dev = std::fs::metadata(&p)
        .map(|m| m.file_type().is_char_device())
        .unwrap_or(false);
    if is_dev {
        Ok(Box::new(Device::open(&p, write)?))
    } else {
        Ok(Box::new(SimhFile::open(&p, write)?))
    }
}

pub fn path_of(url: &str) -> Result<PathBuf> {
    match url.strip_prefix("tape://") {
        Some(p) if p.starts_with('/') => Ok(PathBuf::from(p)),
        _ => bail!("{url:?}: a tape URL is tape:///dev/nstN (or tape:///path/image.tap)"),
    }
}

/// Reads one tape file (up to its filemark) as a stream.
pub struct FileReader {
    tape: Box<dyn Tape>,
    buf: Vec<u8>,
    pos: usize,
    done: bool,
}

impl Read for FileReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos >= self.buf.len() {
            if self.done {
                return Ok(0);
            }
            let more = self
                .tape
                .read_record(&mut self.buf)
                .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
            self.pos = 0;
            if !more {
                self.done = true;
                self.buf.clear();
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Tape file `n` (0 = the label), read from the start of the tape.
pub fn read_file(url: &str, n: u32) -> Result<FileReader> {
    let mut t = open(url, false)?;
    t.rewind()?;
    t.fsf(n)?;
    Ok(FileReader {
        tape: t,
        buf: Vec::new(),
        pos: 0,
        done: false,
    })
}

/// The volumes of the set on the tape, in tape order.
pub fn volume_order(m: &BackupManifest) -> Vec<String> {
    m.sets
        .iter()
        .flat_map(|s| &s.archives)
        .flat_map(|a| &a.volumes)
        .map(|v| v.file.clone())
        .collect()
}

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
pub struct Label {
    pub lifeboat_tape: u32,
    pub id: String,
    pub hostname: String,
}

/// The label of the tape in `url`.
pub fn read_label(url: &str) -> Result<Label> {
    let mut b = Vec::new();
    read_file(url, 0)?
        .take(1 << 20)
        .read_to_end(&mut b)
        .with_context(|| format!("cannot read the label of {url}"))?;
    serde_json::from_slice(&b).with_context(|| {
        format!("{url} holds no Lifeboat backup (its first tape file is not a Lifeboat label)")
    })
}

/// Write the set staged in `stage` (manifest `m`, one full set) to the
/// tape, from its start: label, volumes, manifest, end of data.
pub fn write_set(url: &str, stage: &Path, m: &BackupManifest, quiet: bool) -> Result<()> {
    if m.sets.len() != 1 || m.sets[0].level != "full" {
        bail!(
            "a tape holds one full backup: set BACKUP_TYPE = \"full\" for {url} (this run made a {} chain)",
            m.sets
                .iter()
                .map(|s| s.level.as_str())
                .collect::<Vec<_>>()
                .join(" + ")
        );
    }
    let mut t = open(url, true)?;
    t.rewind()?;
    let label = Label {
        lifeboat_tape: 1,
        id: m.id.clone(),
        hostname: m.hostname.clone(),
    };
    t.write_record(&serde_json::to_vec(&label)?)?;
    t.weof()?;
    let order = volume_order(m);
    let total: u64 = order
        .iter()
        .filter_map(|f| std::fs::metadata(stage.join(f)).ok())
        .map(|x| x.len())
        .sum();
    let mut prog = crate::backup::Progress::new(&format!("writing to {url}"), Some(total), quiet);
    let mut buf = vec![0u8; RECORD];
    for f in &order {
        let mut src = std::fs::File::open(stage.join(f))
            .with_context(|| format!("cannot read {}", stage.join(f).display()))?;
        loop {
            // Full records except the last of each file.
            let mut n = 0;
            while n < RECORD {
                let k = src.read(&mut buf[n..])?;
                if k == 0 {
                    break;
                }
                n += k;
            }
            if n == 0 {
                break;
            }
            t.write_record(&buf[..n])?;
            prog.add(n as u64);
        }
        t.weof()?;
    }
    let text = serde_json::to_vec_pretty(m)?;
    for chunk in text.chunks(RECORD) {
        t.write_record(chunk)?;
    }
    t.weof()?;
    t.weof()?;
    Ok(())
}

/// The manifest at the end of the tape (the last tape file before the end
/// of data), read in one pass.
pub fn read_manifest(url: &str) -> Result<BackupManifest> {
    let mut t = open(url, false)?;
    t.rewind()?;
    t.fsf(1)?;
    let mut last: Option<Vec<u8>> = None;
    let mut rec = Vec::new();
    loop {
        let mut file = Vec::new();
        let mut records = 0;
        while t.read_record(&mut rec)? {
            records += 1;
            if file.len() < 16 << 20 {
                file.extend_from_slice(&rec);
            }
        }
        if records == 0 {
            break;
        }
        last = Some(file);
    }
    let b = last.with_context(|| format!("{url} holds no backup after its label"))?;
    BackupManifest::from_json(&String::from_utf8_lossy(&b))
        .with_context(|| format!("the last file on {url} is not a backup manifest"))
}

/// A backup on tape, read through its volume order.
#[derive(Clone, Debug)]
pub struct Remote {
    url: String,
    order: Vec<String>,
}

impl Remote {
    pub fn new(url: &str, m: &BackupManifest) -> Result<Remote> {
        path_of(url)?;
        Ok(Remote {
            url: url.to_string(),
            order: volume_order(m),
        })
    }

    pub fn url(&self, rel: &str) -> String {
        match self.order.iter().position(|f| f == rel) {
            Some(i) => format!("{} (tape file {}: {rel})", self.url, i + 1),
            None => format!("{} ({rel})", self.url),
        }
    }

    fn file_of(&self, rel: &str) -> Option<u32> {
        if rel == crate::backup::MANIFEST_FILE {
            return Some(self.order.len() as u32 + 1);
        }
        self.order
            .iter()
            .position(|f| f == rel)
            .map(|i| i as u32 + 1)
    }

    pub fn get(&self, rel: &str) -> Result<Option<Box<dyn Read + Send>>> {
        let Some(n) = self.file_of(rel) else {
            return Ok(None);
        };
        Ok(Some(Box::new(read_file(&self.url, n)?)))
    }

    /// Size by reading the tape file (a tape has no directory).
    pub fn size(&self, rel: &str) -> Result<Option<u64>> {
        let Some(mut r) = self.get(rel)? else {
            return Ok(None);
        };
        let n = std::io::copy(&mut r, &mut std::io::sink())
            .with_context(|| format!("cannot read {}", self.url(rel)))?;
        Ok(Some(n))
    }
}

#[cfg(test)]
/// An independent reading of a SIMH image: (file index, records' lengths).
pub(crate) fn simh_files(p: &Path) -> Vec<Vec<usize>> {
    let b = std::fs::read(p).unwrap();
    let mut files = vec![vec![]];
    let mut i = 0;
    while i + 4 <= b.len() {
        let m = u32::from_le_bytes(b[i..i + 4].try_into().unwrap()) as usize;
        i += 4;
        if m == 0 {
            files.push(vec![]);
            continue;
        }
        files.last_mut().unwrap().push(m);
        i += m + (m & 1);
        assert_eq!(
            u32::from_le_bytes(b[i..i + 4].try_into().unwrap()) as usize,
            m
        );
        i += 4;
    }
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simh_records_and_filemarks() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.tap");
        let mut t = SimhFile::open(&p, true).unwrap();
        t.write_record(b"abc").unwrap();
        t.weof().unwrap();
        t.write_record(b"0123").unwrap();
        t.write_record(b"x").unwrap();
        t.weof().unwrap();
        t.weof().unwrap();
        assert_eq!(simh_files(&p), vec![vec![3], vec![4, 1], vec![], vec![]]);
        t.rewind().unwrap();
        t.fsf(1).unwrap();
        let mut b = Vec::new();
        assert!(t.read_record(&mut b).unwrap());
        assert_eq!(b, b"0123");
        assert!(t.read_record(&mut b).unwrap());
        assert_eq!(b, b"x");
        assert!(!t.read_record(&mut b).unwrap(), "filemark");
        t.rewind().unwrap();
        let e = t.fsf(5).unwrap_err().to_string();
        assert!(e.contains("end of data"), "{e}");
    }
}
