//! The signature endpoints' request bodies (DESIGN §15): JSON objects of at most
//! [`MAX_BODY`] bytes, every field checked for presence, type and form, and nothing else
//! accepted — a misspelt optional field (`transactionId` for `transaction_id`) would
//! otherwise be dropped silently from what is signed. Each failure names the field.
//!
//! An Advanced Commerce `request` is walked whole: every `SKU`, `price` and `currency`
//! anywhere in its tree is collected (names matched without regard to case, so `Price`
//! cannot slip past a bound), and the object is serialised once, from the checked tree, into
//! exactly the JSON that is signed.

use serde_json::{Map, Value};

use super::Kind;

/// The largest body a signature endpoint reads (DESIGN §15); larger ones get 413.
pub const MAX_BODY: usize = 64 * 1024;

/// Longest product id, offer id or bundle id accepted.
const MAX_ID: usize = 255;

/// A parsed, well-formed signature request. What the policy checks and what is signed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ask {
    pub kind: Kind,
    pub product_id: Option<String>,
    pub offer_id: Option<String>,
    /// Apple's numeric-string transaction id (or `appTransactionID`).
    pub transaction_id: Option<String>,
    pub allow_introductory_offer: Option<bool>,
    /// V1: a UUID (lower-cased) or the empty string.
    pub app_account_token: Option<String>,
    pub bundle_id: Option<String>,
    /// Advanced Commerce: the request object's JSON, exactly as signed.
    pub request_json: Option<String>,
    /// Advanced Commerce: what the policy bounds, found anywhere in the request.
    pub commerce: Option<Commerce>,
}

/// What an Advanced Commerce request asks for, each value with where it was found
/// (`request.item.SKU`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Commerce {
    pub operation: String,
    pub skus: Vec<(String, String)>,
    pub prices: Vec<(String, i64)>,
    pub currencies: Vec<(String, String)>,
}

impl Commerce {
    /// The highest `price` in the request.
    pub fn max_price(&self) -> Option<i64> {
        self.prices.iter().map(|(_, p)| *p).max()
    }
}

/// Why a body is not a well-formed request: 400 `PROXY_BAD_REQUEST` naming the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InputError {
    #[error("the body is not JSON ({0})")]
    NotJson(String),
    #[error("the body must be a JSON object")]
    NotObject,
    #[error("`{field}` is missing")]
    Missing { field: String },
    #[error("`{field}` must be {expected}")]
    WrongType {
        field: String,
        expected: &'static str,
    },
    #[error("`{field}` is not a field of this endpoint, which takes {takes}")]
    Unknown { field: String, takes: String },
    #[error("`{field}` {why}")]
    Invalid { field: String, why: &'static str },
}

impl InputError {
    /// The field the error names, if any.
    pub fn field(&self) -> Option<&str> {
        match self {
            InputError::NotJson(_) | InputError::NotObject => None,
            InputError::Missing { field }
            | InputError::WrongType { field, .. }
            | InputError::Unknown { field, .. }
            | InputError::Invalid { field, .. } => Some(field),
        }
    }
}

/// The fields each endpoint takes, required first.
fn fields(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::PromotionalOffer => &["product_id", "offer_id", "transaction_id", "bundle_id"],
        Kind::IntroductoryOfferEligibility => &[
            "product_id",
            "allow_introductory_offer",
            "transaction_id",
            "bundle_id",
        ],
        Kind::AdvancedCommerce => &["request", "bundle_id"],
        Kind::PromotionalOfferV1 => &["product_id", "offer_id", "app_account_token", "bundle_id"],
    }
}

/// Parses and checks one endpoint's body. Assumes the caller bounded it to [`MAX_BODY`].
pub fn parse(kind: Kind, body: &[u8]) -> Result<Ask, InputError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        // serde's message names line and column, never the input.
        InputError::NotJson(format!("line {}, column {}", e.line(), e.column()))
    })?;
    let Value::Object(map) = value else {
        return Err(InputError::NotObject);
    };
    let takes = fields(kind);
    if let Some(unknown) = map.keys().find(|k| !takes.contains(&k.as_str())) {
        return Err(InputError::Unknown {
            field: shown_name(unknown),
            takes: takes
                .iter()
                .map(|f| format!("`{f}`"))
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    let mut ask = Ask {
        kind,
        product_id: None,
        offer_id: None,
        transaction_id: None,
        allow_introductory_offer: None,
        app_account_token: None,
        bundle_id: id_field(&map, "bundle_id", false)?,
        request_json: None,
        commerce: None,
    };
    match kind {
        Kind::PromotionalOffer => {
            ask.product_id = id_field(&map, "product_id", true)?;
            ask.offer_id = id_field(&map, "offer_id", true)?;
            ask.transaction_id = transaction_id(&map, false)?;
        }
        Kind::IntroductoryOfferEligibility => {
            ask.product_id = id_field(&map, "product_id", true)?;
            ask.allow_introductory_offer = match present(&map, "allow_introductory_offer") {
                Some(Value::Bool(b)) => Some(*b),
                Some(_) => return Err(wrong("allow_introductory_offer", "true or false")),
                None => return Err(missing("allow_introductory_offer")),
            };
            ask.transaction_id = transaction_id(&map, true)?;
        }
        Kind::PromotionalOfferV1 => {
            ask.product_id = id_field(&map, "product_id", true)?;
            ask.offer_id = id_field(&map, "offer_id", true)?;
            ask.app_account_token = match present(&map, "app_account_token") {
                Some(Value::String(t)) if t.is_empty() || super::is_uuid(t) => {
                    Some(t.to_ascii_lowercase())
                }
                Some(Value::String(_)) => {
                    return Err(InputError::Invalid {
                        field: "app_account_token".into(),
                        why: "must be a UUID (8-4-4-4-12 hex digits) or the empty string",
                    })
                }
                Some(_) => return Err(wrong("app_account_token", "a string")),
                None => None,
            };
        }
        Kind::AdvancedCommerce => {
            let request = match present(&map, "request") {
                Some(Value::Object(request)) => request,
                Some(_) => return Err(wrong("request", "a JSON object")),
                None => return Err(missing("request")),
            };
            let operation = match request
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("operation"))
            {
                Some((k, Value::String(op))) if k == "operation" && !op.is_empty() => op.clone(),
                Some((k, Value::String(_))) if k == "operation" => {
                    return Err(InputError::Invalid {
                        field: "request.operation".into(),
                        why: "is empty",
                    })
                }
                Some((k, _)) if k == "operation" => {
                    return Err(wrong("request.operation", "a string"))
                }
                // `Operation`: Apple reads `operation`; a look-alike is refused, not ignored.
                Some(_) => {
                    return Err(InputError::Invalid {
                        field: "request.operation".into(),
                        why: "must be spelt `operation` (lower case)",
                    })
                }
                None => return Err(missing("request.operation")),
            };
            let mut commerce = Commerce {
                operation,
                ..Commerce::default()
            };
            let mut path = String::from("request");
            walk(request, &mut path, &mut commerce)?;
            ask.request_json =
                Some(serde_json::to_string(request).map_err(|_| InputError::NotObject)?);
            ask.commerce = Some(commerce);
        }
    }
    Ok(ask)
}

/// Collects every `SKU`, `price` and `currency` under `map` (at `path`).
fn walk(map: &Map<String, Value>, path: &mut String, out: &mut Commerce) -> Result<(), InputError> {
    for (name, value) in map {
        let len = path.len();
        path.push('.');
        path.push_str(&shown_name(name));
        if name.eq_ignore_ascii_case("sku") {
            match value {
                Value::String(sku) if !sku.is_empty() => out.skus.push((path.clone(), sku.clone())),
                Value::String(_) => return Err(invalid(path, "is empty")),
                _ => return Err(wrong(path, "a string")),
            }
        } else if name.eq_ignore_ascii_case("price") {
            let price = match value {
                Value::Number(n) => match (n.as_i64(), n.as_u64()) {
                    (Some(p), _) if p >= 0 => p,
                    (None, Some(_)) => i64::MAX,
                    _ => return Err(invalid(path, "must be a non-negative integer")),
                },
                _ => return Err(wrong(path, "a non-negative integer")),
            };
            out.prices.push((path.clone(), price));
        } else if name.eq_ignore_ascii_case("currency") {
            match value {
                Value::String(c) => out.currencies.push((path.clone(), c.clone())),
                _ => return Err(wrong(path, "a string")),
            }
        } else {
            walk_value(value, path, out)?;
        }
        path.truncate(len);
    }
    Ok(())
}

fn walk_value(value: &Value, path: &mut String, out: &mut Commerce) -> Result<(), InputError> {
    match value {
        Value::Object(map) => walk(map, path, out),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push('[');
                path.push_str(&i.to_string());
                path.push(']');
                walk_value(item, path, out)?;
                path.truncate(len);
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// A field's value, with `null` read as absent.
fn present<'a>(map: &'a Map<String, Value>, field: &str) -> Option<&'a Value> {
    map.get(field).filter(|v| !v.is_null())
}

/// A product, offer or bundle id: a non-empty string of at most [`MAX_ID`] bytes without
/// control characters or U+2063 (the V1 message's separator: a value carrying it could
/// shift the message's fields into one another).
fn id_field(
    map: &Map<String, Value>,
    field: &str,
    required: bool,
) -> Result<Option<String>, InputError> {
    match present(map, field) {
        Some(Value::String(s)) => {
            if s.is_empty() {
                Err(invalid(field, "is empty"))
            } else if s.len() > MAX_ID {
                Err(invalid(field, "is longer than 255 bytes"))
            } else if s
                .chars()
                .any(|c| c.is_control() || c == super::V1_SEPARATOR || c.is_whitespace())
            {
                Err(invalid(
                    field,
                    "contains white space, a control character or U+2063",
                ))
            } else {
                Ok(Some(s.clone()))
            }
        }
        Some(_) => Err(wrong(field, "a string")),
        None if required => Err(missing(field)),
        None => Ok(None),
    }
}

/// Apple's transaction id: a numeric string (not a UUID).
fn transaction_id(map: &Map<String, Value>, required: bool) -> Result<Option<String>, InputError> {
    const FIELD: &str = "transaction_id";
    match present(map, FIELD) {
        Some(Value::String(s))
            if !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_digit()) =>
        {
            Ok(Some(s.clone()))
        }
        Some(Value::String(_)) => Err(invalid(
            FIELD,
            "must be Apple's transaction id: a string of decimal digits, e.g. \"1000011859217\"",
        )),
        Some(_) => Err(wrong(FIELD, "a string of decimal digits")),
        None if required => Err(missing(FIELD)),
        None => Ok(None),
    }
}

/// A client's field name as an error may show it: names that look like identifiers as they
/// are, anything else (long, or odd characters) replaced.
fn shown_name(name: &str) -> String {
    let plain = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if plain {
        name.to_string()
    } else {
        "<field>".to_string()
    }
}

fn missing(field: &str) -> InputError {
    InputError::Missing {
        field: field.to_string(),
    }
}

fn wrong(field: &str, expected: &'static str) -> InputError {
    InputError::WrongType {
        field: field.to_string(),
        expected,
    }
}

fn invalid(field: &str, why: &'static str) -> InputError {
    InputError::Invalid {
        field: field.to_string(),
        why,
    }
}
