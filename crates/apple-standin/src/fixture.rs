//! The fixture: throw-away keys → a running stand-in → a `proxy.toml` for the proxy in
//! front of it. The one place that does this, for the `demo` command, the integration tests,
//! the soak and the benchmarks.
//!
//! Owns: the identities the throw-away keys belong to ([`Identity::TEST`],
//! [`Identity::DEMO`]), P-256 key generation (RustCrypto `p256`, so nothing is shared with
//! the proxy's `ring` minter), the files it writes into a scratch directory (`keys/*.p8`
//! PKCS#8 PEM with mode 0600, the stand-in's CA, `proxy.toml`), the client secrets, and the
//! config text.
//!
//! The config is written as text, not built with the product's types: `proxy.toml` is the
//! product's documented contract (the commented reference `proxy.toml` at the repository
//! root), and this crate must not depend on the product. Imports only the stand-in
//! (`super`).

use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use p256::elliptic_curve::rand_core::{OsRng, RngCore as _};
use p256::elliptic_curve::sec1::ToEncodedPoint as _;
use p256::pkcs8::{EncodePrivateKey as _, LineEnding};
use sha2::Digest as _;

use super::{KnownKey, KnownKeyKind, Role, Standin};

/// The stand-in's CA certificate, in the scratch directory (`[upstream] ca_file`).
pub const CA_FILE: &str = "standin-ca.pem";
/// The proxy's configuration, in the scratch directory.
pub const CONFIG_FILE: &str = "proxy.toml";
/// The directory, under the scratch directory, holding the `.p8` key files.
pub const KEYS_DIR: &str = "keys";
/// The proxy's client-secret prefix (`apple_api_proxy::client::SECRET_PREFIX`).
pub const SECRET_PREFIX: &str = "aap_";

/// One key's name in `proxy.toml` and its Apple key id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyName {
    /// `[[keys]] name`, what clients pin and the audit log shows.
    pub name: &'static str,
    /// Apple's key id: the JWT's `kid`, and the `<ID>` in `AuthKey_<ID>.p8`.
    pub key_id: &'static str,
}

/// Who the three throw-away keys belong to: Apple's identifiers (issuer, bundle, key ids)
/// and the names the proxy's config gives the keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// The team's issuer id (team and in-app-purchase keys).
    pub issuer_id: &'static str,
    /// The app's bundle id (the in-app-purchase key's `bid`).
    pub bundle_id: &'static str,
    /// App Store Connect team key (`AuthKey_<ID>.p8`).
    pub team: KeyName,
    /// App Store Connect individual key (`AuthKey_<ID>.p8`).
    pub individual: KeyName,
    /// In-App Purchase key (`SubscriptionKey_<ID>.p8`).
    pub iap: KeyName,
    /// Apple Developer account key (`AuthKey_<ID>.p8` from Certificates, Identifiers &
    /// Profiles): APNs, DeviceCheck, App Attest, WeatherKit, Apple Music.
    pub developer: KeyName,
    /// The developer team's id (the developer tokens' `iss`).
    pub team_id: &'static str,
    /// The WeatherKit service id (its token's `sub`).
    pub service_id: &'static str,
    /// Apple Business Manager API key (`kind = "business-manager"`, a UUID key id).
    pub business: KeyName,
    /// Its client id (`BUSINESSAPI.…`).
    pub business_client_id: &'static str,
    /// Apple School Manager API key.
    pub school: KeyName,
    /// Its client id (`SCHOOLAPI.…`).
    pub school_client_id: &'static str,
    /// The Sign in with Apple client id (a Services ID) the developer key signs for.
    pub sign_in_client_id: &'static str,
}

impl Identity {
    /// The tests', the soak's and the benchmarks' identity.
    pub const TEST: Identity = Identity {
        issuer_id: "57246542-96fe-1a63-e053-0824d011072a",
        bundle_id: "com.example.app",
        team: KeyName {
            name: "connect",
            key_id: "TEAMKEY001",
        },
        individual: KeyName {
            name: "me",
            key_id: "INDIVKEY01",
        },
        iap: KeyName {
            name: "storekit",
            key_id: "IAPKEY0001",
        },
        developer: KeyName {
            name: "push",
            key_id: "DEVKEY0001",
        },
        team_id: "DEF123GHIJ",
        service_id: "com.example.weatherkit-client",
        business: KeyName {
            name: "inventory",
            key_id: "d136aa66-0c3b-4bd4-9892-c20e8db024ab",
        },
        business_client_id: "BUSINESSAPI.9703f56c-10ce-4876-8f59-e78e5e23a152",
        school: KeyName {
            name: "school",
            key_id: "5f0c7a41-2b7e-4d8e-9a6b-1f3e2d4c5b6a",
        },
        school_client_id: "SCHOOLAPI.2c8e4f1a-7b3d-4e9f-a1c2-d3e4f5a6b7c8",
        sign_in_client_id: "com.example.web",
    };

    /// The `demo` command's identity: what its users see in responses and audit records.
    pub const DEMO: Identity = Identity {
        issuer_id: "69a6de7e-0000-47e3-e053-5b8c7c11a4d1",
        bundle_id: "com.example.demo",
        team: KeyName {
            name: "connect",
            key_id: "DEMOTEAM01",
        },
        individual: KeyName {
            name: "analyst",
            key_id: "DEMOUSER01",
        },
        iap: KeyName {
            name: "storekit",
            key_id: "DEMOIAP001",
        },
        developer: KeyName {
            name: "push",
            key_id: "DEMODEV001",
        },
        team_id: "DEMOTEAM99",
        service_id: "com.example.demo.weatherkit",
        business: KeyName {
            name: "devices",
            key_id: "0b8c6f4e-3a2d-4c1b-9e8f-7a6b5c4d3e2f",
        },
        business_client_id: "BUSINESSAPI.4e5f6a7b-8c9d-4e0f-a1b2-c3d4e5f6a7b8",
        school: KeyName {
            name: "classroom",
            key_id: "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d",
        },
        school_client_id: "SCHOOLAPI.1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d",
        sign_in_client_id: "com.example.demo.web",
    };

    /// The name and key id of the key in `slot`.
    pub fn key(&self, slot: Slot) -> KeyName {
        match slot {
            Slot::Team => self.team,
            Slot::Individual => self.individual,
            Slot::Iap => self.iap,
            Slot::Developer => self.developer,
            Slot::Business => self.business,
            Slot::School => self.school,
        }
    }
}

/// One of the fixture's three keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Team,
    Individual,
    Iap,
    Developer,
    /// Apple Business Manager (`kind = "business-manager"`).
    Business,
    /// Apple School Manager (`kind = "business-manager"`).
    School,
}

impl Slot {
    pub const ALL: [Slot; 6] = [
        Slot::Team,
        Slot::Individual,
        Slot::Iap,
        Slot::Developer,
        Slot::Business,
        Slot::School,
    ];
}

/// Why the fixture could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the system random number generator failed")]
    Random(#[source] p256::elliptic_curve::rand_core::Error),
    #[error("the system random number generator gave no valid P-256 private key")]
    Scalar,
    #[error("encoding a throw-away key as PKCS#8")]
    Encode(#[source] p256::pkcs8::Error),
    #[error("cannot create a scratch directory")]
    Dir(#[source] std::io::Error),
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the Apple stand-in")]
    Standin(#[source] std::io::Error),
}

/// A freshly generated P-256 key: PKCS#8 PEM (what Apple's `.p8` files hold) and the
/// uncompressed public point the stand-in verifies with.
#[derive(Clone)]
pub struct Key {
    /// `-----BEGIN PRIVATE KEY-----` PEM.
    pub pem: String,
    /// Uncompressed SEC1 point, 65 bytes `0x04 || X || Y`.
    pub public: Vec<u8>,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("pem", &"<redacted>")
            .field("public", &hex(&self.public))
            .finish()
    }
}

impl Key {
    /// A new random key, from the operating system's generator.
    pub fn generate() -> Result<Key, Error> {
        let secret = random_secret_key()?;
        let pem = secret.to_pkcs8_pem(LineEnding::LF).map_err(Error::Encode)?;
        let public = secret.public_key().to_encoded_point(false);
        Ok(Key {
            pem: pem.to_string(),
            public: public.as_bytes().to_vec(),
        })
    }
}

/// A uniformly random private scalar. 32 random bytes are one outside `[1, n)` with
/// probability about 2^-32, so a second draw is already rare.
fn random_secret_key() -> Result<p256::SecretKey, Error> {
    for _ in 0..8 {
        let mut bytes = [0u8; 32];
        OsRng.try_fill_bytes(&mut bytes).map_err(Error::Random)?;
        if let Ok(key) = p256::SecretKey::from_slice(&bytes) {
            return Ok(key);
        }
    }
    Err(Error::Scalar)
}

/// The fixture's three keys, one per [`Slot`].
#[derive(Debug, Clone)]
pub struct Keys {
    pub team: Key,
    pub individual: Key,
    pub iap: Key,
    pub developer: Key,
    pub business: Key,
    pub school: Key,
}

impl Keys {
    pub fn generate() -> Result<Keys, Error> {
        Ok(Keys {
            team: Key::generate()?,
            individual: Key::generate()?,
            iap: Key::generate()?,
            developer: Key::generate()?,
            business: Key::generate()?,
            school: Key::generate()?,
        })
    }

    pub fn get(&self, slot: Slot) -> &Key {
        match slot {
            Slot::Team => &self.team,
            Slot::Individual => &self.individual,
            Slot::Iap => &self.iap,
            Slot::Developer => &self.developer,
            Slot::Business => &self.business,
            Slot::School => &self.school,
        }
    }
}

/// A `[[clients]]` entry; the fixture gives each one a fresh secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    pub name: String,
    /// `allow` rules, e.g. `"GET /v1/*"`.
    pub allow: Vec<String>,
    /// `key`: pin the client to one key instead of each API's default.
    pub key: Option<Slot>,
    /// More of the client's table, after its keys: e.g. `bundle_id = "…"`, or a
    /// `[clients.signing]` sub-table.
    pub toml: String,
}

impl Client {
    pub fn new(name: &str, allow: &[&str]) -> Client {
        Client {
            name: name.to_string(),
            allow: allow.iter().map(|rule| rule.to_string()).collect(),
            key: None,
            toml: String::new(),
        }
    }

    /// The same client with `toml` added to its table.
    pub fn with_toml(self, toml: &str) -> Client {
        Client {
            toml: toml.to_string(),
            ..self
        }
    }

    /// The same client, pinned to the key in `slot`.
    pub fn pinned(self, slot: Slot) -> Client {
        Client {
            key: Some(slot),
            ..self
        }
    }
}

/// How to set up a fixture. Every `*_toml` field is lines of TOML added to the named table
/// as they are (empty: nothing added).
#[derive(Debug, Clone)]
pub struct Options {
    /// Whose keys these are (default [`Identity::TEST`]).
    pub identity: Identity,
    /// `[server] listen` (default `127.0.0.1:0`). `admin_listen` is always `"off"`.
    pub listen: String,
    /// More of `[server]`, e.g. `request_timeout = "20s"`.
    pub server_toml: String,
    /// The whole `[audit]` table (default `path = "audit.jsonl"`, in the scratch
    /// directory; `path = "-"` for stdout).
    pub audit_toml: String,
    /// More of `[upstream]`, after `ca_file`, e.g. `connect_timeout = "2s"`.
    pub upstream_toml: String,
    /// More of `[apis.app-store-server]`, e.g. `sandbox_fallback = true`.
    pub app_store_server_toml: String,
    /// `token_lifetime` of every key, e.g. `"20m"`; `None` keeps the proxy's default.
    pub key_lifetime: Option<String>,
    /// Seconds added to the stand-in's clock (negative: "Apple" is behind this host).
    pub clock_offset_secs: i64,
    /// Replaces the App Store Connect (and Notary) base URL, e.g. with a closed port.
    pub connect_base_url: Option<String>,
    /// The `[[clients]]`, in order (default `tester`, allowed everything, and `reader`,
    /// `GET /v1/*` only, pinned to the individual key).
    pub clients: Vec<Client>,
    /// Appended after the clients: more `[[clients]]`, a marker to edit, ….
    pub extra_toml: String,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            identity: Identity::TEST,
            listen: "127.0.0.1:0".to_string(),
            server_toml: String::new(),
            audit_toml: "path = \"audit.jsonl\"".to_string(),
            upstream_toml: String::new(),
            app_store_server_toml: String::new(),
            key_lifetime: None,
            clock_offset_secs: 0,
            connect_base_url: None,
            clients: vec![
                Client::new("tester", &["* /*"]),
                Client::new("reader", &["GET /v1/*"]).pinned(Slot::Individual),
            ],
            extra_toml: String::new(),
        }
    }
}

/// A client's name and the secret the fixture made for it.
#[derive(Clone)]
pub struct Issued {
    pub name: String,
    /// `aap_…`: send as `Authorization: Bearer <secret>`.
    pub secret: String,
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("name", &self.name)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// A running stand-in that trusts the three keys, and a scratch directory holding them,
/// its CA and a `proxy.toml` for the proxy in front of it. Dropping it removes the
/// directory (and stops the stand-in; [`Standin::shutdown`] also waits for it).
#[derive(Debug)]
pub struct World {
    pub standin: Standin,
    /// The scratch directory: `keys/`, [`CA_FILE`], [`CONFIG_FILE`], and whatever the proxy
    /// writes (the audit log).
    pub dir: tempfile::TempDir,
    pub keys: Keys,
    pub identity: Identity,
    /// One per [`Options::clients`], in order.
    pub clients: Vec<Issued>,
    /// `dir/proxy.toml`.
    pub config_path: PathBuf,
}

impl World {
    /// Generates the keys, starts the stand-in trusting them, and writes the keys, the CA
    /// and the config into a new scratch directory.
    pub async fn start(options: &Options) -> Result<World, Error> {
        let identity = options.identity;
        let keys = Keys::generate()?;
        let standin = Standin::start(super::Options {
            keys: known_keys(&identity, &keys),
            clock_offset_secs: options.clock_offset_secs,
            sign_in_clients: vec![(
                identity.sign_in_client_id.to_string(),
                identity.developer.key_id.to_string(),
            )],
            ..super::Options::default()
        })
        .await
        .map_err(Error::Standin)?;
        let clients = options
            .clients
            .iter()
            .map(|c| {
                Ok(Issued {
                    name: c.name.clone(),
                    secret: generate_secret()?,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;

        let dir = tempfile::tempdir().map_err(Error::Dir)?;
        let keys_dir = dir.path().join(KEYS_DIR);
        std::fs::create_dir(&keys_dir).map_err(|source| Error::Write {
            path: keys_dir.clone(),
            source,
        })?;
        for slot in Slot::ALL {
            let path = dir.path().join(key_file(&identity, slot));
            write_private(&path, &keys.get(slot).pem)
                .map_err(|source| Error::Write { path, source })?;
        }
        let ca_path = dir.path().join(CA_FILE);
        std::fs::write(&ca_path, standin.ca_pem()).map_err(|source| Error::Write {
            path: ca_path,
            source,
        })?;
        let urls = Urls {
            connect: options
                .connect_base_url
                .clone()
                .unwrap_or_else(|| standin.url(Role::AppStoreConnect)),
            production: standin.url(Role::StoreKitProduction),
            sandbox: standin.url(Role::StoreKitSandbox),
            developer: developer_tables(&standin),
        };
        let config_path = dir.path().join(CONFIG_FILE);
        std::fs::write(&config_path, config_text(options, &urls, &clients)).map_err(|source| {
            Error::Write {
                path: config_path.clone(),
                source,
            }
        })?;
        Ok(World {
            standin,
            dir,
            keys,
            identity,
            clients,
            config_path,
        })
    }

    /// The secret of client `name`, if the fixture configured one by that name.
    pub fn secret(&self, name: &str) -> Option<&str> {
        self.clients
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.secret.as_str())
    }
}

/// What the stand-in is told: each key's public half and the claims Apple expects with it.
fn known_keys(identity: &Identity, keys: &Keys) -> Vec<KnownKey> {
    vec![
        KnownKey {
            key_id: identity.team.key_id.to_string(),
            public_key: keys.team.public.clone(),
            kind: KnownKeyKind::Team {
                issuer_id: identity.issuer_id.to_string(),
            },
        },
        KnownKey {
            key_id: identity.individual.key_id.to_string(),
            public_key: keys.individual.public.clone(),
            kind: KnownKeyKind::Individual,
        },
        KnownKey {
            key_id: identity.iap.key_id.to_string(),
            public_key: keys.iap.public.clone(),
            kind: KnownKeyKind::InAppPurchase {
                issuer_id: identity.issuer_id.to_string(),
                bundle_ids: vec![identity.bundle_id.to_string()],
            },
        },
        KnownKey {
            key_id: identity.developer.key_id.to_string(),
            public_key: keys.developer.public.clone(),
            kind: KnownKeyKind::Developer {
                team_id: identity.team_id.to_string(),
                service_id: Some(identity.service_id.to_string()),
            },
        },
        KnownKey {
            key_id: identity.business.key_id.to_string(),
            public_key: keys.business.public.clone(),
            kind: KnownKeyKind::BusinessManager {
                client_id: identity.business_client_id.to_string(),
            },
        },
        KnownKey {
            key_id: identity.school.key_id.to_string(),
            public_key: keys.school.public.clone(),
            kind: KnownKeyKind::BusinessManager {
                client_id: identity.school_client_id.to_string(),
            },
        },
    ]
}

/// The key file's path relative to the scratch directory, named as Apple names downloads.
pub fn key_file(identity: &Identity, slot: Slot) -> String {
    let (prefix, extension) = match slot {
        Slot::Team | Slot::Individual | Slot::Developer => ("AuthKey", "p8"),
        Slot::Iap => ("SubscriptionKey", "p8"),
        // Apple Business/School Manager download a .pem once.
        Slot::Business | Slot::School => ("BusinessManager", "pem"),
    };
    format!(
        "{KEYS_DIR}/{prefix}_{}.{extension}",
        identity.key(slot).key_id
    )
}

/// The base URLs the config points each API at.
struct Urls {
    connect: String,
    production: String,
    sandbox: String,
    /// The developer-key APIs' `[apis.<id>]` tables (base_url, sandbox_base_url).
    developer: String,
}

fn developer_tables(standin: &Standin) -> String {
    let mut t = String::new();
    for (api, production, development) in [
        ("apns", Role::Apns, Some(Role::ApnsDevelopment)),
        (
            "devicecheck",
            Role::DeviceCheck,
            Some(Role::DeviceCheckDevelopment),
        ),
        (
            "app-attest",
            Role::AppAttest,
            Some(Role::AppAttestDevelopment),
        ),
        ("weatherkit", Role::WeatherKit, None),
        ("apple-music", Role::AppleMusic, None),
        ("maps", Role::Maps, None),
        ("apple-business", Role::AppleBusiness, None),
        ("apple-school", Role::AppleSchool, None),
        ("sign-in-with-apple", Role::SignInWithApple, None),
    ] {
        let _ = writeln!(
            t,
            "[apis.{api}]\nbase_url = {}",
            quoted(&standin.url(production))
        );
        if let Some(development) = development {
            let _ = writeln!(
                t,
                "sandbox_base_url = {}",
                quoted(&standin.url(development))
            );
        }
        if matches!(production, Role::AppleBusiness | Role::AppleSchool) {
            let _ = writeln!(
                t,
                "token_url = {}",
                quoted(&format!(
                    "{}/auth/oauth2/token",
                    standin.url(Role::AccountToken)
                ))
            );
        }
    }
    t
}

/// The `proxy.toml` text. Relative paths are resolved by the proxy against the file's
/// directory, so the text names the scratch directory's files by their relative names.
fn config_text(options: &Options, urls: &Urls, clients: &[Issued]) -> String {
    let identity = &options.identity;
    let mut t = String::with_capacity(2048);
    // Writing into a String cannot fail.
    let _ = write!(
        t,
        "\n[server]\nlisten = {listen}\nadmin_listen = \"off\"\n{server}\n\
         [audit]\n{audit}\n\
         [upstream]\nca_file = \"{CA_FILE}\"\n{upstream}\n\
         [apis.app-store-connect]\nbase_url = {connect}\n\
         [apis.notary]\nbase_url = {connect}\n\
         [apis.app-store-server]\nbase_url = {production}\nsandbox_base_url = {sandbox}\n{storekit}\
         [apis.advanced-commerce]\nbase_url = {production}\nsandbox_base_url = {sandbox}\n\
         [apis.external-purchase]\nbase_url = {production}\nsandbox_base_url = {sandbox}\n{developer}",
        listen = quoted(&options.listen),
        server = lines(&options.server_toml),
        audit = lines(&options.audit_toml),
        upstream = lines(&options.upstream_toml),
        connect = quoted(&urls.connect),
        production = quoted(&urls.production),
        sandbox = quoted(&urls.sandbox),
        storekit = lines(&options.app_store_server_toml),
        developer = urls.developer,
    );
    let lifetime = options
        .key_lifetime
        .as_deref()
        .map(|l| format!("token_lifetime = {}\n", quoted(l)))
        .unwrap_or_default();
    for (slot, kind, issuer, bundle, apis) in [
        (
            Slot::Team,
            "team",
            true,
            false,
            r#"["app-store-connect", "notary"]"#,
        ),
        (
            Slot::Individual,
            "individual",
            false,
            false,
            r#"["app-store-connect"]"#,
        ),
        (
            Slot::Iap,
            "in-app-purchase",
            true,
            true,
            r#"["app-store-server", "advanced-commerce", "external-purchase", "in-app-signing"]"#,
        ),
        (
            Slot::Developer,
            "developer",
            false,
            false,
            r#"["apns", "devicecheck", "app-attest", "weatherkit", "apple-music", "maps", "sign-in-with-apple"]"#,
        ),
        (
            Slot::Business,
            "business-manager",
            false,
            false,
            r#"["apple-business"]"#,
        ),
        (
            Slot::School,
            "business-manager",
            false,
            false,
            r#"["apple-school"]"#,
        ),
    ] {
        let key = identity.key(slot);
        let _ = write!(
            t,
            "\n[[keys]]\nname = {}\nkind = \"{kind}\"\nkey_id = {}\n",
            quoted(key.name),
            quoted(key.key_id)
        );
        if issuer {
            let _ = writeln!(t, "issuer_id = {}", quoted(identity.issuer_id));
        }
        if bundle {
            let _ = writeln!(t, "bundle_id = {}", quoted(identity.bundle_id));
        }
        if slot == Slot::Developer {
            let _ = writeln!(
                t,
                "team_id = {}\nservice_id = {}\nclient_ids = [{}]",
                quoted(identity.team_id),
                quoted(identity.service_id),
                quoted(identity.sign_in_client_id)
            );
        }
        let client_id = match slot {
            Slot::Business => Some(identity.business_client_id),
            Slot::School => Some(identity.school_client_id),
            _ => None,
        };
        if let Some(id) = client_id {
            let _ = writeln!(t, "client_id = {}", quoted(id));
        }
        let _ = write!(
            t,
            "private_key_file = {}\napis = {apis}\n{lifetime}",
            quoted(&key_file(identity, slot))
        );
    }
    for (client, issued) in options.clients.iter().zip(clients) {
        let allow: Vec<String> = client.allow.iter().map(|r| quoted(r)).collect();
        let _ = write!(
            t,
            "\n[[clients]]\nname = {}\nsecret_sha256 = \"{}\"\nallow = [{}]\n",
            quoted(&client.name),
            sha256_hex(&issued.secret),
            allow.join(", ")
        );
        if let Some(slot) = client.key {
            let _ = writeln!(t, "key = {}", quoted(identity.key(slot).name));
        }
        t.push_str(&lines(&client.toml));
    }
    t.push_str(&lines(&options.extra_toml));
    t
}

/// `text` as whole lines: empty stays empty, anything else ends with a newline.
fn lines(text: &str) -> String {
    if text.is_empty() || text.ends_with('\n') {
        text.to_string()
    } else {
        format!("{text}\n")
    }
}

/// A TOML basic string.
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A fresh client secret in the proxy's format (`apple_api_proxy::client::generate_secret`):
/// [`SECRET_PREFIX`] and 32 random bytes, base64url without padding.
pub fn generate_secret() -> Result<String, Error> {
    let mut bytes = [0u8; 32];
    OsRng.try_fill_bytes(&mut bytes).map_err(Error::Random)?;
    Ok(format!("{SECRET_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes)))
}

/// Lower-case hex SHA-256 of the whole of `s`: a client's `secret_sha256`.
pub fn sha256_hex(s: &str) -> String {
    hex(&sha2::Sha256::digest(s.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Writes `text` to `path`, readable by the owner only (mode 0600 on Unix), as a key file
/// should be: the proxy warns about looser permissions.
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    // The mode applies only to a file this call creates; an existing one is narrowed too.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    file.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::pkcs8::DecodePrivateKey as _;

    #[test]
    fn a_generated_key_is_pkcs8_pem_whose_public_half_is_the_one_given() {
        let key = Key::generate().expect("keygen");
        assert!(key.pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let parsed = p256::SecretKey::from_pkcs8_pem(&key.pem).expect("PKCS#8 PEM");
        assert_eq!(
            parsed.public_key().to_encoded_point(false).as_bytes(),
            key.public.as_slice()
        );
        assert_eq!(key.public.len(), 65);
        assert!(!format!("{key:?}").contains("PRIVATE"), "Debug is redacted");
        assert_ne!(Key::generate().expect("keygen").public, key.public);
    }

    #[test]
    fn secrets_have_the_proxys_format_and_their_hash_is_lower_hex_sha256() {
        let secret = generate_secret().expect("secret");
        let body = secret.strip_prefix("aap_").expect("prefix");
        assert_eq!(body.len(), 43, "32 bytes, base64url without padding");
        assert!(body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn toml_strings_are_quoted_and_escaped() {
        assert_eq!(quoted("GET /v1/*"), r#""GET /v1/*""#);
        assert_eq!(quoted("a\"b\\c\nd\u{1}"), r#""a\"b\\c\nd\u0001""#);
        assert_eq!(lines(""), "");
        assert_eq!(lines("a = 1"), "a = 1\n");
        assert_eq!(lines("a = 1\n"), "a = 1\n");
    }

    #[tokio::test]
    async fn a_world_writes_private_keys_the_ca_and_a_config_naming_them() {
        let options = Options {
            key_lifetime: Some("20m".into()),
            app_store_server_toml: "sandbox_fallback = true".into(),
            extra_toml: "# marker".into(),
            ..Options::default()
        };
        let world = World::start(&options).await.expect("fixture");
        let dir = world.dir.path();
        for slot in Slot::ALL {
            let path = dir.join(key_file(&world.identity, slot));
            let text = std::fs::read_to_string(&path).expect("key file");
            assert_eq!(text, world.keys.get(slot).pem);
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt as _;
                let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
                assert_eq!(mode & 0o777, 0o600, "{}", path.display());
            }
        }
        assert_eq!(
            std::fs::read_to_string(dir.join(CA_FILE)).expect("CA file"),
            world.standin.ca_pem()
        );
        let text = std::fs::read_to_string(&world.config_path).expect("config");
        let config: toml::Table = text.parse().expect("valid TOML");
        let keys = config["keys"].as_array().expect("[[keys]]");
        assert_eq!(keys.len(), 6);
        assert_eq!(keys[3]["kind"].as_str(), Some("developer"));
        assert_eq!(keys[4]["kind"].as_str(), Some("business-manager"));
        assert_eq!(
            keys[5]["client_id"].as_str(),
            Some(Identity::TEST.school_client_id)
        );
        assert_eq!(keys[0]["key_id"].as_str(), Some("TEAMKEY001"));
        assert_eq!(
            keys[2]["private_key_file"].as_str(),
            Some("keys/SubscriptionKey_IAPKEY0001.p8")
        );
        assert!(keys
            .iter()
            .all(|k| k["token_lifetime"].as_str() == Some("20m")));
        assert_eq!(
            config["apis"]["app-store-server"]["base_url"].as_str(),
            Some(world.standin.url(Role::StoreKitProduction).as_str())
        );
        assert_eq!(
            config["apis"]["app-store-server"]["sandbox_fallback"].as_bool(),
            Some(true)
        );
        let clients = config["clients"].as_array().expect("[[clients]]");
        assert_eq!(clients.len(), 2);
        for (entry, issued) in clients.iter().zip(&world.clients) {
            assert_eq!(entry["name"].as_str(), Some(issued.name.as_str()));
            assert_eq!(
                entry["secret_sha256"].as_str(),
                Some(sha256_hex(&issued.secret).as_str())
            );
        }
        assert_eq!(clients[1]["key"].as_str(), Some("me"));
        assert!(world.secret("reader").is_some() && world.secret("nobody").is_none());
        assert!(text.ends_with("# marker\n"));
        assert!(!format!("{world:?}").contains(world.clients[0].secret.as_str()));
        let kept = dir.to_path_buf();
        drop(world);
        assert!(!kept.exists(), "the scratch directory goes with the world");
    }
}
