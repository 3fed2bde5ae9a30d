//! LVM's text metadata (what `vgcfgbackup` writes), read just far enough to
//! restore thin pools with their UUIDs.
//!
//! `vgcfgrestore --force` brings back a VG with thin pools and thin
//! volumes, UUIDs and all, but not the pool's own metadata (which blocks
//! each thin volume maps): on a new disk that area holds whatever was
//! there, and the pool cannot be activated. For each pool this module
//! works out where its metadata LV lies on the PVs (a device-mapper linear
//! table) and an empty thin metadata for `thin_restore`: the pool's
//! transaction id and chunk size, and each thin volume's device id with no
//! blocks mapped. Filesystems are made on the thin volumes afterwards, as
//! on any other.

use anyhow::{bail, Context, Result};

/// Largest metadata text read (a VG's is a few KiB to a few hundred).
const MAX_TEXT: usize = 4 << 20;
/// Deepest nesting of sections (LVM's is 4).
const MAX_DEPTH: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Num(u64),
    Str(String),
    List(Vec<Value>),
}

/// A `name { ... }` section: its `key = value` lines and subsections.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Section {
    pub name: String,
    pub values: Vec<(String, Value)>,
    pub sections: Vec<Section>,
}

impl Section {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.values.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn num(&self, key: &str) -> Result<u64> {
        match self.get(key) {
            Some(Value::Num(n)) => Ok(*n),
            _ => bail!("{}: no number {key}", self.name),
        }
    }

    pub fn str(&self, key: &str) -> Result<&str> {
        match self.get(key) {
            Some(Value::Str(s)) => Ok(s),
            _ => bail!("{}: no string {key}", self.name),
        }
    }

    pub fn section(&self, name: &str) -> Result<&Section> {
        self.sections
            .iter()
            .find(|s| s.name == name)
            .with_context(|| format!("{}: no section {name}", self.name))
    }

    /// The `segmentN` subsections, in order.
    fn segments(&self) -> Vec<&Section> {
        let mut s: Vec<(u64, &Section)> = self
            .sections
            .iter()
            .filter_map(|x| Some((x.name.strip_prefix("segment")?.parse().ok()?, x)))
            .collect();
        s.sort_by_key(|(n, _)| *n);
        s.into_iter().map(|(_, x)| x).collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Word(String),
    Str(String),
    Punct(char),
}

fn tokens(text: &str) -> Result<Vec<Tok>> {
    if text.len() > MAX_TEXT {
        bail!("LVM metadata of {} bytes (at most {MAX_TEXT})", text.len());
    }
    let mut out = Vec::new();
    let mut it = text.chars().peekable();
    while let Some(c) = it.next() {
        match c {
            c if c.is_whitespace() => {}
            '#' => {
                for c in it.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '"' => {
                let mut s = String::new();
                loop {
                    match it.next() {
                        None => bail!("LVM metadata: a string does not end"),
                        Some('"') => break,
                        Some('\\') => match it.next() {
                            Some(c) => s.push(c),
                            None => bail!("LVM metadata: a string does not end"),
                        },
                        Some(c) => s.push(c),
                    }
                }
                out.push(Tok::Str(s));
            }
            '{' | '}' | '[' | ']' | '=' | ',' => out.push(Tok::Punct(c)),
            c => {
                let mut w = String::from(c);
                while let Some(&n) = it.peek() {
                    if n.is_whitespace() || "{}[]=,#\"".contains(n) {
                        break;
                    }
                    w.push(n);
                    it.next();
                }
                out.push(Tok::Word(w));
            }
        }
    }
    Ok(out)
}

/// Parse metadata text into its top-level section (named "").
pub fn parse(text: &str) -> Result<Section> {
    let toks = tokens(text)?;
    let mut pos = 0;
    let root = items(&toks, &mut pos, String::new(), 0)?;
    if pos != toks.len() {
        bail!("LVM metadata: an unmatched '}}'");
    }
    Ok(root)
}

fn items(toks: &[Tok], pos: &mut usize, name: String, depth: usize) -> Result<Section> {
    if depth > MAX_DEPTH {
        bail!("LVM metadata nested deeper than {MAX_DEPTH}");
    }
    let mut sec = Section {
        name,
        ..Section::default()
    };
    loop {
        match toks.get(*pos) {
            None => {
                if depth > 0 {
                    bail!("LVM metadata: section {} does not end", sec.name);
                }
                return Ok(sec);
            }
            Some(Tok::Punct('}')) => {
                if depth == 0 {
                    return Ok(sec);
                }
                *pos += 1;
                return Ok(sec);
            }
            Some(Tok::Word(w)) => {
                let key = w.clone();
                *pos += 1;
                match toks.get(*pos) {
                    Some(Tok::Punct('=')) => {
                        *pos += 1;
                        let v = value(toks, pos, &key)?;
                        sec.values.push((key, v));
                    }
                    Some(Tok::Punct('{')) => {
                        *pos += 1;
                        let s = items(toks, pos, key, depth + 1)?;
                        sec.sections.push(s);
                    }
                    _ => bail!("LVM metadata: '{key}' is followed by neither '=' nor '{{'"),
                }
            }
            Some(t) => bail!("LVM metadata: unexpected {t:?} in section {}", sec.name),
        }
    }
}

fn value(toks: &[Tok], pos: &mut usize, key: &str) -> Result<Value> {
    let t = toks
        .get(*pos)
        .with_context(|| format!("LVM metadata: {key} has no value"))?;
    *pos += 1;
    Ok(match t {
        Tok::Str(s) => Value::Str(s.clone()),
        Tok::Word(w) => Value::Num(
            w.parse()
                .with_context(|| format!("LVM metadata: {key} = {w} is not a number"))?,
        ),
        Tok::Punct('[') => {
            let mut l = Vec::new();
            loop {
                match toks.get(*pos) {
                    Some(Tok::Punct(']')) => {
                        *pos += 1;
                        break;
                    }
                    Some(Tok::Punct(',')) => *pos += 1,
                    Some(Tok::Punct('[')) | None => {
                        bail!("LVM metadata: the list of {key} does not end")
                    }
                    Some(_) => l.push(value(toks, pos, key)?),
                }
            }
            Value::List(l)
        }
        t => bail!("LVM metadata: {key} = {t:?}"),
    })
}

/// One thin pool to bring back after `vgcfgrestore --force`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinPool {
    pub pool: String,
    /// Where the pool's metadata LV lies: (first sector, sectors, PV UUID,
    /// sector on that PV), one linear device-mapper target each.
    pub meta_map: Vec<(u64, u64, String, u64)>,
    /// Empty thin metadata in `thin_restore`'s XML form.
    pub xml: String,
}

fn sane_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 128
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+_.-".contains(&b))
}

/// The thin pools of `vg` in its metadata `text`, each with the table of
/// its metadata LV and its empty thin metadata. Errors say what is not
/// understood (the plan then recreates the VG LV by LV instead).
pub fn thin_pools(text: &str, vg: &str) -> Result<Vec<ThinPool>> {
    let root = parse(text)?;
    let v = root.section(vg)?;
    let Ok(lvs) = v.section("logical_volumes") else {
        return Ok(Vec::new());
    };
    let is_pool = |lv: &Section| {
        lv.segments()
            .iter()
            .any(|s| s.str("type").ok() == Some("thin-pool"))
    };
    if !lvs.sections.iter().any(is_pool) {
        return Ok(Vec::new());
    }
    let es = v.num("extent_size")?;
    if es == 0 {
        bail!("{vg}: extent_size 0");
    }
    let pvs = v.section("physical_volumes")?;
    let pv = |name: &str| -> Result<(String, u64, u64)> {
        let p = pvs.section(name)?;
        Ok((
            p.str("id")?.to_string(),
            p.num("pe_start")?,
            p.num("pe_count")?,
        ))
    };
    let by_name: std::collections::HashMap<&str, &Section> =
        lvs.sections.iter().map(|s| (s.name.as_str(), s)).collect();
    let lv_named = |n: &str| {
        by_name
            .get(n)
            .copied()
            .with_context(|| format!("{vg}: no LV {n}"))
    };
    // Thin volumes by their pool, with (device id, transaction id).
    let mut thins: std::collections::HashMap<&str, Vec<(u64, u64)>> = Default::default();
    for t in &lvs.sections {
        for s in t.segments() {
            if s.str("type").ok() == Some("thin") {
                thins
                    .entry(s.str("thin_pool")?)
                    .or_default()
                    .push((s.num("device_id")?, s.num("transaction_id")?));
            }
        }
    }
    let mul = |a: u64, b: u64| a.checked_mul(b).context("LVM metadata: sizes overflow");
    let mut out = Vec::new();
    for lv in lvs.sections.iter().filter(|s| is_pool(s)) {
        let segs = lv.segments();
        let [seg] = segs[..] else {
            bail!("thin pool {vg}/{}: {} segments", lv.name, segs.len());
        };
        let meta_lv = seg.str("metadata")?;
        let data_lv = seg.str("pool")?;
        let tid = seg.num("transaction_id")?;
        let chunk = seg.num("chunk_size")?;
        if !sane_name(&lv.name) || chunk == 0 {
            bail!("thin pool {vg}/{}: bad name or chunk size", lv.name);
        }
        // The metadata LV: linear segments on PVs, one after the other.
        let mut meta_map = Vec::new();
        let mut next = 0;
        for s in lv_named(meta_lv)?.segments() {
            if s.str("type")? != "striped" || s.num("stripe_count")? != 1 {
                bail!("{vg}/{meta_lv}: not linear");
            }
            let Some(Value::List(st)) = s.get("stripes") else {
                bail!("{vg}/{meta_lv}: no stripes")
            };
            let [Value::Str(pvname), Value::Num(pe)] = &st[..] else {
                bail!("{vg}/{meta_lv}: stripes {st:?}")
            };
            let (uuid, pe_start, pe_count) = pv(pvname)?;
            let (start, count) = (s.num("start_extent")?, s.num("extent_count")?);
            let end = pe
                .checked_add(count)
                .context("LVM metadata: sizes overflow")?;
            if start != next || count == 0 || end > pe_count {
                bail!("{vg}/{meta_lv}: segments not contiguous or beyond {pvname}");
            }
            next = start + count;
            let off = mul(*pe, es)?
                .checked_add(pe_start)
                .context("LVM metadata: sizes overflow")?;
            meta_map.push((mul(start, es)?, mul(count, es)?, uuid, off));
        }
        if meta_map.is_empty() {
            bail!("{vg}/{meta_lv}: no segments");
        }
        // The data LV: plain extents (a RAID or cached one would come back
        // with stale state under it).
        let mut data_extents: u64 = 0;
        for s in lv_named(data_lv)?.segments() {
            if s.str("type")? != "striped" {
                bail!("{vg}/{data_lv}: not striped or linear");
            }
            data_extents = data_extents
                .checked_add(s.num("extent_count")?)
                .context("LVM metadata: sizes overflow")?;
        }
        let data_sectors = mul(data_extents, es)?;
        if data_sectors % chunk != 0 {
            bail!("{vg}/{data_lv}: not a whole number of chunks");
        }
        let mut xml = format!(
            "<superblock uuid=\"\" time=\"0\" transaction=\"{tid}\" data_block_size=\"{chunk}\" nr_data_blocks=\"{}\">\n",
            data_sectors / chunk
        );
        for (dev, t) in thins.get(lv.name.as_str()).into_iter().flatten() {
            xml.push_str(&format!(
                "  <device dev_id=\"{dev}\" mapped_blocks=\"0\" transaction=\"{t}\" creation_time=\"0\" snap_time=\"0\">\n  </device>\n"
            ));
        }
        xml.push_str("</superblock>\n");
        out.push(ThinPool {
            pool: lv.name.clone(),
            meta_map,
            xml,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `vgcfgbackup` of a VG with a 300 MiB thin pool holding thin volumes
    /// a (device 1) and b (device 2), made by LVM 2.03.16 in a rescue VM.
    pub const THIN_VG: &str = include_str!("../../tests/fixtures/layout/thin-vg.meta");

    #[test]
    fn a_thin_pool_is_found_with_its_metadata_extents_and_devices() {
        let p = thin_pools(THIN_VG, "tvg").unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].pool, "pool");
        // pool_tmeta: 1 extent at pe 76 of pv0 (pe_start 2048, 8192-sector extents).
        assert_eq!(
            p[0].meta_map,
            vec![(
                0,
                8192,
                "7ComH8-RgPU-2U9C-iUSs-VLvd-c93g-0IdRCL".to_string(),
                2048 + 76 * 8192
            )]
        );
        // 75 extents of data in 128-sector chunks; devices 1 and 2 with
        // their own transaction ids; the pool's is 2.
        assert!(p[0].xml.starts_with(
            "<superblock uuid=\"\" time=\"0\" transaction=\"2\" data_block_size=\"128\" nr_data_blocks=\"4800\">"
        ));
        assert!(p[0]
            .xml
            .contains("<device dev_id=\"1\" mapped_blocks=\"0\" transaction=\"0\""));
        assert!(p[0]
            .xml
            .contains("<device dev_id=\"2\" mapped_blocks=\"0\" transaction=\"1\""));
        assert_eq!(p[0].xml.matches("<device ").count(), 2);
    }

    #[test]
    fn bad_or_unusual_metadata_is_refused_not_guessed() {
        assert!(thin_pools(THIN_VG, "other").is_err());
        // A metadata LV on two stripes is not mapped by hand.
        let striped = THIN_VG.replacen(
            "stripe_count = 1\t# linear\n\n\t\t\t\tstripes = [\n\t\t\t\t\t\"pv0\", 76",
            "stripe_count = 2\n\n\t\t\t\tstripes = [\n\t\t\t\t\t\"pv0\", 76",
            1,
        );
        assert_ne!(striped, THIN_VG, "the fixture changed: fix the test");
        assert!(thin_pools(&striped, "tvg").is_err());
        // A data LV that is not plain extents (RAID here).
        let raid = THIN_VG.replacen(
            "extent_count = 75\t# 300 Megabytes\n\n\t\t\t\ttype = \"striped\"",
            "extent_count = 75\n\n\t\t\t\ttype = \"raid1\"",
            1,
        );
        assert_ne!(raid, THIN_VG, "the fixture changed: fix the test");
        assert!(thin_pools(&raid, "tvg").is_err());
        // Sizes that overflow are refused, not a panic.
        let huge = THIN_VG.replace(
            "extent_count = 75\t",
            "extent_count = 18446744073709551615\t",
        );
        assert!(thin_pools(&huge, "tvg").is_err());
        // A metadata LV beyond the end of its PV.
        let beyond = THIN_VG.replace("\"pv0\", 76", "\"pv0\", 149");
        assert!(thin_pools(&beyond, "tvg").is_err());
        for bad in [
            "tvg {",
            "tvg { a = }",
            "tvg { a = \"x }",
            "tvg { a = [1, 2 }",
            "}",
            "tvg { a = -1 }",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let deep = "a { ".repeat(40) + &"} ".repeat(40);
        assert!(parse(&deep).is_err());
        // Plain LVs: no thin pools, nothing to do.
        assert_eq!(
            thin_pools(
                "v { extent_size = 8 physical_volumes { } logical_volumes { l { segment1 { type = \"striped\" } } } }",
                "v"
            )
            .unwrap(),
            vec![]
        );
    }
}
