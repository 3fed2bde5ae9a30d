//! Kernel command lines: the init's parser (ip=, BOOTIF=, lifeboat.*) and
//! the layer fetcher's (lifeboat.layers=, lifeboat.chain=, tokens).
#![no_main]
use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../rescue-init/src/cmdline.rs"]
mod cmdline;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = cmdline::parse(text);
    let _ = cmdline::parse_ip(text);
    let _ = cmdline::parse_mac(text);
    let _ = cmdline::parse_netmask(text);
    let _ = lifeboat::fetch::parse_cmdline(text);
});
