//! Test harness: the stand-in's fixture (throw-away keys, the Apple stand-in, a config in a
//! temp dir), and the real proxy on port 0 (in process) or the real binary, with plain-HTTP
//! clients speaking HTTP/1.1 or HTTP/2.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use apple_api_proxy::config::Config;
use apple_standin::fixture::{self, Identity};
use apple_standin::Standin;
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::oneshot;

pub use apple_standin::fixture::{Key as TestKey, Keys};

pub const ISSUER: &str = Identity::TEST.issuer_id;
pub const BUNDLE: &str = Identity::TEST.bundle_id;
pub const TEAM_KID: &str = Identity::TEST.team.key_id;
pub const INDIVIDUAL_KID: &str = Identity::TEST.individual.key_id;
pub const IAP_KID: &str = Identity::TEST.iap.key_id;

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
    /// The real binary's `RUST_LOG`, with its operational log written to `stderr.log` in
    /// the world's directory (default: `warn`, piped).
    pub rust_log: Option<&'static str>,
    /// Extra environment for the real binary (e.g. `SOFTHSM2_CONF` and an HSM PIN).
    pub env: Vec<(String, String)>,
}

/// The stand-in plus a config for the proxy in front of it, written to a temp dir by the
/// stand-in's fixture (keys in `keys/`, the CA in `standin-ca.pem`, `proxy.toml`).
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
        let world = fixture::World::start(&fixture::Options {
            listen: listen.to_string(),
            server_toml: format!("request_timeout = \"20s\"\n{}", setup.server_toml),
            audit_toml: "path = \"audit.jsonl\"\nfsync = \"off\"".to_string(),
            upstream_toml: "connect_timeout = \"2s\"".to_string(),
            key_lifetime: setup.key_lifetime.map(str::to_string),
            clock_offset_secs: setup.standin_clock_offset,
            connect_base_url: setup.connect_base_url.clone(),
            // The default clients: `tester` and `reader`.
            ..fixture::Options::default()
        })
        .await
        .expect("the stand-in's fixture starts");
        let secret = world.secret("tester").expect("client tester").to_string();
        let reader_secret = world.secret("reader").expect("client reader").to_string();
        let fixture::World {
            standin,
            dir,
            keys,
            config_path,
            ..
        } = world;
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

/// Writes `text` with mode 0600, as key files are kept.
pub fn write_private(path: &Path, text: &str) {
    fixture::write_private(path, text).unwrap();
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

    /// Starts the proxy on the default world's config as `edit` changes its text.
    pub async fn edited(edit: impl FnOnce(String) -> String) -> Harness {
        let world = World::new(&Setup::default(), "127.0.0.1:0").await;
        let text = std::fs::read_to_string(&world.config_path).unwrap();
        std::fs::write(&world.config_path, edit(text)).unwrap();
        Harness::from_world(world).await
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

/// Two different ports that were free a moment ago: both are held while the second is
/// chosen, so the kernel cannot hand out the same one twice.
pub fn free_port_pair() -> (u16, u16) {
    let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

/// Whether `check` comes true within 10 s (polled every 100 ms).
pub async fn eventually<F, Fut>(mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..100 {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
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
    serve_command(config, "warn", None).spawn().unwrap()
}

/// Starts the real binary with `serve --config` at log level `level`, its operational log
/// (stderr) written to `log`.
pub fn spawn_serve_logging(config: &Path, level: &str, log: &Path) -> Child {
    serve_command(config, level, Some(log)).spawn().unwrap()
}

/// `serve --config` at log level `level`; stderr to `log`, or piped.
pub fn serve_command(config: &Path, level: &str, log: Option<&Path>) -> Command {
    let mut command = bin();
    command
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", level)
        .stdout(Stdio::null())
        .stderr(match log {
            Some(log) => Stdio::from(std::fs::File::create(log).unwrap()),
            None => Stdio::piped(),
        });
    command
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

/// The TLS side of a test upstream: a leaf from `ca` for localhost and 127.0.0.1 named
/// `name`, offering the ALPN protocols `alpn`.
pub fn tls_acceptor(ca: &TestCa, name: &str, alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
    use rustls_pki_types::pem::PemObject as _;
    let (cert, key) = ca.issue(&["localhost", "127.0.0.1"], name, false);
    let mut tls = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![rustls_pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
        rustls_pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
    )
    .unwrap();
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls))
}

/// An HTTPS client trusting `server_ca`, optionally presenting a client certificate.
pub fn tls_client(
    server_ca: &TestCa,
    client_cert: Option<&(String, String)>,
) -> Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
> {
    tls_client_for(server_ca, client_cert, true)
}

/// [`tls_client`] that offers HTTP/2 only when `http2`, else speaks HTTP/1.1.
pub fn tls_client_for(
    server_ca: &TestCa,
    client_cert: Option<&(String, String)>,
    http2: bool,
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
        .enable_http1();
    let https = if http2 {
        https.enable_http2().build()
    } else {
        https.build()
    };
    Client::builder(TokioExecutor::new()).build(https)
}
