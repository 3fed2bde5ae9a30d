//! ELF dependency closure, resolved the way glibc's dynamic loader does:
//! PT_INTERP, DT_NEEDED breadth-first, DT_RPATH (only when there is no
//! DT_RUNPATH, inherited from the loading objects), DT_RUNPATH, ld.so.cache,
//! then the default directories. `$ORIGIN`, `$LIB` and `$PLATFORM` are expanded.
//! Candidates whose ELF class or machine differ from the program's are skipped.

use anyhow::{bail, Context, Result};
use goblin::elf::Elf;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};

/// Distinguishes a program that is not found from other failures.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("library {soname} needed by {by} was not found in RUNPATH/RPATH, ld.so.cache or the default directories")]
    LibraryNotFound { soname: String, by: String },
}

/// ELF identity that dependencies must share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ident {
    pub is_64: bool,
    pub machine: u16,
}

/// What we learn from one object.
#[derive(Debug, Clone, Default)]
pub struct ElfInfo {
    pub interp: Option<String>,
    pub needed: Vec<String>,
    pub rpath: Vec<String>,
    pub runpath: Vec<String>,
}

/// The kind of a host file, by content.
pub enum FileKind {
    Elf(Ident, ElfInfo),
    /// `#!` script: interpreter and optional first argument.
    Script(String, Option<String>),
    Other,
}

pub fn inspect(path: &Path) -> Result<FileKind> {
    let data = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    inspect_bytes(&data, path)
}

pub fn inspect_bytes(data: &[u8], path: &Path) -> Result<FileKind> {
    if data.starts_with(b"#!") {
        let line_end = data
            .iter()
            .position(|&b| b == b'\n')
            .unwrap_or(data.len())
            .min(256);
        let line = String::from_utf8_lossy(&data[2..line_end])
            .trim()
            .to_string();
        let mut it = line.splitn(2, [' ', '\t']);
        let interp = it.next().unwrap_or("").to_string();
        let arg = it
            .next()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty());
        if interp.is_empty() {
            return Ok(FileKind::Other);
        }
        return Ok(FileKind::Script(interp, arg));
    }
    if !data.starts_with(b"\x7fELF") {
        return Ok(FileKind::Other);
    }
    let elf =
        Elf::parse(data).with_context(|| format!("{} is not a valid ELF file", path.display()))?;
    let ident = Ident {
        is_64: elf.is_64,
        machine: elf.header.e_machine,
    };
    let split = |v: &[&str]| -> Vec<String> {
        v.iter()
            .flat_map(|s| s.split(':'))
            .filter(|s| !s.is_empty())
            .map(|s| s.to_string())
            .collect()
    };
    let info = ElfInfo {
        interp: elf.interpreter.map(|s| s.to_string()),
        needed: elf.libraries.iter().map(|s| s.to_string()).collect(),
        rpath: split(&elf.rpaths),
        runpath: split(&elf.runpaths),
    };
    Ok(FileKind::Elf(ident, info))
}

/// Entries of /etc/ld.so.cache (new format, "glibc-ld.so.cache1.1").
pub fn parse_ld_so_cache(data: &[u8]) -> Result<Vec<(String, u32, String)>> {
    const NEW_MAGIC: &[u8] = b"glibc-ld.so.cache1.1";
    const OLD_MAGIC: &[u8] = b"ld.so-1.7.0";
    let start = if data.starts_with(NEW_MAGIC) {
        0
    } else if data.starts_with(OLD_MAGIC) {
        // Old format header: magic(11)+pad, nlibs u32, then nlibs * 12-byte entries;
        // the new format follows, 8-aligned.
        if data.len() < 16 {
            bail!("truncated ld.so.cache");
        }
        let n = u32::from_le_bytes(data[12..16].try_into().unwrap()) as usize;
        let off = (16 + n * 12 + 7) & !7;
        if !data.get(off..).is_some_and(|d| d.starts_with(NEW_MAGIC)) {
            bail!("ld.so.cache in the old format only is not supported");
        }
        off
    } else {
        bail!("not an ld.so.cache file");
    };
    let d = &data[start..];
    let u32at = |o: usize| -> Result<u32> {
        Ok(u32::from_le_bytes(
            d.get(o..o + 4)
                .context("truncated ld.so.cache")?
                .try_into()
                .unwrap(),
        ))
    };
    let nlibs = u32at(20)? as usize;
    let header = 48usize;
    let mut out = Vec::with_capacity(nlibs);
    let cstr = |o: usize| -> Result<String> {
        // String offsets in the new format are relative to the start of the new header.
        let s = d
            .get(o..)
            .context("ld.so.cache string offset out of range")?;
        let end = s
            .iter()
            .position(|&b| b == 0)
            .context("unterminated string in ld.so.cache")?;
        Ok(String::from_utf8_lossy(&s[..end]).to_string())
    };
    for i in 0..nlibs {
        let e = header + i * 24;
        let flags = u32at(e)?;
        let key = u32at(e + 4)? as usize;
        let value = u32at(e + 8)? as usize;
        out.push((cstr(key)?, flags, cstr(value)?));
    }
    Ok(out)
}

/// Directories listed by an ld.so.conf file, following `include` globs.
pub fn parse_ld_so_conf(root: &Path, file: &Path, out: &mut Vec<String>, depth: u32) {
    if depth > 8 {
        return;
    }
    let Ok(text) = std::fs::read_to_string(root.join(file.strip_prefix("/").unwrap_or(file)))
    else {
        return;
    };
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if let Some(pat) = line.strip_prefix("include").map(str::trim) {
            let pat = if pat.starts_with('/') {
                pat.to_string()
            } else {
                format!(
                    "{}/{}",
                    file.parent().unwrap_or(Path::new("/")).display(),
                    pat
                )
            };
            // Only the common "dir/*.conf" form of globbing is needed.
            let (dir, glob) = match pat.rfind('/') {
                Some(i) => (&pat[..i], &pat[i + 1..]),
                None => ("/", pat.as_str()),
            };
            let hostdir = root.join(dir.trim_start_matches('/'));
            let mut names: Vec<String> = std::fs::read_dir(&hostdir)
                .map(|rd| {
                    rd.filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().to_string())
                        .collect()
                })
                .unwrap_or_default();
            names.sort();
            for n in names {
                if lifeboat_contract::alias_matches(glob, &n) {
                    parse_ld_so_conf(root, &PathBuf::from(format!("{dir}/{n}")), out, depth + 1);
                }
            }
        } else if !line.starts_with("hwcap") {
            for d in line.split([':', ',', ' ', '\t']).filter(|s| !s.is_empty()) {
                out.push(d.trim_end_matches('/').to_string());
            }
        }
    }
}

/// Resolves libraries on a host root (normally `/`).
pub struct Resolver {
    pub root: PathBuf,
    conf_dirs: Vec<String>,
    cache: HashMap<String, Vec<String>>,
    default_dirs: Vec<String>,
    ident_cache: HashMap<PathBuf, Option<Ident>>,
}

/// ld.so.cache flag bits (glibc's ldconfig.h).
const FLAG_TYPE_MASK: u32 = 0x00ff;
const FLAG_ELF_LIBC6: u32 = 0x0003;
const FLAG_REQUIRED_MASK: u32 = 0xff00;
const FLAG_X8664_LIB64: u32 = 0x0300;

impl Resolver {
    pub fn new(root: &Path) -> Resolver {
        let mut conf_dirs = Vec::new();
        parse_ld_so_conf(root, Path::new("/etc/ld.so.conf"), &mut conf_dirs, 0);
        let mut cache: HashMap<String, Vec<String>> = HashMap::new();
        if let Ok(data) = std::fs::read(root.join("etc/ld.so.cache")) {
            if let Ok(entries) = parse_ld_so_cache(&data) {
                for (soname, flags, path) in entries {
                    // Keep entries for this architecture (x86-64 libc6) or untagged ones.
                    let arch_ok = flags & FLAG_TYPE_MASK == FLAG_ELF_LIBC6
                        && matches!(flags & FLAG_REQUIRED_MASK, FLAG_X8664_LIB64 | 0);
                    if arch_ok || cfg!(not(target_arch = "x86_64")) {
                        cache.entry(soname).or_default().push(path);
                    }
                }
            }
        }
        let default_dirs = [
            "/lib/x86_64-linux-gnu",
            "/usr/lib/x86_64-linux-gnu",
            "/lib64",
            "/usr/lib64",
            "/lib",
            "/usr/lib",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        Resolver {
            root: root.to_path_buf(),
            conf_dirs,
            cache,
            default_dirs,
            ident_cache: HashMap::new(),
        }
    }

    fn host(&self, abs: &str) -> PathBuf {
        self.root.join(abs.trim_start_matches('/'))
    }

    fn ident_of(&mut self, abs: &str) -> Option<Ident> {
        let p = self.host(abs);
        if let Some(v) = self.ident_cache.get(&p) {
            return *v;
        }
        let v = read_ident(&p);
        self.ident_cache.insert(p, v);
        v
    }

    fn expand(&self, dir: &str, origin: &str) -> String {
        dir.replace("${ORIGIN}", origin)
            .replace("$ORIGIN", origin)
            .replace("${LIB}", "lib/x86_64-linux-gnu")
            .replace("$LIB", "lib/x86_64-linux-gnu")
            .replace("${PLATFORM}", "x86_64")
            .replace("$PLATFORM", "x86_64")
    }

    /// Find `soname` for an object at `by` (absolute path) with the given
    /// search state. Returns the absolute path as the loader would open it.
    fn find(
        &mut self,
        soname: &str,
        by: &str,
        rpaths: &[String],
        runpath: &[String],
        want: Ident,
    ) -> Option<String> {
        if soname.contains('/') {
            return Some(soname.to_string());
        }
        let origin = Path::new(by)
            .parent()
            .map(|p| p.to_string_lossy().to_string())
            .unwrap_or_default();
        let mut dirs: Vec<String> = Vec::new();
        if runpath.is_empty() {
            dirs.extend(rpaths.iter().map(|d| self.expand(d, &origin)));
        }
        dirs.extend(runpath.iter().map(|d| self.expand(d, &origin)));
        for d in dirs {
            let cand = format!("{}/{}", d.trim_end_matches('/'), soname);
            if self.ident_of(&cand) == Some(want) {
                return Some(cand);
            }
        }
        if let Some(paths) = self.cache.get(soname).cloned() {
            for cand in paths {
                if self.ident_of(&cand) == Some(want) {
                    return Some(cand);
                }
            }
        }
        let more: Vec<String> = self
            .conf_dirs
            .iter()
            .chain(self.default_dirs.iter())
            .cloned()
            .collect();
        for d in more {
            let cand = format!("{d}/{soname}");
            if self.ident_of(&cand) == Some(want) {
                return Some(cand);
            }
        }
        None
    }

    /// Closure of the given absolute host paths: the paths themselves plus
    /// every interpreter and library they need, as absolute paths the
    /// loader would open (symlinks not resolved; the tree keeps them).
    /// `optional_libs` are sonames loaded with dlopen; missing ones are skipped.
    pub fn closure(&mut self, roots: &[String], dlopen: &[String]) -> Result<BTreeSet<String>> {
        let mut out = BTreeSet::new();
        let mut queue: VecDeque<(String, Vec<String>)> = VecDeque::new();
        let mut seen = HashSet::new();
        for r in roots {
            queue.push_back((r.clone(), Vec::new()));
        }
        let mut first_ident: Option<Ident> = None;
        let mut dlopen_done = false;
        loop {
            let Some((path, inherited_rpath)) = queue.pop_front() else {
                if dlopen_done || first_ident.is_none() {
                    break;
                }
                dlopen_done = true;
                let want = first_ident.unwrap();
                for so in dlopen {
                    if let Some(p) = self.find(so, "/", &[], &[], want) {
                        queue.push_back((p, Vec::new()));
                    }
                }
                continue;
            };
            if !seen.insert(path.clone()) {
                continue;
            }
            let host = self.host(&path);
            let kind = inspect(&host)?;
            out.insert(path.clone());
            match kind {
                FileKind::Script(interp, arg) => {
                    queue.push_back((interp.clone(), Vec::new()));
                    if interp.ends_with("/env") {
                        if let Some(a) = arg {
                            let prog = a
                                .split_whitespace()
                                .find(|w| !w.starts_with('-'))
                                .unwrap_or("")
                                .to_string();
                            if !prog.is_empty() {
                                if let Some(p) = find_in_path(&self.root, &prog) {
                                    queue.push_back((p, Vec::new()));
                                }
                            }
                        }
                    }
                }
                FileKind::Other => {}
                FileKind::Elf(ident, info) => {
                    let want = *first_ident.get_or_insert(ident);
                    if ident != want {
                        bail!(
                            "{} is a {}-bit ELF for machine {}, but the image is {}-bit for machine {}",
                            path,
                            if ident.is_64 { 64 } else { 32 },
                            ident.machine,
                            if want.is_64 { 64 } else { 32 },
                            want.machine
                        );
                    }
                    if let Some(i) = &info.interp {
                        queue.push_back((i.clone(), Vec::new()));
                    }
                    let mut rpaths = info.rpath.clone();
                    rpaths.extend(inherited_rpath.iter().cloned());
                    for so in &info.needed {
                        match self.find(so, &path, &rpaths, &info.runpath, want) {
                            Some(p) => queue.push_back((
                                p,
                                if info.runpath.is_empty() {
                                    rpaths.clone()
                                } else {
                                    Vec::new()
                                },
                            )),
                            None => {
                                return Err(ElfError::LibraryNotFound {
                                    soname: so.clone(),
                                    by: path.clone(),
                                }
                                .into())
                            }
                        }
                    }
                }
            }
        }
        Ok(out)
    }
}

fn read_ident(p: &Path) -> Option<Ident> {
    use std::io::Read;
    let mut f = std::fs::File::open(p).ok()?;
    let mut h = [0u8; 20];
    f.read_exact(&mut h).ok()?;
    if &h[..4] != b"\x7fELF" {
        return None;
    }
    let is_64 = h[4] == 2;
    let machine = if h[5] == 1 {
        u16::from_le_bytes([h[18], h[19]])
    } else {
        u16::from_be_bytes([h[18], h[19]])
    };
    Some(Ident { is_64, machine })
}

/// The PATH used to look programs up by name.
pub const SEARCH_PATH: &[&str] = &[
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
    "/usr/lib/openssh",
];

/// Look a program up by name (or accept an absolute path) on `root`.
pub fn find_in_path(root: &Path, name: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    if name.starts_with('/') {
        let p = root.join(name.trim_start_matches('/'));
        return p.exists().then(|| name.to_string());
    }
    for d in SEARCH_PATH {
        let abs = format!("{d}/{name}");
        let p = root.join(abs.trim_start_matches('/'));
        if let Ok(md) = std::fs::metadata(&p) {
            if md.is_file() && md.permissions().mode() & 0o111 != 0 {
                return Some(abs);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shebang_parsing() {
        match inspect_bytes(b"#!/usr/bin/env python3\nprint()", Path::new("x")).unwrap() {
            FileKind::Script(i, a) => {
                assert_eq!(i, "/usr/bin/env");
                assert_eq!(a.as_deref(), Some("python3"));
            }
            _ => panic!("not a script"),
        }
        assert!(matches!(
            inspect_bytes(b"plain", Path::new("x")).unwrap(),
            FileKind::Other
        ));
    }

    #[test]
    fn ld_so_conf_includes() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("etc/ld.so.conf.d")).unwrap();
        std::fs::write(
            r.join("etc/ld.so.conf"),
            "include /etc/ld.so.conf.d/*.conf\n/opt/lib # comment\n",
        )
        .unwrap();
        std::fs::write(r.join("etc/ld.so.conf.d/b.conf"), "/b/lib\n").unwrap();
        std::fs::write(r.join("etc/ld.so.conf.d/a.conf"), "/a/lib\n").unwrap();
        std::fs::write(r.join("etc/ld.so.conf.d/ignored.txt"), "/no\n").unwrap();
        let mut out = Vec::new();
        parse_ld_so_conf(r, Path::new("/etc/ld.so.conf"), &mut out, 0);
        assert_eq!(out, vec!["/a/lib", "/b/lib", "/opt/lib"]);
    }

    #[test]
    fn host_ld_so_cache_parses() {
        // The machine's own cache is the oracle: every entry must name an existing path
        // and libc.so.6 must be present.
        let Ok(data) = std::fs::read("/etc/ld.so.cache") else {
            return;
        };
        let e = parse_ld_so_cache(&data).unwrap();
        assert!(
            e.iter().any(|(k, _, _)| k == "libc.so.6"),
            "libc.so.6 missing from parsed cache"
        );
        for (_, _, p) in &e {
            assert!(p.starts_with('/'), "{p}");
        }
    }

    #[test]
    fn origin_runpath_and_rpath_are_followed_like_ldd() {
        // Build a real program whose library is found only through
        // RUNPATH=$ORIGIN/../lib, and one through an RPATH; ldd is the oracle.
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("app/bin")).unwrap();
        std::fs::create_dir_all(r.join("app/lib")).unwrap();
        std::fs::create_dir_all(r.join("other")).unwrap();
        std::fs::write(r.join("foo.c"), "int foo(void) { return 42; }\n").unwrap();
        std::fs::write(
            r.join("main.c"),
            "int foo(void); int main(void) { return foo() - 42; }\n",
        )
        .unwrap();
        let sh = |cmd: &str| {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(cmd)
                .current_dir(r)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{cmd}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).to_string()
        };
        sh("gcc -shared -fPIC -o app/lib/libfoo.so foo.c");
        sh("cp app/lib/libfoo.so other/libfoo.so");
        sh("gcc -o app/bin/prog main.c -Lapp/lib -lfoo -Wl,--enable-new-dtags,-rpath,'$ORIGIN/../lib'");
        sh("gcc -o app/bin/prog2 main.c -Lother -lfoo -Wl,--disable-new-dtags,-rpath,$PWD/other");
        sh("./app/bin/prog && ./app/bin/prog2");
        let mut res = Resolver::new(Path::new("/"));
        for (prog, want) in [
            ("app/bin/prog", "app/lib/libfoo.so"),
            ("app/bin/prog2", "other/libfoo.so"),
        ] {
            let abs = r.join(prog).to_string_lossy().to_string();
            let got = res.closure(std::slice::from_ref(&abs), &[]).unwrap();
            let want_abs = r.join(want);
            let ldd = sh(&format!("ldd {abs}"));
            let ldd_foo = ldd
                .lines()
                .find_map(|l| l.trim().strip_prefix("libfoo.so => "))
                .and_then(|r| r.split_whitespace().next())
                .unwrap_or_else(|| panic!("ldd found no libfoo.so: {ldd}"));
            let want_real = std::fs::canonicalize(&want_abs).unwrap();
            assert_eq!(
                std::fs::canonicalize(ldd_foo).unwrap(),
                want_real,
                "ldd disagrees with the fixture"
            );
            let got_real: BTreeSet<PathBuf> = got
                .iter()
                .map(|p| std::fs::canonicalize(p).unwrap())
                .collect();
            assert!(
                got_real.contains(&want_real),
                "{prog}: {got:?} lacks {want}"
            );
        }
    }

    #[test]
    fn closure_of_host_ls_matches_ldd() {
        // ldd is the oracle for the closure of a real binary.
        let Some(ls) = find_in_path(Path::new("/"), "ls") else {
            return;
        };
        let out = std::process::Command::new("ldd").arg(&ls).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let mut r = Resolver::new(Path::new("/"));
        let got = r.closure(std::slice::from_ref(&ls), &[]).unwrap();
        let got_real: BTreeSet<PathBuf> = got
            .iter()
            .map(|p| std::fs::canonicalize(p).unwrap())
            .collect();
        for line in text.lines() {
            let path = if let Some((_, rhs)) = line.split_once("=>") {
                rhs.split_whitespace().next().unwrap_or("")
            } else {
                line.split_whitespace().next().unwrap_or("")
            };
            if path.starts_with('/') {
                let real = std::fs::canonicalize(path).unwrap();
                assert!(
                    got_real.contains(&real),
                    "ldd lists {path} but our closure lacks it: {got:?}"
                );
            }
        }
    }
}
