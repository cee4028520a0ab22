//! Keys that cannot be exported: a private key held by a PKCS#11 token (an HSM, SoftHSM2, a
//! cloud KMS's PKCS#11 library) signs through [`Pkcs11Key`], the second implementation of
//! the [`Signer`] seam (DESIGN §16, APPLE.md §10).
//!
//! - Each module is loaded and `C_Initialize`d once per process, for multi-threaded use with
//!   the OS's locking (`CKF_OS_LOCKING_OK`), and never finalised: reloads share it.
//! - Signing is `CKM_ECDSA` over the SHA-256 digest the proxy computes; the token answers
//!   raw `r‖s` (a token that answers DER is converted, never passed on).
//! - Each key has a bounded pool of logged-in sessions. A failed call discards the pool and
//!   is retried once on a new session (new login, key found again), so an HSM that restarted
//!   or dropped its sessions costs one retry, not a restart of the proxy.
//! - An HSM call blocks its thread, so a signature made on the async runtime leaves the
//!   worker with `block_in_place`: the runtime moves its other tasks to another thread.
//! - While the key is failing, a probe thread test-signs every second and marks the key
//!   available again when the HSM answers; `/readyz` reports the key until then.
//!
//! Nothing here logs or returns a PIN; errors name the module, the token and the label.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use p256::elliptic_curve::sec1::ToEncodedPoint as _;

use super::key::KeyError;
use super::signer::{raw_from_der, Backend, SignError, Signer};
use crate::config::{PinSource, Pkcs11Source};

/// `CKA_EC_PARAMS` of P-256: the DER of OID 1.2.840.10045.3.1.7 (prime256v1).
pub const P256_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// How long a signature waits for one of the key's sessions before it gives up (503).
const SESSION_WAIT: Duration = Duration::from_secs(5);

/// How often a failing key is test-signed until it answers again.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// How often a working key is test-signed anyway, so an HSM that died while the token
/// cache was serving shows on `/readyz` before the next signature fails.
const HEALTH_INTERVAL: Duration = Duration::from_secs(30);

/// Signatures that may wait for a session beyond the pool's size; more are refused at once
/// (503), so a slow HSM never ties up the runtime's threads without bound.
const MAX_WAITING: usize = 64;

const SELF_TEST_MESSAGE: &[u8] = b"apple-api-proxy self-test";

/// A private key in a PKCS#11 token. `Debug` shows where it is, never the PIN.
pub struct Pkcs11Key {
    inner: Arc<Inner>,
}

struct Inner {
    ctx: Pkcs11,
    slot: Slot,
    /// Where the key is (module, token, label): every message names it. Holds no secret.
    source: Pkcs11Source,
    pin: AuthPin,
    /// Uncompressed SEC1 point read from the token's public key object.
    public: Vec<u8>,
    /// Whether the token says the private key can leave it (`CKA_EXTRACTABLE` or not
    /// `CKA_SENSITIVE`).
    extractable: bool,
    pool: Mutex<Pool>,
    /// The pool's bound (`sessions`).
    max_sessions: usize,
    freed: Condvar,
    healthy: AtomicBool,
    /// Why the key is unavailable, while it is.
    problem: Mutex<Option<String>>,
    /// The token refused the PIN: no login is tried again until a reload, so a wrong PIN
    /// never runs down the token's retry counter and locks it.
    pin_refused: AtomicBool,
    /// Signatures in progress or waiting for a session.
    in_line: AtomicUsize,
}

struct Pool {
    idle: Vec<Open>,
    /// Sessions in existence: idle plus checked out.
    open: usize,
}

/// A logged-in session and the key's handle in it.
struct Open {
    session: Session,
    key: ObjectHandle,
    /// A signature made on it verified with the key's public half: until then (a new
    /// session, the key found again) each signature is checked before it is used.
    verified: bool,
}

impl fmt::Debug for Pkcs11Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Key")
            .field("module", &self.inner.source.module)
            .field("token_label", &self.inner.source.token_label)
            .field("key_label", &self.inner.source.key_label)
            .field("pin", &format_args!("<{}>", self.inner.source.pin))
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs a blocking HSM call: on a worker of the multi-threaded runtime through
/// `block_in_place` (the runtime hands the worker's other tasks to another thread first),
/// elsewhere (start-up, `check`, the probe thread) directly.
fn off_the_runtime<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// The module at `path`, loaded and initialised once per process.
fn module(path: &Path) -> Result<Pkcs11, String> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut modules = lock(MODULES.get_or_init(Default::default));
    if let Some(ctx) = modules.get(path) {
        return Ok(ctx.clone());
    }
    if !path.is_file() {
        return Err("the module file does not exist".into());
    }
    let ctx = Pkcs11::new(path).map_err(|e| format!("cannot load the module: {e}"))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(P11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(format!("C_Initialize failed: {}", rv(&e))),
    }
    modules.insert(path.to_path_buf(), ctx.clone());
    Ok(ctx)
}

/// A PKCS#11 error as its `CKR_…` name and the function, without the spec's paragraph.
fn rv(e: &P11Error) -> String {
    match e {
        P11Error::Pkcs11(code, function) => format!("{function:?}: {}", ckr_name(*code)),
        other => other.to_string(),
    }
}

fn ckr_name(code: RvError) -> String {
    // `RvError`'s Debug is the variant (`PinIncorrect`); Apple's and HSM vendors' docs use
    // the C names (`CKR_PIN_INCORRECT`), so print those.
    let variant = format!("{code:?}");
    let mut out = String::from("CKR");
    for c in variant.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

fn find_slot(ctx: &Pkcs11, token_label: &str) -> Result<Slot, String> {
    let slots = ctx
        .get_slots_with_token()
        .map_err(|e| format!("cannot list the module's slots: {}", rv(&e)))?;
    let mut seen = Vec::new();
    for slot in slots {
        let Ok(info) = ctx.get_token_info(slot) else {
            continue;
        };
        let label = info.label().trim_end();
        if label == token_label {
            return Ok(slot);
        }
        seen.push(format!("`{label}`"));
    }
    Err(format!(
        "no token is labelled `{token_label}` (tokens found: {})",
        if seen.is_empty() {
            "none".to_string()
        } else {
            seen.join(", ")
        }
    ))
}

fn read_pin(pin: &PinSource) -> Result<AuthPin, String> {
    let text = match pin {
        PinSource::Env(var) => std::env::var(var)
            .map_err(|_| format!("the PIN's environment variable {var} is not set"))?,
        PinSource::File(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the PIN file {}: {e}", path.display()))?,
    };
    let text = text.trim_end_matches(['\r', '\n']);
    if text.is_empty() {
        return Err(format!("the PIN from {pin} is empty"));
    }
    Ok(AuthPin::from(text.to_string()))
}

/// Why a login failed; `pin` when the token refused the PIN itself.
struct LoginFailed {
    pin: bool,
    problem: String,
}

/// Logs the session's application in as the token's user (already logged in is fine: the
/// login is shared by all of an application's sessions).
fn login(session: &Session, pin: &AuthPin, from: &PinSource) -> Result<(), LoginFailed> {
    let refused = |problem: String| LoginFailed { pin: true, problem };
    match session.login(UserType::User, Some(pin)) {
        Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(P11Error::Pkcs11(RvError::PinIncorrect, _)) => Err(refused(format!(
            "the PIN from {from} is wrong (CKR_PIN_INCORRECT)"
        ))),
        Err(P11Error::Pkcs11(RvError::PinLocked, _)) => Err(refused(
            "the token's user PIN is locked (CKR_PIN_LOCKED); the security officer must unlock it"
                .into(),
        )),
        Err(P11Error::Pkcs11(
            code @ (RvError::PinExpired | RvError::PinInvalid | RvError::PinLenRange),
            _,
        )) => Err(refused(format!(
            "the token refuses the PIN from {from} ({})",
            ckr_name(code)
        ))),
        Err(e) => Err(LoginFailed {
            pin: false,
            problem: format!("login failed: {}", rv(&e)),
        }),
    }
}

/// The one object of `class` labelled `label`.
fn find_one(session: &Session, class: ObjectClass, label: &str) -> Result<ObjectHandle, String> {
    let found = session
        .find_objects(&[
            Attribute::Class(class),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .map_err(|e| format!("cannot search the token: {}", rv(&e)))?;
    let what = if class == ObjectClass::PRIVATE_KEY {
        "private key"
    } else {
        "public key"
    };
    match found.as_slice() {
        [one] => Ok(*one),
        [] => Err(format!("no {what} is labelled `{label}`")),
        many => Err(format!(
            "{} {what}s are labelled `{label}`; the label must name one key",
            many.len()
        )),
    }
}

/// The uncompressed point in `CKA_EC_POINT`: the spec's DER OCTET STRING around `04‖X‖Y`,
/// or (some tokens) the bare 65 bytes.
pub(crate) fn ec_point(value: &[u8]) -> Option<[u8; 65]> {
    let bare = match value {
        [0x04, 0x41, rest @ ..] if rest.len() == 65 => rest,
        bare if bare.len() == 65 => bare,
        _ => return None,
    };
    (bare[0] == 0x04).then(|| bare.try_into().ok()).flatten()
}

/// A token's `CKM_ECDSA` answer as raw `r‖s`: as it is when 64 bytes, converted when a
/// token answered DER.
fn raw_signature(signature: &[u8]) -> Option<[u8; 64]> {
    match signature.len() {
        64 => signature.try_into().ok(),
        _ => raw_from_der(signature),
    }
}

fn bool_attribute(attributes: &[Attribute], ty: AttributeType) -> Option<bool> {
    attributes.iter().find_map(|a| match (a, ty) {
        (Attribute::Extractable(v), AttributeType::Extractable)
        | (Attribute::Sensitive(v), AttributeType::Sensitive)
        | (Attribute::Sign(v), AttributeType::Sign) => Some(*v),
        _ => None,
    })
}

fn hsm_error(source: &Pkcs11Source, problem: String, fix: &str) -> KeyError {
    KeyError::Hsm {
        source_name: source.to_string(),
        problem,
        fix: fix.to_string(),
    }
}

const FIX_MODULE: &str = "check pkcs11.module: the path of the HSM vendor's PKCS#11 library (SoftHSM2: /usr/lib/softhsm/libsofthsm2.so), readable by the proxy's user";
const FIX_TOKEN: &str = "check pkcs11.token_label against `softhsm2-util --show-slots` or `pkcs11-tool --module … --list-slots`";
const FIX_PIN: &str = "set the token's user PIN in pin_env's variable or pin_file";
const FIX_LABEL: &str = "check pkcs11.key_label against `pkcs11-tool --module … --login --list-objects`, or import the key with `apple-api-proxy key import`";

impl Pkcs11Key {
    /// Finds the key on its token, logs in, reads its public key and proves with a test
    /// signature that the two belong together. Every failure names module, token and label.
    pub fn open(source: &Pkcs11Source) -> Result<Pkcs11Key, KeyError> {
        let max = source.sessions.max(1);
        let ctx = module(&source.module).map_err(|p| hsm_error(source, p, FIX_MODULE))?;
        let slot =
            find_slot(&ctx, &source.token_label).map_err(|p| hsm_error(source, p, FIX_TOKEN))?;
        let pin = read_pin(&source.pin).map_err(|p| hsm_error(source, p, FIX_PIN))?;
        let session = ctx.open_ro_session(slot).map_err(|e| {
            hsm_error(
                source,
                format!("cannot open a session: {}", rv(&e)),
                FIX_TOKEN,
            )
        })?;
        login(&session, &pin, &source.pin).map_err(|f| hsm_error(source, f.problem, FIX_PIN))?;
        let key = find_one(&session, ObjectClass::PRIVATE_KEY, &source.key_label)
            .map_err(|p| hsm_error(source, p, FIX_LABEL))?;
        let attributes = session
            .get_attributes(
                key,
                &[
                    AttributeType::KeyType,
                    AttributeType::EcParams,
                    AttributeType::Sign,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                ],
            )
            .map_err(|e| {
                hsm_error(
                    source,
                    format!("cannot read the private key's attributes: {}", rv(&e)),
                    FIX_LABEL,
                )
            })?;
        let is_ec_p256 = attributes
            .iter()
            .any(|a| matches!(a, Attribute::KeyType(t) if *t == KeyType::EC))
            && attributes
                .iter()
                .any(|a| matches!(a, Attribute::EcParams(p) if p.as_slice() == P256_PARAMS));
        if !is_ec_p256 {
            return Err(hsm_error(
                source,
                "the private key is not an EC P-256 key; Apple's APIs need ES256".into(),
                FIX_LABEL,
            ));
        }
        if bool_attribute(&attributes, AttributeType::Sign) == Some(false) {
            return Err(hsm_error(
                source,
                "the private key may not sign (CKA_SIGN is false)".into(),
                FIX_LABEL,
            ));
        }
        let extractable = bool_attribute(&attributes, AttributeType::Extractable) != Some(false)
            || bool_attribute(&attributes, AttributeType::Sensitive) != Some(true);
        let public = read_public(&session, &source.key_label)
            .map_err(|p| hsm_error(source, p, FIX_LABEL))?;
        let inner = Arc::new(Inner {
            ctx,
            slot,
            source: source.clone(),
            pin,
            public: public.to_vec(),
            extractable,
            pool: Mutex::new(Pool {
                idle: vec![Open {
                    session,
                    key,
                    verified: false,
                }],
                open: 1,
            }),
            max_sessions: max,
            freed: Condvar::new(),
            healthy: AtomicBool::new(true),
            problem: Mutex::new(None),
            pin_refused: AtomicBool::new(false),
            in_line: AtomicUsize::new(0),
        });
        inner.self_test().map_err(|p| {
            hsm_error(
                source,
                p,
                "re-import the key: the private and public objects labelled key_label must be one pair",
            )
        })?;
        spawn_probe(Arc::downgrade(&inner));
        Ok(Pkcs11Key { inner })
    }
}

fn read_public(session: &Session, label: &str) -> Result<[u8; 65], String> {
    let object = find_one(session, ObjectClass::PUBLIC_KEY, label).map_err(|p| {
        format!("{p} (the proxy reads the public key object for its self-test and for `check`)")
    })?;
    let attributes = session
        .get_attributes(object, &[AttributeType::EcPoint])
        .map_err(|e| format!("cannot read the public key: {}", rv(&e)))?;
    attributes
        .iter()
        .find_map(|a| match a {
            Attribute::EcPoint(p) => ec_point(p),
            _ => None,
        })
        .ok_or_else(|| {
            "the public key object has no uncompressed P-256 point (CKA_EC_POINT)".into()
        })
}

/// Test-signs every [`PROBE_INTERVAL`] while the key is failing, every [`HEALTH_INTERVAL`]
/// while it works; ends with the key. A refused PIN is not retried (see `pin_refused`).
fn spawn_probe(inner: Weak<Inner>) {
    let spawned = std::thread::Builder::new()
        .name("pkcs11-probe".into())
        .spawn(move || {
            let mut last_check = Instant::now();
            loop {
                std::thread::sleep(PROBE_INTERVAL);
                let Some(inner) = inner.upgrade() else {
                    return;
                };
                if inner.pin_refused.load(Ordering::Relaxed) {
                    continue;
                }
                let healthy = inner.healthy.load(Ordering::Relaxed);
                if healthy && last_check.elapsed() < HEALTH_INTERVAL {
                    continue;
                }
                last_check = Instant::now();
                let passed = inner.self_test().is_ok();
                if passed && !healthy {
                    tracing::info!(key = %inner.source, "the HSM answers again: signing resumed");
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the PKCS#11 probe thread; a failing HSM key recovers on the next request instead");
    }
}

impl Inner {
    fn open_session(&self) -> Result<Open, String> {
        if self.pin_refused.load(Ordering::Relaxed) {
            return Err(format!(
                "the token refused the PIN from {} earlier; fix the PIN and reload (the proxy does not try it again, so the token's retry counter does not lock it)",
                self.source.pin
            ));
        }
        let session = self
            .ctx
            .open_ro_session(self.slot)
            .map_err(|e| format!("cannot open a session: {}", rv(&e)))?;
        login(&session, &self.pin, &self.source.pin).map_err(|f| {
            if f.pin {
                self.pin_refused.store(true, Ordering::Relaxed);
            }
            f.problem
        })?;
        let key = find_one(&session, ObjectClass::PRIVATE_KEY, &self.source.key_label)?;
        Ok(Open {
            session,
            key,
            verified: false,
        })
    }

    /// An idle session, a new one while fewer than `max` exist, or — all busy — the first
    /// one freed within [`SESSION_WAIT`].
    fn checkout(&self) -> Result<Open, Checkout> {
        let deadline = Instant::now() + SESSION_WAIT;
        let mut pool = lock(&self.pool);
        loop {
            if let Some(open) = pool.idle.pop() {
                return Ok(open);
            }
            if pool.open < self.max_sessions {
                pool.open += 1;
                drop(pool);
                return self.open_session().map_err(|problem| {
                    lock(&self.pool).open -= 1;
                    self.freed.notify_one();
                    Checkout::Failed(problem)
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Checkout::Busy(self.max_sessions));
            }
            pool = self
                .freed
                .wait_timeout(pool, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    fn checkin(&self, open: Open) {
        lock(&self.pool).idle.push(open);
        self.freed.notify_one();
    }

    /// Closes `open` and every idle session: after a failure none of them is trusted.
    fn discard(&self, open: Open) {
        let stale = {
            let mut pool = lock(&self.pool);
            let stale = std::mem::take(&mut pool.idle);
            pool.open = pool.open.saturating_sub(1 + stale.len());
            stale
        };
        drop(open);
        drop(stale);
        self.freed.notify_all();
    }

    /// Signs a SHA-256 digest: on a pooled session, and after a failure once more on a new
    /// one (new login, key found again).
    fn sign_digest(&self, digest: &[u8]) -> Result<[u8; 64], SignError> {
        let mut problem = String::new();
        for _ in 0..2 {
            let mut open = match self.checkout() {
                Ok(open) => open,
                Err(Checkout::Busy(n)) => {
                    // A hung HSM holds every session: that is a failing key too.
                    let problem = format!(
                        "{}: all {n} sessions stayed busy for {} s (a hung or overloaded HSM)",
                        self.source,
                        SESSION_WAIT.as_secs()
                    );
                    self.mark_unhealthy(&problem);
                    return Err(SignError::Unavailable(problem));
                }
                Err(Checkout::Failed(p)) => {
                    problem = p;
                    break;
                }
            };
            match open.session.sign(&Mechanism::Ecdsa, open.key, digest) {
                Ok(signature) => {
                    let Some(raw) = raw_signature(&signature) else {
                        self.checkin(open);
                        return Err(SignError::Failed);
                    };
                    // The first signature of a session (a key found again after a retry
                    // included) is checked against the public key before it is used.
                    if !open.verified {
                        if !self.verifies_digest(digest, &raw) {
                            self.discard(open);
                            let problem = format!("{}: the key object's signature does not verify with its public key (was the key replaced on the token?)", self.source);
                            self.mark_unhealthy(&problem);
                            return Err(SignError::Unavailable(problem));
                        }
                        open.verified = true;
                    }
                    self.checkin(open);
                    self.mark_healthy();
                    return Ok(raw);
                }
                Err(e) => {
                    problem = format!("signing failed: {}", rv(&e));
                    self.discard(open);
                }
            }
        }
        let problem = format!("{}: {problem}", self.source);
        self.mark_unhealthy(&problem);
        Err(SignError::Unavailable(problem))
    }

    /// Whether `raw` is a signature of the SHA-256 `digest` by the key's public half.
    fn verifies_digest(&self, digest: &[u8], raw: &[u8; 64]) -> bool {
        use p256::ecdsa::signature::hazmat::PrehashVerifier as _;
        let (Ok(key), Ok(signature)) = (
            p256::ecdsa::VerifyingKey::from_sec1_bytes(&self.public),
            p256::ecdsa::Signature::from_slice(raw),
        ) else {
            return false;
        };
        key.verify_prehash(digest, &signature).is_ok()
    }

    fn self_test(&self) -> Result<(), String> {
        let digest = ring::digest::digest(&ring::digest::SHA256, SELF_TEST_MESSAGE);
        let signature = self.sign_digest(digest.as_ref()).map_err(|e| match e {
            SignError::Unavailable(p) => p,
            SignError::Failed => "the token's signature is neither raw r‖s nor DER".into(),
        })?;
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_FIXED,
            &self.public,
        )
        .verify(SELF_TEST_MESSAGE, &signature)
        .map_err(|_| {
            let problem =
                "the test signature does not verify with the public key object of the same label"
                    .to_string();
            self.mark_unhealthy(&problem);
            problem
        })
    }

    fn mark_healthy(&self) {
        if !self.healthy.swap(true, Ordering::Relaxed) {
            *lock(&self.problem) = None;
        }
    }

    fn mark_unhealthy(&self, problem: &str) {
        *lock(&self.problem) = Some(problem.to_string());
        if self.healthy.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                problem,
                "HSM key unavailable: its requests get 503 until it answers again"
            );
        }
    }
}

enum Checkout {
    /// Every session is in use (the pool's size).
    Busy(usize),
    /// A new session could not be opened, logged in, or find the key.
    Failed(String),
}

/// Counts a signature in line for the key while it lives.
struct InLine<'a>(&'a AtomicUsize);

impl Drop for InLine<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Signer for Pkcs11Key {
    fn sign(&self, message: &[u8]) -> Result<[u8; 64], SignError> {
        let inner = &self.inner;
        let max = inner.max_sessions + MAX_WAITING;
        let _in_line = InLine(&inner.in_line);
        if inner.in_line.fetch_add(1, Ordering::Relaxed) >= max {
            return Err(SignError::Unavailable(format!(
                "{}: {max} signatures are already in progress or waiting for its sessions",
                inner.source
            )));
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, message);
        off_the_runtime(|| inner.sign_digest(digest.as_ref()))
    }

    fn public_key(&self) -> &[u8] {
        &self.inner.public
    }

    fn backend(&self) -> Backend {
        Backend::Pkcs11
    }

    fn extractable(&self) -> Option<bool> {
        Some(self.inner.extractable)
    }

    fn available(&self) -> Result<(), String> {
        if self.inner.healthy.load(Ordering::Relaxed) {
            return Ok(());
        }
        Err(lock(&self.inner.problem)
            .clone()
            .unwrap_or_else(|| format!("{}: the HSM is not answering", self.inner.source)))
    }
}

/// What `key import` put on the token.
#[derive(Debug)]
pub struct Imported {
    /// Uncompressed SEC1 point.
    pub public_key: Vec<u8>,
    pub sensitive: bool,
    pub extractable: bool,
}

/// Stores `secret` on the token `target` names as a sensitive, non-extractable, sign-only
/// private key object labelled `target.key_label`, with its public key object beside it,
/// then test-signs with it. Refuses a label already taken; writes nothing on refusal, and
/// removes what it wrote if the token did not keep the key non-extractable.
pub fn import(secret: &p256::SecretKey, target: &Pkcs11Source) -> Result<Imported, KeyError> {
    let ctx = module(&target.module).map_err(|p| hsm_error(target, p, FIX_MODULE))?;
    let slot = find_slot(&ctx, &target.token_label).map_err(|p| hsm_error(target, p, FIX_TOKEN))?;
    let pin = read_pin(&target.pin).map_err(|p| hsm_error(target, p, FIX_PIN))?;
    let session = ctx.open_rw_session(slot).map_err(|e| {
        hsm_error(
            target,
            format!("cannot open a read-write session: {}", rv(&e)),
            FIX_TOKEN,
        )
    })?;
    login(&session, &pin, &target.pin).map_err(|f| hsm_error(target, f.problem, FIX_PIN))?;
    let label = target.key_label.as_bytes().to_vec();
    let taken = session
        .find_objects(&[Attribute::Label(label.clone())])
        .map_err(|e| {
            hsm_error(
                target,
                format!("cannot search the token: {}", rv(&e)),
                FIX_TOKEN,
            )
        })?;
    if !taken.is_empty() {
        return Err(hsm_error(
            target,
            format!(
                "the label `{}` is already taken by {} object(s) on this token; nothing was written",
                target.key_label,
                taken.len()
            ),
            "choose another --key-label, or delete the old objects first (`pkcs11-tool --delete-object`)",
        ));
    }
    let public = secret.public_key().to_encoded_point(false);
    let mut ec_point = vec![0x04, 0x41];
    ec_point.extend_from_slice(public.as_bytes());
    let mut private_template = [
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(KeyType::EC),
        Attribute::EcParams(P256_PARAMS.to_vec()),
        Attribute::Value(secret.to_bytes().to_vec()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::Label(label.clone()),
        Attribute::Id(label.clone()),
    ];
    let created = session.create_object(&private_template);
    // The template's copy of the scalar is wiped whatever the token said.
    for attribute in &mut private_template {
        if let Attribute::Value(value) = attribute {
            zeroize::Zeroize::zeroize(value);
        }
    }
    let private = created.map_err(|e| {
        hsm_error(
            target,
            format!("cannot store the private key: {}", rv(&e)),
            "check that the token has room and accepts EC private keys",
        )
    })?;
    let public_template = [
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::KeyType(KeyType::EC),
        Attribute::EcParams(P256_PARAMS.to_vec()),
        Attribute::EcPoint(ec_point),
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Verify(true),
        Attribute::Encrypt(false),
        Attribute::Wrap(false),
        Attribute::Label(label.clone()),
        Attribute::Id(label),
    ];
    let undo = |problem: String, objects: &[ObjectHandle]| {
        let left: Vec<String> = objects
            .iter()
            .filter_map(|o| {
                session
                    .destroy_object(*o)
                    .err()
                    .map(|e| format!("{o} ({})", rv(&e)))
            })
            .collect();
        let cleanup = if left.is_empty() {
            "the objects written were removed".to_string()
        } else {
            format!(
                "removing what was written failed for object handle(s) {}: delete the objects labelled `{}` by hand (`pkcs11-tool --delete-object`)",
                left.join(", "),
                target.key_label
            )
        };
        hsm_error(
            target,
            format!("{problem}; {cleanup}"),
            "check the token's policy for imported keys",
        )
    };
    let public_object = session.create_object(&public_template).map_err(|e| {
        undo(
            format!("cannot store the public key: {}", rv(&e)),
            &[private],
        )
    })?;
    let attributes = session
        .get_attributes(
            private,
            &[AttributeType::Sensitive, AttributeType::Extractable],
        )
        .map_err(|e| {
            undo(
                format!("cannot read the key back: {}", rv(&e)),
                &[private, public_object],
            )
        })?;
    let sensitive = bool_attribute(&attributes, AttributeType::Sensitive) == Some(true);
    let extractable = bool_attribute(&attributes, AttributeType::Extractable) != Some(false);
    if !sensitive || extractable {
        return Err(undo(
            format!(
                "the token stored the key {}",
                if extractable {
                    "extractable"
                } else {
                    "not sensitive"
                }
            ),
            &[private, public_object],
        ));
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, SELF_TEST_MESSAGE);
    let signature = session
        .sign(&Mechanism::Ecdsa, private, digest.as_ref())
        .map_err(|e| {
            undo(
                format!("the test signature failed: {}", rv(&e)),
                &[private, public_object],
            )
        })?;
    let verified = raw_signature(&signature).is_some_and(|raw: [u8; 64]| {
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_FIXED,
            public.as_bytes(),
        )
        .verify(SELF_TEST_MESSAGE, &raw)
        .is_ok()
    });
    if !verified {
        return Err(undo(
            "the test signature does not verify with the key's public half".into(),
            &[private, public_object],
        ));
    }
    Ok(Imported {
        public_key: public.as_bytes().to_vec(),
        sensitive,
        extractable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ec_point_accepts_the_octet_string_and_the_bare_point() {
        let mut bare = [7u8; 65];
        bare[0] = 0x04;
        let mut wrapped = vec![0x04, 0x41];
        wrapped.extend_from_slice(&bare);
        assert_eq!(ec_point(&wrapped), Some(bare));
        assert_eq!(ec_point(&bare), Some(bare));
        // Compressed, truncated, or a wrong tag: not a point the proxy can verify with.
        assert_eq!(ec_point(&bare[..33]), None);
        assert_eq!(ec_point(&wrapped[..66]), None);
        let mut not_uncompressed = bare;
        not_uncompressed[0] = 0x02;
        assert_eq!(ec_point(&not_uncompressed), None);
    }

    #[test]
    fn return_codes_print_as_their_c_names() {
        assert_eq!(ckr_name(RvError::PinIncorrect), "CKR_PIN_INCORRECT");
        assert_eq!(ckr_name(RvError::DeviceError), "CKR_DEVICE_ERROR");
        assert_eq!(
            ckr_name(RvError::UserAlreadyLoggedIn),
            "CKR_USER_ALREADY_LOGGED_IN"
        );
    }

    #[test]
    fn a_missing_module_names_the_module_token_and_label() {
        let source = Pkcs11Source {
            module: PathBuf::from("/nonexistent/libnothing.so"),
            token_label: "apple".into(),
            key_label: "AuthKey_2X9R4HXF34".into(),
            pin: PinSource::Env("AAP_TEST_PIN_UNSET".into()),
            sessions: 2,
        };
        let message = Pkcs11Key::open(&source).unwrap_err().to_string();
        for part in [
            "/nonexistent/libnothing.so",
            "`apple`",
            "`AuthKey_2X9R4HXF34`",
            "does not exist",
            "fix:",
        ] {
            assert!(message.contains(part), "{part} missing from: {message}");
        }
    }
}
