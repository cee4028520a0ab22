//! The in-app signatures' pure parts: formats against Apple's documented examples, every
//! input check, every policy rule. The end-to-end tests verify the endpoints' output with
//! the stand-in's independent verifier.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_FIXED};
use serde_json::{json, Value};

use super::input::{parse, InputError};
use super::policy::check;
use super::*;
use crate::config::SigningPolicy;
use crate::token::signer::MemoryKey;

/// Apple's Advanced Commerce example request (APPLE.md §8.1) and Apple's base64 of it.
const APPLE_REQUEST: &str = r#"{"operation":"CREATE_ONE_TIME_CHARGE","version":"1","requestInfo":{"requestReferenceId":"f55df048-4cd8-4261-b404-b6f813ff70e5"},"currency":"USD","taxCode":"C003-00-2","storefront":"USA","item":{"SKU":"BOOK_SHERLOCK_HOMLES","displayName":"Sherlock Holmes","description":"The Sherlock Holmes, 5th Edition","price":4990}}"#;
const APPLE_REQUEST_B64: &str = "ewogICAgIm9wZXJhdGlvbiI6ICJDUkVBVEVfT05FX1RJTUVfQ0hBUkdFIiwKICAgICJ2ZXJzaW9uIjogIjEiLCAgICAgICAgICAgICAgICAgICAgIAogICAgInJlcXVlc3RJbmZvIjogewogICAgICAgICJyZXF1ZXN0UmVmZXJlbmNlSWQiOiAiZjU1ZGYwNDgtNGNkOC00MjYxLWI0MDQtYjZmODEzZmY3MGU1IgogICAgfSwKICAgICJjdXJyZW5jeSI6ICJVU0QiLAogICAgInRheENvZGUiOiAiQzAwMy0wMC0yIiwgCiAgICAic3RvcmVmcm9udCI6ICJVU0EiLAogICAgIml0ZW0iOiB7CiAgICAgICAgIlNLVSI6ICJCT09LX1NIRVJMT0NLX0hPTUxFUyIsCiAgICAgICAgImRpc3BsYXlOYW1lIjogIlNoZXJsb2NrIEhvbG1lcyIsIAogICAgICAgICJkZXNjcmlwdGlvbiI6ICJUaGUgU2hlcmxvY2sgSG9sbWVzLCA1dGggRWRpdGlvbiIsCiAgICAgICAgInByaWNlIjogNDk5MAogICAgfQp9";

const ISSUER: &str = "57246542-96fe-1a63-e053-0824d011072a";
const BUNDLE: &str = "com.example.testbundleid";
const KID: &str = "2X9R4HXF34";

fn key() -> MemoryKey {
    MemoryKey::generated()
}

fn signed(kind: Kind, body: Value, signer: &MemoryKey) -> (Signed, Ask) {
    let ask = parse(kind, body.to_string().as_bytes()).unwrap();
    let header = jose_header(KID);
    let key = SigningKey {
        signer,
        header_b64: &header,
        key_id: KID,
        issuer_id: ISSUER,
        bundle_id: BUNDLE,
    };
    let nonce = nonce(&SystemRandom::new()).unwrap();
    (sign(&ask, &key, 1_741_043_663_250, nonce).unwrap(), ask)
}

/// The JWS's header and claims as ordered key lists and values; its signature verified.
fn opened(jws: &str, signer: &MemoryKey) -> (Value, Vec<String>, Value) {
    let (signed, sig) = jws.rsplit_once('.').unwrap();
    let (header, claims) = signed.split_once('.').unwrap();
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, signer.public_key())
        .verify(signed.as_bytes(), &URL_SAFE_NO_PAD.decode(sig).unwrap())
        .unwrap();
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    let text = String::from_utf8(URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap();
    // Key order as written (serde_json's map sorts, so read the order from the text).
    let order = key_order(&text);
    (header, order, serde_json::from_str(&text).unwrap())
}

fn key_order(object: &str) -> Vec<String> {
    // Top-level keys of a flat-enough object: each `"name":` at depth 1.
    let (mut depth, mut out, mut i) = (0, Vec::new(), 0);
    let b = object.as_bytes();
    while i < b.len() {
        match b[i] {
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth -= 1,
            b'"' => {
                let end = i + 1 + object[i + 1..].find('"').unwrap();
                if depth == 1 && b.get(end + 1) == Some(&b':') {
                    out.push(object[i + 1..end].to_string());
                }
                i = end;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

#[test]
fn each_jws_form_has_apples_header_and_exactly_apples_claims_in_order() {
    let k = key();
    let cases = [
        (
            Kind::PromotionalOffer,
            json!({"product_id": "com.example.product", "offer_id": "com.example.product.offer", "transaction_id": "1000011859217"}),
            // Apple's example payload's keys (APPLE.md §8.1), in its order.
            vec![
                "iss",
                "iat",
                "aud",
                "bid",
                "nonce",
                "productId",
                "offerIdentifier",
                "transactionId",
            ],
        ),
        (
            Kind::IntroductoryOfferEligibility,
            json!({"product_id": "com.example.product", "allow_introductory_offer": false, "transaction_id": "1000011859217"}),
            vec![
                "iss",
                "iat",
                "aud",
                "bid",
                "nonce",
                "productId",
                "allowIntroductoryOffer",
                "transactionId",
            ],
        ),
        (
            Kind::AdvancedCommerce,
            json!({"request": serde_json::from_str::<Value>(APPLE_REQUEST).unwrap()}),
            vec!["iss", "iat", "aud", "bid", "nonce", "request"],
        ),
    ];
    for (kind, body, apple_keys) in cases {
        let (out, _) = signed(kind, body, &k);
        let (header, order, claims) = opened(&out.signature, &k);
        assert_eq!(header, json!({"alg": "ES256", "kid": KID, "typ": "JWT"}));
        assert_eq!(order, apple_keys, "{kind}");
        assert_eq!(claims["iss"], ISSUER);
        assert_eq!(claims["bid"], BUNDLE);
        assert_eq!(claims["aud"], kind.audience().unwrap());
        assert_eq!(claims["iat"], 1_741_043_663, "seconds, from Apple's clock");
        assert_eq!(claims["nonce"], out.nonce.as_str());
        assert_eq!(out.time, 1_741_043_663);
        assert!(claims.get("exp").is_none() && claims.get("scope").is_none());
        assert_eq!(
            out.sha256,
            crate::hex(&crate::sha256(out.signature.as_bytes()))
        );
    }
}

#[test]
fn a_promotional_offer_without_transaction_id_leaves_the_claim_out() {
    let k = key();
    let (out, _) = signed(
        Kind::PromotionalOffer,
        json!({"product_id": "p", "offer_id": "o"}),
        &k,
    );
    let (_, order, claims) = opened(&out.signature, &k);
    assert_eq!(order.last().map(String::as_str), Some("offerIdentifier"));
    assert_eq!(claims["productId"], "p");
    assert_eq!(claims["offerIdentifier"], "o");
}

#[test]
fn the_advanced_commerce_request_claim_is_standard_base64_of_the_requests_json() {
    let k = key();
    let request: Value = serde_json::from_str(APPLE_REQUEST).unwrap();
    let (out, ask) = signed(Kind::AdvancedCommerce, json!({"request": request}), &k);
    let (_, _, claims) = opened(&out.signature, &k);
    let encoded = claims["request"].as_str().unwrap();
    let decoded: Value = serde_json::from_slice(&STANDARD.decode(encoded).unwrap()).unwrap();
    assert_eq!(decoded, request);
    // Apple's own base64 decodes to the same request, compared as JSON (APPLE.md §8.1).
    let apple: Value =
        serde_json::from_slice(&STANDARD.decode(APPLE_REQUEST_B64).unwrap()).unwrap();
    assert_eq!(decoded, apple);
    // Standard alphabet with padding, never base64url.
    assert!(!encoded.contains('-') && !encoded.contains('_'));
    assert_eq!(encoded.len() % 4, 0);
    let commerce = ask.commerce.unwrap();
    assert_eq!(commerce.operation, "CREATE_ONE_TIME_CHARGE");
    assert_eq!(
        commerce.skus,
        vec![(
            "request.item.SKU".to_string(),
            "BOOK_SHERLOCK_HOMLES".to_string()
        )]
    );
    assert_eq!(
        commerce.prices,
        vec![("request.item.price".to_string(), 4990)]
    );
    assert_eq!(
        commerce.currencies,
        vec![("request.currency".to_string(), "USD".to_string())]
    );
}

#[test]
fn the_v1_signature_is_base64_der_over_apples_seven_part_message() {
    let k = key();
    let token = "8E9A4D5C-1B2F-4A3E-9C8D-7B6A5F4E3D2C";
    let (out, _) = signed(
        Kind::PromotionalOfferV1,
        json!({"product_id": "com.example.product", "offer_id": "winback-1", "app_account_token": token}),
        &k,
    );
    assert_eq!(out.time, 1_741_043_663_250, "milliseconds");
    let der = STANDARD.decode(&out.signature).unwrap();
    assert_eq!(der[0], 0x30, "a DER SEQUENCE");
    let message = format!(
        "{BUNDLE}\u{2063}{KID}\u{2063}com.example.product\u{2063}winback-1\u{2063}{}\u{2063}{}\u{2063}1741043663250",
        token.to_lowercase(),
        out.nonce
    );
    assert_eq!(
        v1_message(
            BUNDLE,
            KID,
            "com.example.product",
            "winback-1",
            token,
            &out.nonce,
            1_741_043_663_250
        ),
        message
    );
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, k.public_key())
        .verify(message.as_bytes(), &der)
        .unwrap();
    // No app account token: the fifth value is empty and its separators stay.
    let (out, _) = signed(
        Kind::PromotionalOfferV1,
        json!({"product_id": "p", "offer_id": "o"}),
        &k,
    );
    let message = format!(
        "{BUNDLE}\u{2063}{KID}\u{2063}p\u{2063}o\u{2063}\u{2063}{}\u{2063}1741043663250",
        out.nonce
    );
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, k.public_key())
        .verify(
            message.as_bytes(),
            &STANDARD.decode(&out.signature).unwrap(),
        )
        .unwrap();
}

#[test]
fn nonces_are_fresh_lowercase_uuid_v4() {
    let rng = SystemRandom::new();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..1000 {
        let n = nonce(&rng).unwrap();
        assert!(is_uuid(&n), "{n}");
        assert_eq!(n, n.to_lowercase());
        assert_eq!(&n[14..15], "4", "version 4: {n}");
        assert!(
            matches!(&n[19..20], "8" | "9" | "a" | "b"),
            "RFC variant: {n}"
        );
        assert!(seen.insert(n));
    }
}

#[test]
fn bad_bodies_are_refused_naming_the_field() {
    use Kind::*;
    let cases: Vec<(Kind, &str, Option<&str>)> = vec![
        (PromotionalOffer, "not json", None),
        (PromotionalOffer, "[1]", None),
        (PromotionalOffer, r#"{"offer_id":"o"}"#, Some("product_id")),
        (PromotionalOffer, r#"{"product_id":"p"}"#, Some("offer_id")),
        (
            PromotionalOffer,
            r#"{"product_id":7,"offer_id":"o"}"#,
            Some("product_id"),
        ),
        (
            PromotionalOffer,
            r#"{"product_id":"","offer_id":"o"}"#,
            Some("product_id"),
        ),
        (
            PromotionalOffer,
            r#"{"product_id":"p\u2063x","offer_id":"o"}"#,
            Some("product_id"),
        ),
        (
            PromotionalOffer,
            r#"{"product_id":"p","offer_id":"o","transaction_id":"e6a3c2d1-0000-4000-8000-000000000000"}"#,
            Some("transaction_id"),
        ),
        (
            PromotionalOffer,
            r#"{"product_id":"p","offer_id":"o","transaction_id":1000011859217}"#,
            Some("transaction_id"),
        ),
        (
            PromotionalOffer,
            r#"{"product_id":"p","offer_id":"o","transactionId":"1"}"#,
            Some("transactionId"),
        ),
        (
            PromotionalOffer,
            r#"{"product_id":"p","offer_id":"o","exp":1}"#,
            Some("exp"),
        ),
        (
            PromotionalOffer,
            r#"{"product_id":"p","offer_id":"o","bundle_id":5}"#,
            Some("bundle_id"),
        ),
        (
            IntroductoryOfferEligibility,
            r#"{"product_id":"p","transaction_id":"1"}"#,
            Some("allow_introductory_offer"),
        ),
        (
            IntroductoryOfferEligibility,
            r#"{"product_id":"p","allow_introductory_offer":"true","transaction_id":"1"}"#,
            Some("allow_introductory_offer"),
        ),
        (
            IntroductoryOfferEligibility,
            r#"{"product_id":"p","allow_introductory_offer":true}"#,
            Some("transaction_id"),
        ),
        (
            PromotionalOfferV1,
            r#"{"product_id":"p","offer_id":"o","app_account_token":"not-a-uuid"}"#,
            Some("app_account_token"),
        ),
        (
            PromotionalOfferV1,
            r#"{"product_id":"p","offer_id":"o","app_account_token":7}"#,
            Some("app_account_token"),
        ),
        (AdvancedCommerce, r#"{}"#, Some("request")),
        (AdvancedCommerce, r#"{"request":"e30="}"#, Some("request")),
        (
            AdvancedCommerce,
            r#"{"request":{}}"#,
            Some("request.operation"),
        ),
        (
            AdvancedCommerce,
            r#"{"request":{"Operation":"CREATE_ONE_TIME_CHARGE"}}"#,
            Some("request.operation"),
        ),
        (
            AdvancedCommerce,
            r#"{"request":{"operation":"X","item":{"SKU":5}}}"#,
            Some("request.item.SKU"),
        ),
        (
            AdvancedCommerce,
            r#"{"request":{"operation":"X","items":[{"SKU":"a","price":-1}]}}"#,
            Some("request.items[0].price"),
        ),
        (
            AdvancedCommerce,
            r#"{"request":{"operation":"X","item":{"price":49.9}}}"#,
            Some("request.item.price"),
        ),
        (
            AdvancedCommerce,
            r#"{"request":{"operation":"X","item":{"price":"4990"}}}"#,
            Some("request.item.price"),
        ),
        (
            AdvancedCommerce,
            r#"{"request":{"operation":"X","currency":1}}"#,
            Some("request.currency"),
        ),
    ];
    for (kind, body, field) in cases {
        let err = parse(kind, body.as_bytes()).expect_err(body);
        assert_eq!(err.field(), field, "{body}: {err}");
        assert!(!err.to_string().is_empty());
    }
    // `null` is absent; an unknown field's odd name is not echoed.
    assert!(parse(
        PromotionalOffer,
        br#"{"product_id":"p","offer_id":"o","transaction_id":null}"#
    )
    .is_ok());
    let err = parse(
        PromotionalOffer,
        "{\"product_id\":\"p\",\"offer_id\":\"o\",\"<script>\":1}".as_bytes(),
    )
    .unwrap_err();
    assert!(
        matches!(err, InputError::Unknown { ref field, .. } if field == "<field>"),
        "{err}"
    );
}

fn policy() -> SigningPolicy {
    SigningPolicy {
        products: vec!["com.example.pro.*".into(), "BOOK_*".into()],
        offers: vec!["winback-*".into()],
        grant_introductory_offer: false,
        operations: vec!["CREATE_ONE_TIME_CHARGE".into()],
        currencies: Some(vec!["USD".into(), "EUR".into()]),
        max_price: Some(99_990),
    }
}

#[test]
fn every_policy_rule_allows_what_it_lists_and_refuses_the_rest_naming_rule_and_value() {
    use Kind::*;
    let ac = |request: Value| json!({"request": request}).to_string();
    type Case = (Kind, String, Option<(&'static str, &'static str)>);
    let cases: Vec<Case> = vec![
        (PromotionalOffer, json!({"product_id":"com.example.pro.year","offer_id":"winback-3"}).to_string(), None),
        (PromotionalOffer, json!({"product_id":"com.example.free","offer_id":"winback-3"}).to_string(), Some(("signing.products", "com.example.free"))),
        (PromotionalOffer, json!({"product_id":"com.example.pro.year","offer_id":"loyal-1"}).to_string(), Some(("signing.offers", "loyal-1"))),
        (PromotionalOfferV1, json!({"product_id":"com.example.pro.year","offer_id":"free-forever"}).to_string(), Some(("signing.offers", "free-forever"))),
        (IntroductoryOfferEligibility, json!({"product_id":"com.example.pro.year","allow_introductory_offer":false,"transaction_id":"1"}).to_string(), None),
        (IntroductoryOfferEligibility, json!({"product_id":"com.example.pro.year","allow_introductory_offer":true,"transaction_id":"1"}).to_string(), Some(("signing.grant_introductory_offer", "allow_introductory_offer = true"))),
        (IntroductoryOfferEligibility, json!({"product_id":"other","allow_introductory_offer":false,"transaction_id":"1"}).to_string(), Some(("signing.products", "other"))),
        (AdvancedCommerce, APPLE_REQUEST.replace(r#"{"operation""#, r#"{"request":{"operation""#) + "}", None),
        (AdvancedCommerce, ac(json!({"operation":"CREATE_SUBSCRIPTION","currency":"USD"})), Some(("signing.operations", "CREATE_SUBSCRIPTION"))),
        (AdvancedCommerce, ac(json!({"operation":"CREATE_ONE_TIME_CHARGE","currency":"JPY"})), Some(("signing.currencies", "JPY"))),
        (AdvancedCommerce, ac(json!({"operation":"CREATE_ONE_TIME_CHARGE","item":{"SKU":"BOOK_A","price":99_990}})), None),
        (AdvancedCommerce, ac(json!({"operation":"CREATE_ONE_TIME_CHARGE","item":{"SKU":"BOOK_A","price":99_991}})), Some(("signing.max_price", "99991"))),
        // Deep in the tree, in an array, under another name's case: still found.
        (AdvancedCommerce, ac(json!({"operation":"CREATE_ONE_TIME_CHARGE","items":[{"SKU":"BOOK_A","price":1},{"x":{"Sku":"MOVIE_B","price":1}}]})), Some(("signing.products", "MOVIE_B"))),
        (AdvancedCommerce, ac(json!({"operation":"CREATE_ONE_TIME_CHARGE","items":[{"SKU":"BOOK_A","offer":{"PRICE":100_000}}]})), Some(("signing.max_price", "items[0].offer.PRICE"))),
        (AdvancedCommerce, ac(json!({"operation":"CREATE_ONE_TIME_CHARGE","item":{"SKU":"BOOK_A","price":18_446_744_073_709_551_615u64}})), Some(("signing.max_price", "price"))),
        (AdvancedCommerce, ac(json!({"operation":"CREATE_ONE_TIME_CHARGE","nested":{"currency":"GBP"}})), Some(("signing.currencies", "GBP"))),
    ];
    for (kind, body, want) in cases {
        let ask = parse(kind, body.as_bytes()).expect(&body);
        match (check(Some(&policy()), &ask), want) {
            (Ok(()), None) => {}
            (Err(denied), Some((rule, value))) => {
                assert_eq!(denied.rule, rule, "{body}");
                assert!(denied.value.contains(value), "{body}: {denied}");
            }
            (got, want) => panic!("{body}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn no_policy_or_an_empty_one_signs_nothing() {
    let ask = parse(
        Kind::PromotionalOffer,
        br#"{"product_id":"com.example.pro.year","offer_id":"winback-3"}"#,
    )
    .unwrap();
    assert_eq!(check(None, &ask).unwrap_err().rule, "signing");
    assert_eq!(
        check(Some(&SigningPolicy::default()), &ask)
            .unwrap_err()
            .rule,
        "signing.products"
    );
    let ac = parse(
        Kind::AdvancedCommerce,
        br#"{"request":{"operation":"CREATE_ONE_TIME_CHARGE"}}"#,
    )
    .unwrap();
    let mut open = policy();
    open.operations.clear();
    assert_eq!(
        check(Some(&open), &ac).unwrap_err().rule,
        "signing.operations"
    );
}

#[test]
fn what_is_signed_is_the_tree_that_was_checked() {
    // A duplicate key: the parser keeps one value, the policy checks that one, and the
    // signed JSON carries exactly it — never the other.
    let body = br#"{"request":{"operation":"CREATE_ONE_TIME_CHARGE","item":{"SKU":"BOOK_A","price":1,"price":999999}}}"#;
    let ask = parse(Kind::AdvancedCommerce, body).unwrap();
    let signed: Value = serde_json::from_str(ask.request_json.as_deref().unwrap()).unwrap();
    let checked = ask.commerce.as_ref().unwrap().prices.clone();
    assert_eq!(checked.len(), 1);
    assert_eq!(signed["item"]["price"], checked[0].1);
    assert_eq!(
        check(Some(&policy()), &ask).map_err(|d| d.rule),
        Err("signing.max_price")
    );
}

#[test]
fn signed_debug_hides_the_signature() {
    let k = key();
    let (out, _) = signed(
        Kind::PromotionalOffer,
        json!({"product_id": "p", "offer_id": "o"}),
        &k,
    );
    let text = format!("{out:?}");
    assert!(!text.contains(&out.signature), "{text}");
    assert!(text.contains(&out.sha256));
}
