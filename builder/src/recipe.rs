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
    pub name: String,
    pub description: String,
    /// Programs the rescue OS needs (with their libraries).
    pub programs: Vec<String>,
    /// Files and directories the rescue OS needs, copied as they are.
    pub copy_as_is: Vec<String>,
    /// Run by `mkbackup` on the healthy machine.
    pub backup: String,
    /// Run by `recover` before any disk is touched: non-zero stops it.
    pub check: String,
    /// Run by `recover` once the disks are recreated and mounted.
    pub restore: String,
    pub env: BTreeMap<String, String>,
}

const SHIPPED: &[(&str, &str)] = &[
    ("restic", include_str!("../../recipes/restic.toml")),
    ("borg", include_str!("../../recipes/borg.toml")),
    ("bareos-fd", include_str!("../../recipes/bareos-fd.toml")),
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
}
