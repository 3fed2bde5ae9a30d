//! The basic backup method: one GNU tar + zstd archive per captured local
//! filesystem, each with its sha256, and `backup.json` describing them.
//!
//! Creation streams `tar --create` through the zstd encoder into the target
//! file while hashing the compressed bytes; restore checks the sha256 of
//! every archive before anything is extracted and streams the decoder into
//! `tar --extract`.

use anyhow::{bail, Context, Result};
use lifeboat_contract::{
    BackupArchive, BackupLocation, BackupManifest, Layout, BACKUP_SCHEMA_VERSION,
};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Name of the manifest inside the backup directory.
pub const MANIFEST_FILE: &str = "backup.json";

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

/// Archive file name for a mount point: `/` → `root.tar.zst`, `/var/lib` → `var_lib.tar.zst`.
pub fn archive_name(mountpoint: &str) -> String {
    let t = mountpoint.trim_matches('/');
    if t.is_empty() {
        "root.tar.zst".into()
    } else {
        format!("{}.tar.zst", t.replace('/', "_"))
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

/// A writer that hashes and counts what passes through.
struct Hashing<W: Write> {
    inner: W,
    hash: Sha256,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
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

/// Archive one mounted filesystem into `file` (written atomically).
fn archive_one(
    mountpoint: &str,
    excludes: &[String],
    file: &Path,
    level: i32,
) -> Result<(String, u64, u64)> {
    let dir = file.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    let mut cmd = Command::new("tar");
    cmd.args(["--create", "--file=-", "--one-file-system", "--sparse"])
        .args(TAR_KEEP)
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
    let mut stderr = child.stderr.take().unwrap();
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let out = Hashing {
        inner: std::io::BufWriter::new(tmp.as_file().try_clone()?),
        hash: Sha256::new(),
        bytes: 0,
    };
    let mut enc = zstd::stream::Encoder::new(out, level)?;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as u32;
    if threads > 1 {
        enc.multithread(threads)?;
    }
    let tar_bytes = std::io::copy(&mut stdout, &mut enc)
        .with_context(|| format!("cannot archive {mountpoint}"))?;
    let mut out = enc.finish()?;
    out.flush()?;
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
    tmp.as_file().sync_all()?;
    let sha = hex::encode(out.hash.finalize());
    let bytes = out.bytes;
    tmp.persist(file)
        .with_context(|| format!("cannot rename into {}", file.display()))?;
    Ok((sha, bytes, tar_bytes))
}

/// Back up every captured local filesystem of `layout` into `dir`.
/// `excludes` are absolute paths left out; `dir` itself is always left out.
pub fn create(
    layout: &Layout,
    url: &str,
    dir: &Path,
    excludes: &[String],
    progress: &mut dyn FnMut(&str),
) -> Result<BackupManifest> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", dir.display()))?;
    let location = locate(&dir)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut all_excludes: Vec<String> = excludes.to_vec();
    all_excludes.push(dir.to_string_lossy().to_string());
    // Runtime scratch that a restored system must not inherit.
    all_excludes.extend(["/tmp/*".to_string(), "/var/tmp/*".to_string()]);
    let mut archives = Vec::new();
    for m in mounts_to_back_up(layout) {
        if m.source == location.device {
            continue;
        }
        let name = archive_name(&m.target);
        let file = dir.join(&name);
        progress(&format!("archiving {} into {}", m.target, file.display()));
        let t = std::time::Instant::now();
        let ex = relative_excludes(&m.target, &all_excludes);
        let (sha256, bytes, tar_bytes) = archive_one(&m.target, &ex, &file, 3)?;
        progress(&format!(
            "  {} bytes of tar, {} bytes compressed, {:.1} s, sha256 {}",
            tar_bytes,
            bytes,
            t.elapsed().as_secs_f64(),
            sha256
        ));
        let fs = layout.filesystems.iter().find(|f| f.device == m.source);
        archives.push(BackupArchive {
            mountpoint: m.target.clone(),
            fs_uuid: fs.and_then(|f| f.uuid.clone()),
            fstype: m.fstype.clone(),
            file: name,
            sha256,
            bytes,
            tar_bytes,
        });
    }
    if !archives.iter().any(|a| a.mountpoint == "/") {
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
        );
    }
    let m = BackupManifest {
        schema_version: BACKUP_SCHEMA_VERSION,
        id: format!("{}-{}", layout.hostname, now),
        hostname: layout.hostname.clone(),
        created_unix: now,
        method: "tar".into(),
        compression: "zstd".into(),
        url: url.to_string(),
        dir: dir.to_string_lossy().to_string(),
        location: Some(location),
        archives,
    };
    crate::cmd::layout::write_atomic(&dir.join(MANIFEST_FILE), &serde_json::to_vec_pretty(&m)?)?;
    Ok(m)
}

/// sha256 of a file, streamed.
pub fn file_sha256(p: &Path) -> Result<String> {
    crate::image::sha256_file(p)
}

/// Check an archive against the manifest: present, same size, same sha256.
pub fn verify_archive(dir: &Path, a: &BackupArchive) -> Result<()> {
    let p = dir.join(&a.file);
    let meta = std::fs::metadata(&p).with_context(|| {
        format!(
            "backup archive {} is missing (the backup for {} is incomplete)",
            p.display(),
            a.mountpoint
        )
    })?;
    if meta.len() != a.bytes {
        bail!(
            "backup archive {} has {} bytes, the manifest says {}: it is truncated or was replaced",
            p.display(),
            meta.len(),
            a.bytes
        );
    }
    let sha = file_sha256(&p)?;
    if sha != a.sha256 {
        bail!(
            "backup archive {} is damaged: sha256 {} but the manifest recorded {}",
            p.display(),
            sha,
            a.sha256
        );
    }
    Ok(())
}

/// Extract one archive into `target` (a mounted filesystem).
pub fn extract(dir: &Path, a: &BackupArchive, target: &Path) -> Result<()> {
    let p = dir.join(&a.file);
    let f = std::fs::File::open(&p).with_context(|| format!("cannot open {}", p.display()))?;
    let mut child = Command::new("tar")
        .args([
            "--extract",
            "--file=-",
            "--preserve-permissions",
            "--sparse",
        ])
        .args(TAR_KEEP)
        .arg("--directory")
        .arg(target)
        .stdin(Stdio::piped())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run tar")?;
    let mut stdin = child.stdin.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let copied = zstd::stream::copy_decode(std::io::BufReader::new(f), &mut stdin);
    drop(stdin);
    let status = child.wait()?;
    let errors = err_thread.join().unwrap_or_default();
    if let Err(e) = copied {
        bail!(
            "cannot decompress {}: {e}\n{}",
            p.display(),
            errors.trim_end()
        );
    }
    if !status.success() {
        bail!(
            "tar failed extracting {} into {} ({status}):\n{}",
            p.display(),
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

    #[test]
    fn archive_names() {
        assert_eq!(archive_name("/"), "root.tar.zst");
        assert_eq!(archive_name("/boot"), "boot.tar.zst");
        assert_eq!(archive_name("/var/lib/x"), "var_lib_x.tar.zst");
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

    #[test]
    fn roundtrip_through_real_tar_with_hash_check() {
        // A tree with a hardlink, a symlink, a sparse file and odd modes.
        let src = tempfile::tempdir().unwrap();
        let s = src.path();
        std::fs::write(s.join("a"), b"hello").unwrap();
        std::fs::hard_link(s.join("a"), s.join("a-link")).unwrap();
        std::os::unix::fs::symlink("a", s.join("sym")).unwrap();
        let sparse = std::fs::File::create(s.join("sparse")).unwrap();
        sparse.set_len(64 << 20).unwrap();
        std::fs::create_dir(s.join("d")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(s.join("d"), std::fs::Permissions::from_mode(0o1750)).unwrap();
        let out = tempfile::tempdir().unwrap();
        let file = out.path().join("x.tar.zst");
        let (sha, bytes, tar_bytes) =
            archive_one(s.to_str().unwrap(), &["./d/skip".into()], &file, 3).unwrap();
        assert_eq!(sha, file_sha256(&file).unwrap());
        assert_eq!(bytes, std::fs::metadata(&file).unwrap().len());
        assert!(tar_bytes > 0);
        // The sparse 64 MiB file must not make a 64 MiB archive.
        assert!(bytes < 1 << 20, "archive is {bytes} bytes");
        let a = BackupArchive {
            mountpoint: "/".into(),
            fs_uuid: None,
            fstype: "ext4".into(),
            file: "x.tar.zst".into(),
            sha256: sha.clone(),
            bytes,
            tar_bytes,
        };
        verify_archive(out.path(), &a).unwrap();
        let dst = tempfile::tempdir().unwrap();
        extract(out.path(), &a, dst.path()).unwrap();
        let d = dst.path();
        assert_eq!(std::fs::read(d.join("a-link")).unwrap(), b"hello");
        use std::os::unix::fs::MetadataExt;
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
        // A damaged archive is refused before extraction.
        let mut bad = a.clone();
        bad.sha256 = "0".repeat(64);
        let e = verify_archive(out.path(), &bad).unwrap_err().to_string();
        assert!(e.contains("damaged"), "{e}");
        let mut short = a;
        short.bytes += 1;
        let e = verify_archive(out.path(), &short).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
    }
}
