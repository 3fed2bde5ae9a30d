//! Boot the image built from the fixture kernel in QEMU (TCG) and use its
//! shell over the serial console.

mod common;

use common::*;
use lifeboat_qemu::{BootSpec, Vm};
use std::time::Duration;

#[test]
fn the_image_boots_to_a_shell_with_the_toolbox() {
    let work = tempfile::tempdir().unwrap();
    let img = work.path().join("img");
    build(work.path(), &img, "", &["--no-cache"]);
    let m = manifest(&img);
    let mut spec = BootSpec::new(&img.join(&m.kernel), &img.join(&m.initrd));
    spec.log = Some(work.path().join("console.log"));
    let mut vm = Vm::boot(&spec).unwrap();
    let at = vm
        .wait_for("lifeboat: ready", Duration::from_secs(120))
        .unwrap();
    vm.wait_for_from("lifeboat:~# ", at, Duration::from_secs(30))
        .unwrap();
    // The running kernel is the image's own, so no mismatch warning.
    assert!(
        !vm.console()
            .contains("WARNING: this image was built for kernel"),
        "{}",
        vm.console()
    );
    vm.send_line("echo SUM=$((40+2)); uname -r; lvm version | head -1; ls /lib/modules")
        .unwrap();
    let at = vm
        .wait_for_from("SUM=42", at, Duration::from_secs(30))
        .unwrap();
    vm.wait_for_from(&m.kver, at, Duration::from_secs(30))
        .unwrap();
    vm.wait_for_from("LVM version", at, Duration::from_secs(30))
        .unwrap();
    // modprobe works from the shell: the image's indexes match its modules.
    vm.send_line("modprobe virtio_blk && grep -c virtio_blk /proc/modules && echo MODPROBE-OK")
        .unwrap();
    vm.wait_for_from("MODPROBE-OK", at, Duration::from_secs(60))
        .unwrap();
}
