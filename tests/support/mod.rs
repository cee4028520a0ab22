//! Test harness: throw-away keys, the Apple stand-in, and the real proxy on port 0 (in
//! process) or the real binary, with plain-HTTP clients speaking HTTP/1.1 or HTTP/2.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use apple_api_proxy::config::Config;
use apple_standin::{KnownKey, KnownKeyKind, Options, Role, Standin};
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING};
use tokio::sync::oneshot;

pub const ISSUER: &str = "57246542-96fe-1a63-e053-0824d011072a";
pub const BUNDLE: &str = "com.example.app";
pub const TEAM_KID: &str = "TEAMKEY001";
pub const INDIVIDUAL_KID: &str = "INDIVKEY01";
pub const IAP_KID: &str = "IAPKEY0001";

/// A freshly generated P-256 key: PKCS#8 PEM and the uncompressed public point.
pub struct TestKey {
    pub pem: String,
    pub public: Vec<u8>,
}

impl TestKey {
    pub fn generate() -> TestKey {
        let rng = SystemRandom::new();
        let der = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der.as_ref(), &rng).unwrap();
        TestKey {
            pem: pem::encode(&pem::Pem::new("PRIVATE KEY", der.as_ref().to_vec())),
            public: pair.public_key().as_ref().to_vec(),
        }
    }
}

/// Knobs for one harness.
#[derive(Default)]
pub struct Setup {
    /// Seconds added to the stand-in's clock (negative: "Apple" is behind this host).
    pub standin_clock_offset: i64,
    /// token_lifetime for every key (default: the proxy's default).
    pub key_lifetime: Option<&'static str>,
    /// Replaces the App Store Connect base URL (e.g. a closed port).
    pub connect_base_url: Option<String>,
    /// Extra TOML appended to [server].
    pub server_toml: String,
}

pub struct Keys {
    pub team: TestKey,
    pub individual: TestKey,
    pub iap: TestKey,
}

/// The stand-in plus a config for the proxy in front of it, written to a temp dir.
pub struct World {
    pub standin: Standin,
    pub dir: tempfile::TempDir,
    pub keys: Keys,
    /// Secret of client `tester` (allowed everything, default keys).
    pub secret: String,
    /// Secret of client `reader` (GET /v1/* only, pinned to the individual key).
    pub reader_secret: String,
    pub config_path: PathBuf,
}

impl World {
    pub async fn new(setup: &Setup, listen: &str) -> World {
        let keys = Keys {
            team: TestKey::generate(),
            individual: TestKey::generate(),
            iap: TestKey::generate(),
        };
        let standin = Standin::start(Options {
            keys: vec![
                KnownKey {
                    key_id: TEAM_KID.into(),
                    public_key: keys.team.public.clone(),
                    kind: KnownKeyKind::Team {
                        issuer_id: ISSUER.into(),
                    },
                },
                KnownKey {
                    key_id: INDIVIDUAL_KID.into(),
                    public_key: keys.individual.public.clone(),
                    kind: KnownKeyKind::Individual,
                },
                KnownKey {
                    key_id: IAP_KID.into(),
                    public_key: keys.iap.public.clone(),
                    kind: KnownKeyKind::InAppPurchase {
                        issuer_id: ISSUER.into(),
                        bundle_ids: vec![BUNDLE.into()],
                    },
                },
            ],
            clock_offset_secs: setup.standin_clock_offset,
            ..Options::default()
        })
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("keys")).unwrap();
        for (file, key) in [
            (format!("AuthKey_{TEAM_KID}.p8"), &keys.team),
            (format!("AuthKey_{INDIVIDUAL_KID}.p8"), &keys.individual),
            (format!("SubscriptionKey_{IAP_KID}.p8"), &keys.iap),
        ] {
            write_private(&dir.path().join("keys").join(file), &key.pem);
        }
        std::fs::write(dir.path().join("standin-ca.pem"), standin.ca_pem()).unwrap();
        let secret = apple_api_proxy::client::generate_secret().unwrap();
        let reader_secret = apple_api_proxy::client::generate_secret().unwrap();
        let lifetime = setup
            .key_lifetime
            .map(|l| format!("token_lifetime = \"{l}\"\n"))
            .unwrap_or_default();
        let connect = setup
            .connect_base_url
            .clone()
            .unwrap_or_else(|| standin.url(Role::AppStoreConnect));
        let text = format!(
            r#"
[server]
listen = "{listen}"
admin_listen = "off"
request_timeout = "20s"
{server_toml}

[audit]
path = "audit.jsonl"
fsync = "off"

[upstream]
ca_file = "standin-ca.pem"
connect_timeout = "2s"

[apis.app-store-connect]
base_url = "{connect}"
[apis.notary]
base_url = "{connect}"
[apis.app-store-server]
base_url = "{prod}"
sandbox_base_url = "{sandbox}"
[apis.advanced-commerce]
base_url = "{prod}"
sandbox_base_url = "{sandbox}"
[apis.external-purchase]
base_url = "{prod}"
sandbox_base_url = "{sandbox}"

[[keys]]
name = "connect"
kind = "team"
key_id = "{TEAM_KID}"
issuer_id = "{ISSUER}"
private_key_file = "keys/AuthKey_{TEAM_KID}.p8"
apis = ["app-store-connect", "notary"]
{lifetime}
[[keys]]
name = "me"
kind = "individual"
key_id = "{INDIVIDUAL_KID}"
private_key_file = "keys/AuthKey_{INDIVIDUAL_KID}.p8"
apis = ["app-store-connect"]
{lifetime}
[[keys]]
name = "storekit"
kind = "in-app-purchase"
key_id = "{IAP_KID}"
issuer_id = "{ISSUER}"
bundle_id = "{BUNDLE}"
private_key_file = "keys/SubscriptionKey_{IAP_KID}.p8"
apis = ["app-store-server", "advanced-commerce", "external-purchase"]
{lifetime}
[[clients]]
name = "tester"
secret_sha256 = "{h1}"
allow = ["* /*"]

[[clients]]
name = "reader"
secret_sha256 = "{h2}"
allow = ["GET /v1/*"]
key = "me"
"#,
            server_toml = setup.server_toml,
            prod = standin.url(Role::StoreKitProduction),
            sandbox = standin.url(Role::StoreKitSandbox),
            h1 = sha_hex(&secret),
            h2 = sha_hex(&reader_secret),
        );
        let config_path = dir.path().join("proxy.toml");
        std::fs::write(&config_path, text).unwrap();
        World {
            standin,
            dir,
            keys,
            secret,
            reader_secret,
            config_path,
        }
    }

    pub fn config(&self) -> Config {
        Config::load(&self.config_path).unwrap()
    }
}

pub fn sha_hex(s: &str) -> String {
    apple_api_proxy::hex(&apple_api_proxy::sha256(s.as_bytes()))
}

pub fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
}

/// The real proxy, in process, on 127.0.0.1:0.
pub struct Harness {
    pub world: World,
    pub addr: SocketAddr,
    /// The admin listener (`/healthz`, `/readyz`, `/metrics`).
    pub admin_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Harness {
    pub async fn start() -> Harness {
        Harness::with(Setup::default()).await
    }

    pub async fn with(setup: Setup) -> Harness {
        Harness::from_world(World::new(&setup, "127.0.0.1:0").await).await
    }

    /// Starts the proxy for a world whose config file the test may have edited.
    pub async fn from_world(world: World) -> Harness {
        let config = world.config();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let admin = Some(admin);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let listeners = apple_api_proxy::server::Listeners {
                proxy: listener,
                admin,
            };
            apple_api_proxy::run(config, listeners, async {
                let _ = stopped.await;
            })
            .await
            .expect("proxy starts");
        });
        Harness {
            world,
            addr,
            admin_addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn standin(&self) -> &Standin {
        &self.world.standin
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.addr, path_and_query)
    }

    /// A request from client `tester`.
    pub fn request(&self, method: &str, path_and_query: &str) -> http::request::Builder {
        Request::builder()
            .method(method)
            .uri(self.url(path_and_query))
            .header("authorization", format!("Bearer {}", self.world.secret))
    }

    pub async fn get(&self, path_and_query: &str) -> Reply {
        send(
            self.request("GET", path_and_query)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// A response, body collected.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn error_code(&self) -> String {
        self.json()["errors"][0]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

pub async fn send(req: Request<Full<Bytes>>) -> Reply {
    send_with(http1_client(), req).await
}

pub async fn send_with(
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Reply {
    let response = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .expect("response in time")
        .expect("request succeeds");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub fn http1_client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn http2_client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// Decodes a compact JWT's header and claims (no verification).
pub fn decode_jwt(jwt: &str) -> (serde_json::Value, serde_json::Value) {
    use base64::Engine as _;
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3, "three segments");
    let d = |s: &str| {
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(s)
                .unwrap(),
        )
        .unwrap()
    };
    (d(parts[0]), d(parts[1]))
}

/// Verifies an ES256 JWT with RustCrypto's p256 — not ring, which signed it.
pub fn verify_with_p256(jwt: &str, public: &[u8]) -> bool {
    use base64::Engine as _;
    use p256::ecdsa::signature::Verifier as _;
    let Some((signed, sig)) = jwt.rsplit_once('.') else {
        return false;
    };
    let Ok(sig) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(sig) else {
        return false;
    };
    let (Ok(key), Ok(sig)) = (
        p256::ecdsa::VerifyingKey::from_sec1_bytes(public),
        p256::ecdsa::Signature::from_slice(&sig),
    ) else {
        return false;
    };
    key.verify(signed.as_bytes(), &sig).is_ok()
}

/// The real binary.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_apple-api-proxy"))
}

/// A port that was free a moment ago (for the real binary, which binds its own).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something accepts on `addr`.
pub async fn wait_listening(addr: SocketAddr, child: &mut Child) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the proxy exited early: {status}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("nothing listens on {addr}");
}

/// Starts the real binary with `serve --config`.
pub fn spawn_serve(config: &Path) -> Child {
    bin()
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// `VmRSS` and `VmHWM` of a process, in KiB.
pub fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A throw-away CA that issues certificates for the TLS tests.
pub struct TestCa {
    pub cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        TestCa { cert, key }
    }

    /// A leaf for `names` (DNS names or IPs): (certificate PEM, key PEM).
    pub fn issue(&self, names: &[&str], common_name: &str, client: bool) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// An HTTPS client trusting `server_ca`, optionally presenting a client certificate.
pub fn tls_client(
    server_ca: &TestCa,
    client_cert: Option<&(String, String)>,
) -> Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
> {
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(server_ca.cert.der().clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![rustls_pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                rustls_pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_http1()
        .enable_http2()
        .build();
    Client::builder(TokioExecutor::new()).build(https)
}
