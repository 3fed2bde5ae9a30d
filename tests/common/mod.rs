//! Shared helpers for the integration tests: the kernel fixture, running the
//! real `lifeboat` binary, and reading images with the real tools.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The kernel fixture: a directory with boot/vmlinuz-<kver> and
/// lib/modules/<kver> (depmod run). Taken from LIFEBOAT_KERNEL_FIXTURE, else
/// made (or found in its cache) by qemu/fixtures/kernel.sh.
pub struct Fixture {
    pub root: PathBuf,
    pub kver: String,
}

impl Fixture {
    pub fn kernel(&self) -> PathBuf {
        self.root
            .join("boot")
            .join(format!("vmlinuz-{}", self.kver))
    }
    pub fn modules_dir(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.kver)
    }
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let root = match std::env::var_os("LIFEBOAT_KERNEL_FIXTURE") {
            Some(p) => PathBuf::from(p),
            None => {
                let out = Command::new("bash")
                    .arg(repo().join("qemu/fixtures/kernel.sh"))
                    .output()
                    .expect("cannot run qemu/fixtures/kernel.sh");
                assert!(
                    out.status.success(),
                    "kernel fixture unavailable (qemu/fixtures/kernel.sh failed): {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                PathBuf::from(
                    String::from_utf8_lossy(&out.stdout)
                        .trim()
                        .lines()
                        .last()
                        .unwrap()
                        .to_string(),
                )
            }
        };
        let kver = std::fs::read_dir(root.join("lib/modules"))
            .expect("fixture has no lib/modules")
            .next()
            .expect("fixture lib/modules is empty")
            .unwrap()
            .file_name()
            .to_string_lossy()
            .to_string();
        Fixture { root, kver }
    })
}

pub fn lifeboat_bin() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_lifeboat"));
    let init = p.parent().unwrap().join("lifeboat-init");
    assert!(
        init.is_file(),
        "{} is missing: run `cargo build --workspace` before the tests (scripts/test.sh does)",
        init.display()
    );
    p
}

/// A `lifeboat` command with an empty system config dir, so the host's
/// /etc/lifeboat never leaks into a test.
/// The Debian package scripts/package.sh made from the binaries under test.
pub fn deb_package() -> PathBuf {
    let bin = lifeboat_bin();
    let dir = bin.parent().unwrap().parent().unwrap().join("debian");
    let deb = std::fs::read_dir(&dir)
        .ok()
        .and_then(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|x| x == "deb"))
        })
        .unwrap_or_else(|| {
            panic!(
                "no .deb in {}: run scripts/package.sh (scripts/test.sh does)",
                dir.display()
            )
        });
    let age = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).unwrap();
    assert!(
        age(&deb) >= age(&bin),
        "{} is older than {}: run scripts/package.sh",
        deb.display(),
        bin.display()
    );
    deb
}

pub fn lifeboat(confdir: &Path) -> Command {
    let mut c = Command::new(lifeboat_bin());
    c.env("LIFEBOAT_CONFIG_DIR", confdir);
    c.env_remove("SOURCE_DATE_EPOCH");
    c
}

pub fn run_ok(c: &mut Command) -> Output {
    let out = c.output().expect("cannot run command");
    assert!(
        out.status.success(),
        "{:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        c,
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Build an image of the fixture kernel into `out` with extra TOML config.
pub fn build(work: &Path, out: &Path, extra_toml: &str, args: &[&str]) -> Output {
    let f = fixture();
    let confdir = work.join("etc-lifeboat");
    std::fs::create_dir_all(&confdir).unwrap();
    let cfg = work.join("test.toml");
    std::fs::write(&cfg, extra_toml).unwrap();
    let mut c = lifeboat(&confdir);
    c.arg("-c")
        .arg(&cfg)
        .arg("mkrescue")
        .arg("--kernel")
        .arg(f.kernel())
        .arg("--output-dir")
        .arg(out)
        .args(args);
    if !args.contains(&"--kver") {
        c.arg("--kver").arg(&f.kver);
    }
    if !args.contains(&"--modules-dir") {
        c.arg("--modules-dir").arg(f.modules_dir());
    }
    run_ok(&mut c)
}

pub fn manifest(dir: &Path) -> lifeboat_contract::Manifest {
    lifeboat_contract::Manifest::from_json(
        &std::fs::read_to_string(dir.join("manifest.json")).unwrap(),
    )
    .unwrap()
}

pub fn sha256(p: &Path) -> String {
    let out = Command::new("sha256sum").arg(p).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Decompress one layer with the real tool for its compression.
pub fn decompress_tool(c: lifeboat_contract::Compression) -> &'static str {
    use lifeboat_contract::Compression::*;
    match c {
        None => "cat",
        Zstd => "zstd -q -dc",
        Xz => "xz -dc",
        Gzip => "gzip -dc",
        Lz4 => "lz4 -dc",
    }
}

/// The byte range of each layer inside the concatenated initrd.img.
pub fn layer_ranges(dir: &Path) -> Vec<(lifeboat_contract::LayerInfo, u64, u64)> {
    let m = manifest(dir);
    let mut off = 0;
    let mut v = Vec::new();
    for l in m.layers {
        let size = l.size;
        v.push((l, off, size));
        off += size;
    }
    assert_eq!(
        off,
        std::fs::metadata(dir.join("initrd.img")).unwrap().len(),
        "initrd.img is not the concatenation of the layers"
    );
    v
}

/// Run a shell pipeline, returning (status ok, stdout, stderr).
pub fn sh(script: &str) -> (bool, String, String) {
    let out = Command::new("bash").arg("-c").arg(script).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// A shell pipeline printing the decompressed archive of one layer, read
/// from its byte range inside the concatenated initrd.img.
pub fn layer_stream(img: &Path, l: &lifeboat_contract::LayerInfo, off: u64, size: u64) -> String {
    format!(
        "dd if={} iflag=skip_bytes,count_bytes skip={off} count={size} bs=1M status=none | {}",
        img.join("initrd.img").display(),
        decompress_tool(l.compression)
    )
}

/// `lifeboat image unpack IMG DEST` (the whole image); panics on failure.
pub fn unpack(img: &Path, dest: &Path) {
    run_ok(
        lifeboat(Path::new("/nonexistent"))
            .args(["image", "unpack"])
            .arg(img)
            .arg(dest),
    );
}

/// The file with extension `ext` a build wrote into `dir`.
pub fn written(dir: &Path, ext: &str) -> PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == ext))
        .unwrap_or_else(|| panic!("no .{ext} written to {}", dir.display()))
}
