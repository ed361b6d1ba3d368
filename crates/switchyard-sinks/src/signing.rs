//! Standard Webhooks signatures (<https://www.standardwebhooks.com/>).
//!
//! The signed content is `{webhook-id}.{webhook-timestamp}.{body}`, signed with
//! HMAC-SHA256 under the base64-decoded secret (after its `whsec_` prefix). The
//! `webhook-signature` header carries one `v1,<base64>` entry per secret, separated by
//! spaces, so receivers accept the message while secrets rotate.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretBox, SecretString};
use sha2::Sha256;

pub const WEBHOOK_ID: &str = "webhook-id";
pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";

/// Prefix of Standard Webhooks secrets.
const SECRET_PREFIX: &str = "whsec_";

/// A secret that is not usable for signing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("secret {index} is not valid base64 after its whsec_ prefix")]
    Base64 { index: usize },
    #[error("secret {index} is empty")]
    Empty { index: usize },
}

/// The decoded signing keys of one sink.
pub struct Signer {
    keys: Vec<SecretBox<Vec<u8>>>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({} keys, redacted)", self.keys.len())
    }
}

impl Signer {
    /// Decodes `whsec_<base64>` secrets; a secret without the prefix is taken as base64 too.
    pub fn new(secrets: &[SecretString]) -> Result<Self, SecretError> {
        let mut keys = Vec::with_capacity(secrets.len());
        for (index, secret) in secrets.iter().enumerate() {
            let text = secret.expose_secret();
            let encoded = text.strip_prefix(SECRET_PREFIX).unwrap_or(text);
            let key = STANDARD
                .decode(encoded)
                .map_err(|_| SecretError::Base64 { index })?;
            if key.is_empty() {
                return Err(SecretError::Empty { index });
            }
            keys.push(SecretBox::new(Box::new(key)));
        }
        Ok(Self { keys })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Returns the `webhook-signature` header value for one message.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        self.keys
            .iter()
            .map(|key| {
                format!(
                    "v1,{}",
                    STANDARD.encode(mac(key.expose_secret(), id, timestamp, body))
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Reports whether any `v1` entry of `signature_header` matches any key.
    pub fn verify(&self, id: &str, timestamp: i64, body: &[u8], signature_header: &str) -> bool {
        let candidates: Vec<Vec<u8>> = signature_header
            .split(' ')
            .filter_map(|entry| entry.strip_prefix("v1,"))
            .filter_map(|encoded| STANDARD.decode(encoded).ok())
            .collect();
        self.keys.iter().any(|key| {
            candidates.iter().any(|candidate| {
                let mut verifier = keyed(key.expose_secret());
                feed(&mut verifier, id, timestamp, body);
                verifier.verify_slice(candidate).is_ok()
            })
        })
    }
}

fn keyed(key: &[u8]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length (RFC 2104 hashes longer ones), so this cannot fail.
    <Hmac<Sha256> as KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!())
}

fn feed(mac: &mut Hmac<Sha256>, id: &str, timestamp: i64, body: &[u8]) {
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
}

fn mac(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> Vec<u8> {
    let mut mac = keyed(key);
    feed(&mut mac, id, timestamp, body);
    mac.finalize().into_bytes().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(text: &str) -> SecretString {
        SecretString::from(text.to_owned())
    }

    #[test]
    fn matches_standard_webhooks_reference_vector() {
        // Example from the Standard Webhooks specification's reference libraries.
        let signer =
            Signer::new(&[secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")]).expect("valid");
        let body = br#"{"test": 2432232314}"#;
        let signature = signer.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn signs_once_per_secret_and_verifies_each() {
        let old = secret("whsec_b2xkLXNlY3JldC1rZXktMTIzNDU2Nzg=");
        let new = secret("whsec_bmV3LXNlY3JldC1rZXktMTIzNDU2Nzg=");
        let both = Signer::new(&[old.clone(), new.clone()]).expect("valid");
        let header = both.sign("evt_1", 1_700_000_000, b"{}");
        assert_eq!(header.split(' ').count(), 2);

        let only_new = Signer::new(&[new]).expect("valid");
        assert!(only_new.verify("evt_1", 1_700_000_000, b"{}", &header));
        assert!(!only_new.verify("evt_1", 1_700_000_001, b"{}", &header));
        assert!(!only_new.verify("evt_1", 1_700_000_000, b"{ }", &header));
    }

    #[test]
    fn rejects_bad_base64() {
        assert_eq!(
            Signer::new(&[secret("whsec_not base64!")]).err(),
            Some(SecretError::Base64 { index: 0 })
        );
    }
}
