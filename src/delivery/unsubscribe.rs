//! Unsubscribe links that do not reveal whom they are for. A token is the
//! client id encrypted and authenticated under the key (a deterministic
//! SIV-style construction on HMAC-SHA256 alone: the tag is a MAC of the id,
//! and the keystream that hides the id is derived from the tag), so nudge can
//! honour a click without a lookup table, refuse a forged or altered link,
//! and a forwarded mail or a proxy log shows no client id. The key comes from
//! `mail.unsubscribe_secret`, or is made once and kept in the database, so
//! every instance signs alike.
//!
//! Links of the first format (`hex(id).hex(tag)`, readable) that went out
//! before are still honoured; only new mails carry the opaque form.

use crate::domain::event::ClientId;
use crate::store::{Admin, AnyStore, StoreError};
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Signs and checks unsubscribe tokens.
pub struct Signer {
    key: Vec<u8>,
}

/// How much of the MAC a token carries: 128 bits.
const MAC_BYTES: usize = 16;

/// An opaque token starts with this (a legacy one is hex digits and a dot).
const OPAQUE_PREFIX: &str = "u";

/// The hidden id is padded to a multiple of this many bytes, so a token
/// tells its id's length only roughly.
const PAD: usize = 16;

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

    /// `u` + hex(tag || id padded to 16 bytes, XORed with a keystream
    /// derived from the tag): the same for every mail to one client (so the
    /// event a click makes is the same however often it is clicked), with
    /// nothing of the id readable but a rough length.
    pub fn token(&self, client: &ClientId) -> String {
        let id = client.as_str().as_bytes();
        let tag = self.siv(id);
        let mut body = id.to_vec();
        // Zero padding: a client id never contains NUL (no control characters).
        body.resize(id.len().div_ceil(PAD) * PAD, 0);
        self.xor_keystream(&tag, &mut body);
        let mut out = tag.to_vec();
        out.extend_from_slice(&body);
        format!("{OPAQUE_PREFIX}{}", hex::encode(out))
    }

    /// The client a token was made for, if it is genuine (either format).
    pub fn verify(&self, token: &str) -> Option<ClientId> {
        match token.strip_prefix(OPAQUE_PREFIX) {
            Some(hexed) => self.verify_opaque(hexed),
            None => self.verify_legacy(token),
        }
    }

    fn verify_opaque(&self, hexed: &str) -> Option<ClientId> {
        let raw = hex::decode(hexed).ok()?;
        if raw.len() <= MAC_BYTES || !(raw.len() - MAC_BYTES).is_multiple_of(PAD) {
            return None;
        }
        let (tag, body) = raw.split_at(MAC_BYTES);
        let mut body = body.to_vec();
        self.xor_keystream(tag, &mut body);
        while body.last() == Some(&0) {
            body.pop();
        }
        // Constant-time comparison of the tag over the id it hid.
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(b"unsubscribe-siv\0");
        mac.update(&body);
        mac.verify_truncated_left(tag).ok()?;
        ClientId::parse(String::from_utf8(body).ok()?).ok()
    }

    /// The synthetic IV: a MAC of the id, which also authenticates it.
    fn siv(&self, id: &[u8]) -> [u8; MAC_BYTES] {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(b"unsubscribe-siv\0");
        mac.update(id);
        let mut out = [0u8; MAC_BYTES];
        out.copy_from_slice(&mac.finalize().into_bytes()[..MAC_BYTES]);
        out
    }

    /// XORs `body` with HMAC(key, "unsubscribe-stream" || tag || block number).
    fn xor_keystream(&self, tag: &[u8], body: &mut [u8]) {
        for (n, chunk) in body.chunks_mut(32).enumerate() {
            let mut mac =
                HmacSha256::new_from_slice(&self.key).expect("HMAC takes keys of any length");
            mac.update(b"unsubscribe-stream\0");
            mac.update(tag);
            mac.update(&(n as u32).to_be_bytes());
            let block = mac.finalize().into_bytes();
            for (b, k) in chunk.iter_mut().zip(block.iter()) {
                *b ^= k;
            }
        }
    }

    /// The first format, `hex(client id) . hex(first 16 bytes of the MAC)`,
    /// of links in mails sent before the opaque one.
    #[cfg(test)]
    fn legacy_token(&self, client: &ClientId) -> String {
        let tag = self.mac(client.as_str()).finalize().into_bytes();
        format!(
            "{}.{}",
            hex::encode(client.as_str()),
            hex::encode(&tag[..MAC_BYTES])
        )
    }

    fn verify_legacy(&self, token: &str) -> Option<ClientId> {
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

    /// A MAC of `msg` for another purpose than unsubscribing (`domain`
    /// keeps the purposes apart): the live feed's tickets, which every
    /// instance must be able to check, as it can these links.
    pub fn tag(&self, domain: &[u8], msg: &[u8]) -> [u8; MAC_BYTES] {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(domain);
        mac.update(b"\0");
        mac.update(msg);
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; MAC_BYTES];
        out.copy_from_slice(&full[..MAC_BYTES]);
        out
    }

    /// Checks a [`Signer::tag`] in constant time.
    pub fn verify_tag(&self, domain: &[u8], msg: &[u8], tag: &[u8]) -> bool {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(domain);
        mac.update(b"\0");
        mac.update(msg);
        tag.len() == MAC_BYTES && mac.verify_truncated_left(tag).is_ok()
    }

    pub fn url(&self, public_url: &str, client: &ClientId) -> String {
        format!(
            "{}/unsubscribe/{}",
            public_url.trim_end_matches('/'),
            self.token(client)
        )
    }
}

/// The id of the `unsubscribed` event a click on a link makes: the same for
/// every click on the same link, so the stream's dedupe and the event log's
/// primary key keep one event however often it is clicked (an unsubscribe is
/// never undone, so a later click has nothing to add), and short enough
/// (`unsubscribe-` and 40 hex digits) for any client id the contract allows.
pub fn event_id(client: &ClientId, token: &str) -> String {
    use sha2::Digest;
    let mut h = Sha256::new();
    h.update(b"unsubscribe-event\0");
    h.update(client.as_str().as_bytes());
    h.update(b"\0");
    h.update(token.as_bytes());
    let mut hex = hex::encode(h.finalize());
    hex.truncate(40);
    format!("unsubscribe-{hex}")
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
        // Nothing of the id shows, in any encoding a reader might try.
        assert!(
            !t.contains("ana") && !t.contains(&hex::encode("ana")),
            "{t}"
        );
        // Another client's tag with ana's body, and the reverse.
        let b = s.token(&ClientId::parse("bob").unwrap());
        assert_eq!(s.verify(&format!("{}{}", &b[..33], &t[33..])), None);
        assert_eq!(s.verify(&format!("{}{}", &t[..33], &b[33..])), None);
        // A flipped tag character, a cut tag, garbage.
        let mut bad = t.clone();
        let last = bad.pop().unwrap();
        bad.push(if last == '0' { '1' } else { '0' });
        assert_eq!(s.verify(&bad), None);
        assert_eq!(s.verify(&t[..t.len() - 2]), None);
        assert_eq!(s.verify("nonsense"), None);
        // Another key.
        assert_eq!(Signer::new("another key entirely").verify(&t), None);
        // Links of the first, readable format keep working.
        let legacy = s.legacy_token(&ana);
        assert_eq!(s.verify(&legacy), Some(ana.clone()));
        let (_, tag) = legacy.split_once('.').unwrap();
        assert_eq!(s.verify(&format!("{}.{tag}", hex::encode("bob"))), None);
        // Long and non-ASCII ids round-trip.
        for id in ["é".repeat(128), "a & b c".into(), "x".repeat(16)] {
            let c = ClientId::parse(id).unwrap();
            assert_eq!(s.verify(&s.token(&c)), Some(c));
        }
        assert_eq!(
            s.url("https://shop.example/nudge/", &ana),
            format!("https://shop.example/nudge/unsubscribe/{t}")
        );
    }

    #[test]
    fn event_ids_fit_the_contract_for_the_longest_ids_and_repeat_per_link() {
        let s = Signer::new("a key of some length");
        let long = ClientId::parse("é".repeat(128)).unwrap();
        let t = s.token(&long);
        let id = event_id(&long, &t);
        assert!(
            crate::domain::event::EventId::parse(id.clone()).is_ok(),
            "{id}"
        );
        assert_eq!(id.chars().count(), 52);
        assert_eq!(event_id(&long, &t), id);
        let ana = ClientId::parse("ana").unwrap();
        assert_ne!(event_id(&ana, &s.token(&ana)), id);
    }

    #[test]
    fn tags_are_kept_apart_by_domain_and_key() {
        let s = Signer::new("a key of some length");
        let t = s.tag(b"live-ticket", b"body");
        assert!(s.verify_tag(b"live-ticket", b"body", &t));
        assert!(!s.verify_tag(b"unsubscribe", b"body", &t));
        assert!(!s.verify_tag(b"live-ticket", b"bodY", &t));
        assert!(!s.verify_tag(b"live-ticket", b"body", &t[..8]));
        assert!(!Signer::new("another key entirely").verify_tag(b"live-ticket", b"body", &t));
    }
}
