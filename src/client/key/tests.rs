//! §17b's rules, one row each, with JWTs signed by RustCrypto's p256 (not the verifier's
//! ring), shaped as Apple's libraries and APNs libraries send them.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use p256::ecdsa::signature::Signer as _;
use p256::ecdsa::{Signature, SigningKey};
use p256::elliptic_curve::sec1::ToEncodedPoint as _;
use serde_json::{json, Value};

use super::*;

const NOW: i64 = 1_800_000_000;

fn key() -> (SigningKey, Vec<u8>) {
    let secret = p256::SecretKey::from_slice(&[7u8; 32]).unwrap();
    let public = secret
        .public_key()
        .to_encoded_point(false)
        .as_bytes()
        .to_vec();
    (SigningKey::from(secret), public)
}

fn jwt(sk: &SigningKey, header: Value, claims: Value) -> String {
    let signed = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig: Signature = sk.sign(signed.as_bytes());
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
}

fn es256() -> Value {
    json!({"alg": "ES256", "kid": "CLNTKEY001", "typ": "JWT"})
}

#[test]
fn the_shapes_apples_libraries_and_apns_libraries_send_are_accepted() {
    let (sk, public) = key();
    let cases = [
        // Apple's Python library (App Store Server API): no iat.
        json!({"bid": "com.example.app", "iss": "57246542-96fe-1a63-e053-0824d011072a", "aud": "appstoreconnect-v1", "exp": NOW + 300}),
        // Apple's Node library: iat and exp.
        json!({"iss": "57246542-96fe-1a63-e053-0824d011072a", "iat": NOW, "exp": NOW + 3600, "aud": "appstoreconnect-v1", "bid": "com.example.app"}),
        // APNs libraries: {iss, iat}, no exp; iat possibly a float.
        json!({"iss": "TEAMID1234", "iat": NOW - 1200}),
        json!({"iss": "TEAMID1234", "iat": (NOW as f64) - 0.25}),
        // Other claims are the SDK's business.
        json!({"iat": NOW, "scope": ["GET /v1/apps"], "sub": "user"}),
    ];
    for claims in cases {
        let token = jwt(&sk, es256(), claims.clone());
        assert_eq!(kid_of(&token).as_deref(), Some("CLNTKEY001"));
        assert!(verify(&token, &public, NOW).is_ok(), "{claims}");
    }
    // The verified-token cache keeps it until exp, or until iat + 1 h.
    let t = jwt(&sk, es256(), json!({"exp": NOW + 300}));
    assert_eq!(verify(&t, &public, NOW), Ok(NOW + 299));
    let t = jwt(&sk, es256(), json!({"iat": NOW - 100}));
    assert_eq!(verify(&t, &public, NOW), Ok(NOW + 3500));
}

#[test]
fn every_check_refuses_with_its_own_reason() {
    let (sk, public) = key();
    let (other, _) = {
        let s = p256::SecretKey::from_slice(&[9u8; 32]).unwrap();
        (SigningKey::from(s), ())
    };
    let good = json!({"iat": NOW, "exp": NOW + 600});
    let cases: Vec<(String, KeyCheck)> = vec![
        ("not.a-jwt".into(), KeyCheck::Malformed),
        (
            jwt(
                &sk,
                json!({"alg": "HS256", "kid": "CLNTKEY001"}),
                good.clone(),
            ),
            KeyCheck::Algorithm,
        ),
        (
            jwt(
                &sk,
                json!({"alg": "none", "kid": "CLNTKEY001"}),
                good.clone(),
            ),
            KeyCheck::Algorithm,
        ),
        (
            jwt(
                &sk,
                json!({"alg": "RS256", "kid": "CLNTKEY001"}),
                good.clone(),
            ),
            KeyCheck::Algorithm,
        ),
        (
            jwt(&sk, json!({"kid": "CLNTKEY001"}), good.clone()),
            KeyCheck::Algorithm,
        ),
        (jwt(&other, es256(), good.clone()), KeyCheck::Signature),
        (jwt(&sk, es256(), json!({"iss": "x"})), KeyCheck::NoTime),
        (
            jwt(&sk, es256(), json!({"exp": "soon"})),
            KeyCheck::ExpNotNumber,
        ),
        (
            jwt(&sk, es256(), json!({"iat": "now"})),
            KeyCheck::IatNotNumber,
        ),
        (jwt(&sk, es256(), json!({"exp": NOW})), KeyCheck::Expired),
        (
            jwt(&sk, es256(), json!({"iat": NOW - 700, "exp": NOW - 100})),
            KeyCheck::Expired,
        ),
        (
            jwt(&sk, es256(), json!({"exp": NOW + 3601})),
            KeyCheck::TooLong,
        ),
        (
            jwt(&sk, es256(), json!({"iat": NOW, "exp": NOW + 3601})),
            KeyCheck::TooLong,
        ),
        (
            jwt(&sk, es256(), json!({"iat": NOW + 61})),
            KeyCheck::IssuedInFuture,
        ),
        (
            jwt(&sk, es256(), json!({"iat": NOW - 3601})),
            KeyCheck::TooOld,
        ),
    ];
    for (token, want) in cases {
        assert_eq!(verify(&token, &public, NOW), Err(want), "{token}");
        assert!(!want.to_string().contains(&token));
    }
    // A JWS with the signature cut, or an extra part: malformed or not verified.
    let t = jwt(&sk, es256(), good.clone());
    let (head, _) = t.rsplit_once('.').unwrap();
    assert_eq!(
        verify(&format!("{head}."), &public, NOW),
        Err(KeyCheck::Signature)
    );
    assert_eq!(
        verify(&format!("{t}.x"), &public, NOW),
        Err(KeyCheck::Malformed)
    );
    // Bounds hold at their edges.
    assert!(verify(&jwt(&sk, es256(), json!({"iat": NOW + 60})), &public, NOW).is_ok());
    assert!(verify(&jwt(&sk, es256(), json!({"iat": NOW - 3600})), &public, NOW).is_ok());
    assert!(verify(&jwt(&sk, es256(), json!({"exp": NOW + 3600})), &public, NOW).is_ok());
}

#[test]
fn only_jwt_shaped_values_with_a_string_kid_name_a_key() {
    assert_eq!(kid_of("aap_secret"), None);
    assert_eq!(kid_of("a.b"), None);
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","kid":7}"#);
    assert_eq!(kid_of(&format!("{header}.e30.x")), None);
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","kid":"K1"}"#);
    assert_eq!(kid_of(&format!("{header}.e30.x")).as_deref(), Some("K1"));
}

#[test]
fn an_issued_key_pair_verifies_its_own_jwts_and_debug_hides_the_private_half() {
    use p256::pkcs8::{DecodePrivateKey as _, DecodePublicKey as _};
    let issued = issue().unwrap();
    assert_eq!(issued.key_id.len(), 10);
    assert!(issued
        .key_id
        .bytes()
        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit()));
    assert_ne!(issue().unwrap().key_id, issued.key_id, "fresh ids");
    let secret = p256::SecretKey::from_pkcs8_pem(&issued.private_pem).unwrap();
    let public = p256::PublicKey::from_public_key_pem(&issued.public_pem).unwrap();
    assert_eq!(secret.public_key(), public);
    let token = jwt(
        &SigningKey::from(secret),
        json!({"alg": "ES256", "kid": issued.key_id}),
        json!({"iat": NOW}),
    );
    let sec1 = public.to_encoded_point(false);
    assert!(verify(&token, sec1.as_bytes(), NOW).is_ok());
    let debug = format!("{issued:?}");
    let body = issued.private_pem.lines().nth(1).unwrap();
    assert!(!debug.contains(body), "{debug}");
}
