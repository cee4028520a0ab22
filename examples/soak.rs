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

/// The `soak_id` a request carries in its query (every kind but the cached one has one).
fn soak_id(path_and_query: &str) -> Option<u64> {
    path_and_query
        .split_once('?')?
        .1
        .split('&')
        .find_map(|p| p.strip_prefix("soak_id="))?
        .parse()
        .ok()
}

/// A client that hangs up on purpose, over a raw HTTP/1.1 connection: sends `head` and
/// `body_part`, waits `linger`, and closes — before Apple's answer, or mid-upload.
async fn hang_up(port: u16, head: String, body_part: usize, linger: Duration) -> &'static str {
    use tokio::io::AsyncWriteExt as _;
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return "CONNECT-ERROR";
    };
    if s.write_all(head.as_bytes()).await.is_err() {
        return "write-refused";
    }
    let _ = s.write_all(&vec![b'u'; body_part]).await;
    tokio::time::sleep(linger).await;
    "hung-up"
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
        clients: vec![fixture::Client::new("soak", &["* /*"]).with_toml(
            "[clients.signing]\nproducts = [\"com.example.*\"]\noffers = [\"winback-*\"]\noperations = [\"CREATE_ONE_TIME_CHARGE\"]\nmax_price = 99990",
        )],
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
                let id = i;
                // Clients that hang up at a random moment: before Apple's (delayed) answer,
                // mid-upload, or that connect and send nothing (idle, until the proxy's
                // idle timeout or their own patience ends).
                match i % 16 {
                    10 | 11 => {
                        let head = format!(
                            "GET /v1/apps/{i}?soak_id={id}&standin_delay_ms=300 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\r\n\r\n"
                        );
                        let linger = Duration::from_millis(id % 400);
                        let outcome = hang_up(port, head, 0, linger).await;
                        bump(&counts, format!("hangup-before-answer {outcome}"));
                        continue;
                    }
                    12 => {
                        let head = format!(
                            "PUT /inApps/v1/transactions/consumption/1?soak_id={id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\r\nContent-Length: 65536\r\n\r\n"
                        );
                        let part = (id % 60_000) as usize;
                        let outcome = hang_up(port, head, part, Duration::from_millis(id % 50)).await;
                        bump(&counts, format!("hangup-mid-upload {outcome}"));
                        continue;
                    }
                    13 if id % 5 == 0 => {
                        let outcome = hang_up(port, String::new(), 0, Duration::from_millis(1500)).await;
                        bump(&counts, format!("idle-connection {outcome}"));
                        continue;
                    }
                    _ => {}
                }
                let (kind, method, path, body, auth) = match i % 10 {
                    0..=2 => (
                        "asc-unique-scope",
                        "GET",
                        format!("/v1/apps/{i}?soak_id={id}"),
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
                        format!(
                            "/inApps/v1/transactions/{}?soak_id={id}",
                            2_000_000_000 + i % 50
                        ),
                        Bytes::new(),
                        true,
                    ),
                    6 => (
                        "upload",
                        "PUT",
                        format!("/inApps/v1/transactions/consumption/1?soak_id={id}"),
                        Bytes::from(vec![b'u'; 64 * 1024]),
                        true,
                    ),
                    7 => (
                        "download-abandoned",
                        "GET",
                        format!("/v1/salesReports?standin_bytes=4000000&soak_id={id}"),
                        Bytes::new(),
                        true,
                    ),
                    8 => (
                        "unauthenticated",
                        "GET",
                        format!("/v1/apps?soak_id={id}"),
                        Bytes::new(),
                        false,
                    ),
                    9 if i % 20 == 19 => {
                        // In-app signatures: allowed ones of each kind, and one the policy
                        // refuses (a price over the bound). `i / 80`: every fourth i ≡ 19
                        // (mod 20) is one of the hang-up cases above, so `i / 20` would never
                        // pick the third kind.
                        let (kind, body) = match (i / 80) % 4 {
                            0 => ("sign-promotional-offer", r#"{"product_id":"com.example.pro","offer_id":"winback-1"}"#),
                            1 => ("sign-advanced-commerce", r#"{"request":{"operation":"CREATE_ONE_TIME_CHARGE","currency":"USD","item":{"SKU":"com.example.book","price":4990}}}"#),
                            2 => ("sign-v1", r#"{"product_id":"com.example.pro","offer_id":"winback-1"}"#),
                            _ => ("sign-denied", r#"{"request":{"operation":"CREATE_ONE_TIME_CHARGE","item":{"SKU":"com.example.book","price":100000}}}"#),
                        };
                        let endpoint = match kind {
                            "sign-promotional-offer" => "promotional-offer",
                            "sign-v1" => "promotional-offer-v1",
                            _ => "advanced-commerce",
                        };
                        (
                            kind,
                            "POST",
                            format!("/proxy/v1/signatures/{endpoint}?soak_id={id}"),
                            Bytes::from(body.as_bytes()),
                            true,
                        )
                    }
                    _ => (
                        "no-route",
                        "GET",
                        format!("/nope?soak_id={id}"),
                        Bytes::new(),
                        true,
                    ),
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
    // Let Apple's delayed answers and the last records land.
    tokio::time::sleep(Duration::from_millis(2000)).await;
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

    // Every request Apple saw has exactly one record; every record is a request.
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap_or_default();
    let records: Vec<serde_json::Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("event").is_none())
        .collect();
    let mut recorded: BTreeMap<u64, u64> = BTreeMap::new();
    let (mut forwarded, mut signed, mut refused, mut disconnected) = (0u64, 0u64, 0u64, 0u64);
    for r in &records {
        if r["decision"] == "forwarded" {
            forwarded += 1;
        } else if r["decision"] == "signed" {
            signed += 1;
        } else {
            refused += 1;
        }
        if r["error"] == "client_disconnected" {
            disconnected += 1;
        }
        let pq = format!("?{}", r["query"].as_str().unwrap_or(""));
        if let Some(id) = soak_id(&pq) {
            *recorded.entry(id).or_insert(0) += 1;
        }
    }
    let seen: std::collections::BTreeSet<u64> = standin
        .received()
        .iter()
        .filter_map(|r| soak_id(&r.path_and_query))
        .collect();
    let unaudited = seen.iter().filter(|id| !recorded.contains_key(id)).count();
    // In-app signatures: each signed record has a nonce of its own, and none reached Apple.
    let nonces: Vec<&str> = records
        .iter()
        .filter(|r| r["decision"] == "signed")
        .filter_map(|r| r["signing"]["nonce"].as_str())
        .collect();
    let distinct: std::collections::BTreeSet<&str> = nonces.iter().copied().collect();
    let nonce_reused = nonces.len() - distinct.len();
    let signing_reached_apple = standin
        .received()
        .iter()
        .filter(|r| r.path_and_query.starts_with("/proxy/"))
        .count();
    println!(
        "signatures: {} signed, {nonce_reused} nonce(s) reused, {signing_reached_apple} signature request(s) seen by Apple",
        nonces.len()
    );
    let twice = recorded.values().filter(|n| **n > 1).count();
    let forwarded_unseen = records
        .iter()
        .filter(|r| r["decision"] == "forwarded")
        .filter_map(|r| soak_id(&format!("?{}", r["query"].as_str().unwrap_or(""))))
        .filter(|id| !seen.contains(id))
        .count();
    println!(
        "records: {} ({forwarded} forwarded, {signed} signed, {refused} refused before Apple, {disconnected} client_disconnected); \
         distinct requests Apple saw: {}; Apple-seen requests without a record: {unaudited}; \
         requests with more than one record: {twice}; forwarded records Apple never saw \
         (the client hung up before the upstream request went out): {forwarded_unseen}",
        records.len(),
        seen.len()
    );
    let rss_mid = rss_mid.unwrap_or(rss_start);
    println!(
        "proxy RSS: after warm-up {rss_start} KiB, half-way {rss_mid} KiB, end {rss_end} KiB (second half: {:+} KiB); exit {exit}",
        rss_end as i64 - rss_mid as i64
    );
    println!("unexpected failures (transport errors, timeouts, 5xx): {bad}");
    standin.shutdown().await;
    let grew = rss_end.saturating_sub(rss_mid) > RSS_ALLOWANCE_KIB;
    if bad > 0
        || !verify.status.success()
        || grew
        || !exit.success()
        || unaudited > 0
        || twice > 0
        || nonce_reused > 0
        || signing_reached_apple > 0
        || nonces.is_empty()
    {
        println!("SOAK FAILED");
        std::process::exit(1);
    }
    println!("SOAK PASSED");
}
