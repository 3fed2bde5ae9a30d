//! An in-memory description of the files one layer will contain, and the
//! logic that copies host paths into it faithfully: every symlink along the
//! way is kept as a symlink (so merged-/usr, `/lib64/ld-linux...` chains and
//! versioned library links look exactly as on the host), parents come first.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// What one archive entry is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir,
    /// A host file, copied verbatim.
    File {
        src: PathBuf,
    },
    /// A host file that is compressed (`.ko.xz`, `.ko.zst`, `.ko.gz`) and is
    /// stored decompressed.
    Decompress {
        src: PathBuf,
    },
    /// Generated content.
    Bytes(Vec<u8>),
    Symlink(String),
    CharDev(u32, u32),
    BlockDev(u32, u32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub node: Node,
    /// Permission bits (including setuid/setgid/sticky).
    pub perm: u32,
    /// Host identity (dev, ino, nlink) of a regular file, for hardlink groups.
    pub host_id: Option<(u64, u64, u64)>,
}

/// Archive paths are relative (no leading '/'), '/'-separated, normalised.
#[derive(Debug, Default, Clone)]
pub struct Tree {
    pub entries: BTreeMap<String, Entry>,
}

/// Normalise an absolute or relative path lexically into archive form.
pub fn norm(p: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out.join("/")
}

fn parent(p: &str) -> &str {
    match p.rfind('/') {
        Some(i) => &p[..i],
        None => "",
    }
}

impl Tree {
    pub fn new() -> Tree {
        Tree::default()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(&norm(path))
    }

    /// Make sure every parent directory of `path` exists as a directory entry.
    pub fn add_parents(&mut self, path: &str) {
        let p = norm(path);
        let mut cur = parent(&p).to_string();
        let mut missing = Vec::new();
        while !cur.is_empty() {
            if self.entries.contains_key(&cur) {
                break;
            }
            missing.push(cur.clone());
            cur = parent(&cur).to_string();
        }
        for d in missing {
            self.entries.insert(
                d,
                Entry {
                    node: Node::Dir,
                    perm: 0o755,
                    host_id: None,
                },
            );
        }
    }

    /// Insert a directory (and its parents).
    pub fn add_dir(&mut self, path: &str, perm: u32) {
        let p = norm(path);
        self.add_parents(&p);
        self.entries.entry(p).or_insert(Entry {
            node: Node::Dir,
            perm,
            host_id: None,
        });
    }

    /// Insert generated content at `path` (replacing what was there).
    pub fn add_bytes(&mut self, path: &str, data: Vec<u8>, perm: u32) {
        let p = norm(path);
        self.add_parents(&p);
        self.entries.insert(
            p,
            Entry {
                node: Node::Bytes(data),
                perm,
                host_id: None,
            },
        );
    }

    pub fn add_symlink(&mut self, path: &str, target: &str) {
        let p = norm(path);
        self.add_parents(&p);
        self.entries.insert(
            p,
            Entry {
                node: Node::Symlink(target.to_string()),
                perm: 0o777,
                host_id: None,
            },
        );
    }

    pub fn add_node(&mut self, path: &str, node: Node, perm: u32) {
        let p = norm(path);
        self.add_parents(&p);
        self.entries.insert(
            p,
            Entry {
                node,
                perm,
                host_id: None,
            },
        );
    }

    /// Insert a host file under a chosen archive path (no symlink handling).
    pub fn add_file_as(&mut self, path: &str, src: &Path) -> Result<()> {
        let md =
            std::fs::metadata(src).with_context(|| format!("cannot read {}", src.display()))?;
        let p = norm(path);
        self.add_parents(&p);
        self.entries.insert(
            p,
            Entry {
                node: Node::File {
                    src: src.to_path_buf(),
                },
                perm: md.permissions().mode() & 0o7777,
                host_id: Some((md.dev(), md.ino(), md.nlink())),
            },
        );
        Ok(())
    }

    /// Copy the host path `abs` (absolute, relative to `root`) into the tree,
    /// keeping every symlink met on the way, as on the host. Directories are
    /// added as empty directories (use [`Tree::add_host_tree`] for contents).
    /// Returns the archive path of the final, fully resolved object.
    pub fn add_host_path(&mut self, root: &Path, abs: &str) -> Result<String> {
        self.add_host_path_depth(root, abs, 0)
    }

    fn add_host_path_depth(&mut self, root: &Path, abs: &str, depth: u32) -> Result<String> {
        if depth > 40 {
            bail!("too many levels of symbolic links resolving {abs}");
        }
        let p = norm(abs);
        let comps: Vec<&str> = p.split('/').filter(|c| !c.is_empty()).collect();
        let mut cur = String::new();
        for (i, c) in comps.iter().enumerate() {
            let next = if cur.is_empty() {
                c.to_string()
            } else {
                format!("{cur}/{c}")
            };
            let host = root.join(&next);
            let md = std::fs::symlink_metadata(&host)
                .with_context(|| format!("cannot read {}", host.display()))?;
            let ft = md.file_type();
            if ft.is_symlink() {
                let target = std::fs::read_link(&host)
                    .with_context(|| format!("cannot read link {}", host.display()))?;
                let target = target.to_string_lossy().to_string();
                self.add_parents(&next);
                self.entries.insert(
                    next.clone(),
                    Entry {
                        node: Node::Symlink(target.clone()),
                        perm: 0o777,
                        host_id: None,
                    },
                );
                let base = if target.starts_with('/') {
                    target.clone()
                } else {
                    format!("{}/{}", parent(&next), target)
                };
                let rest = comps[i + 1..].join("/");
                let resolved = if rest.is_empty() {
                    base
                } else {
                    format!("{base}/{rest}")
                };
                return self.add_host_path_depth(root, &format!("/{}", norm(&resolved)), depth + 1);
            }
            let last = i + 1 == comps.len();
            if ft.is_dir() {
                self.entries.entry(next.clone()).or_insert(Entry {
                    node: Node::Dir,
                    perm: md.permissions().mode() & 0o7777,
                    host_id: None,
                });
            } else if !last {
                bail!("{} is not a directory", host.display());
            } else if ft.is_file() {
                self.entries.entry(next.clone()).or_insert(Entry {
                    node: Node::File { src: host.clone() },
                    perm: md.permissions().mode() & 0o7777,
                    host_id: Some((md.dev(), md.ino(), md.nlink())),
                });
            } else {
                use std::os::unix::fs::FileTypeExt;
                let rdev = md.rdev();
                let (maj, min) = (libc::major(rdev), libc::minor(rdev));
                let node = if ft.is_char_device() {
                    Node::CharDev(maj, min)
                } else if ft.is_block_device() {
                    Node::BlockDev(maj, min)
                } else {
                    bail!(
                        "{} is a socket or FIFO; it cannot go into an image",
                        host.display()
                    );
                };
                self.entries.entry(next.clone()).or_insert(Entry {
                    node,
                    perm: md.permissions().mode() & 0o7777,
                    host_id: None,
                });
            }
            cur = next;
        }
        Ok(cur)
    }

    /// Copy a host path and, when it is a directory, everything below it
    /// (symlinks inside are kept as they are, not followed).
    pub fn add_host_tree(&mut self, root: &Path, abs: &str) -> Result<()> {
        let top = self.add_host_path(root, abs)?;
        let host_top = root.join(&top);
        if !host_top.is_dir() {
            return Ok(());
        }
        for e in walkdir::WalkDir::new(&host_top)
            .follow_links(false)
            .sort_by_file_name()
        {
            let e = e.with_context(|| format!("cannot walk {}", host_top.display()))?;
            let rel = e.path().strip_prefix(root).unwrap_or(e.path());
            let arch = norm(&rel.to_string_lossy());
            if self.entries.contains_key(&arch) && e.file_type().is_dir() {
                continue;
            }
            let md = e
                .metadata()
                .with_context(|| format!("cannot read {}", e.path().display()))?;
            let perm = md.permissions().mode() & 0o7777;
            let ft = e.file_type();
            if ft.is_symlink() {
                let t = std::fs::read_link(e.path())
                    .with_context(|| format!("cannot read link {}", e.path().display()))?;
                self.add_symlink(&arch, &t.to_string_lossy());
            } else if ft.is_dir() {
                self.add_dir(&arch, perm);
            } else if ft.is_file() {
                self.add_parents(&arch);
                self.entries.insert(
                    arch,
                    Entry {
                        node: Node::File {
                            src: e.path().to_path_buf(),
                        },
                        perm,
                        host_id: Some((md.dev(), md.ino(), md.nlink())),
                    },
                );
            }
        }
        Ok(())
    }

    /// Move entries below top-level directories that are symlinks on the
    /// host (merged-/usr: `lib -> usr/lib`) to where those symlinks point,
    /// and add the symlinks themselves. A layer must never contain a real
    /// directory where the root has a symlink: GNU cpio (and unmkinitramfs)
    /// would replace the symlink by it.
    pub fn rebase_merged_usr(&mut self, root: &Path) {
        let mut links = Vec::new();
        for d in ["bin", "sbin", "lib", "lib32", "lib64", "libx32"] {
            if let Ok(t) = std::fs::read_link(root.join(d)) {
                let t = t.to_string_lossy().to_string();
                let resolved = norm(&t);
                if !t.starts_with('/') && !resolved.is_empty() && !resolved.starts_with(d) {
                    links.push((d.to_string(), t, resolved));
                }
            }
        }
        for (d, target, resolved) in links {
            let prefix = format!("{d}/");
            let moved: Vec<String> = self
                .entries
                .keys()
                .filter(|k| k.starts_with(&prefix) || **k == d)
                .cloned()
                .collect();
            if moved.is_empty() {
                continue;
            }
            for k in moved {
                let e = self.entries.remove(&k).unwrap();
                if k == d {
                    continue;
                }
                let nk = format!("{resolved}/{}", &k[prefix.len()..]);
                self.add_parents(&nk);
                self.entries.entry(nk).or_insert(e);
            }
            self.entries.insert(
                d.clone(),
                Entry {
                    node: Node::Symlink(target),
                    perm: 0o777,
                    host_id: None,
                },
            );
        }
    }

    /// Remove every entry matching one of the glob patterns (matched against
    /// the absolute archive path, e.g. `/usr/share/doc/*`). Returns how many were removed.
    pub fn exclude(&mut self, patterns: &[String]) -> usize {
        if patterns.is_empty() {
            return 0;
        }
        let before = self.entries.len();
        self.entries.retain(|k, _| {
            let abs = format!("/{k}");
            !patterns
                .iter()
                .any(|p| lifeboat_contract::alias_matches(p, &abs))
        });
        before - self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn norm_works() {
        assert_eq!(norm("/usr//bin/../lib/./x"), "usr/lib/x");
        assert_eq!(norm("/"), "");
    }

    #[test]
    fn symlink_chains_are_kept() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("usr/lib/x86_64-linux-gnu")).unwrap();
        std::fs::create_dir_all(r.join("usr/lib64")).unwrap();
        std::fs::write(r.join("usr/lib/x86_64-linux-gnu/ld-2.so"), b"ld").unwrap();
        symlink(
            "../lib/x86_64-linux-gnu/ld-2.so",
            r.join("usr/lib64/ld.so.2"),
        )
        .unwrap();
        symlink("usr/lib64", r.join("lib64")).unwrap();
        let mut t = Tree::new();
        let fin = t.add_host_path(r, "/lib64/ld.so.2").unwrap();
        assert_eq!(fin, "usr/lib/x86_64-linux-gnu/ld-2.so");
        assert_eq!(t.entries["lib64"].node, Node::Symlink("usr/lib64".into()));
        assert_eq!(
            t.entries["usr/lib64/ld.so.2"].node,
            Node::Symlink("../lib/x86_64-linux-gnu/ld-2.so".into())
        );
        assert!(matches!(
            t.entries["usr/lib/x86_64-linux-gnu/ld-2.so"].node,
            Node::File { .. }
        ));
        assert_eq!(t.entries["usr"].node, Node::Dir);
        // parents of every entry exist
        for k in t.entries.keys() {
            if !parent(k).is_empty() {
                assert!(t.entries.contains_key(parent(k)), "{k} lacks parent");
            }
        }
    }

    #[test]
    fn symlink_loop_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        symlink("b", d.path().join("a")).unwrap();
        symlink("a", d.path().join("b")).unwrap();
        let mut t = Tree::new();
        let e = t.add_host_path(d.path(), "/a").unwrap_err();
        assert!(format!("{e:#}").contains("too many levels"));
    }

    #[test]
    fn merged_usr_rebase() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("usr/lib")).unwrap();
        symlink("usr/lib", d.path().join("lib")).unwrap();
        let mut t = Tree::new();
        t.add_bytes("lib/modules/6.1/modules.dep", vec![], 0o644);
        t.add_bytes("etc/x", vec![], 0o644);
        t.rebase_merged_usr(d.path());
        assert_eq!(t.entries["lib"].node, Node::Symlink("usr/lib".into()));
        assert!(t.contains("usr/lib/modules/6.1/modules.dep"));
        assert!(t.contains("usr/lib/modules"));
        assert!(!t.entries.keys().any(|k| k.starts_with("lib/")));
        assert!(t.contains("etc/x"));
    }

    #[test]
    fn exclude_globs() {
        let mut t = Tree::new();
        t.add_bytes("usr/share/doc/x/README", vec![], 0o644);
        t.add_bytes("usr/bin/x", vec![], 0o755);
        let n = t.exclude(&["/usr/share/doc/*".to_string()]);
        assert_eq!(n, 2);
        assert!(t.contains("usr/bin/x"));
    }
}
