//! A fault-injecting PKCS#11 module for the HSM tests (DESIGN §16): a shim that forwards
//! every call to a real module (SoftHSM2 by default) and fails the calls a signature needs
//! while a control file says so. Built as a shared library by `cargo test` (an example with
//! `crate-type = ["cdylib"]`), loaded by the real proxy binary as its `pkcs11.module`.
//!
//! - `AAP_P11_FAULT_REAL`: the real module (default `/usr/lib/softhsm/libsofthsm2.so`).
//! - `AAP_P11_FAULT_FILE`: the control file, read on every wrapped call:
//!   - absent: everything passes through;
//!   - `down`: `C_OpenSession`, `C_Login`, `C_FindObjectsInit`, `C_SignInit` and `C_Sign`
//!     answer `CKR_DEVICE_ERROR` (an HSM that stopped answering);
//!   - `drop-sessions`: the next `C_SignInit` closes every session of the slot in the real
//!     module (which also logs the application out), deletes the control file and answers
//!     `CKR_SESSION_HANDLE_INVALID` (an HSM that restarted under the proxy);
//!   - `pin-refused`: as `drop-sessions` (without deleting the file), and `C_Login` answers
//!     `CKR_PIN_INCORRECT` (an HSM restarted with another PIN).
//!
//! - `AAP_P11_COUNT_FILE`: when set, rewritten after every `C_OpenSession`, `C_CloseSession`
//!   and `C_Login` as `open=<sessions open> peak=<most open at once> logins=<C_Login calls>`.
//!
//! Test code only: it never ships in the proxy.

#![allow(non_snake_case, clippy::missing_safety_doc)]

use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use cryptoki_sys::{
    CKR_DEVICE_ERROR, CKR_GENERAL_ERROR, CKR_OK, CKR_PIN_INCORRECT, CKR_SESSION_HANDLE_INVALID,
    CK_ATTRIBUTE, CK_BYTE, CK_FLAGS, CK_FUNCTION_LIST, CK_MECHANISM, CK_NOTIFY, CK_OBJECT_HANDLE,
    CK_RV, CK_SESSION_HANDLE, CK_SESSION_INFO, CK_SLOT_ID, CK_ULONG, CK_USER_TYPE, CK_UTF8CHAR,
};

struct Real {
    _library: libloading::Library,
    list: CK_FUNCTION_LIST,
}

fn real() -> Option<&'static Real> {
    static REAL: OnceLock<Option<Real>> = OnceLock::new();
    REAL.get_or_init(|| {
        let path = std::env::var("AAP_P11_FAULT_REAL")
            .unwrap_or_else(|_| "/usr/lib/softhsm/libsofthsm2.so".to_string());
        // SAFETY: loading a PKCS#11 module runs its initialisers, as any PKCS#11 host does.
        unsafe {
            let library = libloading::Library::new(path).ok()?;
            let get: libloading::Symbol<unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> CK_RV> =
                library.get(b"C_GetFunctionList").ok()?;
            let mut list = ptr::null_mut();
            if get(&mut list) != CKR_OK || list.is_null() {
                return None;
            }
            Some(Real {
                list: *list,
                _library: library,
            })
        }
    })
    .as_ref()
}

fn fault() -> Option<String> {
    let path = std::env::var_os("AAP_P11_FAULT_FILE")?;
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn down() -> bool {
    fault().as_deref() == Some("down")
}

static OPEN: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static LOGINS: AtomicUsize = AtomicUsize::new(0);

fn write_counts() {
    if let Some(path) = std::env::var_os("AAP_P11_COUNT_FILE") {
        let text = format!(
            "open={} peak={} logins={}\n",
            OPEN.load(Ordering::SeqCst),
            PEAK.load(Ordering::SeqCst),
            LOGINS.load(Ordering::SeqCst)
        );
        let _ = std::fs::write(path, text);
    }
}

macro_rules! forward {
    ($name:ident ( $($arg:expr),* )) => {
        match real().and_then(|r| r.list.$name) {
            Some(f) => f($($arg),*),
            None => CKR_GENERAL_ERROR,
        }
    };
}

unsafe extern "C" fn open_session(
    slot: CK_SLOT_ID,
    flags: CK_FLAGS,
    application: *mut std::ffi::c_void,
    notify: CK_NOTIFY,
    session: *mut CK_SESSION_HANDLE,
) -> CK_RV {
    if down() {
        return CKR_DEVICE_ERROR;
    }
    let rv = forward!(C_OpenSession(slot, flags, application, notify, session));
    if rv == CKR_OK {
        let open = OPEN.fetch_add(1, Ordering::SeqCst) + 1;
        PEAK.fetch_max(open, Ordering::SeqCst);
        write_counts();
    }
    rv
}

unsafe extern "C" fn close_session(session: CK_SESSION_HANDLE) -> CK_RV {
    let rv = forward!(C_CloseSession(session));
    if rv == CKR_OK {
        let _ = OPEN.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        write_counts();
    }
    rv
}

unsafe extern "C" fn login(
    session: CK_SESSION_HANDLE,
    user: CK_USER_TYPE,
    pin: *mut CK_UTF8CHAR,
    pin_len: CK_ULONG,
) -> CK_RV {
    LOGINS.fetch_add(1, Ordering::SeqCst);
    write_counts();
    match fault().as_deref() {
        Some("down") => return CKR_DEVICE_ERROR,
        Some("pin-refused") => return CKR_PIN_INCORRECT,
        _ => {}
    }
    forward!(C_Login(session, user, pin, pin_len))
}

unsafe extern "C" fn find_objects_init(
    session: CK_SESSION_HANDLE,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
) -> CK_RV {
    if down() {
        return CKR_DEVICE_ERROR;
    }
    forward!(C_FindObjectsInit(session, template, count))
}

unsafe extern "C" fn sign_init(
    session: CK_SESSION_HANDLE,
    mechanism: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    match fault().as_deref() {
        Some("down") => return CKR_DEVICE_ERROR,
        Some(mode @ ("drop-sessions" | "pin-refused")) => {
            let mut info = CK_SESSION_INFO::default();
            if forward!(C_GetSessionInfo(session, &mut info)) == CKR_OK {
                forward!(C_CloseAllSessions(info.slotID));
                OPEN.store(0, Ordering::SeqCst);
                write_counts();
            }
            if mode == "drop-sessions" {
                if let Some(path) = std::env::var_os("AAP_P11_FAULT_FILE") {
                    let _ = std::fs::remove_file(path);
                }
            }
            return CKR_SESSION_HANDLE_INVALID;
        }
        _ => {}
    }
    forward!(C_SignInit(session, mechanism, key))
}

unsafe extern "C" fn sign(
    session: CK_SESSION_HANDLE,
    data: *mut CK_BYTE,
    data_len: CK_ULONG,
    signature: *mut CK_BYTE,
    signature_len: *mut CK_ULONG,
) -> CK_RV {
    if down() {
        return CKR_DEVICE_ERROR;
    }
    forward!(C_Sign(session, data, data_len, signature, signature_len))
}

/// The module's entry point: the real module's function list with the wrapped calls swapped in.
#[no_mangle]
pub unsafe extern "C" fn C_GetFunctionList(out: *mut *mut CK_FUNCTION_LIST) -> CK_RV {
    static LIST: OnceLock<Option<usize>> = OnceLock::new();
    let list = LIST.get_or_init(|| {
        let mut list = real()?.list;
        list.C_GetFunctionList = Some(C_GetFunctionList);
        list.C_OpenSession = Some(open_session);
        list.C_CloseSession = Some(close_session);
        list.C_Login = Some(login);
        list.C_FindObjectsInit = Some(find_objects_init);
        list.C_SignInit = Some(sign_init);
        list.C_Sign = Some(sign);
        // Lives as long as the process, as a module's function list does.
        Some(Box::into_raw(Box::new(list)) as usize)
    });
    match (list, out.is_null()) {
        (Some(list), false) => {
            *out = *list as *mut CK_FUNCTION_LIST;
            CKR_OK
        }
        _ => CKR_GENERAL_ERROR,
    }
}
