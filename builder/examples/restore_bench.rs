//! Restore throughput: lifeboat's restore path (volumes read and hashed,
//! zstd decoder, GNU tar) against a bare `zstd -dc | tar -x` of the same
//! data into the same filesystem. Prints figures; asserts nothing.
//!
//!   restore_bench SOURCE_DIR WORK_DIR TARGET_DIR [RUNS]
//!
//! Run by bench/restore-vs-pipe.sh, which prepares TARGET_DIR on a fresh
//! ext4 filesystem.

use lifeboat::backup::{self, Options};
use lifeboat_contract::{Filesystem, Layout, Mount, LAYOUT_SCHEMA_VERSION};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

fn sh(cmd: &str) {
    let st = Command::new("bash")
        .args(["-c", cmd])
        .status()
        .expect("bash");
    assert!(st.success(), "{cmd} failed");
}

fn fresh(target: &Path) {
    let d = target.join("r");
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    sh("sync; echo 3 > /proc/sys/vm/drop_caches || true");
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 4 {
        eprintln!("usage: restore_bench SOURCE_DIR WORK_DIR TARGET_DIR [RUNS]");
        std::process::exit(2);
    }
    let (src, work, target) = (Path::new(&a[1]), Path::new(&a[2]), Path::new(&a[3]));
    let runs: usize = a.get(4).and_then(|r| r.parse().ok()).unwrap_or(3);
    std::fs::create_dir_all(work).unwrap();
    let layout = Layout {
        schema_version: LAYOUT_SCHEMA_VERSION,
        hostname: "bench".into(),
        disks: vec![],
        filesystems: vec![Filesystem::new("/dev/bench", "ext4")],
        mounts: vec![Mount {
            target: src.to_string_lossy().to_string(),
            source: "/dev/bench".into(),
            fstype: "ext4".into(),
            options: "rw".into(),
            root: None,
        }],
        md: vec![],
        luks: vec![],
        lvm: Default::default(),
        bootloader: Default::default(),
    };
    let bdir = work.join("lifeboat");
    let t = Instant::now();
    let m = backup::create(
        &layout,
        "file:///bench",
        &bdir,
        &Options::default(),
        true,
        &mut |_| {},
    )
    .expect("backup");
    let set = &m.sets[0];
    let arch = &set.archives[0];
    println!(
        "data: {} ({} MB of tar, {} MB zstd -3), lifeboat backup in {:.1} s",
        src.display(),
        arch.tar_bytes / 1_000_000,
        arch.bytes / 1_000_000,
        t.elapsed().as_secs_f64()
    );
    let raw = work.join("raw.tar.zst");
    sh(&format!(
        "tar --create --file=- --one-file-system --sparse --xattrs --acls --numeric-owner -C '{}' . | zstd -q -3 -T0 -o '{}' -f",
        src.display(),
        raw.display()
    ));
    let mb = arch.tar_bytes as f64 / 1e6;
    let mut ours = Vec::new();
    let mut pipe = Vec::new();
    for _ in 0..runs {
        fresh(target);
        let t = Instant::now();
        backup::extract(
            &bdir.as_path().into(),
            set,
            arch,
            &target.join("r"),
            false,
            true,
            None,
        )
        .expect("restore");
        sh("sync");
        ours.push(t.elapsed().as_secs_f64());
        fresh(target);
        let t = Instant::now();
        sh(&format!(
            "zstd -dc '{}' | tar --extract --file=- --preserve-permissions --xattrs --acls --numeric-owner -C '{}'; sync",
            raw.display(),
            target.join("r").display()
        ));
        pipe.push(t.elapsed().as_secs_f64());
    }
    let best = |v: &[f64]| v.iter().cloned().fold(f64::INFINITY, f64::min);
    let (o, p) = (best(&ours), best(&pipe));
    println!(
        "restore into {} (best of {runs}, sync included):",
        target.display()
    );
    println!("  lifeboat restore        {o:7.2} s  {:7.1} MB/s", mb / o);
    println!("  zstd -dc | tar -x       {p:7.2} s  {:7.1} MB/s", mb / p);
    println!(
        "  lifeboat / pipe throughput: {:.0}% (goal >= 90%)",
        100.0 * p / o
    );
}
