//! lifeboat-init: PID 1 of the Lifeboat rescue OS.
//!
//! This first version does the essentials: mounts the API filesystems,
//! reads the init configuration, checks the running kernel against the
//! image's, announces `lifeboat: ready` and keeps an interactive shell on
//! the console, reaping orphans. It never panics out: every failure is
//! reported and the shell is still offered.

use lifeboat_contract::{InitConfig, INIT_CONFIG_PATH};
use std::ffi::CString;
use std::io::Write;
use std::time::Duration;

fn uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(0.0)
}

/// Log to the console and to /dev/kmsg (and /run/lifeboat/init.log once /run exists).
fn log(msg: &str) {
    let line = format!("[{:8.3}] lifeboat: {msg}\n", uptime());
    let _ = std::io::stdout().write_all(line.as_bytes());
    let _ = std::io::stdout().flush();
    if let Ok(mut k) = std::fs::OpenOptions::new().write(true).open("/dev/kmsg") {
        let _ = k.write_all(format!("lifeboat: {msg}\n").as_bytes());
    }
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open("/run/lifeboat/init.log")
    {
        let _ = f.write_all(line.as_bytes());
    }
}

fn mount(src: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) {
    let _ = std::fs::create_dir_all(target);
    let (s, t, f, d) = (
        CString::new(src).unwrap(),
        CString::new(target).unwrap(),
        CString::new(fstype).unwrap(),
        CString::new(data).unwrap(),
    );
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
    // Make /dev/console our stdin/stdout/stderr if the kernel did not.
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

/// Start the shell in its own session with the console as controlling
/// terminal (so job control and Ctrl-C work) and return its pid.
fn spawn_shell(shell: &str) -> Option<libc::pid_t> {
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        log(&format!("fork failed: {}", std::io::Error::last_os_error()));
        return None;
    }
    if pid == 0 {
        unsafe {
            libc::setsid();
            libc::ioctl(0, libc::TIOCSCTTY, 1);
        }
        let sh = CString::new(shell).unwrap();
        let arg0 = CString::new("-bash").unwrap();
        let env: Vec<CString> = [
            "HOME=/root",
            "TERM=linux",
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "SHELL=/bin/bash",
        ]
        .iter()
        .map(|s| CString::new(*s).unwrap())
        .collect();
        let _ = std::env::set_current_dir("/root");
        let argv = [arg0.as_ptr(), std::ptr::null()];
        let mut envp: Vec<*const libc::c_char> = env.iter().map(|c| c.as_ptr()).collect();
        envp.push(std::ptr::null());
        unsafe { libc::execve(sh.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        // Fall back to /bin/sh.
        let fallback = CString::new("/bin/sh").unwrap();
        let argv = [fallback.as_ptr(), std::ptr::null()];
        unsafe { libc::execve(fallback.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        unsafe { libc::_exit(127) };
    }
    Some(pid)
}

fn main() {
    std::panic::set_hook(Box::new(|info| {
        log(&format!("internal error: {info}; continuing with a shell"));
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
    log(&format!(
        "lifeboat-init {} starting",
        env!("CARGO_PKG_VERSION")
    ));

    let mut shell = "/bin/bash".to_string();
    match std::fs::read_to_string(format!("/{INIT_CONFIG_PATH}")) {
        Ok(text) => match InitConfig::from_json(&text) {
            Ok(c) => {
                let running = running_kernel();
                if c.kver != running {
                    log(&format!(
                        "WARNING: this image was built for kernel {} but kernel {running} is running; \
                         its modules will not load. Boot the image's own kernel.",
                        c.kver
                    ));
                }
                let h = CString::new(c.hostname.clone()).unwrap_or_default();
                unsafe { libc::sethostname(h.as_ptr(), c.hostname.len()) };
                shell = c.shell;
            }
            Err(e) => log(&format!(
                "cannot use /{INIT_CONFIG_PATH}: {e}; using defaults"
            )),
        },
        Err(e) => log(&format!("no /{INIT_CONFIG_PATH} ({e}); using defaults")),
    }
    if !std::path::Path::new(&shell).exists() {
        shell = "/bin/sh".into();
    }

    let mut shell_pid = spawn_shell(&shell);
    let mut started = std::time::Instant::now();
    let mut backoff = Duration::from_millis(300);
    log(&format!(
        "ready (uptime {:.2} s); shell on the console",
        uptime()
    ));
    loop {
        let mut status = 0;
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid < 0 {
            std::thread::sleep(Duration::from_millis(200));
            if shell_pid.is_none() {
                shell_pid = spawn_shell(&shell);
            }
            continue;
        }
        if Some(pid) == shell_pid {
            let how = if libc::WIFEXITED(status) {
                format!("with status {}", libc::WEXITSTATUS(status))
            } else {
                format!("by signal {}", libc::WTERMSIG(status))
            };
            log(&format!("shell exited {how}; starting a new one"));
            // A shell that dies at once (no console input) is restarted
            // ever more slowly, up to every 10 s, instead of spinning.
            if started.elapsed() < Duration::from_secs(2) {
                backoff = (backoff * 2).min(Duration::from_secs(10));
            } else {
                backoff = Duration::from_millis(300);
            }
            std::thread::sleep(backoff);
            shell_pid = spawn_shell(&shell);
            started = std::time::Instant::now();
        }
    }
}
