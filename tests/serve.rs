//! `lifeboat serve`: registration through OUTPUT_URL = lifeboat+http://,
//! shared layers stored once, tokens guarding the personal layers, the
//! static parts served by a stock nginx, and QEMU boots that chain to the
//! server: QEMU's own iPXE without a token (refused, the VM stops) and a
//! generic ISO under SeaBIOS whose download survives a server restart.

mod common;

use common::*;
use lifeboat_qemu::servers::{lifeboat_serve, Server};
use lifeboat_qemu::{BootSpec, Vm};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

const BOOT: Duration = Duration::from_secs(300);
const MAC_A: &str = "52:54:00:12:34:56";
const MAC_B: &str = "52:54:00:00:00:0b";

/// Register this machine with the server as host `id` answering to `mac`;
/// the image is also kept in `work/<id>`. Returns mkrescue's output.
fn register(work: &Path, port: u16, id: &str, mac: &str, more: &str) -> Output {
    register_url(
        work,
        &format!("lifeboat+http://127.0.0.1:{port}/"),
        id,
        mac,
        more,
    )
}

/// [`register`] with OUTPUT_URL = `url`.
fn register_url(work: &Path, url: &str, id: &str, mac: &str, more: &str) -> Output {
    let f = fixture();
    let conf = work.join("etc-lifeboat");
    std::fs::create_dir_all(&conf).unwrap();
    let cfg = work.join(format!("{id}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "OUTPUT_URL = \"{url}\"\nserve_host = \"{id}\"\npxe_macs = [\"{mac}\"]\n\
             iso_default = \"automatic\"\nboot_console = \"serial\"\n{more}[network]\ncapture = false\n"
        ),
    )
    .unwrap();
    let mut c = lifeboat(&conf);
    c.env("LIFEBOAT_STATE_DIR", work.join("state"))
        .arg("-c")
        .arg(&cfg)
        .arg("mkrescue")
        .arg("--kernel")
        .arg(f.kernel())
        .args(["--kver", &f.kver, "--modules-dir"])
        .arg(f.modules_dir())
        .arg("--output-dir")
        .arg(work.join(id));
    c.output().unwrap()
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "mkrescue failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn token(work: &Path, port: u16, id: &str) -> String {
    let p = work
        .join("state/serve")
        .join(format!("127.0.0.1_{port}_{id}.token"));
    let t = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&p).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the token file is readable by others");
    t.trim().to_string()
}

/// GET with curl: (status, body).
fn get(url: &str, headers: &[&str]) -> (u16, Vec<u8>) {
    let mut c = std::process::Command::new("curl");
    c.args(["-s", "-o", "-", "-w", "\n%{http_code}"]);
    for h in headers {
        c.args(["-H", h]);
    }
    let out = c.arg(url).output().unwrap();
    let mut body = out.stdout;
    let nl = body.iter().rposition(|b| *b == b'\n').unwrap();
    let code = String::from_utf8_lossy(&body[nl + 1..])
        .trim()
        .parse()
        .unwrap();
    body.truncate(nl);
    (code, body)
}

fn sha(data: &[u8]) -> String {
    let (ok, out, _) = {
        let p = std::env::temp_dir().join(format!("lb-sha-{}", std::process::id()));
        std::fs::write(&p, data).unwrap();
        let r = sh(&format!("sha256sum {}", p.display()));
        let _ = std::fs::remove_file(&p);
        r
    };
    assert!(ok);
    out.split_whitespace().next().unwrap().to_string()
}

fn chain_json(port: u16, id: &str) -> serde_json::Value {
    let (code, body) = get(
        &format!("http://127.0.0.1:{port}/hosts/{id}/chain.json"),
        &[],
    );
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            v.extend(files_below(&e.path()));
        } else if ft.is_file() {
            v.push(e.path());
        }
    }
    v
}

#[test]
fn two_hosts_share_layers_and_only_their_own_token_opens_their_personal_layer() {
    let work = tempfile::tempdir().unwrap().keep();
    let bin = lifeboat_bin();
    std::fs::write(work.join("enroll"), "enroll-secret-42\n").unwrap();
    let enroll = format!("--enroll-token-file={}", work.join("enroll").display());
    let srv = lifeboat_serve(&work.join("srv"), &bin, 0, &[&enroll]);
    let p = srv.port;

    // Without the enrollment token nobody registers.
    let o = register(&work, p, "hosta", MAC_A, "");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("HTTP 403") && err.contains("enrollment"),
        "{err}"
    );
    assert!(!srv.root.join("hosts/hosta").exists());

    let et = format!(
        "serve_enroll_token_file = \"{}\"\n",
        work.join("enroll").display()
    );
    let a = ok(register(&work, p, "hosta", MAC_A, &et));
    assert!(
        a.contains("registered with lifeboat serve") && a.contains("token (new)"),
        "{a}"
    );
    let b = ok(register(&work, p, "hostb", MAC_B, &et));
    // Host B brings nothing the server does not have already.
    assert!(b.contains("as host hostb: 0 file(s) uploaded"), "{b}");
    let (ta, tb) = (token(&work, p, "hosta"), token(&work, p, "hostb"));
    assert_ne!(ta, tb);

    // Shared layers: one file each on the server's disk.
    let (ca, cb) = (chain_json(p, "hosta"), chain_json(p, "hostb"));
    let shared = |c: &serde_json::Value| -> Vec<(String, String)> {
        let mut v = vec![(
            "kernel".to_string(),
            c["kernel"]["sha256"].as_str().unwrap().to_string(),
        )];
        for k in ["boot", "fetch"] {
            for l in c[k].as_array().unwrap() {
                if l["name"] != "personal" {
                    v.push((
                        l["name"].as_str().unwrap().into(),
                        l["sha256"].as_str().unwrap().into(),
                    ));
                }
            }
        }
        v
    };
    let (sa, sb) = (shared(&ca), shared(&cb));
    assert_eq!(sa, sb, "the hosts do not share their layers");
    let names: Vec<&str> = sa.iter().map(|(n, _)| n.as_str()).collect();
    for n in ["kernel", "base", "tools"] {
        assert!(names.contains(&n), "{names:?}");
    }
    assert!(names.iter().any(|n| n.starts_with("modules-")), "{names:?}");
    let stored: Vec<PathBuf> = std::fs::read_dir(srv.root.join("layers"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(stored.len(), sa.len(), "{stored:?}");
    for (n, h) in &sa {
        let f = srv.root.join("layers").join(h);
        assert_eq!(sha256(&f), *h, "layer {n} on the server's disk");
    }
    // No other copy of a layer anywhere under the root.
    let big: Vec<PathBuf> = files_below(&srv.root)
        .into_iter()
        .filter(|f| std::fs::metadata(f).unwrap().len() > 1 << 20)
        .collect();
    assert_eq!(big.len(), stored.len(), "{big:?}");
    // The layers are the ones mkrescue built.
    let m = manifest(&work.join("hosta"));
    for l in m.layers.iter().filter(|l| l.name != "plan") {
        assert!(
            sa.contains(&(l.name.clone(), l.sha256.clone())),
            "{}",
            l.name
        );
    }
    assert_eq!(sa[0].1, m.kernel_sha256);

    // Personal layers: own token only.
    let pa = format!("http://127.0.0.1:{p}/hosts/hosta/personal.cpio.zst");
    let pb = format!("http://127.0.0.1:{p}/hosts/hostb/personal.cpio.zst");
    assert_eq!(get(&pa, &[]).0, 403, "no token");
    assert_eq!(
        get(&pa, &["Authorization: Bearer wrong"]).0,
        403,
        "wrong token"
    );
    assert_eq!(
        get(&format!("{pa}?token={tb}"), &[]).0,
        403,
        "B's token for A"
    );
    assert_eq!(
        get(&pb, &[&format!("Authorization: Bearer {ta}")]).0,
        403,
        "A's token for B"
    );
    assert_eq!(
        get(
            &format!("http://127.0.0.1:{p}/hosts/hostb/boot.ipxe?token={ta}"),
            &[]
        )
        .0,
        403
    );
    let (code, body) = get(&pa, &[&format!("Authorization: Bearer {ta}")]);
    assert_eq!(code, 200);
    let pin = ca["fetch"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "personal")
        .unwrap()["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(sha(&body), pin, "the personal layer differs from its pin");
    let (code, body_q) = get(&format!("{pa}?token={ta}"), &[]);
    assert_eq!(
        (code, sha(&body_q)),
        (200, pin.clone()),
        "built twice, not the same bytes"
    );
    // What is in it: the host's plan, as GNU cpio lists it.
    let pf = work.join("personal-a.cpio.zst");
    std::fs::write(&pf, &body).unwrap();
    let (ok1, list, err) = sh(&format!("zstd -dc {} | cpio -it 2>/dev/null", pf.display()));
    assert!(ok1, "{err}");
    assert!(
        list.lines().any(|l| l == "etc/lifeboat/init.json"),
        "{list}"
    );
    assert!(
        list.lines().any(|l| l == "etc/lifeboat/lifeboat.toml"),
        "{list}"
    );
    // Secrets dropped into the host's directory join its personal layer
    // (and change its pin).
    let sec = srv.root.join("hosts/hosta/secrets/etc/lifeboat");
    std::fs::create_dir_all(&sec).unwrap();
    std::fs::write(sec.join("s3.cred"), "username=a\npassword=b\n").unwrap();
    let (_, body2) = get(&pa, &[&format!("Authorization: Bearer {ta}")]);
    std::fs::write(&pf, &body2).unwrap();
    let (_, list2, _) = sh(&format!("zstd -dc {} | cpio -it 2>/dev/null", pf.display()));
    assert!(
        list2.lines().any(|l| l == "etc/lifeboat/s3.cred"),
        "{list2}"
    );
    let ca2 = chain_json(p, "hosta");
    assert_ne!(
        ca2["fetch"].as_array().unwrap().last().unwrap()["sha256"],
        pin
    );
    assert_eq!(
        ca2["fetch"].as_array().unwrap().last().unwrap()["sha256"]
            .as_str()
            .unwrap(),
        sha(&body2)
    );

    // iPXE scripts: by MAC, pinned, the token passed on only when given.
    let (code, s) = get(
        &format!("http://127.0.0.1:{p}/hosts/52-54-00-12-34-56/boot.ipxe"),
        &[],
    );
    let s = String::from_utf8_lossy(&s).into_owned();
    assert_eq!(code, 200, "{s}");
    assert!(s.starts_with("#!ipxe") && s.contains("hosta"), "{s}");
    assert!(s.contains("lifeboat.layers=http://127.0.0.1:"), "{s}");
    assert!(
        s.contains(&format!(
            "/layers/{h}#sha256={h}",
            h = sa.iter().find(|x| x.0 == "tools").unwrap().1
        )),
        "{s}"
    );
    assert!(!s.contains("lifeboat.token"), "{s}");
    let (_, s2) = get(
        &format!("http://127.0.0.1:{p}/hosts/{MAC_A}/boot.ipxe?token={ta}"),
        &[],
    );
    assert!(String::from_utf8_lossy(&s2).contains(&format!("lifeboat.token={ta}")));
    let (code, g) = get(&format!("http://127.0.0.1:{p}/boot.ipxe"), &[]);
    let g = String::from_utf8_lossy(&g).into_owned();
    assert_eq!(code, 200);
    assert!(
        g.contains("chain --autofree hosts/${mac:hexhyp}/boot.ipxe"),
        "{g}"
    );
    assert_eq!(
        get(&format!("http://127.0.0.1:{p}/hosts/nosuch/boot.ipxe"), &[]).0,
        404
    );

    // Layers: ETag, conditional GET, ranges.
    let (_, tools) = sa.iter().find(|x| x.0 == "tools").unwrap();
    let lu = format!("http://127.0.0.1:{p}/layers/{tools}");
    let whole = std::fs::read(srv.root.join("layers").join(tools)).unwrap();
    let (ok2, head, _) = sh(&format!("curl -s -D - -o /dev/null -r 1000-1999 {lu}"));
    assert!(ok2);
    assert!(head.starts_with("HTTP/1.1 206"), "{head}");
    assert!(head.contains(&format!("ETag: \"{tools}\"")), "{head}");
    assert!(
        head.contains(&format!("Content-Range: bytes 1000-1999/{}", whole.len())),
        "{head}"
    );
    let (c, part) = get(&lu, &["Range: bytes=1000-1999"]);
    assert_eq!((c, &part[..]), (206, &whole[1000..2000]));
    let (c, tail) = get(&lu, &["Range: bytes=-10"]);
    assert_eq!((c, &tail[..]), (206, &whole[whole.len() - 10..]));
    assert_eq!(get(&lu, &[&format!("If-None-Match: \"{tools}\"")]).0, 304);
    assert_eq!(
        get(&lu, &[&format!("Range: bytes={}-", whole.len())]).0,
        416
    );
    // A stale If-Range gets the whole layer.
    let (c, all) = get(&lu, &["Range: bytes=5-", "If-Range: \"other\""]);
    assert_eq!((c, all.len()), (200, whole.len()));
    assert_eq!(
        get(
            &format!("http://127.0.0.1:{p}/layers/{}", "0".repeat(64)),
            &[]
        )
        .0,
        404
    );

    // A second registration keeps the token and uploads nothing new.
    let a2 = ok(register(&work, p, "hosta", MAC_A, ""));
    assert!(
        a2.contains("0 file(s) uploaded") && a2.contains("token (unchanged)"),
        "{a2}"
    );
    assert_eq!(token(&work, p, "hosta"), ta);
    // Someone else cannot take the host over without its token or the
    // enrollment token.
    let other = work.join("other");
    std::fs::create_dir_all(&other).unwrap();
    let o = register(&other, p, "hosta", MAC_A, "");
    assert!(!o.status.success(), "host A was taken over");
    assert!(String::from_utf8_lossy(&o.stderr).contains("HTTP 403"));

    // The static parts work from a stock nginx (the tree copied as it is).
    let ng = lifeboat_qemu::servers::nginx(&work.join("nginx"));
    let (okc, _, e) = sh(&format!(
        "cp -a {}/. {}/",
        srv.root.display(),
        ng.root.display()
    ));
    assert!(okc, "{e}");
    let np = ng.port;
    let (c, gs) = get(&format!("http://127.0.0.1:{np}/boot.ipxe"), &[]);
    assert_eq!((c, String::from_utf8_lossy(&gs).into_owned()), (200, g));
    let (c, hs) = get(
        &format!("http://127.0.0.1:{np}/hosts/52-54-00-00-00-0b/boot.ipxe"),
        &[],
    );
    assert_eq!(c, 200);
    assert!(String::from_utf8_lossy(&hs).contains("rescue of hostb"));
    let (c, cj) = get(
        &format!("http://127.0.0.1:{np}/hosts/52-54-00-00-00-0b/chain.json"),
        &[],
    );
    assert_eq!(c, 200);
    let cj: serde_json::Value = serde_json::from_slice(&cj).unwrap();
    assert_eq!(cj["host"], "hostb");
    let (c, part) = get(
        &format!("http://127.0.0.1:{np}/layers/{tools}"),
        &["Range: bytes=1000-1999"],
    );
    assert_eq!((c, &part[..]), (206, &whole[1000..2000]));
    // The host's private files are not world-readable for nginx to hand out.
    for f in ["host.json", "token.sha256"] {
        let md = std::fs::metadata(srv.root.join("hosts/hosta").join(f)).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&md.permissions()) & 0o077,
            0,
            "{f}"
        );
    }

    // Administration: list, a new token, remove, gc.
    let conf = work.join("etc-lifeboat");
    let admin = |args: &[&str]| {
        let o = run_ok(
            lifeboat(&conf)
                .arg("serve")
                .arg("--root")
                .arg(&srv.root)
                .args(args),
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let list = admin(&["--list"]);
    assert!(
        list.contains("hosta") && list.contains("hostb") && list.contains(MAC_B),
        "{list}"
    );
    let listed: serde_json::Value = serde_json::from_str(&admin(&["--list", "--json"])).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
    let tb2 = admin(&["--new-token", "hostb"]).trim().to_string();
    assert_eq!(tb2.len(), 64);
    assert_eq!(
        get(&pb, &[&format!("Authorization: Bearer {tb}")]).0,
        403,
        "the old token still works"
    );
    assert_eq!(get(&pb, &[&format!("Authorization: Bearer {tb2}")]).0, 200);
    // A dry run names the host's directory and MAC link, removes nothing.
    let dry = admin(&["--remove", "hostb", "--dry-run"]);
    assert!(
        dry.contains("hosts/hostb") && dry.contains("52-54-00-00-00-0b") && dry.contains("dry run"),
        "{dry}"
    );
    assert!(srv.root.join("hosts/hostb/host.json").is_file());
    assert_eq!(get(&pb, &[&format!("Authorization: Bearer {tb2}")]).0, 200);
    admin(&["--remove", "hostb"]);
    assert!(!srv.root.join("hosts/hostb").exists());
    assert!(
        std::fs::symlink_metadata(srv.root.join("hosts/52-54-00-00-00-0b")).is_err(),
        "B's MAC link stays"
    );
    assert_eq!(get(&pb, &[&format!("Authorization: Bearer {tb2}")]).0, 404);
    let stale = srv.root.join("layers").join("e".repeat(64));
    std::fs::write(&stale, "an old kernel's layer").unwrap();
    let (okt, _, _) = sh(&format!("touch -d '2 hours ago' {}", stale.display()));
    assert!(okt);
    let dry = admin(&["--gc", "--dry-run"]);
    assert!(
        dry.contains(&format!("would remove layers/{}", "e".repeat(64)))
            && dry.contains("1 unused layer(s)"),
        "{dry}"
    );
    assert!(stale.exists(), "gc --dry-run removed a layer");
    let gc = admin(&["--gc"]);
    assert!(gc.contains("removed 1 unused layer(s)"), "{gc}");
    assert!(!stale.exists());
    for (_, h) in &sa {
        assert!(
            srv.root.join("layers").join(h).is_file(),
            "gc removed a used layer"
        );
    }

    // The access log has every request, never a token.
    let log = std::fs::read_to_string(srv.root.join("access.log")).unwrap();
    assert!(
        log.contains("\"GET /hosts/hosta/personal.cpio.zst\" 403"),
        "{log}"
    );
    assert!(log.contains("token=REDACTED"), "{log}");
    assert!(
        !log.contains(&ta) && !log.contains(&tb),
        "a token is in the access log"
    );

    // Graceful shutdown on SIGTERM.
    let pid = sh(&format!("pgrep -f 'serve --root {}'", srv.root.display())).1;
    let pid = pid
        .split_whitespace()
        .next()
        .expect("serve is not running")
        .to_string();
    let t = Instant::now();
    let (okk, _, _) = sh(&format!("kill -TERM {pid}"));
    assert!(okk);
    // It exits (a zombie until reaped: state Z).
    let state = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit(')').next().and_then(|r| r.trim().chars().next()))
    };
    while !matches!(state(), Some('Z') | None) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "serve did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let slog = std::fs::read_to_string(srv.dir.join("serve.log")).unwrap();
    assert!(
        slog.contains("lifeboat serve: stopping") && slog.contains("stopped ("),
        "{slog}"
    );
    drop(srv);
}

/// Start the server at `port` again (same root).
fn restart(dir: &Path, port: u16, args: &[&str]) -> Server {
    lifeboat_serve(dir, &lifeboat_bin(), port, args)
}

/// A diskless VM that network-boots through QEMU's own iPXE, which slirp's
/// DHCP points at `bootfile`.
fn ipxe_vm(work: &Path, bootfile: &str, log: &str) -> Vm {
    let mut spec = BootSpec {
        memory_mb: 1536,
        log: Some(work.join(log)),
        ..BootSpec::from_disks()
    }
    .with_user_net(&format!("bootfile={bootfile}"));
    spec.extra_args
        .extend(["-boot".to_string(), "n".to_string()]);
    Vm::boot(&spec).unwrap()
}

#[test]
fn ipxe_without_the_token_gets_403_for_the_personal_layer_and_stops() {
    let work = tempfile::tempdir().unwrap().keep();
    let srv = lifeboat_serve(&work.join("srv"), &lifeboat_bin(), 0, &[]);
    ok(register(&work, srv.port, "hosta", MAC_A, ""));
    // QEMU's iPXE gets the generic script by DHCP; it chains by MAC to
    // host A's script, which has no token to hand on.
    let mut vm = ipxe_vm(
        &work,
        &format!("http://10.0.2.2:{}/boot.ipxe", srv.port),
        "ipxe-notoken.log",
    );
    vm.wait_for("the chained layers could not be loaded", BOOT)
        .unwrap_or_else(|e| panic!("{e}"));
    // Give it time to (wrongly) go on.
    std::thread::sleep(Duration::from_secs(3));
    let c = vm.console();
    // (QEMU's iPXE prints to the screen only: the access log below shows
    // the chain by MAC.)
    assert!(c.contains("lifeboat: fetching tools from"), "{c}");
    assert!(c.contains("lifeboat.recover=auto"), "{c}");
    assert!(c.contains("HTTP 403"), "{c}");
    assert!(
        c.contains("lifeboat.token="),
        "the message does not say what to do:\n{c}"
    );
    assert!(
        !c.contains("starting `lifeboat recover --auto`"),
        "recovery started:\n{c}"
    );
    assert!(
        !c.contains("lifeboat: ready"),
        "the rescue system went on:\n{c}"
    );
    let log = std::fs::read_to_string(srv.root.join("access.log")).unwrap();
    assert!(
        log.contains("\"GET /hosts/hosta/personal.cpio.zst\" 403"),
        "{log}"
    );
    assert!(log.contains("\"GET /boot.ipxe\" 200"), "{log}");
    assert!(
        log.contains("\"GET /hosts/52-54-00-12-34-56/boot.ipxe?uuid="),
        "{log}"
    );
}

#[test]
fn generic_iso_chains_to_the_server_and_resumes_after_a_restart() {
    let work = tempfile::tempdir().unwrap().keep();
    let dir = work.join("srv");
    // Slow enough that the server can be stopped mid-download.
    let rate = ["--max-rate", "3000000"];
    let srv = lifeboat_serve(&dir, &lifeboat_bin(), 0, &rate);
    let port = srv.port;
    ok(register(&work, port, "hosta", MAC_A, ""));
    let ta = token(&work, port, "hosta");
    // The generic medium: base and modules only, chaining to the server.
    let out = work.join("generic");
    let o = build(
        &work,
        &out,
        "OUTPUT = \"ISO\"\nISO_VOLID = \"LBCHAIN\"\niso_default = \"manual\"\nboot_console = \"serial\"\nboot_timeout = 1\n",
        &["--generic", "--chain", &format!("http://10.0.2.2:{port}/")],
    );
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(said.contains("generic medium: chains to"), "{said}");
    let m = manifest(&out);
    let names: Vec<&str> = m.layers.iter().map(|l| l.name.as_str()).collect();
    assert!(
        !names.contains(&"tools") && !names.contains(&"plan"),
        "{names:?}"
    );
    assert!(names.contains(&"base"), "{names:?}");
    let iso = written(&out, "iso");
    let spec = BootSpec {
        memory_mb: 1536,
        log: Some(work.join("generic.log")),
        extra_args: vec![
            "-cdrom".into(),
            iso.display().to_string(),
            "-boot".into(),
            "d".into(),
        ],
        ..BootSpec::from_disks()
    }
    .with_user_net("");
    let mut vm = Vm::boot(&spec).unwrap();
    let pos = vm
        .wait_for("lifeboat: fetching tools from", BOOT)
        .unwrap_or_else(|e| panic!("the generic ISO did not chain: {e}"));
    // Stop the server in the middle of the tools layer, then bring it back.
    std::thread::sleep(Duration::from_millis(2500));
    drop(srv);
    let pos = vm
        .wait_for_from("retrying in", pos, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("the init did not notice the server going: {e}"));
    std::thread::sleep(Duration::from_secs(2));
    let srv = restart(&dir, port, &rate);
    let pos = vm
        .wait_for_from(
            "lifeboat: resuming tools at byte",
            pos,
            Duration::from_secs(90),
        )
        .unwrap_or_else(|e| panic!("no resume: {e}"));
    // No token on the command line: the init asks on the console.
    let pos = vm
        .wait_for_from("token: ", pos, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("the init did not ask for the token: {e}"));
    vm.send_line("not-the-token").unwrap();
    let pos = vm
        .wait_for_from("token: ", pos, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("a wrong token was not asked again: {e}"));
    vm.send_line(&ta).unwrap();
    let pos = vm
        .wait_for_from("lifeboat: ready", pos, BOOT)
        .unwrap_or_else(|e| panic!("the chained rescue system did not come up: {e}"));
    // The line after "ready" (what the image carries) may still be on its
    // way: wait for it rather than read the console at once.
    vm.wait_for_from("this image carries", pos, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("no word on what the chained image carries: {e}"));
    let c = vm.console();
    assert!(
        c.contains("tools (") && c.contains("verified, sha256"),
        "{c}"
    );
    assert!(c.contains("personal ("), "{c}");
    assert!(c.contains("chained layers loaded"), "{c}");
    assert!(
        c.contains("this image carries a backup") || c.contains("carries no recovery plan"),
        "{c}"
    );
    // The resumed request was a range request answered with 206.
    let log = std::fs::read_to_string(srv.root.join("access.log")).unwrap();
    let tools = manifest(&work.join("hosta"))
        .layers
        .iter()
        .find(|l| l.name == "tools")
        .unwrap()
        .sha256
        .clone();
    assert!(
        log.contains(&format!("\"GET /layers/{tools}\" 206")),
        "{log}"
    );
    assert!(
        log.contains("\"GET /hosts/hosta/personal.cpio.zst\" 403"),
        "{log}"
    );
    assert!(
        log.contains("\"GET /hosts/hosta/personal.cpio.zst\" 200"),
        "{log}"
    );
    assert!(!log.contains(&ta), "the token is in the access log");
}

/// HTTPS end to end on the host: registration through lifeboat+https://
/// with a private CA, the init's fetcher over TLS (its CA from the base
/// layer), a tampered layer refused with nothing of it unpacked, and the
/// connection bound answered with 503.
#[test]
fn https_registration_and_fetch_refuse_a_tampered_layer() {
    let work = tempfile::tempdir().unwrap().keep();
    let certs = work.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    lifeboat_qemu::servers::make_certs(&certs);
    let (cert, key, ca) = (
        certs.join("srv.pem"),
        certs.join("srv.key"),
        certs.join("ca.pem"),
    );
    let tls = [
        format!("--tls-cert={}", cert.display()),
        format!("--tls-key={}", key.display()),
        "--max-connections=1".to_string(),
    ];
    let args: Vec<&str> = tls.iter().map(String::as_str).collect();
    let srv = lifeboat_serve(&work.join("srv"), &lifeboat_bin(), 0, &args);
    let p = srv.port;
    // Untrusted without the CA.
    let conf = work.join("etc-lifeboat");
    let url = format!("lifeboat+https://127.0.0.1:{p}/");
    let reg = |extra: &str| register_url(&work, &url, "hosta", MAC_A, extra);
    let o = reg("");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("cannot reach lifeboat serve at https://127.0.0.1"),
        "{err}"
    );
    let said = ok(reg(&format!("backup_ca_file = \"{}\"\n", ca.display())));
    assert!(
        said.contains("registered with lifeboat serve https://"),
        "{said}"
    );
    let t = std::fs::read_to_string(
        work.join("state/serve")
            .join(format!("127.0.0.1_{p}_hosta.token")),
    )
    .unwrap();
    // The base layer carries the CA, so the init trusts the server at once.
    let m = manifest(&work.join("hosta"));
    let base = work.join("base-unpacked");
    run_ok(
        lifeboat(&conf)
            .args(["image", "unpack"])
            .arg(work.join("hosta"))
            .arg(&base)
            .args(["--layer", "base"]),
    );
    assert_eq!(
        std::fs::read(base.join("etc/lifeboat/ca-bundle.pem")).unwrap(),
        std::fs::read(&ca).unwrap()
    );

    // The connection bound: one idle keep-alive connection holds the only
    // slot; the next request gets 503.
    let idle = std::net::TcpStream::connect(("127.0.0.1", p)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (ok503, out, _) = sh(&format!(
        "curl -s -o /dev/null -w '%{{http_code}}' --cacert {} https://127.0.0.1:{p}/boot.ipxe; true",
        ca.display()
    ));
    assert!(ok503);
    assert_eq!(
        out.trim(),
        "503",
        "over the bound, TLS clients get a 503 after the handshake"
    );
    drop(idle);
    std::thread::sleep(Duration::from_millis(500));

    // The init's fetcher over TLS.
    let cmdline = work.join("cmdline");
    std::fs::write(
        &cmdline,
        format!(
            "console=ttyS0 lifeboat.chain=https://127.0.0.1:{p}/ lifeboat.host={MAC_A} lifeboat.token={} lifeboat.recover=auto\n",
            t.trim()
        ),
    )
    .unwrap();
    let fetch = |dest: &Path, state: &Path| {
        lifeboat(&conf)
            .arg("fetch-layers")
            .arg("--cmdline")
            .arg(&cmdline)
            .arg("--dest")
            .arg(dest)
            .arg("--state")
            .arg(state)
            .arg("--ca-file")
            .arg(&ca)
            .output()
            .unwrap()
    };
    let (d1, s1) = (work.join("root1"), work.join("state1"));
    let o = fetch(&d1, &s1);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("tools (") && e.contains("personal ("), "{e}");
    assert!(d1.join("etc/lifeboat/init.json").is_file());
    assert!(
        d1.join("usr/bin/bash").exists() || d1.join("bin/bash").exists(),
        "{e}"
    );

    // Tamper with the tools layer on the server's disk: refused, and
    // nothing of it (or after it) is unpacked.
    let tools = m.layers.iter().find(|l| l.name == "tools").unwrap();
    let lp = srv.root.join("layers").join(&tools.sha256);
    let mut data = std::fs::read(&lp).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    std::fs::write(&lp, &data).unwrap();
    let (d2, s2) = (work.join("root2"), work.join("state2"));
    let o = fetch(&d2, &s2);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a tampered layer was accepted: {e}");
    assert!(
        e.contains(&format!("the pin says {}", tools.sha256)) && e.contains("refusing it"),
        "{e}"
    );
    assert!(
        !d2.join("etc/lifeboat/init.json").exists(),
        "the personal layer was unpacked"
    );
    assert!(!d2.join("usr/bin/bash").exists() && !d2.join("bin/bash").exists());
    assert!(
        std::fs::read_dir(&s2).unwrap().next().is_none(),
        "the bad download was kept"
    );
}

/// A host registered with a signing key: openssl verifies the plan's and
/// the manifest's signatures; the init's fetcher takes the signed personal
/// layer, and when the server's copy of the plan is changed, the init in a
/// QEMU boot through iPXE refuses it, names the file and does not go on.
#[test]
fn signed_plan_tampered_on_the_server_is_refused_by_the_init() {
    let work = tempfile::tempdir().unwrap().keep();
    let conf = work.join("etc-lifeboat");
    std::fs::create_dir_all(&conf).unwrap();
    let key = work.join("signing.key");
    let said = String::from_utf8_lossy(
        &run_ok(lifeboat(&conf).arg("keygen").arg("--out").arg(&key)).stdout,
    )
    .to_string();
    let pubkey = work.join("signing.pub");
    // openssl reads the key and derives the same public key.
    let (ok_, pem, err) = sh(&format!("openssl pkey -in {} -pubout", key.display()));
    assert!(ok_, "openssl cannot read the key: {err}");
    assert_eq!(pem, std::fs::read_to_string(&pubkey).unwrap());
    let fp = said
        .split("fingerprint ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .unwrap_or_else(|| panic!("{said}"))
        .to_string();
    let srv = lifeboat_serve(&work.join("srv"), &lifeboat_bin(), 0, &[]);
    let p = srv.port;
    // A recovery hook script: the signature must cover it too.
    let hook = work.join("post-hook.sh");
    std::fs::write(&hook, "#!/bin/sh\necho hook ran\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    ok(register(
        &work,
        p,
        "hosta",
        MAC_A,
        &format!(
            "signing_key = \"{}\"\n[hooks]\npost_recovery = [\"{} --quiet\"]\n",
            key.display(),
            hook.display()
        ),
    ));
    let ta = token(&work, p, "hosta");
    let img = work.join("hosta");
    // Independent checks: openssl verifies both signatures.
    let plan = work.join("plan-unpacked");
    run_ok(
        lifeboat(&conf)
            .args(["image", "unpack"])
            .arg(&img)
            .arg(&plan)
            .args(["--layer", "plan"]),
    );
    for (data, sig) in [
        (
            plan.join("etc/lifeboat/plan.sums"),
            plan.join("etc/lifeboat/plan.sums.sig"),
        ),
        (img.join("manifest.json"), img.join("manifest.json.sig")),
    ] {
        let (_, out, err) = sh(&format!(
            "openssl pkeyutl -verify -pubin -inkey {} -rawin -in {} -sigfile {} 2>&1",
            pubkey.display(),
            data.display(),
            sig.display()
        ));
        assert!(
            out.contains("Signature Verified Successfully"),
            "{}: {out}{err}",
            data.display()
        );
    }
    let sums = std::fs::read_to_string(plan.join("etc/lifeboat/plan.sums")).unwrap();
    assert!(sums.contains(" etc/lifeboat/lifeboat.toml\n"), "{sums}");
    let hook_rel = hook.display().to_string();
    let hook_rel = hook_rel.trim_start_matches('/');
    assert!(
        sums.contains(&format!(" {hook_rel}\n")),
        "the hook script is not signed: {sums}"
    );
    let mode = std::fs::metadata(plan.join(hook_rel))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o111, 0o111, "the hook script lost its exec bits");
    run_ok(
        lifeboat(&conf)
            .args(["image", "verify"])
            .arg(&img)
            .arg("--pubkey")
            .arg(&pubkey),
    );
    // The init's fetcher, on a root where the kernel unpacked the base
    // layer (which carries the public key): the signed layer is taken.
    let cmdline = work.join("cmdline");
    std::fs::write(
        &cmdline,
        format!("console=ttyS0 lifeboat.chain=http://127.0.0.1:{p}/ lifeboat.host={MAC_A} lifeboat.token={ta}\n"),
    )
    .unwrap();
    let fetch = |name: &str| {
        let dest = work.join(format!("root-{name}"));
        run_ok(
            lifeboat(&conf)
                .args(["image", "unpack"])
                .arg(&img)
                .arg(&dest)
                .args(["--layer", "base"]),
        );
        assert!(dest.join("etc/lifeboat/signing.pub").is_file());
        let o = lifeboat(&conf)
            .arg("fetch-layers")
            .arg("--cmdline")
            .arg(&cmdline)
            .arg("--dest")
            .arg(&dest)
            .arg("--state")
            .arg(work.join(format!("state-{name}")))
            .output()
            .unwrap();
        (o, dest)
    };
    let (o, dest) = fetch("good");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains(&format!("personal signature verified (key {fp})")),
        "{e}"
    );
    assert!(dest.join("etc/lifeboat/init.json").is_file());

    // The server hands out another layer as host A's tools: one of the
    // image's own layers under another name, then one the plan does not
    // name at all. The signed plan names each shared layer: both are
    // refused before anything is fetched or unpacked.
    let hj = srv.root.join("hosts/hosta/host.json");
    let orig = std::fs::read_to_string(&hj).unwrap();
    let rec: serde_json::Value = serde_json::from_str(&orig).unwrap();
    let base = rec["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "base")
        .unwrap()
        .clone();
    for (case, sha, size, want) in [
        (
            "swapped",
            base["sha256"].clone(),
            base["size"].clone(),
            "is the signed plan's layer base, not tools".to_string(),
        ),
        (
            "foreign",
            serde_json::json!("f".repeat(64)),
            serde_json::json!(4096),
            "is not a layer the signed plan names".to_string(),
        ),
    ] {
        let mut r = rec.clone();
        for l in r["layers"].as_array_mut().unwrap() {
            if l["name"] == "tools" {
                l["sha256"] = sha.clone();
                l["size"] = size.clone();
            }
        }
        std::fs::write(&hj, serde_json::to_string(&r).unwrap()).unwrap();
        let (o, dest) = fetch(case);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{case}: accepted: {e}");
        assert!(e.contains(&want), "{case}: {e}");
        assert!(
            !dest.join("etc/lifeboat/init.json").exists() && !dest.join("usr/bin/bash").exists(),
            "{case}: something was unpacked"
        );
    }
    std::fs::write(&hj, &orig).unwrap();

    // The server's stored plan of host A changed (one line added to its
    // configuration), repacked as the server keeps it.
    let stored: Vec<PathBuf> = std::fs::read_dir(srv.root.join("hosts/hosta"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("plan-")
        })
        .collect();
    assert_eq!(stored.len(), 1, "{stored:?}");
    let toml = plan.join("etc/lifeboat/lifeboat.toml");
    let mut t = std::fs::read_to_string(&toml).unwrap();
    t.push_str("\n[recover]\nmapping = \"/tmp/elsewhere\"\n");
    std::fs::write(&toml, t).unwrap();
    let (ok_, _, err) = sh(&format!(
        "cd {} && find . | cpio --quiet -o -H newc > {}",
        plan.display(),
        stored[0].display()
    ));
    assert!(ok_, "{err}");
    let (o, dest) = fetch("tampered");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a tampered plan was accepted: {e}");
    assert!(
        e.contains("/etc/lifeboat/lifeboat.toml does not match the signed plan")
            && e.contains(&format!("signed by key {fp}")),
        "{e}"
    );
    assert!(
        !dest.join("etc/lifeboat/init.json").exists(),
        "the refused layer was unpacked"
    );

    // The same in a real boot: QEMU's iPXE runs host A's script (with its
    // token); the init refuses the personal layer and stops.
    let mut vm = ipxe_vm(
        &work,
        &format!("http://10.0.2.2:{p}/hosts/hosta/boot.ipxe?token={ta}"),
        "ipxe-tampered.log",
    );
    vm.wait_for("the chained layers could not be loaded", BOOT)
        .unwrap_or_else(|e| panic!("{e}"));
    std::thread::sleep(Duration::from_secs(3));
    let c = vm.console();
    assert!(
        c.contains("/etc/lifeboat/lifeboat.toml does not match the signed plan")
            && c.contains(&format!("signed by key {fp}")),
        "no clear refusal on the console:\n{c}"
    );
    assert!(
        !c.contains("starting `lifeboat recover --auto`") && !c.contains("lifeboat: ready"),
        "the rescue system went on:\n{c}"
    );
}
