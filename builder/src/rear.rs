//! `lifeboat import-rear`: a ReaR configuration (Bash) turned into Lifeboat
//! TOML, with every setting that has no equivalent listed with the reason.
//!
//! The files are evaluated by bash itself, so arrays, `+=`, quoting and
//! `"${VAR[@]}"` self-references mean what they mean to ReaR. The
//! evaluation is fenced: a restricted shell (`bash -r`: no redirections
//! that write, no `cd`, no `exec`, no commands named by path) with an empty
//! environment and a PATH that holds no program at all; `hostname`,
//! `uname` and `date` are shell functions answering from this machine.
//! Command substitutions that need any other program come out empty and
//! are reported. A time limit stops a config that loops.

use anyhow::{bail, Context, Result};
use lifeboat_contract::{NetInterface, NetKind, NetRoute, NetworkConfig};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The default ReaR configuration files, in ReaR's reading order.
pub const DEFAULT_FILES: &[&str] = &["/etc/rear/site.conf", "/etc/rear/local.conf"];
/// ReaR's mapping files (migration mode).
pub const DEFAULT_MAPPINGS: &str = "/etc/rear/mappings";

/// A variable's value after the files were read.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Value {
    Str(String),
    Arr(Vec<String>),
}

impl Value {
    /// The words of an array, or of a string split at blanks (ReaR uses
    /// both for lists).
    pub fn words(&self) -> Vec<String> {
        match self {
            Value::Str(s) => s.split_whitespace().map(String::from).collect(),
            Value::Arr(a) => a.iter().filter(|x| !x.is_empty()).cloned().collect(),
        }
    }

    /// A string, or an array joined by spaces (as `"${A[*]}"`).
    pub fn joined(&self) -> String {
        match self {
            Value::Str(s) => s.clone(),
            Value::Arr(a) => a.join(" "),
        }
    }

    fn show(&self) -> String {
        match self {
            Value::Str(s) => format!("{s:?}"),
            Value::Arr(a) => format!(
                "( {} )",
                a.iter()
                    .map(|x| format!("{x:?}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        }
    }
}

/// ReaR's lists, set empty before the files are read so that
/// `X=( "${X[@]}" more )` yields only what the configuration adds.
const ARRAYS: &[&str] = &[
    "BACKUP_PROG_EXCLUDE",
    "BACKUP_PROG_INCLUDE",
    "BACKUP_PROG_COMPRESS_OPTIONS",
    "BACKUP_RSYNC_OPTIONS",
    "PROGS",
    "REQUIRED_PROGS",
    "LIBS",
    "COPY_AS_IS",
    "COPY_AS_IS_EXCLUDE",
    "MODULES",
    "MODULES_LOAD",
    "EXCLUDE_MODULES",
    "FIRMWARE_FILES",
    "PRE_RECOVERY_SCRIPT",
    "POST_RECOVERY_SCRIPT",
    "PRE_BACKUP_SCRIPT",
    "POST_BACKUP_SCRIPT",
    "EXCLUDE_MOUNTPOINTS",
    "EXCLUDE_VG",
    "EXCLUDE_MD",
    "EXCLUDE_RECREATE",
    "EXCLUDE_BACKUP",
    "ONLY_INCLUDE_VG",
    "AUTOEXCLUDE_PATH",
    "SSH_FILES",
    "CLONE_USERS",
    "CLONE_GROUPS",
    "NETFS_KEEP_OLD_BACKUP_COPY_ARRAY",
];

/// Variables ReaR's scripts define that configurations refer to.
fn predefined(host: &str) -> Vec<(&'static str, String)> {
    vec![
        ("CONFIG_DIR", "/etc/rear".into()),
        ("SHARE_DIR", "/usr/share/rear".into()),
        ("VAR_DIR", "/var/lib/rear".into()),
        ("LOG_DIR", "/var/log/rear".into()),
        ("TMPDIR", "/tmp".into()),
        ("TMP_DIR", "/tmp".into()),
        ("BUILD_DIR", "/tmp/rear".into()),
        ("ROOTFS_DIR", "/tmp/rear/rootfs".into()),
        ("TARGET_FS_ROOT", "/mnt/local".into()),
        ("ARCH", "Linux-x86_64".into()),
        ("REAL_MACHINE", "x86_64".into()),
        ("OS", "GNU/Linux".into()),
        ("HOSTNAME", host.into()),
        ("WORKFLOW", "mkbackup".into()),
    ]
}

/// What the evaluation found: changed variables, and what bash said.
#[derive(Debug, Default)]
pub struct Evaluated {
    pub vars: BTreeMap<String, Value>,
    pub messages: Vec<String>,
}

const SCRIPT: &str = r#"
hostname() { case "$1" in -s|--short) printf '%s\n' "${__lb_host%%.*}";; -d|--domain) case $__lb_host in *.*) printf '%s\n' "${__lb_host#*.}";; *) echo;; esac;; *) printf '%s\n' "$__lb_host";; esac; }
uname() { case "$1" in -n) printf '%s\n' "$__lb_host";; -r) printf '%s\n' "$__lb_kver";; -m|-p|-i) echo x86_64;; -a) printf 'Linux %s %s #1 SMP x86_64 GNU/Linux\n' "$__lb_host" "$__lb_kver";; *) echo Linux;; esac; }
date() { local f='%a %b %e %H:%M:%S %Z %Y'; case "$1" in +*) f=${1#+};; '') ;; *) "date_${1}_is_not_run_while_importing"; return 1;; esac; printf "%($f)T\n" -1; }
for __lb_n in $__lb_arrays; do declare -a "$__lb_n=()"; done
declare -A __lb_seen
for __lb_n in $(compgen -v); do __lb_seen[$__lb_n]=$(declare -p "$__lb_n" 2>/dev/null); done
__lb_emit() {
  local __lb_d
  __lb_d=$(declare -p "$1") || return 0
  [ "${__lb_seen[$1]-}" = "$__lb_d" ] && return 0
  case $__lb_d in
    "declare -A"*) printf 'h\0%s\0' "$1" ;;
    "declare -a"*)
      local -n __lb_r=$1
      printf 'a\0%s\0%s\0' "$1" "${#__lb_r[@]}"
      local __lb_x
      for __lb_x in "${__lb_r[@]}"; do printf '%s\0' "$__lb_x"; done ;;
    *) printf 's\0%s\0%s\0' "$1" "${!1}" ;;
  esac
}
# A program the configuration runs is not run: its place in a value is
# marked, so that the value is reported instead of imported wrong.
__lb_arm() { command_not_found_handle() { printf '\001NOTRUN:%s\001' "$1"; return 127; }; }
# From here on: no writing redirections, no cd, no exec, no paths.
set -r
__lb_k=0
for __lb_text in "$@"; do
  __lb_k=$((__lb_k + 1))
  # Where a file begins: on stdout, and (bash's complaint about an unknown
  # command) on stderr.
  printf '\001FILE:%s\001' "$__lb_k"
  unset -f command_not_found_handle
  "__lb_file_${__lb_k}_begins"
  __lb_arm
  eval "$__lb_text"
done
printf '\000LIFEBOAT-DUMP\000'
for __lb_n in $(compgen -v); do
  case $__lb_n in
    __lb_*|BASH*|FUNCNAME|PIPESTATUS|RANDOM|SRANDOM|LINENO|SECONDS|EPOCHREALTIME|EPOCHSECONDS|_|HISTCMD|PPID|SHLVL|OLDPWD|PWD|COLUMNS|LINES|OPTIND|OPTARG|OPTERR|IFS|PS1|PS2|PS4|SHELLOPTS|GROUPS|DIRSTACK|HOSTTYPE|MACHTYPE|OSTYPE|UID|EUID|PATH|HOME|TERM|COMP_WORDBREAKS) continue ;;
  esac
  __lb_emit "$__lb_n"
done
"#;

/// Read the files the way ReaR does (in order, later wins), fenced as the
/// module documentation says.
pub fn evaluate(files: &[PathBuf]) -> Result<Evaluated> {
    let mut texts = Vec::new();
    for f in files {
        let t = std::fs::read_to_string(f)
            .with_context(|| format!("cannot read the ReaR configuration {}", f.display()))?;
        texts.push(t);
    }
    let host = crate::layout::hostname().unwrap_or_else(|| "localhost".into());
    let kver = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let empty = tempfile::tempdir()?;
    // By path: the child's PATH holds no programs.
    let bash = ["/bin/bash", "/usr/bin/bash"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .context("bash is not installed (/bin/bash); it reads the ReaR configuration")?;
    let mut cmd = Command::new(bash);
    cmd.env_clear()
        .env("PATH", empty.path())
        .env("HOME", empty.path())
        .env("LC_ALL", "C")
        .env("__lb_host", &host)
        .env("__lb_kver", &kver)
        .env("__lb_arrays", ARRAYS.join(" "))
        .current_dir(empty.path());
    for (k, v) in predefined(&host) {
        cmd.env(k, v);
    }
    cmd.args(["--noprofile", "--norc", "-c", SCRIPT, "lifeboat-import"])
        .args(&texts)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .context("cannot run bash to read the ReaR configuration (is bash installed?)")?;
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let ot = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let et = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("reading the ReaR configuration did not finish in 20 s (a loop, or something waiting?); nothing was written");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = ot.join().unwrap_or_default();
    let err = et.join().unwrap_or_default();
    if !status.success() {
        bail!("bash could not read the ReaR configuration ({status}):\n{err}");
    }
    // What the files printed themselves comes before the dump.
    const DUMP: &[u8] = b"\0LIFEBOAT-DUMP\0";
    let at = out
        .windows(DUMP.len())
        .rposition(|w| w == DUMP)
        .context("bash did not finish reading the ReaR configuration")?;
    let mut ev = Evaluated {
        vars: parse_dump(&out[at + DUMP.len()..])?,
        ..Default::default()
    };
    let printed = String::from_utf8_lossy(&out[..at]);
    for (k, part) in printed.split("\u{1}FILE:").skip(1).enumerate() {
        for p in not_run(part) {
            ev.messages.push(format!(
                "{}: `{p}` is not run while importing (its output is missing)",
                files
                    .get(k)
                    .map(|f| f.display().to_string())
                    .unwrap_or_default()
            ));
        }
    }
    // bash's complaints, with the file they came from.
    let mut file = None;
    for line in err.lines() {
        if let Some(k) = line
            .split("__lb_file_")
            .nth(1)
            .and_then(|r| r.split('_').next())
        {
            file = k.parse::<usize>().ok().and_then(|k| files.get(k - 1));
            continue;
        }
        let line = line.trim_start_matches("lifeboat-import: ");
        let line = line.strip_prefix("eval: ").unwrap_or(line);
        // The line numbers are the evaluating script's, not the file's.
        let line = match line.strip_prefix("line ").and_then(|r| r.split_once(": ")) {
            Some((n, rest)) if n.chars().all(|c| c.is_ascii_digit()) => rest,
            _ => line,
        };
        ev.messages.push(match file {
            Some(f) => format!("{}: {line}", f.display()),
            None => line.to_string(),
        });
    }
    Ok(ev)
}

/// The programs marked as not run in `text`.
pub fn not_run(text: &str) -> Vec<String> {
    text.split("\u{1}NOTRUN:")
        .skip(1)
        .filter_map(|r| r.split('\u{1}').next())
        .map(String::from)
        .collect()
}

fn parse_dump(out: &[u8]) -> Result<BTreeMap<String, Value>> {
    let mut it = out
        .split(|b| *b == 0)
        .map(|x| String::from_utf8_lossy(x).into_owned());
    let mut vars = BTreeMap::new();
    while let Some(kind) = it.next() {
        if kind.is_empty() {
            break;
        }
        let name = it.next().context("truncated variable dump")?;
        match kind.as_str() {
            "s" => {
                vars.insert(name, Value::Str(it.next().unwrap_or_default()));
            }
            "a" => {
                let n: usize = it.next().unwrap_or_default().parse().unwrap_or(0);
                let v: Vec<String> = (0..n).filter_map(|_| it.next()).collect();
                vars.insert(name, Value::Arr(v));
            }
            "h" => {
                vars.insert(name, Value::Arr(vec![]));
            }
            k => bail!("unexpected entry {k:?} in the variable dump"),
        }
    }
    Ok(vars)
}

/// One ReaR setting that was not carried over.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Unmapped {
    pub name: String,
    pub value: String,
    pub reason: String,
}

/// The result of an import.
#[derive(Debug, Default, Serialize)]
pub struct Imported {
    /// The Lifeboat configuration (TOML text).
    pub toml: String,
    /// ReaR variable → the Lifeboat key(s) it became.
    pub mapped: BTreeMap<String, String>,
    pub unmapped: Vec<Unmapped>,
    /// Notes on mapped settings that changed meaning on the way.
    pub notes: Vec<String>,
    /// From the mappings directory: the rescue network (network.json).
    #[serde(skip)]
    pub network: Option<NetworkConfig>,
    /// From the mappings directory: a disk mapping file's text.
    #[serde(skip)]
    pub disk_mapping: Option<String>,
}

/// Where the files the TOML refers to go.
pub struct Paths {
    pub network_file: PathBuf,
    pub disk_mapping_file: PathBuf,
}

/// The TOML being built: top-level keys, then `[section]`s, each key with
/// the ReaR setting it came from as a comment.
#[derive(Default)]
struct Out {
    sections: BTreeMap<&'static str, Vec<(String, toml::Value, String)>>,
}

impl Out {
    fn set(&mut self, section: &'static str, key: &str, v: toml::Value, from: &str) {
        let s = self.sections.entry(section).or_default();
        s.retain(|(k, _, _)| k != key);
        s.push((key.to_string(), v, from.to_string()));
    }

    fn render(&self, header: &str) -> String {
        let mut t = String::from(header);
        let order = [
            "",
            "rescue",
            "network",
            "ssh",
            "recover",
            "hooks",
            "external",
            "external.env",
        ];
        for sec in order {
            let Some(keys) = self.sections.get(sec) else {
                continue;
            };
            if !sec.is_empty() {
                t.push_str(&format!("\n[{sec}]\n"));
            }
            for (k, v, from) in keys {
                t.push_str(&format!("# ReaR: {from}\n"));
                let key = if k
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                {
                    k.clone()
                } else {
                    toml::Value::String(k.clone()).to_string()
                };
                t.push_str(&format!("{key} = {v}\n"));
            }
        }
        t
    }
}

fn s(v: &str) -> toml::Value {
    toml::Value::String(v.to_string())
}

fn list(v: &[String]) -> toml::Value {
    toml::Value::Array(v.iter().map(|x| s(x)).collect())
}

fn is_true(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" | "true" | "1" | "on" => Some(true),
        "n" | "no" | "false" | "0" | "off" | "" => Some(false),
        _ => None,
    }
}

/// A ReaR URL in Lifeboat's spelling, or why not.
fn url(name: &str, u: &str, backup: &str) -> std::result::Result<(String, Option<String>), String> {
    if u == "null" {
        return Err("OUTPUT_URL=null (do not copy the image anywhere) has no equivalent: Lifeboat always writes the image to OUTPUT_URL (default file:///var/lib/lifeboat/output)".into());
    }
    let Some((scheme, rest)) = u.split_once("://") else {
        return Err(format!("{u:?} is not a URL (scheme://...)"));
    };
    match scheme {
        "file" | "nfs" | "cifs" | "http" | "https" | "sftp" | "tape" => Ok((u.to_string(), None)),
        "iso" if name == "BACKUP_URL" => Ok(("iso://".to_string() + rest, None)),
        "usb" => {
            // ReaR: usb:///dev/disk/by-label/REAR-000 → Lifeboat: usb://LABEL
            let path = rest.trim_start_matches('/');
            if let Some(l) = path.strip_prefix("dev/disk/by-label/") {
                let (label, dir) = l.split_once('/').unwrap_or((l, ""));
                let mut out = format!("usb://{label}");
                if !dir.is_empty() {
                    out.push('/');
                    out.push_str(dir);
                }
                Ok((out, None))
            } else {
                Err(format!(
                    "{u:?} names the stick by device; Lifeboat finds it by its label: format it with `lifeboat format` and use usb://LABEL"
                ))
            }
        }
        "sshfs" => Ok((
            format!("sftp://{rest}"),
            Some(format!("{name}: sshfs:// became sftp:// (Lifeboat talks sftp itself, no FUSE mount)")),
        )),
        "rsync" if backup == "rsync" => {
            // ReaR's daemon form host::/module is Lifeboat's host::module.
            Ok((format!("rsync://{}", rest.replacen("::/", "::", 1)), None))
        }
        "rsync" => Err(format!("{name}=rsync:// is only a backup location of BACKUP=RSYNC in Lifeboat; copy the output yourself or use sftp://")),
        "ftp" | "ftps" => Err(format!("{scheme}:// is not supported; use sftp:// or http(s):// (WebDAV)")),
        "fish" | "davfs" | "s3" | "b2" => Err(format!("{scheme}:// is not supported; use sftp://, http(s):// (WebDAV), nfs:// or cifs://")),
        _ => Err(format!("unknown scheme {scheme}://")),
    }
}

/// Turn the evaluated variables (and the mapping files in `mappings`, when
/// given) into a Lifeboat configuration.
pub fn convert(
    vars: &BTreeMap<String, Value>,
    mappings: Option<&Path>,
    paths: &Paths,
    header: &str,
) -> Result<Imported> {
    let mut o = Out::default();
    let mut im = Imported::default();
    let mut done: BTreeSet<String> = BTreeSet::new();
    let unmapped = |name: &str, v: &Value, reason: &str, im: &mut Imported| {
        im.unmapped.push(Unmapped {
            name: name.to_string(),
            value: if is_secret(name) {
                "(hidden)".into()
            } else {
                v.show()
            },
            reason: reason.to_string(),
        });
    };
    // Values that needed a program: reported, never imported half-made.
    let mut vars = vars.clone();
    let tainted: Vec<(String, Value)> = vars
        .iter()
        .filter(|(_, v)| v.joined().contains("\u{1}NOTRUN:"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (k, v) in tainted {
        vars.remove(&k);
        let progs = not_run(&v.joined());
        let clean = |x: &str| {
            x.split('\u{1}')
                .filter(|p| !p.starts_with("NOTRUN:"))
                .collect::<String>()
        };
        let shown = match &v {
            Value::Str(x) => Value::Str(clean(x)),
            Value::Arr(a) => Value::Arr(a.iter().map(|x| clean(x)).collect()),
        };
        unmapped(
            &k,
            &shown,
            &format!(
                "its value needs `{}`, which import-rear does not run: set the Lifeboat key by hand",
                progs.join("`, `")
            ),
            &mut im,
        );
    }
    let vars = &vars;
    let get = |n: &str| vars.get(n);
    let str_of = |n: &str| vars.get(n).map(|v| v.joined()).unwrap_or_default();

    // BACKUP: the method.
    let mut backup = "tar".to_string();
    if let Some(v) = get("BACKUP") {
        done.insert("BACKUP".into());
        let m = v.joined();
        let lb = match m.as_str() {
            "NETFS" => Some("tar"),
            "RSYNC" => Some("rsync"),
            "BORG" => Some("borg"),
            "BAREOS" | "BACULA" => Some("bareos-fd"),
            "EXTERNAL" => Some("external"),
            _ => None,
        };
        match lb {
            Some(b) => {
                backup = b.to_string();
                o.set("", "backup", s(b), &format!("BACKUP={m}"));
                im.mapped.insert("BACKUP".into(), "backup".into());
                if m == "BACULA" {
                    im.notes.push("BACKUP=BACULA: mapped to the bareos-fd recipe; check its commands (bconsole) against your Bacula director".into());
                }
            }
            None => unmapped(
                "BACKUP",
                v,
                &format!("Lifeboat has no recipe for {m}: write one (see /usr/share/doc/lifeboat/recipes, e.g. bareos-fd.toml) in /etc/lifeboat/recipes/, or set BACKUP = \"external\" with [external] backup/check/restore commands"),
                &mut im,
            ),
        }
    }
    for (name, key) in [("BACKUP_URL", "backup_url"), ("OUTPUT_URL", "output_url")] {
        let Some(v) = get(name) else { continue };
        done.insert(name.into());
        let u = v.joined();
        if u.is_empty() {
            continue;
        }
        match url(name, &u, &backup) {
            Ok((lu, note)) => {
                o.set("", key, s(&lu), &format!("{name}={u}"));
                im.mapped.insert(name.into(), key.into());
                im.notes.extend(note);
            }
            Err(why) => unmapped(name, v, &why, &mut im),
        }
    }
    if backup == "borg" {
        // ReaR's BORGBACKUP_* settings make the repository URL.
        let host = str_of("BORGBACKUP_HOST");
        let repo = str_of("BORGBACKUP_REPO");
        if !repo.is_empty() {
            let user = str_of("BORGBACKUP_USERNAME");
            let port = str_of("BORGBACKUP_PORT");
            let r = if host.is_empty() {
                repo.clone()
            } else {
                format!(
                    "ssh://{}{host}{}/{}",
                    if user.is_empty() {
                        String::new()
                    } else {
                        format!("{user}@")
                    },
                    if port.is_empty() {
                        String::new()
                    } else {
                        format!(":{port}")
                    },
                    repo.trim_start_matches('/')
                )
            };
            o.set(
                "external.env",
                "BORG_REPO",
                s(&r),
                "BORGBACKUP_HOST/USERNAME/PORT/REPO",
            );
            for n in [
                "BORGBACKUP_HOST",
                "BORGBACKUP_REPO",
                "BORGBACKUP_USERNAME",
                "BORGBACKUP_PORT",
            ] {
                if vars.contains_key(n) {
                    done.insert(n.into());
                    im.mapped.insert(n.into(), "external.env.BORG_REPO".into());
                }
            }
        }
        if let Some(v) = get("BORGBACKUP_PASSPHRASE") {
            done.insert("BORGBACKUP_PASSPHRASE".into());
            unmapped("BORGBACKUP_PASSPHRASE", &Value::Str("(hidden)".into()), "a passphrase does not belong in a configuration file: write it to a file (mode 0600) and set [external.env] BORG_PASSCOMMAND = \"cat /etc/lifeboat/borg.pass\"", &mut im);
            let _ = v;
        }
    }
    if backup == "external" {
        for (n, k) in [
            ("EXTERNAL_BACKUP", "backup"),
            ("EXTERNAL_CHECK", "check"),
            ("EXTERNAL_RESTORE", "restore"),
        ] {
            if let Some(v) = get(n) {
                done.insert(n.into());
                o.set(
                    "external",
                    k,
                    s(&v.joined()),
                    &format!("{n}={}", v.joined()),
                );
                im.mapped.insert(n.into(), format!("external.{k}"));
            }
        }
        o.set("external", "name", s("rear-external"), "BACKUP=EXTERNAL");
    }
    if let Some(v) = get("BACKUP_TYPE") {
        done.insert("BACKUP_TYPE".into());
        let t = v.joined();
        match t.as_str() {
            "" => {}
            "incremental" | "differential" => {
                o.set("", "backup_type", s(&t), &format!("BACKUP_TYPE={t}"));
                im.mapped.insert("BACKUP_TYPE".into(), "backup_type".into());
            }
            _ => unmapped(
                "BACKUP_TYPE",
                v,
                "not incremental or differential (full is the default)",
                &mut im,
            ),
        }
    }
    simple_int(
        vars,
        &mut o,
        &mut im,
        &mut done,
        "FULLBACKUP_OUTDATED_DAYS",
        "",
        "backup_full_days",
    );
    simple_int(
        vars,
        &mut o,
        &mut im,
        &mut done,
        "ISO_MAX_SIZE",
        "",
        "iso_max_size",
    );
    if let Some(v) = get("BACKUP_OPTIONS") {
        // mount.cifs's cred= file is Lifeboat's backup_credentials (same
        // format); the other options stay mount options.
        done.insert("BACKUP_OPTIONS".into());
        let t = v.joined();
        let mut rest = vec![];
        for opt in t.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            match opt.split_once('=') {
                Some(("cred" | "credentials", f)) => {
                    o.set(
                        "",
                        "backup_credentials",
                        s(f),
                        &format!("BACKUP_OPTIONS={t}"),
                    );
                    im.notes.push(format!("BACKUP_OPTIONS: cred={f} became backup_credentials (the file stays where it is; set backup_credentials_in_image = true for unattended recovery)"));
                }
                _ => rest.push(opt),
            }
        }
        if !rest.is_empty() {
            o.set(
                "",
                "backup_mount_options",
                s(&rest.join(",")),
                &format!("BACKUP_OPTIONS={t}"),
            );
        }
        im.mapped.insert(
            "BACKUP_OPTIONS".into(),
            "backup_mount_options / backup_credentials".into(),
        );
    }
    for (n, sec, k) in [
        ("ISO_VOLID", "", "iso_volid"),
        ("KERNEL_CMDLINE", "", "kernel_cmdline"),
    ] {
        if let Some(v) = get(n) {
            done.insert(n.into());
            let t = v.joined();
            if !t.trim().is_empty() {
                o.set(sec, k, s(t.trim()), &format!("{n}={t}"));
                im.mapped.insert(n.into(), k.into());
            }
        }
    }
    if let Some(v) = get("OUTPUT") {
        done.insert("OUTPUT".into());
        let t = v.joined().to_ascii_uppercase();
        let lb = match t.as_str() {
            "ISO" | "USB" | "PXE" | "RAWDISK" | "OBDR" | "PORTABLE" => Some(t.clone()),
            "RAMDISK" => Some("initrd".into()),
            _ => None,
        };
        match lb {
            Some(l) => {
                o.set("", "output", s(&l), &format!("OUTPUT={t}"));
                im.mapped.insert("OUTPUT".into(), "output".into());
            }
            None => unmapped("OUTPUT", v, "unknown output kind (Lifeboat: ISO, USB, PXE, RAWDISK, UKI, PORTABLE, OBDR, initrd)", &mut im),
        }
    }
    if let Some(v) = get("ISO_DEFAULT") {
        done.insert("ISO_DEFAULT".into());
        let t = v.joined();
        match t.as_str() {
            "automatic" | "manual" => {
                o.set("", "iso_default", s(&t), &format!("ISO_DEFAULT={t}"));
                im.mapped.insert("ISO_DEFAULT".into(), "iso_default".into());
            }
            _ => unmapped("ISO_DEFAULT", v, "Lifeboat's boot menu defaults to automatic, manual or shell; booting the hard disk is a menu entry, not a default (left at manual)", &mut im),
        }
    }
    if let Some(v) = get("ISO_RECOVER_MODE") {
        done.insert("ISO_RECOVER_MODE".into());
        let t = v.joined();
        if t == "unattended" || t == "automatic" {
            o.set(
                "",
                "iso_default",
                s("automatic"),
                &format!("ISO_RECOVER_MODE={t}"),
            );
            im.mapped
                .insert("ISO_RECOVER_MODE".into(), "iso_default".into());
        } else if !t.is_empty() {
            unmapped(
                "ISO_RECOVER_MODE",
                v,
                "only unattended/automatic has an equivalent (iso_default = \"automatic\")",
                &mut im,
            );
        }
    }
    // Excludes: ReaR's are tar patterns on paths, as Lifeboat's.
    for n in ["BACKUP_PROG_EXCLUDE", "EXCLUDE_BACKUP"] {
        if let Some(v) = get(n) {
            done.insert(n.into());
            let w = v.words();
            if !w.is_empty() {
                let all = extend_key(&o, "", "backup_exclude", &w);
                o.set(
                    "",
                    "backup_exclude",
                    list(&all),
                    &format!("{n}={}", v.show()),
                );
                im.mapped.insert(n.into(), "backup_exclude".into());
            }
        }
    }
    if let Some(v) = get("BACKUP_PROG_COMPRESS_OPTIONS") {
        done.insert("BACKUP_PROG_COMPRESS_OPTIONS".into());
        let t = v.joined();
        let c = ["zstd", "xz", "gzip", "pigz"]
            .into_iter()
            .find(|c| t.contains(c));
        match c {
            Some(c) => {
                let c = if c == "pigz" { "gzip" } else { c };
                o.set(
                    "",
                    "backup_compression",
                    s(c),
                    &format!("BACKUP_PROG_COMPRESS_OPTIONS={}", v.show()),
                );
                im.mapped.insert(
                    "BACKUP_PROG_COMPRESS_OPTIONS".into(),
                    "backup_compression".into(),
                );
            }
            None if t.trim().is_empty() => {}
            None => unmapped(
                "BACKUP_PROG_COMPRESS_OPTIONS",
                v,
                "Lifeboat compresses with zstd, gzip or xz (backup_compression)",
                &mut im,
            ),
        }
    }
    if vars.contains_key("BACKUP_PROG_COMPRESS_SUFFIX") {
        // The suffix follows from the compressor.
        done.insert("BACKUP_PROG_COMPRESS_SUFFIX".into());
        im.mapped.insert(
            "BACKUP_PROG_COMPRESS_SUFFIX".into(),
            "(follows from backup_compression)".into(),
        );
    }
    // The rescue image.
    for (n, k) in [
        ("REQUIRED_PROGS", "programs"),
        ("PROGS", "optional_programs"),
        ("COPY_AS_IS", "copy_as_is"),
        ("COPY_AS_IS_EXCLUDE", "exclude"),
        ("EXCLUDE_MODULES", "exclude_modules"),
    ] {
        if let Some(v) = get(n) {
            done.insert(n.into());
            let w = v.words();
            if !w.is_empty() {
                o.set("rescue", k, list(&w), &format!("{n}={}", v.show()));
                im.mapped.insert(n.into(), format!("rescue.{k}"));
            }
        }
    }
    if let Some(v) = get("MODULES") {
        done.insert("MODULES".into());
        let w = v.words();
        let mut names = vec![];
        for m in &w {
            match m.as_str() {
                "all_modules" => {
                    o.set("rescue", "modules", s("generic"), "MODULES=( all_modules )")
                }
                "loaded_modules" => o.set(
                    "rescue",
                    "modules",
                    s("hostonly"),
                    "MODULES=( loaded_modules )",
                ),
                "no_modules" => o.set("rescue", "modules", s("none"), "MODULES=( no_modules )"),
                _ => names.push(m.clone()),
            }
        }
        if !names.is_empty() {
            o.set(
                "rescue",
                "add_modules",
                list(&names),
                &format!("MODULES={}", v.show()),
            );
        }
        if !w.is_empty() {
            im.mapped.insert(
                "MODULES".into(),
                "rescue.modules / rescue.add_modules".into(),
            );
        }
    }
    if let Some(v) = get("MODULES_LOAD") {
        done.insert("MODULES_LOAD".into());
        let w = v.words();
        if !w.is_empty() {
            let all = extend_key(&o, "rescue", "add_modules", &w);
            o.set(
                "rescue",
                "add_modules",
                list(&all),
                &format!("MODULES_LOAD={}", v.show()),
            );
            im.mapped
                .insert("MODULES_LOAD".into(), "rescue.add_modules".into());
            im.notes.push("MODULES_LOAD: the modules are in the image (rescue.add_modules); the rescue OS loads modules for the devices it finds, not a fixed list".into());
        }
    }
    if let Some(v) = get("FIRMWARE_FILES") {
        done.insert("FIRMWARE_FILES".into());
        let w = v.words();
        match w.first().map(|x| x.to_ascii_lowercase()) {
            None => {}
            Some(x) if is_true(&x) == Some(true) && w.len() == 1 => {
                o.set("rescue", "copy_as_is", list(&extend_key(&o, "rescue", "copy_as_is", &["/lib/firmware".to_string()])), "FIRMWARE_FILES=( yes )");
                im.mapped.insert("FIRMWARE_FILES".into(), "rescue.copy_as_is".into());
            }
            Some(x) if is_true(&x) == Some(false) && w.len() == 1 => unmapped("FIRMWARE_FILES", v, "Lifeboat always includes the firmware the included modules ask for; there is no switch to leave it out", &mut im),
            Some(_) => {
                let pats: Vec<String> = w
                    .iter()
                    .map(|p| {
                        if p.starts_with('/') {
                            p.clone()
                        } else {
                            format!("/lib/firmware/{}", p.trim_start_matches("*/"))
                        }
                    })
                    .collect();
                o.set("rescue", "copy_as_is", list(&extend_key(&o, "rescue", "copy_as_is", &pats)), &format!("FIRMWARE_FILES={}", v.show()));
                im.mapped.insert("FIRMWARE_FILES".into(), "rescue.copy_as_is".into());
                im.notes.push("FIRMWARE_FILES: patterns became rescue.copy_as_is entries under /lib/firmware (each must match a file when mkrescue runs)".into());
            }
        }
    }
    // Network of the rescue OS.
    if let Some(v) = get("USE_DHCLIENT") {
        done.insert("USE_DHCLIENT".into());
        match is_true(&v.joined()) {
            Some(true) => {
                o.set(
                    "network",
                    "capture",
                    toml::Value::Boolean(false),
                    &format!("USE_DHCLIENT={}", v.joined()),
                );
                im.mapped.insert(
                    "USE_DHCLIENT".into(),
                    "network.capture = false (DHCP on every NIC)".into(),
                );
            }
            Some(false) => {}
            None => unmapped("USE_DHCLIENT", v, "not a yes/no value", &mut im),
        }
    }
    if let Some(v) = get("USE_STATIC_NETWORKING") {
        done.insert("USE_STATIC_NETWORKING".into());
        if is_true(&v.joined()) == Some(true) {
            o.set(
                "network",
                "capture",
                toml::Value::Boolean(true),
                &format!("USE_STATIC_NETWORKING={}", v.joined()),
            );
            im.mapped
                .insert("USE_STATIC_NETWORKING".into(), "network.capture".into());
        }
    }
    // ssh.
    if let Some(v) = get("SSH_ROOT_PASSWORD") {
        done.insert("SSH_ROOT_PASSWORD".into());
        let p = v.joined();
        if !p.is_empty() {
            let hash = if ["$1$", "$5$", "$6$", "$y$", "$2b$"]
                .iter()
                .any(|x| p.starts_with(x))
            {
                p.clone()
            } else {
                im.notes.push("SSH_ROOT_PASSWORD: the plain password became a SHA-512 crypt hash (ssh.password_hash); remove the plain text from the ReaR configuration".into());
                crypt_sha512(&p)?
            };
            o.set(
                "ssh",
                "password_hash",
                s(&hash),
                "SSH_ROOT_PASSWORD=(hidden)",
            );
            im.mapped
                .insert("SSH_ROOT_PASSWORD".into(), "ssh.password_hash".into());
        }
    }
    // Hooks. ReaR evals the words of these arrays as one command line.
    for (n, k) in [
        ("PRE_RECOVERY_SCRIPT", "pre_recovery"),
        ("POST_RECOVERY_SCRIPT", "post_recovery"),
        ("PRE_BACKUP_SCRIPT", "pre_backup"),
        ("POST_BACKUP_SCRIPT", "post_backup"),
    ] {
        if let Some(v) = get(n) {
            done.insert(n.into());
            let c = v.joined();
            if !c.trim().is_empty() {
                o.set(
                    "hooks",
                    k,
                    list(&[c.trim().to_string()]),
                    &format!("{n}={}", v.show()),
                );
                im.mapped.insert(n.into(), format!("hooks.{k}"));
                if c.contains("TARGET_FS_ROOT") {
                    im.notes.push(format!("{n}: uses $TARGET_FS_ROOT; Lifeboat's hooks get the recovered system's root as $LIFEBOAT_TARGET (TARGET_FS_ROOT is not set): edit the command"));
                }
            }
        }
    }
    // Settings that are ReaR's own business, with the reason.
    let known: &[(&str, &str)] = &[
        ("BACKUP_PROG_CRYPT_ENABLED", "Lifeboat encrypts with age, not openssl: set backup_key_file to a file holding a passphrase (archives made by ReaR stay ReaR's)"),
        ("BACKUP_PROG_CRYPT_KEY", "a key does not belong in a configuration file: write it to a file (mode 0600) and set backup_key_file"),
        ("BACKUP_PROG", "Lifeboat runs GNU tar itself"),
        ("BACKUP_PROG_INCLUDE", "Lifeboat backs up every local filesystem of the layout; to leave some out, use backup_exclude"),
        ("NETFS_KEEP_OLD_BACKUP_COPY", "Lifeboat keeps every set in its own directory (<hostname>/<set id>); remove old sets yourself"),
        ("NETFS_PREFIX", "backups always go to <BACKUP_URL>/<hostname>/"),
        ("OUTPUT_PREFIX", "images always go to <OUTPUT_URL> (per host on USB)"),
        ("ISO_PREFIX", "the ISO is always named lifeboat.iso"),
        ("ISO_DIR", "the ISO goes to OUTPUT_URL (or mkrescue --output-dir)"),
        ("AUTOEXCLUDE_DISKS", "Lifeboat always leaves disks with nothing mounted out (layout_all_disks = true keeps them)"),
        ("AUTOEXCLUDE_MULTIPATH", "multipath is not supported yet"),
        ("AUTORESIZE_PARTITIONS", "recover.grow (last or proportional) decides how partitions grow"),
        ("EXCLUDE_MOUNTPOINTS", "leave a filesystem out with backup_exclude (its files) or unmount it before mkbackup"),
        ("EXCLUDE_VG", "every VG with a mounted LV is recreated; leave its files out with backup_exclude"),
        ("EXCLUDE_MD", "every md array in use is recreated"),
        ("EXCLUDE_RECREATE", "every device in use is recreated"),
        ("ONLY_INCLUDE_VG", "every VG with a mounted LV is recreated"),
        ("MIGRATION_MODE", "Lifeboat maps disks by identity and asks (or takes --map / lifeboat.map=) when they differ; there is no separate mode"),
        ("USE_RESOLV_CONF", "the captured DNS servers are used (network.capture)"),
        ("SSH_FILES", "the rescue sshd uses fresh host keys; authorized keys come from ssh.authorized_keys"),
        ("SSH_UNPROTECTED_PRIVATE_KEYS", "Lifeboat never copies private ssh keys into the image unless you list them in rescue.copy_as_is"),
        ("SSH_ROOT_PASSWORD_HASH", "use ssh.password_hash"),
        ("GRUB_RESCUE", "Lifeboat does not add a rescue entry to the system's GRUB; use OUTPUT = \"USB\" or a PXE/serve boot"),
        ("GRUB2_DEFAULT_BOOT", "the rescue boot menu default is iso_default"),
        ("USB_DEVICE", "the stick is found by its label (usb://LABEL)"),
        ("USB_RETAIN_BACKUP_NR", "usb_retain counts rescue images kept per host"),
        ("USB_DEVICE_FILESYSTEM_LABEL", "the label is the host part of usb://LABEL"),
        ("KEEP_BUILD_DIR", "mkrescue builds in a temporary directory it always removes"),
        ("REAR_INITRD_COMPRESSION", "set rescue.compression (zstd, xz, gzip, lz4, none)"),
        ("TIMESYNC", "the rescue OS does not set its clock"),
        ("PXE_TFTP_URL", "OUTPUT = \"PXE\" writes to OUTPUT_URL"),
        ("PXE_CONFIG_URL", "OUTPUT = \"PXE\" writes pxelinux.cfg next to the image in OUTPUT_URL"),
        ("PXE_TFTP_PREFIX", "file names in the PXE tree are fixed"),
        ("PXE_CREATE_LINKS", "per-MAC configurations are written for the captured NICs and pxe_macs"),
        ("PXE_REMOVE_OLD_LINKS", "the PXE tree is rewritten whole"),
        ("LIBS", "libraries come with the programs that need them (ELF dependency closure); list odd ones in rescue.copy_as_is"),
        ("CLONE_USERS", "the rescue OS has root only"),
        ("CLONE_GROUPS", "the rescue OS has root only"),
        ("CLONE_ALL_USERS_GROUPS", "the rescue OS has root only"),
        ("DISKS_TO_BE_WIPED", "Lifeboat writes exactly the mapped disks"),
        ("BACKUP_RSYNC_OPTIONS", "the rsync recipe's options are fixed; override [external] backup/restore for others"),
        ("BACKUP_PROG_COMPRESS_SUFFIX", ""),
    ];
    for (name, v) in vars {
        if done.contains(name) {
            continue;
        }
        let reason = known
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, r)| r.to_string())
            .unwrap_or_else(|| "no Lifeboat equivalent (see docs/coming-from-rear.md)".to_string());
        if reason.is_empty() {
            continue;
        }
        if name.starts_with("BORGBACKUP_") && backup != "borg" {
            unmapped(name, v, "BACKUP is not BORG", &mut im);
            continue;
        }
        unmapped(name, v, &reason, &mut im);
    }
    // The mapping files.
    if let Some(dir) = mappings.filter(|d| d.is_dir()) {
        let read = |n: &str| std::fs::read_to_string(dir.join(n)).ok();
        let ip = read("ip_addresses");
        let routes = read("routes");
        let macs = read("mac");
        if ip.is_some() || routes.is_some() || macs.is_some() {
            let net = network_from_mappings(ip.as_deref(), routes.as_deref(), macs.as_deref())
                .with_context(|| format!("in the ReaR mapping files of {}", dir.display()))?;
            o.set(
                "network",
                "file",
                s(&paths.network_file.to_string_lossy()),
                &format!("{}/{{ip_addresses,routes,mac}}", dir.display()),
            );
            o.set(
                "network",
                "capture",
                toml::Value::Boolean(false),
                "the mapping files replace the captured network",
            );
            im.mapped.insert(
                "mappings/ip_addresses, routes, mac".into(),
                "network.file".into(),
            );
            im.network = Some(net);
        }
        for n in ["disk_mappings", "disk_devices"] {
            if let Some(t) = read(n) {
                let pairs: Vec<String> = t
                    .lines()
                    .map(|l| l.split('#').next().unwrap_or("").trim())
                    .filter(|l| !l.is_empty())
                    .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
                    .collect();
                crate::migrate::parse_mapping(&pairs.join("\n"))
                    .with_context(|| format!("{}", dir.join(n).display()))?;
                im.disk_mapping = Some(pairs.join("\n") + "\n");
                o.set(
                    "recover",
                    "mapping",
                    s(&paths.disk_mapping_file.to_string_lossy()),
                    &format!("{}/{n}", dir.display()),
                );
                im.mapped
                    .insert(format!("mappings/{n}"), "recover.mapping".into());
                break;
            }
        }
        if read("lun_wwid").is_some() {
            im.unmapped.push(Unmapped {
                name: "mappings/lun_wwid".into(),
                value: String::new(),
                reason:
                    "multipath LUN mapping is not supported; map the disks with recover.mapping"
                        .into(),
            });
        }
    }
    im.unmapped.sort_by(|a, b| a.name.cmp(&b.name));
    let mut t = o.render(header);
    if !im.unmapped.is_empty() {
        t.push_str(
            "\n# Not imported (no Lifeboat equivalent; `lifeboat import-rear` listed them):\n",
        );
        for u in &im.unmapped {
            t.push_str(&format!("#   {}: {}\n", u.name, u.reason));
        }
    }
    im.toml = t;
    Ok(im)
}

/// Variables whose values are never repeated (report, TOML, console).
fn is_secret(name: &str) -> bool {
    ["PASS", "KEY", "SECRET", "TOKEN", "CRED"]
        .iter()
        .any(|w| name.contains(w))
}

fn extend_key(o: &Out, sec: &str, key: &str, more: &[String]) -> Vec<String> {
    let mut all: Vec<String> = o
        .sections
        .get(sec)
        .and_then(|k| k.iter().find(|(k, _, _)| k == key))
        .and_then(|(_, v, _)| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|x| x.as_str().map(String::from))
        .collect();
    for m in more {
        if !all.contains(m) {
            all.push(m.clone());
        }
    }
    all
}

fn simple_int(
    vars: &BTreeMap<String, Value>,
    o: &mut Out,
    im: &mut Imported,
    done: &mut BTreeSet<String>,
    name: &str,
    sec: &'static str,
    key: &str,
) {
    let Some(v) = vars.get(name) else { return };
    done.insert(name.into());
    let t = v.joined();
    if t.trim().is_empty() {
        return;
    }
    match t.trim().parse::<i64>() {
        Ok(n) if n >= 0 => {
            o.set(sec, key, toml::Value::Integer(n), &format!("{name}={t}"));
            im.mapped.insert(name.into(), key.into());
        }
        _ => im.unmapped.push(Unmapped {
            name: name.into(),
            value: if is_secret(name) {
                "(hidden)".into()
            } else {
                v.show()
            },
            reason: "not a whole number".into(),
        }),
    }
}

/// ReaR's `mappings/ip_addresses` (`eth0 192.168.1.10/24` or `eth0 dhcp`),
/// `mappings/routes` (`default 192.168.1.1 eth0`) and `mappings/mac`
/// (`old-mac new-mac eth0`) as the rescue OS's network configuration.
pub fn network_from_mappings(
    ip: Option<&str>,
    routes: Option<&str>,
    macs: Option<&str>,
) -> Result<NetworkConfig> {
    let lines = |t: Option<&str>| -> Vec<Vec<String>> {
        t.unwrap_or("")
            .lines()
            .map(|l| l.split('#').next().unwrap_or("").trim())
            .filter(|l| !l.is_empty())
            .map(|l| l.split_whitespace().map(String::from).collect())
            .collect()
    };
    let mut net = NetworkConfig::default();
    let iface = |net: &mut NetworkConfig, name: &str| -> usize {
        if let Some(k) = net.interfaces.iter().position(|i| i.name == name) {
            return k;
        }
        net.interfaces.push(NetInterface {
            name: name.to_string(),
            kind: NetKind::Ethernet,
            mac: None,
            addresses: vec![],
            mtu: None,
            dhcp: false,
        });
        net.interfaces.len() - 1
    };
    for (k, w) in lines(ip).iter().enumerate() {
        if w.len() < 2 {
            bail!(
                "ip_addresses line {}: expected `DEVICE ADDRESS/PREFIX` or `DEVICE dhcp`",
                k + 1
            );
        }
        let i = iface(&mut net, &w[0]);
        if w[1].eq_ignore_ascii_case("dhcp") {
            net.interfaces[i].dhcp = true;
        } else {
            let (a, p) = w[1]
                .split_once('/')
                .with_context(|| format!("ip_addresses line {}: {} has no /PREFIX", k + 1, w[1]))?;
            a.parse::<std::net::IpAddr>().with_context(|| {
                format!("ip_addresses line {}: {a} is not an IP address", k + 1)
            })?;
            p.parse::<u8>().with_context(|| {
                format!("ip_addresses line {}: /{p} is not a prefix length", k + 1)
            })?;
            net.interfaces[i].addresses.push(w[1].clone());
        }
    }
    for (k, w) in lines(routes).iter().enumerate() {
        if w.len() < 3 {
            bail!(
                "routes line {}: expected `DESTINATION GATEWAY DEVICE`",
                k + 1
            );
        }
        w[1].parse::<std::net::IpAddr>()
            .with_context(|| format!("routes line {}: {} is not a gateway address", k + 1, w[1]))?;
        iface(&mut net, &w[2]);
        net.routes.push(NetRoute {
            destination: if w[0] == "default" {
                "default".into()
            } else {
                w[0].clone()
            },
            gateway: Some(w[1].clone()),
            interface: w[2].clone(),
            metric: None,
        });
    }
    for (k, w) in lines(macs).iter().enumerate() {
        if w.len() < 3 {
            bail!("mac line {}: expected `OLD-MAC NEW-MAC DEVICE`", k + 1);
        }
        let i = iface(&mut net, &w[2]);
        net.interfaces[i].mac = Some(w[1].to_ascii_lowercase());
    }
    Ok(net)
}

/// A SHA-512 crypt(3) hash of `password` (openssl passwd -6).
fn crypt_sha512(password: &str) -> Result<String> {
    use std::io::Write;
    let mut c = Command::new("openssl")
        .args(["passwd", "-6", "-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run openssl to hash SSH_ROOT_PASSWORD (install openssl)")?;
    c.stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())?;
    let out = c.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "openssl passwd failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(text: &str) -> Evaluated {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("local.conf");
        std::fs::write(&f, text).unwrap();
        evaluate(&[f]).unwrap()
    }

    #[test]
    fn bash_reads_arrays_appends_and_self_references() {
        let ev = eval(
            "OUTPUT=ISO\nBACKUP_PROG_EXCLUDE=( \"${BACKUP_PROG_EXCLUDE[@]}\" '/mnt/*' \"/var/tmp/a b\" )\n\
             BACKUP_PROG_EXCLUDE+=( /srv/cache )\nCOPY_AS_IS=( \"${COPY_AS_IS[@]}\" /etc/x )\nX=\"$VAR_DIR/y\"\n\
             H=$(hostname -s)\nEMPTY=\n",
        );
        assert_eq!(ev.vars["OUTPUT"], Value::Str("ISO".into()));
        assert_eq!(
            ev.vars["BACKUP_PROG_EXCLUDE"],
            Value::Arr(vec![
                "/mnt/*".into(),
                "/var/tmp/a b".into(),
                "/srv/cache".into()
            ])
        );
        assert_eq!(ev.vars["X"], Value::Str("/var/lib/rear/y".into()));
        assert!(!ev.vars["H"].joined().is_empty());
        assert_eq!(ev.vars["EMPTY"], Value::Str(String::new()));
        // Untouched predefinitions are not reported.
        assert!(
            !ev.vars.contains_key("PROGS") && !ev.vars.contains_key("VAR_DIR"),
            "{:?}",
            ev.vars
        );
    }

    #[test]
    fn the_evaluation_cannot_write_files_or_run_programs() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        let ev = eval(&format!(
            "echo x > {v}\nA=$(/bin/touch {v}; echo ran)\nB=$(touch {v}2)\ncd /tmp\nexec /bin/true\nC=after\n",
            v = victim.display()
        ));
        assert!(!victim.exists() && !d.path().join("victim2").exists());
        assert_eq!(ev.vars["C"], Value::Str("after".into()));
        assert!(
            ev.messages.iter().any(|m| m.contains("restricted")),
            "{:?}",
            ev.messages
        );
        // The value that needed a program is marked, not silently empty.
        assert_eq!(not_run(&ev.vars["B"].joined()), ["touch"]);
    }

    #[test]
    fn a_looping_configuration_is_stopped() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("local.conf");
        std::fs::write(&f, "while :; do :; done\n").unwrap();
        let e = evaluate(&[f]).unwrap_err();
        assert!(format!("{e}").contains("did not finish"), "{e}");
    }

    #[test]
    fn mapping_files_become_a_network_configuration() {
        let n = network_from_mappings(
            Some("eth0 192.168.1.10/24\neth1 dhcp\n"),
            Some("default 192.168.1.1 eth0\n10.0.0.0/8 192.168.1.254 eth0\n"),
            Some("52:54:00:aa:bb:cc 52:54:00:11:22:33 eth0\n"),
        )
        .unwrap();
        assert_eq!(n.interfaces.len(), 2);
        assert_eq!(n.interfaces[0].addresses, ["192.168.1.10/24"]);
        assert_eq!(n.interfaces[0].mac.as_deref(), Some("52:54:00:11:22:33"));
        assert!(n.interfaces[1].dhcp);
        assert_eq!(n.routes.len(), 2);
        let e = network_from_mappings(Some("eth0 192.168.1.300/24\n"), None, None).unwrap_err();
        assert!(format!("{e:#}").contains("line 1"), "{e:#}");
    }

    #[test]
    fn urls_are_respelled_or_refused_with_a_reason() {
        assert_eq!(
            url("BACKUP_URL", "usb:///dev/disk/by-label/REAR-000", "tar")
                .unwrap()
                .0,
            "usb://REAR-000"
        );
        assert_eq!(
            url("BACKUP_URL", "sshfs://u@h/srv/b", "tar").unwrap().0,
            "sftp://u@h/srv/b"
        );
        assert_eq!(
            url("BACKUP_URL", "rsync://u@h::/mod", "rsync").unwrap().0,
            "rsync://u@h::mod"
        );
        assert!(url("OUTPUT_URL", "null", "tar").is_err());
        assert!(url("BACKUP_URL", "usb:///dev/sdb1", "tar")
            .unwrap_err()
            .contains("label"));
    }
}
