//! The CI tier's one full recovery (`scripts/test.sh`): a real Debian 12
//! source (GPT, BIOS, ext4 root, swap) boots, gets marker files and runs
//! `lifeboat mkbackup`; `lifeboat rehearse` recovers it onto scratch disks
//! with `lifeboat.recover=auto` and boots the result through its own GRUB.
//! Beside it, checks that need only that source's backup (a damaged backup
//! refused by the rehearsal, `backup ls`/`verify`). The recovery matrix,
//! every other layout, method and medium, is `tests/e2e.rs`
//! (`scripts/e2e.sh`). The machinery both share is `tests/matrix/`.

mod common;
mod matrix;

use common::*;
use matrix::*;
use serde_json::Value;
use std::path::PathBuf;

#[test]
fn a_gpt_bios_ext4_swap_same_size_rehearsed() {
    // `lifeboat rehearse` recovers onto scratch disks like the originals
    // (same size and serial) and boots the result through its own GRUB.
    let src = gpt_source();
    let w = src.work.join("rehearse-a");
    let (ok, report) = rehearse(src, &src.backup, &w);
    assert!(ok && report["ok"] == true, "rehearse failed: {report:#}");
    let phases: Vec<&str> = report["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        phases,
        [
            "rescue boot",
            "pre-flight",
            "disks",
            "restore",
            "finalize",
            "system boot"
        ]
    );
    let sum: f64 = report["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let s = p["seconds"].as_f64().unwrap();
            assert!(s > 0.0 && p["ok"] == true, "{p}");
            s
        })
        .sum();
    assert!((report["rto_seconds"].as_f64().unwrap() - sum).abs() < 0.01);
    let console = std::fs::read_to_string(w.join("rescue-console.log")).unwrap();
    assert!(
        console.contains("[same serial]"),
        "mapping by serial expected"
    );
    // The pre_recovery hook ran before the disks were touched.
    let hook = console
        .find("pre_recovery says target=/mnt/local")
        .expect("the pre_recovery hook's output is missing");
    let disks = console.find("recreating disks").unwrap();
    assert!(hook < disks, "the pre_recovery hook ran after the disks");
    // The recovered copy: the same system (the probe unit removed itself).
    check_offline(src, &w.join("disk0.raw"), "a");
    let _ = std::fs::remove_dir_all(&w);
}

#[test]
fn rehearse_fails_on_a_damaged_backup_and_names_the_phase() {
    let src = gpt_source();
    let damaged = src.work.join("damaged-backup.img");
    let mnt = src.work.join("damaged-mnt");
    // A copy of the backup disk with one byte of the biggest volume changed.
    sh_ok(&format!(
        "cp --sparse=always {b} {d} && mkdir -p {m} && mount -o loop {d} {m} && \
         f=$(find {m}/store -type f -name '*.tar*' -printf '%s %p\\n' | sort -n | tail -1 | cut -d' ' -f2) && \
         printf Z | dd of=\"$f\" bs=1 seek=100000 conv=notrunc 2>/dev/null && umount {m}",
        b = src.backup.display(),
        d = damaged.display(),
        m = mnt.display()
    ));
    let w = src.work.join("rehearse-damaged");
    let (ok, report) = rehearse(src, &damaged, &w);
    assert!(!ok, "rehearse passed on a damaged backup: {report:#}");
    assert_eq!(report["ok"], false);
    assert_eq!(report["failed_phase"], "pre-flight", "{report:#}");
    let msg = report["message"].as_str().unwrap_or("");
    assert!(
        msg.contains("sha256") || msg.contains("damaged") || msg.contains("nothing was written"),
        "{report:#}"
    );
    // Nothing was written to the scratch disk.
    let (_, zeros, _) = sh(&format!(
        "cmp -n 1048576 {} /dev/zero && echo all-zero",
        w.join("disk0.raw").display()
    ));
    assert!(zeros.contains("all-zero"), "the scratch disk was written");
    let _ = std::fs::remove_file(&damaged);
    let _ = std::fs::remove_dir_all(&w);
}

/// `lifeboat backup ls|verify --json` on the host, on the GPT source's
/// real backup (copied off its disk with debugfs): intact, then with its
/// biggest volume damaged (exit 1, the archive named).
#[test]
fn backup_ls_and_verify_answer_in_json_and_name_a_damaged_archive() {
    let src = gpt_source();
    let copy = src.work.join("store-copy");
    let _ = std::fs::remove_dir_all(&copy);
    std::fs::create_dir_all(&copy).unwrap();
    sh_ok(&format!(
        "debugfs -R 'rdump /store/lbsrc {}' {} 2>/dev/null",
        copy.display(),
        src.backup.display()
    ));
    let dir = copy.join("lbsrc");
    let conf = src.work.join("etc-host");
    std::fs::create_dir_all(&conf).unwrap();
    let ls = run_ok(lifeboat(&conf).args(["backup", "ls", "--json"]).arg(&dir));
    let m: Value = serde_json::from_slice(&ls.stdout).unwrap();
    assert_eq!(m["hostname"], "lbsrc", "{m}");
    let archives: usize = m["sets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["archives"].as_array().unwrap().len())
        .sum();
    assert!(archives >= 1, "{m}");
    let v = run_ok(
        lifeboat(&conf)
            .args(["backup", "verify", "--json"])
            .arg(&dir),
    );
    let v: Value = serde_json::from_slice(&v.stdout).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["archives"].as_array().unwrap().len(), archives, "{v}");
    // Damage the biggest volume in its middle.
    let mut files: Vec<(u64, PathBuf)> = walk(&dir)
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n != "backup.json"))
        .map(|p| (std::fs::metadata(&p).unwrap().len(), p))
        .collect();
    files.sort();
    let (len, victim) = files.pop().unwrap();
    sh_ok(&format!(
        "printf 'X' | dd of={} bs=1 seek={} conv=notrunc status=none",
        victim.display(),
        len / 2
    ));
    let o = lifeboat(&conf)
        .args(["backup", "verify", "--json"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "a damaged backup passed verify");
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], false, "{v}");
    let bad: Vec<&Value> = v["archives"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["ok"] == false)
        .collect();
    assert_eq!(bad.len(), 1, "{v}");
    assert!(bad[0]["error"].as_str().unwrap().contains("sha256"), "{v}");
    let _ = std::fs::remove_dir_all(&copy);
}
