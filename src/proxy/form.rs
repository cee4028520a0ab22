//! Sign in with Apple (DESIGN §18): the `client_secret` goes in the form body of
//! `/auth/token`, `/auth/revoke` and `/auth/oauth2/v2/token`. The proxy reads the form
//! (bounded: 64 KiB, `application/x-www-form-urlencoded`, uncompressed), lets its
//! `client_id` pick the key among the keys' `client_ids`, replaces any `client_secret` the
//! client sent with one it signs, keeps every other field byte for byte and in order, and
//! sends the new form with its own `Content-Length`. The only requests the proxy buffers.
//! Apple's `invalid_client` comes back with a diagnosis.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::apple::{self, Api};
use crate::forward::{self, ProxyBody};
use crate::token::{self, Token};

use super::admit::Admitted;
use super::attempt::{Tally, Upstream};
use super::body::{self, Peeked};
use super::mint::Freshness;
use super::{Exchange, Proxy, Refusal, X_PROXY_DIAGNOSIS};

/// The diagnosis of Apple's `invalid_client` to a form the proxy signed.
pub(crate) const SIGN_IN_INVALID_CLIENT: &str = "SIGN_IN_INVALID_CLIENT";

/// A form split for rewriting: its raw fields, the one `client_id`, where the secret goes.
/// `Debug` shows the client id and how many fields, never a field: they hold the user's
/// authorization code or refresh token.
#[derive(PartialEq, Eq)]
pub(crate) struct Form<'a> {
    /// Every field but `client_secret`, raw (still encoded), in order.
    kept: Vec<&'a [u8]>,
    /// Where the `client_secret` goes: where the client put its first one, else the end.
    secret_at: usize,
    /// The decoded `client_id`.
    pub client_id: String,
}

/// Splits `form`; `Err` says what makes it unusable (no `client_id`, two of them, bad
/// encoding).
pub(crate) fn parse(form: &[u8]) -> Result<Form<'_>, String> {
    let mut kept = Vec::new();
    let mut secret_at = None;
    let mut client_id = None;
    if !form.is_empty() {
        for field in form.split(|b| *b == b'&') {
            let (name, value) = match field.iter().position(|b| *b == b'=') {
                Some(i) => (&field[..i], &field[i + 1..]),
                None => (field, &b""[..]),
            };
            let name = decode(name).ok_or("a field name is not valid percent-encoded UTF-8")?;
            match name.as_str() {
                "client_secret" => {
                    secret_at.get_or_insert(kept.len());
                }
                "client_id" => {
                    let value =
                        decode(value).ok_or("client_id is not valid percent-encoded UTF-8")?;
                    if client_id.replace(value).is_some() {
                        return Err("the form has more than one client_id".into());
                    }
                    kept.push(field);
                }
                _ => kept.push(field),
            }
        }
    }
    let client_id = client_id
        .filter(|id| !id.is_empty())
        .ok_or("the form has no client_id (the Services ID or App ID the client_secret is for)")?;
    Ok(Form {
        secret_at: secret_at.unwrap_or(kept.len()),
        kept,
        client_id,
    })
}

impl std::fmt::Debug for Form<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Form")
            .field("client_id", &self.client_id)
            .field("fields", &self.kept.len())
            .finish_non_exhaustive()
    }
}

impl Form<'_> {
    /// The form with `client_secret=<secret>` in place of the client's.
    pub(crate) fn with_secret(&self, secret: &str) -> Vec<u8> {
        let field = format!("client_secret={}", crate::exchange::form_encode(secret));
        let mut fields: Vec<&[u8]> = self.kept.clone();
        fields.insert(self.secret_at, field.as_bytes());
        fields.join(&b'&')
    }
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte.
/// The `+` goes first, so an encoded `%2B` stays a plus; the strict percent-decoding is
/// the path check's.
fn decode(raw: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(raw).ok()?.replace('+', " ");
    String::from_utf8(crate::route::percent_decode(&text)?.into_owned()).ok()
}

/// A client id as the proxy repeats it: printable ASCII, at most 100 bytes.
fn shown(id: &str) -> String {
    id.chars()
        .filter(char::is_ascii_graphic)
        .take(100)
        .collect()
}

impl Proxy {
    /// A Sign in with Apple token request: the form rewritten with the proxy's
    /// `client_secret` and sent; Apple's answer streamed back, diagnosed on `invalid_client`.
    pub(super) async fn sign_in(
        &self,
        admitted: &Admitted<'_>,
        parts: &Parts,
        body: Incoming,
        request_id: &str,
        ex: &mut Exchange,
    ) -> Result<Response<ProxyBody>, Refusal> {
        let bad = |what: &str| Refusal::BadForm { what: what.into() };
        let media = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|v| v.trim().to_ascii_lowercase());
        if media.as_deref() != Some("application/x-www-form-urlencoded") {
            return Err(bad("Sign in with Apple's token endpoints take an application/x-www-form-urlencoded form; send Content-Type: application/x-www-form-urlencoded"));
        }
        // Every field goes in the form, which the proxy controls; a query could carry a
        // second client_secret past it.
        if parts.uri.query().is_some() {
            return Err(bad("Sign in with Apple's token endpoints take no query string: send every field in the form body"));
        }
        if parts.headers.contains_key(header::CONTENT_ENCODING) {
            return Err(bad("the proxy rewrites the form to add the client_secret and cannot rewrite a compressed one: send it without Content-Encoding"));
        }
        let raw = self
            .read_small_body(parts, body, apple::SIGN_IN_MAX_FORM as u64, ex)
            .await?;
        let form = parse(&raw).map_err(|what| Refusal::BadForm { what })?;
        let key = self.sign_in_key(admitted, &form.client_id)?;
        let request = token::Request {
            key,
            api: Api::SignInWithApple,
            method: parts.method.as_str(),
            path: admitted.route.path,
            query: None,
            bundle_id: None,
            subject: Some(&form.client_id),
        };
        let token = self.mint(&request, Freshness::Cached, ex)?;
        let rewritten = Bytes::from(form.with_secret(token.jwt()));

        let mut headers = parts.headers.clone();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(rewritten.len()));
        let url = admitted.route.url(None);
        let up = Upstream {
            request_id,
            method: &parts.method,
            url: &url,
            client_headers: &headers,
            route: &admitted.route,
            key,
        };
        let sent = Instant::now();
        ex.sent = true;
        let response = self
            .send(
                &up,
                Some(forward::boxed(Full::new(rewritten))),
                &token,
                Tally::bodyless(&mut ex.connect_retries),
            )
            .await?;
        self.note_upstream(ex, &response, &token, sent);
        let status = response.status();
        if status != StatusCode::BAD_REQUEST && status != StatusCode::UNAUTHORIZED {
            if status.is_success() {
                self.key_worked(&token.key_name);
            }
            return Ok(body::stream_back(response, None));
        }
        Ok(self
            .diagnosed_sign_in(response, &token, &form.client_id, ex)
            .await)
    }

    /// The key whose `client_ids` hold the form's `client_id` (and that the client may use).
    fn sign_in_key(&self, admitted: &Admitted<'_>, client_id: &str) -> Result<&str, Refusal> {
        let key = self
            .config
            .keys
            .iter()
            .find(|k| {
                k.apis.contains(&Api::SignInWithApple) && k.client_ids.iter().any(|c| c == client_id)
            })
            .ok_or_else(|| Refusal::Forbidden {
                detail: format!(
                    "client_id `{}` is not one of the Sign in with Apple client ids the proxy signs for (a key's client_ids)",
                    shown(client_id)
                ),
            })?;
        if let Some(pinned) = self.clients.pinned_key(&admitted.who) {
            if pinned != key.name {
                return Err(Refusal::Forbidden {
                    detail: format!(
                        "client `{}` is pinned to key `{pinned}`, which does not sign for client_id `{}`",
                        admitted.who.name,
                        shown(client_id)
                    ),
                });
            }
        }
        Ok(&key.name)
    }

    /// Apple's 400/401 to a signed form: `invalid_client` gets `X-Proxy-Diagnosis` and a
    /// `diagnostics` object naming what the secret said; anything else goes back as is.
    async fn diagnosed_sign_in(
        &self,
        response: Response<Incoming>,
        token: &Arc<Token>,
        client_id: &str,
        ex: &mut Exchange,
    ) -> Response<ProxyBody> {
        let (mut head, body) = response.into_parts();
        let raw = match body::peek(body).await {
            Peeked::Whole(bytes) => bytes,
            other => return body::reassemble(head, other),
        };
        let mut json: Option<serde_json::Map<String, serde_json::Value>> =
            body::decoded(&head.headers, &raw).and_then(|b| serde_json::from_slice(&b).ok());
        let Some(object) = json
            .as_mut()
            .filter(|j| j.get("error").and_then(|e| e.as_str()) == Some("invalid_client"))
        else {
            return body::reassemble(head, Peeked::Whole(raw));
        };
        let key = self.minter.key_config(&token.key_name);
        let proxy_now = token::unix_secs(SystemTime::now());
        let apple_date = super::attempt::apple_date(&head.headers).map(token::unix_secs);
        let c = &token.claims;
        tracing::warn!(request_id = %ex.id, key = %token.key_name, client_id = %shown(client_id), diagnosis = SIGN_IN_INVALID_CLIENT, "Sign in with Apple refused the client_secret");
        object.insert(
            "diagnostics".into(),
            serde_json::json!({
                "request_id": &*ex.id,
                "api": Api::SignInWithApple.id(),
                "key": {"name": token.key_name, "key_id": token.key_id, "team_id": key.and_then(|k| k.team_id.as_deref())},
                "client_secret": {"iss": c.iss, "sub": c.sub, "aud": c.aud, "iat": c.iat, "exp": c.exp},
                "clock": {
                    "proxy": crate::rfc3339(proxy_now),
                    "apple": apple_date.map(crate::rfc3339),
                    "skew_s": apple_date.map(|a| a - proxy_now),
                },
                "likely_causes": [
                    "Apple refused the client_secret or the code: check that the key serves Sign in with Apple for this client id (Certificates, Identifiers & Profiles → Keys → Sign in with Apple → Configure, the primary App ID), that team_id and key_id are this key's, and that client_id is the Services ID (web) or bundle id (app) exactly, case-sensitive",
                    "an authorization code or refresh token issued to another client_id, already used, or older than 5 minutes is also answered invalid_client/invalid_grant",
                    "Apple measures the secret's lifetime on its own clock: a host clock far off makes iat look future or exp past",
                ],
            }),
        );
        body::rewritten_as_json(&mut head);
        forward::clean_response_headers(&mut head.headers);
        head.headers.insert(
            X_PROXY_DIAGNOSIS,
            HeaderValue::from_static(SIGN_IN_INVALID_CLIENT),
        );
        ex.diagnosis = Some(SIGN_IN_INVALID_CLIENT);
        let body = Bytes::from(serde_json::Value::Object(json.unwrap_or_default()).to_string());
        Response::from_parts(head, forward::boxed(Full::new(body)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_replaces_the_clients_and_every_other_field_stays_byte_for_byte() {
        let form = b"grant_type=authorization_code&code=c%2Fd+e&client_secret=old&client_id=com.example.web&redirect_uri=https%3A%2F%2Fx&client_secret=again";
        let parsed = parse(form).unwrap();
        assert_eq!(parsed.client_id, "com.example.web");
        assert_eq!(
            String::from_utf8(parsed.with_secret("h.p.s")).unwrap(),
            "grant_type=authorization_code&code=c%2Fd+e&client_secret=h.p.s&client_id=com.example.web&redirect_uri=https%3A%2F%2Fx"
        );
        // No secret sent: it goes at the end.
        let parsed = parse(b"client_id=a%2Eb&token=t&token_type_hint=refresh_token").unwrap();
        assert_eq!(parsed.client_id, "a.b");
        assert_eq!(
            parsed.with_secret("j"),
            b"client_id=a%2Eb&token=t&token_type_hint=refresh_token&client_secret=j".to_vec()
        );
        // An encoded field name is still the field.
        let parsed = parse(b"client%5Fid=x&client%5Fsecret=s").unwrap();
        assert_eq!(
            parsed.with_secret("j"),
            b"client%5Fid=x&client_secret=j".to_vec()
        );
    }

    #[test]
    fn debug_never_shows_a_field() {
        let parsed = parse(b"code=secret-code&client_id=com.example.web&refresh_token=rt").unwrap();
        let shown = format!("{parsed:?}");
        assert!(
            !shown.contains("secret-code") && !shown.contains("rt\""),
            "{shown}"
        );
        assert!(
            shown.contains("com.example.web") && shown.contains("fields: 3"),
            "{shown}"
        );
    }

    #[test]
    fn unusable_forms_say_why() {
        assert!(parse(b"").unwrap_err().contains("no client_id"));
        assert!(parse(b"code=1&client_id=")
            .unwrap_err()
            .contains("no client_id"));
        assert!(parse(b"client_id=a&client_id=b")
            .unwrap_err()
            .contains("more than one"));
        assert!(parse(b"client_id=%ZZ")
            .unwrap_err()
            .contains("percent-encoded"));
        assert!(parse(b"client_id=%FF")
            .unwrap_err()
            .contains("percent-encoded"));
        assert!(parse(b"client_id=%+F")
            .unwrap_err()
            .contains("percent-encoded"));
    }
}
