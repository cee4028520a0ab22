//! Fault modes: the ways Apple refuses a token that its JWT rules accept (APPLE.md §3, §5),
//! so the proxy's 401/403 diagnosis can be tested against each cause.
//!
//! Owns: which fault (if any) answers an already-verified request, in the documented
//! precedence, and the transient-401 budget. Pure apart from that one atomic counter.
//! Imports only sibling stand-in modules.

use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::Value;

use super::{Faults, KnownKeyKind, Role};

/// App Store Connect resources an Individual key may not use (APPLE.md §2 "Key types" and
/// §5: Provisioning, Sales and Finance), as the first path segment after `/v1/`.
const INDIVIDUAL_FORBIDDEN_RESOURCES: [&str; 7] = [
    "bundleIds",
    "certificates",
    "devices",
    "profiles",
    "bundleIdCapabilities",
    "salesReports",
    "financeReports",
];
/// Notary is closed to Individual keys too (APPLE.md §2: "can't use … notaryTool").
const NOTARY_PREFIX: &str = "/notary/";

/// Why a request whose token verified was refused anyway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// The key is revoked: 401 as for a bad token.
    Revoked,
    /// One of Apple's transient 401s.
    Transient,
    /// Production App Store Server API before the app's first release: empty 401.
    Unreleased,
    /// An Individual key on Provisioning, Sales/Finance or Notary: 403 FORBIDDEN_ERROR.
    IndividualForbidden,
    /// The Account Holder has not accepted the latest agreement: 403 FORBIDDEN.
    AgreementPending,
    /// Production does not know this transaction (Faults::sandbox_only_transactions): 404
    /// with errorCode 4040010, as Apple answers for a sandbox transaction id.
    TransactionNotFound,
    /// The key's role does not allow this path (Faults::role_forbidden_paths): 403
    /// FORBIDDEN_ERROR, the body Apple sends for any key whose role lacks the permission.
    RoleForbidden,
    /// Not decided here: the token failed `verify`'s strict scope comparison although it
    /// would match after percent-decoding. A 401 like any bad token.
    StrictScopeEncoding,
}

impl Fault {
    /// The name recorded in [`super::Received::fault`].
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Fault::Revoked => "revoked",
            Fault::Transient => "transient",
            Fault::Unreleased => "unreleased",
            Fault::IndividualForbidden => "individual_forbidden",
            Fault::AgreementPending => "agreement",
            Fault::RoleForbidden => "role_forbidden",
            Fault::TransactionNotFound => "transaction_not_found",
            Fault::StrictScopeEncoding => "strict_scope_encoding",
        }
    }

    /// Why, for the stand-in's debug log (never the token).
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Fault::Revoked => "the key is in Faults::revoked_key_ids",
            Fault::Transient => "a transient 401 from Faults::transient_401s",
            Fault::Unreleased => {
                "the bundle id has no release in production (Faults::unreleased_bundle_ids)"
            }
            Fault::IndividualForbidden => {
                "an Individual key may not use Provisioning, Sales and Finance or Notary"
            }
            Fault::AgreementPending => {
                "the Account Holder must accept the latest agreement (Faults::agreement_pending)"
            }
            Fault::StrictScopeEncoding => {
                "the scope matches only after percent-decoding (Faults::strict_scope_encoding)"
            }
            Fault::RoleForbidden => {
                "the key's role does not allow this path (Faults::role_forbidden_paths)"
            }
            Fault::TransactionNotFound => {
                "production does not know this transaction (Faults::sandbox_only_transactions)"
            }
        }
    }
}

/// The request facts a fault decision needs, for a token that already verified.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Verified<'a> {
    pub role: Role,
    pub path: &'a str,
    pub key_id: &'a str,
    pub kind: Option<&'a KnownKeyKind>,
    pub claims: &'a Value,
}

/// The fault that answers `request`, if any, in this precedence: revoked, transient,
/// unreleased (production storekit only), individual-forbidden, agreement pending (App
/// Store Connect only). A transient 401 is spent only when the request reaches that step.
pub(crate) fn decide(
    faults: &Faults,
    transient_left: &AtomicU32,
    request: &Verified<'_>,
) -> Option<Fault> {
    if faults.revoked_key_ids.iter().any(|k| k == request.key_id) {
        return Some(Fault::Revoked);
    }
    if spend_transient(transient_left) {
        return Some(Fault::Transient);
    }
    if request.role == Role::StoreKitProduction {
        let bid = request.claims.get("bid").and_then(Value::as_str);
        if bid.is_some_and(|bid| faults.unreleased_bundle_ids.iter().any(|b| b == bid)) {
            return Some(Fault::Unreleased);
        }
        if request
            .path
            .split('/')
            .any(|seg| faults.sandbox_only_transactions.iter().any(|t| t == seg))
        {
            return Some(Fault::TransactionNotFound);
        }
    }
    if request.role == Role::AppStoreConnect {
        if request.kind == Some(&KnownKeyKind::Individual) && individual_key_forbidden(request.path)
        {
            return Some(Fault::IndividualForbidden);
        }
        if faults
            .role_forbidden_paths
            .iter()
            .any(|p| request.path.starts_with(p.as_str()))
        {
            return Some(Fault::RoleForbidden);
        }
        if faults.agreement_pending {
            return Some(Fault::AgreementPending);
        }
    }
    None
}

/// Takes one transient 401 from the budget if any is left.
fn spend_transient(transient_left: &AtomicU32) -> bool {
    transient_left
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        .is_ok()
}

/// Is `path` one an Individual key is refused (APPLE.md §5)? `/v1/<resource>` or
/// `/v1/<resource>/…` for the forbidden resources, and anything under `/notary/`.
pub(crate) fn individual_key_forbidden(path: &str) -> bool {
    if path.starts_with(NOTARY_PREFIX) {
        return true;
    }
    let Some(rest) = path.strip_prefix("/v1/") else {
        return false;
    };
    let resource = rest.split('/').next().unwrap_or("");
    INDIVIDUAL_FORBIDDEN_RESOURCES.contains(&resource)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn individual_keys_are_refused_provisioning_reports_and_notary() {
        let cases = [
            ("/v1/bundleIds", true),
            ("/v1/bundleIds/ABC123", true),
            ("/v1/bundleIds/ABC123/bundleIdCapabilities", true),
            ("/v1/bundleIdCapabilities", true),
            ("/v1/certificates/1", true),
            ("/v1/devices", true),
            ("/v1/profiles/9/devices", true),
            ("/v1/salesReports", true),
            ("/v1/financeReports", true),
            ("/notary/v2/submissions", true),
            ("/notary/", true),
            ("/v1/apps", false),
            ("/v1/apps/1/builds", false),
            ("/v1/devicesX", false),
            ("/v2/devices", false),
            ("/v1", false),
            ("/notary", false),
            ("/inApps/v1/transactions/1", false),
        ];
        for (path, expected) in cases {
            assert_eq!(individual_key_forbidden(path), expected, "{path}");
        }
    }

    #[test]
    fn faults_apply_in_the_documented_precedence() {
        let claims = json!({"bid": "com.example.Unreleased"});
        let individual = KnownKeyKind::Individual;
        let request = |role, path, kind| Verified {
            role,
            path,
            key_id: "KEY0000001",
            kind,
            claims: &claims,
        };
        let all = Faults {
            revoked_key_ids: vec!["KEY0000001".into()],
            unreleased_bundle_ids: vec!["com.example.Unreleased".into()],
            agreement_pending: true,
            transient_401s: 1,
            strict_scope_encoding: false,
            role_forbidden_paths: vec!["/v1/users".into()],
            sandbox_only_transactions: Vec::new(),
            error_padding: 0,
            compress_errors: false,
            apns_reason: None,
        };
        let left = AtomicU32::new(1);
        let asc = request(Role::AppStoreConnect, "/v1/devices", Some(&individual));
        assert_eq!(decide(&all, &left, &asc), Some(Fault::Revoked));
        assert_eq!(
            left.load(Ordering::Acquire),
            1,
            "revoked spends no transient"
        );

        let faults = Faults {
            revoked_key_ids: Vec::new(),
            ..all
        };
        let production = request(Role::StoreKitProduction, "/inApps/v1/x", None);
        assert_eq!(decide(&faults, &left, &production), Some(Fault::Transient));
        assert_eq!(decide(&faults, &left, &production), Some(Fault::Unreleased));
        let sandbox = request(Role::StoreKitSandbox, "/inApps/v1/x", None);
        assert_eq!(decide(&faults, &left, &sandbox), None);
        assert_eq!(
            decide(&faults, &left, &asc),
            Some(Fault::IndividualForbidden)
        );
        let apps = request(Role::AppStoreConnect, "/v1/apps", Some(&individual));
        assert_eq!(decide(&faults, &left, &apps), Some(Fault::AgreementPending));
        assert_eq!(decide(&Faults::default(), &left, &apps), None);
        assert_eq!(left.load(Ordering::Acquire), 0, "never below zero");
    }
}
