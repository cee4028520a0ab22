//! Fuzz targets (issue 13): a mutation fuzzer over committed seed corpora
//! (`fuzz/corpus/<target>/`), run inside the crate so it reaches the private parsers.
//!
//! This machine's toolchain is stable Rust, so neither cargo-fuzz nor afl.rs is assumed:
//! each target mutates its seeds (bit flips, byte inserts and deletes, range copies, splices
//! between seeds, tokens from a per-target dictionary) with a seeded PRNG and checks, besides
//! "never panics", a property of its own. `cargo test` runs a few hundred inputs per target;
//! `scripts/fuzz.sh` runs each for `FUZZ_SECONDS`. An input that panics is written to
//! `target/fuzz-crashes/<target>-<hash>` before the test fails, to be added to the corpus
//! once fixed.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A small, fast, seeded PRNG (xorshift64*): reproducible runs from `FUZZ_SEED`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| std::fs::read(e.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    seeds.sort();
    if seeds.is_empty() {
        seeds.push(Vec::new());
    }
    seeds
}

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>], dictionary: &[&[u8]]) -> Vec<u8> {
    let mut data = seeds[rng.below(seeds.len())].clone();
    for _ in 0..=rng.below(8) {
        let len = data.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = rng.below(len + 1);
                data.insert(i, rng.next() as u8);
            }
            2 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(16));
                data.drain(i..i + n);
            }
            3 if len > 0 => {
                // Copy a range elsewhere (repeats headers, chunks, lines).
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                let piece = data[i..i + n].to_vec();
                let at = rng.below(data.len() + 1);
                data.splice(at..at, piece);
            }
            4 => {
                let other = &seeds[rng.below(seeds.len())];
                let cut = rng.below(data.len() + 1);
                let from = rng.below(other.len() + 1);
                data.truncate(cut);
                data.extend_from_slice(&other[from..]);
            }
            5 if !dictionary.is_empty() => {
                let token = dictionary[rng.below(dictionary.len())];
                let at = rng.below(len + 1);
                data.splice(at..at, token.iter().copied());
            }
            _ => {
                let i = rng.below(len + 1);
                data.insert(i, b"\r\n\0%/.;:\"{}[]"[rng.below(13)]);
            }
        }
    }
    data
}

/// Runs `check` on the seeds, then on mutants for `FUZZ_SECONDS` (or `default_runs`
/// inputs when unset). Returns the number of executions.
fn run(target: &str, dictionary: &[&[u8]], default_runs: u64, check: impl Fn(&[u8])) -> u64 {
    let seeds = corpus(target);
    let budget = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs);
    let seed = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0x9e37_79b9_7f4a_7c15);
    let mut rng = Rng(seed | 1);
    let started = Instant::now();
    let mut runs = 0u64;
    let mut next = |runs: u64| -> Option<Vec<u8>> {
        if let Some(seed) = seeds.get(runs as usize) {
            return Some(seed.clone());
        }
        let more = match budget {
            Some(budget) => started.elapsed() < budget,
            None => runs < default_runs,
        };
        more.then(|| mutate(&mut rng, &seeds, dictionary))
    };
    while let Some(input) = next(runs) {
        runs += 1;
        if catch_unwind(AssertUnwindSafe(|| check(&input))).is_err() {
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-crashes");
            let _ = std::fs::create_dir_all(&dir);
            let name = format!("{target}-{}", &crate::hex(&crate::sha256(&input))[..16]);
            let _ = std::fs::write(dir.join(&name), &input);
            panic!(
                "fuzz target {target}: input {} failed (saved as target/fuzz-crashes/{name})",
                crate::hex(&input)
            );
        }
    }
    eprintln!(
        "fuzz {target}: {runs} executions in {:.1}s, no failure",
        started.elapsed().as_secs_f64()
    );
    runs
}

/// Lenient percent-decoding, as a server on the way might apply it (once per call).
fn lenient_decode(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if s[i] == b'%' && i + 2 < s.len() {
            if let (Some(h), Some(l)) = (hex(s[i + 1]), hex(s[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

#[test]
fn fuzz_path_check() {
    let dictionary: &[&[u8]] = &[
        b"%2e", b"%2E", b"%2f", b"%5c", b"%25", b"..", b"/./", b"//", b";", b"%00", b"%c0%ae",
        b"\\",
    ];
    run("path", dictionary, 3000, |input| {
        let Ok(path) = std::str::from_utf8(input) else {
            return;
        };
        if crate::route::check_path(path).is_ok() {
            // Whatever a server on the way does with it — decode it once or twice, split
            // on `/`, `\` or `;` — it never finds a dot segment.
            let twice = lenient_decode(&lenient_decode(path.as_bytes()));
            for segment in twice.split(|b| matches!(b, b'/' | b'\\' | b';')) {
                assert!(segment != b"." && segment != b"..", "{path:?} passed");
            }
            assert!(!twice.contains(&0), "{path:?} passed with a NUL");
        }
    });
}

#[test]
fn fuzz_framing_guard() {
    use crate::framing::{Scanner, Verdict};
    let dictionary: &[&[u8]] = &[
        b"\r\n\r\n",
        b"\n\n",
        b"\n\r\n",
        b"Content-Length: 5\r\n",
        b"Content-Length: 0\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"0\r\n\r\n",
        b"5;ext=1\r\nhello\r\n",
        b"GET / HTTP/1.1\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"POST /a HTTP/1.1\r\n",
    ];
    // What hyper would get from `input` split as `cuts` says; `None` when the guard closed
    // the connection.
    let feed = |input: &[u8], cuts: &[usize]| {
        let verdict = Arc::new(Verdict::default());
        let mut scanner = Scanner::new(verdict.clone());
        let mut out = Vec::new();
        let mut from = 0;
        for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
            let piece = &input[from..cut.max(from)];
            from = cut.max(from);
            let pass = scanner.feed(piece);
            assert!(pass.keep <= piece.len());
            if scanner.broken() {
                return None;
            }
            out.extend_from_slice(&piece[..pass.keep]);
            out.extend_from_slice(&pass.extra);
        }
        let refused = verdict.refused_for_tests();
        Some((out, refused))
    };
    run("framing", dictionary, 2000, |input| {
        let whole = feed(input, &[]);
        // Split points from the input's own bytes, so each input has its own splits.
        let mut rng = Rng(crate::sha256(input)[0] as u64 * 7919 + input.len() as u64 + 1);
        for _ in 0..3 {
            let mut cuts: Vec<usize> = (0..rng.below(8))
                .map(|_| rng.below(input.len() + 1))
                .collect();
            cuts.sort_unstable();
            assert_eq!(feed(input, &cuts), whole, "split at {cuts:?}");
        }
    });
}

#[test]
fn fuzz_config_parser() {
    let dictionary: &[&[u8]] = &[
        b"[server]\n",
        b"[[keys]]\n",
        b"[[clients]]\n",
        b"[audit]\n",
        b"[apis.app-store-connect]\n",
        b"allow = [\"GET /v1/*\"]\n",
        b"rate_limit = \"10/s\"\n",
        b"idle_timeout = \"1s\"\n",
        b"max_request_body = \"1 MiB\"\n",
        b"= \"\"\n",
        b"kind = \"team\"\n",
    ];
    let base = std::env::temp_dir().join("aap-fuzz-config-none");
    run("config", dictionary, 1500, |input| {
        let Ok(text) = std::str::from_utf8(input) else {
            return;
        };
        if let Err(e) = crate::config::Config::parse(text, "fuzz.toml", &base) {
            assert!(!e.to_string().is_empty());
        }
    });
}

#[test]
fn fuzz_explain_jwt() {
    let dictionary: &[&[u8]] = &[
        b"eyJ",
        b".",
        b"eyJhbGciOiJFUzI1NiJ9",
        b"==",
        b"-_",
        b"Bearer ",
    ];
    run("explain", dictionary, 3000, |input| {
        let Ok(token) = std::str::from_utf8(input) else {
            return;
        };
        let _ = crate::explain::explain(token, 1_795_360_906);
    });
}

#[test]
fn fuzz_audit_verify_lines() {
    let dictionary: &[&[u8]] = &[
        b"\n",
        b"\"seq\":",
        b"\"prev_sha256\":\"",
        b"\"event\":\"records_lost\"",
        b"{",
        b"}",
        b"0000",
    ];
    run("audit-lines", dictionary, 2000, |input| {
        let mut state = crate::audit::verify::ChainState::new();
        let _ = crate::audit::verify::verify_bytes_for_fuzz(input, &mut state);
    });
}

#[test]
fn fuzz_apple_error_bodies() {
    let dictionary: &[&[u8]] = &[
        b"{\"errors\":[",
        b"\"code\":",
        b"\"errorCode\":4040010",
        b"\x1f\x8b\x08\x00",
        b"]}",
        b"null",
    ];
    run("apple-errors", dictionary, 3000, |input| {
        let _ = crate::diagnose::apple_errors(input);
        for encoding in ["gzip", "deflate", "identity"] {
            if let Some(body) = crate::proxy::decoded_for_fuzz(encoding, input) {
                assert!(body.len() <= 64 * 1024, "{encoding} decoded past the bound");
                let _ = crate::diagnose::apple_errors(&body);
            }
        }
    });
}

#[test]
fn fuzz_signing_bodies() {
    use crate::signing::{input, policy, Kind};
    let dictionary: &[&[u8]] = &[
        b"\"product_id\":",
        b"\"offer_id\":",
        b"\"transaction_id\":\"1\"",
        b"\"request\":{",
        b"\"operation\":\"CREATE_ONE_TIME_CHARGE\"",
        b"\"SKU\":",
        b"\"price\":",
        b"\"Price\":",
        b"\"currency\":\"USD\"",
        b"\\u2063",
        b"[{",
        b"}]",
        b"18446744073709551616",
        b"-1",
        b"1e400",
    ];
    let rules = crate::config::SigningPolicy {
        products: vec!["com.example.*".into(), "BOOK_*".into()],
        offers: vec!["winback-*".into()],
        grant_introductory_offer: false,
        operations: vec!["CREATE_ONE_TIME_CHARGE".into()],
        currencies: Some(vec!["USD".into()]),
        max_price: Some(99_990),
    };
    run("signing-body", dictionary, 3000, |input| {
        let Some((&selector, body)) = input.split_first() else {
            return;
        };
        let kind = Kind::ALL[usize::from(selector) % Kind::ALL.len()];
        let Ok(ask) = input::parse(kind, body) else {
            return;
        };
        let verdict = policy::check(Some(&rules), &ask);
        // No id that reaches a signature can shift the V1 message's fields.
        for id in [&ask.product_id, &ask.offer_id, &ask.bundle_id]
            .into_iter()
            .flatten()
        {
            assert!(!id.contains(crate::signing::V1_SEPARATOR), "{id:?}");
        }
        // What is signed is what was checked: the signed JSON, parsed again, has the same
        // SKUs, prices, currencies and operation, and gets the same verdict.
        if let Some(json) = &ask.request_json {
            let again = format!("{{\"request\":{json}}}");
            let reparsed = input::parse(Kind::AdvancedCommerce, again.as_bytes())
                .expect("the signed request parses as it was checked");
            assert_eq!(reparsed.commerce, ask.commerce);
            assert_eq!(
                policy::check(Some(&rules), &reparsed).is_ok(),
                verdict.is_ok()
            );
        }
    });
}

#[test]
fn fuzz_client_key_jwts() {
    let dictionary: &[&[u8]] = &[
        b"eyJ",
        b".",
        b"\"alg\":\"ES256\"",
        b"\"kid\":",
        b"\"iat\":",
        b"\"exp\":",
        b"1e308",
        b"-0",
        b"==",
    ];
    // Any point will do: no mutated input carries a valid signature for it.
    let public = {
        use p256::elliptic_curve::sec1::ToEncodedPoint as _;
        p256::SecretKey::from_slice(&[7u8; 32])
            .expect("a valid scalar")
            .public_key()
            .to_encoded_point(false)
            .as_bytes()
            .to_vec()
    };
    run("client-key-jwt", dictionary, 3000, |input| {
        let Ok(token) = std::str::from_utf8(input) else {
            return;
        };
        let _ = crate::client::key::kid_of(token);
        assert!(
            crate::client::key::verify(token, &public, 1_800_000_000).is_err(),
            "a token no one signed was accepted"
        );
    });
}

#[test]
fn fuzz_audit_report_lines() {
    let dictionary: &[&[u8]] = &[
        b"\n",
        b"\"seq\":",
        b"\"prev_sha256\":\"",
        b"\"event\":\"records_lost\"",
        b"\"decision\":\"signed\"",
        b"\"signing\":{\"kind\":\"x\"}",
        b"\\u0000",
    ];
    let dir = tempfile::tempdir().expect("a scratch directory");
    let path = dir.path().join("audit.jsonl");
    run("audit-report", dictionary, 1000, |input| {
        std::fs::write(&path, input).expect("writes the input");
        let period = crate::audit::report::Period::default();
        if let Ok(report) = crate::audit::report::report(std::slice::from_ref(&path), &period) {
            let mut out = Vec::new();
            crate::audit::report::write_text(&report, &mut out).expect("renders");
            crate::audit::report::write_csv(&report, &mut out).expect("renders");
            assert!(report.records <= input.iter().filter(|b| **b == b'\n').count() as u64);
        }
    });
}
