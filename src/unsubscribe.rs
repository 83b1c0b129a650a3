//! Signed unsubscribe links. A link carries the client id and an HMAC of it,
//! so nudge can honour a click without a lookup table and refuse a forged or
//! altered link. The key comes from `mail.unsubscribe_secret`, or is made once
//! and kept in the database, so every instance signs alike.

use crate::event::ClientId;
use crate::store::{AnyStore, Store, StoreError};
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Signs and checks unsubscribe tokens.
pub struct Signer {
    key: Vec<u8>,
}

/// How much of the MAC a token carries: 128 bits.
const MAC_BYTES: usize = 16;

impl Signer {
    pub fn new(key: impl Into<Vec<u8>>) -> Self {
        Self { key: key.into() }
    }

    /// The configured key, or the one kept in the database (made on first use).
    pub async fn load(configured: Option<&str>, store: &AnyStore) -> Result<Self, StoreError> {
        if let Some(k) = configured {
            return Ok(Self::new(k.as_bytes()));
        }
        let mut fresh = [0u8; 32];
        getrandom::fill(&mut fresh).map_err(|e| StoreError::Corrupt {
            context: "making an unsubscribe key",
            message: e.to_string(),
        })?;
        let key = store
            .meta_get_or_init("unsubscribe_secret", &hex::encode(fresh))
            .await?;
        Ok(Self::new(key.into_bytes()))
    }

    fn mac(&self, client: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(b"unsubscribe\0");
        mac.update(client.as_bytes());
        mac
    }

    /// `hex(client id) . hex(first 16 bytes of the MAC)`: URL-safe as it is.
    pub fn token(&self, client: &ClientId) -> String {
        let tag = self.mac(client.as_str()).finalize().into_bytes();
        format!(
            "{}.{}",
            hex::encode(client.as_str()),
            hex::encode(&tag[..MAC_BYTES])
        )
    }

    /// The client a token was made for, if it is genuine.
    pub fn verify(&self, token: &str) -> Option<ClientId> {
        let (id_hex, tag_hex) = token.split_once('.')?;
        let id = String::from_utf8(hex::decode(id_hex).ok()?).ok()?;
        let tag = hex::decode(tag_hex).ok()?;
        if tag.len() != MAC_BYTES {
            return None;
        }
        // Constant-time comparison of the truncated tag.
        self.mac(&id).verify_truncated_left(&tag).ok()?;
        ClientId::parse(id).ok()
    }

    pub fn url(&self, public_url: &str, client: &ClientId) -> String {
        format!(
            "{}/unsubscribe/{}",
            public_url.trim_end_matches('/'),
            self.token(client)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_and_tampering_is_refused() {
        let s = Signer::new("a key of some length");
        let ana = ClientId::parse("ana").unwrap();
        let t = s.token(&ana);
        assert_eq!(s.verify(&t), Some(ana.clone()));
        // Another client's id with ana's tag.
        let (_, tag) = t.split_once('.').unwrap();
        assert_eq!(s.verify(&format!("{}.{tag}", hex::encode("bob"))), None);
        // A flipped tag character, a cut tag, garbage.
        let mut bad = t.clone();
        let last = bad.pop().unwrap();
        bad.push(if last == '0' { '1' } else { '0' });
        assert_eq!(s.verify(&bad), None);
        assert_eq!(s.verify(&t[..t.len() - 2]), None);
        assert_eq!(s.verify("nonsense"), None);
        // Another key.
        assert_eq!(Signer::new("another key entirely").verify(&t), None);
        assert_eq!(
            s.url("https://shop.example/nudge/", &ana),
            format!("https://shop.example/nudge/unsubscribe/{t}")
        );
    }
}
