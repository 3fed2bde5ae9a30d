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
//!
//! An OBDR tape (`OUTPUT = "OBDR"`, HP One-Button Disaster Recovery) has
//! one more tape file in front: a drive started in OBDR mode presents it
//! as a bootable CD-ROM. It holds 20 blocks of 512 bytes (the tape label,
//! `LIFEBOAT-000`, padded with NUL bytes), then from block 20 the rescue
//! ISO in 2048-byte blocks, then a filemark. Everything above follows,
//! one tape file later; readers find out which kind of tape it is from the
//! first record.

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
    /// Fixed blocks of `bytes` from now on (0: variable, one record per write).
    fn set_block(&mut self, bytes: u32) -> Result<()>;
    /// The drive's own compression on or off (an image has none).
    fn set_compression(&mut self, _on: bool) -> Result<()> {
        Ok(())
    }
}

/// OBDR: records of the label area, their size, the ISO's block size.
pub const OBDR_LABEL_BLOCKS: usize = 20;
pub const OBDR_LABEL_BLOCK: usize = 512;
pub const OBDR_ISO_BLOCK: usize = 2048;

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

    fn set_block(&mut self, _bytes: u32) -> Result<()> {
        // An image keeps each record's own length.
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
const MTCOMPRESSION: libc::c_short = 32;

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
    fn set_block(&mut self, bytes: u32) -> Result<()> {
        self.op(MTSETBLK, bytes as i32, "setting the block size")
    }
    fn set_compression(&mut self, on: bool) -> Result<()> {
        self.op(MTCOMPRESSION, i32::from(on), "switching drive compression")
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

/// The tape file of the Lifeboat label: 1 on an OBDR tape (its first
/// file is the bootable CD image), else 0.
pub fn first_file(url: &str) -> Result<u32> {
    let mut t = open(url, false)?;
    t.rewind()?;
    let mut rec = Vec::new();
    if !t.read_record(&mut rec)? {
        bail!("{url} is empty (no record before the first filemark)");
    }
    Ok(u32::from(
        rec.len() == OBDR_LABEL_BLOCK && rec.first() != Some(&b'{'),
    ))
}

/// The OBDR tape label (the text at the start of the tape), if it is one.
pub fn obdr_label(url: &str) -> Result<Option<String>> {
    if first_file(url)? == 0 {
        return Ok(None);
    }
    let mut t = open(url, false)?;
    t.rewind()?;
    let mut rec = Vec::new();
    t.read_record(&mut rec)?;
    let end = rec.iter().position(|&b| b == 0).unwrap_or(rec.len());
    Ok(Some(String::from_utf8_lossy(&rec[..end]).into_owned()))
}

/// Copy the bootable ISO of an OBDR tape (from block 20 of its first
/// file) to `out`, reading it as the drive would. Returns its size.
pub fn read_obdr_iso(url: &str, out: &Path) -> Result<u64> {
    if first_file(url)? == 0 {
        bail!("{url} is not an OBDR tape (no label area of 20 blocks of 512 bytes)");
    }
    let mut t = open(url, false)?;
    t.rewind()?;
    let mut rec = Vec::new();
    for i in 0..OBDR_LABEL_BLOCKS {
        if !t.read_record(&mut rec)? || rec.len() != OBDR_LABEL_BLOCK {
            bail!("{url}: block {i} of the OBDR label area is not a 512-byte block");
        }
    }
    let mut f =
        std::fs::File::create(out).with_context(|| format!("cannot write {}", out.display()))?;
    let mut n = 0u64;
    while t.read_record(&mut rec)? {
        if rec.len() % OBDR_ISO_BLOCK != 0 {
            bail!(
                "{url}: the ISO on the tape has a record of {} bytes, not whole 2048-byte blocks",
                rec.len()
            );
        }
        f.write_all(&rec)?;
        n += rec.len() as u64;
    }
    Ok(n)
}

/// Write the OBDR boot area at the start of the tape: the label area and
/// the ISO, then a filemark.
pub fn write_obdr_boot(t: &mut dyn Tape, label: &str, iso: &Path) -> Result<()> {
    if label.is_empty() || label.len() >= OBDR_LABEL_BLOCK || label.starts_with('{') {
        bail!(
            "the OBDR tape label {label:?} must have 1 to 511 characters and not start with '{{'"
        );
    }
    t.rewind()?;
    // The drive reads the boot area in CD-ROM mode: uncompressed (not all
    // drives can switch; a failure is not fatal).
    let _ = t.set_compression(false);
    t.set_block(OBDR_LABEL_BLOCK as u32)?;
    let mut area = vec![0u8; OBDR_LABEL_BLOCK * OBDR_LABEL_BLOCKS];
    area[..label.len()].copy_from_slice(label.as_bytes());
    for b in area.chunks(OBDR_LABEL_BLOCK) {
        t.write_record(b)?;
    }
    t.set_block(OBDR_ISO_BLOCK as u32)?;
    let mut src =
        std::fs::File::open(iso).with_context(|| format!("cannot read {}", iso.display()))?;
    let len = src.metadata()?.len();
    if len % OBDR_ISO_BLOCK as u64 != 0 {
        bail!(
            "{} is not a whole number of 2048-byte blocks",
            iso.display()
        );
    }
    write_records(t, &mut src, OBDR_ISO_BLOCK, &mut |_| {})?;
    t.weof()?;
    t.set_block(0)?;
    let _ = t.set_compression(true);
    Ok(())
}

/// Copy `src` to the tape in records of `size` bytes (the last may be
/// shorter); `progress` gets each record's length.
fn write_records(
    t: &mut dyn Tape,
    src: &mut dyn Read,
    size: usize,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let mut buf = vec![0u8; size];
    loop {
        let mut n = 0;
        while n < size {
            let k = src.read(&mut buf[n..])?;
            if k == 0 {
                break;
            }
            n += k;
        }
        if n == 0 {
            return Ok(());
        }
        t.write_record(&buf[..n])?;
        progress(n as u64);
    }
}

/// The OBDR tape label Lifeboat writes.
pub const OBDR_LABEL: &str = "LIFEBOAT-000";

/// Refuse to overwrite a tape that holds something other than a Lifeboat
/// backup or OBDR image (a new image file or an empty tape is fine).
pub fn check_overwrite(url: &str) -> Result<()> {
    let p = path_of(url)?;
    if !p.exists()
        || std::fs::metadata(&p)
            .map(|m| m.is_file() && m.len() == 0)
            .unwrap_or(false)
    {
        return Ok(());
    }
    let mut t = open(url, false)?;
    t.rewind()?;
    let mut rec = Vec::new();
    match t.read_record(&mut rec) {
        Ok(false) => return Ok(()),
        Ok(true) => {}
        // A blank tape reads nothing (some drives answer with an error).
        Err(_) => return Ok(()),
    }
    let ours =
        rec.starts_with(OBDR_LABEL.as_bytes()) || serde_json::from_slice::<Label>(&rec).is_ok();
    if !ours {
        bail!(
            "{url} holds data that Lifeboat did not write; refusing to overwrite it. \
             Erase it first if it may go (`mt -f DEVICE erase`, or remove the image file)"
        );
    }
    Ok(())
}

/// The label of the tape in `url`.
pub fn read_label(url: &str) -> Result<Label> {
    let mut b = Vec::new();
    read_file(url, first_file(url)?)?
        .take(1 << 20)
        .read_to_end(&mut b)
        .with_context(|| format!("cannot read the label of {url}"))?;
    serde_json::from_slice(&b).with_context(|| {
        format!("{url} holds no Lifeboat backup (its first tape file is not a Lifeboat label)")
    })
}

/// Write the set staged in `stage` (manifest `m`, one full set) to the
/// tape, from its start: label, volumes, manifest, end of data. With
/// `obdr` (tape label, rescue ISO) the OBDR boot area comes first.
pub fn write_set(
    url: &str,
    stage: &Path,
    m: &BackupManifest,
    quiet: bool,
    obdr: Option<(&str, &Path)>,
) -> Result<()> {
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
    check_overwrite(url)?;
    let mut t = open(url, true)?;
    t.rewind()?;
    if let Some((label, iso)) = obdr {
        write_obdr_boot(t.as_mut(), label, iso)?;
    }
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
    for f in &order {
        let mut src = std::fs::File::open(stage.join(f))
            .with_context(|| format!("cannot read {}", stage.join(f).display()))?;
        write_records(t.as_mut(), &mut src, RECORD, &mut |n| prog.add(n))?;
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
    let first = first_file(url)?;
    let mut t = open(url, false)?;
    t.rewind()?;
    t.fsf(first + 1)?;
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
    /// Tape file of the label (1 on an OBDR tape).
    first: u32,
}

impl Remote {
    pub fn new(url: &str, m: &BackupManifest) -> Result<Remote> {
        path_of(url)?;
        Ok(Remote {
            url: url.to_string(),
            order: volume_order(m),
            first: first_file(url)?,
        })
    }

    pub fn url(&self, rel: &str) -> String {
        match self.file_of(rel) {
            Some(i) => format!("{} (tape file {i}: {rel})", self.url),
            None => format!("{} ({rel})", self.url),
        }
    }

    fn file_of(&self, rel: &str) -> Option<u32> {
        if rel == crate::backup::MANIFEST_FILE {
            return Some(self.first + self.order.len() as u32 + 1);
        }
        self.order
            .iter()
            .position(|f| f == rel)
            .map(|i| self.first + i as u32 + 1)
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
