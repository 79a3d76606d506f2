//! `webhook` functions: an HTTP POST of the envelope, signed per Standard Webhooks
//! (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256>` over
//! `id.timestamp.body` with the function's `whsec_` secret). Any 2xx answer is success.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use futures_util::future::BoxFuture;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{Delivery, FunctionError, Kind};
use crate::catalog::FunctionDef;

pub struct Webhook {
    http: reqwest::Client,
}

impl Webhook {
    pub fn new() -> anyhow::Result<Webhook> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("pgfire/", env!("CARGO_PKG_VERSION")))
            .pool_max_idle_per_host(8)
            .build()?;
        Ok(Webhook { http })
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
            if let Some(secret) = &def.secret {
                req = req.header(
                    "webhook-signature",
                    sign(secret, &id, ts, &body).map_err(FunctionError::Failed)?,
                );
            }
            let resp = req.body(body).send().await.map_err(|e| {
                if e.is_timeout() {
                    FunctionError::Timeout(def.timeout.as_millis())
                } else {
                    FunctionError::Failed(format!("POST {}: {}", redact(url), error_chain(&e)))
                }
            })?;
            let status = resp.status();
            if status.is_success() {
                return Ok(());
            }
            let text = resp.text().await.unwrap_or_default();
            let snippet: String = text.chars().take(200).collect();
            Err(FunctionError::Failed(format!(
                "POST {} answered {status}: {snippet}",
                redact(url)
            )))
        })
    }
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
    fn redaction() {
        assert_eq!(
            redact("https://u:p@h.example/x?token=1"),
            "https://u@h.example/x"
        );
        assert_eq!(redact("::"), "<invalid URL>");
    }
}
