//! DESIGN §17b, client keys, through the real binary: a key made by `client-key`, JWTs
//! shaped exactly as Apple's Python and Node libraries and APNs libraries sign them (signed
//! here with RustCrypto's p256, never the proxy's ring), every refusal, the audit record,
//! `check`, `explain --config`, and a reload that removes the key.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use p256::ecdsa::signature::Signer as _;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::DecodePrivateKey as _;
use serde_json::{json, Value};

use crate::second_round::{binary_audit, Binary};
use crate::support::*;

/// `apple-api-proxy client-key receipts --out DIR/receipts.p8`: the key id, the private key
/// and the printed `[[clients]]` lines.
struct Made {
    key_id: String,
    key: SigningKey,
    lines: String,
}

fn make_client_key(dir: &std::path::Path, name: &str) -> Made {
    let out_file = dir.join(format!("{name}.p8"));
    let out = bin()
        .args(["client-key", name, "--out"])
        .arg(&out_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let pem = std::fs::read_to_string(&out_file).unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "PKCS#8 PEM");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&out_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the private key is 0600");
    }
    // Never overwritten.
    let again = bin()
        .args(["client-key", name, "--out"])
        .arg(&out_file)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert_eq!(std::fs::read_to_string(&out_file).unwrap(), pem);
    let key_id = stdout
        .lines()
        .find_map(|l| l.strip_prefix("key_id = \""))
        .and_then(|l| l.strip_suffix('"'))
        .unwrap()
        .to_string();
    assert_eq!(key_id.len(), 10);
    assert!(key_id
        .bytes()
        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit()));
    assert!(
        !stdout.contains(pem.lines().nth(1).unwrap()),
        "the private key is not printed"
    );
    let lines = stdout[stdout.find("[[clients]]").unwrap()..].replace(
        "allow = [\"GET /inApps/*\"]",
        "allow = [\"GET /inApps/*\", \"POST /inApps/*\"]",
    );
    Made {
        key_id,
        key: SigningKey::from(p256::SecretKey::from_pkcs8_pem(&pem).unwrap()),
        lines,
    }
}

fn jwt(key: &SigningKey, header: Value, claims: Value) -> String {
    let signed = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig: Signature = key.sign(signed.as_bytes());
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

async fn get_with(b: &Binary, header: &str, value: &str) -> Reply {
    send(
        http::Request::get(format!(
            "http://{}/inApps/v1/transactions/2000000123456789",
            b.addr
        ))
        .header(header, value)
        .body(Full::new(Bytes::new()))
        .unwrap(),
    )
    .await
}

async fn start() -> (Binary, Made) {
    let scratch = tempfile::tempdir().unwrap();
    let made = make_client_key(scratch.path(), "receipts");
    let lines = made.lines.clone();
    let b = Binary::start(Setup::default(), move |t| t + "\n" + &lines).await;
    (b, made)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwts_signed_as_apples_libraries_and_apns_libraries_sign_them_authenticate_the_client() {
    let (b, made) = start().await;
    let kid = made.key_id.as_str();
    let t = now();
    let cases = [
        // Apple's App Store Server Library, Python: PyJWT header, no iat.
        (
            "python",
            json!({"alg": "ES256", "kid": kid, "typ": "JWT"}),
            json!({"bid": BUNDLE, "iss": ISSUER, "aud": "appstoreconnect-v1", "exp": t + 300}),
        ),
        // Apple's App Store Server Library, Node: iat and exp.
        (
            "node",
            json!({"alg": "ES256", "kid": kid, "typ": "JWT"}),
            json!({"iss": ISSUER, "iat": t, "exp": t + 3600, "aud": "appstoreconnect-v1", "bid": BUNDLE}),
        ),
        // APNs libraries: {alg, kid} and {iss, iat}, iat possibly a float.
        (
            "apns",
            json!({"alg": "ES256", "kid": kid}),
            json!({"iss": "TEAMID1234", "iat": t - 600}),
        ),
        (
            "apns-float",
            json!({"alg": "ES256", "kid": kid}),
            json!({"iss": "TEAMID1234", "iat": (t as f64) - 0.5}),
        ),
    ];
    for (shape, header, claims) in &cases {
        let token = jwt(&made.key, header.clone(), claims.clone());
        for auth in ["authorization", "proxy-authorization"] {
            let r = get_with(&b, auth, &format!("Bearer {token}")).await;
            assert_eq!(r.status, StatusCode::OK, "{shape} in {auth}: {:?}", r.body);
        }
        // Twice: the second time from the verified-token cache.
        let r = get_with(&b, "authorization", &format!("bearer {token}")).await;
        assert_eq!(r.status, StatusCode::OK, "{shape}");
    }
    // Apple got the proxy's own token, minted from the In-App Purchase key — never the
    // client's JWT.
    let received = b.world.standin.received();
    assert_eq!(received.len(), cases.len() * 3);
    for r in &received {
        let bearer = r.headers["authorization"]
            .to_str()
            .unwrap()
            .strip_prefix("Bearer ")
            .unwrap();
        let (header, _) = decode_jwt(bearer);
        assert_eq!(header["kid"], IAP_KID);
        assert!(verify_with_p256(bearer, &b.world.keys.iap.public));
    }
    let records = binary_audit(&b, cases.len() * 3).await;
    for record in &records {
        assert_eq!(record["client"], "receipts", "{record}");
        assert_eq!(record["client_auth"], "client_key");
        assert_eq!(record["key"], "storekit");
        assert_eq!(record["decision"], "forwarded");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_is_a_401_naming_the_check_and_never_the_token() {
    let (b, made) = start().await;
    let kid = made.key_id.as_str();
    let t = now();
    let es256 = json!({"alg": "ES256", "kid": kid, "typ": "JWT"});
    let other = SigningKey::from(p256::SecretKey::from_slice(&[5u8; 32]).unwrap());
    let hs256 = {
        // An HMAC "signature" keyed with the public key: the classic confusion attack.
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(json!({"alg": "HS256", "kid": kid}).to_string()),
            URL_SAFE_NO_PAD.encode(json!({"iat": t}).to_string())
        );
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode([1u8; 32]))
    };
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(json!({"alg": "none", "kid": kid}).to_string()),
        URL_SAFE_NO_PAD.encode(json!({"iat": t}).to_string())
    );
    let cases: Vec<(String, &str)> = vec![
        (hs256, "alg is not ES256"),
        (none, "alg is not ES256"),
        (
            jwt(
                &made.key,
                json!({"alg": "RS256", "kid": kid}),
                json!({"iat": t}),
            ),
            "alg is not ES256",
        ),
        (
            jwt(&other, es256.clone(), json!({"iat": t})),
            "signature does not verify",
        ),
        (
            jwt(
                &made.key,
                es256.clone(),
                json!({"iss": ISSUER, "aud": "appstoreconnect-v1"}),
            ),
            "neither exp nor iat",
        ),
        (
            jwt(&made.key, es256.clone(), json!({"exp": t - 5})),
            "expired",
        ),
        (
            jwt(&made.key, es256.clone(), json!({"exp": t + 7200})),
            "more than 1 h ahead",
        ),
        (
            jwt(&made.key, es256.clone(), json!({"iat": t, "exp": t + 3700})),
            "more than 1 h ahead",
        ),
        (
            jwt(&made.key, es256.clone(), json!({"iat": t + 300})),
            "in the future",
        ),
        (
            jwt(&made.key, es256.clone(), json!({"iat": t - 4000})),
            "more than 1 h old",
        ),
    ];
    for (token, want) in &cases {
        let r = get_with(&b, "authorization", &format!("Bearer {token}")).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{want}");
        assert_eq!(r.error_code(), "PROXY_UNAUTHENTICATED");
        let body = String::from_utf8_lossy(&r.body).to_string();
        assert!(
            body.contains(want) && body.contains("receipts"),
            "{want}: {body}"
        );
        for part in token.split('.').filter(|p| p.len() > 8) {
            assert!(!body.contains(part), "the token is echoed: {body}");
        }
    }
    // A JWT whose kid is no client's is no credential, as before client keys.
    let stranger = jwt(
        &other,
        json!({"alg": "ES256", "kid": "ABCDEFGHIJ"}),
        json!({"iat": t}),
    );
    let r = get_with(&b, "authorization", &format!("Bearer {stranger}")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(String::from_utf8_lossy(&r.body).contains("send your proxy client secret"));
    assert!(
        b.world.standin.received().is_empty(),
        "nothing reached Apple"
    );
    let records = binary_audit(&b, cases.len() + 1).await;
    for record in &records {
        assert_eq!(record["decision"], "unauthenticated");
    }
    let log = std::fs::read_to_string(b.world.dir.path().join("audit.jsonl")).unwrap();
    for (token, _) in &cases {
        assert!(!log.contains(token.as_str()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_removes_the_client_key_stops_it_at_once_and_check_and_explain_know_it() {
    let (b, made) = start().await;
    let token = jwt(
        &made.key,
        json!({"alg": "ES256", "kid": made.key_id, "typ": "JWT"}),
        json!({"iss": ISSUER, "iat": now(), "exp": now() + 600, "aud": "appstoreconnect-v1", "bid": BUNDLE}),
    );
    let r = get_with(&b, "authorization", &format!("Bearer {token}")).await;
    assert_eq!(r.status, StatusCode::OK);

    // check lists it; explain --config names the client it authenticates.
    let out = bin()
        .args(["check", "--config"])
        .arg(&b.world.config_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains(&format!("client-key:{}", made.key_id)),
        "{stdout}"
    );
    let out = bin()
        .args(["explain", "--config"])
        .arg(&b.world.config_path)
        .arg(&token)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("OK: authenticates client `receipts`"),
        "{stdout}"
    );
    let expired = jwt(
        &made.key,
        json!({"alg": "ES256", "kid": made.key_id}),
        json!({"exp": now() - 10}),
    );
    let out = bin()
        .args(["explain", "--config"])
        .arg(&b.world.config_path)
        .arg(&expired)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("expired"));

    // Remove the client's lines and reload: the same (cached) JWT stops working at once.
    let text = std::fs::read_to_string(&b.world.config_path).unwrap();
    let cut = text.find(made.lines.as_str()).expect("the client's lines");
    std::fs::write(&b.world.config_path, &text[..cut]).unwrap();
    std::process::Command::new("kill")
        .args(["-HUP", &b.child.id().to_string()])
        .status()
        .unwrap();
    let mut refused = false;
    for _ in 0..100 {
        let r = get_with(&b, "authorization", &format!("Bearer {token}")).await;
        if r.status == StatusCode::UNAUTHORIZED {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused, "the removed client key still authenticates");
}
