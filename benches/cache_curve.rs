//! The token cache's cost curve (issue 19): what a cached-token request costs, and what the
//! cache holds in memory, as its entries grow from 10 to its default capacity (10,000).
//!
//! `cargo bench --bench cache_curve` prints, for each size N, the heap the N cached App Store
//! Connect tokens hold (bytes per entry, counted by this binary's allocator) and criterion's
//! time for `cache/hit/N`: a request served from a cache of N entries, the N scopes taken in
//! turn so that a large cache also misses the CPU's caches as a busy proxy's would. At 10,000
//! some shards are full (the 16 shards fill unevenly), so a few tokens were evicted while
//! filling: the loop takes only the scopes still cached, and says how many lookups signed.
//!
//! A binary of its own because of the counting allocator: `benches/hot_path.rs` stays on the
//! system allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Write as _;
use std::hint::black_box;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion};

use apple_api_proxy::apple::Api;
use apple_api_proxy::config::Config;
use apple_api_proxy::token::{self, AppleClock, Minter};
use apple_standin::fixture::{self, Identity};

/// The system allocator, counting the bytes it holds.
struct Counting;

static HELD: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HELD.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HELD.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        HELD.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: as for `dealloc`; the system allocator keeps or moves the block.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The default `[tokens] cache_capacity` (DESIGN §11).
const CAPACITY: usize = 10_000;

fn path(n: usize) -> String {
    let mut p = String::with_capacity(24);
    let _ = write!(p, "/v1/apps/{}", 1_000_000 + n);
    p
}

fn request(path: &str) -> token::Request<'_> {
    token::Request {
        key: Identity::TEST.team.name,
        api: Api::AppStoreConnect,
        method: "GET",
        path,
        query: None,
        bundle_id: None,
        subject: None,
    }
}

fn bench_curve(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime for the stand-in");
    let world = runtime
        .block_on(fixture::World::start(&fixture::Options {
            key_lifetime: Some("20m".to_string()),
            ..fixture::Options::default()
        }))
        .expect("the stand-in's fixture");
    let config = Config::load(&world.config_path).expect("the fixture's config loads");
    assert_eq!(
        config.tokens.cache_capacity, CAPACITY,
        "the fixture keeps the default capacity"
    );

    let mut g = c.benchmark_group("cache");
    let paths: Vec<String> = (0..CAPACITY).map(path).collect();
    for n in [10, 100, 1_000, CAPACITY] {
        // A new minter (so a new, empty cache) for every size; what it holds before the
        // first token is the baseline.
        let minter = Minter::new(&config, Arc::new(AppleClock::default()))
            .expect("keys load")
            .0;
        let before = HELD.load(Ordering::Relaxed);
        let now = SystemTime::now();
        for p in &paths[..n] {
            minter.token(&request(p), now).expect("mints");
        }
        let held = HELD.load(Ordering::Relaxed) - before;
        // The scopes still cached: asking again signs only for the ones evicted.
        let live: Vec<&String> = paths[..n]
            .iter()
            .filter(|p| {
                let signed = minter.counts().0;
                let _ = minter.token(&request(p), now);
                minter.counts().0 == signed
            })
            .collect();
        eprintln!(
            "cache/{n}: heap held {held} bytes = {} bytes per token; {} of {n} still cached after filling",
            held / n as isize,
            live.len(),
        );
        let signed = minter.counts().0;
        let mut k = 0usize;
        g.bench_function(format!("hit/{n}"), |b| {
            b.iter(|| {
                k = (k + 1) % live.len();
                black_box(
                    minter
                        .token(black_box(&request(live[k])), SystemTime::now())
                        .expect("served"),
                )
            })
        });
        eprintln!(
            "cache/{n}: {} lookups signed during the measurement",
            minter.counts().0 - signed
        );
    }
    g.finish();
    drop(world);
}

fn short() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = short();
    targets = bench_curve
}
criterion_main!(benches);
