//! A configuration file: schema check with line/key messages, aliases,
//! the merged configuration and `validate`'s value checks.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let f = std::path::Path::new("/etc/lifeboat/fuzz.toml");
    if let Ok(t) = lifeboat::config::parse_text(f, text) {
        if let Ok(c) = lifeboat::config::finish(t) {
            let _ = lifeboat::config::check(&c);
        }
    }
});
