//! DESIGN §16, keys in an HSM, through the real binary and a real PKCS#11 module: SoftHSM2
//! from the distribution's packages (`.ci/run` installs it), and for run-time failures the
//! fault-injecting shim in `examples/pkcs11_fault.rs` in front of it (SoftHSM2 itself has no
//! way to fail on demand). The key attributes are read back with OpenSC's `pkcs11-tool`,
//! not with the proxy's own code.
//!
//! Without SoftHSM2 these tests say so and pass, unless `AAP_REQUIRE_SOFTHSM` is set, as
//! `.ci/run` sets it: in CI a missing HSM is a failure, never a skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use apple_standin::fixture::{self, Identity, Slot};
use apple_standin::in_app::{self, SignerOf};
use apple_standin::Role;
use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;

use crate::second_round::{binary_audit, Binary};
use crate::support::*;

type Env = Vec<(String, String)>;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const TOKEN: &str = "apple";
const PIN: &str = "4711-test-pin";

/// A SoftHSM2 installation of its own: a config and a token directory in a temp dir, one
/// initialised token labelled [`TOKEN`] with user PIN [`PIN`].
struct SoftHsm {
    dir: tempfile::TempDir,
    conf: PathBuf,
}

fn missing(what: &str) -> Option<SoftHsm> {
    assert!(
        std::env::var_os("AAP_REQUIRE_SOFTHSM").is_none(),
        "{what} is not installed, and AAP_REQUIRE_SOFTHSM is set (apt-get install softhsm2 opensc)"
    );
    eprintln!("skipped: {what} is not installed (apt-get install softhsm2 opensc)");
    None
}

fn found(program: &str) -> bool {
    Command::new(program).arg("--help").output().is_ok()
}

impl SoftHsm {
    fn new() -> Option<SoftHsm> {
        if !Path::new(MODULE).exists() || !found("softhsm2-util") {
            return missing("SoftHSM2");
        }
        if !found("pkcs11-tool") {
            return missing("OpenSC's pkcs11-tool");
        }
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).unwrap();
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        let hsm = SoftHsm { dir, conf };
        let out = hsm
            .command("softhsm2-util")
            .args([
                "--init-token",
                "--free",
                "--label",
                TOKEN,
                "--pin",
                PIN,
                "--so-pin",
                "5678-so",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(hsm)
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SOFTHSM2_CONF", &self.conf);
        c
    }

    /// What the proxy needs to find the token and log in.
    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("SOFTHSM2_CONF".into(), self.conf.display().to_string()),
            ("HSM_PIN".into(), PIN.into()),
        ]
    }

    /// `apple-api-proxy key import FILE --module MODULE --token-label apple --key-label LABEL --pin-env HSM_PIN`.
    fn import(&self, file: &Path, label: &str, pin: &str) -> Output {
        bin()
            .args(["key", "import"])
            .arg(file)
            .args([
                "--module",
                MODULE,
                "--token-label",
                TOKEN,
                "--key-label",
                label,
            ])
            .args(["--pin-env", "HSM_PIN"])
            .env("SOFTHSM2_CONF", &self.conf)
            .env("HSM_PIN", pin)
            .output()
            .unwrap()
    }

    /// `pkcs11-tool --list-objects` as the token's user.
    fn objects(&self) -> String {
        let out = self
            .command("pkcs11-tool")
            .args([
                "--module",
                MODULE,
                "--token-label",
                TOKEN,
                "--login",
                "--pin",
                PIN,
            ])
            .arg("--list-objects")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The fault file the shim reads (see `examples/pkcs11_fault.rs`).
    fn fault_file(&self) -> PathBuf {
        self.dir.path().join("fault")
    }
}

/// The fault-injecting shim `cargo test` built next to the binary. (`cargo test --test
/// tests` alone does not rebuild examples: after changing the shim, `cargo build --examples`.)
fn shim() -> PathBuf {
    let shim = Path::new(env!("CARGO_BIN_EXE_apple-api-proxy"))
        .parent()
        .unwrap()
        .join("examples/libpkcs11_fault.so");
    assert!(shim.exists(), "{} (built by `cargo test`)", shim.display());
    shim
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The config line `key import` prints for `label` with `module`.
fn pkcs11_line(module: &Path, label: &str, extra: &str) -> String {
    format!(
        "pkcs11 = {{ module = \"{}\", token_label = \"{TOKEN}\", key_label = \"{label}\", pin_env = \"HSM_PIN\"{extra} }}",
        module.display()
    )
}

/// Imports every key of the world into the token and deletes its `.p8`.
fn import_world_keys(hsm: &SoftHsm, dir: &Path) {
    for slot in Slot::ALL {
        let file = dir.join(fixture::key_file(&Identity::TEST, slot));
        let label = file.file_stem().unwrap().to_str().unwrap().to_string();
        let out = hsm.import(&file, &label, PIN);
        assert!(out.status.success(), "{}", text(&out));
        std::fs::remove_file(&file).unwrap();
    }
}

/// The config with every `private_key_file` replaced by the `pkcs11` line for the same key.
fn to_hsm(config: &str, module: &Path, extra: &str) -> String {
    config
        .lines()
        .map(|line| match line.strip_prefix("private_key_file = ") {
            Some(path) => {
                let label = Path::new(path.trim_matches('"'))
                    .file_stem()
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_string();
                pkcs11_line(module, &label, extra)
            }
            None => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

const SHOP_POLICY: &str =
    "[clients.signing]\nproducts = [\"com.example.*\"]\noffers = [\"winback-*\"]\n";

/// The real binary with every key in the HSM behind `module` (and no `.p8` left), plus a
/// client `shop` (secret returned) that may sign promotional offers.
async fn start(hsm: &SoftHsm, module: &Path, extra: &str, setup: Setup) -> (Binary, String) {
    let shop = fixture::generate_secret().unwrap();
    let shop_toml = format!(
        "\n[[clients]]\nname = \"shop\"\nsecret_sha256 = \"{}\"\nallow = [\"POST /proxy/v1/signatures/*\"]\n{SHOP_POLICY}",
        sha_hex(&shop)
    );
    let module = module.to_path_buf();
    let extra = extra.to_string();
    let b = Binary::start_with(
        Setup {
            env: hsm.env().into_iter().chain(setup.env.clone()).collect(),
            ..setup
        },
        move |t| to_hsm(&t, &module, &extra) + &shop_toml,
        |dir| import_world_keys(hsm, dir),
    )
    .await;
    (b, shop)
}

async fn get(b: &Binary, path: &str) -> Reply {
    send(
        b.request("GET", path)
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
}

async fn admin(b: &Binary, path: &str) -> Reply {
    send(
        http::Request::get(format!("http://{}{path}", b.admin))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
}

#[test]
fn key_import_stores_a_sensitive_non_extractable_sign_only_key_and_refuses_what_it_must() {
    let Some(hsm) = SoftHsm::new() else { return };
    let dir = hsm.dir.path();
    let key = fixture::Key::generate().unwrap();
    let p8 = dir.join("AuthKey_2X9R4HXF34.p8");
    write_private(&p8, &key.pem);

    let out = hsm.import(&p8, "AuthKey_2X9R4HXF34", PIN);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&pkcs11_line(Path::new(MODULE), "AuthKey_2X9R4HXF34", "")),
        "prints the config line:\n{stdout}"
    );

    // Read back by OpenSC, not by the proxy: one private and one public object.
    let objects = hsm.objects();
    let private = objects
        .split("Private Key Object")
        .nth(1)
        .expect("a private key object")
        .split("Public Key Object")
        .next()
        .unwrap();
    let line = |block: &str, name: &str| {
        block
            .lines()
            .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_string()))
            .unwrap_or_default()
    };
    assert_eq!(line(private, "label:"), "AuthKey_2X9R4HXF34", "{objects}");
    assert_eq!(line(private, "Usage:"), "sign", "sign-only:\n{objects}");
    let access = line(private, "Access:");
    assert!(access.contains("sensitive"), "{objects}");
    assert!(
        !access
            .replace("never extractable", "")
            .contains("extractable"),
        "not extractable: {access}"
    );
    let public = objects
        .split("Public Key Object")
        .nth(1)
        .expect("a public key object");
    assert_eq!(
        line(public, "EC_POINT:"),
        format!("0441{}", apple_api_proxy::hex(&key.public)),
        "the public key object holds the key's public point"
    );
    // A label already taken: refused, nothing written.
    let again = hsm.import(&p8, "AuthKey_2X9R4HXF34", PIN);
    assert_eq!(again.status.code(), Some(1));
    assert!(text(&again).contains("already taken"), "{}", text(&again));
    assert_eq!(hsm.objects().matches("Key Object").count(), 2);

    // Not P-256, and a wrong PIN: refused with the reason; the PIN is never printed.
    let rsa = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rsa-2048-test-only.pem");
    let refused = hsm.import(&rsa, "rsa", PIN);
    assert_eq!(refused.status.code(), Some(1));
    assert!(text(&refused).contains("RSA"), "{}", text(&refused));
    let p384 = dir.join("p384.p8");
    let der = ring::signature::EcdsaKeyPair::generate_pkcs8(
        &ring::signature::ECDSA_P384_SHA384_FIXED_SIGNING,
        &ring::rand::SystemRandom::new(),
    )
    .unwrap();
    write_private(
        &p384,
        &pem::encode(&pem::Pem::new("PRIVATE KEY", der.as_ref().to_vec())),
    );
    let refused = hsm.import(&p384, "p384", PIN);
    assert_eq!(refused.status.code(), Some(1));
    assert!(text(&refused).contains("P-384"), "{}", text(&refused));
    let wrong = hsm.import(&p8, "AuthKey_OTHER", "not-the-pin");
    assert_eq!(wrong.status.code(), Some(1));
    let said = text(&wrong);
    assert!(said.contains("PIN") && said.contains("wrong"), "{said}");
    assert!(
        !said.contains("not-the-pin") && !said.contains(PIN),
        "{said}"
    );
    assert_eq!(
        hsm.objects().matches("Key Object").count(),
        2,
        "nothing more was written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_key_in_the_hsm_and_no_p8_left_the_proxy_serves_every_api() {
    let Some(hsm) = SoftHsm::new() else { return };
    let (b, shop) = start(&hsm, Path::new(MODULE), "", Setup::default()).await;
    assert!(
        !b.world
            .dir
            .path()
            .join("keys/AuthKey_TEAMKEY001.p8")
            .exists()
            && std::fs::read_dir(b.world.dir.path().join("keys"))
                .unwrap()
                .count()
                == 0,
        "no .p8 is left"
    );
    // Every API of part one; the stand-in verifies each token with the keys' public halves.
    let cases = [
        ("GET", "/v1/apps?limit=5", Role::AppStoreConnect),
        ("GET", "/notary/v2/test", Role::AppStoreConnect),
        (
            "GET",
            "/inApps/v1/transactions/2000000000000001",
            Role::StoreKitProduction,
        ),
        ("GET", "/sandbox/inApps/v2/history/1", Role::StoreKitSandbox),
        (
            "POST",
            "/advancedCommerce/v1/subscription/cancel/7",
            Role::StoreKitProduction,
        ),
        (
            "PUT",
            "/externalPurchase/v1/reports",
            Role::StoreKitProduction,
        ),
    ];
    for (method, path, role) in cases {
        b.world.standin.clear_received();
        let r = send(
            b.request(method, path)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{method} {path}: {:?}", r.body);
        assert_eq!(b.world.standin.received()[0].role, role, "{path}");
    }
    // The individual key, through the client pinned to it.
    let r = send(
        http::Request::get(format!("http://{}/v1/apps", b.addr))
            .header("authorization", format!("Bearer {}", b.world.reader_secret))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    // In-app signatures made by the HSM, checked as StoreKit would: the JWS form, and the
    // legacy form, DER (the HSM's raw r‖s converted).
    let sign = |kind: &str, offer: &str| {
        send(
            http::Request::post(format!("http://{}/proxy/v1/signatures/{kind}", b.addr))
                .header("authorization", format!("Bearer {shop}"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(format!(
                    r#"{{"product_id":"com.example.pro.year","offer_id":"{offer}"}}"#
                ))))
                .unwrap(),
        )
    };
    let iap = SignerOf {
        public_key: &b.world.keys.iap.public,
        key_id: IAP_KID,
        issuer_id: ISSUER,
        bundle_id: BUNDLE,
    };
    let now = apple_api_proxy::token::unix_secs(std::time::SystemTime::now());
    let r = sign("promotional-offer", "winback-1").await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    in_app::verify_jws(r.json()["signature"].as_str().unwrap(), &iap, now)
        .expect("StoreKit accepts the HSM's signature");
    let r = sign("promotional-offer-v1", "winback-2").await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let answer = r.json();
    let offer = in_app::V1Offer {
        product_id: "com.example.pro.year",
        offer_id: "winback-2",
        app_account_token: "",
        nonce: answer["nonce"].as_str().unwrap(),
        timestamp_ms: answer["timestamp"].as_i64().unwrap(),
    };
    in_app::verify_v1(
        answer["signature"].as_str().unwrap(),
        &iap,
        &offer,
        now * 1000,
    )
    .expect("StoreKit accepts the HSM's V1 (DER) signature");
    // The developer key from the token too: a push.
    let r = send(
        b.request("POST", "/apns/3/device/a1b2c3d4")
            .header("apns-topic", "com.example.app")
            .body(Full::new(Bytes::from(r#"{"aps":{}}"#)))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);

    assert_eq!(admin(&b, "/readyz").await.status, StatusCode::OK);
    let metrics = b.metrics().await;
    for key in ["connect", "me", "storekit", "push"] {
        let up = format!(r#"aap_signer_up{{key="{key}",backend="pkcs11"}} 1"#);
        assert!(metrics.contains(&up), "{up} in\n{metrics}");
    }
    // `check` names the backend and what the token says about the key.
    let out = bin()
        .args(["check", "--config"])
        .arg(&b.world.config_path)
        .envs(hsm.env())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for key in ["connect", "me", "storekit"] {
        let row = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{key} ")))
            .unwrap_or_default();
        assert!(
            row.contains("ok") && row.contains("pkcs11 non-extractable"),
            "{row}\n{stdout}"
        );
    }
}

#[test]
fn start_and_check_fail_naming_the_module_token_and_label() {
    let Some(hsm) = SoftHsm::new() else { return };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let world = rt.block_on(World::new(&Setup::default(), "127.0.0.1:0"));
    import_world_keys(&hsm, world.dir.path());
    let config = std::fs::read_to_string(&world.config_path).unwrap();
    let good = to_hsm(&config, Path::new(MODULE), "");
    let run = |args: &[&str], text_: &str, env: Vec<(String, String)>| {
        std::fs::write(&world.config_path, text_).unwrap();
        bin()
            .args(args)
            .arg("--config")
            .arg(&world.config_path)
            .envs(hsm.env().into_iter().chain(env))
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let ok = run(&["check"], &good, vec![]);
    assert!(ok.status.success(), "{}", text(&ok));

    let cases: Vec<(&str, String, Env, Vec<&str>)> = vec![
        (
            "wrong PIN",
            good.clone(),
            vec![("HSM_PIN".into(), "0000-wrong".into())],
            vec![
                MODULE,
                "`apple`",
                "`AuthKey_TEAMKEY001`",
                "PIN",
                "wrong",
                "keys[0].pkcs11",
            ],
        ),
        (
            "missing module",
            good.replace(MODULE, "/opt/nowhere/libpkcs11.so"),
            vec![],
            vec![
                "/opt/nowhere/libpkcs11.so",
                "`apple`",
                "does not exist",
                "keys[0].pkcs11",
            ],
        ),
        (
            "unknown token",
            good.replace("token_label = \"apple\"", "token_label = \"banana\""),
            vec![],
            vec![
                MODULE,
                "`banana`",
                "no token is labelled",
                "tokens found: `apple`",
            ],
        ),
        (
            "unknown key label",
            good.replacen("AuthKey_TEAMKEY001", "AuthKey_GONE", 1),
            vec![],
            vec![
                MODULE,
                "`apple`",
                "`AuthKey_GONE`",
                "no private key is labelled",
            ],
        ),
        (
            "PIN variable unset",
            good.replace(
                "pin_env = \"HSM_PIN\"",
                "pin_env = \"AAP_TEST_SURELY_UNSET_PIN\"",
            ),
            vec![],
            vec!["AAP_TEST_SURELY_UNSET_PIN", "not set"],
        ),
        (
            "a key in two places",
            good.replacen(
                "pkcs11 = {",
                "private_key_file = \"keys/AuthKey_TEAMKEY001.p8\"\npkcs11 = {",
                1,
            ),
            vec![],
            vec!["keys[0].pkcs11", "private_key_file", "one place"],
        ),
    ];
    for (name, config, env, want) in cases {
        for command in ["check", "serve"] {
            let out = run(&[command], &config, env.clone());
            assert_eq!(
                out.status.code(),
                Some(1),
                "{name} ({command}): {}",
                text(&out)
            );
            let said = text(&out);
            for part in &want {
                assert!(
                    said.contains(part),
                    "{name} ({command}): `{part}` missing from\n{said}"
                );
            }
            assert!(
                !said.contains(PIN) && !said.contains("0000-wrong"),
                "{name}: PIN shown: {said}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hsm_failing_at_run_time_is_a_503_that_never_reaches_apple_and_heals_without_a_restart()
{
    let Some(hsm) = SoftHsm::new() else { return };
    let fault = hsm.fault_file();
    let env = vec![
        (
            "AAP_P11_FAULT_FILE".to_string(),
            fault.display().to_string(),
        ),
        ("AAP_P11_FAULT_REAL".to_string(), MODULE.to_string()),
    ];
    let setup = Setup {
        env,
        rust_log: Some("debug"),
        ..Setup::default()
    };
    let (b, _) = start(&hsm, &shim(), "", setup).await;
    assert_eq!(get(&b, "/v1/apps").await.status, StatusCode::OK);

    // The HSM stops answering.
    std::fs::write(&fault, "down").unwrap();
    b.world.standin.clear_received();
    let r = get(&b, "/v1/apps/1").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", r.body);
    assert_eq!(r.error_code(), "PROXY_SIGNER_UNAVAILABLE");
    let body = String::from_utf8_lossy(&r.body);
    assert!(body.contains("connect") && !body.contains(PIN), "{body}");
    assert!(
        b.world.standin.received().is_empty(),
        "nothing reached Apple"
    );
    // A token already cached keeps serving.
    assert_eq!(get(&b, "/v1/apps").await.status, StatusCode::OK);
    let ready = admin(&b, "/readyz").await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    let why = String::from_utf8_lossy(&ready.body);
    assert!(
        why.contains("key `connect`") && why.contains("CKR_DEVICE_ERROR"),
        "{why}"
    );
    let metrics = b.metrics().await;
    for want in [
        r#"aap_signer_up{key="connect",backend="pkcs11"} 0"#,
        r#"aap_signer_failures_total{key="connect"} 1"#,
    ] {
        assert!(metrics.contains(want), "{want} in\n{metrics}");
    }
    let records = binary_audit(&b, 3).await;
    let refused = records
        .iter()
        .find(|r| r["status"] == 503)
        .expect("the refusal is audited");
    assert_eq!(refused["error"], "signer_unavailable", "{refused}");

    // The HSM is back: the probe notices without any request, and signing resumes.
    std::fs::remove_file(&fault).unwrap();
    let healed = eventually(|| async { admin(&b, "/readyz").await.status == StatusCode::OK }).await;
    assert!(healed, "/readyz recovers by itself");
    assert_eq!(get(&b, "/v1/apps/1").await.status, StatusCode::OK);

    // The HSM restarts under the proxy: every session and the login are gone. One retry on a
    // new, logged-in session, and the client never notices.
    std::fs::write(&fault, "drop-sessions").unwrap();
    let r = get(&b, "/v1/apps/2").await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert!(!fault.exists(), "the fault fired");
    assert_eq!(get(&b, "/v1/apps/3").await.status, StatusCode::OK);
    assert_eq!(admin(&b, "/readyz").await.status, StatusCode::OK);

    // The operational log (at debug) tells the story, and never the PIN.
    let log = std::fs::read_to_string(b.world.dir.path().join("stderr.log")).unwrap();
    assert!(
        log.contains("HSM key unavailable") && log.contains("signing resumed"),
        "{log}"
    );
    assert!(!log.contains(PIN), "the PIN is in the log");
    let audit = std::fs::read_to_string(b.world.dir.path().join("audit.jsonl")).unwrap();
    assert!(!audit.contains(PIN), "the PIN is in the audit log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_finds_and_self_tests_hsm_keys_and_a_bad_label_keeps_the_old_keys_serving() {
    let Some(hsm) = SoftHsm::new() else { return };
    let (b, _) = start(&hsm, Path::new(MODULE), "", Setup::default()).await;
    assert_eq!(get(&b, "/v1/apps/1").await.status, StatusCode::OK);
    let good = std::fs::read_to_string(&b.world.config_path).unwrap();
    let reloads = |metrics: &str, result: &str| {
        metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!("aap_config_reloads_total{{result=\"{result}\"}} "))
            })
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    std::fs::write(
        &b.world.config_path,
        good.replacen("AuthKey_TEAMKEY001", "AuthKey_GONE", 1),
    )
    .unwrap();
    let rejected = eventually(|| async { reloads(&b.metrics().await, "rejected") >= 1 }).await;
    assert!(rejected, "the reload naming a missing key is rejected");
    assert_eq!(
        get(&b, "/v1/apps/2").await.status,
        StatusCode::OK,
        "the old keys keep serving"
    );
    std::fs::write(
        &b.world.config_path,
        good.replace("[audit]", "# reloaded\n[audit]"),
    )
    .unwrap();
    let applied = eventually(|| async { reloads(&b.metrics().await, "applied") >= 1 }).await;
    assert!(applied, "a good reload is applied");
    assert_eq!(get(&b, "/v1/apps/3").await.status, StatusCode::OK);
    assert_eq!(admin(&b, "/readyz").await.status, StatusCode::OK);
}

/// The shim's counters (`examples/pkcs11_fault.rs`): sessions open, the most at once, logins.
fn counts(file: &Path) -> (usize, usize, usize) {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let get = |name: &str| {
        text.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (get("open"), get("peak"), get("logins"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_fresh_scope_requests_over_eight_connections_share_two_sessions() {
    let Some(hsm) = SoftHsm::new() else { return };
    let count_file = hsm.dir.path().join("counts");
    let setup = Setup {
        env: vec![
            (
                "AAP_P11_COUNT_FILE".into(),
                count_file.display().to_string(),
            ),
            ("AAP_P11_FAULT_REAL".into(), MODULE.into()),
        ],
        ..Setup::default()
    };
    let (b, _) = start(&hsm, &shim(), ", sessions = 2", setup).await;
    b.world.standin.clear_received();
    let clients: Vec<_> = (0..8).map(|_| http2_client()).collect();
    let mut tasks = Vec::new();
    for i in 0..100 {
        let client = clients[i % 8].clone();
        let req = b
            .request("GET", &format!("/v1/apps/{i}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        tasks.push(tokio::spawn(async move { send_with(client, req).await }));
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    }
    let received = b.world.standin.received();
    assert_eq!(received.len(), 100);
    let tokens: std::collections::HashSet<_> = received
        .iter()
        .map(|r| r.headers["authorization"].as_bytes().to_vec())
        .collect();
    assert_eq!(tokens.len(), 100, "one signature per scope");
    // Every key of the world, each opened with one session at start; only `connect` signed
    // here, on at most its two.
    let others = Slot::ALL.len() - 1;
    let (_, peak, _) = counts(&count_file);
    assert!(
        (others + 1..=others + 2).contains(&peak),
        "at most 2 sessions for the signing key (+1 each for the other {others}): peak {peak}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_the_token_refuses_at_run_time_is_not_retried_until_a_reload() {
    let Some(hsm) = SoftHsm::new() else { return };
    let (fault, count_file) = (hsm.fault_file(), hsm.dir.path().join("counts"));
    let setup = Setup {
        env: vec![
            ("AAP_P11_FAULT_FILE".into(), fault.display().to_string()),
            (
                "AAP_P11_COUNT_FILE".into(),
                count_file.display().to_string(),
            ),
            ("AAP_P11_FAULT_REAL".into(), MODULE.into()),
        ],
        ..Setup::default()
    };
    let (b, _) = start(&hsm, &shim(), "", setup).await;
    assert_eq!(get(&b, "/v1/apps/1").await.status, StatusCode::OK);
    // The HSM restarts under the proxy (sessions and login gone) and refuses its PIN now
    // (the shim's `pin-refused`: SoftHSM2 keeps the PIN it loaded).
    std::fs::write(&fault, "pin-refused").unwrap();
    let r = get(&b, "/v1/apps/2").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", r.body);
    let ready = admin(&b, "/readyz").await;
    let why = String::from_utf8_lossy(&ready.body);
    assert!(
        ready.status == StatusCode::SERVICE_UNAVAILABLE && why.contains("PIN"),
        "{why}"
    );
    // No further login is tried (the token's retry counter would lock it): not by
    // requests, not by the probe.
    let (_, _, logins) = counts(&count_file);
    assert_eq!(
        get(&b, "/v1/apps/3").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        counts(&count_file).2,
        logins,
        "no login after the PIN was refused"
    );
    assert!(!why.contains(PIN), "{why}");
    // The PIN is fixed and the config reloaded: service resumes.
    std::fs::remove_file(&fault).unwrap();
    let path = b.world.config_path.clone();
    let text_ = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text_.replace("[audit]", "# PIN fixed\n[audit]")).unwrap();
    let back = eventually(|| async { get(&b, "/v1/apps/4").await.status == StatusCode::OK }).await;
    assert!(back, "a reload with the right PIN serves again");
}
