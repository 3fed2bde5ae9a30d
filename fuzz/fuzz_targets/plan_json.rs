//! The plan and image documents: layout.json, backup.json, manifest.json,
//! init.json, the module index. The first byte picks the document.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lifeboat_contract::{BackupManifest, InitConfig, Layout, Manifest, ModuleIndex};

fuzz_target!(|data: &[u8]| {
    let Some((sel, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match sel % 5 {
        0 => {
            if let Ok(l) = Layout::from_json(text) {
                // What recovery derives from an accepted layout.
                let _ = lifeboat::plan::groups(&l);
                let _ = lifeboat::migrate::disks_in_use(&l);
            }
        }
        1 => {
            let _ = BackupManifest::from_json(text);
        }
        2 => {
            let _ = Manifest::from_json(text);
        }
        3 => {
            let _ = InitConfig::from_json(text);
        }
        _ => {
            let _ = ModuleIndex::from_json(text);
        }
    }
});
