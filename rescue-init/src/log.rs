//! Logging to the console, /dev/kmsg and /run/lifeboat/init.log, each line
//! stamped with the uptime.

use std::io::Write;

pub fn uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(0.0)
}

pub fn log(msg: &str) {
    let line = format!("[{:8.3}] lifeboat: {msg}\n", uptime());
    let _ = std::io::stdout().write_all(line.as_bytes());
    let _ = std::io::stdout().flush();
    if let Ok(mut k) = std::fs::OpenOptions::new().write(true).open("/dev/kmsg") {
        // Debug priority: into the kernel log, but not echoed on the console again.
        let _ = k.write_all(format!("<7>lifeboat: {msg}\n").as_bytes());
    }
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open("/run/lifeboat/init.log")
    {
        let _ = f.write_all(line.as_bytes());
    }
}

/// Only with `lifeboat.debug`.
pub fn debug(msg: &str) {
    if DEBUG.load(std::sync::atomic::Ordering::Relaxed) {
        log(&format!("debug: {msg}"));
    }
}

pub static DEBUG: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
