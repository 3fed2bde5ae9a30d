//! lifeboat-init: PID 1 of the Lifeboat rescue OS.
//!
//! In order: mount the API filesystems, set up the console and the log,
//! read the kernel command line and /etc/lifeboat/init.json, load drivers
//! for the devices present (coldplug + uevents), wait for the disks the plan
//! needs, bring the network up (ip=, else the host's captured setup, else
//! DHCP), start sshd, put a root shell on every console and announce
//! `lifeboat: ready`. Then reap orphans and handle reboot/poweroff signals.
//! It never panics out: a failure is reported with what to do, and the
//! emergency shell (or, unattended, a reboot) follows.

mod cmdline;
mod coldplug;
mod disks;
mod log;
mod net;
mod ssh;

use cmdline::{Cmdline, Recover};
use lifeboat_contract::{FailurePolicy, InitConfig, INIT_CONFIG_PATH, INIT_CONFIG_SCHEMA_VERSION};
use log::log;
use std::collections::HashMap;
use std::ffi::CString;
use std::time::Duration;

fn mount(src: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) {
    let _ = std::fs::create_dir_all(target);
    let c = |s: &str| CString::new(s).unwrap();
    let (s, t, f, d) = (c(src), c(target), c(fstype), c(data));
    let rc = unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            f.as_ptr(),
            flags,
            d.as_ptr() as *const libc::c_void,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            log(&format!("cannot mount {fstype} on {target}: {e}"));
        }
    }
}

fn setup_console() {
    let c = CString::new("/dev/console").unwrap();
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
    if fd >= 0 {
        unsafe {
            libc::dup2(fd, 0);
            libc::dup2(fd, 1);
            libc::dup2(fd, 2);
            if fd > 2 {
                libc::close(fd);
            }
        }
    }
}

fn running_kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Terminal devices to put a shell on.
fn shell_consoles(cmd: &Cmdline) -> Vec<String> {
    let list: Vec<String> = match &cmd.shell_console {
        Some(c) => vec![c.clone()],
        None => cmd.consoles.clone(),
    };
    let mut out: Vec<String> = Vec::new();
    for c in list {
        let dev = if c == "tty0" { "tty1".to_string() } else { c };
        let path = format!("/dev/{dev}");
        if std::path::Path::new(&path).exists() && !out.contains(&path) {
            out.push(path);
        }
    }
    if out.is_empty() {
        out.push("/dev/console".into());
    }
    out
}

/// Fork a child in a new session with the default signal mask. Returns
/// Some(pid) in the parent, Some(0) in the child, None when fork failed.
pub(crate) fn fork_session(what: &str) -> Option<libc::pid_t> {
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        log(&format!(
            "cannot fork for {what}: {}",
            std::io::Error::last_os_error()
        ));
        return None;
    }
    if pid == 0 {
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            libc::setsid();
        }
    }
    Some(pid)
}

/// Start a login shell on `tty` in its own session with the terminal as its
/// controlling TTY, so job control and Ctrl-C work.
fn spawn_shell(shell: &str, tty: &str) -> Option<libc::pid_t> {
    spawn_on_tty(shell, tty, None)
}

/// Run `argv` (or a login shell when `None`) on `tty` as its controlling terminal.
fn spawn_on_tty(shell: &str, tty: &str, argv: Option<&[&str]>) -> Option<libc::pid_t> {
    match fork_session("a shell")? {
        0 => {}
        pid => return Some(pid),
    }
    unsafe {
        let t = CString::new(tty).unwrap();
        let fd = libc::open(t.as_ptr(), libc::O_RDWR);
        if fd >= 0 {
            libc::ioctl(fd, libc::TIOCSCTTY, 1);
            libc::dup2(fd, 0);
            libc::dup2(fd, 1);
            libc::dup2(fd, 2);
            if fd > 2 {
                libc::close(fd);
            }
        }
    }
    let _ = std::env::set_current_dir("/root");
    let env: Vec<CString> = [
        "HOME=/root",
        "TERM=linux",
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "SHELL=/bin/bash",
        "USER=root",
        "LOGNAME=root",
    ]
    .iter()
    .map(|s| CString::new(*s).unwrap())
    .collect();
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|c| c.as_ptr()).collect();
    envp.push(std::ptr::null());
    if let Some(args) = argv {
        let c: Vec<CString> = args.iter().map(|a| CString::new(*a).unwrap()).collect();
        let mut v: Vec<*const libc::c_char> = c.iter().map(|a| a.as_ptr()).collect();
        v.push(std::ptr::null());
        unsafe { libc::execve(c[0].as_ptr(), v.as_ptr(), envp.as_ptr()) };
        unsafe { libc::_exit(127) }
    }
    for sh in [shell, "/bin/sh"] {
        let path = CString::new(sh).unwrap();
        let arg0 = CString::new(format!("-{}", sh.rsplit('/').next().unwrap_or("sh"))).unwrap();
        let argv = [arg0.as_ptr(), std::ptr::null()];
        unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    }
    unsafe { libc::_exit(127) }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Shutdown {
    Reboot,
    PowerOff,
    Halt,
}

fn shutdown(how: Shutdown) -> ! {
    log(&format!(
        "{how:?}: stopping processes, syncing and unmounting"
    ));
    unsafe {
        libc::kill(-1, libc::SIGTERM);
    }
    std::thread::sleep(Duration::from_millis(1000));
    unsafe {
        libc::kill(-1, libc::SIGKILL);
        libc::sync();
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    for line in mounts.lines().rev() {
        let mut f = line.split_whitespace();
        let (_, Some(target)) = (f.next(), f.next()) else {
            continue;
        };
        if matches!(target, "/" | "/proc" | "/sys" | "/dev") {
            continue;
        }
        if let Ok(t) = CString::new(target) {
            unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
        }
    }
    unsafe {
        libc::sync();
        let cmd = match how {
            Shutdown::Reboot => libc::RB_AUTOBOOT,
            Shutdown::PowerOff => libc::RB_POWER_OFF,
            Shutdown::Halt => libc::RB_HALT_SYSTEM,
        };
        libc::reboot(cmd);
    }
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

fn load_config() -> InitConfig {
    let default = || InitConfig {
        schema_version: INIT_CONFIG_SCHEMA_VERSION,
        kver: running_kernel(),
        hostname: "lifeboat".into(),
        shell: "/bin/bash".into(),
        network: Default::default(),
        ssh: Default::default(),
        disks: vec![],
        disk_timeout_secs: 30,
        on_failure: FailurePolicy::Shell,
    };
    match std::fs::read_to_string(format!("/{INIT_CONFIG_PATH}")) {
        Ok(text) => match InitConfig::from_json(&text) {
            Ok(c) => c,
            Err(e) => {
                log(&format!("ERROR: cannot use /{INIT_CONFIG_PATH}: {e}; continuing with defaults (DHCP, no plan)"));
                default()
            }
        },
        Err(e) => {
            log(&format!(
                "no /{INIT_CONFIG_PATH} ({e}); continuing with defaults (DHCP, no plan)"
            ));
            default()
        }
    }
}

/// Report a fatal problem; unattended with a reboot policy, reboot after
/// the delay, otherwise continue into the emergency shell.
fn fatal(what: &str, todo: &str, cfg: &InitConfig, cmd: &Cmdline) {
    log(&format!("ERROR: {what}"));
    log(&format!("what to do: {todo}"));
    if let (Recover::Auto, FailurePolicy::Reboot { after_secs }) = (cmd.recover, cfg.on_failure) {
        log(&format!(
            "unattended: rebooting in {after_secs} s (boot.on_failure = reboot)"
        ));
        std::thread::sleep(Duration::from_secs(after_secs as u64));
        shutdown(Shutdown::Reboot);
    }
    log("emergency shell: the rescue system is usable, but recovery will not start by itself");
}

/// Wait for the disks the plan needs; false (after reporting) when some
/// did not appear.
fn wait_disks(cfg: &InitConfig, cmd: &Cmdline) -> bool {
    if cfg.disks.is_empty() {
        return true;
    }
    let Err(missing) = disks::wait(
        &cfg.disks,
        Duration::from_secs(cfg.disk_timeout_secs as u64),
    ) else {
        return true;
    };
    let list: Vec<String> = missing.iter().map(disks::describe).collect();
    let present: Vec<String> = disks::scan()
        .iter()
        .filter(|d| d.size_bytes > 0)
        .map(|d| {
            format!(
                "{} ({} bytes{})",
                d.name,
                d.size_bytes,
                d.serial
                    .as_ref()
                    .map(|s| format!(", serial {s}"))
                    .unwrap_or_default()
            )
        })
        .collect();
    fatal(
        &format!(
            "disk(s) needed by the recovery plan did not appear within {} s: {}",
            cfg.disk_timeout_secs,
            list.join("; ")
        ),
        &format!(
            "check cabling, controller and its driver (lsmod, dmesg); disks present: {}",
            if present.is_empty() {
                "none".to_string()
            } else {
                present.join(", ")
            }
        ),
        cfg,
        cmd,
    );
    false
}

fn set_hostname(name: &str) {
    let h = CString::new(name).unwrap_or_default();
    unsafe { libc::sethostname(h.as_ptr(), name.len()) };
}

/// Load the chained layers (lifeboat.layers= / lifeboat.chain=) with the
/// static lifeboat of the base layer, on the console (it may ask for the
/// host's token there).
fn fetch_layers() -> Result<(), String> {
    let t = std::time::Instant::now();
    let st = std::process::Command::new("/usr/bin/lifeboat")
        .arg("fetch-layers")
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .status()
        .map_err(|e| format!("cannot run /usr/bin/lifeboat fetch-layers: {e}"))?;
    if st.success() {
        log(&format!(
            "fetch-layers done in {:.2} s",
            t.elapsed().as_secs_f64()
        ));
        Ok(())
    } else {
        Err(format!("lifeboat fetch-layers failed ({st})"))
    }
}

fn main() {
    std::panic::set_hook(Box::new(|info| {
        log(&format!("internal error: {info}; continuing"));
    }));
    setup_console();
    mount(
        "proc",
        "/proc",
        "proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    );
    mount(
        "sysfs",
        "/sys",
        "sysfs",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    );
    mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755");
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "gid=5,mode=620,ptmxmode=666",
    );
    mount(
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    );
    mount(
        "tmpfs",
        "/run",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=0755",
    );
    mount(
        "tmpfs",
        "/tmp",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    );
    if std::path::Path::new("/sys/firmware/efi/efivars").exists() {
        mount(
            "efivarfs",
            "/sys/firmware/efi/efivars",
            "efivarfs",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            "",
        );
    }
    let _ = std::fs::create_dir_all("/run/lifeboat");
    setup_console();
    // Signals are taken synchronously in the main loop.
    let mut sigs: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigemptyset(&mut sigs);
        for s in [
            libc::SIGCHLD,
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGHUP,
        ] {
            libc::sigaddset(&mut sigs, s);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &sigs, std::ptr::null_mut());
        // Ctrl-Alt-Del becomes SIGINT for us instead of an instant reset.
        libc::reboot(libc::RB_DISABLE_CAD);
    }

    let cmd = cmdline::parse(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    log::DEBUG.store(cmd.debug, std::sync::atomic::Ordering::Relaxed);
    log(&format!(
        "lifeboat-init {} starting",
        env!("CARGO_PKG_VERSION")
    ));
    for w in &cmd.warnings {
        log(&format!("kernel command line: {w}"));
    }
    let mut cfg = load_config();
    set_hostname(&cfg.hostname);
    let running = running_kernel();
    if cfg.kver != running {
        log(&format!(
            "WARNING: this image was built for kernel {} but kernel {running} is running; its modules will not \
             load. Boot the kernel that came with the image.",
            cfg.kver
        ));
    }

    let t = std::time::Instant::now();
    let n = coldplug::run(Duration::from_millis(400), Duration::from_secs(15));
    log(&format!(
        "loaded {n} driver module(s) in {:.2} s",
        t.elapsed().as_secs_f64()
    ));

    let mut failed = false;
    if cmd.shell {
        log("lifeboat.shell: stopping at a shell before network and recovery");
    } else {
        // Chained layers (lifeboat serve) bring the plan: its disks are
        // waited for once they are there.
        let chaining = !cmd.layers.is_empty() || cmd.chain.is_some();
        if !chaining {
            failed |= !wait_disks(&cfg, &cmd);
        }
        // Virtual devices the captured setup needs: their drivers are not
        // coldplugged by any hardware.
        let mut extra = Vec::new();
        for i in &cfg.network.interfaces {
            match i.kind {
                lifeboat_contract::NetKind::Bond { .. } => extra.push("bonding"),
                lifeboat_contract::NetKind::Vlan { .. } => extra.push("8021q"),
                lifeboat_contract::NetKind::Bridge { .. } => extra.push("bridge"),
                lifeboat_contract::NetKind::Ethernet => {}
            }
        }
        coldplug::load_names(&extra);
        match net::bring_up(&cfg.network, &cmd, &cfg.hostname) {
            Ok(lines) => {
                for l in lines {
                    log(&format!("network: {l}"));
                }
            }
            Err(e) => log(&format!(
                "network: not configured: {e}; continuing without network"
            )),
        }
        for l in net::report() {
            log(&format!("address: {l}"));
        }
        if chaining && !failed {
            match fetch_layers() {
                Ok(()) => {
                    cfg = load_config();
                    set_hostname(&cfg.hostname);
                    let t = std::time::Instant::now();
                    let n = coldplug::run(Duration::from_millis(400), Duration::from_secs(15));
                    log(&format!(
                        "chained layers loaded; {n} more driver module(s) in {:.2} s; host {}",
                        t.elapsed().as_secs_f64(),
                        cfg.hostname
                    ));
                    failed |= !wait_disks(&cfg, &cmd);
                }
                Err(e) => {
                    fatal(
                        &format!("the chained layers could not be loaded: {e}"),
                        "read the message above: a refused token needs lifeboat.token=<the host's token>; a sha256 \
                         mismatch means the server's copy differs from the registered one (register the host again); \
                         a network failure needs the server reachable. Then reboot",
                        &cfg,
                        &cmd,
                    );
                    failed = true;
                }
            }
        }
    }

    // sshd starts in its own process: generating host keys can wait for
    // the kernel's entropy, and the console shell must not.
    let ssh_on = cmd.ssh.unwrap_or(cfg.ssh.enabled) && !cmd.shell;
    let mut sshd_pid = if ssh_on { ssh::start(&cfg.ssh) } else { None };

    if !cmd.debug {
        // Keep kernel chatter from scribbling over the shell prompt.
        let _ = std::fs::write("/proc/sys/kernel/printk", "4");
    }
    let consoles = shell_consoles(&cmd);
    let has_plan = std::path::Path::new("/")
        .join(lifeboat_contract::RESCUE_BACKUP_PATH)
        .is_file();
    // Unattended recovery runs instead of a shell on the primary console:
    // the last console= (the kernel's /dev/console), so a boot menu's
    // "serial console" entry shows it on the serial line.
    let mut recovery: Option<(libc::pid_t, String)> = None;
    if cmd.recover == Recover::Auto && has_plan && !failed {
        if let Some(c) = consoles.last() {
            log(&format!(
                "lifeboat.recover=auto: starting `lifeboat recover --auto` on {c}"
            ));
            if let Some(pid) = spawn_on_tty(
                &cfg.shell,
                c,
                Some(&["/usr/bin/lifeboat", "recover", "--auto"]),
            ) {
                recovery = Some((pid, c.clone()));
            }
        }
    }
    let mut shells: HashMap<libc::pid_t, String> = HashMap::new();
    for c in &consoles {
        if recovery.as_ref().is_some_and(|(_, t)| t == c) {
            continue;
        }
        if let Some(pid) = spawn_shell(&cfg.shell, c) {
            shells.insert(pid, c.clone());
        }
    }
    if failed {
        log(&format!(
            "emergency shell on {} (uptime {:.2} s)",
            consoles.join(", "),
            log::uptime()
        ));
    } else {
        log(&format!(
            "ready (uptime {:.2} s); shell on {}",
            log::uptime(),
            consoles.join(", ")
        ));
    }
    if matches!(cmd.recover, Recover::Auto | Recover::Ask) && !failed && !has_plan {
        log("lifeboat.recover: this image carries no recovery plan (it was made by mkrescue, not mkbackup); nothing to recover");
    } else if has_plan && recovery.is_none() && !failed {
        log("this image carries a backup and its disk layout: type `lifeboat recover` to restore (or boot with lifeboat.recover=auto)");
    }

    let mut restarts: HashMap<String, (std::time::Instant, Duration)> = HashMap::new();
    loop {
        let ts = libc::timespec {
            tv_sec: 1,
            tv_nsec: 0,
        };
        let sig = unsafe { libc::sigtimedwait(&sigs, std::ptr::null_mut(), &ts) };
        match sig {
            libc::SIGTERM | libc::SIGINT => shutdown(Shutdown::Reboot),
            libc::SIGUSR2 => shutdown(Shutdown::PowerOff),
            libc::SIGUSR1 => shutdown(Shutdown::Halt),
            _ => {}
        }
        loop {
            let mut status = 0;
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            if let Some((_, tty)) = recovery.as_ref().filter(|(p, _)| *p == pid).cloned() {
                recovery = None;
                let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
                if ok {
                    log(&format!(
                        "recovery finished (uptime {:.2} s); rebooting into the recovered system",
                        log::uptime()
                    ));
                    unsafe { libc::sync() };
                    std::thread::sleep(Duration::from_secs(2));
                    shutdown(Shutdown::Reboot);
                }
                let code = if libc::WIFEXITED(status) {
                    format!("exit status {}", libc::WEXITSTATUS(status))
                } else {
                    format!("signal {}", libc::WTERMSIG(status))
                };
                fatal(
                    &format!("recovery failed ({code})"),
                    "read the messages above (and /var/log/lifeboat/recover.log); fix the cause and run `lifeboat recover` again \
                     from this shell: it continues where it stopped",
                    &cfg,
                    &cmd,
                );
                if let Some(p) = spawn_shell(&cfg.shell, &tty) {
                    shells.insert(p, tty);
                }
            } else if let Some(tty) = shells.remove(&pid) {
                // A shell that dies at once (no terminal input) is restarted
                // ever more slowly, up to every 10 s, instead of spinning.
                let (last, backoff) = restarts
                    .entry(tty.clone())
                    .or_insert((std::time::Instant::now(), Duration::ZERO));
                *backoff = if last.elapsed() < Duration::from_secs(2) {
                    (*backoff * 2).clamp(Duration::from_millis(250), Duration::from_secs(10))
                } else {
                    Duration::from_millis(250)
                };
                std::thread::sleep(*backoff);
                *last = std::time::Instant::now();
                if let Some(p) = spawn_shell(&cfg.shell, &tty) {
                    shells.insert(p, tty);
                }
            } else if sshd_pid == Some(pid) {
                let failed_at_once = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 1;
                if failed_at_once {
                    sshd_pid = None;
                } else {
                    log("sshd exited; restarting it");
                    std::thread::sleep(Duration::from_secs(1));
                    sshd_pid = ssh::start(&cfg.ssh);
                }
            }
        }
    }
}
