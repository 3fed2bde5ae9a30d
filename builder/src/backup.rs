//! The internal tar method: one GNU tar archive per captured local
//! filesystem, compressed (zstd, gzip or xz), optionally cut into volumes
//! of a given size, each volume with its sha256; full, incremental and
//! differential sets (`--listed-incremental`), chained in `backup.json`.
//!
//! Creation streams `tar --create` through the encoder into the volumes
//! while hashing them; restore checks volumes before anything is written
//! (sizes, first and last volume in full), hashes every volume again while
//! streaming it into `tar --extract`, and applies the sets in order.

use anyhow::{bail, Context, Result};
use lifeboat_contract::{
    BackupArchive, BackupLocation, BackupManifest, BackupSet, BackupVolume, Compression, Layout,
    BACKUP_SCHEMA_VERSION,
};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Name of the manifest inside the backup directory.
pub const MANIFEST_FILE: &str = "backup.json";

/// Where the files of a backup are read from: a directory (local, USB or a
/// mounted NFS/CIFS share) or an HTTP(S) directory.
#[derive(Debug, Clone)]
pub enum Store {
    Dir(PathBuf),
    Http(crate::http::Remote),
    Sftp(crate::sftp::Remote),
    Tape(crate::tape::Remote),
    /// The backup directory on each of several media (the ISOs of an
    /// `iso://` backup): a file is read from the first that has it.
    Media(Vec<PathBuf>),
}

impl From<&Path> for Store {
    fn from(p: &Path) -> Store {
        Store::Dir(p.to_path_buf())
    }
}

impl Store {
    /// `rel` as a path or URL, for messages.
    pub fn show(&self, rel: &str) -> String {
        match self {
            Store::Dir(d) => d.join(rel).display().to_string(),
            Store::Http(r) => r.url(rel),
            Store::Sftp(r) => r.url(rel),
            Store::Tape(r) => r.url(rel),
            Store::Media(v) => v
                .iter()
                .find(|d| d.join(rel).exists())
                .or(v.first())
                .map(|d| d.join(rel).display().to_string())
                .unwrap_or_default(),
        }
    }

    /// The medium directory holding `rel` (Media), or `None`.
    fn medium_of(v: &[PathBuf], rel: &str) -> Option<PathBuf> {
        v.iter().find(|d| d.join(rel).exists()).map(|d| d.join(rel))
    }

    /// The remote store for an http(s):// or sftp:// URL (this host's
    /// directory below it), `None` for other URLs.
    pub fn remote(url: &str, acc: &crate::url::Access, host: &str) -> Result<Option<Store>> {
        let cred = acc.credentials.as_deref();
        if url.starts_with("http://") || url.starts_with("https://") {
            return Ok(Some(Store::Http(
                crate::http::Remote::new(url, cred, acc.ca_file.as_deref())?.join(host),
            )));
        }
        if url.starts_with("sftp://") {
            return Ok(Some(Store::Sftp(
                crate::sftp::Remote::new(url, cred, &acc.ssh_options)?.join(host),
            )));
        }
        Ok(None)
    }

    /// The whole of a small file; `None` when it does not exist.
    pub fn get_bytes(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        let mut v = Vec::new();
        match self.open(rel) {
            Ok(mut f) => f
                .read_to_end(&mut v)
                .with_context(|| format!("cannot read {}", self.show(rel)))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", self.show(rel))),
        };
        Ok(Some(v))
    }

    /// Upload the local file `src` as `rel`.
    pub fn put_file(&self, rel: &str, src: &Path, progress: &mut dyn FnMut(u64)) -> Result<()> {
        match self {
            Store::Dir(d) => {
                let dst = d.join(rel);
                if let Some(p) = dst.parent() {
                    std::fs::create_dir_all(p)?;
                }
                let n = std::fs::copy(src, &dst).with_context(|| {
                    format!("cannot copy {} to {}", src.display(), dst.display())
                })?;
                progress(n);
                Ok(())
            }
            Store::Http(r) => r.put_file(rel, src, progress),
            Store::Sftp(r) => r.put_file(rel, src, progress),
            Store::Tape(_) => {
                bail!("a tape is written whole (crate::tape::write_set), not file by file")
            }
            Store::Media(_) => bail!("the ISOs of an iso:// backup are written by mkrescue"),
        }
    }

    pub fn open(&self, rel: &str) -> std::io::Result<Box<dyn Read + Send>> {
        let got = match self {
            Store::Dir(d) => return Ok(Box::new(std::fs::File::open(d.join(rel))?)),
            Store::Http(r) => r.get(rel),
            Store::Sftp(r) => r.get(rel),
            Store::Tape(r) => r.get(rel),
            Store::Media(v) => match Store::medium_of(v, rel) {
                Some(p) => return Ok(Box::new(std::fs::File::open(p)?)),
                None => Ok(None),
            },
        };
        match got {
            Ok(Some(b)) => Ok(b),
            Ok(None) => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the backup location has no such file",
            )),
            Err(e) => Err(std::io::Error::other(format!("{e:#}"))),
        }
    }

    /// The size of `rel`; `None` when it does not exist.
    pub fn size(&self, rel: &str) -> Result<Option<u64>> {
        match self {
            Store::Dir(d) => match std::fs::metadata(d.join(rel)) {
                Ok(m) => Ok(Some(m.len())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e).with_context(|| format!("cannot read {}", d.join(rel).display())),
            },
            Store::Http(r) => r.size(rel),
            Store::Sftp(r) => r.size(rel),
            Store::Tape(r) => r.size(rel),
            Store::Media(v) => match Store::medium_of(v, rel) {
                Some(p) => Ok(Some(std::fs::metadata(&p)?.len())),
                None => Ok(None),
            },
        }
    }

    pub fn read_to_string(&self, rel: &str) -> Result<String> {
        let mut t = String::new();
        self.open(rel)
            .and_then(|mut f| f.read_to_string(&mut t))
            .with_context(|| format!("cannot read {}", self.show(rel)))?;
        Ok(t)
    }

    fn sha256(&self, rel: &str) -> Result<String> {
        let mut f = self
            .open(rel)
            .with_context(|| format!("cannot read {}", self.show(rel)))?;
        let mut h = Sha256::new();
        std::io::copy(&mut f, &mut h).with_context(|| format!("cannot read {}", self.show(rel)))?;
        Ok(hex::encode(h.finalize()))
    }
}

/// GNU tar options that keep everything a restored system needs.
const TAR_KEEP: &[&str] = &[
    "--xattrs",
    "--xattrs-include=*",
    "--acls",
    "--selinux",
    "--numeric-owner",
];

/// Filesystem types that are backed up (everything else is pseudo, network or swap).
pub fn is_local_data_fs(fstype: &str) -> bool {
    matches!(
        fstype,
        "ext2" | "ext3" | "ext4" | "xfs" | "btrfs" | "vfat" | "f2fs" | "jfs" | "reiserfs"
    )
}

/// Archive base name for a mount point: `/` → `root`, `/var/lib` → `var_lib`.
pub fn archive_base(mountpoint: &str) -> String {
    let t = mountpoint.trim_matches('/');
    if t.is_empty() {
        "root".into()
    } else {
        t.replace('/', "_")
    }
}

/// File suffix of a compression.
fn suffix(c: Compression) -> &'static str {
    match c {
        Compression::Zstd => ".zst",
        Compression::Gzip => ".gz",
        Compression::Xz => ".xz",
        _ => "",
    }
}

/// The mounts whose contents go into the backup: local data filesystems of
/// the layout, mounted at their root (or a btrfs subvolume), the backup
/// location excluded.
pub fn mounts_to_back_up(l: &Layout) -> Vec<&lifeboat_contract::Mount> {
    let mut v: Vec<_> = l
        .mounts
        .iter()
        .filter(|m| is_local_data_fs(&m.fstype))
        .filter(|m| l.filesystems.iter().any(|f| f.device == m.source))
        .filter(|m| m.root.is_none() || m.fstype == "btrfs")
        .collect();
    // One archive per mount point; the first mount of a target wins.
    let mut seen = std::collections::BTreeSet::new();
    v.retain(|m| seen.insert(m.target.clone()));
    v.sort_by_key(|m| (depth(&m.target), m.target.clone()));
    v
}

/// Path depth, so parents come first (`/` = 0).
pub fn depth(p: &str) -> usize {
    p.split('/').filter(|c| !c.is_empty()).count()
}

/// Where `path` lives: (mount point, source device, fstype), from findmnt.
fn mount_of(path: &Path) -> Result<(String, String, String)> {
    let out = Command::new("findmnt")
        .args(["--noheadings", "--raw", "-o", "TARGET,SOURCE,FSTYPE", "-T"])
        .arg(path)
        .output()
        .context("cannot run findmnt")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next().with_context(|| {
        format!(
            "findmnt cannot tell which filesystem holds {}",
            path.display()
        )
    })?;
    let f: Vec<String> = line.split(' ').map(unescape_findmnt).collect();
    if f.len() < 3 {
        bail!("unexpected findmnt output {line:?}");
    }
    // A btrfs subvolume source reads `/dev/sda2[/@home]`.
    let dev = f[1].split('[').next().unwrap_or("").to_string();
    Ok((f[0].clone(), dev, f[2].clone()))
}

/// findmnt --raw escapes spaces and others as `\x20`.
fn unescape_findmnt(s: &str) -> String {
    let mut out = String::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1] == b'x' {
            if let Ok(v) = u8::from_str_radix(&s[i + 2..i + 4], 16) {
                out.push(v as char);
                i += 4;
                continue;
            }
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

fn blkid_tag(dev: &str, tag: &str) -> Option<String> {
    let out = Command::new("blkid")
        .args(["-o", "value", "-s", tag, dev])
        .output()
        .ok()?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !v.is_empty()).then_some(v)
}

/// The filesystem holding the backup directory.
pub fn locate(dir: &Path) -> Result<BackupLocation> {
    let (mountpoint, device, fstype) = mount_of(dir)?;
    Ok(BackupLocation {
        uuid: blkid_tag(&device, "UUID"),
        label: blkid_tag(&device, "LABEL"),
        mountpoint,
        fstype,
        device,
    })
}

/// Exclusion patterns (for `tar --exclude`, relative to `mountpoint`) of
/// absolute paths that lie inside that mount point.
fn relative_excludes(mountpoint: &str, paths: &[String]) -> Vec<String> {
    let base = mountpoint.trim_end_matches('/');
    paths
        .iter()
        .filter_map(|p| {
            let rest = if base.is_empty() {
                p.strip_prefix('/')
            } else {
                p.strip_prefix(base).and_then(|r| r.strip_prefix('/'))
            }?;
            let rest = rest.trim_end_matches('/');
            (!rest.is_empty()).then(|| format!("./{rest}"))
        })
        .collect()
}

/// The root filesystem must be among those backed up.
pub fn require_root(layout: &Layout) -> Result<()> {
    if mounts_to_back_up(layout).iter().any(|m| m.target == "/") {
        return Ok(());
    }
    let src = layout
        .mounts
        .iter()
        .find(|m| m.target == "/")
        .map(|m| format!("{} ({})", m.source, m.fstype))
        .unwrap_or_else(|| "unknown".into());
    bail!(
        "the root filesystem {src} is not among the captured filesystems, so it cannot be backed up \
         and recreated; check `lifeboat layout show --live` (supported: ext2/3/4, xfs, btrfs, vfat on \
         partitions, md, LUKS or LVM)"
    )
}

/// The key of an encrypted backup: an age X25519 identity
/// (`AGE-SECRET-KEY-1...`) or a passphrase (age's scrypt), read from a
/// file. Never written anywhere by lifeboat.
pub enum Key {
    X25519(age::x25519::Identity),
    Passphrase(age::secrecy::SecretString),
}

impl Key {
    /// The key in `text`: an identity line if there is one, else the first
    /// line as a passphrase.
    pub fn parse(text: &str) -> Result<Key> {
        use std::str::FromStr;
        if let Some(l) = text
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("AGE-SECRET-KEY-"))
        {
            return age::x25519::Identity::from_str(l)
                .map(Key::X25519)
                .map_err(|e| anyhow::anyhow!("not a valid age identity: {e}"));
        }
        let pass = text.lines().next().unwrap_or("").trim_end_matches('\r');
        if pass.is_empty() {
            bail!("the key is empty (expected an age identity AGE-SECRET-KEY-1... or a passphrase on the first line)");
        }
        Ok(Key::Passphrase(age::secrecy::SecretString::from(
            pass.to_string(),
        )))
    }

    pub fn from_file(p: &Path) -> Result<Key> {
        let text = std::fs::read_to_string(p)
            .with_context(|| format!("cannot read the backup key file {}", p.display()))?;
        Key::parse(&text).with_context(|| format!("backup key file {}", p.display()))
    }

    /// How the manifest names the encryption (public information only).
    fn label(&self) -> String {
        match self {
            Key::X25519(i) => format!("age-x25519 {}", i.to_public()),
            Key::Passphrase(_) => "age-scrypt".into(),
        }
    }

    fn encryptor(&self) -> Result<age::Encryptor> {
        Ok(match self {
            Key::X25519(i) => {
                let r = i.to_public();
                age::Encryptor::with_recipients(std::iter::once(&r as &dyn age::Recipient))
                    .map_err(|e| anyhow::anyhow!("cannot set up encryption: {e}"))?
            }
            Key::Passphrase(p) => age::Encryptor::with_user_passphrase(p.clone()),
        })
    }

    /// Decrypt `inp`; a wrong key fails here, before any data is read.
    fn decrypt<'a, R: Read + 'a>(&self, inp: R) -> Result<Box<dyn Read + 'a>> {
        let d = age::Decryptor::new(inp)
            .map_err(|e| anyhow::anyhow!("not an age-encrypted volume: {e}"))?;
        let r = match self {
            Key::X25519(i) => d.decrypt(std::iter::once(i as &dyn age::Identity)),
            Key::Passphrase(p) => {
                let mut i = age::scrypt::Identity::new(p.clone());
                i.set_max_work_factor(24);
                d.decrypt(std::iter::once(&i as &dyn age::Identity))
            }
        }
        .map_err(|e| anyhow::anyhow!("the backup key does not open this backup ({e})"))?;
        Ok(Box::new(r))
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.write_str(&self.label())
    }
}

/// The stream below the compressor: straight into the volumes, or through age.
enum Sink {
    Plain(Volumes),
    Age(age::stream::StreamWriter<Volumes>),
}

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Sink::Plain(v) => v.write(b),
            Sink::Age(w) => w.write(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Plain(v) => v.flush(),
            Sink::Age(w) => w.flush(),
        }
    }
}

impl Sink {
    fn finish(self) -> std::io::Result<Volumes> {
        match self {
            Sink::Plain(v) => Ok(v),
            Sink::Age(w) => w.finish(),
        }
    }
}

/// The readable stream of an archive: volumes (checked), decrypted,
/// decompressed.
fn open_archive<'a>(
    dir: &Store,
    set: &BackupSet,
    a: &BackupArchive,
    key: Option<&Key>,
    wrap: impl FnOnce(VolumeReader) -> Box<dyn Read + 'a>,
) -> Result<Box<dyn Read + 'a>> {
    let c = Compression::parse(&set.compression)
        .with_context(|| format!("unknown compression {:?} in the manifest", set.compression))?;
    let raw = wrap(VolumeReader::new(dir, a));
    let plain = match (&set.encryption, key) {
        (None, _) => raw,
        (Some(_), Some(k)) => k.decrypt(raw)?,
        (Some(e), None) => bail!(
            "set {} is encrypted ({e}); give the key (--backup-key FILE, or backup_key_file)",
            set.id
        ),
    };
    crate::compress::decoder(plain, c)
}

/// Check that `key` opens the backup (reads only the first volume's header).
pub fn check_key(dir: &Store, m: &BackupManifest, key: Option<&Key>) -> Result<()> {
    for set in m.sets.iter().filter(|s| s.encryption.is_some()) {
        if let Some(a) = set.archives.first() {
            open_archive(dir, set, a, key, |r| Box::new(r))?;
        }
    }
    Ok(())
}

/// What kind of set to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Full,
    Incremental,
    Differential,
}

impl Level {
    pub fn parse(s: &str) -> Result<Level> {
        match s.to_ascii_lowercase().as_str() {
            "full" => Ok(Level::Full),
            "incremental" => Ok(Level::Incremental),
            "differential" => Ok(Level::Differential),
            o => bail!("BACKUP_TYPE = {o:?} is not one of full, incremental, differential"),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Full => "full",
            Level::Incremental => "incremental",
            Level::Differential => "differential",
        }
    }
}

/// How `create` works.
#[derive(Debug, Clone)]
pub struct Options {
    /// Requested level; incremental/differential fall back to full when
    /// there is no full yet, it is older than `full_days`, or the set of
    /// filesystems changed.
    pub level: Level,
    pub full_days: u32,
    pub compression: Compression,
    pub compression_level: Option<i32>,
    /// Cut each archive into volumes of at most this many bytes.
    pub volume_size: Option<u64>,
    /// Absolute paths left out (the backup directory is always left out).
    pub excludes: Vec<String>,
    /// Encrypt with this key.
    pub key: Option<std::sync::Arc<Key>>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            level: Level::Full,
            full_days: 7,
            compression: Compression::Zstd,
            compression_level: None,
            volume_size: None,
            excludes: vec![],
            key: None,
        }
    }
}

/// `4G`, `700M`, `64K`, `1048576` → bytes.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        Some('T' | 't') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .with_context(|| format!("{s:?} is not a size such as 4G, 700M or 1048576"))?;
    if n == 0 {
        bail!("a size of 0 is not allowed ({s:?})");
    }
    Ok(n * mult)
}

/// Prints bytes, rate and ETA at most every two seconds.
pub struct Progress {
    label: String,
    total: Option<u64>,
    done: u64,
    start: std::time::Instant,
    last: std::time::Instant,
    quiet: bool,
    /// On a terminal: a progress bar instead of lines.
    bar: Option<indicatif::ProgressBar>,
}

/// Is stderr a terminal (progress bars) or a log/pipe (plain lines)?
pub fn stderr_is_tty() -> bool {
    unsafe { libc::isatty(2) == 1 }
}

impl Progress {
    pub fn new(label: &str, total: Option<u64>, quiet: bool) -> Progress {
        let now = std::time::Instant::now();
        let bar = (!quiet && stderr_is_tty()).then(|| {
            let style = match total.filter(|t| *t > 0) {
                Some(_) => indicatif::ProgressStyle::with_template(
                    "  {msg}: {bytes}/{total_bytes} {wide_bar} {bytes_per_sec}, ETA {eta}",
                ),
                None => indicatif::ProgressStyle::with_template(
                    "  {msg}: {bytes} {spinner} {bytes_per_sec}",
                ),
            }
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            let b = match total.filter(|t| *t > 0) {
                Some(t) => indicatif::ProgressBar::new(t),
                None => indicatif::ProgressBar::new_spinner(),
            };
            b.set_style(style);
            b.set_message(label.to_string());
            b
        });
        Progress {
            label: label.to_string(),
            total,
            done: 0,
            start: now,
            last: now,
            quiet,
            bar,
        }
    }
    pub fn add(&mut self, n: u64) {
        self.done += n;
        if let Some(b) = &self.bar {
            b.set_position(self.done);
            return;
        }
        if self.quiet || self.last.elapsed() < std::time::Duration::from_secs(2) {
            return;
        }
        self.last = std::time::Instant::now();
        eprintln!("{}", self.line());
    }
    fn line(&self) -> String {
        let secs = self.start.elapsed().as_secs_f64().max(0.001);
        let rate = self.done as f64 / secs;
        let mib = |b: f64| b / (1u64 << 20) as f64;
        match self.total.filter(|t| *t > 0) {
            Some(t) => {
                let left = t.saturating_sub(self.done) as f64 / rate.max(1.0);
                format!(
                    "  {}: {:.0} of {:.0} MiB ({:.0}%), {:.1} MiB/s, ETA {:.0} s",
                    self.label,
                    mib(self.done as f64),
                    mib(t as f64),
                    100.0 * self.done as f64 / t as f64,
                    mib(rate),
                    left
                )
            }
            None => format!(
                "  {}: {:.0} MiB, {:.1} MiB/s",
                self.label,
                mib(self.done as f64),
                mib(rate)
            ),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// The compressed stream, cut into volume files with their sha256.
struct Volumes {
    dir: PathBuf,
    /// Path of the archive relative to `dir`, without volume suffix.
    rel: String,
    max: Option<u64>,
    cur: Option<(std::io::BufWriter<std::fs::File>, Sha256, u64, String)>,
    done: Vec<BackupVolume>,
}

impl Volumes {
    fn open_next(&mut self) -> std::io::Result<()> {
        let rel = match self.max {
            Some(_) => format!("{}.{:03}", self.rel, self.done.len()),
            None => self.rel.clone(),
        };
        let f = std::fs::File::create(self.dir.join(&rel))?;
        self.cur = Some((std::io::BufWriter::new(f), Sha256::new(), 0, rel));
        Ok(())
    }
    fn close(&mut self) -> std::io::Result<()> {
        if let Some((w, h, n, rel)) = self.cur.take() {
            let f = w.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()?;
            self.done.push(BackupVolume {
                file: rel,
                bytes: n,
                sha256: hex::encode(h.finalize()),
            });
        }
        Ok(())
    }
    fn finish(mut self) -> std::io::Result<Vec<BackupVolume>> {
        if self.cur.is_none() && self.done.is_empty() {
            self.open_next()?;
        }
        self.close()?;
        Ok(self.done)
    }
}

impl Write for Volumes {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.cur.is_none() {
            self.open_next()?;
        }
        let (w, h, n, _) = self.cur.as_mut().unwrap();
        let room = self.max.map(|m| (m - *n) as usize).unwrap_or(buf.len());
        let k = w.write(&buf[..buf.len().min(room)])?;
        h.update(&buf[..k]);
        *n += k as u64;
        if self.max == Some(*n) {
            self.close()?;
        }
        Ok(k)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.cur {
            Some((w, ..)) => w.flush(),
            None => Ok(()),
        }
    }
}

/// Read a child's output to its end in a thread (so the child never
/// blocks on a full pipe while we feed or read its other end).
fn read_in_background(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

/// Archive one mounted filesystem into volumes below `dir`.
#[allow(clippy::too_many_arguments)]
fn archive_one(
    mountpoint: &str,
    excludes: &[String],
    snar: &Path,
    dir: &Path,
    rel: &str,
    o: &Options,
    estimate: Option<u64>,
    quiet: bool,
) -> Result<(Vec<BackupVolume>, u64)> {
    let mut cmd = Command::new("tar");
    cmd.args(["--create", "--file=-", "--one-file-system", "--sparse"])
        .args(TAR_KEEP)
        .arg(format!("--listed-incremental={}", snar.display()))
        .arg(format!("--directory={mountpoint}"));
    for e in excludes {
        cmd.arg(format!("--exclude={e}"));
    }
    cmd.arg(".")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .context("cannot run tar (is GNU tar installed?)")?;
    let mut stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let err_thread = read_in_background(stderr);
    let vols = Volumes {
        dir: dir.to_path_buf(),
        rel: rel.to_string(),
        max: o.volume_size,
        cur: None,
        done: vec![],
    };
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as u32;
    let level = o.compression_level.or(match o.compression {
        Compression::Zstd => Some(3),
        _ => None,
    });
    let sink = match &o.key {
        Some(k) => Sink::Age(
            k.encryptor()?
                .wrap_output(vols)
                .context("cannot start encrypting")?,
        ),
        None => Sink::Plain(vols),
    };
    let mut enc = crate::compress::Encoder::new(sink, o.compression, level, threads)?;
    let mut prog = Progress::new(&format!("archiving {mountpoint}"), estimate, quiet);
    let mut buf = vec![0u8; 1 << 20];
    let mut tar_bytes = 0u64;
    loop {
        let n = stdout
            .read(&mut buf)
            .with_context(|| format!("cannot read tar's output for {mountpoint}"))?;
        if n == 0 {
            break;
        }
        enc.write_all(&buf[..n]).with_context(|| {
            format!(
                "cannot write the archive of {mountpoint} into {}",
                dir.display()
            )
        })?;
        tar_bytes += n as u64;
        prog.add(n as u64);
    }
    let vols = enc.finish()?.finish()?.finish()?;
    let status = child.wait()?;
    let errors = err_thread.join().unwrap_or_default();
    // GNU tar: 1 = some files changed while being read (kept, with a warning).
    match status.code() {
        Some(0) => {}
        Some(1) => eprintln!(
            "lifeboat: warning: files changed while {mountpoint} was archived (kept as read){}{}",
            if errors.trim().is_empty() { "" } else { ":\n" },
            errors.trim_end()
        ),
        _ => bail!(
            "tar failed archiving {mountpoint} ({status}):\n{}",
            errors.trim_end()
        ),
    }
    Ok((vols, tar_bytes))
}

/// The manifest in `dir`, if there is a readable one.
pub fn read_manifest(dir: &Path) -> Option<BackupManifest> {
    let t = std::fs::read_to_string(dir.join(MANIFEST_FILE)).ok()?;
    BackupManifest::from_json(&t).ok()
}

/// Which level this run really makes, and why.
fn decide(
    o: &Options,
    prev: Option<&BackupManifest>,
    bases: &[String],
    snar_dir: &Path,
    now: u64,
) -> (Level, String) {
    if o.level == Level::Full {
        return (Level::Full, "BACKUP_TYPE = full".into());
    }
    let Some(full) = prev.and_then(|p| p.sets.first()) else {
        return (Level::Full, "no earlier full backup here".into());
    };
    if full.created_unix + o.full_days as u64 * 86400 <= now {
        return (
            Level::Full,
            format!("the full backup is older than {} days", o.full_days),
        );
    }
    let had: std::collections::BTreeSet<String> = full
        .archives
        .iter()
        .map(|a| archive_base(&a.mountpoint))
        .collect();
    let now_set: std::collections::BTreeSet<String> = bases.iter().cloned().collect();
    if had != now_set {
        return (Level::Full, "the set of filesystems changed".into());
    }
    let suffix = if o.level == Level::Differential {
        ".full.snar"
    } else {
        ".snar"
    };
    if let Some(b) = bases
        .iter()
        .find(|b| !snar_dir.join(format!("{b}{suffix}")).is_file())
    {
        return (Level::Full, format!("the snapshot file of {b} is missing"));
    }
    (o.level, format!("BACKUP_TYPE = {}", o.level.as_str()))
}

/// Back up every captured local filesystem of `layout` into `dir`.
pub fn create(
    layout: &Layout,
    url: &str,
    dir: &Path,
    o: &Options,
    quiet: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<BackupManifest> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", dir.display()))?;
    // An http(s) backup is made in a staging directory and uploaded: the
    // staging filesystem is not where the backup lives.
    let remote = ["http://", "https://", "sftp://", "tape://", "iso://"]
        .iter()
        .any(|p| url.starts_with(p));
    let location = if remote { None } else { Some(locate(&dir)?) };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut all_excludes: Vec<String> = o.excludes.clone();
    all_excludes.push(dir.to_string_lossy().to_string());
    // Runtime scratch that a restored system must not inherit.
    all_excludes.extend(["/tmp/*".to_string(), "/var/tmp/*".to_string()]);
    let mounts: Vec<_> = mounts_to_back_up(layout)
        .into_iter()
        .filter(|m| Some(&m.source) != location.as_ref().map(|l| &l.device))
        .collect();
    if mounts.is_empty() {
        bail!("no local filesystem to back up was found in the layout");
    }
    let bases: Vec<String> = mounts.iter().map(|m| archive_base(&m.target)).collect();
    let prev = read_manifest(&dir).filter(|p| p.hostname == layout.hostname);
    let snar_dir = dir.join("snar");
    std::fs::create_dir_all(&snar_dir)?;
    let (level, why) = decide(o, prev.as_ref(), &bases, &snar_dir, now);
    progress(&format!("{} backup ({why})", level.as_str()));
    let mut set_id = format!("{}-{}-{}", layout.hostname, now, level.as_str());
    let mut n = 1;
    while dir.join(&set_id).exists() {
        n += 1;
        set_id = format!("{}-{}-{}-{n}", layout.hostname, now, level.as_str());
    }
    let set_dir = dir.join(&set_id);
    std::fs::create_dir(&set_dir)
        .with_context(|| format!("cannot create {}", set_dir.display()))?;
    // A failed run leaves nothing half-written behind.
    struct Cleanup(Option<PathBuf>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            if let Some(p) = self.0.take() {
                let _ = std::fs::remove_dir_all(p);
            }
        }
    }
    let mut guard = Cleanup(Some(set_dir.clone()));
    let mut archives = Vec::new();
    for (m, base) in mounts.iter().zip(&bases) {
        let rel = format!("{set_id}/{base}.tar{}", suffix(o.compression));
        let snar = set_dir.join(format!("{base}.snar"));
        match level {
            Level::Full => {}
            Level::Incremental => {
                std::fs::copy(snar_dir.join(format!("{base}.snar")), &snar)?;
            }
            Level::Differential => {
                std::fs::copy(snar_dir.join(format!("{base}.full.snar")), &snar)?;
            }
        }
        progress(&format!(
            "archiving {} into {}",
            m.target,
            dir.join(&rel).display()
        ));
        let t = std::time::Instant::now();
        let ex = relative_excludes(&m.target, &all_excludes);
        let fs = layout.filesystems.iter().find(|f| f.device == m.source);
        let estimate = fs.and_then(|f| f.used_bytes);
        let (volumes, tar_bytes) =
            archive_one(&m.target, &ex, &snar, &dir, &rel, o, estimate, quiet)?;
        let bytes = volumes.iter().map(|v| v.bytes).sum();
        progress(&format!(
            "  {} bytes of tar, {} bytes compressed in {} volume(s), {:.1} s",
            tar_bytes,
            bytes,
            volumes.len(),
            t.elapsed().as_secs_f64(),
        ));
        archives.push(BackupArchive {
            mountpoint: m.target.clone(),
            fs_uuid: fs.and_then(|f| f.uuid.clone()),
            fstype: m.fstype.clone(),
            volumes,
            bytes,
            tar_bytes,
        });
    }
    // Snapshot state for the next run.
    for base in &bases {
        let snar = set_dir.join(format!("{base}.snar"));
        match level {
            Level::Full => {
                std::fs::copy(&snar, snar_dir.join(format!("{base}.snar")))?;
                std::fs::copy(&snar, snar_dir.join(format!("{base}.full.snar")))?;
            }
            Level::Incremental => {
                std::fs::copy(&snar, snar_dir.join(format!("{base}.snar")))?;
            }
            Level::Differential => {}
        }
    }
    let set = BackupSet {
        id: set_id.clone(),
        level: level.as_str().into(),
        created_unix: now,
        compression: o.compression.as_str().into(),
        encryption: o.key.as_ref().map(|k| k.label()),
        archives,
    };
    let sets = match (level, prev) {
        (Level::Full, _) | (_, None) => vec![set],
        (Level::Incremental, Some(p)) => p.sets.into_iter().chain([set]).collect(),
        (Level::Differential, Some(p)) => p.sets.into_iter().take(1).chain([set]).collect(),
    };
    let m = BackupManifest {
        schema_version: BACKUP_SCHEMA_VERSION,
        id: set_id,
        hostname: layout.hostname.clone(),
        method: "tar".into(),
        url: url.to_string(),
        dir: if remote {
            format!("{}/{}", url.trim_end_matches('/'), layout.hostname)
        } else {
            dir.to_string_lossy().to_string()
        },
        location,
        sets,
    };
    crate::cmd::layout::write_atomic(&dir.join(MANIFEST_FILE), &serde_json::to_vec_pretty(&m)?)?;
    guard.0 = None;
    Ok(m)
}

/// Before an http(s) backup: fetch the manifest and snapshot files of the
/// chain on the server into the staging directory `stage`, so the level
/// decision and incremental snapshots work as for a local directory.
pub fn prefetch(remote: &Store, stage: &Path, hostname: &str) -> Result<()> {
    std::fs::create_dir_all(stage.join("snar"))
        .with_context(|| format!("cannot create {}", stage.display()))?;
    let Some(bytes) = remote.get_bytes(MANIFEST_FILE)? else {
        return Ok(());
    };
    let m = BackupManifest::from_json(&String::from_utf8_lossy(&bytes)).with_context(|| {
        format!(
            "{} is not a valid backup manifest",
            remote.show(MANIFEST_FILE)
        )
    })?;
    if m.hostname != hostname {
        return Ok(());
    }
    std::fs::write(stage.join(MANIFEST_FILE), &bytes)?;
    for a in m.sets.first().map(|s| s.archives.as_slice()).unwrap_or(&[]) {
        let base = archive_base(&a.mountpoint);
        for suffix in [".snar", ".full.snar"] {
            let rel = format!("snar/{base}{suffix}");
            if let Some(b) = remote.get_bytes(&rel)? {
                std::fs::write(stage.join(&rel), b)?;
            }
        }
    }
    Ok(())
}

/// After an http(s) backup: upload the newest set from `stage`, then the
/// snapshot files, then the manifest (last: until it is there, the server
/// keeps describing the previous chain).
pub fn upload(remote: &Store, stage: &Path, m: &BackupManifest, quiet: bool) -> Result<()> {
    let set = m.sets.last().context("the manifest lists no set")?;
    let mut files: Vec<String> = Vec::new();
    for e in walkdir::WalkDir::new(stage.join(&set.id)).sort_by_file_name() {
        let e = e?;
        if e.file_type().is_file() {
            let rel = e.path().strip_prefix(stage)?.to_string_lossy().to_string();
            files.push(rel);
        }
    }
    for e in std::fs::read_dir(stage.join("snar"))? {
        let e = e?;
        files.push(format!("snar/{}", e.file_name().to_string_lossy()));
    }
    files.sort();
    files.push(MANIFEST_FILE.to_string());
    let total: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(stage.join(f)).ok())
        .map(|m| m.len())
        .sum();
    let mut prog = Progress::new(
        &format!("uploading to {}", remote.show("")),
        Some(total),
        quiet,
    );
    for f in &files {
        remote.put_file(f, &stage.join(f), &mut |n| prog.add(n))?;
    }
    Ok(())
}

/// Reads the volumes of an archive in order, checking each one's size and
/// sha256 when it ends; a mismatch is a read error naming the volume.
pub struct VolumeReader {
    dir: Store,
    vols: Vec<BackupVolume>,
    idx: usize,
    cur: Option<(Box<dyn Read + Send>, Sha256, u64)>,
}

impl VolumeReader {
    pub fn new(dir: &Store, a: &BackupArchive) -> VolumeReader {
        VolumeReader {
            dir: dir.clone(),
            vols: a.volumes.clone(),
            idx: 0,
            cur: None,
        }
    }
}

impl Read for VolumeReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if self.idx >= self.vols.len() {
                return Ok(0);
            }
            let v = &self.vols[self.idx];
            if self.cur.is_none() {
                let f = self.dir.open(&v.file).map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!(
                            "backup volume {} cannot be opened: {e}",
                            self.dir.show(&v.file)
                        ),
                    )
                })?;
                self.cur = Some((f, Sha256::new(), 0));
            }
            let (f, h, n) = self.cur.as_mut().unwrap();
            let k = f.read(buf)?;
            if k > 0 {
                h.update(&buf[..k]);
                *n += k as u64;
                return Ok(k);
            }
            let (_, h, n) = self.cur.take().unwrap();
            let sha = hex::encode(h.finalize());
            if n != v.bytes || sha != v.sha256 {
                return Err(std::io::Error::other(format!(
                    "backup volume {} is damaged: {n} bytes with sha256 {sha}, the manifest recorded {} bytes with {}",
                    self.dir.show(&v.file),
                    v.bytes,
                    v.sha256
                )));
            }
            self.idx += 1;
        }
    }
}

fn check_volume(dir: &Store, v: &BackupVolume, hash: bool) -> Result<()> {
    let p = dir.show(&v.file);
    let Some(len) = dir.size(&v.file)? else {
        bail!("backup volume {p} is missing (the backup is incomplete)");
    };
    if len != v.bytes {
        bail!(
            "backup volume {p} has {len} bytes, the manifest says {}: it is truncated or was replaced",
            v.bytes
        );
    }
    if hash {
        let sha = dir.sha256(&v.file)?;
        if sha != v.sha256 {
            bail!(
                "backup volume {} is damaged: sha256 {} but the manifest recorded {}",
                p,
                sha,
                v.sha256
            );
        }
    }
    Ok(())
}

/// Pre-flight check of an archive: every volume present with its size,
/// the first and the last read in full against their sha256 (the others
/// are checked while they are restored).
pub fn preflight_archive(dir: &Store, a: &BackupArchive) -> Result<()> {
    let n = a.volumes.len();
    if n == 0 {
        bail!("the manifest lists no volume for {}", a.mountpoint);
    }
    for (i, v) in a.volumes.iter().enumerate() {
        check_volume(dir, v, i == 0 || i + 1 == n)?;
    }
    Ok(())
}

/// Read everything back: every volume's sha256, the compressed stream and
/// the tar stream (`tar --list`). Returns the number of tar members.
pub fn verify_archive(
    dir: &Store,
    set: &BackupSet,
    a: &BackupArchive,
    key: Option<&Key>,
) -> Result<usize> {
    let mut child = Command::new("tar")
        .args(["--list", "--file=-", "--incremental"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run tar")?;
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let listing = read_in_background(stdout);
    let copied = open_archive(dir, set, a, key, |r| Box::new(r))
        .and_then(|mut d| std::io::copy(&mut d, &mut stdin).map_err(Into::into));
    drop(stdin);
    let out = child.wait_with_output()?;
    let members = listing.join().map(|s| s.lines().count()).unwrap_or(0);
    if let Err(e) = copied {
        let what = format!(
            "the archive of {} in set {} cannot be read",
            a.mountpoint, set.id
        );
        // The decompressor usually notices first; name the damaged volume
        // when its sha256 shows it.
        for v in &a.volumes {
            check_volume(dir, v, true).context(what.clone())?;
        }
        return Err(e.context(what));
    }
    if !out.status.success() {
        bail!(
            "the archive of {} in set {} is not a valid tar stream: {}",
            a.mountpoint,
            set.id,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(members)
}

/// Extract one archive into `target` (the filesystem mounted alone).
/// `incremental`: apply it as a later set of the chain, which also
/// removes what had been deleted since the previous set.
pub fn extract(
    dir: &Store,
    set: &BackupSet,
    a: &BackupArchive,
    target: &Path,
    incremental: bool,
    quiet: bool,
    key: Option<&Key>,
) -> Result<()> {
    let mut cmd = Command::new("tar");
    cmd.args(["--extract", "--file=-", "--preserve-permissions"])
        .args(TAR_KEEP);
    if incremental {
        cmd.arg("--listed-incremental=/dev/null");
    }
    let mut child = cmd
        .arg("--directory")
        .arg(target)
        .stdin(Stdio::piped())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run tar")?;
    let mut stdin = child.stdin.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let err_thread = read_in_background(stderr);
    struct Counting<R> {
        inner: R,
        prog: Progress,
    }
    impl<R: Read> Read for Counting<R> {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            let n = self.inner.read(b)?;
            self.prog.add(n as u64);
            Ok(n)
        }
    }
    let prog = Progress::new(&format!("restoring {}", a.mountpoint), Some(a.bytes), quiet);
    let copied = open_archive(dir, set, a, key, move |r| {
        Box::new(Counting { inner: r, prog })
    })
    .and_then(|mut d| std::io::copy(&mut d, &mut stdin).map_err(Into::into));
    drop(stdin);
    let status = child.wait()?;
    let errors = err_thread.join().unwrap_or_default();
    if let Err(e) = copied {
        bail!(
            "cannot read the archive of {} (set {}): {e:#}\n{}",
            a.mountpoint,
            set.id,
            errors.trim_end()
        );
    }
    if !status.success() {
        bail!(
            "tar failed extracting the archive of {} (set {}) into {} ({status}):\n{}",
            a.mountpoint,
            set.id,
            target.display(),
            errors.trim_end()
        );
    }
    Ok(())
}

/// The backup directory as seen from here: `dir` itself when it exists,
/// else the same path below a mount of the backup filesystem at `mnt`.
pub fn dir_below(m: &BackupManifest, mnt: &Path) -> PathBuf {
    let loc_mp = m
        .location
        .as_ref()
        .map(|l| l.mountpoint.clone())
        .unwrap_or_else(|| "/".into());
    let rel = Path::new(&m.dir)
        .strip_prefix(&loc_mp)
        .map(|p| p.to_path_buf())
        .unwrap_or_else(|_| PathBuf::from(m.dir.trim_start_matches('/')));
    mnt.join(rel)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lifeboat_contract::{Filesystem, Mount};

    #[test]
    fn archive_names() {
        assert_eq!(archive_base("/"), "root");
        assert_eq!(archive_base("/boot"), "boot");
        assert_eq!(archive_base("/var/lib/x"), "var_lib_x");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4G").unwrap(), 4 << 30);
        assert_eq!(parse_size("700M").unwrap(), 700 << 20);
        assert_eq!(parse_size("64k").unwrap(), 64 << 10);
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn excludes_are_made_relative_to_their_mount() {
        let ex = vec![
            "/backup".to_string(),
            "/home/u/cache".into(),
            "/tmp/*".into(),
        ];
        assert_eq!(
            relative_excludes("/", &ex),
            vec!["./backup", "./home/u/cache", "./tmp/*"]
        );
        assert_eq!(relative_excludes("/home", &ex), vec!["./u/cache"]);
        assert!(relative_excludes("/boot", &ex).is_empty());
        // /homework is not below /home.
        assert!(relative_excludes("/home", &["/homework".to_string()]).is_empty());
    }

    #[test]
    fn findmnt_escapes() {
        assert_eq!(unescape_findmnt("/mnt/a\\x20b"), "/mnt/a b");
        assert_eq!(unescape_findmnt("/plain"), "/plain");
    }

    /// A layout whose only filesystem is the directory `src`, mounted at `/`
    /// as far as the backup knows.
    fn dir_layout(src: &Path) -> Layout {
        let target = src.to_string_lossy().to_string();
        Layout {
            filesystems: vec![Filesystem {
                uuid: Some("u".into()),
                ..Filesystem::new("/dev/lbtest", "ext4")
            }],
            mounts: vec![Mount {
                target,
                source: "/dev/lbtest".into(),
                fstype: "ext4".into(),
                options: "rw".into(),
                root: None,
            }],
            ..crate::layout::test_layout()
        }
    }

    fn backup(l: &Layout, dir: &Path, o: &Options) -> BackupManifest {
        // Set ids have a one-second resolution, and so have tar's
        // incremental snapshots for files changed right after one.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        create(l, "file:///x", dir, o, true, &mut |_| {}).unwrap()
    }

    fn restore_chain(dir: &Path, m: &BackupManifest, dst: &Path) {
        restore_with(dir, m, dst, None).unwrap()
    }

    fn restore_with(dir: &Path, m: &BackupManifest, dst: &Path, key: Option<&Key>) -> Result<()> {
        for (k, set) in m.sets.iter().enumerate() {
            for a in &set.archives {
                extract(&Store::from(dir), set, a, dst, k > 0, true, key)?;
            }
        }
        Ok(())
    }

    #[test]
    fn encrypted_backups_need_the_right_key_and_never_hold_it() {
        let src = tempfile::tempdir().unwrap();
        let s = src.path();
        std::fs::write(s.join("f"), "payload").unwrap();
        let id = age::x25519::Identity::generate();
        use age::secrecy::ExposeSecret;
        let secret = id.to_string().expose_secret().to_string();
        let keys = tempfile::tempdir().unwrap();
        std::fs::write(
            keys.path().join("id"),
            format!("# created by age-keygen\n{secret}\n"),
        )
        .unwrap();
        std::fs::write(keys.path().join("pass"), "correct horse battery\n").unwrap();
        for (file, label) in [("id", "age-x25519 age1"), ("pass", "age-scrypt")] {
            let key = std::sync::Arc::new(Key::from_file(&keys.path().join(file)).unwrap());
            let out = tempfile::tempdir().unwrap();
            let o = Options {
                key: Some(key.clone()),
                volume_size: Some(1000),
                ..Default::default()
            };
            let m = backup(&dir_layout(s), out.path(), &o);
            let set = &m.sets[0];
            assert!(
                set.encryption.as_deref().unwrap().starts_with(label),
                "{:?}",
                set.encryption
            );
            let json = serde_json::to_string(&m).unwrap();
            assert!(
                !json.contains(&secret) && !json.contains("correct horse"),
                "the manifest holds the key"
            );
            let first = std::fs::read(out.path().join(&set.archives[0].volumes[0].file)).unwrap();
            assert!(
                first.starts_with(b"age-encryption.org/v1"),
                "volume not encrypted"
            );
            // Right key: restores; no key, or another key: refused before any data.
            check_key(&out.path().into(), &m, Some(&key)).unwrap();
            let dst = tempfile::tempdir().unwrap();
            restore_with(out.path(), &m, dst.path(), Some(&key)).unwrap();
            assert_eq!(
                std::fs::read_to_string(dst.path().join("f")).unwrap(),
                "payload"
            );
            let e = check_key(&out.path().into(), &m, None)
                .unwrap_err()
                .to_string();
            assert!(e.contains("is encrypted"), "{e}");
            let wrong = match &*key {
                Key::X25519(_) => Key::X25519(age::x25519::Identity::generate()),
                Key::Passphrase(_) => Key::parse("wrong horse").unwrap(),
            };
            let e = format!(
                "{:#}",
                check_key(&out.path().into(), &m, Some(&wrong)).unwrap_err()
            );
            assert!(e.contains("does not open this backup"), "{e}");
            assert!(!format!("{key:?}").contains(&secret), "Debug shows the key");
        }
    }

    #[test]
    fn full_and_incremental_chain_restores_the_last_state() {
        let src = tempfile::tempdir().unwrap();
        let s = src.path();
        let out = tempfile::tempdir().unwrap();
        let l = dir_layout(s);
        std::fs::write(s.join("a"), "a0").unwrap();
        std::fs::write(s.join("b"), "b0").unwrap();
        std::fs::write(s.join("d"), "d0").unwrap();
        std::fs::create_dir(s.join("sub")).unwrap();
        std::fs::write(s.join("sub/x"), "x0").unwrap();
        let o = Options {
            level: Level::Incremental,
            volume_size: Some(4096),
            compression: Compression::Gzip,
            ..Default::default()
        };
        let m0 = backup(&l, out.path(), &o);
        assert_eq!(m0.sets.len(), 1);
        assert_eq!(
            m0.sets[0].level, "full",
            "no full yet: the first one is full"
        );
        // Incremental 1: c created, a modified, d deleted.
        std::fs::write(s.join("c"), "c1").unwrap();
        std::fs::write(s.join("a"), "a1").unwrap();
        std::fs::remove_file(s.join("d")).unwrap();
        let m1 = backup(&l, out.path(), &o);
        assert_eq!(
            m1.sets.iter().map(|x| x.level.as_str()).collect::<Vec<_>>(),
            ["full", "incremental"]
        );
        // Incremental 2: c deleted again, b modified, sub/x deleted.
        std::fs::remove_file(s.join("c")).unwrap();
        std::fs::write(s.join("b"), "b2").unwrap();
        std::fs::remove_file(s.join("sub/x")).unwrap();
        let m2 = backup(&l, out.path(), &o);
        assert_eq!(m2.sets.len(), 3);
        assert_eq!(
            m2.sets[..2],
            m1.sets[..],
            "earlier sets are kept as they were"
        );
        for set in &m2.sets {
            for a in &set.archives {
                preflight_archive(&out.path().into(), a).unwrap();
                assert!(verify_archive(&out.path().into(), set, a, None).unwrap() > 0);
            }
        }
        let dst = tempfile::tempdir().unwrap();
        restore_chain(out.path(), &m2, dst.path());
        let d = dst.path();
        assert_eq!(std::fs::read_to_string(d.join("a")).unwrap(), "a1");
        assert_eq!(std::fs::read_to_string(d.join("b")).unwrap(), "b2");
        assert!(
            !d.join("c").exists(),
            "c was created and deleted between incrementals"
        );
        assert!(!d.join("d").exists(), "d was deleted after the full backup");
        assert!(!d.join("sub/x").exists());
        assert!(d.join("sub").is_dir());
        // A differential builds on the full only.
        let o2 = Options {
            level: Level::Differential,
            ..o.clone()
        };
        let m3 = backup(&l, out.path(), &o2);
        assert_eq!(m3.sets.len(), 2);
        assert_eq!(m3.sets[0], m2.sets[0]);
        assert_eq!(m3.sets[1].level, "differential");
        let dst = tempfile::tempdir().unwrap();
        restore_chain(out.path(), &m3, dst.path());
        assert_eq!(std::fs::read_to_string(dst.path().join("b")).unwrap(), "b2");
        assert!(!dst.path().join("d").exists());
        // A full every 0 days: always full.
        let o3 = Options {
            full_days: 0,
            ..o.clone()
        };
        assert_eq!(backup(&l, out.path(), &o3).sets.len(), 1);
    }

    #[test]
    fn special_files_survive_a_round_trip() {
        // A hardlink, a symlink, a sparse file and odd modes, through zstd.
        let src = tempfile::tempdir().unwrap();
        let s = src.path();
        std::fs::write(s.join("a"), b"hello").unwrap();
        std::fs::hard_link(s.join("a"), s.join("a-link")).unwrap();
        std::os::unix::fs::symlink("a", s.join("sym")).unwrap();
        let sparse = std::fs::File::create(s.join("sparse")).unwrap();
        sparse.set_len(64 << 20).unwrap();
        std::fs::create_dir(s.join("d")).unwrap();
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        std::fs::set_permissions(s.join("d"), std::fs::Permissions::from_mode(0o1750)).unwrap();
        let out = tempfile::tempdir().unwrap();
        let m = backup(&dir_layout(s), out.path(), &Options::default());
        let a = &m.sets[0].archives[0];
        assert!(
            a.bytes < 1 << 20,
            "the sparse 64 MiB file made a {} byte archive",
            a.bytes
        );
        assert_eq!(a.volumes.len(), 1);
        assert!(
            a.volumes[0].file.ends_with("/root.tar.zst") || a.volumes[0].file.ends_with(".tar.zst")
        );
        let dst = tempfile::tempdir().unwrap();
        restore_chain(out.path(), &m, dst.path());
        let d = dst.path();
        assert_eq!(std::fs::read(d.join("a-link")).unwrap(), b"hello");
        assert_eq!(
            std::fs::metadata(d.join("a")).unwrap().ino(),
            std::fs::metadata(d.join("a-link")).unwrap().ino(),
            "hardlink kept"
        );
        assert_eq!(std::fs::read_link(d.join("sym")).unwrap(), Path::new("a"));
        assert_eq!(
            std::fs::metadata(d.join("d")).unwrap().mode() & 0o7777,
            0o1750
        );
        assert_eq!(std::fs::metadata(d.join("sparse")).unwrap().len(), 64 << 20);
        assert!(
            std::fs::metadata(d.join("sparse")).unwrap().blocks() < 1024,
            "sparse kept"
        );
    }

    #[test]
    fn split_volumes_are_hashed_and_damage_is_named() {
        let d = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut v = Volumes {
            dir: d.path().to_path_buf(),
            rel: "a.tar".into(),
            max: Some(100_000),
            cur: None,
            done: vec![],
        };
        v.write_all(&data).unwrap();
        let vols = v.finish().unwrap();
        assert_eq!(vols.len(), 3);
        assert_eq!(vols[2].file, "a.tar.002");
        assert!(vols.iter().all(|x| x.bytes == 100_000));
        let a = BackupArchive {
            mountpoint: "/".into(),
            fs_uuid: None,
            fstype: "ext4".into(),
            bytes: 300_000,
            tar_bytes: 0,
            volumes: vols,
        };
        let mut back = Vec::new();
        VolumeReader::new(&d.path().into(), &a)
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, data);
        preflight_archive(&d.path().into(), &a).unwrap();
        // A flipped byte in the middle volume: found while reading.
        let mid = d.path().join("a.tar.001");
        let mut b = std::fs::read(&mid).unwrap();
        b[500] ^= 1;
        std::fs::write(&mid, &b).unwrap();
        let e = VolumeReader::new(&d.path().into(), &a)
            .read_to_end(&mut Vec::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("a.tar.001 is damaged"), "{e}");
        // A truncated last volume: found by the pre-flight.
        let last = d.path().join("a.tar.002");
        std::fs::write(&last, &std::fs::read(&last).unwrap()[..1000]).unwrap();
        let e = preflight_archive(&d.path().into(), &a)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("a.tar.002 has 1000 bytes") && e.contains("truncated"),
            "{e}"
        );
    }

    fn random_bytes(n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        std::fs::File::open("/dev/urandom")
            .unwrap()
            .read_exact(&mut v)
            .unwrap();
        v
    }

    /// A remote location end to end: a full and an incremental set are
    /// staged and uploaded (the second fetches the first's manifest and
    /// snapshots back), then pre-flighted, verified and restored streamed.
    /// Returns the store and the manifest.
    fn remote_chain(
        url: &str,
        acc: &crate::url::Access,
        o: &Options,
        big: usize,
    ) -> (Store, BackupManifest) {
        let src = tempfile::tempdir().unwrap();
        let s = src.path();
        let l = dir_layout(s);
        let remote = Store::remote(url, acc, &l.hostname).unwrap().unwrap();
        let noise = random_bytes(big);
        std::fs::write(s.join("big"), &noise).unwrap();
        std::fs::write(s.join("a"), "a0").unwrap();
        std::fs::write(s.join("gone"), "g").unwrap();
        let stage_root = tempfile::tempdir().unwrap();
        let run = || {
            std::thread::sleep(std::time::Duration::from_millis(1100));
            let stage = stage_root.path().join("stage");
            let _ = std::fs::remove_dir_all(&stage);
            prefetch(&remote, &stage, &l.hostname).unwrap();
            let m = create(&l, url, &stage, o, true, &mut |_| {}).unwrap();
            upload(&remote, &stage, &m, true).unwrap();
            m
        };
        let m0 = run();
        assert_eq!(
            m0.location, None,
            "the staging disk is not the backup location"
        );
        assert_eq!(m0.dir, format!("{url}/{}", l.hostname));
        assert!(
            m0.sets[0].archives[0].volumes.len() > 1,
            "split volumes expected"
        );
        std::fs::write(s.join("a"), "a1").unwrap();
        std::fs::remove_file(s.join("gone")).unwrap();
        let m1 = run();
        assert_eq!(
            m1.sets.iter().map(|x| x.level.as_str()).collect::<Vec<_>>(),
            ["full", "incremental"],
            "the snapshot files were fetched back from the server"
        );
        // What is on the server is what the manifest says.
        let text = remote.read_to_string(MANIFEST_FILE).unwrap();
        assert_eq!(BackupManifest::from_json(&text).unwrap(), m1);
        for set in &m1.sets {
            for a in &set.archives {
                preflight_archive(&remote, a).unwrap();
                assert!(verify_archive(&remote, set, a, None).unwrap() > 0);
            }
        }
        let dst = tempfile::tempdir().unwrap();
        for (k, set) in m1.sets.iter().enumerate() {
            for a in &set.archives {
                extract(&remote, set, a, dst.path(), k > 0, true, None).unwrap();
            }
        }
        assert_eq!(std::fs::read(dst.path().join("big")).unwrap(), noise);
        assert_eq!(std::fs::read_to_string(dst.path().join("a")).unwrap(), "a1");
        assert!(!dst.path().join("gone").exists());
        (remote, m1)
    }

    #[test]
    fn http_location_uploads_a_chain_and_restores_it_streamed() {
        let srv = lifeboat_qemu::servers::nginx(
            &std::env::temp_dir().join(format!("lifeboat-nginx-{}", std::process::id())),
        );
        let url = format!("http://127.0.0.1:{}/backups", srv.port);
        let o = Options {
            level: Level::Incremental,
            volume_size: Some(8192),
            compression: Compression::Gzip,
            ..Default::default()
        };
        let (store, m1) = remote_chain(&url, &Default::default(), &o, 40_000);
        // Damage on the server is found by the pre-flight.
        let a = &m1.sets[0].archives[0];
        let on_disk = |v: &BackupVolume| srv.root.join("backups").join(&m1.hostname).join(&v.file);
        let first = on_disk(&a.volumes[0]);
        let mut b = std::fs::read(&first).unwrap();
        b[100] ^= 0x20;
        std::fs::write(&first, &b).unwrap();
        let e = format!("{:#}", preflight_archive(&store, a).unwrap_err());
        assert!(e.contains("is damaged") && e.contains(&url), "{e}");
        b[100] ^= 0x20;
        std::fs::write(&first, &b).unwrap();
        let last = on_disk(a.volumes.last().unwrap());
        let full = std::fs::read(&last).unwrap();
        std::fs::write(&last, &full[..full.len() / 2]).unwrap();
        let e = format!("{:#}", preflight_archive(&store, a).unwrap_err());
        assert!(e.contains("truncated"), "{e}");
        std::fs::remove_file(&last).unwrap();
        let e = format!("{:#}", preflight_archive(&store, a).unwrap_err());
        assert!(e.contains("is missing"), "{e}");
    }

    #[test]
    fn https_location_with_a_private_ca() {
        let srv = lifeboat_qemu::servers::nginx_tls(
            &std::env::temp_dir().join(format!("lifeboat-nginx-tls-{}", std::process::id())),
        );
        let url = format!("https://127.0.0.1:{}/backups", srv.port);
        // Unknown CA: refused, and the message says what to do.
        let plain = Store::remote(&url, &Default::default(), "h")
            .unwrap()
            .unwrap();
        let e = format!("{:#}", plain.size(MANIFEST_FILE).unwrap_err());
        assert!(e.contains("backup_ca_file"), "{e}");
        let acc = crate::url::Access {
            ca_file: Some(srv.dir.join("ca.pem")),
            ..Default::default()
        };
        let o = Options {
            level: Level::Incremental,
            volume_size: Some(16384),
            ..Default::default()
        };
        let (store, m1) = remote_chain(&url, &acc, &o, 50_000);
        assert!(store.show("").starts_with("https://"));
        assert_eq!(m1.sets.len(), 2);
    }

    #[test]
    fn sftp_location_uploads_a_chain_and_restores_it_streamed() {
        let srv = lifeboat_qemu::servers::sshd(
            &std::env::temp_dir().join(format!("lifeboat-sshd-{}", std::process::id())),
        );
        let url = format!(
            "sftp://root@127.0.0.1:{}{}/backups",
            srv.port,
            srv.root.display()
        );
        let acc = crate::url::Access {
            credentials: Some(srv.dir.join("id_ed25519")),
            ssh_options: vec![format!(
                "UserKnownHostsFile={}",
                srv.dir.join("known_hosts").display()
            )],
            ..Default::default()
        };
        let o = Options {
            level: Level::Incremental,
            volume_size: Some(100_000),
            compression: Compression::Zstd,
            ..Default::default()
        };
        // Bigger than the SFTP chunk times the requests in flight.
        let (remote, m1) = remote_chain(&url, &acc, &o, 3 << 20);
        assert!(m1.sets[0].archives[0].volumes.len() > 10);
        // A truncated last volume, and a wrong key, are named.
        let a = &m1.sets[0].archives[0];
        let on_server = srv.root.join("backups").join(&m1.hostname);
        let last = on_server.join(&a.volumes.last().unwrap().file);
        let full = std::fs::read(&last).unwrap();
        std::fs::write(&last, &full[..full.len() / 2]).unwrap();
        let e = format!("{:#}", preflight_archive(&remote, a).unwrap_err());
        assert!(e.contains("truncated") && e.contains("sftp://"), "{e}");
        let wrong = crate::url::Access {
            credentials: Some(srv.dir.join("host_key")),
            ..acc.clone()
        };
        let bad = Store::remote(&url, &wrong, &m1.hostname).unwrap().unwrap();
        let e = format!("{:#}", bad.size(MANIFEST_FILE).unwrap_err());
        assert!(e.contains("cannot start an SFTP session"), "{e}");
    }

    /// Pre-flight every archive of the (one-set) backup `m` in `store`, restore
    /// the first, and compare its file `big` with `want`.
    fn restores_big_file(store: &Store, m: &BackupManifest, want: &[u8]) {
        for a in &m.sets[0].archives {
            preflight_archive(store, a).unwrap();
        }
        let dst = tempfile::tempdir().unwrap();
        extract(
            store,
            &m.sets[0],
            &m.sets[0].archives[0],
            dst.path(),
            false,
            true,
            None,
        )
        .unwrap();
        assert_eq!(std::fs::read(dst.path().join("big")).unwrap(), want);
    }

    #[test]
    fn tape_holds_label_volumes_and_manifest_and_restores() {
        let src = tempfile::tempdir().unwrap();
        let s = src.path();
        let noise = random_bytes(700_000);
        std::fs::write(s.join("big"), &noise).unwrap();
        std::fs::write(s.join("a"), "a0").unwrap();
        let l = dir_layout(s);
        let work = tempfile::tempdir().unwrap();
        let tap = work.path().join("backup.tap");
        let url = format!("tape://{}", tap.display());
        let stage = work.path().join("stage");
        let o = Options {
            volume_size: Some(300_000),
            ..Default::default()
        };
        let m = create(&l, &url, &stage, &o, true, &mut |_| {}).unwrap();
        assert_eq!(m.location, None);
        crate::tape::write_set(&url, &stage, &m, true, None).unwrap();
        let order = crate::tape::volume_order(&m);
        assert_eq!(order.len(), 3, "three volumes expected: {order:?}");
        // As a tape reader sees it: label, a file per volume with full
        // records, the manifest, then the end of data (two filemarks).
        let files = crate::tape::simh_files(&tap);
        assert_eq!(files.len(), order.len() + 4, "{files:?}");
        assert_eq!(files[0].len(), 1, "the label is one record");
        for (i, v) in m.sets[0].archives[0].volumes.iter().enumerate() {
            let recs = &files[i + 1];
            assert_eq!(recs.iter().sum::<usize>() as u64, v.bytes);
            assert!(recs[..recs.len() - 1]
                .iter()
                .all(|&r| r == crate::tape::RECORD));
        }
        assert!(files[order.len() + 2].is_empty() && files[order.len() + 3].is_empty());
        let label = crate::tape::read_label(&url).unwrap();
        assert_eq!(
            (label.id.as_str(), label.hostname.as_str()),
            (m.id.as_str(), m.hostname.as_str())
        );
        assert_eq!(crate::tape::read_manifest(&url).unwrap(), m);
        // Restore straight from the tape, after the pre-flight.
        let store = Store::Tape(crate::tape::Remote::new(&url, &m).unwrap());
        restores_big_file(&store, &m, &noise);
        // A damaged record in the last volume is found by the pre-flight.
        let mut b = std::fs::read(&tap).unwrap();
        let n = b.len();
        // The manifest file and end marks are at the end; the last volume
        // ends just before them: flip a byte well inside it.
        let tail = 4 * 3
            + files[order.len() + 1]
                .iter()
                .map(|r| r + (r & 1) + 8)
                .sum::<usize>();
        b[n - tail - 100] ^= 0x55;
        std::fs::write(&tap, &b).unwrap();
        let e = format!(
            "{:#}",
            preflight_archive(&store, &m.sets[0].archives[0]).unwrap_err()
        );
        assert!(e.contains("is damaged") && e.contains("tape file 3"), "{e}");
        // Incremental chains are refused for tape.
        let mut m2 = m.clone();
        m2.sets[0].level = "incremental".into();
        let e = crate::tape::write_set(&url, &stage, &m2, true, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("BACKUP_TYPE"), "{e}");
    }

    /// OBDR: read back as a tape reader would — the label area, the ISO
    /// from block 20 (xorriso checks its El Torito boot images), then the
    /// backup one tape file later, listed and restored.
    #[test]
    fn obdr_tape_is_read_back_as_a_drive_would() {
        let src = tempfile::tempdir().unwrap();
        let s = src.path();
        let noise = random_bytes(500_000);
        std::fs::write(s.join("big"), &noise).unwrap();
        let l = dir_layout(s);
        let work = tempfile::tempdir().unwrap();
        let w = work.path();
        let tree = w.join("tree/boot/grub");
        std::fs::create_dir_all(&tree).unwrap();
        std::fs::write(tree.join("grub.cfg"), "menuentry x { true }\n").unwrap();
        let iso = w.join("rescue.iso");
        let o = std::process::Command::new("grub-mkrescue")
            .arg("-o")
            .arg(&iso)
            .arg(w.join("tree"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let tap = w.join("obdr.tap");
        let url = format!("tape://{}", tap.display());
        let stage = w.join("stage");
        let opts = Options {
            volume_size: Some(200_000),
            ..Default::default()
        };
        let m = create(&l, &url, &stage, &opts, true, &mut |_| {}).unwrap();
        crate::tape::write_set(
            &url,
            &stage,
            &m,
            true,
            Some((crate::tape::OBDR_LABEL, iso.as_path())),
        )
        .unwrap();
        // Independent parse of the image: file 0 is 20 records of 512
        // bytes, then the ISO in 2048-byte records; then label, volumes,
        // manifest, end of data.
        let files = crate::tape::simh_files(&tap);
        let iso_len = std::fs::metadata(&iso).unwrap().len() as usize;
        assert!(
            files[0][..20].iter().all(|&r| r == 512),
            "{:?}",
            &files[0][..21]
        );
        assert!(files[0][20..].iter().all(|&r| r == 2048));
        assert_eq!(files[0][20..].iter().sum::<usize>(), iso_len);
        let order = crate::tape::volume_order(&m);
        assert_eq!(files.len(), 1 + 1 + order.len() + 1 + 2, "{}", files.len());
        assert_eq!(crate::tape::first_file(&url).unwrap(), 1);
        assert_eq!(
            crate::tape::obdr_label(&url).unwrap().as_deref(),
            Some(crate::tape::OBDR_LABEL)
        );
        // Skip to the ISO: the bytes as written, bootable for BIOS and UEFI.
        let back = w.join("back.iso");
        assert_eq!(
            crate::tape::read_obdr_iso(&url, &back).unwrap() as usize,
            iso_len
        );
        assert_eq!(std::fs::read(&back).unwrap(), std::fs::read(&iso).unwrap());
        let o = std::process::Command::new("xorriso")
            .args(["-indev"])
            .arg(&back)
            .args(["-report_el_torito", "plain"])
            .output()
            .unwrap();
        let et = String::from_utf8_lossy(&o.stdout);
        assert_eq!(et.matches("El Torito boot img").count(), 2, "{et}");
        // What an OBDR drive checks before it presents the CD: the El
        // Torito boot record at ISO sector 17, its identifier at byte 7.
        let b = std::fs::read(&back).unwrap();
        assert_eq!(
            &b[17 * 2048 + 7..17 * 2048 + 30],
            b"EL TORITO SPECIFICATION"
        );
        assert!(et.contains("BIOS") && et.contains("UEFI"), "{et}");
        // Skip to the backup: the label, the manifest, every volume.
        assert_eq!(crate::tape::read_label(&url).unwrap().id, m.id);
        assert_eq!(crate::tape::read_manifest(&url).unwrap(), m);
        let store = Store::Tape(crate::tape::Remote::new(&url, &m).unwrap());
        assert!(
            store.show(&order[0]).contains("tape file 2"),
            "{}",
            store.show(&order[0])
        );
        restores_big_file(&store, &m, &noise);
        // A tape holding something else is not overwritten.
        let foreign = w.join("foreign.tap");
        {
            use crate::tape::Tape;
            let mut t = crate::tape::SimhFile::open(&foreign, true).unwrap();
            t.write_record(b"SOMEONE ELSES BACKUP").unwrap();
            t.weof().unwrap();
        }
        let before = std::fs::read(&foreign).unwrap();
        let furl = format!("tape://{}", foreign.display());
        let e = crate::tape::write_set(&furl, &stage, &m, true, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("refusing to overwrite"), "{e}");
        assert_eq!(std::fs::read(&foreign).unwrap(), before);
    }
}
