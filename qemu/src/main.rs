//! `lifeboat-qemu`: boot a Lifeboat image directory in QEMU.
//!
//!   lifeboat-qemu IMAGE_DIR [--expect TEXT] [--run COMMAND]... [--timeout SECS] [--log FILE]
//!   lifeboat-qemu IMAGE_DIR --interactive
//!
//! Without --interactive it waits for `lifeboat: ready` (or --expect), types
//! each --run command, prints the console, and exits 0 on success.

use lifeboat_qemu::{BootSpec, Vm};
use std::path::PathBuf;
use std::time::Duration;

fn usage() -> ! {
    eprintln!("usage: lifeboat-qemu IMAGE_DIR [--expect TEXT] [--run CMD]... [--timeout SECS] [--log FILE] [--append ARGS] [--interactive]");
    std::process::exit(2)
}

fn field(manifest: &str, key: &str) -> Option<String> {
    let i = manifest.find(&format!("\"{key}\""))?;
    let rest = &manifest[i + key.len() + 2..];
    let start = rest.find('"')? + 1;
    let end = rest[start..].find('"')? + start;
    Some(rest[start..end].to_string())
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut dir = None;
    let (mut expect, mut runs, mut timeout, mut log, mut interactive) = (
        "lifeboat: ready".to_string(),
        Vec::new(),
        180u64,
        None,
        false,
    );
    let mut append = "console=ttyS0".to_string();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--expect" => expect = args.next().unwrap_or_else(|| usage()),
            "--run" => runs.push(args.next().unwrap_or_else(|| usage())),
            "--timeout" => {
                timeout = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| usage())
            }
            "--log" => log = Some(PathBuf::from(args.next().unwrap_or_else(|| usage()))),
            "--append" => append = args.next().unwrap_or_else(|| usage()),
            "--interactive" => interactive = true,
            "-h" | "--help" => usage(),
            d if dir.is_none() => dir = Some(PathBuf::from(d)),
            _ => usage(),
        }
    }
    let dir = dir.unwrap_or_else(|| usage());
    let manifest = std::fs::read_to_string(dir.join("manifest.json")).unwrap_or_else(|e| {
        eprintln!(
            "lifeboat-qemu: cannot read {}/manifest.json: {e}",
            dir.display()
        );
        std::process::exit(1)
    });
    let kernel = dir.join(field(&manifest, "kernel").expect("manifest lacks kernel"));
    let initrd = dir.join(field(&manifest, "initrd").expect("manifest lacks initrd"));
    if interactive {
        let err = std::process::Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                &lifeboat_qemu::accel(),
                "-m",
                "1024",
                "-smp",
                "2",
                "-nographic",
                "-no-reboot",
            ])
            .args(["-cpu", "max", "-device", "virtio-rng-pci"])
            .arg("-kernel")
            .arg(&kernel)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", &append])
            .status();
        std::process::exit(match err {
            Ok(s) => s.code().unwrap_or(1),
            Err(e) => {
                eprintln!("lifeboat-qemu: cannot start qemu-system-x86_64: {e}");
                1
            }
        });
    }
    let mut spec = BootSpec::new(&kernel, &initrd);
    spec.append = append;
    spec.log = log;
    let t0 = std::time::Instant::now();
    let mut vm = Vm::boot(&spec).unwrap_or_else(|e| {
        eprintln!("lifeboat-qemu: {e}");
        std::process::exit(1)
    });
    let mut at = match vm.wait_for(&expect, Duration::from_secs(timeout)) {
        Ok(at) => at,
        Err(e) => {
            eprintln!("lifeboat-qemu: {e}");
            std::process::exit(1)
        }
    };
    eprintln!(
        "lifeboat-qemu: saw {expect:?} after {:.1} s (accel {})",
        t0.elapsed().as_secs_f64(),
        lifeboat_qemu::accel()
    );
    for (i, cmd) in runs.iter().enumerate() {
        let done = format!("LIFEBOAT-QEMU-DONE-{i}");
        let _ = vm.wait_for_from("# ", at, Duration::from_secs(30));
        vm.send_line(&format!("{cmd}; echo {done}-$?"))
            .expect("cannot type on the console");
        // The echoed command line also contains the marker (followed by `$?`):
        // the answer is the occurrence followed by digits.
        let mut pos = at;
        let status = loop {
            match vm.wait_for_from(&format!("{done}-"), pos, Duration::from_secs(timeout)) {
                Ok(n) => {
                    std::thread::sleep(Duration::from_millis(100));
                    let text = vm.console();
                    let digits: String = text[n..]
                        .chars()
                        .take_while(|c| c.is_ascii_digit())
                        .collect();
                    pos = n;
                    if !digits.is_empty() {
                        break digits;
                    }
                }
                Err(e) => {
                    eprintln!("lifeboat-qemu: {e}");
                    std::process::exit(1)
                }
            }
        };
        at = pos;
        if status != "0" {
            print!("{}", vm.console());
            eprintln!("lifeboat-qemu: command {cmd:?} failed with status {status}");
            std::process::exit(1)
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    print!("{}", vm.console());
}
