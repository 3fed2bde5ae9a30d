//! What every layer unpacked into the rescue system: each layer carries,
//! in its tag file (`etc/lifeboat/layers/<name>`), the sha256 of every
//! regular file it holds. The kernel unpacks a local initrd and frees its
//! bytes before PID 1 runs, so the layers themselves cannot be hashed
//! again at boot; their files can. `lifeboat recover` compares them before
//! it writes anything (a damaged medium or bad RAM shows here, not halfway
//! through a restore), and `lifeboat image verify --root /` does it on
//! demand. Fetched layers were checked against their pins already.

use crate::tree::{Node, Tree};
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const TAG_HEADER: &str = "lifeboat-layer v1";

/// Files the init writes at boot: not compared.
const WRITTEN_AT_BOOT: &[&str] = &[
    "etc/resolv.conf",
    "etc/hosts",
    "etc/shadow",
    "etc/ssh/sshd_config",
];

/// The tag file of layer `name`: a header, then `<sha256> <path>` for each
/// regular file of `t` (paths in archive form, sorted).
pub fn tag(name: &str, t: &Tree) -> Result<Vec<u8>> {
    let mut s = format!("{TAG_HEADER} {name}\n");
    for (p, e) in &t.entries {
        let sha = match &e.node {
            Node::Bytes(b) => hex::encode(Sha256::digest(b)),
            Node::File { src } => crate::image::sha256_file(src)?,
            Node::Decompress { src } => {
                hex::encode(Sha256::digest(crate::compress::read_maybe_compressed(src)?))
            }
            _ => continue,
        };
        s.push_str(&format!("{sha} {p}\n"));
    }
    Ok(s.into_bytes())
}

/// What a check of an unpacked root found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Checked {
    /// Layers whose file lists were read.
    pub layers: Vec<String>,
    /// Files compared.
    pub files: usize,
}

/// Compare the files under `root` with the lists of the layers unpacked
/// there. A path several layers ship may hold any of their versions (the
/// later layer wins, and which one was later is not recorded in the
/// tags). Layers with an empty tag (older images) are skipped.
pub fn check_root(root: &Path) -> Result<Checked> {
    let dir = root.join(crate::layers::LAYER_TAG_DIR);
    let mut want: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut out = Checked::default();
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Ok(out);
    };
    let mut tags: Vec<_> = rd.flatten().collect();
    tags.sort_by_key(|e| e.file_name());
    for e in tags {
        let name = e.file_name().to_string_lossy().to_string();
        let text = std::fs::read_to_string(e.path())
            .with_context(|| format!("cannot read {}", e.path().display()))?;
        let mut lines = text.lines();
        match lines.next() {
            None => continue,
            Some(h) if h == format!("{TAG_HEADER} {name}") => {}
            Some(h) => bail!(
                "{}: {h:?} is not the file list of layer {name}: the rescue system is damaged",
                e.path().display()
            ),
        }
        for l in lines {
            let (sha, p) = l
                .split_once(' ')
                .with_context(|| format!("{}: a damaged line {l:?}", e.path().display()))?;
            want.entry(p.to_string())
                .or_default()
                .insert(sha.to_string());
            owner.entry(p.to_string()).or_insert_with(|| name.clone());
        }
        out.layers.push(name);
    }
    let mut bad = Vec::new();
    for (p, shas) in &want {
        if WRITTEN_AT_BOOT.contains(&p.as_str()) {
            continue;
        }
        let f = root.join(p);
        let got = match std::fs::symlink_metadata(&f) {
            Ok(m) if m.is_file() => crate::image::sha256_file(&f)?,
            // A later layer's symlink or directory in its place: that
            // layer's own list covers what is there now.
            Ok(_) => continue,
            Err(_) => {
                bad.push(format!("/{p} (layer {}) is missing", owner[p]));
                continue;
            }
        };
        out.files += 1;
        if !shas.contains(&got) {
            bad.push(format!(
                "/{p} (layer {}) has sha256 {}…, not what the layer shipped",
                owner[p],
                &got[..16]
            ));
        }
    }
    if !bad.is_empty() {
        let n = bad.len();
        bad.truncate(5);
        bail!(
            "{n} file(s) of the rescue system differ from the layers they came from: {}{}. \
             The boot medium or this machine's memory is damaged; nothing was written. \
             Boot the rescue image again (or another copy of it), or rebuild it with mkrescue",
            bad.join("; "),
            if n > 5 { "; ..." } else { "" }
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unpacked_root_is_compared_with_its_layers_file_lists() {
        let d = tempfile::tempdir().unwrap();
        let host = d.path().join("host-sh");
        std::fs::write(&host, b"#!/bin/sh\necho shell\n").unwrap();
        let mut base = Tree::new();
        base.add_file_as("bin/sh", &host).unwrap();
        base.add_bytes("etc/os-release", b"base\n".to_vec(), 0o644);
        base.add_bytes("etc/resolv.conf", b"\n".to_vec(), 0o644);
        let mut tools = Tree::new();
        // Shipped by both layers: either version is right.
        tools.add_bytes("etc/os-release", b"tools\n".to_vec(), 0o644);
        tools.add_bytes("usr/bin/tool", b"tool v1".to_vec(), 0o755);
        let root = d.path().join("root");
        for (name, t) in [("base", &base), ("tools", &tools)] {
            let tagp = format!("{}{name}", crate::layers::LAYER_TAG_DIR);
            let tag = tag(name, t).unwrap();
            let text = String::from_utf8(tag.clone()).unwrap();
            // The oracle: sha256sum of the same bytes.
            if name == "base" {
                let o = std::process::Command::new("sha256sum")
                    .arg(&host)
                    .output()
                    .unwrap();
                let out = String::from_utf8_lossy(&o.stdout);
                let sum = out.split_whitespace().next().unwrap();
                assert!(text.contains(&format!("{sum} bin/sh\n")), "{text}");
            }
            for (p, e) in &t.entries {
                let f = root.join(p);
                std::fs::create_dir_all(f.parent().unwrap()).unwrap();
                match &e.node {
                    Node::Bytes(b) => std::fs::write(&f, b).unwrap(),
                    Node::File { src } => {
                        std::fs::copy(src, &f).unwrap();
                    }
                    _ => {}
                }
            }
            let tf = root.join(&tagp);
            std::fs::create_dir_all(tf.parent().unwrap()).unwrap();
            std::fs::write(tf, tag).unwrap();
        }
        let c = check_root(&root).unwrap();
        assert_eq!(c.layers, ["base", "tools"]);
        assert_eq!(c.files, 3);
        // The init rewrites resolv.conf: not a difference.
        std::fs::write(root.join("etc/resolv.conf"), "nameserver 10.0.2.3\n").unwrap();
        check_root(&root).unwrap();
        // One changed byte in a program.
        std::fs::write(root.join("usr/bin/tool"), b"tool v2").unwrap();
        let e = check_root(&root).unwrap_err().to_string();
        assert!(
            e.contains("/usr/bin/tool (layer tools) has sha256")
                && e.contains("nothing was written"),
            "{e}"
        );
        std::fs::write(root.join("usr/bin/tool"), b"tool v1").unwrap();
        // A missing file.
        std::fs::remove_file(root.join("bin/sh")).unwrap();
        let e = check_root(&root).unwrap_err().to_string();
        assert!(e.contains("/bin/sh (layer base) is missing"), "{e}");
        // An old image's empty tags: nothing to compare.
        let old = d.path().join("old");
        std::fs::create_dir_all(old.join(crate::layers::LAYER_TAG_DIR)).unwrap();
        std::fs::write(old.join(crate::layers::LAYER_TAG_DIR).join("base"), "").unwrap();
        assert_eq!(check_root(&old).unwrap().files, 0);
    }
}
