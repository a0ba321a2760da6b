//! `metaguard exec` overhead, side by side in one run (no root needed,
//! loopback only):
//!
//! 1. latency of one `connect()` to a loopback listener, without and
//!    under the supervisor (every connect is a seccomp notification that
//!    the supervisor inspects and performs on a pidfd_getfd duplicate);
//! 2. a CPU + file-I/O workload that never connects (the filter runs on
//!    every system call; only the intercepted ones leave the kernel);
//! 3. process start: `true` vs `metaguard exec -- true`.
//!
//! Rounds alternate between the two modes, so a noisy neighbour hits both.
//! `cargo bench -p metaguard --bench exec_connect` runs it in full and
//! rewrites the `exec` section of BENCHMARKS.md; under `cargo test` it runs
//! once with tiny sizes as a smoke test. This binary is also the child
//! (`--child connect PORT N` / `--child work SCALE`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        child(&args[2..]);
        return;
    }
    let full = args.iter().any(|a| a == "--bench");
    if let Err(e) = run(full) {
        eprintln!("exec bench failed: {e}");
        std::process::exit(1);
    }
}

fn child(args: &[String]) {
    match args.first().map(String::as_str) {
        Some("connect") => {
            let port: u16 = args.get(1).and_then(|p| p.parse().ok()).unwrap_or(0);
            let n: usize = args.get(2).and_then(|p| p.parse().ok()).unwrap_or(100);
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let mut ns = Vec::with_capacity(n);
            for _ in 0..n {
                let t = Instant::now();
                match TcpStream::connect(addr) {
                    Ok(s) => {
                        ns.push(t.elapsed().as_nanos() as u64);
                        drop(s);
                    }
                    Err(e) => {
                        eprintln!("connect: {e}");
                        std::process::exit(1);
                    }
                }
            }
            let line: Vec<String> = ns.iter().map(|n| n.to_string()).collect();
            println!("{}", line.join(" "));
        }
        Some("work") => {
            let scale: u64 = args.get(1).and_then(|p| p.parse().ok()).unwrap_or(1);
            let t = Instant::now();
            // CPU: an xorshift walk.
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            for _ in 0..scale * 20_000_000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
            }
            let cpu = t.elapsed();
            // I/O: write and read back a file in 64 KiB system calls.
            let t = Instant::now();
            let path = std::env::temp_dir().join(format!("mg-exec-bench-{}", std::process::id()));
            let block = vec![(x & 0xff) as u8; 64 << 10];
            let mut io_ok = true;
            if let Ok(mut f) = std::fs::File::create(&path) {
                for _ in 0..scale * 256 {
                    io_ok &= f.write_all(&block).is_ok();
                }
            }
            if let Ok(mut f) = std::fs::File::open(&path) {
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n) = f.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                }
            }
            let _ = std::fs::remove_file(&path);
            println!(
                "{} {} {}",
                cpu.as_nanos(),
                t.elapsed().as_nanos(),
                u8::from(io_ok)
            );
        }
        _ => std::process::exit(2),
    }
}

fn metaguard() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_metaguard"))
}

fn me() -> Result<PathBuf, String> {
    std::env::current_exe().map_err(|e| e.to_string())
}

/// Runs this binary as the child, directly or under `metaguard exec`.
/// With `pin`, everything (supervisor, workers, child) runs on CPU 0
/// (`taskset -c 0`), so no wake-up crosses CPUs.
fn child_cmd(supervised: bool, pin: bool, args: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new(if pin {
        PathBuf::from("taskset")
    } else if supervised {
        metaguard()
    } else {
        me()?
    });
    if pin {
        cmd.args(["-c", "0"])
            .arg(if supervised { metaguard() } else { me()? });
    }
    if supervised {
        cmd.args(["exec", "--log", "/dev/null", "--"]).arg(me()?);
    }
    cmd.arg("--child").args(args);
    let out = cmd.output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "child {args:?} (supervised {supervised}): {}; {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

struct Stats {
    min: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Stats {
        min: v[0],
        p50: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
        max: v[v.len() - 1],
    }
}

fn run(full: bool) -> Result<(), String> {
    let (rounds, per_round, scale, starts) = if full {
        (7, 2000, 5, 30)
    } else {
        (1, 50, 1, 3)
    };

    // A loopback listener that accepts and drops.
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = Arc::clone(&stop);
    let acceptor = std::thread::spawn(move || {
        for s in listener.incoming() {
            if stop2.load(Ordering::Relaxed) {
                break;
            }
            drop(s);
        }
    });

    let mut plain = Vec::new();
    let mut guarded = Vec::new();
    let mut plain_pin = Vec::new();
    let mut guarded_pin = Vec::new();
    let port_s = port.to_string();
    let n_s = per_round.to_string();
    for _ in 0..rounds {
        for (supervised, pin, into) in [
            (false, false, &mut plain),
            (true, false, &mut guarded),
            (false, true, &mut plain_pin),
            (true, true, &mut guarded_pin),
        ] {
            let out = child_cmd(supervised, pin, &["connect", &port_s, &n_s])?;
            into.extend(
                out.split_whitespace()
                    .filter_map(|n| n.parse::<f64>().ok())
                    .map(|ns| ns / 1000.0),
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(1),
    );
    let _ = acceptor.join();
    let p = stats(plain);
    let g = stats(guarded);
    let pp = stats(plain_pin);
    let gp = stats(guarded_pin);

    let mut cpu = (Vec::new(), Vec::new());
    let mut io = (Vec::new(), Vec::new());
    let scale_s = scale.to_string();
    for _ in 0..rounds.max(3) {
        for supervised in [false, true] {
            let out = child_cmd(supervised, false, &["work", &scale_s])?;
            let f: Vec<f64> = out
                .split_whitespace()
                .filter_map(|n| n.parse::<f64>().ok())
                .collect();
            if f.len() != 3 || f[2] != 1.0 {
                return Err(format!("work child: {out:?}"));
            }
            let (c, i) = if supervised {
                (&mut cpu.1, &mut io.1)
            } else {
                (&mut cpu.0, &mut io.0)
            };
            c.push(f[0] / 1e6);
            i.push(f[1] / 1e6);
        }
    }

    let mut start = (Vec::new(), Vec::new());
    for _ in 0..starts {
        for supervised in [false, true] {
            let t = Instant::now();
            let ok = if supervised {
                Command::new(metaguard())
                    .args(["exec", "--", "true"])
                    .status()
            } else {
                Command::new("true").status()
            }
            .map_err(|e| e.to_string())?
            .success();
            if !ok {
                return Err("true failed".into());
            }
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            if supervised {
                start.1.push(ms);
            } else {
                start.0.push(ms);
            }
        }
    }
    let (cpu0, cpu1, io0, io1, st0, st1) = (
        stats(cpu.0),
        stats(cpu.1),
        stats(io.0),
        stats(io.1),
        stats(start.0),
        stats(start.1),
    );

    let cpus = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let section = format!(
        "## exec (seccomp supervisor) — `cargo bench -p metaguard --bench exec_connect`\n\n\
Unprivileged-capable, loopback only. Connect latency: {rounds} alternating rounds of {per_round} `TcpStream::connect` to a 127.0.0.1 listener, \
timed around the call inside the child, plain vs. under `metaguard exec` (release build). Workload: xorshift ({scale}×20 M steps) and a {mib} MiB \
file written and read in 64 KiB calls, measured inside the child; process start: wall time of `true` vs. `metaguard exec -- true`. \
Machine: {cpus}, {ncpu} cores, Linux {kernel}.\n\n\
| connect() latency, µs | min | p50 | p90 | p99 | max |\n|---|---:|---:|---:|---:|---:|\n\
| plain | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |\n\
| under exec | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |\n\
| **added (p50)** | | **{:.1}** | | | |\n\
| plain, one CPU (`taskset -c 0`) | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |\n\
| under exec, one CPU | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |\n\
| **added (p50), one CPU** | | **{:.1}** | | | |\n\n\
| no-connect workload, ms (median of {wr}) | plain | under exec | ratio |\n|---|---:|---:|---:|\n\
| CPU | {:.1} | {:.1} | {:.3} |\n\
| file I/O | {:.1} | {:.1} | {:.3} |\n\
| process start (median of {starts}) | {:.2} | {:.2} | +{:.2} ms |\n",
        p.min, p.p50, p.p90, p.p99, p.max,
        g.min, g.p50, g.p90, g.p99, g.max,
        g.p50 - p.p50,
        pp.min, pp.p50, pp.p90, pp.p99, pp.max,
        gp.min, gp.p50, gp.p90, gp.p99, gp.max,
        gp.p50 - pp.p50,
        cpu0.p50, cpu1.p50, cpu1.p50 / cpu0.p50,
        io0.p50, io1.p50, io1.p50 / io0.p50,
        st0.p50, st1.p50, st1.p50 - st0.p50,
        mib = scale * 16,
        wr = rounds.max(3),
        ncpu = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    );
    println!("{section}");
    if full {
        common::write_section("exec", &section)?;
    }
    let _ = (
        cpu0.min, cpu0.max, io0.min, st0.min, st0.p90, st0.p99, st0.max, cpu1.max,
    );
    Ok(())
}
