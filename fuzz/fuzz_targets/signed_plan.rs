//! What the rescue OS checks before it takes a plan or personal layer: the
//! signed statement against a key, the shared-layer pins against what it
//! names, and the secret classifier `image scan` and the build use.
//!
//! Half of the inputs are signed here with a real key, so the statement's
//! parser and the file and pin checks are reached (an unsigned statement
//! stops at the signature); the other half go in with whatever signature
//! bytes the input holds.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lifeboat::signing::{check_layer, check_pin, Item, SIG_PATH, SUMS_PATH};
use std::collections::BTreeMap;
use std::sync::OnceLock;

fn key() -> &'static (ring::signature::Ed25519KeyPair, Vec<u8>) {
    static K: OnceLock<(ring::signature::Ed25519KeyPair, Vec<u8>)> = OnceLock::new();
    K.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("lifeboat-fuzz-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        lifeboat::signing::keygen(&d.join("k")).unwrap();
        let k = lifeboat::signing::load_key(&d.join("k")).unwrap();
        let raw = lifeboat::signing::parse_public(&std::fs::read_to_string(d.join("k.pub")).unwrap())
            .unwrap();
        let _ = std::fs::remove_dir_all(&d);
        (k, raw)
    })
}

fuzz_target!(|data: &[u8]| {
    let (k, raw) = key();
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let (sums, rest) = data.split_at(data.len() / 2);
    let (sig, file) = rest.split_at(rest.len().min(64));
    let sig = if mode & 1 == 0 {
        lifeboat::signing::sign(k, sums)
    } else {
        sig.to_vec()
    };
    let mut e = BTreeMap::new();
    e.insert(SUMS_PATH.to_string(), Item::File(sums.to_vec()));
    e.insert(SIG_PATH.to_string(), Item::File(sig));
    e.insert(
        "etc/lifeboat/layout.json".to_string(),
        Item::File(file.to_vec()),
    );
    e.insert("etc".to_string(), Item::Dir);
    let host = (mode & 2 == 0).then_some("h");
    if let Ok(layers) = check_layer(raw, &e, host, "fuzzed layer") {
        let text = String::from_utf8_lossy(file);
        for l in text.lines().take(8) {
            let (name, sha) = l.split_once(' ').unwrap_or((l, ""));
            let _ = check_pin(&layers, name, sha, "http://fuzz/");
        }
    }
    let _ = lifeboat::secrets::classify("etc/x", data);
    let _ = lifeboat::secrets::has_crypt_hash(data);
});
