//! `lifeboat layout save/show/check` on a real (loop) disk, against sfdisk.

mod common;

use common::*;

/// A loop device over a 64 MiB image with a GPT of two partitions; detached on drop.
struct Loop {
    dev: String,
    _dir: tempfile::TempDir,
}

impl Loop {
    fn new() -> Loop {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        let (ok, _, err) = sh(&format!(
            "truncate -s 64M {0} && printf 'label: gpt\\n,16M,L\\n,16M,S\\n' | sfdisk -q {0}",
            img.display()
        ));
        assert!(ok, "{err}");
        let (ok, out, err) = sh(&format!("losetup -f --show {}", img.display()));
        assert!(ok, "losetup failed: {err}");
        Loop {
            dev: out.trim().to_string(),
            _dir: dir,
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = sh(&format!("losetup -d {}", self.dev));
    }
}

#[test]
fn check_reports_an_added_partition_and_nothing_else() {
    let l = Loop::new();
    let w = tempfile::tempdir().unwrap();
    let file = w.path().join("layout.json");
    let f = file.to_str().unwrap();
    run_ok(lifeboat(w.path()).args(["layout", "save", "-o", f, "--disk", &l.dev]));
    // The saved table is what sfdisk says.
    let saved =
        lifeboat_contract::Layout::from_json(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let (_, sf, _) = sh(&format!("sfdisk --json {}", l.dev));
    let sf: serde_json::Value = serde_json::from_str(&sf).unwrap();
    let t = saved.disks[0].table.as_ref().unwrap();
    assert_eq!(t.id, sf["partitiontable"]["id"].as_str().unwrap());
    assert_eq!(t.partitions.len(), 2);
    for (p, q) in t
        .partitions
        .iter()
        .zip(sf["partitiontable"]["partitions"].as_array().unwrap())
    {
        assert_eq!(Some(p.start), q["start"].as_u64());
        assert_eq!(Some(p.size), q["size"].as_u64());
        assert_eq!(p.uuid.as_deref(), q["uuid"].as_str());
    }

    let o = lifeboat(w.path())
        .args(["layout", "check", f, "--disk", &l.dev])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );

    let (ok, _, err) = sh(&format!("echo ',8M,L' | sfdisk -q --append {}", l.dev));
    assert!(ok, "{err}");
    let o = lifeboat(w.path())
        .args(["layout", "check", f, "--disk", &l.dev])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("partitions[3]: added"), "{out}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("  ")).count(),
        1,
        "only the new partition differs: {out}"
    );

    let o = lifeboat(w.path())
        .args(["layout", "check", "--json", f, "--disk", &l.dev])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["changed"], true);

    let o = lifeboat(w.path())
        .args(["layout", "show", f])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains(&l.dev) && text.contains("gpt table"),
        "{text}"
    );
}

#[test]
fn check_without_a_saved_layout_says_what_to_do() {
    let w = tempfile::tempdir().unwrap();
    let o = lifeboat(w.path())
        .args(["layout", "check", "/nonexistent/layout.json"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("run `lifeboat layout save` first"));
}
