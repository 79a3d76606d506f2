//! `webhook` functions: an HTTP POST of the envelope, signed per Standard Webhooks
//! (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256>` over
//! `id.timestamp.body` with the function's `whsec_` secret). Any 2xx answer is success.
//!
//! A 307 or 308 is followed with the same method, body and headers (a few hops, never from https
//! to http); any other redirect is a failure, since following it would turn the POST into a GET.
//! Only the first bytes of a response body are read: a body is never buffered whole, and the
//! function's timeout bounds the whole exchange, reading the body included.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use futures_util::future::BoxFuture;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{Delivery, FunctionError, Kind};
use crate::catalog::FunctionDef;

/// Redirects (307/308) followed for one POST.
const MAX_REDIRECTS: usize = 5;
/// Bytes of a response body read at most: enough for the error snippet and to drain a small
/// body so the connection is kept alive; past it the rest is not read and the connection is
/// dropped.
const BODY_READ_LIMIT: usize = 64 * 1024;
/// Bytes of a failed response's body kept for its error message.
const SNIPPET_BYTES: usize = 4096;
/// Characters of that body shown in the recorded error.
const SNIPPET_CHARS: usize = 200;

pub struct Webhook {
    http: reqwest::Client,
}

impl Webhook {
    pub fn new() -> anyhow::Result<Webhook> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("pgfire/", env!("CARGO_PKG_VERSION")))
            // Keep-alive connections per host, as many as runs may overlap (a function's
            // concurrency is at most 1000); each request goes out in one segment (no Nagle).
            .pool_max_idle_per_host(1024)
            .pool_idle_timeout(std::time::Duration::from_secs(60))
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::custom(redirect_policy))
            .build()?;
        Ok(Webhook { http })
    }
}

/// Follow only what keeps the request as it is (307, 308), a few hops, never to plain http from
/// https; stop at anything else, so the redirect itself is the answer (and a failure).
fn redirect_policy(attempt: reqwest::redirect::Attempt<'_>) -> reqwest::redirect::Action {
    let keeps_method = matches!(attempt.status().as_u16(), 307 | 308);
    let downgrade = attempt.url().scheme() != "https"
        && attempt
            .previous()
            .last()
            .is_some_and(|u| u.scheme() == "https");
    if !keeps_method || downgrade {
        attempt.stop()
    } else if attempt.previous().len() > MAX_REDIRECTS {
        attempt.error(format!("more than {MAX_REDIRECTS} redirects"))
    } else {
        attempt.follow()
    }
}

/// The `webhook-signature` header value for `body`, or an error for a malformed secret.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> Result<String, String> {
    let key = secret.strip_prefix("whsec_").unwrap_or(secret);
    let key = base64::engine::general_purpose::STANDARD
        .decode(key)
        .map_err(|e| format!("secret is not base64 after whsec_: {e}"))?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).map_err(|e| e.to_string())?;
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Ok(format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    ))
}

impl Kind for Webhook {
    fn post<'a>(
        &'a self,
        def: &'a FunctionDef,
        d: &'a Delivery<'a>,
    ) -> BoxFuture<'a, Result<(), FunctionError>> {
        Box::pin(async move {
            let url = def.target.as_deref().unwrap_or_default();
            let body = d.envelope().to_vec();
            let id = d.event.id.to_string();
            let ts = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            let mut req = self
                .http
                .post(url)
                .timeout(def.timeout)
                .header("content-type", "application/json")
                .header("webhook-id", &id)
                .header("webhook-timestamp", ts.to_string());
            // Every webhook function has a secret (generated when none is given); without one
            // its row is gone from pgfire.functions: never send an unsigned request.
            let secret = def.secret.as_deref().ok_or_else(|| {
                FunctionError::Failed(format!(
                    "webhook function {} has no signing secret any more (its row is gone from pgfire.functions)",
                    def.name
                ))
            })?;
            req = req.header(
                "webhook-signature",
                sign(secret, &id, ts, &body).map_err(FunctionError::Failed)?,
            );
            let resp = req.body(body).send().await.map_err(|e| {
                if e.is_timeout() {
                    FunctionError::Timeout(def.timeout.as_millis())
                } else {
                    FunctionError::Failed(format!("POST {}: {}", redact(url), error_chain(&e)))
                }
            })?;
            let status = resp.status();
            let location = status
                .is_redirection()
                .then(|| redirect_target(&resp))
                .flatten();
            let retry_after = matches!(status.as_u16(), 429 | 503)
                .then(|| {
                    resp.headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| parse_retry_after(v, SystemTime::now()))
                })
                .flatten();
            let body = read_head(resp, SNIPPET_BYTES).await.map_err(|e| {
                if e.is_timeout() {
                    FunctionError::Timeout(def.timeout.as_millis())
                } else {
                    FunctionError::Failed(format!(
                        "POST {} answered {status}, then reading its body failed: {}",
                        redact(url),
                        error_chain(&e)
                    ))
                }
            });
            if status.is_success() {
                // Accepted; only a body still arriving at the deadline makes it a timeout.
                return match body {
                    Err(e @ FunctionError::Timeout(_)) => Err(e),
                    _ => Ok(()),
                };
            }
            let body = body?;
            if status.is_redirection() {
                return Err(FunctionError::Failed(format!(
                    "POST {} answered {status}, a redirect to {}: not followed (pgfire follows only 307 and 308, at most {MAX_REDIRECTS} hops, never from https to http); set the function's target to the final URL",
                    redact(url),
                    location.as_deref().unwrap_or("no Location header")
                )));
            }
            let snippet: String = String::from_utf8_lossy(&body)
                .chars()
                .take(SNIPPET_CHARS)
                .collect();
            let message = format!("POST {} answered {status}: {snippet}", redact(url));
            match retry_after {
                Some(retry_after) => Err(FunctionError::Busy {
                    message,
                    retry_after,
                }),
                None => Err(FunctionError::Failed(message)),
            }
        })
    }
}

impl Webhook {
    /// A PRE run: the same signed POST of `body` (the envelope, id `id`); the answer is the body
    /// of a 2xx response (at most `BODY_READ_LIMIT` bytes), bounded by the function's timeout.
    pub async fn pre(
        &self,
        def: &FunctionDef,
        id: &str,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, FunctionError> {
        let url = def.target.as_deref().unwrap_or_default();
        let secret = def.secret.as_deref().ok_or_else(|| {
            FunctionError::Failed(format!(
                "webhook function {} has no signing secret",
                def.name
            ))
        })?;
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let signature = sign(secret, id, ts, &body).map_err(FunctionError::Failed)?;
        let timeout = || FunctionError::Timeout(def.timeout.as_millis());
        let exchange = async {
            let resp = self
                .http
                .post(url)
                .header("content-type", "application/json")
                .header("webhook-id", id)
                .header("webhook-timestamp", ts.to_string())
                .header("webhook-signature", signature)
                .body(body)
                .send()
                .await
                .map_err(|e| {
                    FunctionError::Failed(format!("POST {}: {}", redact(url), error_chain(&e)))
                })?;
            let status = resp.status();
            let body = read_head(resp, BODY_READ_LIMIT).await.map_err(|e| {
                FunctionError::Failed(format!("POST {}: {}", redact(url), error_chain(&e)))
            })?;
            if !status.is_success() {
                let snippet: String = String::from_utf8_lossy(&body)
                    .chars()
                    .take(SNIPPET_CHARS)
                    .collect();
                return Err(FunctionError::Failed(format!(
                    "POST {} answered {status}: {snippet}",
                    redact(url)
                )));
            }
            Ok(body)
        };
        tokio::time::timeout(def.timeout, exchange)
            .await
            .map_err(|_| timeout())?
    }
}

/// Read a response body up to `BODY_READ_LIMIT` bytes, keeping the first `keep`; the rest is
/// never read (dropping the response then closes its connection).
async fn read_head(mut resp: reqwest::Response, keep: usize) -> Result<Vec<u8>, reqwest::Error> {
    let mut kept = Vec::new();
    let mut read = 0usize;
    while read < BODY_READ_LIMIT {
        let Some(chunk) = resp.chunk().await? else {
            break;
        };
        read += chunk.len();
        let room = keep.saturating_sub(kept.len());
        kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }
    Ok(kept)
}

/// Where a redirect points, resolved against the request's URL and redacted.
fn redirect_target(resp: &reqwest::Response) -> Option<String> {
    let location = resp.headers().get(reqwest::header::LOCATION)?;
    let location = String::from_utf8_lossy(location.as_bytes());
    Some(match resp.url().join(&location) {
        Ok(u) => redact(u.as_str()),
        Err(_) => "<invalid Location header>".to_string(),
    })
}

/// The URL without its query string and credentials, for error messages.
fn redact(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_password(None);
            u.set_query(None);
            u.to_string()
        }
        Err(_) => "<invalid URL>".to_string(),
    }
}

/// A `Retry-After` value: seconds, or an HTTP date (RFC 9110), as a delay from `now` (at most a
/// day; a date in the past is no delay).
fn parse_retry_after(value: &str, now: SystemTime) -> Option<std::time::Duration> {
    let value = value.trim();
    let secs = match value.parse::<u64>() {
        Ok(s) => s,
        Err(_) => {
            let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
            let now = chrono::DateTime::<chrono::Utc>::from(now);
            (at.with_timezone(&chrono::Utc) - now).num_seconds().max(0) as u64
        }
    };
    Some(std::time::Duration::from_secs(secs.min(86_400)))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // The example from the Standard Webhooks specification.
        let sig = sign(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        )
        .unwrap();
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn bad_secret_is_an_error() {
        assert!(sign("whsec_!!!", "id", 1, b"{}").is_err());
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        use std::time::Duration;
        let now = UNIX_EPOCH + Duration::from_secs(1_445_412_480); // Wed, 21 Oct 2015 07:28:00 GMT
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(
            parse_retry_after("99999999", now),
            Some(Duration::from_secs(86_400))
        );
    }

    #[test]
    fn redaction() {
        assert_eq!(
            redact("https://u:p@h.example/x?token=1"),
            "https://u@h.example/x"
        );
        assert_eq!(redact("::"), "<invalid URL>");
    }
}
