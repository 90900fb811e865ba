//! Sealing values at rest with ChaCha20-Poly1305 under the key the host app supplies.

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use crate::error::StoreError;

/// Layout of a sealed value: format byte, random nonce, ciphertext with its 16-byte tag.
const FORMAT_V1: u8 = 1;
pub const KEY_LEN: usize = 32;

pub struct Cipher {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl Cipher {
    pub fn new(key: &[u8]) -> Result<Self, StoreError> {
        if key.len() != KEY_LEN {
            return Err(StoreError::BadKeyLength(key.len()));
        }
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, key)
            .map_err(|_| StoreError::BadKeyLength(key.len()))?;
        Ok(Self {
            key: LessSafeKey::new(unbound),
            rng: SystemRandom::new(),
        })
    }

    /// Seal `plain`, binding it to `aad` (the storage key) so a value moved to another key
    /// fails to open. Random 96-bit nonces: a phone writes far fewer than 2^32 values per key.
    pub fn seal(&self, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, StoreError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| StoreError::Io("the system random generator failed".into()))?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + plain.len() + 16);
        out.push(FORMAT_V1);
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut body)
            .map_err(|_| StoreError::Io("sealing failed".into()))?;
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Open a sealed value; `None` if it does not authenticate under this key and `aad`.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < 1 + NONCE_LEN + 16 || sealed[0] != FORMAT_V1 {
            return None;
        }
        let nonce = Nonce::try_assume_unique_for_key(&sealed[1..1 + NONCE_LEN]).ok()?;
        let mut body = sealed[1 + NONCE_LEN..].to_vec();
        let plain = self.key.open_in_place(nonce, Aad::from(aad), &mut body).ok()?;
        Some(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_binding() {
        let c = Cipher::new(&[7; 32]).unwrap();
        let s = c.seal(b"k1", b"hello").unwrap();
        assert_eq!(c.open(b"k1", &s).unwrap(), b"hello");
        assert!(c.open(b"k2", &s).is_none(), "value moved to another key must not open");
        let other = Cipher::new(&[8; 32]).unwrap();
        assert!(other.open(b"k1", &s).is_none());
        let mut t = s.clone();
        *t.last_mut().unwrap() ^= 1;
        assert!(c.open(b"k1", &t).is_none());
        assert!(matches!(Cipher::new(&[0; 16]), Err(StoreError::BadKeyLength(16))));
    }
}
