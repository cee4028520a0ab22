//! What a key file's name says — Apple names its downloads `AuthKey_<ID>.p8` and
//! `SubscriptionKey_<ID>.p8` — and the hints `check` gives when config disagrees with it.

use crate::apple::{self, KeyKind};
use crate::config::KeyConfig;

/// What the key file's name says, as Apple names its downloads: `AuthKey_<ID>.p8` (an App
/// Store Connect key, returned as [`KeyKind::Team`]) or `SubscriptionKey_<ID>.p8` (an
/// in-app purchase key), with the id. `None` for other names and non-file sources.
pub(crate) fn key_file_name(kc: &KeyConfig) -> Option<(KeyKind, &str)> {
    let crate::config::KeySource::File(path) = &kc.source else {
        return None;
    };
    let stem = path.file_stem()?.to_str()?;
    stem.strip_prefix("AuthKey_")
        .map(|id| (KeyKind::Team, id))
        .or_else(|| {
            stem.strip_prefix("SubscriptionKey_")
                .map(|id| (KeyKind::InAppPurchase, id))
        })
}

/// Warnings `check` prints when the key file's name disagrees with the config
/// (`AuthKey_<ID>.p8` for App Store Connect keys, `SubscriptionKey_<ID>.p8` for in-app
/// purchase keys). Apple's file name is a hint only; the key id and Apple's answer rule.
pub(crate) fn file_name_hints(kc: &KeyConfig) -> Vec<String> {
    let mut hints = Vec::new();
    if let Some((named_kind, id)) = key_file_name(kc) {
        let named_iap = named_kind == KeyKind::InAppPurchase;
        if named_iap != (kc.kind == KeyKind::InAppPurchase) {
            let kinds = if named_iap {
                "in-app-purchase"
            } else {
                "team or individual"
            };
            let file = match &kc.source {
                crate::config::KeySource::File(path) => path.display().to_string(),
                _ => String::new(),
            };
            hints.push(format!(
                "key `{}`: file {file} looks like a {kinds} key but kind = \"{}\"; Apple rejects a key used for the wrong API family",
                kc.name,
                kc.kind.id()
            ));
        }
        if id != kc.key_id {
            hints.push(format!(
                "key `{}`: file name says key id {id} but key_id = \"{}\"; a kid that doesn't match the signing key gets 401",
                kc.name, kc.key_id
            ));
        }
    }
    // Apple Business/School Manager key ids are UUIDs, checked when the config is read
    // (APPLE.md §9.6: the 10-character rule does not apply to them).
    if kc.kind != KeyKind::BusinessManager && !apple::is_plausible_key_id(&kc.key_id) {
        hints.push(format!(
            "key `{}`: key_id \"{}\" is not 10 upper-case letters/digits like Apple's",
            kc.name, kc.key_id
        ));
    }
    if let Some(iss) = &kc.issuer_id {
        if !apple::is_plausible_issuer_id(iss) {
            hints.push(format!(
                "key `{}`: issuer_id \"{iss}\" is not a UUID like Apple's",
                kc.name
            ));
        }
    }
    hints
}
