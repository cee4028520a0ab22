//! DESIGN §15, the in-app signatures, through the real binary: every endpoint's answer
//! verified as StoreKit would (the stand-in's `in_app` verifier, RustCrypto `p256`), every
//! policy rule refused and allowed, key choice, bad input, the audit record and metrics,
//! concurrency, and no signature anywhere but in the answer.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apple_standin::fixture;
use apple_standin::in_app::{self, SignerOf, V1Offer};
use base64::Engine as _;
use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use serde_json::{json, Value};

use crate::second_round::{binary_audit, Binary};
use crate::support::*;

const PATH: &str = "/proxy/v1/signatures/";

/// Apple's Advanced Commerce example request (APPLE.md §8.1).
fn apple_request() -> Value {
    json!({"operation":"CREATE_ONE_TIME_CHARGE","version":"1","requestInfo":{"requestReferenceId":"f55df048-4cd8-4261-b404-b6f813ff70e5"},"currency":"USD","taxCode":"C003-00-2","storefront":"USA","item":{"SKU":"BOOK_SHERLOCK_HOMLES","displayName":"Sherlock Holmes","description":"The Sherlock Holmes, 5th Edition","price":4990}})
}

/// A client the test adds to the world's config: its secret and its `[[clients]]` text.
struct Shop {
    secret: String,
    toml: String,
}

impl Shop {
    fn new(name: &str, allow: &str, extra: &str) -> Shop {
        let secret = fixture::generate_secret().unwrap();
        let toml = format!(
            "\n[[clients]]\nname = \"{name}\"\nsecret_sha256 = \"{}\"\nallow = [{allow}]\n{extra}\n",
            sha_hex(&secret)
        );
        Shop { secret, toml }
    }
}

const POLICY: &str = r#"[clients.signing]
products = ["com.example.pro.*", "BOOK_*"]
offers = ["winback-*"]
grant_introductory_offer = false
operations = ["CREATE_ONE_TIME_CHARGE"]
currencies = ["USD", "EUR"]
max_price = 99990
"#;

fn shop() -> Shop {
    Shop::new("shop", r#""POST /proxy/v1/signatures/*""#, POLICY)
}

async fn start(shops: &[&Shop], setup: Setup) -> Binary {
    let extra: String = shops.iter().map(|s| s.toml.as_str()).collect();
    Binary::start(setup, move |t| t + &extra).await
}

async fn post(b: &Binary, secret: &str, kind: &str, body: &str) -> Reply {
    send(
        http::Request::post(format!("http://{}{PATH}{kind}", b.addr))
            .header("authorization", format!("Bearer {secret}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap(),
    )
    .await
}

/// `/metrics` counted `n` signature requests of `kind` by `client` with `outcome`.
fn assert_signatures(metrics: &str, kind: &str, client: &str, outcome: &str, n: u64) {
    let line = format!(
        r#"aap_signatures_total{{kind="{kind}",client="{client}",outcome="{outcome}"}} {n}"#
    );
    assert!(metrics.contains(&line), "{line} in\n{metrics}");
}

fn iap(b: &Binary) -> SignerOf<'_> {
    SignerOf {
        public_key: &b.world.keys.iap.public,
        key_id: IAP_KID,
        issuer_id: ISSUER,
        bundle_id: BUNDLE,
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_signature_endpoint_answers_in_apples_format_as_storekit_checks_it() {
    let shop = shop();
    let b = start(&[&shop], Setup::default()).await;
    let jws_cases = [
        (
            "promotional-offer",
            json!({"product_id": "com.example.pro.year", "offer_id": "winback-3", "transaction_id": "1000011859217"}),
            "promotional-offer",
        ),
        (
            "introductory-offer-eligibility",
            json!({"product_id": "com.example.pro.year", "allow_introductory_offer": false, "transaction_id": "1000011859217"}),
            "introductory-offer-eligibility",
        ),
        (
            "advanced-commerce",
            json!({"request": apple_request()}),
            "advanced-commerce-api",
        ),
    ];
    let mut signatures = Vec::new();
    for (kind, body, aud) in &jws_cases {
        let r = post(&b, &shop.secret, kind, &body.to_string()).await;
        assert_eq!(r.status, StatusCode::OK, "{kind}: {:?}", r.body);
        assert_eq!(r.headers["cache-control"], "no-store");
        assert_eq!(r.headers["content-type"], "application/json");
        let answer = r.json();
        let keys: Vec<&str> = answer
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            ["issued_at", "key_id", "nonce", "signature"],
            "{kind}"
        );
        let jws = answer["signature"].as_str().unwrap();
        let verified = in_app::verify_jws(jws, &iap(&b), now())
            .unwrap_or_else(|e| panic!("{kind}: StoreKit would refuse it: {e}"));
        assert_eq!(verified.aud, *aud);
        assert_eq!(answer["key_id"], IAP_KID);
        assert_eq!(answer["nonce"], verified.claims["nonce"]);
        assert_eq!(answer["issued_at"], verified.claims["iat"]);
        // `iat` is Apple's clock back-dated by the leeway (60 s).
        let iat = verified.claims["iat"].as_i64().unwrap();
        assert!((now() - 62..=now() - 58).contains(&iat), "iat {iat}");
        match *kind {
            "promotional-offer" => {
                assert_eq!(verified.claims["productId"], "com.example.pro.year");
                assert_eq!(verified.claims["offerIdentifier"], "winback-3");
                assert_eq!(verified.claims["transactionId"], "1000011859217");
            }
            "introductory-offer-eligibility" => {
                assert_eq!(verified.claims["allowIntroductoryOffer"], false);
                assert_eq!(verified.claims["transactionId"], "1000011859217");
            }
            _ => assert_eq!(verified.request.as_ref(), Some(&apple_request())),
        }
        signatures.push((kind.to_string(), jws.to_string()));
    }

    // The legacy signature: base64 DER over the U+2063-separated message.
    let token = "8E9A4D5C-1B2F-4A3E-9C8D-7B6A5F4E3D2C";
    let r = post(
        &b,
        &shop.secret,
        "promotional-offer-v1",
        &json!({"product_id": "com.example.pro.year", "offer_id": "winback-3", "app_account_token": token}).to_string(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let answer = r.json();
    let keys: Vec<&str> = answer
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, ["key_id", "nonce", "signature", "timestamp"]);
    let timestamp = answer["timestamp"].as_i64().unwrap();
    let lowered = token.to_lowercase();
    let offer = V1Offer {
        product_id: "com.example.pro.year",
        offer_id: "winback-3",
        app_account_token: &lowered,
        nonce: answer["nonce"].as_str().unwrap(),
        timestamp_ms: timestamp,
    };
    let signature = answer["signature"].as_str().unwrap();
    in_app::verify_v1(signature, &iap(&b), &offer, now() * 1000)
        .unwrap_or_else(|e| panic!("StoreKit would refuse the V1 signature: {e}"));
    let der = base64::engine::general_purpose::STANDARD
        .decode(signature)
        .unwrap();
    assert!((68..=72).contains(&der.len()), "DER length {}", der.len());
    signatures.push(("promotional-offer-v1".to_string(), signature.to_string()));

    // Nothing reached Apple; each request left one `signed` record with the signature's
    // fingerprint and never the signature.
    assert!(b.world.standin.received().is_empty());
    let records = binary_audit(&b, 4).await;
    let log = std::fs::read_to_string(b.world.dir.path().join("audit.jsonl")).unwrap();
    for ((kind, signature), record) in signatures.iter().zip(&records) {
        assert_eq!(record["decision"], "signed", "{record}");
        assert_eq!(record["api"], "in-app-signing");
        assert_eq!(record["status"], 200);
        assert_eq!(record["client"], "shop");
        assert_eq!(record["key"], "storekit");
        assert_eq!(record["key_id"], IAP_KID);
        assert_eq!(record["upstream_status"], Value::Null);
        let signing = &record["signing"];
        assert_eq!(signing["kind"], kind.as_str());
        assert_eq!(signing["bundle_id"], BUNDLE);
        assert_eq!(signing["sha256"], sha_hex(signature));
        assert!(signing["nonce"].is_string());
        assert!(!log.contains(signature.as_str()));
        // Neither the JWS's signature segment nor its payload is in the log.
        for part in signature.split('.') {
            assert!(
                !log.contains(part),
                "{kind}: a part of the signature is audited"
            );
        }
    }
    assert_eq!(records[0]["signing"]["product_id"], "com.example.pro.year");
    assert_eq!(records[0]["signing"]["offer_id"], "winback-3");
    assert_eq!(records[0]["signing"]["transaction_id"], "1000011859217");
    assert_eq!(records[1]["signing"]["allow_introductory_offer"], false);
    assert_eq!(records[2]["signing"]["operation"], "CREATE_ONE_TIME_CHARGE");
    assert_eq!(
        records[2]["signing"]["skus"],
        json!(["BOOK_SHERLOCK_HOMLES"])
    );
    assert_eq!(records[2]["signing"]["currency"], "USD");
    assert_eq!(records[2]["signing"]["max_price"], 4990);
    // A forwarded request's record has no `signing` at all.
    let r = send(
        b.request("GET", "/inApps/v1/transactions/1")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let records = binary_audit(&b, 5).await;
    assert!(records[4].get("signing").is_none(), "{}", records[4]);

    let metrics = b.metrics().await;
    for kind in [
        "promotional-offer",
        "introductory-offer-eligibility",
        "advanced-commerce",
        "promotional-offer-v1",
    ] {
        assert_signatures(&metrics, kind, "shop", "signed", 1);
    }
    assert!(metrics.contains(r#"aap_requests_total{api="in-app-signing",client="shop",status_class="2xx",status="200",decision="signed"} 4"#), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_policy_rule_refuses_naming_rule_and_value_and_nothing_is_signed() {
    let shop = shop();
    // Allowed to call the endpoints, but no [clients.signing]: signs nothing.
    let plain = Shop::new("plain", r#""* /*""#, "");
    let b = start(&[&shop, &plain], Setup::default()).await;
    let ac = |request: Value| json!({ "request": request }).to_string();
    let cases: Vec<(&Shop, &str, String, &str, &str)> = vec![
        (&plain, "promotional-offer", json!({"product_id":"com.example.pro.year","offer_id":"winback-1"}).to_string(), "signing", "[clients.signing]"),
        (&shop, "promotional-offer", json!({"product_id":"com.example.basic","offer_id":"winback-1"}).to_string(), "signing.products", "com.example.basic"),
        (&shop, "promotional-offer", json!({"product_id":"com.example.pro.year","offer_id":"loyal-1"}).to_string(), "signing.offers", "loyal-1"),
        (&shop, "promotional-offer-v1", json!({"product_id":"com.example.pro.year","offer_id":"free-forever"}).to_string(), "signing.offers", "free-forever"),
        (&shop, "introductory-offer-eligibility", json!({"product_id":"com.example.pro.year","allow_introductory_offer":true,"transaction_id":"1"}).to_string(), "signing.grant_introductory_offer", "allow_introductory_offer = true"),
        (&shop, "advanced-commerce", ac(json!({"operation":"CREATE_SUBSCRIPTION","currency":"USD"})), "signing.operations", "CREATE_SUBSCRIPTION"),
        (&shop, "advanced-commerce", ac(json!({"operation":"CREATE_ONE_TIME_CHARGE","currency":"JPY","item":{"SKU":"BOOK_A","price":1}})), "signing.currencies", "JPY"),
        (&shop, "advanced-commerce", ac(json!({"operation":"CREATE_ONE_TIME_CHARGE","items":[{"SKU":"BOOK_A","price":1},{"SKU":"MOVIE_B","price":1}]})), "signing.products", "MOVIE_B"),
        (&shop, "advanced-commerce", ac(json!({"operation":"CREATE_ONE_TIME_CHARGE","item":{"SKU":"BOOK_A","price":4990,"offer":{"price":100000}}})), "signing.max_price", "request.item.offer.price"),
    ];
    for (who, kind, body, rule, value) in &cases {
        let r = post(&b, &who.secret, kind, body).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{body}");
        assert_eq!(r.error_code(), "PROXY_FORBIDDEN");
        let detail = r.json()["errors"][0]["detail"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(detail.contains(rule) && detail.contains(value), "{detail}");
    }
    // The same shapes inside the bounds are signed.
    let allowed = [
        ("introductory-offer-eligibility", json!({"product_id":"com.example.pro.year","allow_introductory_offer":false,"transaction_id":"1"}).to_string()),
        ("advanced-commerce", ac(json!({"operation":"CREATE_ONE_TIME_CHARGE","currency":"EUR","items":[{"SKU":"BOOK_A","price":99990}]}))),
    ];
    for (kind, body) in &allowed {
        let r = post(&b, &shop.secret, kind, body).await;
        assert_eq!(r.status, StatusCode::OK, "{body}: {:?}", r.body);
    }
    let records = binary_audit(&b, cases.len() + allowed.len()).await;
    for (record, (_, kind, ..)) in records.iter().zip(&cases) {
        assert_eq!(record["decision"], "denied", "{record}");
        assert_eq!(record["error"], "signing_denied");
        assert_eq!(record["status"], 403);
        assert_eq!(record["signing"]["kind"], *kind);
        assert_eq!(
            record["signing"]["sha256"],
            Value::Null,
            "nothing was signed"
        );
        assert_eq!(record["signing"]["nonce"], Value::Null);
    }
    assert_eq!(records[1]["signing"]["product_id"], "com.example.basic");
    let metrics = b.metrics().await;
    assert_signatures(&metrics, "advanced-commerce", "shop", "denied", 4);
    assert_signatures(&metrics, "promotional-offer", "plain", "denied", 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_400_naming_the_field_big_bodies_413_other_methods_405() {
    let shop = shop();
    // Allowed to POST the endpoints but not this one; and `tester` (`* /*`) for GET.
    let narrow = Shop::new(
        "narrow",
        r#""POST /proxy/v1/signatures/promotional-offer""#,
        POLICY,
    );
    let b = start(&[&shop, &narrow], Setup::default()).await;
    let cases = [
        ("promotional-offer", "{", "not JSON"),
        ("promotional-offer", "[]", "JSON object"),
        (
            "promotional-offer",
            r#"{"product_id":"com.example.pro.year"}"#,
            "`offer_id` is missing",
        ),
        (
            "promotional-offer",
            r#"{"product_id":"com.example.pro.year","offer_id":"winback-1","transactionId":"1"}"#,
            "`transactionId` is not a field",
        ),
        (
            "promotional-offer",
            r#"{"product_id":"com.example.pro.year","offer_id":"winback-1","transaction_id":"a3b1c2d4-0000-4000-8000-000000000000"}"#,
            "`transaction_id` must be Apple's transaction id",
        ),
        (
            "introductory-offer-eligibility",
            r#"{"product_id":"com.example.pro.year","allow_introductory_offer":"no","transaction_id":"1"}"#,
            "`allow_introductory_offer` must be true or false",
        ),
        (
            "promotional-offer-v1",
            r#"{"product_id":"com.example.pro.year","offer_id":"winback-1","app_account_token":"user-42"}"#,
            "`app_account_token` must be a UUID",
        ),
        (
            "advanced-commerce",
            r#"{"request":{"operation":"CREATE_ONE_TIME_CHARGE","item":{"SKU":"BOOK_A","price":"1"}}}"#,
            "`request.item.price` must be a non-negative integer",
        ),
    ];
    for (kind, body, want) in cases {
        let r = post(&b, &shop.secret, kind, body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(r.error_code(), "PROXY_BAD_REQUEST");
        let detail = r.json()["errors"][0]["detail"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(detail.contains(want), "{body}: {detail}");
    }
    // Over 64 KiB: declared, and sent chunked without a length.
    let big = format!(
        r#"{{"product_id":"com.example.pro.year","offer_id":"winback-1","bundle_id":"{}"}}"#,
        "x".repeat(70 * 1024)
    );
    let r = post(&b, &shop.secret, "promotional-offer", &big).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.error_code(), "PROXY_BODY_TOO_LARGE");
    let chunks: Vec<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>> = big
        .as_bytes()
        .chunks(8 * 1024)
        .map(|c| Ok(hyper::body::Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let streamed = http_body_util::StreamBody::new(futures_util::stream::iter(chunks));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::StreamBody<_>>();
    let response = client
        .request(
            http::Request::post(format!("http://{}{PATH}promotional-offer", b.addr))
                .header("authorization", format!("Bearer {}", shop.secret))
                .body(streamed)
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // GET: 405 with `Allow: POST`.
    let r = send(
        b.request("GET", &format!("{PATH}promotional-offer"))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.headers["allow"], "POST");
    // `allow` rules apply as to any path: `narrow` may not call this endpoint at all.
    let r = post(
        &b,
        &narrow.secret,
        "advanced-commerce",
        &json!({"request": apple_request()}).to_string(),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(r.json()["errors"][0]["detail"]
        .as_str()
        .unwrap()
        .contains("may not POST"));
    // No credential: 401 before anything else; an unknown endpoint: 404.
    let r = send(
        http::Request::post(format!("http://{}{PATH}promotional-offer", b.addr))
            .body(Full::new(Bytes::from("{}")))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = post(&b, &shop.secret, "promotional-offer-v3", "{}").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    let records = binary_audit(&b, cases.len() + 6).await;
    for record in &records[..cases.len()] {
        assert_eq!(record["error"], "invalid_body", "{record}");
        assert_eq!(record["decision"], "denied");
        assert_eq!(record["api"], "in-app-signing");
    }
    let metrics = b.metrics().await;
    assert_signatures(&metrics, "promotional-offer", "shop", "invalid", 5);
    // The two 413s.
    assert_signatures(&metrics, "promotional-offer", "shop", "refused", 2);
    assert!(b.world.standin.received().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_is_the_pinned_one_or_the_bundles_or_the_only_one_and_a_foreign_bundle_is_refused()
{
    // A second app with its own In-App Purchase key.
    let other = fixture::Key::generate().unwrap();
    let other_pem = other.pem.clone();
    let shop = shop();
    let pinned = Shop::new(
        "pinned",
        r#""POST /proxy/v1/signatures/*""#,
        &format!("key = \"other-app\"\n{POLICY}"),
    );
    let bundle_pinned = Shop::new(
        "bundle-pinned",
        r#""POST /proxy/v1/signatures/*""#,
        &format!("bundle_id = \"com.example.other\"\n{POLICY}"),
    );
    let extra = format!(
        "{}{}{}\n[[keys]]\nname = \"other-app\"\nkind = \"in-app-purchase\"\nkey_id = \"OTHERKEY01\"\nissuer_id = \"{ISSUER}\"\nbundle_id = \"com.example.other\"\nprivate_key_file = \"keys/SubscriptionKey_OTHERKEY01.p8\"\napis = [\"in-app-signing\"]\n",
        shop.toml, pinned.toml, bundle_pinned.toml
    );
    // `[[keys]]` after the clients is still TOML's keys array.
    let b = Binary::start_with(
        Setup::default(),
        move |t| t + &extra,
        move |dir| write_private(&dir.join("keys/SubscriptionKey_OTHERKEY01.p8"), &other_pem),
    )
    .await;
    let offer = |bundle: Option<&str>| {
        let mut body = json!({"product_id": "com.example.pro.year", "offer_id": "winback-1"});
        if let Some(bundle) = bundle {
            body["bundle_id"] = bundle.into();
        }
        body.to_string()
    };
    let other_signer = SignerOf {
        public_key: &other.public,
        key_id: "OTHERKEY01",
        issuer_id: ISSUER,
        bundle_id: "com.example.other",
    };

    // Two apps, no bundle_id: ambiguous, and the answer names the choices.
    let r = post(&b, &shop.secret, "promotional-offer", &offer(None)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let detail = r.json()["errors"][0]["detail"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        detail.contains("com.example.app") && detail.contains("com.example.other"),
        "{detail}"
    );
    // bundle_id picks the key.
    for (bundle, signer) in [
        (BUNDLE, iap(&b)),
        ("com.example.other", other_signer.clone()),
    ] {
        let r = post(&b, &shop.secret, "promotional-offer", &offer(Some(bundle))).await;
        assert_eq!(r.status, StatusCode::OK, "{bundle}: {:?}", r.body);
        let answer = r.json();
        in_app::verify_jws(answer["signature"].as_str().unwrap(), &signer, now())
            .unwrap_or_else(|e| panic!("{bundle}: {e}"));
        assert_eq!(answer["key_id"], signer.key_id);
    }
    // A bundle no key signs for: 403.
    let r = post(
        &b,
        &shop.secret,
        "promotional-offer",
        &offer(Some("com.evil.app")),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(r.json()["errors"][0]["detail"]
        .as_str()
        .unwrap()
        .contains("com.evil.app"));
    // A pinned key, or a pinned bundle id, chooses the key without `bundle_id`; another
    // bundle than the pinned one is refused, naming it.
    for who in [&pinned, &bundle_pinned] {
        let r = post(&b, &who.secret, "promotional-offer", &offer(None)).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        let signature = r.json()["signature"].as_str().unwrap().to_string();
        in_app::verify_jws(&signature, &other_signer, now()).unwrap();
        let r = post(&b, &who.secret, "promotional-offer", &offer(Some(BUNDLE))).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        let detail = r.json()["errors"][0]["detail"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(detail.contains("com.example.other"), "{detail}");
    }

    let records = binary_audit(&b, 8).await;
    assert_eq!(records[0]["error"], "ambiguous_key");
    assert_eq!(records[2]["key"], "other-app");
    assert_eq!(records[2]["signing"]["bundle_id"], "com.example.other");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_signatures_over_http2_each_get_a_fresh_nonce_and_verify() {
    let shop = shop();
    let b = start(&[&shop], Setup::default()).await;
    let client = http2_client();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let client = client.clone();
        let (addr, secret) = (b.addr, shop.secret.clone());
        tasks.push(tokio::spawn(async move {
            let kind = if i % 2 == 0 {
                "promotional-offer"
            } else {
                "promotional-offer-v1"
            };
            let body = json!({"product_id": "com.example.pro.year", "offer_id": "winback-1"});
            let r = send_with(
                client,
                http::Request::post(format!("http://{addr}{PATH}{kind}"))
                    .header("authorization", format!("Bearer {secret}"))
                    .body(Full::new(Bytes::from(body.to_string())))
                    .unwrap(),
            )
            .await;
            assert_eq!(r.status, StatusCode::OK);
            (kind, r.json())
        }));
    }
    let mut nonces = std::collections::HashSet::new();
    for task in tasks {
        let (kind, answer) = task.await.unwrap();
        let nonce = answer["nonce"].as_str().unwrap().to_string();
        if kind == "promotional-offer" {
            let v =
                in_app::verify_jws(answer["signature"].as_str().unwrap(), &iap(&b), now()).unwrap();
            assert_eq!(v.claims["nonce"], nonce.as_str());
        } else {
            let offer = V1Offer {
                product_id: "com.example.pro.year",
                offer_id: "winback-1",
                app_account_token: "",
                nonce: &nonce,
                timestamp_ms: answer["timestamp"].as_i64().unwrap(),
            };
            in_app::verify_v1(
                answer["signature"].as_str().unwrap(),
                &iap(&b),
                &offer,
                now() * 1000,
            )
            .unwrap();
        }
        assert!(nonces.insert(nonce), "a nonce was reused");
    }
    assert_eq!(nonces.len(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_signature_reaches_the_audit_log_the_operational_log_or_an_error() {
    let shop = shop();
    let b = start(
        &[&shop],
        Setup {
            rust_log: Some("debug"),
            ..Setup::default()
        },
    )
    .await;
    let mut signatures = Vec::new();
    for (kind, body) in [
        (
            "promotional-offer",
            json!({"product_id": "com.example.pro.year", "offer_id": "winback-1"}),
        ),
        ("advanced-commerce", json!({"request": apple_request()})),
        (
            "promotional-offer-v1",
            json!({"product_id": "com.example.pro.year", "offer_id": "winback-1"}),
        ),
    ] {
        let r = post(&b, &shop.secret, kind, &body.to_string()).await;
        assert_eq!(r.status, StatusCode::OK);
        signatures.push(r.json()["signature"].as_str().unwrap().to_string());
    }
    // Refusals and errors answer without a signature in them.
    for body in [
        r#"{"product_id":"com.example.free","offer_id":"winback-1"}"#,
        "{",
    ] {
        let r = post(&b, &shop.secret, "promotional-offer", body).await;
        assert!(r.status.is_client_error());
        assert!(!String::from_utf8_lossy(&r.body).contains("eyJ"));
    }
    binary_audit(&b, 5).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let audit = std::fs::read_to_string(b.world.dir.path().join("audit.jsonl")).unwrap();
    let ops = std::fs::read_to_string(b.world.dir.path().join("stderr.log")).unwrap();
    assert!(ops.contains("signed"), "the debug log ran: {ops}");
    for signature in &signatures {
        for part in signature.split('.') {
            assert!(
                !audit.contains(part),
                "a signature part is in the audit log"
            );
            assert!(
                !ops.contains(part),
                "a signature part is in the operational log"
            );
        }
    }
    // Nor a client secret or the request's base64 (the signed payload).
    assert!(!audit.contains(&shop.secret) && !ops.contains(&shop.secret));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_lists_which_clients_may_sign_what() {
    let shop = shop();
    let unreachable = Shop::new("no-route", r#""GET /v1/*""#, POLICY);
    let world = World::new(&Setup::default(), "127.0.0.1:0").await;
    let text = std::fs::read_to_string(&world.config_path).unwrap();
    std::fs::write(&world.config_path, text + &shop.toml + &unreachable.toml).unwrap();
    let out = bin()
        .args(["check", "--config"])
        .arg(&world.config_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let signing = &stdout[stdout.find("SIGNING").expect("a SIGNING section")..];
    for want in [
        "shop",
        "products:   com.example.pro.*, BOOK_*",
        "offers:     winback-*",
        "may only deny",
        "advanced commerce operations: CREATE_ONE_TIME_CHARGE",
        "currencies: USD, EUR   max price: 99990",
        "endpoints its allow rules reach: promotional-offer, introductory-offer-eligibility, advanced-commerce, promotional-offer-v1",
        "no-route",
        "(none: add \"POST /proxy/v1/signatures/*\" to allow)",
    ] {
        assert!(signing.contains(want), "{want}: {signing}");
    }
    // `tester` has no [clients.signing] and is not listed as a signer.
    assert!(!signing.contains("tester"), "{signing}");
    assert!(stdout.contains("in-app-signing     -"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_recognises_the_proxys_in_app_signatures_and_names_what_breaks_apples_rules() {
    let shop = shop();
    let b = start(&[&shop], Setup::default()).await;
    let r = post(
        &b,
        &shop.secret,
        "advanced-commerce",
        &json!({"request": apple_request()}).to_string(),
    )
    .await;
    let jws = r.json()["signature"].as_str().unwrap().to_string();
    let out = bin()
        .args(["explain", "--config"])
        .arg(&b.world.config_path)
        .arg(&jws)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("in-app signature, advanced-commerce form"),
        "{stdout}"
    );
    assert!(
        stdout.contains("signature verifies with key `storekit`"),
        "{stdout}"
    );
    assert!(
        stdout.contains("OK: breaks none of the rules the proxy knows (APPLE.md §8)"),
        "{stdout}"
    );
    // The same claims with an `exp` and a base64url request, signed by nobody: each named.
    let (header, payload) = {
        let mut parts = jws.split('.');
        (
            parts.next().unwrap().to_string(),
            parts.next().unwrap().to_string(),
        )
    };
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut claims: Value = serde_json::from_slice(&b64.decode(payload).unwrap()).unwrap();
    claims["exp"] = (now() + 600).into();
    // `??>` is `Pz8-` in base64url: a character standard base64 does not have.
    let mut request = apple_request();
    request["note"] = "??>>".into();
    claims["request"] = b64.encode(request.to_string()).into();
    let forged = format!(
        "{header}.{}.{}",
        b64.encode(claims.to_string()),
        b64.encode([7u8; 64])
    );
    let out = bin()
        .args(["explain", "--config"])
        .arg(&b.world.config_path)
        .arg(&forged)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    for want in [
        "exp is set",
        "base64url",
        "does not verify with key `storekit`",
    ] {
        assert!(stdout.contains(want), "{want}: {stdout}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iat_and_the_v1_timestamp_follow_apples_clock_as_learned_from_its_answers() {
    let shop = shop();
    // "Apple" is 10 minutes behind this host.
    let b = start(
        &[&shop],
        Setup {
            standin_clock_offset: -600,
            ..Setup::default()
        },
    )
    .await;
    // One forwarded request teaches the proxy Apple's clock (its `Date` header).
    let r = send(
        b.request("GET", "/inApps/v1/transactions/1")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let body = json!({"product_id": "com.example.pro.year", "offer_id": "winback-1"}).to_string();
    let r = post(&b, &shop.secret, "promotional-offer", &body).await;
    let iat = r.json()["issued_at"].as_i64().unwrap();
    let apple_now = now() - 600;
    assert!(
        (apple_now - 63..=apple_now - 57).contains(&iat),
        "iat {iat} is Apple's now {apple_now} minus the 60 s leeway"
    );
    let r = post(&b, &shop.secret, "promotional-offer-v1", &body).await;
    let timestamp = r.json()["timestamp"].as_i64().unwrap();
    assert!(
        ((apple_now - 63) * 1000..=(apple_now - 57) * 1000).contains(&timestamp),
        "timestamp {timestamp} ms"
    );
}
