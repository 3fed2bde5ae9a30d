//! One cell of the recovery matrix (`scripts/e2e.sh`): the times of its
//! phases, PASS or FAIL with the phase that failed and why, and its work
//! directory (removed when it passes, kept and named when it fails).
//!
//! A test becomes a cell by holding a [`Cell`] for its whole body. The
//! helpers that boot and wait ([`phase`], [`phase_end`], [`add_phase`])
//! record into the cell of the current thread and do nothing without one,
//! so the same helpers serve the CI tier's tests, which are not cells.
//!
//! When a cell ends, its record goes to `<out>/cells/<name>.json` and the
//! run's `results.json` and `results.md` are written again from all records
//! there (`<out>` is `$LIFEBOAT_E2E_OUT`, else `target/e2e`).

use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::{Mutex, Once};
use std::time::Instant;

/// The phases whose sum is the recovery time objective: from a blank
/// machine to the recovered system's login.
pub const RTO_PHASES: [&str; 3] = ["rescue boot", "restore", "first boot"];

struct State {
    name: String,
    started: Instant,
    phases: Vec<(String, f64)>,
    open: Option<(String, Instant)>,
    dir: PathBuf,
}

thread_local! {
    static CURRENT: RefCell<Option<State>> = const { RefCell::new(None) };
}

/// Panic messages by thread name (libtest names a test's thread after it).
static PANICS: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());
/// One writer of results.json / results.md at a time.
static RESULTS: Mutex<()> = Mutex::new(());

fn install_panic_recorder() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info
                .payload()
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            let at = info
                .location()
                .map(|l| format!(" ({}:{})", l.file(), l.line()))
                .unwrap_or_default();
            let thread = std::thread::current().name().unwrap_or("").to_string();
            if let Ok(mut p) = PANICS.lock() {
                p.push((thread, format!("{msg}{at}")));
            }
            previous(info)
        }));
    });
}

/// A matrix cell, alive for the test's body.
pub struct Cell;

impl Cell {
    /// Start cell `name` (its name in `scripts/e2e.sh --list`) with a fresh
    /// work directory.
    pub fn start(name: &str) -> Cell {
        install_panic_recorder();
        let dir = super::work_dir(&format!("cell-{name}"));
        CURRENT.with(|c| {
            *c.borrow_mut() = Some(State {
                name: name.to_string(),
                started: Instant::now(),
                phases: vec![],
                open: None,
                dir,
            })
        });
        Cell
    }
}

fn with<R>(f: impl FnOnce(&mut State) -> R) -> Option<R> {
    CURRENT.with(|c| c.borrow_mut().as_mut().map(f))
}

fn close(s: &mut State) {
    if let Some((name, t0)) = s.open.take() {
        s.phases.push((name, t0.elapsed().as_secs_f64()));
    }
}

/// End the open phase (if any) and start `name`.
pub fn phase(name: &str) {
    with(|s| {
        close(s);
        s.open = Some((name.to_string(), Instant::now()));
    });
}

/// End the open phase.
pub fn phase_end() {
    with(close);
}

/// Forget the open phase without recording it (its work was done for
/// another cell, or is counted by [`add_phase`]).
pub fn phase_drop() {
    with(|s| s.open = None);
}

/// Record a phase measured elsewhere (the backup of a shared source).
pub fn add_phase(name: &str, seconds: f64) {
    with(|s| s.phases.push((name.to_string(), seconds)));
}

/// The name of the open phase.
pub fn open_phase() -> Option<String> {
    with(|s| s.open.as_ref().map(|(n, _)| n.clone())).flatten()
}

/// The current cell's work directory, if the test is a cell.
pub fn cell_dir() -> Option<PathBuf> {
    with(|s| s.dir.clone())
}

fn out_dir() -> PathBuf {
    std::env::var_os("LIFEBOAT_E2E_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::common::repo().join("target/e2e"))
}

fn seconds(phases: &[(String, f64)], name: &str) -> Option<f64> {
    let v: Vec<f64> = phases
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, s)| *s)
        .collect();
    (!v.is_empty()).then(|| v.iter().sum())
}

/// The one line a cell prints: `CELL: PASS|FAIL <phase: why> rto=<s> (...)`.
pub fn line(r: &serde_json::Value) -> String {
    let f = |k: &str| match r["phases"][k].as_f64() {
        Some(s) => format!("{s:.0}s"),
        None if k == "first boot" => "not booted".into(),
        None => "-".into(),
    };
    let verdict = if r["pass"] == true {
        "PASS".to_string()
    } else {
        format!(
            "FAIL {}: {}",
            r["failed_phase"].as_str().unwrap_or("?"),
            r["why"].as_str().unwrap_or("?")
        )
    };
    format!(
        "{}: {verdict} rto={} (backup {}, rescue boot {}, restore {}, first boot {})",
        r["cell"].as_str().unwrap_or("?"),
        rto(r),
        f("backup"),
        f("rescue boot"),
        f("restore"),
        f("first boot")
    )
}

/// The RTO in whole seconds, `-` when no phase of it ran.
fn rto(r: &serde_json::Value) -> String {
    match r["rto_seconds"].as_f64() {
        Some(s) if s > 0.0 => format!("{s:.0}"),
        _ => "-".into(),
    }
}

/// results.json (every record of this run) and results.md (a table).
fn write_results(dir: &std::path::Path) {
    let mut records: Vec<serde_json::Value> = std::fs::read_dir(dir.join("cells"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect();
    records.sort_by(|a, b| a["cell"].as_str().cmp(&b["cell"].as_str()));
    let json = serde_json::to_string_pretty(&records).unwrap();
    let _ = std::fs::write(dir.join("results.json"), json + "\n");
    let mut md = String::from(
        "| cell | result | RTO s | backup s | rescue boot s | restore s | first boot s | check s | why |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for r in &records {
        let f = |k: &str| {
            r["phases"][k]
                .as_f64()
                .map(|s| format!("{s:.0}"))
                .unwrap_or_else(|| "-".into())
        };
        let why = match r["pass"] == true {
            true => String::new(),
            false => format!(
                "{}: {}",
                r["failed_phase"].as_str().unwrap_or("?"),
                r["why"].as_str().unwrap_or("?").replace('|', "\\|")
            ),
        };
        md += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {why} |\n",
            r["cell"].as_str().unwrap_or("?"),
            if r["pass"] == true { "PASS" } else { "FAIL" },
            rto(r),
            f("backup"),
            f("rescue boot"),
            f("restore"),
            f("first boot"),
            f("check"),
        );
    }
    let _ = std::fs::write(dir.join("results.md"), md);
}

impl Drop for Cell {
    fn drop(&mut self) {
        let Some(mut s) = CURRENT.with(|c| c.borrow_mut().take()) else {
            return;
        };
        let failed = std::thread::panicking();
        let failed_phase = s.open.as_ref().map(|(n, _)| n.clone());
        close(&mut s);
        let thread = std::thread::current().name().unwrap_or("").to_string();
        let why = PANICS
            .lock()
            .ok()
            .and_then(|p| {
                p.iter()
                    .rev()
                    .find(|(t, _)| *t == thread)
                    .map(|(_, m)| m.clone())
            })
            .unwrap_or_default();
        // One line: the first lines of the message, at most 300 characters.
        let mut why: String = why
            .lines()
            .filter(|l| !l.trim().is_empty())
            .take(3)
            .collect::<Vec<_>>()
            .join(" / ");
        if why.chars().count() > 300 {
            why = why.chars().take(300).collect::<String>() + "…";
        }
        let mut phases = serde_json::Map::new();
        for (n, _) in &s.phases {
            if !phases.contains_key(n) {
                phases.insert(n.clone(), seconds(&s.phases, n).unwrap_or(0.0).into());
            }
        }
        let rto: f64 = RTO_PHASES
            .iter()
            .filter_map(|p| seconds(&s.phases, p))
            .sum();
        let record = serde_json::json!({
            "cell": s.name,
            "pass": !failed,
            "failed_phase": if failed { failed_phase.unwrap_or_else(|| "check".into()) } else { String::new() },
            "why": why,
            "rto_seconds": rto,
            "phases": phases,
            "wall_seconds": s.started.elapsed().as_secs_f64(),
            "work_dir": if failed { s.dir.display().to_string() } else { String::new() },
        });
        let out = out_dir();
        let _guard = RESULTS.lock();
        let _ = std::fs::create_dir_all(out.join("cells"));
        let _ = std::fs::write(
            out.join("cells").join(format!("{}.json", s.name)),
            serde_json::to_string_pretty(&record).unwrap() + "\n",
        );
        write_results(&out);
        eprintln!("{}", line(&record));
        if failed {
            eprintln!("{}: work directory kept: {}", s.name, s.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&s.dir);
        }
    }
}
