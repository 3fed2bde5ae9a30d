//! What the rescue OS checks before it takes a plan or personal layer:
//! the signed statement (any content, any signature bytes) against a key,
//! and the secret classifier `image scan` and the build use.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lifeboat::signing::{check_layer, Item, SIG_PATH, SUMS_PATH};
use std::collections::BTreeMap;

fuzz_target!(|data: &[u8]| {
    // A fixed public key (any 32 bytes are a candidate key).
    let key = [7u8; 32];
    let (sums, rest) = data.split_at(data.len() / 2);
    let (sig, file) = rest.split_at(rest.len().min(64));
    let mut e = BTreeMap::new();
    e.insert(SUMS_PATH.to_string(), Item::File(sums.to_vec()));
    e.insert(SIG_PATH.to_string(), Item::File(sig.to_vec()));
    e.insert(
        "etc/lifeboat/layout.json".to_string(),
        Item::File(file.to_vec()),
    );
    e.insert("etc".to_string(), Item::Dir);
    let _ = check_layer(&key, &e, Some("h"), "fuzzed layer");
    let _ = lifeboat::secrets::classify("etc/x", data);
    let _ = lifeboat::secrets::has_crypt_hash(data);
});
