//! The Apple stand-in for the `apns` mode's in-flight measurement (benches/load/apns.sh):
//! starts the stand-in with the fixture's keys (its APNs roles speak HTTP/2 only and hold an
//! answer for `?standin_delay_ms=N`), writes a proxy.toml for the proxy on LISTEN (default
//! 127.0.0.1:18080) with room for 20,000 requests in flight, prints `CONFIG <path>` and
//! `SECRET <client secret>`, and serves until its standard input closes. Loopback only.
//!
//! Usage: apns_standin [LISTEN]

use std::io::BufRead as _;

use apple_standin::fixture;

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18080".to_string());
    let world = fixture::World::start(&fixture::Options {
        listen,
        server_toml: "max_concurrent_requests = 20000\nmax_connections = 20000".to_string(),
        audit_toml: "path = \"audit.jsonl\"\nfsync = \"off\"".to_string(),
        ..fixture::Options::default()
    })
    .await
    .expect("the stand-in's fixture starts");
    println!("CONFIG {}", world.config_path.display());
    println!("SECRET {}", world.secret("tester").expect("client tester"));
    // Serve until the bench script closes our stdin (or exits).
    let _ = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        while std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map(|n| n > 0)
            .unwrap_or(false)
        {
            line.clear();
        }
    })
    .await;
    drop(world);
}
