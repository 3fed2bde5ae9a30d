//! Recorded tool output the layout capture parses: sfdisk and findmnt
//! JSON, blkid export, lvm JSON reports, mdadm --detail --export,
//! cryptsetup luksDump, btrfs, xfs_info, tune2fs, efibootmgr, and LVM's
//! vgcfgbackup text (the thin pools a plan rebuilds). The first
//! byte picks the parser.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lifeboat::layout_parse as p;

fuzz_target!(|data: &[u8]| {
    let Some((sel, rest)) = data.split_first() else {
        return;
    };
    let Ok(t) = std::str::from_utf8(rest) else {
        return;
    };
    match sel % 14 {
        0 => {
            let _ = lifeboat::layout::parse_sfdisk(t);
        }
        1 => {
            let _ = lifeboat::layout::parse_blkid("/dev/vda1", t);
        }
        2 => {
            let _ = lifeboat::layout::parse_findmnt(t);
        }
        3 => {
            let _ = p::mdadm_export("/dev/md0", t);
        }
        4 => {
            let _ = p::luks_dump("/dev/vda2", t);
        }
        5 => {
            let _ = p::lvm_pvs(t);
        }
        6 => {
            let _ = p::lvm_vgs(t);
        }
        7 => {
            let _ = p::lvm_lvs(t);
        }
        8 => {
            let _ = p::btrfs_subvolumes(t);
        }
        9 => {
            let _ = p::btrfs_default(t);
        }
        10 => {
            let _ = p::xfs_info(t);
        }
        11 => {
            let _ = p::tune2fs(t);
        }
        12 => {
            let _ = p::efibootmgr(t);
        }
        _ => {
            let _ = lifeboat::lvmmeta::thin_pools(t, "tvg");
        }
    }
});
