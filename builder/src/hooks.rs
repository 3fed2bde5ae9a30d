//! Hooks: the user's commands before and after `mkbackup` and `recover`
//! (`[hooks]` in the configuration; ReaR's PRE/POST_RECOVERY_SCRIPT).
//!
//! Each entry is one command line for `sh -c`, run in order with stdin
//! closed and its output on ours. A pre hook that fails stops the workflow
//! before it has done anything; a post hook runs whether the workflow
//! worked or not (`LIFEBOAT_RESULT`) and its failure is reported as one.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

/// Which hook list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    PreBackup,
    PostBackup,
    PreRecovery,
    PostRecovery,
}

impl Hook {
    pub fn name(self) -> &'static str {
        match self {
            Hook::PreBackup => "pre_backup",
            Hook::PostBackup => "post_backup",
            Hook::PreRecovery => "pre_recovery",
            Hook::PostRecovery => "post_recovery",
        }
    }

    fn workflow(self) -> &'static str {
        match self {
            Hook::PreBackup | Hook::PostBackup => "mkbackup",
            Hook::PreRecovery | Hook::PostRecovery => "recover",
        }
    }

    pub fn commands(self, h: &crate::config::Hooks) -> &[String] {
        match self {
            Hook::PreBackup => &h.pre_backup,
            Hook::PostBackup => &h.post_backup,
            Hook::PreRecovery => &h.pre_recovery,
            Hook::PostRecovery => &h.post_recovery,
        }
    }
}

/// The environment every hook gets (besides the inherited one).
pub struct HookEnv<'a> {
    pub hostname: &'a str,
    pub backup_url: Option<&'a str>,
    /// Recovery: where the recovered system is (or will be) mounted.
    pub target: Option<&'a Path>,
    /// Post hooks: the workflow's error, None when it worked.
    pub error: Option<String>,
}

pub fn environment(hook: Hook, c: &HookEnv) -> BTreeMap<String, String> {
    let mut e = BTreeMap::new();
    e.insert("LIFEBOAT_HOOK".to_string(), hook.name().to_string());
    e.insert("LIFEBOAT_WORKFLOW".into(), hook.workflow().into());
    e.insert("LIFEBOAT_HOSTNAME".into(), c.hostname.into());
    e.insert(
        "LIFEBOAT_BACKUP_URL".into(),
        c.backup_url.unwrap_or("").into(),
    );
    if let Some(t) = c.target {
        e.insert("LIFEBOAT_TARGET".into(), t.to_string_lossy().into_owned());
    }
    if matches!(hook, Hook::PostBackup | Hook::PostRecovery) {
        let (r, msg) = match &c.error {
            None => ("success", String::new()),
            Some(m) => ("failure", m.clone()),
        };
        e.insert("LIFEBOAT_RESULT".into(), r.into());
        e.insert("LIFEBOAT_ERROR".into(), msg);
    }
    e
}

/// Run every command of `hook` in order; stop at the first that fails.
/// `say` gets one line per command (the console and the workflow's log).
pub fn run(
    hook: Hook,
    hooks: &crate::config::Hooks,
    c: &HookEnv,
    say: &mut dyn FnMut(&str),
) -> Result<()> {
    let env = environment(hook, c);
    for cmd in hook.commands(hooks) {
        say(&format!("lifeboat: {} hook: {cmd}", hook.name()));
        use std::os::unix::process::CommandExt;
        let mut child = Command::new("sh")
            .args(["-c", cmd])
            .envs(&env)
            .stdin(Stdio::null())
            // Its own process group: a timeout stops everything it started.
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot run the {} hook `{cmd}`", hook.name()))?;
        let st = wait_limited(&mut child, hooks.timeout).with_context(|| {
            format!(
                "the {} hook `{cmd}` did not finish in {} s (hooks.timeout) and was stopped; \
                 fix it, or raise hooks.timeout",
                hook.name(),
                hooks.timeout
            )
        })?;
        if !st.success() {
            bail!(
                "the {} hook `{cmd}` failed ({st}); fix it or remove it from [hooks] {} in the configuration",
                hook.name(),
                hook.name()
            );
        }
    }
    Ok(())
}

/// Wait for `child`, at most `secs` seconds (0: no limit); after that its
/// process group gets SIGTERM, then SIGKILL 5 s later, and this is an error.
fn wait_limited(child: &mut std::process::Child, secs: u64) -> Result<std::process::ExitStatus> {
    if secs == 0 {
        return Ok(child.wait()?);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        if std::time::Instant::now() >= deadline {
            let pg = -(child.id() as i32);
            unsafe { libc::kill(pg, libc::SIGTERM) };
            let grace = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while child.try_wait()?.is_none() && std::time::Instant::now() < grace {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            unsafe { libc::kill(pg, libc::SIGKILL) };
            let _ = child.wait();
            bail!("stopped after {secs} s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Scripts the recovery hooks name by absolute path (the first word of a
/// command), which the rescue image must carry.
pub fn recovery_scripts(hooks: &crate::config::Hooks) -> Vec<String> {
    hooks
        .pre_recovery
        .iter()
        .chain(&hooks.post_recovery)
        .filter_map(|c| c.split_whitespace().next())
        .filter(|w| w.starts_with('/') && Path::new(w).is_file())
        .map(String::from)
        .collect()
}

/// Run `work` between the pre and post hooks of a workflow: the pre hooks
/// first (their failure is returned, and `work` does not run), then `work`,
/// then the post hooks with its result. The workflow's own error wins over
/// a post hook's; a post hook failing after a good run is the error.
pub fn around<T>(
    pre: Hook,
    post: Hook,
    hooks: &crate::config::Hooks,
    c: HookEnv,
    work: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let mut say = |l: &str| eprintln!("{l}");
    run(pre, hooks, &c, &mut say).context(match pre {
        Hook::PreBackup => "nothing was backed up",
        _ => "nothing was written",
    })?;
    let res = work();
    let c = HookEnv {
        error: res.as_ref().err().map(|e| format!("{e:#}")),
        ..c
    };
    let post_res = run(post, hooks, &c, &mut say);
    match (res, post_res) {
        (Ok(v), Ok(())) => Ok(v),
        (Ok(_), Err(e)) => Err(e.context(format!(
            "{} itself worked, but its post hook failed",
            post.workflow()
        ))),
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(pe)) => {
            eprintln!("lifeboat: {pe:#}");
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Hooks;

    fn ctx(error: Option<&str>) -> HookEnv<'static> {
        HookEnv {
            hostname: "h1",
            backup_url: Some("file:///b"),
            target: None,
            error: error.map(String::from),
        }
    }

    #[test]
    fn hooks_run_in_order_with_their_environment() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("log");
        let l = log.display();
        let hooks = Hooks {
            pre_backup: vec![format!(
                "echo \"pre $LIFEBOAT_HOOK $LIFEBOAT_WORKFLOW $LIFEBOAT_HOSTNAME $LIFEBOAT_BACKUP_URL\" >> {l}"
            )],
            post_backup: vec![
                format!("echo \"post $LIFEBOAT_RESULT [$LIFEBOAT_ERROR]\" >> {l}"),
                format!("echo second >> {l}"),
            ],
            ..Default::default()
        };
        let v = around(Hook::PreBackup, Hook::PostBackup, &hooks, ctx(None), || {
            std::fs::write(d.path().join("work"), "x")?;
            Ok(7)
        })
        .unwrap();
        assert_eq!(v, 7);
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "pre pre_backup mkbackup h1 file:///b\npost success []\nsecond\n"
        );
        // A failing workflow: the post hook hears about it, the error stays.
        std::fs::remove_file(&log).unwrap();
        let e = around(Hook::PreBackup, Hook::PostBackup, &hooks, ctx(None), || {
            anyhow::bail!("disk full") as Result<()>
        })
        .unwrap_err();
        assert_eq!(format!("{e}"), "disk full");
        assert!(std::fs::read_to_string(&log)
            .unwrap()
            .contains("post failure [disk full]"));
    }

    #[test]
    fn a_hook_over_its_time_limit_is_stopped_with_what_it_started() {
        let d = tempfile::tempdir().unwrap();
        let pidf = d.path().join("child.pid");
        // The hook starts a child of its own and hangs.
        let hooks = Hooks {
            pre_backup: vec![format!("sleep 300 & echo $! > {}; wait", pidf.display())],
            timeout: 1,
            ..Default::default()
        };
        let t = std::time::Instant::now();
        let mut ran = false;
        let e = around(Hook::PreBackup, Hook::PostBackup, &hooks, ctx(None), || {
            ran = true;
            Ok(())
        })
        .unwrap_err();
        assert!(!ran, "the backup ran after a hung pre hook");
        assert!(t.elapsed() < std::time::Duration::from_secs(20));
        let msg = format!("{e:#}");
        assert!(
            msg.contains("did not finish in 1 s (hooks.timeout)"),
            "{msg}"
        );
        // The hook's own child went with it.
        let pid: i32 = std::fs::read_to_string(&pidf)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false);
        assert!(!alive, "the hook's child {pid} is still running");
    }

    #[test]
    fn a_failing_pre_hook_stops_the_work_and_a_failing_post_hook_is_an_error() {
        let hooks = Hooks {
            pre_recovery: vec!["exit 3".into()],
            ..Default::default()
        };
        let mut ran = false;
        let e = around(
            Hook::PreRecovery,
            Hook::PostRecovery,
            &hooks,
            ctx(None),
            || {
                ran = true;
                Ok(())
            },
        )
        .unwrap_err();
        assert!(!ran);
        let msg = format!("{e:#}");
        assert!(
            msg.contains("pre_recovery hook `exit 3` failed")
                && msg.contains("exit status: 3")
                && msg.contains("nothing was written"),
            "{msg}"
        );
        let hooks = Hooks {
            post_backup: vec!["true".into(), "false".into()],
            ..Default::default()
        };
        let e = around(Hook::PreBackup, Hook::PostBackup, &hooks, ctx(None), || {
            Ok(())
        })
        .unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("mkbackup itself worked") && msg.contains("post_backup hook `false`"),
            "{msg}"
        );
    }

    #[test]
    fn recovery_scripts_are_the_absolute_paths_that_exist() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path().join("notify.sh");
        std::fs::write(&s, "#!/bin/sh\n").unwrap();
        let hooks = Hooks {
            pre_recovery: vec![format!("{} --start", s.display()), "echo hi".into()],
            post_recovery: vec!["/nonexistent/x".into()],
            ..Default::default()
        };
        assert_eq!(recovery_scripts(&hooks), vec![s.display().to_string()]);
    }
}
