//! The configuration file as a user meets it: `nbd-rs check` on good and bad files (every
//! message, with its line), the merge of file, environment and command line, `nbd-rs drivers`,
//! the server refusing a bad file with the same messages, and every shipped example served to
//! real clients.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Scratch, Server, bin, root, run, run_script};

/// Runs nbd-rs with `args` and `env`; returns (exit code, stdout, stderr).
fn nbd_rs(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(bin());
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = run(&mut cmd, Duration::from_secs(30));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(dir: &Scratch, name: &str, text: &str) -> String {
    let p = dir.path(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn the_shipped_default_config_passes_check() {
    let cfg = root().join("config/nbd-rs.toml");
    let (code, out, err) = nbd_rs(&["check", "--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        format!(
            "{} is valid: 1 export(s)\n  scratch: raw -> memory (64 MiB), \"scratch space in RAM: gone when the server stops\"\nlisten: 127.0.0.1:10809\n",
            cfg.display()
        )
    );
}

#[test]
fn the_issue_example_shape_passes_check() {
    let dir = Scratch::new("cfg-shape");
    let text = format!(
        r#"[server]
listen = ["127.0.0.1:10809", "unix:{dir}/nbd.sock"]

[exports.scratch]
pipeline = "raw -> memory"
size = "64MiB"
description = "scratch space"

[exports.img]
pipeline = "raw -> file"
size = "20GiB"            # creates the image if it is missing
read_only = false
[exports.img.file]
path = "{dir}/img.raw"

[exports.vol]
pipeline = "cache -> retry -> sharded -> file"
size = "128GiB"
[exports.vol.file]
path = "{dir}/vol/"        # a directory: the chunks live here
[exports.vol.sharded]
chunk_size = "4MiB"
[exports.vol.cache]
path = "{dir}/cache/vol"
size = "2GiB"
"#,
        dir = dir.as_str()
    );
    let cfg = write(&dir, "nbd-rs.toml", &text);
    let (code, out, err) = nbd_rs(&["check", "--config", &cfg], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("  img: raw -> file (20 GiB, image "), "{out}");
    assert!(
        out.contains("  scratch: raw -> memory (64 MiB), \"scratch space\""),
        "{out}"
    );
    assert!(
        out.contains("  vol: cache -> retry -> sharded -> file (128 GiB, 4 MiB chunks)"),
        "{out}"
    );
    assert!(
        out.ends_with(&format!(
            "listen: 127.0.0.1:10809, unix:{}/nbd.sock\n",
            dir.as_str()
        )),
        "{out}"
    );
    // A check creates nothing.
    assert!(!dir.path("img.raw").exists());
    assert!(!dir.path("vol").exists());
    assert!(!dir.path("cache").exists());
}

#[test]
fn every_problem_is_reported_with_its_line() {
    let dir = Scratch::new("cfg-bad");
    let text = r#"[server]
listen = ["127.0.0.1:10809", "nowhere"]
colour = "blue"

[exports.a]
pipeline = "raw -> memory"
size = "lots"

[exports.b]
pipeline = "sharded -> cache -> file"

[exports.c]
pipeline = "raw -> memory"
size = "1GiB"
sise = "2GiB"
[exports.c.cache]
size = "1GiB"

[exports.d]
pipeline = "cache -> sharded -> file"
size = "1GiB"
[exports.d.sharded]
chunk_size = "3MiB"
chunks = 4
[exports.d.file]
path = "/tmp"
[exports.d.cache]
mode = "write-sideways"

[exports.e]
size = "1GiB"

[exports.f]
pipeline = "raw -> floppy"

[exports.g]
pipeline = "cache -> sharded -> file"
size = "1GiB"
[exports.g.file]
path = "/tmp"
[exports.g.cache]
flush = "disk"

[exports.h]
pipeline = "cache -> sharded -> file"
size = "1GiB"
[exports.h.file]
path = "/tmp"
[exports.h.cache]
mode = "write-through"
flush = "local"
"#;
    let cfg = write(&dir, "bad.toml", text);
    let (code, out, err) = nbd_rs(&["check", "--config", &cfg], &[]);
    assert_eq!(code, 1);
    assert_eq!(out, "");
    let expected = [
        format!(
            "nbd-rs: error: {cfg}:10: export \"b\", key \"pipeline\": pipeline \"sharded -> cache -> file\": \"cache\" cannot stand between the layout and the store: only store wrappers (retry, fault) can"
        ),
        format!(
            "nbd-rs: error: {cfg}:15: export \"c\", key \"sise\": unknown key (known: pipeline, size, description, read_only, block_size, allow, allow_names, and a table per stage)"
        ),
        format!(
            "nbd-rs: error: {cfg}:16: export \"c\", stage \"cache\": this table configures a stage that the pipeline \"raw -> memory\" does not use"
        ),
        format!(
            "nbd-rs: error: {cfg}:30: export \"e\": missing key \"pipeline\" (for example pipeline = \"raw -> memory\")"
        ),
        format!(
            "nbd-rs: error: {cfg}:34: export \"f\", key \"pipeline\": pipeline \"raw -> floppy\": unknown stage \"floppy\" (run `nbd-rs drivers` for the list)"
        ),
        format!(
            "nbd-rs: error: {cfg}:7: export \"a\", key \"size\": bad size \"lots\": invalid digit found in string (expected a number with an optional unit, like 512, 64KiB, 20GiB or 1T)"
        ),
        format!(
            "nbd-rs: error: {cfg}:2: key \"server.listen\": bad listen address \"nowhere\": expected HOST:PORT (like 0.0.0.0:10809) or unix:PATH"
        ),
        format!(
            "nbd-rs: error: {cfg}:3: key \"server.colour\": unknown key (known: listen, default_export, max_connections, handshake_timeout, idle_timeout, sendfile, tls)"
        ),
        format!(
            "nbd-rs: error: {cfg}:24: export \"d\", stage \"sharded\", key \"chunks\": unknown key (known: chunk_size, name, readahead)"
        ),
        format!(
            "nbd-rs: error: {cfg}:28: export \"d\", stage \"cache\", key \"mode\": unknown value \"write-sideways\" (known: write-back, write-through)"
        ),
        format!(
            "nbd-rs: error: {cfg}:42: export \"g\", stage \"cache\", key \"flush\": unknown value \"disk\" (known: store, local)"
        ),
        format!(
            "nbd-rs: error: {cfg}:51: export \"h\", stage \"cache\", key \"flush\": flush = \"local\" needs mode = \"write-back\": in write-through mode every write is in the store when it returns"
        ),
        "nbd-rs: 12 problem(s) found".to_owned(),
    ];
    let mut got: Vec<&str> = err.lines().collect();
    let mut want: Vec<&str> = expected.iter().map(String::as_str).collect();
    got.sort_unstable();
    want.sort_unstable();
    assert_eq!(got, want, "\n{err}");
}

#[test]
fn stage_parameters_are_checked_with_their_lines() {
    let dir = Scratch::new("cfg-params");
    let text = r#"[exports.d]
pipeline = "cache -> sharded -> file"
size = "1GiB"
[exports.d.sharded]
chunk_size = "3MiB"
[exports.d.file]
path = "/tmp"
colour = 1

[exports.r]
pipeline = "retry -> raw -> memory"
size = "1MiB"
[exports.r.retry]
attempts = 0
"#;
    let cfg = write(&dir, "params.toml", text);
    let (code, _, err) = nbd_rs(&["check", "--config", &cfg], &[]);
    assert_eq!(code, 1, "{err}");
    let mut got: Vec<&str> = err.lines().collect();
    got.sort_unstable();
    let mut want = vec![
        format!(
            "nbd-rs: error: {cfg}:5: export \"d\", stage \"sharded\", key \"chunk_size\": chunk_size must be a power of two from 4KiB to 1GiB, not 3 MiB"
        ),
        format!(
            "nbd-rs: error: {cfg}:8: export \"d\", stage \"file\", key \"colour\": unknown key (known: path)"
        ),
        format!(
            "nbd-rs: error: {cfg}:14: export \"r\", stage \"retry\", key \"attempts\": attempts must be at least 1"
        ),
        "nbd-rs: 3 problem(s) found".to_owned(),
    ];
    want.sort_unstable();
    assert_eq!(got, want, "\n{err}");
}

/// `readahead` takes a size up to 1 GiB ("0" turns it off); both bad sharded keys are named.
#[test]
fn sharded_readahead_is_a_size_of_at_most_a_gibibyte() {
    let dir = Scratch::new("cfg-readahead");
    let text = r#"[exports.v]
pipeline = "sharded -> file"
size = "1GiB"
[exports.v.sharded]
chunk_size = "3MiB"
readahead = "2GiB"
[exports.v.file]
path = "/tmp"

[exports.w]
pipeline = "sharded -> file"
size = "1GiB"
[exports.w.sharded]
readahead = "0"
[exports.w.file]
path = "/tmp"
"#;
    let cfg = write(&dir, "readahead.toml", text);
    let (code, _, err) = nbd_rs(&["check", "--config", &cfg], &[]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        err,
        format!(
            "nbd-rs: error: {cfg}:5: export \"v\", stage \"sharded\", key \"chunk_size\": chunk_size must be a power of two from 4KiB to 1GiB, not 3 MiB\n\
             nbd-rs: error: {cfg}:6: export \"v\", stage \"sharded\", key \"readahead\": readahead must be at most 1GiB, not 2 GiB\n\
             nbd-rs: 2 problem(s) found\n"
        )
    );
}

#[test]
fn a_missing_or_broken_file_is_an_error_never_an_empty_config() {
    let dir = Scratch::new("cfg-missing");
    let missing = dir.path("nope.toml");
    let (code, _, err) = nbd_rs(&["check", "--config", missing.to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    assert_eq!(
        err,
        format!(
            "nbd-rs: error: cannot read config file {}: No such file or directory (os error 2)\nnbd-rs: 1 problem(s) found\n",
            missing.display()
        )
    );
    let cfg = write(
        &dir,
        "broken.toml",
        "[exports.a]\npipeline = \"raw -> memory\nsize = 1\n",
    );
    let (code, _, err) = nbd_rs(&["check", "--config", &cfg], &[]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with(&format!("nbd-rs: error: {cfg}:2: TOML syntax error: ")),
        "{err}"
    );
    // The server refuses to start on the same problems, with the same messages, status 2.
    let (code, _, serr) = nbd_rs(&["--config", &cfg], &[]);
    assert_eq!(code, 2);
    assert_eq!(serr.lines().next(), err.lines().next());
}

#[test]
fn environment_overrides_the_file_and_is_named_in_errors() {
    let cfg = root().join("config/nbd-rs.toml");
    let cfg = cfg.to_str().unwrap();
    let (code, out, err) = nbd_rs(
        &["check", "--config", cfg],
        &[("NBD_RS_EXPORTS__SCRATCH__SIZE", "128MiB")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("scratch: raw -> memory (128 MiB)"), "{out}");
    let (code, out, err) = nbd_rs(
        &["check", "--config", cfg],
        &[(
            "NBD_RS_SERVER__LISTEN",
            "[\"127.0.0.1:7000\", \"unix:/tmp/x.sock\"]",
        )],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.ends_with("listen: 127.0.0.1:7000, unix:/tmp/x.sock\n"),
        "{out}"
    );
    let (code, _, err) = nbd_rs(
        &["check", "--config", cfg],
        &[("NBD_RS_EXPORTS__SCRATCH__SIZE", "lots")],
    );
    assert_eq!(code, 1);
    assert_eq!(
        err.lines().next().unwrap(),
        "nbd-rs: error: environment variable NBD_RS_EXPORTS__SCRATCH__SIZE: export \"scratch\", key \"size\": bad size \"lots\": invalid digit found in string (expected a number with an optional unit, like 512, 64KiB, 20GiB or 1T)"
    );
}

#[test]
fn a_bad_sendfile_policy_is_reported_with_its_line() {
    let dir = Scratch::new("cfg-sendfile");
    let cfg = write(
        &dir,
        "sendfile.toml",
        "[server]\nsendfile = \"sometimes\"\n[exports.d]\npipeline = \"raw -> memory\"\nsize = \"1MiB\"\n",
    );
    let (code, _, err) = nbd_rs(&["check", "--config", &cfg], &[]);
    assert_eq!(code, 1);
    assert_eq!(
        err.lines().next().unwrap(),
        format!(
            "nbd-rs: error: {cfg}:2: key \"server.sendfile\": expected \"auto\" (remote clients), \"always\" or \"never\", found \"sometimes\""
        )
    );
    for good in ["auto", "always", "never"] {
        let cfg = write(
            &dir,
            "sendfile.toml",
            &format!(
                "[server]\nsendfile = \"{good}\"\n[exports.d]\npipeline = \"raw -> memory\"\nsize = \"1MiB\"\n"
            ),
        );
        let (code, _, err) = nbd_rs(&["check", "--config", &cfg], &[]);
        assert_eq!(code, 0, "{good}: {err}");
    }
}

#[test]
fn command_line_exports_add_to_and_replace_the_file() {
    let cfg = root().join("config/nbd-rs.toml");
    let cfg = cfg.to_str().unwrap();
    let (code, out, err) = nbd_rs(
        &[
            "check",
            "--config",
            cfg,
            "--listen",
            "127.0.0.1:9",
            "-e",
            "scratch",
            "raw",
            "memory:2MiB",
            "-e",
            "extra",
            "sharded",
            "memory:1GiB",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        format!(
            "{cfg} is valid: 2 export(s)\n  scratch: raw -> memory (2 MiB)\n  extra: sharded -> memory (1 GiB, 4 MiB chunks)\nlisten: 127.0.0.1:9\n"
        )
    );
}

#[test]
fn drivers_lists_every_stage_with_its_parameters() {
    let (code, out, _) = nbd_rs(&["drivers"], &[]);
    assert_eq!(code, 0);
    for line in [
        "Block layers (above the layout):",
        "  cache    local-disk cache, write-back: writes acknowledged locally, uploaded in the background",
        "  retry    retries transient failures with exponential backoff and jitter",
        "Layouts (exactly one):",
        "  sharded  the disk is fixed-size chunks, objects NAME.{n}.chunk; unwritten chunks are holes",
        "           chunk_size: size of a chunk, a power of two from 4KiB to 1GiB (default \"4MiB\")",
        "Stores (exactly one, last):",
        "  file     local files: an image file under raw, a directory of chunks under sharded",
    ] {
        assert!(out.lines().any(|l| l == line), "missing {line:?} in\n{out}");
    }
}

/// Serves an example config (with scratch paths and a free port) and runs the conformance
/// script against each of its exports.
fn serve_example(example: &str, exports: &[(&str, &[&str])], env: &[(&str, String)]) {
    let cfg = root().join("config/examples").join(example);
    let mut vars: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    vars.push(("NBD_RS_SERVER__LISTEN".into(), "[\"127.0.0.1:0\"]".into()));
    let s = Server::start_with_env(&["--config", cfg.to_str().unwrap()], &vars);
    for (name, flags) in exports {
        let uri = s.uri(name);
        let mut args = vec![uri.as_str()];
        args.extend_from_slice(flags);
        run_script(
            "/usr/bin/python3",
            "conformance.py",
            &args,
            Duration::from_secs(600),
        );
    }
    let log = s.log();
    assert!(!log.contains("panicked"), "{log}");
    assert!(s.stop().success(), "{log}");
}

#[test]
fn example_memory_serves_real_clients() {
    serve_example("memory.toml", &[("disk", &["--kind", "memory"])], &[]);
}

#[test]
fn example_file_serves_real_clients() {
    let dir = Scratch::new("ex-file");
    serve_example(
        "file.toml",
        &[("img", &["--kind", "file"])],
        &[(
            "NBD_RS_EXPORTS__IMG__FILE__PATH",
            dir.path("img.raw").display().to_string(),
        )],
    );
}

#[test]
fn example_sharded_serves_real_clients() {
    let dir = Scratch::new("ex-sharded");
    serve_example(
        "sharded.toml",
        &[("vol", &["--kind", "sharded"])],
        &[(
            "NBD_RS_EXPORTS__VOL__FILE__PATH",
            format!("{}/", dir.as_str()),
        )],
    );
}

#[test]
fn example_cached_serves_real_clients() {
    let dir = Scratch::new("ex-cached");
    serve_example(
        "cached.toml",
        &[("vol", &["--kind", "sharded", "--cached"])],
        &[
            (
                "NBD_RS_EXPORTS__VOL__FILE__PATH",
                format!("{}/vol/", dir.as_str()),
            ),
            (
                "NBD_RS_EXPORTS__VOL__CACHE__PATH",
                format!("{}/cache", dir.as_str()),
            ),
        ],
    );
}

#[test]
fn example_drill_serves_real_clients() {
    serve_example("drill.toml", &[("drill", &["--kind", "sharded"])], &[]);
}

#[test]
fn block_sizes_are_checked_advertised_and_enforced() {
    let dir = Scratch::new("cfg-bs");
    let bad = write(
        &dir,
        "bad.toml",
        r#"[exports.a]
pipeline = "raw -> memory"
size = "1MiB"
block_size = { minimum = 3, preferred = 4096, maximum = "1MiB" }

[exports.b]
pipeline = "raw -> memory"
size = 1000
block_size = { minimum = 512, preferred = 4096, maximum = "1MiB", colour = 1 }

[exports.c]
pipeline = "raw -> memory"
size = 1000
block_size = { minimum = 512 }
"#,
    );
    let (code, _, err) = nbd_rs(&["check", "--config", &bad], &[]);
    assert_eq!(code, 1);
    let mut got: Vec<&str> = err.lines().collect();
    got.sort_unstable();
    let mut want = vec![
        format!(
            "nbd-rs: error: {bad}:4: export \"a\", key \"block_size\": minimum (3) must be a power of two of at most 64KiB"
        ),
        format!(
            "nbd-rs: error: {bad}:9: export \"b\", key \"block_size.colour\": unknown key (known: minimum, preferred, maximum)"
        ),
        format!(
            "nbd-rs: error: {bad}:13: export \"c\", key \"size\": the size (1000) must be a multiple of the minimum block size (512)"
        ),
        "nbd-rs: 3 problem(s) found".to_owned(),
    ];
    want.sort_unstable();
    assert_eq!(got, want, "\n{err}");

    let good = write(
        &dir,
        "good.toml",
        r#"[exports.d]
pipeline = "raw -> memory"
size = "8MiB"
block_size = { minimum = 512, preferred = "64KiB", maximum = "1MiB" }
"#,
    );
    let (code, out, err) = nbd_rs(&["check", "--config", &good], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("  d: raw -> memory (8 MiB), block sizes 512/65536/1048576\n"),
        "{out}"
    );
    let s = Server::start(&["--config", &good]);
    let script = r#"
import errno, nbd, sys
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
assert (h.get_block_size(nbd.SIZE_MINIMUM), h.get_block_size(nbd.SIZE_PREFERRED), h.get_block_size(nbd.SIZE_MAXIMUM)) == (512, 65536, 1048576)
h.pwrite(b"x" * 512, 512)
assert h.pread(512, 512) == b"x" * 512
for what, call in [
    ("unaligned read", lambda: h.pread(100, 1)),
    ("unaligned write", lambda: h.pwrite(b"y" * 100, 512)),
    ("unaligned trim", lambda: h.trim(512, 10)),
    ("read above maximum", lambda: h.pread(2 << 20, 0)),
    ("write above maximum", lambda: h.pwrite(b"z" * (2 << 20), 0)),
]:
    try:
        call()
        sys.exit(what + " was accepted")
    except nbd.Error as e:
        assert e.errnum == errno.EINVAL, (what, e)
assert h.pread(512, 512) == b"x" * 512
print("ok")
"#;
    let out = run(
        Command::new("/usr/bin/python3").args(["-c", script, &s.uri("d")]),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // qemu honours the constraints: an unaligned write is widened, not refused.
    let out = run(
        Command::new("qemu-io").args([
            "-f",
            "raw",
            &s.uri("d"),
            "-c",
            "write -P 7 1 100",
            "-c",
            "read -P 7 1 100",
        ]),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(s.stop().success());
}

#[test]
fn bad_log_levels_are_reported_with_their_lines() {
    let dir = Scratch::new("cfg-log");
    let good = write(
        &dir,
        "good.toml",
        "[log]\nlevel = \"info,nbd_rs::nbd=debug\"\n[exports.a]\npipeline = \"raw -> memory\"\nsize = \"1MiB\"\n",
    );
    let (code, _, err) = nbd_rs(&["check", "--config", &good], &[]);
    assert_eq!(code, 0, "{err}");

    let cfg = write(
        &dir,
        "bad.toml",
        "[log]\nlevel = \"debgu\"\nformat = \"json\"\n[exports.a]\npipeline = \"raw -> memory\"\nsize = \"1MiB\"\n[logging]\nlevel = \"info\"\n",
    );
    let (code, out, err) = nbd_rs(&["check", "--config", &cfg], &[]);
    assert_eq!(code, 1);
    assert_eq!(out, "");
    let mut got: Vec<&str> = err.lines().collect();
    got.sort_unstable();
    let mut want = vec![
        format!(
            "nbd-rs: error: {cfg}:2: key \"log.level\": bad log level \"debgu\": expected one of off, error, warn, info, debug, trace, or TARGET=LEVEL directives separated by commas (\"info,nbd_rs=debug\")"
        ),
        format!("nbd-rs: error: {cfg}:3: key \"log.format\": unknown key (known: level)"),
        format!(
            "nbd-rs: error: {cfg}:7: key \"logging\": unknown key (known: server, log, exports)"
        ),
        "nbd-rs: 3 problem(s) found".to_owned(),
    ];
    want.sort_unstable();
    assert_eq!(got, want, "\n{err}");

    let cfg = write(
        &dir,
        "signatures.toml",
        "[log]\nlevel = \"info,rusoto_signature::signature=trace\"\n[exports.a]\npipeline = \"raw -> memory\"\nsize = \"1MiB\"\n",
    );
    let (code, _, err) = nbd_rs(&["check", "--config", &cfg], &[]);
    assert_eq!(code, 1);
    assert_eq!(
        err,
        format!(
            "nbd-rs: error: {cfg}:2: key \"log.level\": log level \"rusoto_signature::signature=trace\": the S3 client's libraries stay at info, because below it they log request signatures and credentials\nnbd-rs: 1 problem(s) found\n"
        )
    );

    let cfg = write(
        &dir,
        "directive.toml",
        "[log]\nlevel = \"nbd_rs=loud\"\n[exports.a]\npipeline = \"raw -> memory\"\nsize = \"1MiB\"\n",
    );
    let (code, _, err) = nbd_rs(&["check", "--config", &cfg], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!(
            "{cfg}:2: key \"log.level\": bad log level \"nbd_rs=loud\": expected one of"
        )),
        "{err}"
    );
}

/// `[log] level` sets the level at start and on reload; `RUST_LOG` overrides it.
#[test]
fn log_level_from_the_file_applies_and_reloads_unless_rust_log_is_set() {
    let dir = Scratch::new("cfg-log-level");
    let export = "[exports.a]\npipeline = \"raw -> memory\"\nsize = \"1MiB\"\n";
    let cfg = write(
        &dir,
        "log.toml",
        &format!("[log]\nlevel = \"debug\"\n{export}"),
    );
    let connect = |s: &Server| {
        let out = run(
            Command::new("nbdinfo").args(["--size", &s.uri("a")]),
            Duration::from_secs(30),
        );
        assert!(out.status.success());
        // The server logs the connection's end after the client has gone.
        std::thread::sleep(Duration::from_millis(300));
    };
    // `transmission started` is a debug line.
    let s = Server::start_with_env(
        &["--listen", "127.0.0.1:0", "--config", &cfg],
        &[("RUST_LOG".into(), String::new())],
    );
    connect(&s);
    assert!(s.log().contains("transmission started"), "{}", s.log());

    // Back to info on reload.
    std::fs::write(&cfg, format!("[log]\nlevel = \"info\"\n{export}")).unwrap();
    common::signal(s.pid(), "HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !s.log().contains("configuration reloaded") {
        assert!(std::time::Instant::now() < deadline, "{}", s.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = s.log().matches("transmission started").count();
    connect(&s);
    assert_eq!(s.log().matches("transmission started").count(), before);
    assert!(s.stop().success());

    // RUST_LOG wins over the file.
    std::fs::write(&cfg, format!("[log]\nlevel = \"debug\"\n{export}")).unwrap();
    let s = Server::start_with_env(
        &["--listen", "127.0.0.1:0", "--config", &cfg],
        &[("RUST_LOG".into(), "info".into())],
    );
    connect(&s);
    assert!(!s.log().contains("transmission started"), "{}", s.log());
    assert!(s.stop().success());
}
