//! Turn a [`Tree`] into one compressed newc archive, reproducibly, with a
//! content-addressed cache: a layer whose inputs did not change is reused
//! without reading or compressing anything.

use crate::cpio::{self, Header};
use crate::tree::{Node, Tree};
use anyhow::{Context, Result};
use lifeboat_contract::{Compression, LayerInfo};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Bump when the archive encoding changes, to invalidate caches.
const FORMAT_VERSION: &str = "lifeboat-layer-v1";

/// Every layer carries an empty file named after itself in this directory,
/// so a layer is recognised inside a concatenated initramfs.
pub const LAYER_TAG_DIR: &str = "etc/lifeboat/layers/";

#[derive(Debug, Clone)]
pub struct LayerParams {
    pub compression: Compression,
    pub level: Option<i32>,
    pub threads: u32,
    pub mtime: u32,
}

/// Sha256 of everything that determines a layer's bytes. File contents are
/// represented by their host metadata (path, size, mtime, inode), so
/// computing it costs one stat per file.
pub fn fingerprint(tree: &Tree, p: &LayerParams) -> Result<String> {
    let mut h = Sha256::new();
    h.update(FORMAT_VERSION);
    h.update(format!(
        "|{}|{:?}|{}|",
        p.compression.as_str(),
        p.level,
        p.mtime
    ));
    for (path, e) in &tree.entries {
        h.update(path.as_bytes());
        h.update(format!("\0{:o}\0", e.perm));
        match &e.node {
            Node::Dir => h.update("d"),
            Node::File { src } | Node::Decompress { src } => {
                let md = std::fs::metadata(src)
                    .with_context(|| format!("cannot stat {}", src.display()))?;
                let tag = if matches!(e.node, Node::File { .. }) {
                    "f"
                } else {
                    "z"
                };
                h.update(format!(
                    "{tag}{}\0{}\0{}\0{}\0{}\0{}",
                    src.display(),
                    md.len(),
                    md.mtime(),
                    md.mtime_nsec(),
                    md.ino(),
                    md.nlink()
                ));
            }
            Node::Bytes(b) => {
                h.update("b");
                h.update(Sha256::digest(b));
            }
            Node::Symlink(t) => h.update(format!("l{t}")),
            Node::CharDev(a, b) => h.update(format!("c{a},{b}")),
            Node::BlockDev(a, b) => h.update(format!("b{a},{b}")),
        }
        h.update("\n");
    }
    Ok(hex::encode(h.finalize()))
}

struct HashingWriter<W: Write> {
    inner: W,
    hash: Sha256,
    size: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(b)?;
        self.hash.update(&b[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Write the archive for `tree` to `out`; returns (entries, size, sha256).
pub fn write_layer(tree: &Tree, p: &LayerParams, out: &Path) -> Result<(u64, u64, String)> {
    let f = File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let hw = HashingWriter {
        inner: BufWriter::with_capacity(1 << 20, f),
        hash: Sha256::new(),
        size: 0,
    };
    let enc = crate::compress::Encoder::new(hw, p.compression, p.level, p.threads)?;
    let mut w = cpio::Writer::new(BufWriter::with_capacity(1 << 20, enc));
    write_entries(&mut w, tree, p.mtime)
        .with_context(|| format!("cannot write layer {}", out.display()))?;
    let entries = w.entries();
    let enc = w.finish()?.into_inner().map_err(|e| e.into_error())?;
    let mut hw = enc
        .finish()
        .with_context(|| format!("cannot finish {}", out.display()))?;
    hw.flush()
        .with_context(|| format!("cannot write {}", out.display()))?;
    let file = hw.inner.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()
        .with_context(|| format!("cannot sync {}", out.display()))?;
    Ok((entries, hw.size, hex::encode(hw.hash.finalize())))
}

/// Emit every entry: sorted (parents first), inode numbers assigned in order,
/// hardlinked host files share one inode and their data goes with the last
/// link, as GNU cpio does.
pub fn write_entries<W: Write>(w: &mut cpio::Writer<W>, tree: &Tree, mtime: u32) -> Result<()> {
    // Hardlink groups: host (dev, ino) seen more than once in this tree.
    let mut groups: HashMap<(u64, u64), Vec<&str>> = HashMap::new();
    for (path, e) in &tree.entries {
        if let (Node::File { .. }, Some((dev, ino, nlink))) = (&e.node, e.host_id) {
            if nlink > 1 {
                groups.entry((dev, ino)).or_default().push(path);
            }
        }
    }
    groups.retain(|_, v| v.len() > 1);
    let mut group_ino: HashMap<(u64, u64), u32> = HashMap::new();
    let mut next_ino: u32 = 1;
    for (path, e) in &tree.entries {
        let group = match (&e.node, e.host_id) {
            (Node::File { .. }, Some((dev, ino, _))) if groups.contains_key(&(dev, ino)) => {
                Some((dev, ino))
            }
            _ => None,
        };
        let ino = match group {
            Some(k) => *group_ino.entry(k).or_insert_with(|| {
                next_ino += 1;
                next_ino - 1
            }),
            None => {
                next_ino += 1;
                next_ino - 1
            }
        };
        let mut h = Header {
            name: path.clone(),
            ino,
            mode: e.perm & 0o7777,
            uid: 0,
            gid: 0,
            nlink: 1,
            mtime,
            filesize: 0,
            rdev_major: 0,
            rdev_minor: 0,
        };
        match &e.node {
            Node::Dir => {
                h.mode |= cpio::S_IFDIR;
                h.nlink = 2;
                w.header(&h)?;
            }
            Node::Symlink(t) => {
                h.mode = cpio::S_IFLNK | 0o777;
                h.filesize = t.len() as u32;
                w.header(&h)?;
                w.data(t.as_bytes())?;
            }
            Node::CharDev(a, b) | Node::BlockDev(a, b) => {
                h.mode |= if matches!(e.node, Node::CharDev(..)) {
                    cpio::S_IFCHR
                } else {
                    cpio::S_IFBLK
                };
                h.rdev_major = *a;
                h.rdev_minor = *b;
                w.header(&h)?;
            }
            Node::Bytes(b) => {
                h.mode |= cpio::S_IFREG;
                h.filesize = size32(b.len() as u64, path)?;
                w.header(&h)?;
                w.data(b)?;
            }
            Node::Decompress { src } => {
                let data = crate::compress::read_maybe_compressed(src)?;
                h.mode |= cpio::S_IFREG;
                h.filesize = size32(data.len() as u64, path)?;
                w.header(&h)?;
                w.data(&data)?;
            }
            Node::File { src } => {
                h.mode |= cpio::S_IFREG;
                let mut carries_data = true;
                if let Some(k) = group {
                    let members = &groups[&k];
                    h.nlink = members.len() as u32;
                    carries_data = members.last() == Some(&path.as_str());
                }
                if carries_data {
                    let mut f = File::open(src)
                        .with_context(|| format!("cannot open {}", src.display()))?;
                    let len = f.metadata()?.len();
                    h.filesize = size32(len, path)?;
                    w.header(&h)?;
                    w.data_from(&mut f, len, &src.display().to_string())
                        .with_context(|| format!("cannot archive {}", src.display()))?;
                } else {
                    w.header(&h)?;
                }
            }
        }
        w.finish_entry()?;
    }
    Ok(())
}

fn size32(n: u64, path: &str) -> Result<u32> {
    u32::try_from(n).map_err(|_| {
        anyhow::anyhow!("/{path} is {n} bytes; newc archives hold files below 4 GiB only")
    })
}

#[derive(Serialize, Deserialize)]
struct CacheMeta {
    files: u64,
    size: u64,
    sha256: String,
}

/// Cache of built layers, keyed by [`fingerprint`].
pub struct LayerCache {
    pub dir: Option<PathBuf>,
}

/// What building one layer did.
pub struct Built {
    pub info: LayerInfo,
    pub from_cache: bool,
}

impl LayerCache {
    fn paths(&self, fp: &str, c: Compression) -> Option<(PathBuf, PathBuf)> {
        self.dir.as_ref().map(|d| {
            (
                d.join(format!("{fp}.{}", c.suffix())),
                d.join(format!("{fp}.json")),
            )
        })
    }

    /// Produce the layer `name` from `tree` at `dest_dir/<file>`, from the
    /// cache when possible.
    pub fn build(
        &self,
        name: &str,
        tree: &Tree,
        p: &LayerParams,
        dest_dir: &Path,
    ) -> Result<Built> {
        let file = format!("{name}.{}", p.compression.suffix());
        let dest = dest_dir.join(&file);
        let fp = fingerprint(tree, p)?;
        if let Some((data, meta)) = self.paths(&fp, p.compression) {
            if let (Ok(m), true) = (std::fs::read_to_string(&meta), data.exists()) {
                if let Ok(m) = serde_json::from_str::<CacheMeta>(&m) {
                    if std::fs::metadata(&data).map(|md| md.len()).ok() == Some(m.size) {
                        link_or_copy(&data, &dest)?;
                        return Ok(Built {
                            info: LayerInfo {
                                name: name.to_string(),
                                file,
                                compression: p.compression,
                                size: m.size,
                                sha256: m.sha256,
                                files: m.files,
                            },
                            from_cache: true,
                        });
                    }
                }
            }
        }
        let (files, size, sha256) = write_layer(tree, p, &dest)?;
        if let Some((data, meta)) = self.paths(&fp, p.compression) {
            // A cache that cannot be written is not an error: the next build is just slower.
            let _ = self.store(
                &dest,
                &data,
                &meta,
                &CacheMeta {
                    files,
                    size,
                    sha256: sha256.clone(),
                },
            );
        }
        Ok(Built {
            info: LayerInfo {
                name: name.to_string(),
                file,
                compression: p.compression,
                size,
                sha256,
                files,
            },
            from_cache: false,
        })
    }

    fn store(&self, built: &Path, data: &Path, meta: &Path, m: &CacheMeta) -> Result<()> {
        let dir = data.parent().unwrap();
        std::fs::create_dir_all(dir)?;
        // Plan layers (the host's configuration, maybe exposed secrets) and
        // initrds made of them live here: root's alone.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        let tmp = tempfile::NamedTempFile::new_in(dir)?;
        std::fs::copy(built, tmp.path())?;
        tmp.persist(data)?;
        let tmpm = tempfile::NamedTempFile::new_in(dir)?;
        std::fs::write(tmpm.path(), serde_json::to_vec(m)?)?;
        tmpm.persist(meta)?;
        Ok(())
    }
}

/// Hard-link `src` to `dst` when they share a filesystem, else copy.
pub fn link_or_copy(src: &Path, dst: &Path) -> Result<()> {
    let _ = std::fs::remove_file(dst);
    if std::fs::hard_link(src, dst).is_err() {
        std::fs::copy(src, dst)
            .with_context(|| format!("cannot copy {} to {}", src.display(), dst.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hardlinks_share_an_inode_and_data_goes_last() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        std::fs::write(&a, b"data").unwrap();
        std::fs::hard_link(&a, d.path().join("b")).unwrap();
        let mut t = Tree::new();
        t.add_file_as("x/a", &a).unwrap();
        t.add_file_as("x/b", &d.path().join("b")).unwrap();
        let mut w = cpio::Writer::new(Vec::new());
        write_entries(&mut w, &t, 0).unwrap();
        let out = w.finish().unwrap();
        let mut r = cpio::Reader::new(&out[..]);
        let mut seen = Vec::new();
        while let Some(h) = r.next_header().unwrap() {
            let data = r.read_data(&h).unwrap();
            seen.push((h.name.clone(), h.ino, h.nlink, data));
        }
        assert_eq!(seen[1].0, "x/a");
        assert_eq!(seen[1].1, seen[2].1);
        assert_eq!(seen[1].2, 2);
        assert!(seen[1].3.is_empty());
        assert_eq!(seen[2].3, b"data");
    }

    #[test]
    fn cache_is_hit_and_invalidated() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("f");
        std::fs::write(&src, b"one").unwrap();
        let mut t = Tree::new();
        t.add_file_as("f", &src).unwrap();
        let cache = LayerCache {
            dir: Some(d.path().join("cache")),
        };
        let p = LayerParams {
            compression: Compression::Zstd,
            level: None,
            threads: 1,
            mtime: 0,
        };
        let out = d.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let a = cache.build("l", &t, &p, &out).unwrap();
        assert!(!a.from_cache);
        let b = cache.build("l", &t, &p, &out).unwrap();
        assert!(b.from_cache);
        assert_eq!(a.info, b.info);
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&src, b"two!").unwrap();
        let c = cache.build("l", &t, &p, &out).unwrap();
        assert!(!c.from_cache);
        assert_ne!(c.info.sha256, a.info.sha256);
    }
}
