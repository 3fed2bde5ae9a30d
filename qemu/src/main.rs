//! `lifeboat-qemu`: boot a Lifeboat image (or any kernel + initrd) in QEMU.
//!
//!   lifeboat-qemu IMAGE_DIR [options]
//!   lifeboat-qemu --kernel FILE --initrd FILE [options]
//!
//! Options:
//!   --expect TEXT     wait for TEXT on the console (default `lifeboat: ready`)
//!   --run COMMAND     type COMMAND at the shell afterwards (repeatable); a
//!                     non-zero exit status fails the run
//!   --append ARGS     kernel command line (default `console=ttyS0`)
//!   --net [OPTS]      a virtio NIC on QEMU's user network (OPTS e.g. hostfwd=...)
//!   --disk FILE       attach FILE as a virtio disk (repeatable)
//!   --timeout SECS    per wait (default 180)
//!   --log FILE        also write the console to FILE
//!   --uefi            boot with OVMF instead of SeaBIOS
//!   --uefi-vars FILE  boot with OVMF, FILE as the NVRAM (variable store):
//!                     made from the OVMF template when missing, kept afterwards
//!   --interactive     just boot with the console on this terminal (Ctrl-A X quits)
//!
//! Prints the console and, on stderr, how long the marker took (host wall time).

use lifeboat_qemu::{BootSpec, Vm};
use std::path::PathBuf;
use std::time::Duration;

fn usage() -> ! {
    eprintln!(
        "usage: lifeboat-qemu (IMAGE_DIR | --kernel FILE --initrd FILE) [--expect TEXT] [--run CMD]... \
         [--append ARGS] [--net [OPTS]] [--disk FILE]... [--timeout SECS] [--log FILE] [--uefi] [--uefi-vars FILE] [--interactive]"
    );
    std::process::exit(2)
}

fn fail(msg: &str) -> ! {
    eprintln!("lifeboat-qemu: {msg}");
    std::process::exit(1)
}

fn main() {
    let mut args = std::env::args().skip(1).peekable();
    let (mut dir, mut kernel, mut initrd) = (None, None, None);
    let mut expect = "lifeboat: ready".to_string();
    let mut runs = Vec::new();
    let mut timeout = 180u64;
    let mut log = None;
    let mut interactive = false;
    let mut append = "console=ttyS0".to_string();
    let mut net: Option<String> = None;
    let mut disks = Vec::new();
    let mut uefi = false;
    let mut uefi_vars: Option<PathBuf> = None;
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--expect" => expect = val(),
            "--run" => runs.push(val()),
            "--timeout" => timeout = val().parse().unwrap_or_else(|_| usage()),
            "--log" => log = Some(PathBuf::from(val())),
            "--append" => append = val(),
            "--kernel" => kernel = Some(PathBuf::from(val())),
            "--initrd" => initrd = Some(PathBuf::from(val())),
            "--disk" => disks.push(PathBuf::from(val())),
            "--net" => {
                let opts = match args.peek() {
                    Some(n) if !n.starts_with("--") && n.contains('=') => args.next().unwrap(),
                    _ => String::new(),
                };
                net = Some(opts);
            }
            "--interactive" => interactive = true,
            "--uefi" => uefi = true,
            "--uefi-vars" => uefi_vars = Some(PathBuf::from(val())),
            "-h" | "--help" => usage(),
            d if dir.is_none() && !d.starts_with("--") => dir = Some(PathBuf::from(d)),
            _ => usage(),
        }
    }
    if let Some(dir) = &dir {
        let text = std::fs::read_to_string(dir.join("manifest.json"))
            .unwrap_or_else(|e| fail(&format!("cannot read {}/manifest.json: {e}", dir.display())));
        let m: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| fail(&format!("bad manifest: {e}")));
        kernel = Some(
            dir.join(
                m["kernel"]
                    .as_str()
                    .unwrap_or_else(|| fail("manifest lacks kernel")),
            ),
        );
        initrd = Some(
            dir.join(
                m["initrd"]
                    .as_str()
                    .unwrap_or_else(|| fail("manifest lacks initrd")),
            ),
        );
    }
    let (Some(kernel), Some(initrd)) = (kernel, initrd) else {
        usage()
    };
    let mut spec = BootSpec::new(&kernel, &initrd);
    spec.append = append;
    spec.log = log;
    spec.uefi = uefi || uefi_vars.is_some();
    if let Some(opts) = &net {
        spec = spec.with_user_net(opts);
    }
    for (i, d) in disks.iter().enumerate() {
        spec.extra_args.extend([
            "-drive".into(),
            format!("file={},format=raw,if=none,id=d{i}", d.display()),
            "-device".into(),
            format!("virtio-blk-pci,drive=d{i}"),
        ]);
    }
    if let Some(v) = &uefi_vars {
        if !v.exists() {
            let (_, template) = lifeboat_qemu::ovmf();
            std::fs::copy(&template, v).unwrap_or_else(|e| {
                fail(&format!(
                    "cannot copy {} to {}: {e}",
                    template.display(),
                    v.display()
                ))
            });
        }
        spec.uefi_vars = Some(v.clone());
    } else if spec.uefi && interactive {
        // Vm::boot makes (and removes) its own copy; the interactive run
        // starts QEMU itself.
        spec.uefi_vars =
            Some(lifeboat_qemu::ovmf_vars_copy().unwrap_or_else(|e| fail(&e.to_string())));
    }
    if interactive {
        let st = std::process::Command::new("qemu-system-x86_64")
            .args(lifeboat_qemu::base_args(&spec))
            .args(["-nographic"])
            .status();
        std::process::exit(match st {
            Ok(s) => s.code().unwrap_or(1),
            Err(e) => fail(&format!("cannot start qemu-system-x86_64: {e}")),
        });
    }
    let t0 = std::time::Instant::now();
    let mut vm = Vm::boot(&spec).unwrap_or_else(|e| fail(&e.to_string()));
    let mut at = vm
        .wait_for(&expect, Duration::from_secs(timeout))
        .unwrap_or_else(|e| fail(&e));
    eprintln!(
        "lifeboat-qemu: saw {expect:?} after {:.2} s (host wall time, accel {})",
        t0.elapsed().as_secs_f64(),
        lifeboat_qemu::accel()
    );
    for cmd in &runs {
        let _ = vm.wait_for_from("# ", at, Duration::from_secs(30));
        let ran = vm
            .run_command(at, cmd, Duration::from_secs(timeout))
            .unwrap_or_else(|e| fail(&e));
        at = ran.end;
        if ran.status != 0 {
            print!("{}", vm.console());
            fail(&format!(
                "command {cmd:?} failed with status {}",
                ran.status
            ));
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    print!("{}", vm.console());
}
