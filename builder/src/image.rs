//! Reading a built image back: list, unpack and verify against its manifest.

use crate::compress;
use crate::cpio::{self, Header};
use anyhow::{bail, Context, Result};
use lifeboat_contract::{LayerInfo, Manifest};
use sha2::{Digest, Sha256};
use std::io::BufReader;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub fn load_manifest(dir: &Path) -> Result<Manifest> {
    let p = dir.join("manifest.json");
    let text = std::fs::read_to_string(&p).with_context(|| {
        format!(
            "cannot read {} (is {} a lifeboat image directory?)",
            p.display(),
            dir.display()
        )
    })?;
    Manifest::from_json(&text).with_context(|| format!("{} is not a valid manifest", p.display()))
}

/// One listed entry.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Listed {
    pub layer: String,
    pub path: String,
    pub mode: String,
    pub size: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// What kind of secret the file is (private key, password hash,
    /// credentials, ...), when it is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

pub fn mode_string(mode: u32) -> String {
    let t = match mode & cpio::S_IFMT {
        cpio::S_IFDIR => 'd',
        cpio::S_IFLNK => 'l',
        cpio::S_IFCHR => 'c',
        cpio::S_IFBLK => 'b',
        _ => '-',
    };
    let mut s = String::from(t);
    for (i, c) in "rwxrwxrwx".chars().enumerate() {
        s.push(if mode & (1 << (8 - i)) != 0 { c } else { '-' });
    }
    s
}

/// Walk one layer's archive, calling `f` for each entry with its data.
pub fn walk_layer(
    dir: &Path,
    l: &LayerInfo,
    mut f: impl FnMut(&Header, Vec<u8>) -> Result<()>,
) -> Result<()> {
    let p = dir.join(&l.file);
    let file =
        std::fs::File::open(&p).with_context(|| format!("cannot open layer {}", p.display()))?;
    let dec = compress::decoder(BufReader::new(file), l.compression)?;
    let mut r = cpio::Reader::new(BufReader::new(dec));
    while let Some(h) = r
        .next_header()
        .with_context(|| format!("layer {} ({}) is damaged", l.name, p.display()))?
    {
        let data = r
            .read_data(&h)
            .with_context(|| format!("layer {} ({}) is damaged", l.name, p.display()))?;
        f(&h, data)?;
    }
    Ok(())
}

pub fn list(dir: &Path) -> Result<Vec<Listed>> {
    let m = load_manifest(dir)?;
    let mut out = Vec::new();
    for l in &m.layers {
        walk_layer(dir, l, |h, data| {
            let link = (h.mode & cpio::S_IFMT == cpio::S_IFLNK)
                .then(|| String::from_utf8_lossy(&data).to_string());
            let secret = (h.mode & cpio::S_IFMT == cpio::S_IFREG)
                .then(|| crate::secrets::classify(&h.name, &data))
                .flatten()
                .map(str::to_string);
            out.push(Listed {
                layer: l.name.clone(),
                path: h.name.clone(),
                mode: mode_string(h.mode),
                size: h.filesize,
                link,
                secret,
            });
            Ok(())
        })?;
    }
    Ok(out)
}

/// Refuse names that would escape the destination.
fn safe_rel(name: &str) -> Result<PathBuf> {
    let p = Path::new(name.trim_start_matches("./"));
    if p.is_absolute()
        || p.components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        bail!("refusing archive entry {name:?}: it would be written outside the destination");
    }
    Ok(p.to_path_buf())
}

/// Unpack every layer in order (later wins) into `dest`, as the kernel does.
pub fn unpack(dir: &Path, dest: &Path, only: Option<&str>) -> Result<usize> {
    let mut m = load_manifest(dir)?;
    if let Some(name) = only {
        m.layers.retain(|l| l.name == name);
        if m.layers.is_empty() {
            bail!("image {} has no layer named {name:?}", dir.display());
        }
    }
    let mut n = 0usize;
    for l in &m.layers {
        let p = dir.join(&l.file);
        let file = std::fs::File::open(&p)
            .with_context(|| format!("cannot open layer {}", p.display()))?;
        let dec = compress::decoder(BufReader::new(file), l.compression)?;
        n += unpack_archive(dec, &format!("layer {} ({})", l.name, p.display()), dest)?;
    }
    Ok(n)
}

/// Unpack one (uncompressed) newc archive into `dest` over what is there;
/// `what` names it in errors. Returns the number of entries written.
pub fn unpack_archive(inp: impl std::io::Read, what: &str, dest: &Path) -> Result<usize> {
    std::fs::create_dir_all(dest).with_context(|| format!("cannot create {}", dest.display()))?;
    let dest = std::fs::canonicalize(dest)?;
    let mut n = 0usize;
    let is_root = unsafe { libc::geteuid() } == 0;
    // Hardlink groups: (ino) → first path written.
    let mut links: std::collections::HashMap<u32, PathBuf> = std::collections::HashMap::new();
    let mut r = cpio::Reader::new(BufReader::new(inp));
    while let Some(h) = r
        .next_header()
        .with_context(|| format!("{what} is damaged"))?
    {
        let data = r
            .read_data(&h)
            .with_context(|| format!("{what} is damaged"))?;
        let rel = safe_rel(&h.name)?;
        if rel.as_os_str().is_empty() || rel == Path::new(".") {
            continue;
        }
        let target = dest.join(&rel);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
            let real = std::fs::canonicalize(parent)?;
            if !real.starts_with(&dest) {
                bail!(
                    "refusing archive entry {:?}: its parent leads outside the destination",
                    h.name
                );
            }
        }
        let perm = h.mode & 0o7777;
        match h.mode & cpio::S_IFMT {
            cpio::S_IFDIR => {
                if !target.is_dir() {
                    let _ = std::fs::remove_file(&target);
                    std::fs::create_dir(&target)
                        .with_context(|| format!("cannot create {}", target.display()))?;
                }
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(perm))?;
            }
            cpio::S_IFLNK => {
                remove_existing(&target)?;
                std::os::unix::fs::symlink(String::from_utf8_lossy(&data).as_ref(), &target)
                    .with_context(|| format!("cannot create symlink {}", target.display()))?;
            }
            cpio::S_IFREG => {
                remove_existing(&target)?;
                if h.nlink > 1 {
                    if let Some(first) = links.get(&h.ino) {
                        std::fs::hard_link(first, &target)?;
                        if !data.is_empty() {
                            std::fs::write(&target, &data)?;
                        }
                        n += 1;
                        continue;
                    }
                    links.insert(h.ino, target.clone());
                }
                std::fs::write(&target, &data)
                    .with_context(|| format!("cannot write {}", target.display()))?;
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(perm))?;
            }
            cpio::S_IFCHR | cpio::S_IFBLK => {
                if is_root {
                    remove_existing(&target)?;
                    let c = std::ffi::CString::new(target.as_os_str().as_encoded_bytes())?;
                    let dev = libc::makedev(h.rdev_major, h.rdev_minor);
                    if unsafe { libc::mknod(c.as_ptr(), h.mode, dev) } != 0 {
                        return Err(std::io::Error::last_os_error())
                            .with_context(|| format!("cannot create device {}", target.display()));
                    }
                    // mknod is subject to the umask; the archive's mode is not.
                    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(perm))?;
                }
            }
            _ => bail!(
                "entry {:?} has an unsupported type (mode {:o})",
                h.name,
                h.mode
            ),
        }
        n += 1;
    }
    Ok(n)
}

fn remove_existing(p: &Path) -> Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(md) if md.is_dir() => {
            std::fs::remove_dir_all(p).with_context(|| format!("cannot replace {}", p.display()))
        }
        Ok(_) => std::fs::remove_file(p).with_context(|| format!("cannot replace {}", p.display())),
        Err(_) => Ok(()),
    }
}

/// sha256 of a file, lower-case hex.
pub fn sha256_file(p: &Path) -> Result<String> {
    let mut f = std::fs::File::open(p).with_context(|| format!("cannot open {}", p.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("cannot read {}", p.display()))?;
    Ok(hex::encode(h.finalize()))
}

/// Check every file against the manifest. Returns the list of problems
/// (empty when the image is intact).
pub fn verify(dir: &Path) -> Result<Vec<String>> {
    let m = load_manifest(dir)?;
    let mut problems = Vec::new();
    let mut check = |file: &str, want: &str, what: &str| {
        let p = dir.join(file);
        match sha256_file(&p) {
            Ok(got) if got == want => {}
            Ok(got) => problems.push(format!(
                "{what} {} is modified: sha256 {got}, manifest says {want}",
                p.display()
            )),
            Err(e) => problems.push(format!("{what} {}: {e:#}", p.display())),
        }
    };
    for l in &m.layers {
        check(&l.file, &l.sha256, &format!("layer {}", l.name));
    }
    check(&m.kernel, &m.kernel_sha256, "kernel");
    check(&m.initrd, &m.initrd_sha256, "initrd");
    if problems.is_empty() {
        // Hashes match: also make sure each archive is readable to its trailer.
        for l in &m.layers {
            let mut count = 0u64;
            if let Err(e) = walk_layer(dir, l, |_, _| {
                count += 1;
                Ok(())
            }) {
                problems.push(format!("layer {}: {e:#}", l.name));
            } else if count != l.files {
                problems.push(format!(
                    "layer {} has {count} entries, manifest says {}",
                    l.name, l.files
                ));
            }
        }
    }
    Ok(problems)
}
