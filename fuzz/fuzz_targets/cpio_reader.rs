//! The newc cpio reader (layers, personal layers from a server, initrds):
//! any bytes give entries or an error, never a panic or a runaway.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = lifeboat::cpio::Reader::new(data);
    for _ in 0..10_000 {
        match r.next_header() {
            Ok(Some(h)) => {
                if r.read_data(&h).is_err() {
                    break;
                }
            }
            _ => break,
        }
    }
});
