//! Secret hygiene: what counts as a secret, keeping secrets out of images
//! unless asked (`--expose-secrets`, then only in the plan layer), and a
//! scanner that looks through built outputs (image directories, layers,
//! initrds, ISOs, disk images, PXE trees, tarballs) for private keys,
//! password hashes and credentials.

use crate::compress;
use crate::cpio;
use crate::tree::{Node, Tree};
use anyhow::{Context, Result};
use lifeboat_contract::Compression;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Files bigger than this are not looked into (keys, hashes and
/// credentials are small; binaries and modules are not).
const MAX_SCAN: u64 = 1 << 20;

/// What kind of secret `data` (found at archive path `path`) is, if any.
pub fn classify(path: &str, data: &[u8]) -> Option<&'static str> {
    let path = path.trim_start_matches('/');
    let name = path.rsplit('/').next().unwrap_or(path);
    if path.starts_with("etc/ssh/") && name.starts_with("ssh_host_") && name.ends_with("_key") {
        return Some("SSH host private key");
    }
    if path.starts_with("var/lib/lifeboat/serve/") && name.ends_with(".token") {
        return Some("lifeboat serve token");
    }
    // Programs, firmware and other binary data: keys, hashes and
    // credentials are looked for in text only (a NUL in the first 4 KiB
    // means binary), so a firmware blob is never dropped by chance.
    if data.starts_with(b"\x7fELF") || data[..data.len().min(4096)].contains(&0) {
        return None;
    }
    if contains(data, b"-----BEGIN") && contains(data, b"PRIVATE KEY-----") {
        return Some("private key");
    }
    if contains(data, b"AGE-SECRET-KEY-1") {
        return Some("age identity (backup key)");
    }
    if has_crypt_hash(data) {
        return Some("password hash");
    }
    if data
        .split(|b| *b == b'\n')
        .any(|l| l.starts_with(b"password=") && l.len() > 9)
    {
        return Some("credentials (password=)");
    }
    None
}

fn contains(h: &[u8], n: &[u8]) -> bool {
    h.windows(n.len()).any(|w| w == n)
}

/// A crypt(3) hash as /etc/shadow holds it: `$id$[params$]salt$hash` with
/// id 1, 5, 6, y, gy, 7 or 2a/2b/2y, and a hash part of at least 22
/// characters (format strings in libraries do not match).
pub fn has_crypt_hash(data: &[u8]) -> bool {
    let ok = |c: u8| c.is_ascii_alphanumeric() || c == b'.' || c == b'/';
    let ids: [&[u8]; 9] = [
        b"$1$", b"$5$", b"$6$", b"$y$", b"$gy$", b"$7$", b"$2a$", b"$2b$", b"$2y$",
    ];
    for (i, _) in data.iter().enumerate().filter(|(_, b)| **b == b'$') {
        let rest = &data[i..];
        let Some(id) = ids.iter().find(|id| rest.starts_with(id)) else {
            continue;
        };
        // Fields after the id, each of crypt characters (rounds=N allowed).
        let mut fields = Vec::new();
        let mut cur = 0usize;
        let mut j = id.len();
        while j < rest.len() {
            let c = rest[j];
            if c == b'$' {
                fields.push(cur);
                cur = 0;
            } else if ok(c) || c == b'=' {
                cur += 1;
            } else {
                break;
            }
            j += 1;
        }
        fields.push(cur);
        // salt (and params) non-empty, the last field the hash itself.
        if fields.len() >= 2 && fields[..fields.len() - 1].iter().all(|n| *n > 0) {
            if let Some(last) = fields.last() {
                if *last >= 22 {
                    return true;
                }
            }
        }
    }
    false
}

/// The content of a tree entry, when it is a small regular file.
fn entry_bytes(node: &Node) -> Option<Vec<u8>> {
    match node {
        Node::Bytes(b) => Some(b.clone()),
        Node::File { src } => {
            let m = std::fs::metadata(src).ok()?;
            if !m.is_file() || m.len() > MAX_SCAN {
                return None;
            }
            // Programs and libraries are not looked into.
            let mut f = std::fs::File::open(src).ok()?;
            let mut magic = [0u8; 4];
            if read_full(&mut f, &mut magic).ok()? == 4 && &magic == b"\x7fELF" {
                return None;
            }
            std::fs::read(src).ok()
        }
        _ => None,
    }
}

/// Keep secrets out of the image. `layers` are (name, tree); `known` are
/// host paths configured as secrets (key, credential and token files).
/// Without `expose`, secret files are left out (each named in a warning);
/// with it they are moved into the plan layer, mode 0600. Returns the
/// archive paths that the plan layer carries as secrets.
pub fn guard(
    layers: &mut [(String, Tree, Compression)],
    known: &[PathBuf],
    expose: bool,
    allowed_in_plan: &[String],
    warnings: &mut Vec<String>,
) -> Vec<String> {
    let mut moved: Vec<(String, crate::tree::Entry, &'static str)> = Vec::new();
    let has_plan = layers.iter().any(|(n, _, _)| n == "plan");
    for (name, tree, _) in layers.iter_mut() {
        let is_plan = name == "plan";
        let mut found = Vec::new();
        for (path, e) in &tree.entries {
            let by_path = match &e.node {
                Node::File { src } => known.contains(src),
                _ => false,
            };
            let kind = if by_path {
                Some("configured secret file")
            } else {
                entry_bytes(&e.node).and_then(|b| classify(path, &b))
            };
            if let Some(kind) = kind {
                found.push((path.clone(), kind));
            }
        }
        for (path, kind) in found {
            if is_plan && (expose || allowed_in_plan.contains(&path)) {
                continue;
            }
            let e = tree.entries.remove(&path).unwrap();
            if expose && has_plan {
                moved.push((path, e, kind));
            } else {
                warnings.push(format!(
                    "left out of the image: /{path} ({kind}, from the {name} layer); secrets stay out of images \
                     unless mkrescue/mkbackup --expose-secrets (then in the plan layer only, mode 0600)"
                ));
            }
        }
    }
    let mut carried: Vec<String> = Vec::new();
    if let Some((_, plan, _)) = layers.iter_mut().find(|(n, _, _)| n == "plan") {
        for (path, mut e, kind) in moved {
            e.perm = 0o600;
            e.host_id = None;
            plan.add_parents(&path);
            warnings.push(format!(
                "--expose-secrets: /{path} ({kind}) is carried in the plan layer, mode 0600"
            ));
            plan.entries.insert(path.clone(), e);
            carried.push(path);
        }
        if expose {
            let mut found = Vec::new();
            for (path, e) in &plan.entries {
                if let Some(b) = entry_bytes(&e.node) {
                    if classify(path, &b).is_some() {
                        found.push(path.clone());
                    }
                }
            }
            for p in found {
                if let Some(e) = plan.entries.get_mut(&p) {
                    e.perm = 0o600;
                }
                if !carried.contains(&p) {
                    carried.push(p);
                }
            }
        }
    }
    carried.sort();
    carried
}

/// Make an output that holds the plan readable by root only: a file, or in
/// a directory (and below) every file but the shared layers, the kernel,
/// the manifest and boot loader files, which hold nothing of the host's.
pub fn restrict(path: &Path) -> Result<()> {
    let set = |p: &Path| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot make {} private", p.display()))
    };
    if path.is_file() {
        return set(path);
    }
    for e in walkdir::WalkDir::new(path).into_iter().flatten() {
        if !e.file_type().is_file() {
            continue;
        }
        let n = e.file_name().to_string_lossy().into_owned();
        let holds_plan = n.starts_with("plan.")
            || n.starts_with("initrd")
            || n.starts_with("personal")
            || [".iso", ".raw", ".qcow2", ".efi", ".img", ".tar.gz"]
                .iter()
                .any(|x| n.ends_with(x));
        let shared = n.ends_with(".efi") && e.path().components().any(|c| c.as_os_str() == "EFI");
        if holds_plan && !shared {
            set(e.path())?;
        }
    }
    Ok(())
}

/// One secret found in an output.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    /// Where: the file, and inside it (`disk.img:p3:/boot/initrd.img`).
    pub place: String,
    /// The layer (by the name it carries), when inside an initramfs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer: Option<String>,
    pub kind: String,
}

/// Look through `path` (a file or directory, of any output kind) for
/// secrets.
pub fn scan(path: &Path) -> Result<Vec<Finding>> {
    let mut out = Vec::new();
    scan_into(path, &path.display().to_string(), &mut out, 0)?;
    Ok(out)
}

fn scan_into(path: &Path, place: &str, out: &mut Vec<Finding>, depth: u32) -> Result<()> {
    if depth > 6 {
        return Ok(());
    }
    let m = std::fs::symlink_metadata(path).with_context(|| format!("cannot read {place}"))?;
    if m.is_dir() {
        let mut names: Vec<_> = std::fs::read_dir(path)?.flatten().collect();
        names.sort_by_key(|e| e.file_name());
        for e in names {
            let n = e.file_name().to_string_lossy().into_owned();
            scan_into(&e.path(), &format!("{place}/{n}"), out, depth + 1)?;
        }
        return Ok(());
    }
    if !m.is_file() {
        return Ok(());
    }
    let mut head = vec![0u8; 0x8010];
    let n = {
        let mut f = std::fs::File::open(path)?;
        read_full(&mut f, &mut head)?
    };
    head.truncate(n);
    if head.len() > 0x8006 && &head[0x8001..0x8006] == b"CD001" {
        let t = tempfile::tempdir()?;
        let st = Command::new("xorriso")
            .args(["-osirrox", "on", "-indev"])
            .arg(path)
            .args(["-extract", "/"])
            .arg(t.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("cannot run xorriso to look into an ISO (apt-get install xorriso)")?;
        if !st.success() {
            anyhow::bail!("xorriso cannot read the ISO {place}");
        }
        // Everything the ISO holds, also its embedded EFI boot image.
        return scan_extracted(t.path(), place, out, depth);
    }
    if let Some(parts) = partitions(&head, path) {
        for (i, (start, fs)) in parts.into_iter().enumerate() {
            let t = tempfile::tempdir()?;
            let mut c = match fs.as_str() {
                "vfat" => {
                    let mut c = Command::new("mcopy");
                    c.args(["-s", "-n", "-i"])
                        .arg(format!("{}@@{start}", path.display()))
                        .arg("::/")
                        .arg(t.path());
                    c
                }
                "ext2" | "ext3" | "ext4" => {
                    let mut c = Command::new("debugfs");
                    c.arg("-R")
                        .arg(format!("rdump / {}", t.path().display()))
                        .arg(format!("{}?offset={start}", path.display()));
                    c
                }
                _ => continue,
            };
            let ok = c
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                anyhow::bail!("cannot read partition {} ({fs}) of {place}", i + 1);
            }
            scan_extracted(t.path(), &format!("{place}:p{}", i + 1), out, depth)?;
        }
        return Ok(());
    }
    let comp = compress::detect_magic(&head);
    let is_cpio = head.starts_with(b"070701") || head.starts_with(b"070702");
    if is_cpio || comp != Compression::None {
        if head.starts_with(&[0x1f, 0x8b]) && place.contains(".tar") {
            return scan_tar(path, place, out);
        }
        return scan_initramfs(path, place, out);
    }
    if m.len() <= MAX_SCAN {
        let data = std::fs::read(path)?;
        if let Some(kind) = classify(place, &data) {
            out.push(Finding {
                place: place.to_string(),
                layer: None,
                kind: kind.into(),
            });
        }
    }
    Ok(())
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let n = r.read(&mut buf[got..])?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(got)
}

/// Partitions of a disk image (byte offset, filesystem type by blkid).
fn partitions(head: &[u8], path: &Path) -> Option<Vec<(u64, String)>> {
    if head.len() < 1024 || head[510] != 0x55 || head[511] != 0xaa {
        return None;
    }
    let out = Command::new("sfdisk")
        .arg("--json")
        .arg(path)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let ss = v["partitiontable"]["sectorsize"].as_u64().unwrap_or(512);
    let mut parts = Vec::new();
    for p in v["partitiontable"]["partitions"].as_array()? {
        let start = p["start"].as_u64()? * ss;
        let o = Command::new("blkid")
            .args(["-p", "-o", "value", "-s", "TYPE", "-O"])
            .arg(start.to_string())
            .arg(path)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        parts.push((start, String::from_utf8_lossy(&o.stdout).trim().to_string()));
    }
    Some(parts)
}

fn scan_tar(path: &Path, place: &str, out: &mut Vec<Finding>) -> Result<()> {
    let t = tempfile::tempdir()?;
    let st = Command::new("tar")
        .arg("-xzf")
        .arg(path)
        .arg("-C")
        .arg(t.path())
        .stdin(Stdio::null())
        .status()
        .context("cannot run tar")?;
    if !st.success() {
        anyhow::bail!("tar cannot read {place}");
    }
    scan_extracted(t.path(), place, out, 0)
}

/// Scan what was extracted from `place` into `dir`, naming findings by
/// `place` rather than the temporary directory.
fn scan_extracted(dir: &Path, place: &str, out: &mut Vec<Finding>, depth: u32) -> Result<()> {
    let before = out.len();
    let tmp = dir.display().to_string();
    scan_into(dir, &tmp, out, depth + 1)?;
    for f in &mut out[before..] {
        f.place = f.place.replacen(&tmp, place, 1);
    }
    Ok(())
}

/// An initramfs: cpio archives, each maybe compressed, one after another
/// (a single layer file is the one-member case). Each member's layer name
/// is the one it carries in `etc/lifeboat/layers/`.
fn scan_initramfs(path: &Path, place: &str, out: &mut Vec<Finding>) -> Result<()> {
    let f = std::fs::File::open(path)?;
    let mut r = BufReader::new(f);
    let mut member = 0;
    loop {
        // Skip the zero padding between members.
        loop {
            let buf = r.fill_buf()?;
            if buf.is_empty() {
                return Ok(());
            }
            let z = buf.iter().take_while(|b| **b == 0).count();
            if z == 0 {
                break;
            }
            r.consume(z);
        }
        member += 1;
        let head = r.fill_buf()?.to_vec();
        let comp = compress::detect_magic(&head);
        let entries = read_member(&mut r, comp)
            .with_context(|| format!("{place}: member {member} is not a readable cpio archive"))?;
        let layer = entries
            .iter()
            .find_map(|(p, _)| {
                p.strip_prefix(crate::layers::LAYER_TAG_DIR)
                    .map(|n| n.trim_start_matches('/').to_string())
            })
            .filter(|n| !n.is_empty());
        for (p, data) in entries {
            if let Some(kind) = classify(&p, &data) {
                out.push(Finding {
                    place: format!("{place}:/{p}"),
                    layer: layer.clone(),
                    kind: kind.into(),
                });
            }
        }
        if comp == Compression::None && member > 64 {
            return Ok(());
        }
    }
}

/// Read one member: its regular files (path, data up to MAX_SCAN bytes).
/// `r` is left right after the member.
fn read_member<R: BufRead>(r: &mut R, comp: Compression) -> Result<Vec<(String, Vec<u8>)>> {
    if comp == Compression::None {
        return read_cpio(r);
    }
    let mut dec = compress::single_stream_decoder(&mut *r, comp)?;
    let v = read_cpio(BufReader::new(&mut dec))?;
    // The rest of the stream (padding after the trailer).
    std::io::copy(&mut dec, &mut std::io::sink())?;
    Ok(v)
}

fn read_cpio<R: Read>(inp: R) -> Result<Vec<(String, Vec<u8>)>> {
    let mut c = cpio::Reader::new(inp);
    let mut v = Vec::new();
    while let Some(h) = c.next_header()? {
        let data = c.read_data(&h)?;
        if h.mode & cpio::S_IFMT == cpio::S_IFREG && (data.len() as u64) <= MAX_SCAN {
            v.push((h.name.trim_start_matches("./").to_string(), data));
        }
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_recognised_and_ordinary_files_are_not() {
        let pem =
            b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n-----END OPENSSH PRIVATE KEY-----\n";
        assert_eq!(classify("root/key", pem), Some("private key"));
        assert_eq!(
            classify("etc/x", b"-----BEGIN PRIVATE KEY-----\nMC4CAQ\n"),
            Some("private key")
        );
        assert_eq!(
            classify("etc/ssh/ssh_host_ed25519_key", b"anything"),
            Some("SSH host private key")
        );
        assert_eq!(
            classify("etc/ssh/ssh_host_ed25519_key.pub", b"ssh-ed25519 AAAA"),
            None
        );
        assert_eq!(
            classify("k", b"# created\nAGE-SECRET-KEY-1QQQ\n"),
            Some("age identity (backup key)")
        );
        let shadow = b"root:$6$saltsalt$Lq2u4dpN0mQtCUDh2E3wI7l9j0aYbKDbFJ0mXKpPS0pQ3Dm8q3KvYqZ1bN5vT8a0Y.t9F4PfHzVZCqOSrP1kU1:19000:0:99999:7:::\n";
        assert_eq!(classify("etc/shadow", shadow), Some("password hash"));
        let yes = br#"{"password_hash": "$y$j9T$abcdefghijklmnop$ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopq"}"#;
        assert_eq!(
            classify("etc/lifeboat/init.json", yes),
            Some("password hash")
        );
        // Stock files and format strings are not secrets.
        assert_eq!(classify("etc/shadow", b"root:*:19000:0:99999:7:::\n"), None);
        assert_eq!(classify("lib/x", b"prefix $6$ and $y$ rounds=%u$"), None);
        assert_eq!(
            classify("etc/ssl/cert.pem", b"-----BEGIN CERTIFICATE-----\nMII\n"),
            None
        );
        assert_eq!(
            classify(
                "etc/lifeboat/cifs.cred",
                b"username=root\npassword=s3cret\n"
            ),
            Some("credentials (password=)")
        );
        assert_eq!(
            classify("bin/x", b"\x7fELF-----BEGIN PRIVATE KEY-----"),
            None
        );
        assert_eq!(
            classify(
                "lib/firmware/x.bin",
                b"\x01\x00-----BEGIN PRIVATE KEY-----\npassword=x\n"
            ),
            None
        );
    }

    #[test]
    fn guard_leaves_secrets_out_or_moves_them_into_the_plan_layer() {
        let t = tempfile::tempdir().unwrap();
        let key = t.path().join("backup.key");
        std::fs::write(&key, "my passphrase\n").unwrap();
        let mk = || {
            let mut tools = Tree::new();
            tools.add_bytes("etc/ssh/ssh_host_rsa_key", b"x".to_vec(), 0o600);
            tools.add_bytes(
                "etc/ssh/ssh_host_rsa_key.pub",
                b"ssh-rsa AAAA".to_vec(),
                0o644,
            );
            tools.add_file_as("etc/lifeboat/backup.key", &key).unwrap();
            tools.add_bytes("bin/sh", b"\x7fELF".to_vec(), 0o755);
            let mut plan = Tree::new();
            plan.add_bytes("etc/lifeboat/init.json", b"{}".to_vec(), 0o600);
            plan.add_bytes(
                "etc/lifeboat/cifs.cred",
                b"username=u\npassword=p\n".to_vec(),
                0o600,
            );
            vec![
                ("tools".to_string(), tools, Compression::None),
                ("plan".to_string(), plan, Compression::None),
            ]
        };
        let known = vec![key.clone()];
        // Default: everything secret is left out and named; the
        // credentials the configuration allows stay in the plan.
        let mut l = mk();
        let mut w = vec![];
        let carried = guard(
            &mut l,
            &known,
            false,
            &["etc/lifeboat/cifs.cred".into()],
            &mut w,
        );
        assert!(carried.is_empty());
        assert!(!l[0].1.contains("etc/ssh/ssh_host_rsa_key"));
        assert!(l[0].1.contains("etc/ssh/ssh_host_rsa_key.pub"));
        assert!(!l[0].1.contains("etc/lifeboat/backup.key"));
        assert!(l[0].1.contains("bin/sh"));
        assert!(l[1].1.contains("etc/lifeboat/cifs.cred"));
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w.iter().all(|x| x.contains("--expose-secrets")), "{w:?}");
        // Not allowed: the credentials go too.
        let mut l = mk();
        let mut w = vec![];
        guard(&mut l, &known, false, &[], &mut w);
        assert!(!l[1].1.contains("etc/lifeboat/cifs.cred"));
        // Exposed: moved into the plan layer, 0600, and listed.
        let mut l = mk();
        let mut w = vec![];
        let carried = guard(&mut l, &known, true, &[], &mut w);
        assert_eq!(
            carried,
            vec![
                "etc/lifeboat/backup.key".to_string(),
                "etc/lifeboat/cifs.cred".into(),
                "etc/ssh/ssh_host_rsa_key".into()
            ]
        );
        assert!(!l[0].1.contains("etc/ssh/ssh_host_rsa_key"));
        let e = &l[1].1.entries["etc/ssh/ssh_host_rsa_key"];
        assert_eq!(e.perm, 0o600);
        assert!(l[1].1.contains("etc/ssh"));
    }
}
