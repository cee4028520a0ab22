//! Micro-benchmarks of the per-request hot path (issue 7). `cargo bench` runs them all in
//! about a minute; `cargo bench -- mint` runs one group.
//!
//! - `mint/fresh_es256`: a token for a new App Store Connect scope every iteration, so every
//!   iteration pays a real ES256 signature (plus claims JSON, base64url, SHA-256 fingerprint,
//!   cache insert).
//! - `mint/cache_hit`: the same request again: the cached token is served.
//! - `mint/apns_provider_token`, `mint/sign_in_client_secret`: a developer key's held token
//!   (APNs' provider token; a Sign in with Apple `client_secret` for one client id).
//! - `ring/p256_sign`: ring's raw `EcdsaKeyPair::sign` (ECDSA_P256_SHA256_FIXED_SIGNING) on a
//!   JWT-sized message: the floor for `mint/fresh_es256` (target ≤ 1.2×).
//! - `request/*`: the steps before minting (client secret check, a client-key JWT's full
//!   ES256 verification — once per token, then cached —, path check, route, policy),
//!   the upstream header copy, and the audit path redaction.
//! - `diagnose/*`: the 401 doctor on representative evidence (only on Apple's 401/403).
//! - `identity/*`: an identity token (DESIGN §17): the full RS256 and ES256 verification a
//!   token pays once (then it is remembered), and `Clients::authenticate` finding a CI-sized
//!   token remembered, which every later request with it pays (compare `request/authenticate`,
//!   the same for a secret).
//! - `audit/record_4096_and_flush`: 4096 records through the audit writer (serialised, chained
//!   with SHA-256, written) and a flush: the audit path's cost per request is this / 4096.
//! - `signing/*`: an in-app signature request's own work (DESIGN §15): the body parsed and
//!   checked, the policy, and the whole of it with the nonce and the ES256 signature.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::{HeaderMap, HeaderValue};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

use apple_api_proxy::apple::{Api, Environment, KeyKind};
use apple_api_proxy::client::Clients;
use apple_api_proxy::config::Config;
use apple_api_proxy::diagnose::{self, AppleError, Evidence, SandboxProbe};
use apple_api_proxy::route;
use apple_api_proxy::token::{self, AppleClock, Claims, Minter};
use apple_standin::fixture::{self, Identity};

const ISSUER: &str = Identity::TEST.issuer_id;
/// The bench client's name (and the bench harness's, `shared/bench/project-cmd.sh`).
const BENCH_CLIENT: &str = "bench";

/// The stand-in's fixture (its keys and `proxy.toml`, every key's `token_lifetime` 20m as
/// the bench harness sets it) with the harness's client behind a second one, and the config
/// loaded from it. The benchmarks never call the stand-in: they run the per-request steps
/// in process. It stays up (on its own runtime) until the fixture is dropped.
struct Fixture {
    config: Config,
    secret: String,
    _world: fixture::World,
    _runtime: tokio::runtime::Runtime,
}

fn fixture() -> Fixture {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime for the stand-in");
    let world = runtime
        .block_on(fixture::World::start(&fixture::Options {
            key_lifetime: Some("20m".to_string()),
            clients: vec![
                fixture::Client::new("other", &["GET /inApps/*"]),
                fixture::Client::new(
                    BENCH_CLIENT,
                    &[
                        "POST /v1/builds",
                        "GET /v1/apps/*/appStoreVersions",
                        "GET /v1/*",
                    ],
                ),
            ],
            ..fixture::Options::default()
        }))
        .expect("the stand-in's fixture");
    let config = Config::load(&world.config_path).expect("the fixture's config loads");
    let secret = world
        .secret(BENCH_CLIENT)
        .expect("bench client")
        .to_string();
    Fixture {
        config,
        secret,
        _world: world,
        _runtime: runtime,
    }
}

/// A P-256 key for ring's own benchmark (the floor under `mint/fresh_es256`).
fn pkcs8() -> Vec<u8> {
    EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
        .expect("ring generates a P-256 key")
        .as_ref()
        .to_vec()
}

fn minter(config: &Config) -> Minter {
    Minter::new(config, Arc::new(AppleClock::default()))
        .expect("keys load")
        .0
}

fn connect_get<'a>(path: &'a str, query: Option<&'a str>) -> token::Request<'a> {
    token::Request {
        key: Identity::TEST.team.name,
        api: Api::AppStoreConnect,
        method: "GET",
        path,
        query,
        bundle_id: None,
        subject: None,
    }
}

fn bench_mint(c: &mut Criterion) {
    let fixture = fixture();
    let minter = minter(&fixture.config);
    let mut g = c.benchmark_group("mint");

    // A new scope every iteration: the cache cannot help, so this is a real signature.
    let mut n: u64 = 0;
    let mut path = String::with_capacity(32);
    g.bench_function("fresh_es256", |b| {
        b.iter(|| {
            n += 1;
            path.clear();
            use std::fmt::Write as _;
            let _ = write!(path, "/v1/apps/{n}");
            black_box(
                minter
                    .token(&connect_get(&path, None), SystemTime::now())
                    .expect("mints"),
            )
        })
    });

    // `remint` always signs; a storekit token (no scope, `bid` claim) for comparison.
    let iap = token::Request {
        key: Identity::TEST.iap.name,
        api: Api::AppStoreServer,
        method: "GET",
        path: "/inApps/v1/transactions/2000000000000001",
        query: None,
        bundle_id: None,
        subject: None,
    };
    g.bench_function("fresh_es256_storekit", |b| {
        b.iter(|| black_box(minter.remint(&iap, SystemTime::now()).expect("mints")))
    });

    // The harness's `fixed` mode: the same request again and again.
    let fixed = connect_get("/v1/apps/123", None);
    minter.token(&fixed, SystemTime::now()).expect("mints");
    g.bench_function("cache_hit", |b| {
        b.iter(|| {
            black_box(
                minter
                    .token(black_box(&fixed), SystemTime::now())
                    .expect("hit"),
            )
        })
    });

    // A cache hit whose scope has a query (bracket rewriting, ignored params dropped).
    let query = "filter%5Bplatform%5D=IOS&fields%5Bapps%5D=name,bundleId&limit=200";
    let with_query = connect_get("/v1/apps", Some(query));
    minter.token(&with_query, SystemTime::now()).expect("mints");
    g.bench_function("cache_hit_with_query", |b| {
        b.iter(|| {
            black_box(
                minter
                    .token(black_box(&with_query), SystemTime::now())
                    .expect("hit"),
            )
        })
    });
    // The developer-key APIs' held tokens (DESIGN §18): APNs' provider token, what every
    // push takes, and a Sign in with Apple client_secret, what every form gets.
    let apns = token::Request {
        key: Identity::TEST.developer.name,
        api: Api::Apns,
        method: "POST",
        path: "/3/device/a1b2c3",
        query: None,
        bundle_id: None,
        subject: None,
    };
    let sign_in = token::Request {
        api: Api::SignInWithApple,
        path: "/auth/token",
        subject: Some(Identity::TEST.sign_in_client_id),
        ..apns
    };
    for (name, req) in [
        ("apns_provider_token", apns),
        ("sign_in_client_secret", sign_in),
    ] {
        minter
            .token(&req, SystemTime::now())
            .expect("the first one signs");
        g.bench_function(name, |b| {
            b.iter(|| {
                black_box(
                    minter
                        .token(black_box(&req), SystemTime::now())
                        .expect("held"),
                )
            })
        });
    }
    g.bench_function("scope_entry", |b| {
        b.iter(|| {
            black_box(token::scope_entry(
                "GET",
                black_box("/v1/apps"),
                Some(query),
            ))
        })
    });
    g.finish();
    let (minted, hits) = minter.counts();
    eprintln!("minter counts after the mint group: {minted} signed, {hits} cache hits");
}

fn bench_ring(c: &mut Criterion) {
    let rng = SystemRandom::new();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8(), &rng)
        .expect("ring parses its own key");
    // A JWT signing input of the size the proxy signs (header.payload, ~260 bytes).
    let message = vec![b'e'; 260];
    let mut g = c.benchmark_group("ring");
    g.bench_function("p256_sign", |b| {
        b.iter(|| black_box(pair.sign(&rng, black_box(&message)).expect("signs")))
    });
    g.bench_function("sha256_jwt", |b| {
        b.iter(|| black_box(apple_api_proxy::sha256(black_box(&[b'e'; 400]))))
    });
    g.finish();
}

fn bench_request(c: &mut Criterion) {
    let fixture = fixture();
    let routes = route::Table::new(&fixture.config);
    let clients = Clients::new(&fixture.config).expect("the fixture's clients");
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("127.0.0.1:18080"));
    headers.insert(
        "proxy-authorization",
        HeaderValue::from_str(&format!("Bearer {}", fixture.secret)).expect("ascii"),
    );
    headers.insert("user-agent", HeaderValue::from_static("wrk/4.1.0"));
    headers.insert("accept", HeaderValue::from_static("application/json"));
    let who = clients
        .authenticate(&headers, None, 0)
        .expect("bench client");
    let path = "/v1/apps/1234567890/appStoreVersions";

    // A client-key JWT as Apple's Node library signs it (DESIGN §17b), signed with p256.
    let client_jwt = {
        use base64::Engine as _;
        use p256::ecdsa::signature::Signer as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let key = p256::ecdsa::SigningKey::from(
            p256::SecretKey::from_slice(&[7u8; 32]).expect("a valid scalar"),
        );
        let now = token::unix_secs(SystemTime::now());
        let signed = format!(
            "{}.{}",
            b64.encode(r#"{"alg":"ES256","kid":"CLNTKEY001","typ":"JWT"}"#),
            b64.encode(format!(
                r#"{{"iss":"{ISSUER}","iat":{now},"exp":{},"aud":"appstoreconnect-v1","bid":"com.example.app"}}"#,
                now + 600
            ))
        );
        let sig: p256::ecdsa::Signature = key.sign(signed.as_bytes());
        let public = key.verifying_key().to_encoded_point(false);
        (
            format!("{signed}.{}", b64.encode(sig.to_bytes())),
            public.as_bytes().to_vec(),
            now,
        )
    };
    let mut g = c.benchmark_group("request");
    g.bench_function("client_key_verify", |b| {
        b.iter(|| {
            black_box(
                apple_api_proxy::client::key::verify(
                    black_box(&client_jwt.0),
                    &client_jwt.1,
                    client_jwt.2,
                )
                .expect("verifies"),
            )
        })
    });
    g.bench_function("authenticate", |b| {
        b.iter(|| {
            black_box(
                clients
                    .authenticate(black_box(&headers), None, 0)
                    .expect("ok"),
            )
        })
    });
    g.bench_function("check_path", |b| {
        b.iter(|| black_box(route::check_path(black_box(path)).is_ok()))
    });
    g.bench_function("resolve", |b| {
        b.iter(|| black_box(routes.resolve(black_box(path)).expect("routes")))
    });
    g.bench_function("allows", |b| {
        b.iter(|| black_box(clients.allows(&who, "GET", black_box(path))))
    });
    // Everything before minting, in the order proxy::process runs it.
    g.bench_function("check_route_policy", |b| {
        b.iter(|| {
            let path = black_box(path);
            route::check_path(path).expect("clean");
            let route = routes.resolve(path).expect("routes");
            assert!(clients.allows(&who, "GET", path));
            black_box(route.url(None))
        })
    });
    let bearer = HeaderValue::from_str(&format!("Bearer {}", "x".repeat(400))).expect("ascii");
    g.bench_function("upstream_headers", |b| {
        b.iter(|| {
            black_box(apple_api_proxy::forward::upstream_headers(
                black_box(&headers),
                Some(bearer.clone()),
            ))
        })
    });
    g.bench_function("audit_redact_path", |b| {
        b.iter(|| black_box(apple_api_proxy::audit::redact_path(black_box(path))))
    });
    g.finish();
}

fn bench_signing(c: &mut Criterion) {
    use apple_api_proxy::config::SigningPolicy;
    use apple_api_proxy::signing::{self, input, policy, Kind};
    let fixture = fixture();
    let iap = fixture
        .config
        .key(Identity::TEST.iap.name)
        .expect("the fixture's in-app purchase key");
    let signer = token::key::load(&iap.source).expect("the key loads").key;
    let rules = SigningPolicy {
        products: vec!["com.example.pro.*".into(), "BOOK_*".into()],
        offers: vec!["winback-*".into()],
        grant_introductory_offer: false,
        operations: vec!["CREATE_ONE_TIME_CHARGE".into()],
        currencies: Some(vec!["USD".into()]),
        max_price: Some(99_990),
    };
    let offer = br#"{"product_id":"com.example.pro.monthly","offer_id":"winback-1","transaction_id":"2000000123456789"}"#;
    let v1 = br#"{"product_id":"com.example.pro.monthly","offer_id":"winback-1","app_account_token":"8e9a4d5c-1b2f-4a3e-9c8d-7b6a5f4e3d2c"}"#;
    let commerce = br#"{"request":{"operation":"CREATE_ONE_TIME_CHARGE","version":"1","requestInfo":{"requestReferenceId":"f55df048-4cd8-4261-b404-b6f813ff70e5"},"currency":"USD","taxCode":"C003-00-2","storefront":"USA","item":{"SKU":"BOOK_SHERLOCK_HOMLES","displayName":"Sherlock Holmes","description":"The Sherlock Holmes, 5th Edition","price":4990}}}"#;
    let header = signing::jose_header(Identity::TEST.iap.key_id);
    let key = signing::SigningKey {
        signer: &signer,
        header_b64: &header,
        key_id: Identity::TEST.iap.key_id,
        issuer_id: ISSUER,
        bundle_id: Identity::TEST.bundle_id,
    };
    let rng = SystemRandom::new();
    let mut g = c.benchmark_group("signing");
    g.bench_function("promotional_offer_parse_and_policy", |b| {
        b.iter(|| {
            let ask = input::parse(Kind::PromotionalOffer, black_box(offer)).expect("parses");
            policy::check(Some(&rules), &ask).expect("allowed");
            black_box(ask)
        })
    });
    g.bench_function("advanced_commerce_parse_and_policy", |b| {
        b.iter(|| {
            let ask = input::parse(Kind::AdvancedCommerce, black_box(commerce)).expect("parses");
            policy::check(Some(&rules), &ask).expect("allowed");
            black_box(ask)
        })
    });
    g.bench_function("promotional_offer_signed", |b| {
        b.iter(|| {
            let ask = input::parse(Kind::PromotionalOffer, black_box(offer)).expect("parses");
            policy::check(Some(&rules), &ask).expect("allowed");
            let nonce = signing::nonce(&rng).expect("random");
            black_box(signing::sign(&ask, &key, 1_796_218_860_000, nonce).expect("signs"))
        })
    });
    g.bench_function("promotional_offer_v1_signed", |b| {
        b.iter(|| {
            let ask = input::parse(Kind::PromotionalOfferV1, black_box(v1)).expect("parses");
            let nonce = signing::nonce(&rng).expect("random");
            black_box(signing::sign(&ask, &key, 1_796_218_860_000, nonce).expect("signs"))
        })
    });
    g.finish();
}

fn bench_diagnose(c: &mut Criterion) {
    let claims = Claims {
        iss: Some(ISSUER.into()),
        sub: None,
        iat: 1_800_000_000 - 60,
        exp: Some(1_800_000_000 - 60 + 1200),
        aud: Some("appstoreconnect-v1"),
        scope: Some(vec!["GET /v1/apps/123".to_string()]),
        bid: None,
        jti: None,
    };
    let body = br#"{"errors":[{"status":"401","code":"NOT_AUTHORIZED","title":"Authentication credentials are missing or invalid.","detail":"Provide a properly configured and signed bearer token, and make sure that it has not expired. Learn more about Generating Tokens for API Requests https://developer.apple.com/go/?id=api-generating-tokens"}]}"#;
    let apple_errors: Vec<AppleError> = diagnose::apple_errors(body);
    // App Store Connect 401 after the automatic retry, with Apple's clock 3 s off: several
    // candidate causes are weighed.
    let connect = Evidence {
        status: 401,
        api: Api::AppStoreConnect,
        environment: Environment::Production,
        method: "GET",
        path: "/v1/apps/123",
        query: None,
        key_name: "bench",
        key_id: "BENCHKEY01",
        key_kind: KeyKind::Team,
        file_kind_hint: Some(KeyKind::Team),
        file_key_id: Some("BENCHKEY01"),
        claims: &claims,
        proxy_now: 1_800_000_000,
        apple_date: Some(1_800_000_003),
        apple_errors: &apple_errors,
        key_last_success: Some(1_799_990_000),
        issuer_proven: true,
        retried: true,
        sandbox_probe: None,
    };
    let iap_claims = Claims {
        scope: None,
        bid: Some("com.example.app".to_string()),
        ..claims.clone()
    };
    // App Store Server production 401 (empty body) whose sandbox probe was accepted.
    let storekit = Evidence {
        api: Api::AppStoreServer,
        path: "/inApps/v1/transactions/2000000000000001",
        key_name: "iap",
        key_id: "IAPKEY0001",
        key_kind: KeyKind::InAppPurchase,
        file_kind_hint: None,
        file_key_id: None,
        claims: &iap_claims,
        apple_errors: &[],
        key_last_success: None,
        issuer_proven: false,
        retried: false,
        sandbox_probe: Some(SandboxProbe::Accepted(200)),
        ..connect.clone()
    };
    let mut g = c.benchmark_group("diagnose");
    g.bench_function("connect_401", |b| {
        b.iter(|| black_box(diagnose::diagnose(black_box(&connect))))
    });
    g.bench_function("storekit_401_sandbox", |b| {
        b.iter(|| black_box(diagnose::diagnose(black_box(&storekit))))
    });
    g.bench_function("apple_errors_parse", |b| {
        b.iter_batched(
            || body.as_slice(),
            |body| black_box(diagnose::apple_errors(body)),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn short() -> Criterion {
    // The whole run stays near a minute: 2 cores shared with other work, so medians of
    // many short samples are worth more than long ones.
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50)
        .configure_from_args()
}

fn bench_identity(c: &mut Criterion) {
    use apple_api_proxy::identity::{verify, KeySet, Rules};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let issuer = runtime
        .block_on(apple_standin::oidc::OidcIssuer::start())
        .expect("the stand-in issuer");
    issuer.add_rsa_key("rsa-1", true).expect("an RSA key");
    let keys = KeySet::parse(issuer.jwks().to_string().as_bytes()).expect("the issuer's JWKS");
    let iss = issuer.issuer();
    let now = token::unix_secs(SystemTime::now());
    // Shaped like a GitHub Actions token's claims (about 1 KiB once signed with RSA).
    let claims = serde_json::json!({
        "iss": iss, "aud": "apple-api-proxy", "sub": "repo:example/app:environment:release",
        "repository": "example/app", "repository_owner": "example", "ref": "refs/heads/main",
        "sha": "8d3c1e0f5a7b9c2d4e6f8a0b1c3d5e7f9a1b3c5d", "workflow": "release",
        "job_workflow_ref": "example/app/.github/workflows/release.yml@refs/heads/main",
        "environment": "release", "run_id": "7000000001", "run_attempt": "1",
        "iat": now, "nbf": now, "exp": now + 300,
    });
    let rules = Rules {
        issuer: &iss,
        audience: "apple-api-proxy",
        max_token_age_secs: 3600,
    };
    let mut g = c.benchmark_group("identity");
    for kid in ["rsa-1", "key-1"] {
        let token = issuer.sign(kid, serde_json::json!({}), claims.clone());
        assert!(verify::verify(&token, &keys, &rules, now).is_ok());
        let name = if kid == "rsa-1" {
            "verify_rs256"
        } else {
            "verify_es256"
        };
        g.bench_function(name, |b| {
            b.iter(|| black_box(verify::verify(black_box(&token), &keys, &rules, now).is_ok()))
        });
    }
    // The path every later request with the same token takes: `Clients::authenticate` finds
    // it remembered (a provider whose keys were fetched from the stand-in over TLS).
    let dir = tempfile::tempdir().expect("a scratch dir");
    let ca = dir.path().join("issuer-ca.pem");
    std::fs::write(&ca, issuer.ca_pem()).expect("the CA file");
    let text = format!(
        "[[identity_providers]]\nname = \"gha\"\nissuer = \"{iss}\"\naudience = \"apple-api-proxy\"\n\
         jwks_url = \"{}\"\nca_file = \"{}\"\n\
         [[clients]]\nname = \"release\"\nallow = [\"GET /v1/*\"]\n\
         identity = {{ provider = \"gha\", claims = {{ repository = \"example/app\" }} }}\n",
        issuer.jwks_url(),
        ca.display()
    );
    let config = Config::parse(&text, "bench.toml", dir.path()).expect("the identity config");
    let clients = Clients::new(&config).expect("the clients");
    let provider = clients
        .identity_providers()
        .next()
        .expect("a provider")
        .clone();
    runtime
        .block_on(provider.fetch())
        .expect("the keys are fetched");
    for kid in ["rsa-1", "key-1"] {
        let token = issuer.sign(kid, serde_json::json!({}), claims.clone());
        let mut headers = HeaderMap::new();
        headers.insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {token}")).expect("ascii"),
        );
        let who = clients.authenticate(&headers, None, now).expect("verifies");
        assert_eq!(&*who.name, "release");
        let name = if kid == "rsa-1" {
            "authenticate_remembered_rs256"
        } else {
            "authenticate_remembered_es256"
        };
        g.bench_function(name, |b| {
            b.iter(|| {
                black_box(
                    clients
                        .authenticate(black_box(&headers), None, now)
                        .expect("ok"),
                )
            })
        });
    }
    g.finish();
}

/// The audit path a request's record takes (DESIGN §13): handed to the writer, serialised
/// with the chain fields, hashed into the chain (SHA-256 of the line), written to a file;
/// 4096 records and one flush (an fsync) per iteration, so the time per record is the figure
/// / 4096, the fsync spread over them as group commit spreads it.
fn bench_audit(c: &mut Criterion) {
    use apple_api_proxy::audit::{Audit, Decision, Record};
    let dir = tempfile::tempdir().expect("a scratch dir");
    let config = Config::parse(
        &format!(
            "[audit]\npath = \"{}\"\n",
            dir.path().join("audit.jsonl").display()
        ),
        "bench.toml",
        dir.path(),
    )
    .expect("the audit config");
    let (audit, writer) = Audit::start(&config.audit).expect("the audit log opens");
    // A `fixed` request's record, as the harness's proxy writes it (about 830 bytes a line).
    let record = Record {
        time: String::new(),
        request_id: Arc::from("67062855b849-00003e75"),
        client: Some(Arc::from("release-ci")),
        client_auth: "secret",
        identity: None,
        client_addr: Arc::from("127.0.0.1:59440"),
        method: "GET".into(),
        path: "/v1/apps/123".into(),
        query: None,
        api: Some("app-store-connect"),
        environment: Some("production"),
        key: Some(Arc::from("bench")),
        key_id: Some(Arc::from("BENCHKEY01")),
        token_sha256: Some(Arc::from(
            "513db42383000c4c94a188691f84301910f79a963c397205f9f6ee5897d56733",
        )),
        decision: Decision::Forwarded,
        status: 200,
        upstream_status: Some(200),
        diagnosis: None,
        retried: false,
        connect_retries: 0,
        sandbox_fallback: false,
        apple_request_id: Some("2f1c5d0e-8a3b-4c7d-9e6f-0a1b2c3d4e5f".into()),
        rate_limit_remaining: Some(3599),
        bytes_in: 0,
        bytes_out: 1234,
        duration_ms: 2,
        completed: true,
        error: None,
        signing: None,
    };
    let sent = std::cell::Cell::new(0u64);
    let mut g = c.benchmark_group("audit");
    g.bench_function("record_4096_and_flush", |b| {
        b.iter(|| {
            for _ in 0..4096 {
                audit.record(record.clone());
            }
            audit.flush();
            sent.set(sent.get() + 4096);
        })
    });
    g.finish();
    assert_eq!(audit.head().seq, sent.get(), "every record is in the chain");
    drop(audit);
    writer.join();
}

criterion_group! {
    name = benches;
    config = short();
    targets = bench_ring, bench_mint, bench_request, bench_diagnose, bench_signing, bench_identity, bench_audit
}
criterion_main!(benches);
