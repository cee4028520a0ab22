//! `[clients.signing]` (DESIGN §15): what a client may have the proxy sign. Default deny: a
//! client without the table signs nothing, whatever its `allow` rules say; every list is an
//! allow list. The whole request is checked before anything is signed, and a refusal names
//! the rule and the value that broke it (403 `PROXY_FORBIDDEN`).

use std::fmt;

use crate::client::glob_match;
use crate::config::SigningPolicy;

use super::{Ask, Kind};

/// The rule a request broke, and the value that broke it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    /// The rule as the config spells it (`signing.products`).
    pub rule: &'static str,
    /// What broke it, for the client and the operator (never a signature or a secret).
    pub value: String,
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} does not allow {}", self.rule, self.value)
    }
}

fn denied(rule: &'static str, value: String) -> Result<(), Denied> {
    Err(Denied { rule, value })
}

/// Checks `ask` against the client's policy (`None`: the client has no `[clients.signing]`).
pub fn check(policy: Option<&SigningPolicy>, ask: &Ask) -> Result<(), Denied> {
    let Some(policy) = policy else {
        return denied(
            "signing",
            "any signature: the client has no [clients.signing] table".to_string(),
        );
    };
    let products = |id: &str| policy.products.iter().any(|g| glob_match(g, id));
    if let Some(product) = &ask.product_id {
        if !products(product) {
            return denied("signing.products", format!("product `{product}`"));
        }
    }
    if let Some(offer) = &ask.offer_id {
        if !policy.offers.iter().any(|g| glob_match(g, offer)) {
            return denied("signing.offers", format!("offer `{offer}`"));
        }
    }
    if ask.kind == Kind::IntroductoryOfferEligibility
        && ask.allow_introductory_offer == Some(true)
        && !policy.grant_introductory_offer
    {
        return denied(
            "signing.grant_introductory_offer",
            "allow_introductory_offer = true".to_string(),
        );
    }
    if let Some(commerce) = &ask.commerce {
        if !policy.operations.contains(&commerce.operation) {
            return denied(
                "signing.operations",
                format!("operation `{}`", commerce.operation),
            );
        }
        for (path, sku) in &commerce.skus {
            if !products(sku) {
                return denied("signing.products", format!("SKU `{sku}` at {path}"));
            }
        }
        if let Some(allowed) = &policy.currencies {
            for (path, currency) in &commerce.currencies {
                if !allowed.contains(currency) {
                    return denied(
                        "signing.currencies",
                        format!("currency `{currency}` at {path}"),
                    );
                }
            }
        }
        // Validation makes `max_price` required with `operations`; were it ever absent,
        // no price passes.
        let max = policy.max_price.unwrap_or(-1);
        for (path, price) in &commerce.prices {
            if *price > max {
                return denied(
                    "signing.max_price",
                    format!("price {price} at {path} (the most this client may sign is {max})"),
                );
            }
        }
    }
    Ok(())
}
