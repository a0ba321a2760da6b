use super::*;

#[test]
fn cpu_seconds_counts_this_process() {
    // Spin until the counter shows 50 ms of CPU, 10 s of wall time at
    // most: on a loaded machine 120 ms of wall time gave 40 ms of CPU.
    // A counter that does not move fails at the deadline.
    let before = cpu_seconds(std::process::id()).expect("own stat");
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut x = 1u64;
    let mut after = before;
    while after - before < 0.05 && std::time::Instant::now() < end {
        for _ in 0..100_000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        after = cpu_seconds(std::process::id()).expect("own stat");
    }
    std::hint::black_box(x);
    assert!(after - before >= 0.05, "{before} → {after} in 10 s");
    assert_eq!(cpu_seconds(u32::MAX), None);
}

// Real outputs of Debian's wrk 4.1.0 in a lab (the proxy bench), verbatim.

/// nginx `proxy_pass` from c1, before the bench removed TIME_WAIT from
/// the emulator's namespace: 1 s SYN retransmits and wrk timeouts.
const NGINX_WITH_TIMEOUTS: &str =
    "Running 3s test @ http://172.17.0.1:8081/latest/meta-data/instance-id
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   180.13ms  304.55ms   1.05s    81.62%
    Req/Sec     0.88k     1.09k    4.16k    85.71%
  Latency Distribution
     50%    1.22ms
     75%  280.23ms
     90%  740.83ms
     99%    1.02s 
  2698 requests in 3.01s, 616.54KB read
  Socket errors: connect 0, read 0, write 0, timeout 2
Requests/sec:    896.40
Transfer/sec:    204.84KB
";

/// Direct to the emulator from c1; no error lines at all.
const DIRECT: &str = "Running 3s test @ http://169.254.169.254/latest/meta-data/instance-id
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.91ms    1.81ms  20.03ms   90.15%
    Req/Sec     1.61k     1.31k    5.17k    62.86%
  Latency Distribution
     50%  217.00us
     75%  673.00us
     90%    2.62ms
     99%    9.07ms
  5695 requests in 3.05s, 1.21MB read
Requests/sec:   1867.83
Transfer/sec:    404.94KB
";

/// A path the emulator does not have: every response a 404.
const NOT_FOUND: &str = "Running 1s test @ http://169.254.169.254/latest/meta-data/nope
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.38ms  834.09us  11.73ms   90.44%
    Req/Sec     2.85k   405.26     3.31k    70.00%
  Latency Distribution
     50%    1.21ms
     75%    1.46ms
     90%    1.87ms
     99%    5.27ms
  2836 requests in 1.00s, 1.32MB read
  Non-2xx or 3xx responses: 2836
Requests/sec:   2825.36
Transfer/sec:      1.31MB
";

/// HTTP to the lab's TCP echo service: no request ever completes.
const NOTHING_COMPLETES: &str = "Running 1s test @ http://10.0.0.1:8080/
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.00us    0.00us   0.00us    -nan%
    Req/Sec     0.00      0.00     0.00      -nan%
  Latency Distribution
     50%    0.00us
     75%    0.00us
     90%    0.00us
     99%    0.00us
  0 requests in 1.00s, 0.00B read
  Socket errors: connect 0, read 6125, write 0, timeout 0
Requests/sec:      0.00
Transfer/sec:       0.00B
";

fn ms(v: f64) -> Duration {
    Duration::from_secs_f64(v / 1000.0)
}

#[test]
fn parses_a_run_with_timeouts() {
    let r = parse_wrk(NGINX_WITH_TIMEOUTS).expect("parses");
    assert_eq!(r.requests, 2698);
    assert_eq!(r.elapsed, ms(3010.0));
    assert_eq!(r.requests_per_sec, 896.40);
    assert_eq!(r.latency_avg, ms(180.13));
    assert_eq!(r.latency_max, ms(1050.0));
    assert_eq!(r.p50, ms(1.22));
    assert_eq!(r.p75, ms(280.23));
    assert_eq!(r.p90, ms(740.83));
    assert_eq!(r.p99, ms(1020.0));
    assert_eq!(r.non_2xx_3xx, 0);
    assert_eq!(
        r.socket_errors,
        SocketErrors {
            timeout: 2,
            ..SocketErrors::default()
        }
    );
    assert_eq!(r.socket_errors.total(), 2);
    assert_eq!(r.raw, NGINX_WITH_TIMEOUTS);
}

#[test]
fn parses_a_clean_run_in_microseconds() {
    let r = parse_wrk(DIRECT).expect("parses");
    assert_eq!(r.requests, 5695);
    assert_eq!(r.requests_per_sec, 1867.83);
    assert_eq!(r.latency_avg, ms(0.91));
    assert_eq!(r.p50, Duration::from_micros(217));
    assert_eq!(r.p75, Duration::from_micros(673));
    assert_eq!(r.p90, ms(2.62));
    assert_eq!(r.p99, ms(9.07));
    assert_eq!(r.non_2xx_3xx, 0);
    assert_eq!(r.socket_errors, SocketErrors::default());
}

#[test]
fn counts_non_2xx_and_socket_errors() {
    let r = parse_wrk(NOT_FOUND).expect("parses");
    assert_eq!((r.requests, r.non_2xx_3xx), (2836, 2836));
    assert_eq!(r.p99, ms(5.27));
    let r = parse_wrk(NOTHING_COMPLETES).expect("parses");
    assert_eq!(r.requests, 0);
    assert_eq!(r.requests_per_sec, 0.0);
    assert_eq!(r.p50, Duration::ZERO);
    assert_eq!(r.socket_errors.read, 6125);
    assert_eq!(r.socket_errors.total(), 6125);
}

#[test]
fn refuses_incomplete_output() {
    // Without --latency there is no distribution.
    let no_latency: String = DIRECT
        .lines()
        .filter(|l| {
            !l.trim_start()
                .starts_with(|c: char| c.is_ascii_digit() && l.contains('%'))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let e = parse_wrk(&no_latency).expect_err("no distribution");
    assert!(e.contains("--latency"), "{e}");
    assert!(parse_wrk("").is_err());
    assert!(parse_wrk("unable to connect to 169.254.169.254:80 Connection refused\n").is_err());
    let bad = DIRECT.replace("1867.83", "lots");
    assert!(parse_wrk(&bad)
        .expect_err("bad rate")
        .contains("Requests/sec"));
}

#[test]
fn times_in_every_unit() {
    assert_eq!(parse_wrk_time("451.00us"), Some(Duration::from_micros(451)));
    assert_eq!(parse_wrk_time("4.92ms"), Some(Duration::from_micros(4920)));
    assert_eq!(parse_wrk_time("1.50s"), Some(Duration::from_millis(1500)));
    assert_eq!(parse_wrk_time("2.00m"), Some(Duration::from_secs(120)));
    assert_eq!(parse_wrk_time("1.00h"), Some(Duration::from_secs(3600)));
    assert_eq!(parse_wrk_time("0.00us"), Some(Duration::ZERO));
    for bad in ["", "ms", "12", "1.0ns", "-1ms", "1.2.3ms", "nanus"] {
        assert_eq!(parse_wrk_time(bad), None, "{bad}");
    }
}

#[test]
fn status_fields() {
    let status = "Name:\tnginx\nVmPeak:\t   12345 kB\nVmHWM:\t    6100 kB\nVmRSS:\t    5980 kB\nThreads:\t1\n";
    assert_eq!(parse_status_kib(status, "VmRSS"), Some(5980));
    assert_eq!(parse_status_kib(status, "VmHWM"), Some(6100));
    assert_eq!(parse_status_kib(status, "VmSwap"), None);
    assert_eq!(parse_status_kib(status, "Threads"), None);
    let me = std::process::id();
    assert!(rss_kib(me).is_some_and(|k| k > 0));
    assert!(hwm_kib(me).is_some_and(|k| k > 0));
    // One snapshot: the other tests' threads move RSS between two reads.
    let own = std::fs::read_to_string("/proc/self/status").expect("own status");
    assert!(parse_status_kib(&own, "VmHWM") >= parse_status_kib(&own, "VmRSS"));
}

#[test]
fn ppid_after_the_command_name() {
    assert_eq!(
        parse_ppid("4242 (nginx: worker (x) y) S 4241 4241 1 0 -1"),
        Some(4241)
    );
    assert_eq!(parse_ppid("garbage"), None);
    assert!(children_of(std::process::id()).is_empty());
}

#[test]
fn refuses_names_outside_the_lab() {
    for name in [
        "",
        "mglab-",
        "c1",
        "../mglab-x",
        "mglab-x/../../proc/1/ns/net",
    ] {
        let e = wrk(name, "http://127.0.0.1/", 1, 1, Duration::from_secs(1), &[]).expect_err(name);
        assert!(e.to_string().contains("not a lab namespace"), "{e}");
    }
}

#[test]
fn a_missing_nginx_says_how_to_get_it() {
    // The only test that reads METAGUARD_NGINX.
    std::env::set_var("METAGUARD_NGINX", "/nonexistent/nginx");
    let e = nginx_binary().expect_err("missing");
    std::env::remove_var("METAGUARD_NGINX");
    let text = e.to_string();
    assert!(
        text.contains("ensure_nginx") && text.contains("./scripts/test"),
        "{text}"
    );
    assert!(text.contains("/nonexistent/nginx"), "{text}");
}

#[test]
fn config_is_a_plain_keepalive_proxy() {
    let conf = nginx_conf(
        "172.17.0.1:8081".parse().expect("addr"),
        "169.254.169.254:80",
        Path::new("/run/metaguard-lab/x/nginx"),
    );
    for want in [
        "daemon off;",
        "master_process on;",
        "worker_processes auto;",
        "pid /run/metaguard-lab/x/nginx/nginx.pid;",
        "access_log /run/metaguard-lab/x/nginx/nginx-access.log audit;",
        "proxy_temp_path /run/metaguard-lab/x/nginx/proxy;",
        "server 169.254.169.254:80;",
        "keepalive 32;",
        "listen 172.17.0.1:8081;",
        "proxy_pass http://imds;",
        "proxy_http_version 1.1;",
        "proxy_set_header Connection \"\";",
    ] {
        assert!(conf.contains(want), "{want} missing from\n{conf}");
    }
    assert!(!conf.to_ascii_lowercase().contains("forwarded"));
    let v6 = nginx_conf(
        "[fd00:17::1]:8081".parse().expect("addr"),
        "[fd00:ec2::254]:80",
        Path::new("/w"),
    );
    assert!(v6.contains("listen [fd00:17::1]:8081;"));
}

#[test]
fn the_cached_config_keeps_200s_for_an_hour_and_only_then() {
    let addr = "172.17.0.1:8083".parse().expect("addr");
    let cached = nginx_conf_with(addr, "169.254.169.254:80", Path::new("/w"), true, None);
    for want in [
        "proxy_cache_path /w/cache keys_zone=imds:1m;",
        "proxy_cache imds;",
        "proxy_cache_valid 200 1h;",
        "proxy_pass http://imds;",
    ] {
        assert!(cached.contains(want), "{want} missing from\n{cached}");
    }
    let plain = nginx_conf(addr, "169.254.169.254:80", Path::new("/w"));
    assert!(!plain.contains("proxy_cache"), "{plain}");
    assert!(!plain.contains("proxy_bind"), "{plain}");
}

#[test]
fn a_bound_config_sends_upstream_connections_from_its_address() {
    let addr = "172.17.0.1:8081".parse().expect("addr");
    // nginx wants an IPv6 `proxy_bind` address without brackets.
    for (upstream, bind, want) in [
        ("169.254.169.254:80", "10.0.0.11", "proxy_bind 10.0.0.11;"),
        (
            "[fd00:ec2::254]:80",
            "fd00:10::11",
            "proxy_bind fd00:10::11;",
        ),
    ] {
        let bind = Some(bind.parse().expect("ip"));
        let conf = nginx_conf_with(addr, upstream, Path::new("/w"), false, bind);
        assert!(conf.contains(want), "{want} missing from\n{conf}");
    }
}
