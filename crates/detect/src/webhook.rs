//! The signed webhook: every new case and every escalation is POSTed as
//! JSON to a SIEM or a pager, with `X-Custos-Signature: sha256=<hex>`, the
//! HMAC-SHA256 of the exact body under a shared secret.
use std::time::Duration;

use ring::hmac;
use serde_json::Value;

/// Header carrying the signature.
pub const SIGNATURE_HEADER: &str = "x-custos-signature";

/// A configured webhook.
#[derive(Clone)]
pub struct Webhook {
    url: String,
    key: hmac::Key,
    client: reqwest::Client,
}

/// `sha256=<hex HMAC-SHA256 of body>`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    format!(
        "sha256={}",
        custos_crypto::to_hex(hmac::sign(&key, body).as_ref())
    )
}

/// Check a signature header against a body, in constant time.
pub fn verify(secret: &[u8], body: &[u8], header: &str) -> bool {
    let Some(hex) = header.trim().strip_prefix("sha256=") else {
        return false;
    };
    let Some(tag) = from_hex(hex) else {
        return false;
    };
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    hmac::verify(&key, body, &tag).is_ok()
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl Webhook {
    pub fn new(url: String, secret: &[u8]) -> Webhook {
        Webhook {
            url,
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("an HTTP client"),
        }
    }

    /// Send in the background, retrying three times with backoff; never
    /// blocks the pipeline.
    pub fn send(&self, event: &'static str, payload: Value) {
        let this = self.clone();
        tokio::spawn(async move {
            let body = serde_json::to_vec(&payload).expect("webhook payloads serialize");
            let sig = format!(
                "sha256={}",
                custos_crypto::to_hex(hmac::sign(&this.key, &body).as_ref())
            );
            for attempt in 0..4u32 {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_secs(1 << (attempt - 1))).await;
                }
                let r = this
                    .client
                    .post(&this.url)
                    .header("content-type", "application/json")
                    .header(SIGNATURE_HEADER, &sig)
                    .header("x-custos-event", event)
                    .body(body.clone())
                    .send()
                    .await;
                match r {
                    Ok(resp) if resp.status().is_success() => return,
                    Ok(resp) => {
                        tracing::warn!(status = resp.status().as_u16(), "detection webhook refused")
                    }
                    Err(e) => tracing::warn!(error = %e, "detection webhook unreachable"),
                }
            }
            tracing::error!("detection webhook gave up after 4 attempts");
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_tampering_fails() {
        let s = sign(b"k", b"{\"a\":1}");
        assert!(verify(b"k", b"{\"a\":1}", &s));
        assert!(!verify(b"k", b"{\"a\":2}", &s));
        assert!(!verify(b"other", b"{\"a\":1}", &s));
        assert!(!verify(b"k", b"{\"a\":1}", "sha256=zz"));
        assert!(!verify(b"k", b"{\"a\":1}", "md5=00"));
    }
}
