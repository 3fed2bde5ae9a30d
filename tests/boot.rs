//! Boot images built from the fixture kernel in QEMU (TCG) and check the
//! rescue OS from its serial console and over ssh.

mod common;

use common::*;
use lifeboat_qemu::{free_port, BootSpec, Vm};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(180);
const STEP: Duration = Duration::from_secs(60);

/// Layers other than `plan` are shared through one cache across these tests.
fn cache() -> &'static Path {
    static C: OnceLock<PathBuf> = OnceLock::new();
    C.get_or_init(|| tempfile::tempdir().unwrap().keep())
}

fn image(work: &Path, toml: &str) -> (PathBuf, lifeboat_contract::Manifest) {
    let img = work.join("img");
    let cfg = format!("[rescue]\ncache_dir = \"{}\"\n{toml}", cache().display());
    build(work, &img, &cfg, &[]);
    let m = manifest(&img);
    (img, m)
}

fn spec(img: &Path, m: &lifeboat_contract::Manifest, work: &Path, append: &str) -> BootSpec {
    let mut s = BootSpec::new(&img.join(&m.kernel), &img.join(&m.initrd));
    s.append = format!("console=ttyS0 {append}");
    s.log = Some(work.join("console.log"));
    s
}

/// Type a command and return (console offset after it, what it printed).
fn run(vm: &mut Vm, from: usize, cmd: &str) -> (usize, String) {
    let ran = vm.run_command(from, cmd, STEP).unwrap();
    (ran.end, ran.output)
}

#[test]
fn boots_with_dhcp_and_a_usable_shell() {
    let work = tempfile::tempdir().unwrap();
    let (img, m) = image(work.path(), "[network]\ncapture = false\n");
    let mut vm = Vm::boot(&spec(&img, &m, work.path(), "").with_user_net("")).unwrap();
    let at = vm.wait_for("lifeboat: ready", BOOT).unwrap();
    let console = vm.console();
    assert!(
        console.contains("10.0.2.15/24"),
        "DHCP address not shown:\n{console}"
    );
    assert!(
        !console.contains("WARNING: this image was built for kernel"),
        "{console}"
    );
    let at = vm.wait_for_from("lifeboat:~# ", at, STEP).unwrap();
    let (at, out) = run(
        &mut vm,
        at,
        "echo SUM=$((40+2)); uname -r; ip -4 -o addr show eth0; cat /etc/resolv.conf",
    );
    assert!(out.contains("SUM=42") && out.contains(&m.kver), "{out}");
    assert!(out.contains("inet 10.0.2.15/24"), "{out}");
    assert!(out.contains("nameserver 10.0.2.3"), "{out}");
    // Job control works: the shell has the serial port as controlling terminal.
    let (at, out) = run(&mut vm, at, "sleep 30 & jobs; kill %1");
    assert!(out.contains("[1]"), "no job control: {out}");
    // modprobe works from the shell: the image's indexes match its modules.
    let (at, out) = run(
        &mut vm,
        at,
        "modprobe dm_mod && grep -c '^dm_mod ' /proc/modules",
    );
    assert!(out.contains('1'), "{out}");
    // The harness reports exit statuses (lifeboat-qemu --run relies on it).
    let ran = vm.run_command(at, "(exit 3)", STEP).unwrap();
    assert_eq!(ran.status, 3);
    let ran = vm.run_command(ran.end, "true", STEP).unwrap();
    assert_eq!(ran.status, 0);
}

#[test]
fn captured_static_config_is_replayed_by_mac() {
    let work = tempfile::tempdir().unwrap();
    let net = work.path().join("network.json");
    std::fs::write(
        &net,
        r#"{"interfaces":[{"name":"enp0s9","mac":"52:54:00:12:34:56","addresses":["10.0.2.50/24"]}],
            "routes":[{"destination":"default","gateway":"10.0.2.2","interface":"enp0s9"}],
            "dns":["10.0.2.3"],"search":["lab.example"]}"#,
    )
    .unwrap();
    let (img, m) = image(
        work.path(),
        &format!("[network]\nfile = \"{}\"\n", net.display()),
    );
    let mut vm = Vm::boot(&spec(&img, &m, work.path(), "").with_user_net("")).unwrap();
    let at = vm.wait_for("lifeboat: ready", BOOT).unwrap();
    assert!(
        !vm.console().contains("dhcp from"),
        "DHCP was used instead of the captured config"
    );
    let at = vm.wait_for_from("lifeboat:~# ", at, STEP).unwrap();
    let (_, out) = run(
        &mut vm,
        at,
        "ip -4 -o addr show scope global; ip -4 route show default; cat /etc/resolv.conf",
    );
    let addrs: Vec<&str> = out.lines().filter(|l| l.contains(" inet ")).collect();
    assert_eq!(addrs.len(), 1, "{out}");
    assert!(addrs[0].contains("inet 10.0.2.50/24"), "{out}");
    assert!(out.contains("default via 10.0.2.2 dev eth0"), "{out}");
    assert!(out.contains("search lab.example"), "{out}");
}

#[test]
fn ip_on_the_command_line_overrides_everything() {
    let work = tempfile::tempdir().unwrap();
    let net = work.path().join("network.json");
    std::fs::write(&net, r#"{"interfaces":[{"name":"eth0","mac":"52:54:00:12:34:56","addresses":["10.0.2.50/24"]}]}"#).unwrap();
    let (img, m) = image(
        work.path(),
        &format!("[network]\nfile = \"{}\"\n", net.display()),
    );
    let append = "ip=10.0.2.60::10.0.2.2:255.255.255.0:rescue:eth0:none:10.0.2.3";
    let mut vm = Vm::boot(&spec(&img, &m, work.path(), append).with_user_net("")).unwrap();
    let at = vm.wait_for("lifeboat: ready", BOOT).unwrap();
    let at = vm.wait_for_from("lifeboat:~# ", at, STEP).unwrap();
    let (_, out) = run(
        &mut vm,
        at,
        "ip -4 -o addr show scope global; ip -4 route show default",
    );
    assert!(
        out.contains("inet 10.0.2.60/24") && !out.contains("10.0.2.50"),
        "{out}"
    );
    assert!(out.contains("default via 10.0.2.2"), "{out}");
}

#[test]
fn ssh_with_a_key_works_and_passwords_are_refused() {
    let work = tempfile::tempdir().unwrap();
    let key = work.path().join("id_ed25519");
    let (ok, _, err) = sh(&format!(
        "ssh-keygen -q -t ed25519 -N '' -f {}",
        key.display()
    ));
    assert!(ok, "{err}");
    let toml = format!(
        "[network]\ncapture = false\n[ssh]\nauthorized_keys = [\"{}.pub\"]\n",
        key.display()
    );
    let (img, m) = image(work.path(), &toml);
    let port = free_port();
    let mut vm = Vm::boot(
        &spec(&img, &m, work.path(), "")
            .with_user_net(&format!("hostfwd=tcp:127.0.0.1:{port}-:22")),
    )
    .unwrap();
    vm.wait_for("lifeboat: ready", BOOT).unwrap();
    let opts = format!(
        "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o ConnectTimeout=20 -o BatchMode=yes -p {port}"
    );
    let mut last = String::new();
    let mut ok = false;
    for _ in 0..10 {
        let (good, out, err) = sh(&format!(
            "ssh {opts} -i {} root@127.0.0.1 lifeboat --version",
            key.display()
        ));
        if good && out.contains("lifeboat") {
            ok = true;
            break;
        }
        last = format!("{out}{err}");
        std::thread::sleep(Duration::from_secs(3));
    }
    assert!(
        ok,
        "ssh with the key failed: {last}\nconsole:\n{}",
        vm.console()
    );
    let (good, _, err) = sh(&format!(
        "ssh {opts} -o PubkeyAuthentication=no -o PreferredAuthentications=password,keyboard-interactive root@127.0.0.1 true"
    ));
    assert!(!good, "password login was not refused");
    assert!(err.contains("Permission denied"), "{err}");
    assert!(
        !err.contains("password"),
        "the server offered password authentication: {err}"
    );
}

#[test]
fn a_missing_plan_disk_gives_a_clear_message_and_a_working_shell() {
    let work = tempfile::tempdir().unwrap();
    let toml = "[network]\ncapture = false\n[boot]\ndisk_timeout = 3\nrequire_disks = [{ serial = \"LB-NOT-THERE\" }]\n";
    let (img, m) = image(work.path(), toml);
    // One disk is present, but not the one the plan needs.
    let disk = work.path().join("other.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let mut s = spec(&img, &m, work.path(), "lifeboat.recover=auto");
    s.extra_args.extend([
        "-drive".into(),
        format!("file={},format=raw,if=none,id=d0", disk.display()),
        "-device".into(),
        "virtio-blk-pci,drive=d0,serial=LB-OTHER".into(),
    ]);
    let mut vm = Vm::boot(&s).unwrap();
    let at = vm
        .wait_for("did not appear within 3 s: serial LB-NOT-THERE", BOOT)
        .unwrap();
    let at = vm
        .wait_for_from("vda (1048576 bytes, serial LB-OTHER)", at, STEP)
        .unwrap();
    let at = vm
        .wait_for_from("lifeboat: emergency shell on", at, STEP)
        .unwrap();
    assert!(
        !vm.console().contains("lifeboat: ready"),
        "claimed ready despite the missing disk"
    );
    let at = vm.wait_for_from("lifeboat:~# ", at, STEP).unwrap();
    let (_, out) = run(
        &mut vm,
        at,
        "echo EMERG-$((2+3)); cat /sys/block/vda/serial",
    );
    assert!(out.contains("EMERG-5") && out.contains("LB-OTHER"), "{out}");
}

#[test]
fn bond_vlan_and_bridge_are_rebuilt_from_the_captured_setup() {
    // Two NICs in an active-backup bond carrying the address, a VLAN on the
    // bond, and a bridge over a third NIC: as `ip -d` would have captured them.
    let work = tempfile::tempdir().unwrap();
    let net = work.path().join("network.json");
    std::fs::write(
        &net,
        r#"{"interfaces":[
            {"name":"eno1","mac":"52:54:00:00:00:01"},
            {"name":"eno2","mac":"52:54:00:00:00:02"},
            {"name":"eno3","mac":"52:54:00:00:00:03"},
            {"name":"bond0","kind":{"type":"bond","mode":"active-backup","members":["eno1","eno2"]},"addresses":["10.0.2.50/24"],"mtu":1400},
            {"name":"bond0.7","kind":{"type":"vlan","parent":"bond0","id":7},"addresses":["192.168.7.5/24"]},
            {"name":"br0","kind":{"type":"bridge","members":["eno3"]},"addresses":["192.168.9.1/24"]}],
          "routes":[{"destination":"default","gateway":"10.0.2.2","interface":"bond0"}]}"#,
    )
    .unwrap();
    let (img, m) = image(
        work.path(),
        &format!("[network]\nfile = \"{}\"\n", net.display()),
    );
    let mut s = spec(&img, &m, work.path(), "");
    for i in 1..=3 {
        s.extra_args.extend([
            "-netdev".into(),
            format!("user,id=n{i}"),
            "-device".into(),
            format!("virtio-net-pci,netdev=n{i},mac=52:54:00:00:00:0{i}"),
        ]);
    }
    let mut vm = Vm::boot(&s).unwrap();
    let at = vm.wait_for("lifeboat: ready", BOOT).unwrap();
    let at = vm.wait_for_from("lifeboat:~# ", at, STEP).unwrap();
    let (at, out) = run(
        &mut vm,
        at,
        "grep -E 'Bonding Mode|Slave Interface' /proc/net/bonding/bond0; ip -o link show bond0",
    );
    assert!(out.contains("fault-tolerance (active-backup)"), "{out}");
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("Slave Interface"))
            .count(),
        2,
        "{out}"
    );
    assert!(out.contains("mtu 1400"), "{out}");
    let (at, out) = run(
        &mut vm,
        at,
        "ip -d -o link show bond0.7; ip -o -4 addr show bond0.7; ip -o -4 addr show bond0",
    );
    assert!(out.contains("vlan protocol 802.1Q id 7"), "{out}");
    assert!(
        out.contains("192.168.7.5/24") && out.contains("10.0.2.50/24"),
        "{out}"
    );
    let (at, out) = run(
        &mut vm,
        at,
        "ls /sys/class/net/br0/brif; ip -o -4 addr show br0; ip -4 route show default",
    );
    assert!(
        out.contains("eth2") || out.contains("eno3"),
        "bridge port missing: {out}"
    );
    assert!(
        out.contains("192.168.9.1/24") && out.contains("default via 10.0.2.2 dev bond0"),
        "{out}"
    );
    // Traffic flows through the bond: slirp's gateway answers.
    let (_, out) = run(
        &mut vm,
        at,
        "ping -c 1 -W 5 10.0.2.2 >/dev/null && echo PING-OK",
    );
    assert!(out.contains("PING-OK"), "{out}");
}

#[test]
fn a_kernel_that_does_not_match_the_image_is_reported() {
    // Build the image as if for another kernel release, boot the fixture kernel.
    let work = tempfile::tempdir().unwrap();
    let img = work.path().join("img");
    let f = fixture();
    build(
        work.path(),
        &img,
        &format!(
            "[rescue]\ncache_dir = \"{}\"\nmodules = \"none\"\n[network]\ncapture = false\n",
            cache().display()
        ),
        &[
            "--allow-kernel-mismatch",
            "--kver",
            "6.1.0-0-other-amd64",
            "--modules-dir",
            f.modules_dir().to_str().unwrap(),
        ],
    );
    let m = manifest(&img);
    let mut vm = Vm::boot(&spec(&img, &m, work.path(), "lifeboat.shell")).unwrap();
    let at = vm
        .wait_for("built for kernel 6.1.0-0-other-amd64", BOOT)
        .unwrap();
    vm.wait_for_from(&format!("kernel {} is running", f.kver), at - 200, STEP)
        .unwrap();
    vm.wait_for_from("lifeboat: ready", at, STEP).unwrap();
}

#[test]
fn boots_under_uefi_firmware_too() {
    let work = tempfile::tempdir().unwrap();
    let (img, m) = image(work.path(), "[network]\ncapture = false\n");
    let mut s = spec(&img, &m, work.path(), "").with_user_net("");
    s.uefi = true;
    let mut vm = Vm::boot(&s).unwrap();
    vm.wait_for("lifeboat: ready", BOOT).unwrap();
    let at = vm.wait_for("lifeboat:~# ", STEP).unwrap();
    // The init mounted efivarfs: the firmware's variables are visible.
    let (_, out) = run(
        &mut vm,
        at,
        "test -d /sys/firmware/efi && grep -c efivarfs /proc/mounts",
    );
    assert!(out.lines().any(|l| l.trim() == "1"), "{out}");
}
