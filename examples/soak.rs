//! Soak: the release binary under minutes of mixed load, with injected faults, client
//! disconnects, config reloads and SIGHUPs, against the in-process Apple stand-in (keys,
//! stand-in and config from the stand-in's fixture).
//! Loopback only, bounded in time; prints request counts by kind and outcome, and the
//! proxy's RSS at start and end. Exits 1 on a transport failure, an unexpected 5xx, a broken
//! audit chain, or RSS growth beyond the allowance. Run it with `scripts/soak.sh`.
//!
//! Usage: soak [SECONDS] [WORKERS]   (defaults: 180 s, 8 workers)

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apple_standin::fixture::{self, Identity};
use apple_standin::Faults;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// RSS growth tolerated over the second half of the run (steady state: by then the token
/// cache, bounded at 10,000 tokens, and the allocator's pools have filled).
const RSS_ALLOWANCE_KIB: u64 = 8 * 1024;

type Counts = Arc<Mutex<BTreeMap<String, u64>>>;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn bump(counts: &Counts, what: String) {
    *counts.lock().expect("counts").entry(what).or_insert(0) += 1;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let seconds: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(180);
    let workers: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(8);
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent()?.parent().map(|d| d.join("apple-api-proxy")))
        .filter(|p| p.exists())
        .expect("build the proxy first: cargo build --release --bin apple-api-proxy");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let world = fixture::World::start(&fixture::Options {
        listen: format!("127.0.0.1:{port}"),
        server_toml: "max_concurrent_requests = 64\nrequest_timeout = \"10s\"".to_string(),
        audit_toml: "path = \"audit.jsonl\"".to_string(),
        app_store_server_toml: "sandbox_fallback = true".to_string(),
        clients: vec![fixture::Client::new("soak", &["* /*"])],
        // Rewritten (the marker's number) to make the proxy reload.
        extra_toml: "# reload marker 0".to_string(),
        ..fixture::Options::default()
    })
    .await
    .expect("the stand-in's fixture");
    let secret = world.secret("soak").expect("client soak").to_string();
    let fixture::World {
        standin,
        dir,
        config_path,
        ..
    } = world;
    let config = std::fs::read_to_string(&config_path).expect("read");
    let mut child = std::process::Command::new(&binary)
        .args(["serve", "--config"])
        .arg(&config_path)
        .env("RUST_LOG", "warn")
        .stderr(std::fs::File::create(dir.path().join("proxy.log")).expect("log file"))
        .spawn()
        .expect("start the proxy");
    let pid = child.id();
    let base = format!("http://127.0.0.1:{port}");
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let counts: Counts = Arc::new(Mutex::new(BTreeMap::new()));
    let stop = Arc::new(AtomicBool::new(false));
    // Warm up, then take the starting RSS.
    for i in 0..200 {
        let req = http::Request::get(format!("{base}/v1/apps/{i}"))
            .header("authorization", format!("Bearer {secret}"))
            .body(Full::new(Bytes::new()))
            .expect("request");
        if let Ok(r) = client.request(req).await {
            let _ = r.into_body().collect().await;
        }
    }
    let rss_start = rss_kib(pid);
    println!(
        "soak: {seconds} s, {workers} workers, proxy pid {pid}, RSS after warm-up {rss_start} KiB"
    );

    let mut tasks = Vec::new();
    for w in 0..workers {
        let (client, counts, stop, base, secret) = (
            client.clone(),
            counts.clone(),
            stop.clone(),
            base.clone(),
            secret.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut i: u64 = w as u64 * 1_000_000;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let (kind, method, path, body, auth) = match i % 10 {
                    0..=2 => (
                        "asc-unique-scope",
                        "GET",
                        format!("/v1/apps/{i}"),
                        Bytes::new(),
                        true,
                    ),
                    3..=4 => (
                        "asc-cached",
                        "GET",
                        "/v1/apps".to_string(),
                        Bytes::new(),
                        true,
                    ),
                    5 => (
                        "storekit",
                        "GET",
                        format!("/inApps/v1/transactions/{}", 2_000_000_000 + i % 50),
                        Bytes::new(),
                        true,
                    ),
                    6 => (
                        "upload",
                        "PUT",
                        "/inApps/v1/transactions/consumption/1".to_string(),
                        Bytes::from(vec![b'u'; 64 * 1024]),
                        true,
                    ),
                    7 => (
                        "download-abandoned",
                        "GET",
                        "/v1/salesReports?standin_bytes=4000000".to_string(),
                        Bytes::new(),
                        true,
                    ),
                    8 => (
                        "unauthenticated",
                        "GET",
                        "/v1/apps".to_string(),
                        Bytes::new(),
                        false,
                    ),
                    _ => ("no-route", "GET", "/nope".to_string(), Bytes::new(), true),
                };
                let mut req = http::Request::builder()
                    .method(method)
                    .uri(format!("{base}{path}"));
                if auth {
                    req = req.header("authorization", format!("Bearer {secret}"));
                }
                let req = req.body(Full::new(body)).expect("request");
                match tokio::time::timeout(Duration::from_secs(20), client.request(req)).await {
                    Ok(Ok(r)) => {
                        let status = r.status().as_u16();
                        bump(&counts, format!("{kind} {status}"));
                        if kind == "download-abandoned" {
                            // Read a little, then go away mid-body.
                            let mut b = r.into_body();
                            let _ = b.frame().await;
                        } else if r.into_body().collect().await.is_err() {
                            bump(&counts, format!("{kind} body-error"));
                        }
                    }
                    Ok(Err(_)) => bump(&counts, format!("{kind} TRANSPORT-ERROR")),
                    Err(_) => bump(&counts, format!("{kind} TIMEOUT")),
                }
            }
        }));
    }

    // Faults, reloads and SIGHUPs while the load runs.
    let started = Instant::now();
    let mut step = 0u64;
    let mut reloads = 0;
    let mut hups = 0;
    let mut rss_mid = None;
    while started.elapsed() < Duration::from_secs(seconds) {
        if rss_mid.is_none() && started.elapsed() >= Duration::from_secs(seconds / 2) {
            rss_mid = Some(rss_kib(pid));
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        step += 1;
        standin.set_faults(match step % 6 {
            1 => Faults {
                transient_401s: 20,
                ..Faults::default()
            },
            2 => Faults {
                unreleased_bundle_ids: vec![Identity::TEST.bundle_id.into()],
                ..Faults::default()
            },
            3 => Faults {
                revoked_key_ids: vec![Identity::TEST.team.key_id.into()],
                ..Faults::default()
            },
            4 => Faults {
                sandbox_only_transactions: (0..25)
                    .map(|n| (2_000_000_000 + n).to_string())
                    .collect(),
                ..Faults::default()
            },
            _ => Faults::default(),
        });
        if step % 3 == 0 {
            let text = config.replace("# reload marker 0", &format!("# reload marker {step}"));
            std::fs::write(&config_path, text).expect("write");
            reloads += 1;
        }
        if step % 4 == 0 {
            let _ = std::process::Command::new("kill")
                .args(["-HUP", &pid.to_string()])
                .status();
            hups += 1;
        }
    }
    standin.set_faults(Faults::default());
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_end = rss_kib(pid);
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let exit = child.wait().expect("wait");

    let counts = counts.lock().expect("counts").clone();
    let total: u64 = counts.values().sum();
    println!(
        "\nrequests: {total} in {:.0} s ({:.0}/s); file reloads {reloads}, SIGHUPs {hups}",
        started.elapsed().as_secs_f64(),
        total as f64 / started.elapsed().as_secs_f64()
    );
    for (what, n) in &counts {
        println!("  {what:<40} {n}");
    }
    let bad: u64 = counts
        .iter()
        .filter(|(k, _)| {
            k.contains("TRANSPORT-ERROR")
                || k.contains("TIMEOUT")
                || k.ends_with(" 500")
                || k.ends_with(" 502")
                || k.ends_with(" 504")
        })
        .map(|(_, n)| n)
        .sum();
    // Why the proxy failed requests, as its log says (distinct reasons).
    let log = std::fs::read_to_string(dir.path().join("proxy.log")).unwrap_or_default();
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    for line in log
        .lines()
        .filter(|l| l.contains("upstream request failed") || l.contains("failed"))
    {
        let reason = line
            .split("error=")
            .nth(1)
            .unwrap_or(line)
            .chars()
            .take(160)
            .collect::<String>();
        *reasons.entry(reason).or_insert(0) += 1;
    }
    if !reasons.is_empty() {
        println!(
            "
proxy-side failures by reason:"
        );
        for (r, n) in &reasons {
            println!("  {n:>6}  {r}");
        }
    }
    let verify = std::process::Command::new(&binary)
        .args(["audit", "verify"])
        .arg(dir.path().join("audit.jsonl"))
        .output()
        .expect("verify");
    let verified = String::from_utf8_lossy(&verify.stdout).trim().to_string();
    println!("\naudit verify: {verified}");
    let rss_mid = rss_mid.unwrap_or(rss_start);
    println!(
        "proxy RSS: after warm-up {rss_start} KiB, half-way {rss_mid} KiB, end {rss_end} KiB (second half: {:+} KiB); exit {exit}",
        rss_end as i64 - rss_mid as i64
    );
    println!("unexpected failures (transport errors, timeouts, 5xx): {bad}");
    standin.shutdown().await;
    let grew = rss_end.saturating_sub(rss_mid) > RSS_ALLOWANCE_KIB;
    if bad > 0 || !verify.status.success() || grew || !exit.success() {
        println!("SOAK FAILED");
        std::process::exit(1);
    }
    println!("SOAK PASSED");
}
