//! Bad input: each error names the thing, exits non-zero and leaves no
//! output (and an existing image untouched).

mod common;

use common::*;
use std::path::Path;

/// Run mkrescue expecting failure; return stderr.
fn fails(work: &Path, out: &Path, toml: &str, args: &[&str]) -> String {
    let f = fixture();
    let confdir = work.join("etc-lifeboat");
    std::fs::create_dir_all(&confdir).unwrap();
    let cfg = work.join("test.toml");
    std::fs::write(&cfg, toml).unwrap();
    let mut c = lifeboat(&confdir);
    c.arg("-c")
        .arg(&cfg)
        .arg("mkrescue")
        .arg("--output-dir")
        .arg(out)
        .arg("--no-cache");
    if !args.contains(&"--kernel") {
        c.arg("--kernel").arg(f.kernel());
    }
    if !args.contains(&"--modules-dir") {
        c.arg("--modules-dir").arg(f.modules_dir());
    }
    c.args(["--kver", &f.kver]).args(args);
    let o = c.output().unwrap();
    assert!(
        !o.status.success(),
        "mkrescue unexpectedly succeeded: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert_eq!(o.status.code(), Some(1));
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn no_leftovers(work: &Path) {
    let left: Vec<String> = std::fs::read_dir(work)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(left.is_empty(), "temporary output left behind: {left:?}");
}

/// A refused build: the message contains each of `want`, and nothing is left behind.
fn refused(toml: &str, args: &[&str], want: &[&str]) {
    let w = tempfile::tempdir().unwrap();
    let out = w.path().join("img");
    let err = fails(w.path(), &out, toml, args);
    for x in want {
        assert!(err.contains(x), "error lacks {x:?}: {err}");
    }
    assert!(!out.exists(), "output was created");
    no_leftovers(w.path());
}

#[test]
fn missing_kernel_is_named() {
    refused(
        "",
        &["--kernel", "/nonexistent/vmlinuz-9.9"],
        &["kernel not found: /nonexistent/vmlinuz-9.9"],
    );
}

#[test]
fn missing_modules_dir_is_named() {
    refused(
        "",
        &["--modules-dir", "/nonexistent/modules"],
        &["modules directory not found: /nonexistent/modules"],
    );
}

#[test]
fn missing_required_program_is_named() {
    refused(
        "[rescue]\nprograms = [\"no-such-tool-xyz\"]\n",
        &[],
        &["required program(s) not found", "no-such-tool-xyz"],
    );
}

#[test]
fn missing_optional_program_is_only_a_warning() {
    let w = tempfile::tempdir().unwrap();
    let out = w.path().join("img");
    let o = build(
        w.path(),
        &out,
        "[rescue]\noptional_programs = [\"no-such-tool-abc\"]\nmodules = \"none\"\n",
        &["--no-cache"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("warning") && err.contains("no-such-tool-abc"),
        "{err}"
    );
    assert!(out.join("manifest.json").is_file());
}

#[test]
fn unknown_config_key_names_file_key_and_line() {
    refused(
        "[rescue]\ncompression = \"zstd\"\nkernal = \"/boot/x\"\n",
        &[],
        &["test.toml", "line 3", "rescue.kernal"],
    );
}

#[test]
fn wrong_type_in_a_conf_d_file_is_named() {
    let w = tempfile::tempdir().unwrap();
    let confdir = w.path().join("etc-lifeboat");
    std::fs::create_dir_all(confdir.join("conf.d")).unwrap();
    std::fs::write(
        confdir.join("conf.d/10-site.toml"),
        "[rescue]\nthreads = \"many\"\n",
    )
    .unwrap();
    let o = lifeboat(&confdir).arg("dump").output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("10-site.toml") && err.contains("line 2") && err.contains("rescue.threads"),
        "{err}"
    );
}

#[test]
fn a_failed_build_leaves_the_previous_image_intact() {
    let w = tempfile::tempdir().unwrap();
    let out = w.path().join("img");
    build(
        w.path(),
        &out,
        "[rescue]\nmodules = \"none\"\n",
        &["--no-cache"],
    );
    let before = sha256(&out.join("manifest.json"));
    let _ = fails(
        w.path(),
        &out,
        "[rescue]\nprograms = [\"no-such-tool-xyz\"]\n",
        &[],
    );
    assert_eq!(sha256(&out.join("manifest.json")), before);
    run_ok(lifeboat(w.path()).args(["image", "verify"]).arg(&out));
    no_leftovers(w.path());
}

#[test]
fn dump_shows_values_and_their_origin() {
    let w = tempfile::tempdir().unwrap();
    let confdir = w.path().join("etc");
    std::fs::create_dir_all(confdir.join("conf.d")).unwrap();
    std::fs::write(
        confdir.join("lifeboat.toml"),
        "OUTPUT = \"initrd\"\n[rescue]\ncompression = \"xz\"\n",
    )
    .unwrap();
    std::fs::write(
        confdir.join("site.toml"),
        "[rescue]\ncompression = \"gzip\"\n",
    )
    .unwrap();
    std::fs::write(confdir.join("conf.d/50-a.toml"), "[rescue]\nthreads = 1\n").unwrap();
    let extra = w.path().join("cli.toml");
    std::fs::write(&extra, "[rescue]\nthreads = 2\n").unwrap();
    let o = run_ok(lifeboat(&confdir).arg("-c").arg(&extra).arg("dump"));
    let text = String::from_utf8_lossy(&o.stdout);
    let line = |k: &str| {
        text.lines()
            .find(|l| l.starts_with(k))
            .unwrap_or_else(|| panic!("{k} missing:\n{text}"))
            .to_string()
    };
    assert!(
        line("compression = \"gzip\"").ends_with("site.toml"),
        "{text}"
    );
    assert!(line("threads = 2").ends_with("cli.toml"), "{text}");
    assert!(
        line("output = \"initrd\"").ends_with("lifeboat.toml"),
        "{text}"
    );
    assert!(
        line("modules = \"generic\"").ends_with("# default"),
        "{text}"
    );
    let o = run_ok(lifeboat(&confdir).arg("dump").arg("--json"));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["config"]["rescue"]["threads"], 1);
    assert!(v["origin"]["rescue.threads"]
        .as_str()
        .unwrap()
        .ends_with("50-a.toml"));
}

#[test]
fn unsupported_output_and_url_are_refused_clearly() {
    let w = tempfile::tempdir().unwrap();
    let out = w.path().join("img");
    let err = fails(w.path(), &out, "OUTPUT = \"FLOPPY\"\n", &[]);
    assert!(
        err.contains("OUTPUT = \"FLOPPY\" is not supported")
            && err.contains("supported: initrd, ISO, USB, RAWDISK, PXE, UKI"),
        "{err}"
    );
    let confdir = w.path().join("c");
    std::fs::create_dir_all(&confdir).unwrap();
    let cfg = w.path().join("u.toml");
    std::fs::write(&cfg, "OUTPUT_URL = \"ftp://server/export\"\n").unwrap();
    let o = lifeboat(&confdir)
        .arg("-c")
        .arg(&cfg)
        .arg("mkrescue")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("OUTPUT_URL = \"ftp://server/export\"") && err.contains("nfs://"),
        "{err}"
    );
}

/// Fault matrix: a kernel image of another release than --kver, and
/// modules built for another kernel, are refused before anything is built.
#[test]
fn kernel_and_modules_of_another_release_are_refused() {
    let f = fixture();
    let w = tempfile::tempdir().unwrap();
    let out = w.path().join("img");
    let run = |kver: &str, mdir: &Path| {
        let o = lifeboat(w.path())
            .arg("mkrescue")
            .arg("--kernel")
            .arg(f.kernel())
            .args(["--kver", kver])
            .arg("--modules-dir")
            .arg(mdir)
            .arg("--output-dir")
            .arg(&out)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1));
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let e = run("6.1.0-99-amd64", &f.modules_dir());
    assert!(
        e.contains(&format!("is release {}", f.kver))
            && e.contains("built for 6.1.0-99-amd64")
            && e.contains(&format!("--kver {}", f.kver)),
        "{e}"
    );
    // Modules of another release (a modules.dep and one module whose
    // vermagic names 5.10.0-1-amd64).
    let m = w.path().join("modules-5.10");
    std::fs::create_dir_all(m.join("kernel/fs")).unwrap();
    std::fs::write(m.join("modules.dep"), "kernel/fs/x.ko:\n").unwrap();
    std::fs::write(
        m.join("kernel/fs/x.ko"),
        b"\x7fELF\0license=GPL\0vermagic=5.10.0-1-amd64 SMP mod_unload modversions \0",
    )
    .unwrap();
    let e = run(&f.kver, &m);
    assert!(
        e.contains("are built for kernel 5.10.0-1-amd64") && e.contains("x.ko"),
        "{e}"
    );
    assert!(!out.exists(), "an image was written");
}

/// `mkrescue --dry-run`: the same checks as a build (a wrong --kver is
/// refused), a summary, and nothing written or replaced.
#[test]
fn mkrescue_dry_run_checks_everything_and_writes_nothing() {
    let f = fixture();
    let w = tempfile::tempdir().unwrap();
    let out = w.path().join("img");
    build(
        w.path(),
        &out,
        "[rescue]\nmodules = \"none\"\n",
        &["--no-cache"],
    );
    let before = sha256(&out.join("manifest.json"));
    let o = build(w.path(), &out, "OUTPUT = \"ISO\"\n", &["--dry-run"]);
    let s = String::from_utf8_lossy(&o.stdout);
    let kernel_line = format!("for kernel {}", f.kver);
    for want in [
        kernel_line.as_str(),
        "ISO output:",
        "replaces the image now in",
        "nothing was written",
    ] {
        assert!(s.contains(want), "{want:?} missing: {s}");
    }
    assert_eq!(sha256(&out.join("manifest.json")), before);
    assert!(
        !std::fs::read_dir(&out)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".iso")),
        "the dry run wrote an ISO"
    );
    let fresh = w.path().join("never");
    let o = lifeboat(w.path())
        .args([
            "mkrescue",
            "--dry-run",
            "--kver",
            "6.1.0-98-amd64",
            "--kernel",
        ])
        .arg(f.kernel())
        .arg("--modules-dir")
        .arg(f.modules_dir())
        .arg("--output-dir")
        .arg(&fresh)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("built for 6.1.0-98-amd64"), "{e}");
    assert!(!fresh.exists());
}

/// Fault matrix: a plan (layout) written by a newer Lifeboat, with fields
/// this one does not know, is refused as newer, naming the file.
#[test]
fn a_plan_from_a_newer_schema_is_refused_as_newer() {
    let w = tempfile::tempdir().unwrap();
    let layout = w.path().join("layout.json");
    std::fs::write(
        &layout,
        r#"{"schema_version":99,"hostname":"h","disks":[],"raid_v2":{"arrays":[]}}"#,
    )
    .unwrap();
    let backup = w.path().join("backup.json");
    std::fs::write(&backup, "{}").unwrap();
    let o = lifeboat(w.path())
        .args(["recover", "--dry-run", "--layout"])
        .arg(&layout)
        .arg("--backup")
        .arg(&backup)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains(&layout.display().to_string())
            && e.contains("layout has schema_version 99")
            && e.contains("understands only up to"),
        "{e}"
    );
}

/// Fault matrix: the output filesystem fills up during mkrescue. The
/// error says so; the previous image (directory and ISO) is intact and
/// verifies, and no temporary files are left.
#[test]
fn a_full_output_filesystem_leaves_the_previous_image_and_iso_intact() {
    let w = tempfile::tempdir().unwrap();
    let fs = w.path().join("fs");
    std::fs::create_dir_all(&fs).unwrap();
    let (ok, _, err) = sh(&format!(
        "mount -t tmpfs -o size=160m lbfull {}",
        fs.display()
    ));
    assert!(ok, "cannot mount a tmpfs: {err}");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(fs.clone());
    let out = fs.join("img");
    let toml = "OUTPUT = \"ISO\"\n[rescue]\nmodules = \"none\"\n[network]\ncapture = false\n";
    build(w.path(), &out, toml, &["--no-cache"]);
    let iso = written(&out, "iso");
    let before = (sha256(&out.join("manifest.json")), sha256(&iso));
    // Leave 3 MiB.
    let (ok, avail, err) = sh(&format!("df -B1 --output=avail {} | tail -1", fs.display()));
    assert!(ok, "{err}");
    let avail: u64 = avail.trim().parse().unwrap();
    let (ok, _, err) = sh(&format!(
        "fallocate -l {} {}/fill",
        avail - (3 << 20),
        fs.display()
    ));
    assert!(ok, "{err}");
    let e = fails(
        w.path(),
        &out,
        &format!("KERNEL_CMDLINE = \"changed\"\n{toml}"),
        &[],
    );
    assert!(e.contains("No space left on device"), "{e}");
    assert!(
        e.contains(&out.display().to_string()) && e.contains("previous image"),
        "the error does not say what happened to the image: {e}"
    );
    assert_eq!(
        (sha256(&out.join("manifest.json")), sha256(&iso)),
        before,
        "the previous image changed"
    );
    run_ok(lifeboat(w.path()).args(["image", "verify"]).arg(&out));
    no_leftovers(&fs);
}
