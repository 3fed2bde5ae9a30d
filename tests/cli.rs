//! What is generated from the program's own definitions: the configuration
//! reference in docs/ (from the config structs), the man pages and the
//! shell completions (from the clap definition).

mod common;

use common::*;

fn conf() -> std::path::PathBuf {
    let d = tempfile::tempdir().unwrap().keep();
    std::fs::create_dir_all(d.join("etc")).unwrap();
    d.join("etc")
}

#[test]
fn the_configuration_reference_in_docs_is_current() {
    let o = run_ok(lifeboat(&conf()).args(["dump", "--reference"]));
    let fresh = String::from_utf8(o.stdout).unwrap();
    let file = repo().join("docs/configuration.md");
    let have = std::fs::read_to_string(&file).unwrap_or_default();
    if have != fresh {
        let line = have
            .lines()
            .zip(fresh.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(have.lines().count().min(fresh.lines().count()));
        panic!(
            "{} does not match the configuration structs (first difference at line {}: {:?} vs {:?}); \
             regenerate it: lifeboat dump --reference > docs/configuration.md",
            file.display(),
            line + 1,
            have.lines().nth(line).unwrap_or(""),
            fresh.lines().nth(line).unwrap_or("")
        );
    }
    // The reference names real keys: each documented top-level key set to
    // its documented default type is accepted (`lifeboat dump` reads it).
    let keys: Vec<&str> = fresh
        .lines()
        .filter_map(|l| l.strip_prefix("### `"))
        .filter_map(|l| l.split('`').next())
        .collect();
    assert!(keys.len() > 60, "{keys:?}");
    for k in [
        "output",
        "backup_url",
        "serve_host",
        "iso_default",
        "compression",
        "require_disks",
    ] {
        assert!(keys.contains(&k), "{k} is not in the reference");
    }
}

#[test]
fn man_pages_render_cleanly_and_completions_parse() {
    let c = conf();
    let dir = tempfile::tempdir().unwrap();
    run_ok(lifeboat(&c).arg("man").arg("--dir").arg(dir.path()));
    for cmd in [
        "",
        "-mkrescue",
        "-mkbackup",
        "-recover",
        "-serve",
        "-format",
        "-layout-check",
    ] {
        let p = dir.path().join(format!("lifeboat{cmd}.1"));
        assert!(p.is_file(), "{} missing", p.display());
        // groff as the oracle: it renders and warns about nothing.
        let (ok, out, err) = sh(&format!("groff -man -Tutf8 -ww -z {} 2>&1", p.display()));
        assert!(
            ok && out.trim().is_empty() && err.trim().is_empty(),
            "{}: {out}{err}",
            p.display()
        );
        let (_, text, _) = sh(&format!(
            "MANWIDTH=100 man -l {} 2>/dev/null | col -b",
            p.display()
        ));
        assert!(text.contains("lifeboat"), "{text}");
    }
    let (_, page, _) = sh(&format!(
        "MANWIDTH=200 man -l {} 2>/dev/null | col -b",
        dir.path().join("lifeboat-serve.1").display()
    ));
    assert!(
        page.contains("--enroll-token-file") && page.contains("--max-rate"),
        "{page}"
    );

    let o = run_ok(lifeboat(&c).args(["completions", "bash"]));
    let bash = dir.path().join("lifeboat.bash");
    std::fs::write(&bash, &o.stdout).unwrap();
    let (ok, _, err) = sh(&format!("bash -n {}", bash.display()));
    assert!(ok, "{err}");
    // Loaded into bash, it completes subcommands.
    let (ok, out, err) = sh(&format!(
        "bash -c 'source {}; COMP_WORDS=(lifeboat mkr); COMP_CWORD=1; COMP_LINE=\"lifeboat mkr\"; COMP_POINT=12; \
         _lifeboat lifeboat mkr lifeboat; printf \"%s\\n\" \"${{COMPREPLY[@]}}\"'",
        bash.display()
    ));
    assert!(
        ok && out.lines().any(|l| l.trim() == "mkrescue"),
        "{out}{err}"
    );
    for shell in ["zsh", "fish"] {
        let o = run_ok(lifeboat(&c).args(["completions", shell]));
        let s = String::from_utf8_lossy(&o.stdout);
        assert!(
            s.contains("mkrescue") && s.contains("serve"),
            "{shell}: {s}"
        );
    }
    let o = lifeboat(&c).args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

#[test]
fn the_packaged_udev_rule_is_the_one_lifeboat_writes() {
    let rules = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(String::from)
            .collect()
    };
    let shipped = std::fs::read_to_string(repo().join("dist/udev/99-lifeboat.rules")).unwrap();
    let want = lifeboat::cmd::udev::rule("LIFEBOAT-000", "/usr/bin/lifeboat", &[]);
    assert_eq!(rules(&shipped), rules(&want));
    assert_eq!(rules(&shipped).len(), 1);
}

/// The error messages in the source: the first string literal of every
/// `bail!(`, `anyhow!(`, `.context(` and `with_context(|| format!(` (and
/// the init's `fatal(`), outside test modules, per file.
fn error_catalogue() -> String {
    let mut files = vec![];
    for dir in ["builder/src", "rescue-init/src", "contract/src"] {
        for e in walkdir::WalkDir::new(repo().join(dir)).sort_by_file_name() {
            let e = e.unwrap();
            if e.path().extension().is_some_and(|x| x == "rs") {
                files.push(e.path().to_path_buf());
            }
        }
    }
    let opens = [
        "bail!(",
        "anyhow!(",
        ".context(",
        "with_context(|| format!(",
        "with_context(|| {\n",
        "fatal(\n",
        "fatal(&format!(",
        "#[error(",
    ];
    let mut out = String::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let text = text.split("#[cfg(test)]").next().unwrap();
        let mut msgs: Vec<String> = vec![];
        for open in opens {
            let mut from = 0;
            while let Some(i) = text[from..].find(open) {
                let at = from + i + open.len();
                from = at;
                let rest = text[at..].trim_start();
                let rest = rest.trim_start_matches('&');
                let rest = rest.strip_prefix("format!(").unwrap_or(rest).trim_start();
                let Some(body) = rest.strip_prefix('"') else {
                    continue;
                };
                // The literal, with Rust's line continuations joined.
                let mut lit = String::new();
                let mut chars = body.chars().peekable();
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => match chars.next() {
                            Some('\n') => {
                                while chars.peek().is_some_and(|c| c.is_whitespace()) {
                                    chars.next();
                                }
                            }
                            Some('n') => lit.push(' '),
                            Some(o) => lit.push(o),
                            None => {}
                        },
                        c => lit.push(c),
                    }
                }
                let lit = lit.split_whitespace().collect::<Vec<_>>().join(" ");
                if lit.len() > 12 && !msgs.contains(&lit) {
                    msgs.push(lit);
                }
            }
        }
        if msgs.is_empty() {
            continue;
        }
        let rel = f.strip_prefix(repo()).unwrap().display().to_string();
        out.push_str(&format!("\n## `{rel}`\n\n"));
        for m in msgs {
            out.push_str(&format!("- {}\n", m.replace('`', "'")));
        }
    }
    format!(
        "# Error messages\n\n\
         <!-- Generated from the source by tests/cli.rs (error_catalogue); a test keeps it\n     \
         current. Regenerate: LIFEBOAT_WRITE_DOCS=1 cargo test --test cli. Do not edit. -->\n\n\
         Every message Lifeboat can stop with, by the source file that says it (the\n\
         command is in the file name: `cmd/mkbackup.rs` is `lifeboat mkbackup`;\n\
         `rescue-init` is the rescue OS at boot). `{{...}}` stands for the value in\n\
         the real message (a device, a file, a key). By house rule each message names\n\
         the thing and says what to do; [troubleshooting.md](troubleshooting.md)\n\
         explains the common ones at more length. Messages are often followed by\n\
         their cause (`Caused by:` / `: ...`), which names the system error.\n{out}"
    )
}

#[test]
fn the_error_catalogue_in_docs_is_current() {
    let fresh = error_catalogue();
    let file = repo().join("docs/errors.md");
    if std::env::var_os("LIFEBOAT_WRITE_DOCS").is_some() {
        std::fs::write(&file, &fresh).unwrap();
    }
    let have = std::fs::read_to_string(&file).unwrap_or_default();
    assert!(
        have == fresh,
        "{} is not current: LIFEBOAT_WRITE_DOCS=1 cargo test --test cli",
        file.display()
    );
    // It is the real catalogue: messages known to exist are in it.
    for m in [
        "BACKUP_URL is not set",
        "the backup chain does not start with a full backup",
        "recovery failed",
    ] {
        assert!(fresh.contains(m), "{m:?} missing from the catalogue");
    }
    assert!(fresh.matches("\n- ").count() > 200, "too few messages");
}

#[test]
fn the_packaged_systemd_units_verify() {
    // The units as installed, pointing at the binary under test (the VM
    // test in recover.rs verifies them from the installed package too).
    let d = tempfile::tempdir().unwrap();
    let mut names = vec![];
    for e in std::fs::read_dir(repo().join("dist/systemd")).unwrap() {
        let p = e.unwrap().path();
        let text = std::fs::read_to_string(&p).unwrap();
        if p.extension().is_some_and(|x| x == "service") {
            assert!(text.contains("/usr/bin/lifeboat"), "{}", p.display());
        }
        let text = text.replace("/usr/bin/lifeboat", &lifeboat_bin().display().to_string());
        let n = p.file_name().unwrap().to_owned();
        std::fs::write(d.path().join(&n), text).unwrap();
        names.push(d.path().join(n));
    }
    assert_eq!(names.len(), 4, "{names:?}");
    let o = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&names)
        .output()
        .expect("systemd-analyze (package systemd) is needed");
    assert!(
        o.status.success() && o.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}
