//! Who may use the admin endpoint, checked on every request before any handler runs:
//!
//! * Without a token the endpoint listens on loopback only, and answers only requests whose
//!   `Host` is a loopback name or address (a page elsewhere cannot reach it by DNS rebinding).
//! * With a token (`--admin-token`, required on any other address) every request carries it:
//!   `Authorization: Bearer <token>`, or the cookie set by opening any page once with
//!   `?token=<token>` (answered with a redirect that drops it from the address).
//! * Every state-changing request (anything but GET and HEAD) must come from the dashboard
//!   itself: no cross-site `Origin` or `Sec-Fetch-Site`, and the per-process CSRF secret in
//!   form field `csrf` or header `x-csrf-token`.
//! * Every answer carries headers that forbid framing, sniffing, inline scripts and caching.

use std::net::{IpAddr, SocketAddr};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::html::{cookie, esc};
use super::Shared;

pub const TOKEN_COOKIE: &str = "pgfire_admin_token";
/// Largest body a state-changing request may have (forms are small).
const BODY_LIMIT: usize = 256 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExposureError {
    #[error("the admin endpoint would listen on {0}, which is not a loopback address: the dashboard changes pgfire's configuration, so set a token with --admin-token (or PGFIRE_ADMIN_TOKEN), or listen on 127.0.0.1")]
    TokenRequired(SocketAddr),
    #[error("--admin-token must be at least 16 characters of letters, digits and - _ . ~ + / = (for example: openssl rand -hex 24)")]
    WeakToken,
}

/// Refuse to expose the endpoint beyond loopback without a token, or with a weak one.
pub fn check_exposure(addr: SocketAddr, token: Option<&str>) -> Result<(), ExposureError> {
    match token {
        Some(t) if !valid_token(t) => Err(ExposureError::WeakToken),
        None if !addr.ip().is_loopback() => Err(ExposureError::TokenRequired(addr)),
        _ => Ok(()),
    }
}

fn valid_token(t: &str) -> bool {
    t.len() >= 16
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.~+/=".contains(&b))
}

/// 32 random bytes, hex: the CSRF secret of this process.
pub fn new_secret() -> std::io::Result<String> {
    use std::io::Read;
    let mut buf = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Equal, in time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `host` (a `Host` header: name or address, maybe a port) names this machine's
/// loopback.
fn loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn refuse(code: StatusCode, title: &str, text: &str) -> Response {
    let body = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t} · pgfire</title></head>\
         <body><main><h1>{t}</h1><p>{}</p></main></body></html>\n",
        esc(text),
        t = esc(title)
    );
    let mut resp = (
        code,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response();
    if code == StatusCode::UNAUTHORIZED {
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    resp
}

/// The token a request presents, and whether it came in the query string.
fn presented(headers: &HeaderMap, query: Option<&str>) -> (Option<String>, bool) {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        if let Some(t) = v.strip_prefix("Bearer ") {
            return (Some(t.trim().to_string()), false);
        }
    }
    if let Some(q) = query {
        let t = q
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == "token")
            .map(|(_, v)| v.to_string());
        if t.is_some() {
            return (t, true);
        }
    }
    (cookie(headers, TOKEN_COOKIE).map(str::to_string), false)
}

/// `query` without its `token` parameter.
fn without_token(query: &str) -> String {
    query
        .split('&')
        .filter(|kv| !kv.starts_with("token=") && !kv.is_empty())
        .collect::<Vec<_>>()
        .join("&")
}

pub async fn guard(State(d): State<Shared>, req: Request, next: Next) -> Response {
    let mut resp = check(&d, req, next).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

async fn check(d: &Shared, req: Request, next: Next) -> Response {
    let headers = req.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    match &d.state.token {
        None => {
            if !loopback_host(&host) {
                return refuse(
                    StatusCode::FORBIDDEN,
                    "Not a loopback address",
                    &format!("This admin endpoint has no token, so it answers only to loopback names (localhost, 127.0.0.1, [::1]), not to Host \"{host}\". Start pgfire with --admin-token to reach it by other names."),
                );
            }
        }
        Some(token) => {
            let (given, in_query) = presented(headers, req.uri().query());
            let ok = given
                .as_deref()
                .is_some_and(|g| same(g.as_bytes(), token.as_bytes()));
            if !ok {
                return refuse(
                    StatusCode::UNAUTHORIZED,
                    "Token required",
                    "This admin endpoint needs its token: open any page once with ?token=<token> (it is then kept in a cookie), or send Authorization: Bearer <token>.",
                );
            }
            if in_query && req.method() == Method::GET {
                let rest = without_token(req.uri().query().unwrap_or(""));
                let location = match rest.is_empty() {
                    true => req.uri().path().to_string(),
                    false => format!("{}?{rest}", req.uri().path()),
                };
                let mut resp = StatusCode::SEE_OTHER.into_response();
                if let (Ok(l), Ok(c)) = (
                    HeaderValue::from_str(&location),
                    HeaderValue::from_str(&format!(
                        "{TOKEN_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"
                    )),
                ) {
                    resp.headers_mut().insert(header::LOCATION, l);
                    resp.headers_mut().insert(header::SET_COOKIE, c);
                }
                return resp;
            }
        }
    }
    if req.method() == Method::GET || req.method() == Method::HEAD {
        return next.run(req).await;
    }
    // A state-changing request: from the dashboard's own pages only.
    let cross_site = headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|s| s != "same-origin" && s != "none");
    let foreign_origin = headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|o| {
            let o = o.trim_end_matches('/');
            o != format!("http://{host}") && o != format!("https://{host}")
        });
    if cross_site || foreign_origin {
        return refuse(
            StatusCode::FORBIDDEN,
            "Cross-site request refused",
            "This request came from another site. Changes can only be made from pgfire's own pages.",
        );
    }
    let header_secret = headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, BODY_LIMIT).await {
        Ok(b) => b,
        Err(_) => {
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Request too large",
                &format!("A request to the dashboard may carry at most {BODY_LIMIT} bytes."),
            )
        }
    };
    let form_secret = form_field(&bytes, "csrf");
    let given = header_secret.or(form_secret);
    if !given.is_some_and(|g| same(g.as_bytes(), d.csrf.as_bytes())) {
        return refuse(
            StatusCode::FORBIDDEN,
            "Form expired",
            "This form is out of date or did not come from pgfire's pages (its CSRF token does not match): reload the page and try again.",
        );
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// One field of a urlencoded body.
fn form_field(body: &[u8], name: &str) -> Option<String> {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body)
        .ok()?
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_needs_no_token_anything_else_does() {
        let lo: SocketAddr = "127.0.0.1:9187".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:9187".parse().unwrap();
        let v6: SocketAddr = "[::1]:9187".parse().unwrap();
        assert_eq!(check_exposure(lo, None), Ok(()));
        assert_eq!(check_exposure(v6, None), Ok(()));
        assert_eq!(
            check_exposure(any, None),
            Err(ExposureError::TokenRequired(any))
        );
        assert_eq!(
            check_exposure(any, Some("short")),
            Err(ExposureError::WeakToken)
        );
        assert_eq!(
            check_exposure(any, Some("has spaces and is long enough")),
            Err(ExposureError::WeakToken)
        );
        assert_eq!(check_exposure(any, Some("0123456789abcdef-token")), Ok(()));
    }

    #[test]
    fn host_names_of_loopback() {
        for h in [
            "localhost:9187",
            "127.0.0.1:1",
            "127.1.2.3",
            "[::1]:80",
            "LOCALHOST",
        ] {
            assert!(loopback_host(h), "{h}");
        }
        for h in [
            "evil.example:9187",
            "10.0.0.1:9187",
            "",
            "[::2]:1",
            "localhost.evil.example",
        ] {
            assert!(!loopback_host(h), "{h}");
        }
    }

    #[test]
    fn secrets_compare_and_forms_parse() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd") && !same(b"abc", b"ab"));
        assert_eq!(
            form_field(b"a=1&csrf=x%20y", "csrf").as_deref(),
            Some("x y")
        );
        assert_eq!(form_field(b"\xff\xfe", "csrf"), None);
        assert_eq!(without_token("token=abc&open=E"), "open=E");
        assert_eq!(new_secret().unwrap().len(), 64);
    }
}
