//! Backup methods run by other tools: `BACKUP = "external"` with the
//! commands in `[external]`, or a *recipe* (`BACKUP = "restic"`, `"borg"`,
//! `"bareos-fd"`, or any `/etc/lifeboat/recipes/NAME.toml`): a TOML file
//! naming the programs and files the rescue OS needs and the backup, check
//! and restore commands. Commands run with `sh -c`; their exit codes are
//! honoured. They see:
//!
//! * `LIFEBOAT_HOSTNAME`;
//! * `LIFEBOAT_MOUNTS`: the mount points to back up, space-separated;
//! * `LIFEBOAT_EXCLUDES` and `LIFEBOAT_EXCLUDE_ARGS` (`--exclude=PATH ...`);
//! * `LIFEBOAT_BACKUP_DIR`: the directory of BACKUP_URL, when one is set
//!   (in the rescue OS: where the backup medium is mounted);
//! * `LIFEBOAT_TARGET`: in the rescue OS, where the recreated system is
//!   mounted (`/mnt/local`);
//! * the `env` table of the recipe and of `[external]`.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// A recipe, or the `[external]` section (same fields).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Recipe {
    /// Name of the recipe (its file name without `.toml`).
    pub name: String,
    /// What it does, one line.
    pub description: String,
    /// Programs the rescue OS needs (with their libraries).
    pub programs: Vec<String>,
    /// Files and directories the rescue OS needs, copied as they are
    /// (path components may hold `*`, `?`, `[...]`).
    pub copy_as_is: Vec<String>,
    /// Glob patterns of image paths to leave out of what the above brings.
    pub exclude: Vec<String>,
    /// Run by `mkbackup` on the healthy machine.
    pub backup: String,
    /// Run by `recover` before any disk is touched: non-zero stops it.
    pub check: String,
    /// Run by `recover` once the disks are recreated and mounted.
    pub restore: String,
    /// Environment of the three commands (e.g. `RESTIC_PASSWORD_FILE`).
    pub env: BTreeMap<String, String>,
}

const SHIPPED: &[(&str, &str)] = &[
    ("restic", include_str!("../../recipes/restic.toml")),
    ("borg", include_str!("../../recipes/borg.toml")),
    ("bareos-fd", include_str!("../../recipes/bareos-fd.toml")),
    ("rsync", include_str!("../../recipes/rsync.toml")),
];

/// Is this BACKUP value the internal tar method?
pub fn is_internal(method: &str) -> bool {
    matches!(method.to_ascii_lowercase().as_str(), "tar" | "netfs")
}

/// The recipe for `method`: `external` is `[external]` alone; a name is
/// `/etc/lifeboat/recipes/NAME.toml` (or `dir`), else a shipped recipe;
/// `[external]` fields that are set override the recipe's.
pub fn load(method: &str, external: &Recipe, dir: &Path) -> Result<Recipe> {
    let mut r = if method == "external" {
        Recipe {
            name: "external".into(),
            ..Default::default()
        }
    } else {
        let file = dir.join(format!("{method}.toml"));
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(_) => match SHIPPED.iter().find(|(n, _)| *n == method) {
                Some((_, t)) => t.to_string(),
                None => bail!(
                    "BACKUP = {method:?}: no such method. Use tar, external, a shipped recipe ({}) or put a recipe into {}",
                    SHIPPED.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", "),
                    file.display()
                ),
            },
        };
        toml::from_str(&text).with_context(|| format!("recipe {method}: invalid TOML"))?
    };
    if r.name.is_empty() {
        r.name = method.to_string();
    }
    let over = |mine: &mut String, theirs: &String| {
        if !theirs.is_empty() {
            *mine = theirs.clone();
        }
    };
    over(&mut r.backup, &external.backup);
    over(&mut r.check, &external.check);
    over(&mut r.restore, &external.restore);
    r.programs.extend(external.programs.iter().cloned());
    r.copy_as_is.extend(external.copy_as_is.iter().cloned());
    r.exclude.extend(external.exclude.iter().cloned());
    r.env.extend(external.env.clone());
    for (what, cmd) in [
        ("backup", &r.backup),
        ("check", &r.check),
        ("restore", &r.restore),
    ] {
        if cmd.trim().is_empty() {
            bail!("BACKUP = {method:?} has no {what} command (set external.{what})");
        }
    }
    Ok(r)
}

/// The environment of the commands.
pub fn environment(
    r: &Recipe,
    hostname: &str,
    mounts: &[String],
    excludes: &[String],
    backup_dir: Option<&Path>,
    target: Option<&Path>,
) -> BTreeMap<String, String> {
    let mut e = BTreeMap::new();
    e.insert("LIFEBOAT_HOSTNAME".to_string(), hostname.to_string());
    e.insert("LIFEBOAT_MOUNTS".into(), mounts.join(" "));
    e.insert("LIFEBOAT_EXCLUDES".into(), excludes.join(" "));
    e.insert(
        "LIFEBOAT_EXCLUDE_ARGS".into(),
        excludes
            .iter()
            .map(|x| format!("--exclude={x}"))
            .collect::<Vec<_>>()
            .join(" "),
    );
    if let Some(d) = backup_dir {
        e.insert(
            "LIFEBOAT_BACKUP_DIR".into(),
            d.to_string_lossy().to_string(),
        );
    }
    if let Some(t) = target {
        e.insert("LIFEBOAT_TARGET".into(), t.to_string_lossy().to_string());
    }
    for (k, v) in &r.env {
        e.insert(k.clone(), v.clone());
    }
    e
}

/// What the commands learn from BACKUP_URL: `LIFEBOAT_BACKUP_URL`, and for
/// `rsync://` URLs the rsync destination of this host
/// (`LIFEBOAT_RSYNC_TARGET`, ending in `/`) and `RSYNC_RSH`:
/// `rsync://[user@]host[:port]/path` goes over ssh,
/// `rsync://[user@]host[:port]::module[/path]` to an rsync daemon.
pub fn url_environment(url: &str, hostname: &str) -> Result<BTreeMap<String, String>> {
    let mut e = BTreeMap::new();
    if url.is_empty() {
        return Ok(e);
    }
    e.insert("LIFEBOAT_BACKUP_URL".to_string(), url.to_string());
    let Some(rest) = url.strip_prefix("rsync://") else {
        return Ok(e);
    };
    if let Some((auth, module)) = rest.split_once("::") {
        let module = module.trim_matches('/');
        if auth.is_empty() || module.is_empty() {
            bail!("BACKUP_URL = {url:?}: the daemon form is rsync://[user@]host[:port]::module[/path]");
        }
        e.insert(
            "LIFEBOAT_RSYNC_TARGET".into(),
            format!("rsync://{auth}/{module}/{hostname}/"),
        );
        return Ok(e);
    }
    let (auth, path) = rest.split_once('/').unwrap_or((rest, ""));
    let path = path.trim_end_matches('/');
    if auth.is_empty() || path.is_empty() {
        bail!("BACKUP_URL = {url:?}: the ssh form is rsync://[user@]host[:port]/path");
    }
    let (userhost, port) = match auth.rsplit_once(':') {
        Some((h, p)) => {
            p.parse::<u16>()
                .with_context(|| format!("BACKUP_URL = {url:?}: port {p:?} is not a number"))?;
            (h, Some(p))
        }
        None => (auth, None),
    };
    e.insert(
        "LIFEBOAT_RSYNC_TARGET".into(),
        format!("{userhost}:/{path}/{hostname}/"),
    );
    let mut rsh = "ssh -o BatchMode=yes".to_string();
    if let Some(p) = port {
        rsh.push_str(&format!(" -p {p}"));
    }
    e.insert("RSYNC_RSH".into(), rsh);
    Ok(e)
}

/// Run one of the recipe's commands; output goes to ours. The error names
/// the step, the command and its exit status.
pub fn run(what: &str, cmd: &str, env: &BTreeMap<String, String>) -> Result<()> {
    let st = Command::new("sh")
        .args(["-c", cmd])
        .envs(env)
        .status()
        .with_context(|| format!("cannot run the {what} command"))?;
    if !st.success() {
        bail!("the {what} command failed ({st}): {cmd}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_recipes_load_and_external_overrides() {
        let none = tempfile::tempdir().unwrap();
        for (name, _) in SHIPPED {
            let r = load(name, &Recipe::default(), none.path()).unwrap();
            assert_eq!(r.name, *name);
            assert!(!r.programs.is_empty() && !r.restore.is_empty());
        }
        let ext = Recipe {
            restore: "my-restore".into(),
            env: [("RESTIC_REPOSITORY".to_string(), "/r".to_string())].into(),
            programs: vec!["extra".into()],
            ..Default::default()
        };
        let r = load("restic", &ext, none.path()).unwrap();
        assert_eq!(r.restore, "my-restore");
        assert!(r.backup.contains("restic backup --one-file-system"));
        assert_eq!(r.programs, vec!["restic", "extra"]);
        assert_eq!(r.env["RESTIC_REPOSITORY"], "/r");
        // A user recipe wins over the shipped one.
        std::fs::write(
            none.path().join("restic.toml"),
            "programs = [\"x\"]\nbackup = \"b\"\ncheck = \"c\"\nrestore = \"r\"\n",
        )
        .unwrap();
        assert_eq!(
            load("restic", &Recipe::default(), none.path())
                .unwrap()
                .backup,
            "b"
        );
        // external needs its commands; unknown names are explained.
        let e = load("external", &Recipe::default(), none.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no backup command"), "{e}");
        let e = load("tsm", &Recipe::default(), none.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no such method") && e.contains("restic, borg"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            load("bad", &Recipe::default(), {
                std::fs::write(none.path().join("bad.toml"), "frobnicate = 1\n").unwrap();
                none.path()
            })
            .unwrap_err()
        );
        assert!(e.contains("frobnicate"), "{e}");
    }

    #[test]
    fn commands_get_the_environment_and_exit_codes_count() {
        let r = Recipe {
            env: [("X".to_string(), "from-recipe".to_string())].into(),
            ..Default::default()
        };
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        let env = environment(
            &r,
            "h1",
            &["/".into(), "/boot".into()],
            &["/tmp/*".into()],
            Some(d.path()),
            Some(Path::new("/mnt/local")),
        );
        run(
            "backup",
            &format!("echo \"$LIFEBOAT_HOSTNAME|$LIFEBOAT_MOUNTS|$LIFEBOAT_EXCLUDE_ARGS|$LIFEBOAT_TARGET|$X|$LIFEBOAT_BACKUP_DIR\" > {}", out.display()),
            &env,
        )
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap().trim(),
            format!(
                "h1|/ /boot|--exclude=/tmp/*|/mnt/local|from-recipe|{}",
                d.path().display()
            )
        );
        let e = run("check", "exit 3", &env).unwrap_err().to_string();
        assert!(
            e.contains("check command failed") && e.contains("exit status: 3"),
            "{e}"
        );
    }

    #[test]
    fn rsync_urls_become_targets() {
        let e = url_environment("rsync://backup@srv:2222/srv/b/", "h1").unwrap();
        assert_eq!(e["LIFEBOAT_RSYNC_TARGET"], "backup@srv:/srv/b/h1/");
        assert_eq!(e["RSYNC_RSH"], "ssh -o BatchMode=yes -p 2222");
        let e = url_environment("rsync://srv::backups/x", "h1").unwrap();
        assert_eq!(e["LIFEBOAT_RSYNC_TARGET"], "rsync://srv/backups/x/h1/");
        assert!(!e.contains_key("RSYNC_RSH"));
        let e = url_environment("file:///b", "h1").unwrap();
        assert_eq!(e["LIFEBOAT_BACKUP_URL"], "file:///b");
        assert!(!e.contains_key("LIFEBOAT_RSYNC_TARGET"));
        assert!(url_environment("rsync://srv", "h").is_err());
        assert!(url_environment("rsync://srv:x/p", "h").is_err());
        assert!(url_environment("rsync://::m", "h").is_err());
    }

    #[test]
    fn the_rsync_recipe_mirrors_and_restores_through_a_real_daemon() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let srv = root.join("srv");
        std::fs::create_dir_all(&srv).unwrap();
        let port = lifeboat_qemu::free_port();
        std::fs::write(
            root.join("rsyncd.conf"),
            format!(
                "address = 127.0.0.1\nport = {port}\nuse chroot = no\npid file = {r}/rsyncd.pid\nlog file = {r}/rsyncd.log\n\
                 [backups]\n  path = {s}\n  read only = no\n  uid = root\n  gid = root\n",
                r = root.display(),
                s = srv.display()
            ),
        )
        .unwrap();
        let mut daemon = Command::new("rsync")
            .args(["--daemon", "--no-detach", "--config"])
            .arg(root.join("rsyncd.conf"))
            .spawn()
            .expect("rsync is needed (apt-get install rsync)");
        let t = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t.elapsed().as_secs() < 20, "rsync daemon did not start");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let src = root.join("src");
        std::fs::create_dir_all(src.join("etc")).unwrap();
        std::fs::create_dir_all(src.join("skip")).unwrap();
        std::fs::write(src.join("etc/a"), "a0").unwrap();
        std::fs::write(src.join("gone"), "g").unwrap();
        std::fs::write(src.join("skip/x"), "x").unwrap();
        std::fs::hard_link(src.join("etc/a"), src.join("etc/a-link")).unwrap();
        std::os::unix::fs::symlink("etc/a", src.join("sym")).unwrap();
        let r = load("rsync", &Recipe::default(), root).unwrap();
        let s = src.to_string_lossy().to_string();
        let env_for = |target: Option<&Path>| {
            let mut e = environment(
                &r,
                "h1",
                std::slice::from_ref(&s),
                &[format!("{s}/skip/*")],
                None,
                target,
            );
            e.extend(
                url_environment(&format!("rsync://127.0.0.1:{port}::backups/mirror"), "h1")
                    .unwrap(),
            );
            e
        };
        let backup_env = env_for(None);
        let check = run("check", &r.check, &backup_env);
        assert!(check.is_err(), "the check must fail before any backup");
        run("backup", &r.backup, &backup_env).unwrap();
        std::fs::remove_file(src.join("gone")).unwrap();
        // rsync compares size and mtime (seconds): a change within the same
        // second needs another size to be seen.
        std::fs::write(src.join("etc/a"), "a1 changed").unwrap();
        run("backup", &r.backup, &backup_env).unwrap();
        run("check", &r.check, &backup_env).unwrap();
        let on_server = srv.join("mirror/h1").join(s.trim_start_matches('/'));
        assert!(on_server.join("etc/a").is_file(), "{}", on_server.display());
        assert!(
            !on_server.join("gone").exists(),
            "deleted files are deleted on the mirror"
        );
        let dst = root.join("dst");
        std::fs::create_dir_all(&dst).unwrap();
        run("restore", &r.restore, &env_for(Some(&dst))).unwrap();
        let back = dst.join(s.trim_start_matches('/'));
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::read_to_string(back.join("etc/a")).unwrap(),
            "a1 changed"
        );
        assert_eq!(
            std::fs::metadata(back.join("etc/a")).unwrap().ino(),
            std::fs::metadata(back.join("etc/a-link")).unwrap().ino(),
            "hard links kept"
        );
        assert_eq!(
            std::fs::read_link(back.join("sym")).unwrap(),
            Path::new("etc/a")
        );
        assert!(!back.join("skip/x").exists(), "excluded");
        assert!(!back.join("gone").exists());
        let _ = daemon.kill();
        let _ = daemon.wait();
    }

    /// The shipped restic and borg recipes with repositories on another
    /// machine (restic over sftp, borg over ssh), against a real sshd: the
    /// path for users who outgrow one box.
    #[test]
    fn restic_and_borg_recipes_with_repositories_over_ssh() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let srv = lifeboat_qemu::servers::sshd(&root.join("sshd"));
        // ssh as root would run it, with the server's key and host key.
        let bin = root.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let ssh = format!(
            "/usr/bin/ssh -i {} -o IdentitiesOnly=yes -o BatchMode=yes -o UserKnownHostsFile={} -p {}",
            srv.dir.join("id_ed25519").display(),
            srv.dir.join("known_hosts").display(),
            srv.port
        );
        std::fs::write(bin.join("ssh"), format!("#!/bin/sh\nexec {ssh} \"$@\"\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(bin.join("ssh"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let src = root.join("src");
        std::fs::create_dir_all(src.join("etc")).unwrap();
        std::fs::write(src.join("etc/a"), "payload").unwrap();
        let s = src.to_string_lossy().to_string();
        let repo_dir = srv.root.display().to_string();
        for (name, env) in [
            (
                "restic",
                vec![
                    (
                        "RESTIC_REPOSITORY",
                        format!("sftp:root@127.0.0.1:{repo_dir}/restic"),
                    ),
                    ("RESTIC_PASSWORD", "pw".to_string()),
                ],
            ),
            (
                "borg",
                vec![
                    ("BORG_REPO", format!("ssh://root@127.0.0.1{repo_dir}/borg")),
                    ("BORG_PASSPHRASE", "pw".to_string()),
                    ("BORG_RSH", ssh.clone()),
                ],
            ),
        ] {
            let r = load(name, &Recipe::default(), root).unwrap();
            let env_for = |target: Option<&Path>| {
                let mut e = environment(&r, "h1", std::slice::from_ref(&s), &[], None, target);
                e.insert("PATH".into(), path.clone());
                for (k, v) in &env {
                    e.insert(k.to_string(), v.clone());
                }
                e
            };
            assert!(
                run("check", &r.check, &env_for(None)).is_err(),
                "{name}: the check must fail before any backup"
            );
            run("backup", &r.backup, &env_for(None)).unwrap();
            run("check", &r.check, &env_for(None)).unwrap();
            let dst = root.join(format!("dst-{name}"));
            std::fs::create_dir_all(&dst).unwrap();
            run("restore", &r.restore, &env_for(Some(&dst))).unwrap();
            let back = dst.join(s.trim_start_matches('/')).join("etc/a");
            assert_eq!(
                std::fs::read_to_string(&back)
                    .unwrap_or_else(|e| panic!("{name}: {}: {e}", back.display())),
                "payload"
            );
            assert!(
                srv.root.join(name).is_dir(),
                "{name}: the repository is on the server"
            );
        }
    }
}
