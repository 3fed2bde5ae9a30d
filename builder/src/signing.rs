//! ed25519 signatures of the plan and the manifest (`signing_key`).
//!
//! Keys are PKCS#8 PEM files as `openssl genpkey -algorithm ed25519` or
//! `lifeboat keygen` write them; public keys are SubjectPublicKeyInfo PEM,
//! as `openssl pkey -pubout` writes them, so openssl can check every
//! signature independently (`openssl pkeyutl -verify -rawin`).
//!
//! With a key configured, the public key is baked into the base layer
//! (`etc/lifeboat/signing.pub`), and the plan layer carries a signed
//! statement (`etc/lifeboat/plan.sums`, signature `plan.sums.sig`): the
//! sha256 of each of its files, and the paths a server may add (the
//! credential and key files the signed configuration names, the CA
//! bundle), and the name and sha256 of every other layer of the image. The
//! rescue OS refuses a plan or personal layer that does not match it, and
//! a fetched shared layer that it does not name.

use anyhow::{bail, Context, Result};
use base64::Engine;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

pub const PUBKEY_PATH: &str = "etc/lifeboat/signing.pub";
pub const SUMS_PATH: &str = "etc/lifeboat/plan.sums";
pub const SIG_PATH: &str = "etc/lifeboat/plan.sums.sig";
const SUMS_HEADER: &str = "lifeboat-signed-plan v1";
/// DER prefix of an ed25519 PKCS#8 v1 private key, before the 32-byte seed
/// (RFC 8410).
const PKCS8_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
/// DER prefix of an ed25519 SubjectPublicKeyInfo (RFC 8410).
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

fn pem_body(text: &str, label: &str) -> Result<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let Some(a) = text.find(&begin) else {
        bail!("no {begin} block");
    };
    let rest = &text[a + begin.len()..];
    let Some(b) = rest.find(&end) else {
        bail!("no {end} line");
    };
    let b64: String = rest[..b].chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .context("the PEM block is not base64")
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(chunk).unwrap());
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----\n"));
    s
}

/// The signing key in `path` (PKCS#8 PEM, ed25519).
pub fn load_key(path: &Path) -> Result<Ed25519KeyPair> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("signing_key: cannot read {}", path.display()))?;
    let der = pem_body(&text, "PRIVATE KEY").with_context(|| {
        format!(
            "signing_key {} is not a PEM private key (make one with `lifeboat keygen --out {}` \
             or `openssl genpkey -algorithm ed25519 -out {}`)",
            path.display(),
            path.display(),
            path.display()
        )
    })?;
    Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der).map_err(|e| {
        anyhow::anyhow!(
            "signing_key {} is not an ed25519 key ({e}); make one with `lifeboat keygen --out FILE`",
            path.display()
        )
    })
}

/// The public key as SubjectPublicKeyInfo PEM.
pub fn public_pem(k: &Ed25519KeyPair) -> String {
    let mut der = SPKI_PREFIX.to_vec();
    der.extend_from_slice(k.public_key().as_ref());
    pem("PUBLIC KEY", &der)
}

/// The raw 32-byte key of a SubjectPublicKeyInfo PEM.
pub fn parse_public(text: &str) -> Result<Vec<u8>> {
    let der = pem_body(text, "PUBLIC KEY")?;
    if der.len() != 44 || der[..12] != SPKI_PREFIX {
        bail!("not an ed25519 public key");
    }
    Ok(der[12..].to_vec())
}

/// Short fingerprint of a public key (first 16 hex digits of its sha256).
pub fn fingerprint(raw: &[u8]) -> String {
    hex::encode(Sha256::digest(raw))[..16].to_string()
}

pub fn sign(k: &Ed25519KeyPair, data: &[u8]) -> Vec<u8> {
    k.sign(data).as_ref().to_vec()
}

pub fn verify(raw_pub: &[u8], data: &[u8], sig: &[u8]) -> bool {
    UnparsedPublicKey::new(&ED25519, raw_pub)
        .verify(data, sig)
        .is_ok()
}

/// A new key: PKCS#8 PEM written to `out` (0600, not overwritten) and its
/// public key to `out.pub`. Returns the fingerprint.
pub fn keygen(out: &Path) -> Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let rng = ring::rand::SystemRandom::new();
    let v2 = Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|e| anyhow::anyhow!("cannot make a key: {e}"))?;
    // Written as PKCS#8 v1 (the seed alone), as openssl writes and reads
    // ed25519 keys; ring's v2 form carries the public key too, at the end.
    let v2 = v2.as_ref();
    if v2.len() < 48 || v2[14..16] != [0x04, 0x20] {
        bail!("unexpected key encoding from the key generator");
    }
    let mut der = PKCS8_V1_PREFIX.to_vec();
    der.extend_from_slice(&v2[16..48]);
    let k = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
        .map_err(|e| anyhow::anyhow!("cannot read the new key: {e}"))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| {
            format!(
                "cannot create {} (an existing key is never overwritten)",
                out.display()
            )
        })?;
    f.write_all(pem("PRIVATE KEY", &der).as_bytes())?;
    let pubp = out.with_extension("pub");
    std::fs::write(&pubp, public_pem(&k))
        .with_context(|| format!("cannot write {}", pubp.display()))?;
    Ok(fingerprint(k.public_key().as_ref()))
}

/// The signed statement over the plan layer's files and the image's other
/// layers (`layers`: name and sha256 of each compressed layer file).
pub fn statement(
    host: &str,
    files: &BTreeMap<String, Vec<u8>>,
    may_add: &[String],
    layers: &[(String, String)],
) -> String {
    let mut s = format!("{SUMS_HEADER}\nhost {host}\n");
    for (name, sha) in layers {
        s.push_str(&format!("layer {sha} {name}\n"));
    }
    for (p, data) in files {
        s.push_str(&format!("file {} {p}\n", hex::encode(Sha256::digest(data))));
    }
    let mut add: Vec<&String> = may_add.iter().collect();
    add.sort();
    add.dedup();
    for p in add {
        s.push_str(&format!("may-add {p}\n"));
    }
    s
}

/// What a plan or personal layer holds, for the check.
pub enum Item {
    File(Vec<u8>),
    Dir,
    Other,
}

/// The layers a signed plan names: sha256 → layer name.
pub type SignedLayers = BTreeMap<String, String>;

/// Check a plan or personal layer's entries (archive paths) against its
/// signed statement and `raw_pub`. `what` names the layer in messages.
/// Returns the other layers the statement names (empty for a statement
/// made before layers were signed).
pub fn check_layer(
    raw_pub: &[u8],
    entries: &BTreeMap<String, Item>,
    host: Option<&str>,
    what: &str,
) -> Result<SignedLayers> {
    let fp = fingerprint(raw_pub);
    let (Some(Item::File(sums)), Some(Item::File(sig))) =
        (entries.get(SUMS_PATH), entries.get(SIG_PATH))
    else {
        bail!(
            "{what} is not signed, but this rescue image only accepts plans signed by key {fp}: refusing it. \
             Rebuild it on the host with signing_key set (mkrescue/mkbackup), or boot an image without a key"
        );
    };
    if !verify(raw_pub, sums, sig) {
        bail!(
            "{what}: its signature does not verify with this image's key {fp} (signed by another key, \
             or plan.sums was changed): refusing it"
        );
    }
    let text = String::from_utf8_lossy(sums);
    let mut lines = text.lines();
    if lines.next() != Some(SUMS_HEADER) {
        bail!("{what}: plan.sums is not a {SUMS_HEADER} statement");
    }
    let mut files: BTreeMap<&str, &str> = BTreeMap::new();
    let mut may_add: Vec<&str> = Vec::new();
    let mut signed_host = None;
    let mut layers = SignedLayers::new();
    for l in lines {
        if let Some(h) = l.strip_prefix("host ") {
            signed_host = Some(h);
        } else if let Some(r) = l.strip_prefix("layer ") {
            let (sha, name) = r.split_once(' ').context("bad layer line in plan.sums")?;
            layers.insert(sha.to_string(), name.to_string());
        } else if let Some(r) = l.strip_prefix("file ") {
            let (sha, p) = r.split_once(' ').context("bad file line in plan.sums")?;
            files.insert(p, sha);
        } else if let Some(p) = l.strip_prefix("may-add ") {
            may_add.push(p);
        }
    }
    if let (Some(want), Some(got)) = (host, signed_host) {
        if want != got {
            bail!("{what} is host {got}'s signed plan, not host {want}'s: refusing it");
        }
    }
    for (p, sha) in &files {
        match entries.get(*p) {
            Some(Item::File(d)) if hex::encode(Sha256::digest(d)) == *sha => {}
            Some(Item::File(_)) => bail!(
                "{what}: /{p} does not match the signed plan (signed by key {fp}): refusing it; nothing of it was used"
            ),
            _ => bail!("{what}: /{p} of the signed plan is missing: refusing it"),
        }
    }
    for (p, it) in entries {
        if p == SUMS_PATH || p == SIG_PATH || files.contains_key(p.as_str()) {
            continue;
        }
        match it {
            Item::Dir => {}
            Item::File(_) if may_add.contains(&p.as_str()) => {}
            _ => bail!(
                "{what}: /{p} is not part of the signed plan (signed by key {fp}): refusing it; nothing of it was used"
            ),
        }
    }
    Ok(layers)
}

/// A shared layer about to be fetched (`name`, pinned `sha256`) must be one
/// the signed plan names, under that name. `layers` empty: a plan signed
/// before layers were (nothing to check against).
pub fn check_pin(layers: &SignedLayers, name: &str, sha256: &str, url: &str) -> Result<()> {
    if layers.is_empty() {
        return Ok(());
    }
    match layers.get(sha256) {
        Some(n) if n == name => Ok(()),
        Some(n) => bail!(
            "layer {name} from {url}: its pin {sha256} is the signed plan's layer {n}, not {name}: refusing it (nothing of it was fetched)"
        ),
        None => bail!(
            "layer {name} from {url}: its pin {sha256} is not a layer the signed plan names: refusing it (nothing of it was fetched). \
             The server hands out layers this host did not register: register the host again, then reboot"
        ),
    }
}

/// The entries of a (maybe compressed) cpio layer file.
pub fn layer_entries(path: &Path) -> Result<BTreeMap<String, Item>> {
    let comp = crate::compress::detect(path)?;
    let f = std::fs::File::open(path)?;
    let dec = crate::compress::decoder(std::io::BufReader::new(f), comp)?;
    let mut r = crate::cpio::Reader::new(std::io::BufReader::new(dec));
    let mut out = BTreeMap::new();
    while let Some(h) = r.next_header()? {
        let data = r.read_data(&h)?;
        let name = h
            .name
            .trim_start_matches("./")
            .trim_start_matches('/')
            .to_string();
        if name.is_empty() || name == "." {
            continue;
        }
        let it = match h.mode & crate::cpio::S_IFMT {
            crate::cpio::S_IFREG => Item::File(data),
            crate::cpio::S_IFDIR => Item::Dir,
            _ => Item::Other,
        };
        out.insert(name, it);
    }
    Ok(out)
}

/// The public key this rescue system trusts, if it was built with one.
pub fn image_key(root: &Path) -> Result<Option<Vec<u8>>> {
    let p = root.join(PUBKEY_PATH);
    match std::fs::read_to_string(&p) {
        Ok(t) => parse_public(&t)
            .map(Some)
            .with_context(|| format!("{} is damaged", p.display())),
        Err(_) => Ok(None),
    }
}

/// In the rescue OS: check the unpacked plan files against the signed
/// statement (local images: the plan layer was unpacked by the kernel).
/// Only the files the statement lists, and the configuration files
/// recovery reads, are looked at.
pub fn check_unpacked(root: &Path, raw_pub: &[u8]) -> Result<SignedLayers> {
    let mut entries = BTreeMap::new();
    for p in [SUMS_PATH, SIG_PATH] {
        if let Ok(d) = std::fs::read(root.join(p)) {
            entries.insert(p.to_string(), Item::File(d));
        }
    }
    if let Some(Item::File(sums)) = entries.get(SUMS_PATH) {
        let text = String::from_utf8_lossy(sums).to_string();
        for l in text.lines() {
            if let Some(r) = l.strip_prefix("file ") {
                if let Some((_, p)) = r.split_once(' ') {
                    if let Ok(d) = std::fs::read(root.join(p)) {
                        entries.insert(p.to_string(), Item::File(d));
                    }
                }
            }
        }
    }
    // Files that steer a recovery must be signed too when present.
    for dir in ["etc/lifeboat/conf.d"] {
        if let Ok(rd) = std::fs::read_dir(root.join(dir)) {
            for e in rd.flatten() {
                let p = format!("{dir}/{}", e.file_name().to_string_lossy());
                if let Ok(d) = std::fs::read(e.path()) {
                    entries.entry(p).or_insert(Item::File(d));
                }
            }
        }
    }
    for p in ["etc/lifeboat/disk-mapping"] {
        if let Ok(d) = std::fs::read(root.join(p)) {
            entries.entry(p.to_string()).or_insert(Item::File(d));
        }
    }
    check_layer(raw_pub, &entries, None, "the plan of this rescue image")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> (tempfile::TempDir, Ed25519KeyPair) {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("k");
        keygen(&p).unwrap();
        let k = load_key(&p).unwrap();
        (t, k)
    }

    fn signed(k: &Ed25519KeyPair, files: &[(&str, &[u8])], may: &[&str]) -> BTreeMap<String, Item> {
        let f: BTreeMap<String, Vec<u8>> = files
            .iter()
            .map(|(p, d)| (p.to_string(), d.to_vec()))
            .collect();
        let st = statement(
            "h1",
            &f,
            &may.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            &[("tools".into(), "aa".repeat(32))],
        );
        let mut e: BTreeMap<String, Item> =
            f.into_iter().map(|(p, d)| (p, Item::File(d))).collect();
        e.insert("etc".into(), Item::Dir);
        e.insert(SIG_PATH.into(), Item::File(sign(k, st.as_bytes())));
        e.insert(SUMS_PATH.into(), Item::File(st.into_bytes()));
        e
    }

    #[test]
    fn keys_round_trip_and_a_key_is_never_overwritten() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("signing.key");
        let fp = keygen(&p).unwrap();
        let k = load_key(&p).unwrap();
        let raw =
            parse_public(&std::fs::read_to_string(t.path().join("signing.pub")).unwrap()).unwrap();
        assert_eq!(raw, k.public_key().as_ref());
        assert_eq!(fingerprint(&raw), fp);
        let e = keygen(&p).unwrap_err().to_string();
        assert!(e.contains("never overwritten"), "{e}");
        let s = sign(&k, b"data");
        assert!(verify(&raw, b"data", &s));
        assert!(!verify(&raw, b"datA", &s));
        std::fs::write(t.path().join("bad"), "not a key").unwrap();
        let e = load_key(&t.path().join("bad")).unwrap_err().to_string();
        assert!(e.contains("lifeboat keygen"), "{e}");
    }

    #[test]
    fn a_signed_layer_passes_and_every_change_is_refused() {
        let (_t, k) = key();
        let raw = k.public_key().as_ref().to_vec();
        let files: &[(&str, &[u8])] = &[
            ("etc/lifeboat/layout.json", b"{\"disks\":[]}"),
            ("etc/lifeboat/init.json", b"{}"),
        ];
        let may = ["etc/lifeboat/cifs.cred"];
        let good = signed(&k, files, &may);
        let layers = check_layer(&raw, &good, Some("h1"), "personal layer").unwrap();
        // The shared layers it names: the right pin under the right name only.
        check_pin(&layers, "tools", &"aa".repeat(32), "u").unwrap();
        let m = check_pin(&layers, "tools", &"bb".repeat(32), "u")
            .unwrap_err()
            .to_string();
        assert!(m.contains("not a layer the signed plan names"), "{m}");
        let m = check_pin(&layers, "base", &"aa".repeat(32), "u")
            .unwrap_err()
            .to_string();
        assert!(m.contains("the signed plan's layer tools, not base"), "{m}");
        check_pin(&SignedLayers::new(), "tools", &"bb".repeat(32), "u").unwrap();
        // A server-supplied secret at a path the signed plan allows.
        let mut e = signed(&k, files, &may);
        e.insert(
            "etc/lifeboat/cifs.cred".into(),
            Item::File(b"password=x".to_vec()),
        );
        check_layer(&raw, &e, Some("h1"), "personal layer").unwrap();
        // A changed file.
        let mut e = signed(&k, files, &may);
        e.insert(
            "etc/lifeboat/layout.json".into(),
            Item::File(b"{}".to_vec()),
        );
        let m = check_layer(&raw, &e, None, "personal layer")
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("/etc/lifeboat/layout.json does not match the signed plan"),
            "{m}"
        );
        // An added file that steers recovery.
        let mut e = signed(&k, files, &may);
        e.insert(
            "etc/lifeboat/disk-mapping".into(),
            Item::File(b"/dev/sda /dev/sdb".to_vec()),
        );
        let m = check_layer(&raw, &e, None, "personal layer")
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("/etc/lifeboat/disk-mapping is not part of the signed plan"),
            "{m}"
        );
        // A missing file.
        let mut e = signed(&k, files, &may);
        e.remove("etc/lifeboat/init.json");
        assert!(check_layer(&raw, &e, None, "p")
            .unwrap_err()
            .to_string()
            .contains("missing"));
        // Unsigned.
        let mut e = signed(&k, files, &may);
        e.remove(SIG_PATH);
        let m = check_layer(&raw, &e, None, "personal layer")
            .unwrap_err()
            .to_string();
        assert!(m.contains("is not signed"), "{m}");
        // Signed by another key.
        let (_t2, k2) = key();
        let other = signed(&k2, files, &may);
        let m = check_layer(&raw, &other, None, "personal layer")
            .unwrap_err()
            .to_string();
        assert!(m.contains("does not verify"), "{m}");
        // Another host's plan.
        let m = check_layer(&raw, &good, Some("h2"), "personal layer")
            .unwrap_err()
            .to_string();
        assert!(m.contains("host h1's signed plan, not host h2's"), "{m}");
    }
}
