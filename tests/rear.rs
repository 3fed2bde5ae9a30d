//! `lifeboat import-rear` on ReaR configurations written in the styles of
//! ReaR's documentation and user reports (tests/fixtures/rear): the TOML it
//! writes passes `lifeboat validate` and `lifeboat dump`, carries the
//! settings over, and every ReaR setting it could not carry is listed.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

struct Case {
    files: &'static [&'static str],
    mappings: bool,
    /// Dotted keys of `lifeboat dump --json`'s config and their values.
    want: &'static [(&'static str, &'static str)],
    unmapped: &'static [&'static str],
    /// Text that must not be in the TOML (secrets in plain text).
    absent: &'static [&'static str],
}

const CASES: &[Case] = &[
    Case {
        files: &["01-netfs-nfs-iso.conf"],
        mappings: false,
        want: &[
            ("output", r#""ISO""#),
            ("backup", r#""tar""#),
            ("backup_url", r#""nfs://192.168.100.10/srv/rear""#),
            ("output_url", r#""nfs://192.168.100.10/srv/rear""#),
            ("backup_mount_options", r#""nfsvers=3,nolock""#),
            ("backup_exclude", r#"["/mnt/*","/media/*","/var/crash/*"]"#),
        ],
        unmapped: &["NETFS_KEEP_OLD_BACKUP_COPY"],
        absent: &[],
    },
    Case {
        files: &["02-usb.conf"],
        mappings: false,
        want: &[
            ("output", r#""USB""#),
            ("backup_url", r#""usb://REAR-000""#),
        ],
        unmapped: &["USB_RETAIN_BACKUP_NR", "AUTOEXCLUDE_DISKS"],
        absent: &[],
    },
    Case {
        files: &["03-cifs-incremental-crypt.conf"],
        mappings: false,
        want: &[
            ("backup_url", r#""cifs://nas.example.com/backup""#),
            ("backup_type", r#""incremental""#),
            ("backup_full_days", "14"),
            ("backup_credentials", r#""/etc/rear/.cifs""#),
            ("backup_mount_options", r#""vers=3.0""#),
            ("backup_compression", r#""gzip""#),
        ],
        unmapped: &["BACKUP_PROG_CRYPT_ENABLED", "BACKUP_PROG_CRYPT_KEY"],
        absent: &["my secret passphrase"],
    },
    Case {
        files: &["04-rsync.conf"],
        mappings: false,
        want: &[
            ("backup", r#""rsync""#),
            ("backup_url", r#""rsync://backup@192.168.100.20/srv/rear""#),
            (
                "output_url",
                r#""sftp://backup@192.168.100.20/srv/rear-iso""#,
            ),
        ],
        unmapped: &["BACKUP_RSYNC_OPTIONS"],
        absent: &[],
    },
    Case {
        files: &["05-borg.conf"],
        mappings: false,
        want: &[
            ("backup", r#""borg""#),
            ("output_url", r#""nfs://192.168.56.1/srv/iso""#),
        ],
        unmapped: &[
            "BORGBACKUP_PASSPHRASE",
            "BORGBACKUP_ENC_TYPE",
            "BORGBACKUP_PRUNE_KEEP_DAILY",
            "COPY_AS_IS_BORG",
        ],
        absent: &["S3cr3t"],
    },
    Case {
        files: &["06-pxe.conf"],
        mappings: false,
        want: &[
            ("output", r#""PXE""#),
            ("backup_url", r#""nfs://192.168.122.1/srv/backup""#),
            ("network.capture", "true"),
        ],
        unmapped: &[
            "OUTPUT_PREFIX_PXE",
            "PXE_TFTP_URL",
            "PXE_CONFIG_URL",
            "PXE_CREATE_LINKS",
            "PXE_REMOVE_OLD_LINKS",
        ],
        absent: &[],
    },
    Case {
        files: &["07-external-hooks.conf"],
        mappings: false,
        want: &[
            ("backup", r#""external""#),
            ("external.backup", r#""/usr/local/sbin/site-backup --full""#),
            ("external.check", r#""/usr/local/sbin/site-backup --ping""#),
            (
                "external.restore",
                r#""/usr/local/sbin/site-restore --to /mnt/local""#,
            ),
            ("network.capture", "false"),
            ("kernel_cmdline", r#""net.ifnames=0 biosdevname=0""#),
            ("rescue.modules", r#""hostonly""#),
            (
                "hooks.pre_recovery",
                r#"["logger -t rear recovery starts"]"#,
            ),
            (
                "hooks.post_recovery",
                r#"["cp -a /etc/hosts $TARGET_FS_ROOT/etc/hosts.rescue"]"#,
            ),
            ("iso_default", r#""automatic""#),
        ],
        unmapped: &["FIRMWARE_FILES"],
        absent: &["rescue-me-123"],
    },
    Case {
        files: &["08-tsm-migration.conf"],
        mappings: true,
        want: &[
            ("output", r#""ISO""#),
            ("network.capture", "false"),
            ("rescue.copy_as_is", r#"["/etc/adsm/TSM.PWD"]"#),
        ],
        unmapped: &[
            "BACKUP",
            "ISO_VOLID",
            "ISO_DEFAULT",
            "ISO_PREFIX",
            "TSM_RESULT_SAVE",
            "MIGRATION_MODE",
        ],
        absent: &[],
    },
    Case {
        files: &[
            "09-site-and-local/site.conf",
            "09-site-and-local/local.conf",
        ],
        mappings: false,
        want: &[
            ("backup_url", r#""nfs://10.1.1.6/rear-host""#),
            (
                "rescue.optional_programs",
                r#"["lsof","strace","tcpdump","iotop"]"#,
            ),
            ("rescue.programs", r#"["multipath"]"#),
            (
                "rescue.copy_as_is",
                r#"["/etc/multipath.conf","/etc/multipath"]"#,
            ),
            ("rescue.exclude", r#"["/usr/share/doc"]"#),
            ("rescue.exclude_modules", r#"["nouveau"]"#),
            ("rescue.add_modules", r#"["vmw_pvscsi"]"#),
        ],
        unmapped: &["EXCLUDE_VG", "GRUB_RESCUE"],
        absent: &[],
    },
    Case {
        files: &["10-obdr-tape.conf"],
        mappings: false,
        want: &[
            ("output", r#""OBDR""#),
            ("backup_url", r#""tape:///dev/nst0""#),
            ("kernel_cmdline", r#""console=ttyS0,115200""#),
        ],
        unmapped: &["TAPE_DEVICE"],
        absent: &[],
    },
];

fn fixtures() -> PathBuf {
    repo().join("tests/fixtures/rear")
}

fn get<'a>(v: &'a Value, dotted: &str) -> &'a Value {
    dotted
        .split('.')
        .fold(v, |v, k| v.get(k).unwrap_or(&Value::Null))
}

/// `lifeboat -c FILE dump --json` with no system configuration.
fn dump_json(etc: &Path, file: &Path) -> Value {
    let d = run_ok(lifeboat(etc).arg("-c").arg(file).args(["dump", "--json"]));
    serde_json::from_slice(&d.stdout).unwrap()
}

/// The variables a ReaR file sets (`NAME=` or `NAME+=` at a line start).
fn assigned(file: &Path) -> BTreeSet<String> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let n: String = l
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            let rest = &l[n.len()..];
            (!n.is_empty() && (rest.starts_with('=') || rest.starts_with("+="))).then_some(n)
        })
        .collect()
}

#[test]
fn real_world_rear_configurations_import_validate_and_report_the_rest() {
    let empty = tempfile::tempdir().unwrap();
    for case in CASES {
        let work = tempfile::tempdir().unwrap();
        let out = work.path().join("lifeboat.toml");
        let files: Vec<PathBuf> = case.files.iter().map(|f| fixtures().join(f)).collect();
        let mappings = if case.mappings {
            fixtures().join("mappings")
        } else {
            work.path().join("no-mappings")
        };
        let o = run_ok(
            lifeboat(empty.path())
                .arg("import-rear")
                .args(&files)
                .arg("--mappings")
                .arg(&mappings)
                .arg("-o")
                .arg(&out)
                .arg("--json"),
        );
        let report: Value = serde_json::from_slice(&o.stdout).unwrap();
        let toml = std::fs::read_to_string(&out).unwrap();
        let name = case.files[0];
        // Every ReaR setting is either carried over or listed with a reason.
        let mapped: BTreeSet<String> = report["mapped"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        let unmapped: BTreeSet<String> = report["unmapped"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| {
                assert!(
                    !u["reason"].as_str().unwrap().is_empty(),
                    "{name}: no reason: {u}"
                );
                u["name"].as_str().unwrap().to_string()
            })
            .collect();
        for f in &files {
            for var in assigned(f) {
                assert!(
                    mapped.contains(&var) || unmapped.contains(&var),
                    "{name}: {var} is neither imported nor reported:\n{report:#}"
                );
            }
        }
        for u in case.unmapped {
            assert!(
                unmapped.contains(*u),
                "{name}: {u} should be reported as not imported:\n{report:#}"
            );
            // ... and named in the TOML's closing comment.
            assert!(toml.contains(&format!("#   {u}: ")), "{name}: {u}\n{toml}");
        }
        for a in case.absent {
            assert!(!toml.contains(a), "{name}: {a:?} is in the TOML:\n{toml}");
            assert!(
                !String::from_utf8_lossy(&o.stdout).contains(a),
                "{name}: {a:?} is in the report"
            );
        }
        // Lifeboat accepts what was written. The only problems allowed are
        // files the ReaR configuration names that this machine lacks.
        let v = lifeboat(empty.path())
            .arg("-c")
            .arg(&out)
            .args(["validate", "--json"])
            .output()
            .unwrap();
        let verdict: Value = serde_json::from_slice(&v.stdout).unwrap();
        let sources: String = files
            .iter()
            .map(|f| std::fs::read_to_string(f).unwrap())
            .collect();
        for p in verdict["problems"].as_array().unwrap() {
            let p = p.as_str().unwrap();
            let path = p.split('"').nth(1).unwrap_or("");
            assert!(
                p.ends_with(": no such file") && sources.contains(path),
                "{name}: validate: {p}"
            );
        }
        assert_eq!(
            v.status.success(),
            verdict["problems"].as_array().unwrap().is_empty()
        );
        let dump = dump_json(empty.path(), &out);
        for (k, want) in case.want {
            let want: Value = serde_json::from_str(want).unwrap();
            assert_eq!(get(&dump["config"], k), &want, "{name}: {k}\n{toml}");
        }
    }
}

#[test]
fn mapping_files_and_secrets_are_written_as_files_lifeboat_uses() {
    let empty = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("lifeboat.toml");
    run_ok(
        lifeboat(empty.path())
            .arg("import-rear")
            .arg(fixtures().join("08-tsm-migration.conf"))
            .arg("--mappings")
            .arg(fixtures().join("mappings"))
            .arg("-o")
            .arg(&out),
    );
    let net: Value =
        serde_json::from_slice(&std::fs::read(work.path().join("rear-network.json")).unwrap())
            .unwrap();
    assert_eq!(net["interfaces"][0]["name"], "eth0");
    assert_eq!(
        net["interfaces"][0]["addresses"],
        json!(["192.168.1.50/24"])
    );
    assert_eq!(net["interfaces"][0]["mac"], "52:54:00:12:34:56");
    assert_eq!(net["interfaces"][1]["dhcp"], true);
    assert_eq!(net["routes"][0]["gateway"], "192.168.1.1");
    assert_eq!(
        std::fs::read_to_string(work.path().join("rear-disk-mapping")).unwrap(),
        "/dev/sda /dev/vda\n/dev/sdb /dev/vdb\n"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let dump = dump_json(empty.path(), &out);
    assert_eq!(
        dump["config"]["network"]["file"],
        json!(work.path().join("rear-network.json"))
    );
    assert_eq!(
        dump["config"]["recover"]["mapping"],
        json!(work.path().join("rear-disk-mapping"))
    );
    // A second import does not overwrite without --force.
    let o = lifeboat(empty.path())
        .arg("import-rear")
        .arg(fixtures().join("01-netfs-nfs-iso.conf"))
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    // --force --dry-run: converts, names what it would replace, writes nothing.
    let before = std::fs::read(&out).unwrap();
    let o = run_ok(
        lifeboat(empty.path())
            .arg("import-rear")
            .arg(fixtures().join("01-netfs-nfs-iso.conf"))
            .arg("-o")
            .arg(&out)
            .args(["--force", "--dry-run"]),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("dry run: would replace {}", out.display()))
            && err.contains("nothing was written"),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("BACKUP_URL"));
    assert_eq!(
        std::fs::read(&out).unwrap(),
        before,
        "--dry-run wrote the file"
    );
    // The plain rescue password became a crypt hash that openssl verifies.
    let o = run_ok(
        lifeboat(empty.path())
            .arg("import-rear")
            .arg(fixtures().join("07-external-hooks.conf"))
            .arg("--json"),
    );
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    let toml = report["toml"].as_str().unwrap();
    let hash = toml
        .lines()
        .find_map(|l| l.strip_prefix("password_hash = "))
        .unwrap()
        .trim_matches('"');
    assert!(hash.starts_with("$6$"), "{hash}");
    let salt = hash.split('$').nth(2).unwrap();
    let (ok, again, err) = sh(&format!("openssl passwd -6 -salt '{salt}' 'rescue-me-123'"));
    assert!(ok, "{err}");
    assert_eq!(again.trim(), hash);
}

#[test]
fn validate_names_each_bad_value() {
    let empty = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let f = work.path().join("bad.toml");
    std::fs::write(
        &f,
        "OUTPUT = \"FLOPPY\"\nBACKUP_URL = \"ftp://x/y\"\nbackup_type = \"weekly\"\n\
         [network]\nfile = \"/nonexistent/net.json\"\n[hooks]\npre_backup = [\"/nonexistent/hook --x\"]\n",
    )
    .unwrap();
    let o = lifeboat(empty.path())
        .arg("-c")
        .arg(&f)
        .arg("validate")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    for want in [
        "output = \"FLOPPY\" is not one of",
        "backup_url = \"ftp://x/y\": the scheme ftp://",
        "backup_type = \"weekly\"",
        "network.file = \"/nonexistent/net.json\": no such file",
        "hooks.pre_backup: /nonexistent/hook",
        "5 problem(s)",
    ] {
        assert!(err.contains(want), "{want:?} missing:\n{err}");
    }
}
