//! Join tokens in swarmkit's format: `SWMTKN-1-<digest of the root CA>-<secret>`.
//!
//! The digest (SHA-256 of the CA certificate's PEM, base 36, 50 digits) lets a joining node
//! check that the manager it reached is the cluster's, before it trusts anything it says; the
//! secret (16 random bytes, base 36, 25 digits) proves to the manager that the node was invited.

use std::fmt;
use std::str::FromStr;

use ring::digest::{digest, SHA256};
use ring::rand::{SecureRandom, SystemRandom};

use crate::Error;

const PREFIX: &str = "SWMTKN-1-";
const DIGEST_DIGITS: usize = 50;
const SECRET_DIGITS: usize = 25;
const ALPHABET: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";

#[derive(Clone, Copy, PartialEq, Eq)]
pub struct JoinToken {
    pub ca_digest: [u8; 32],
    pub secret: [u8; 16],
}

// Never print the secret by accident (a derived Debug would, in logs).
impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "JoinToken({PREFIX}{}-…)",
            encode(&self.ca_digest, DIGEST_DIGITS)
        )
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PREFIX}{}-{}",
            encode(&self.ca_digest, DIGEST_DIGITS),
            encode(&self.secret, SECRET_DIGITS)
        )
    }
}

impl FromStr for JoinToken {
    type Err = Error;

    fn from_str(s: &str) -> Result<JoinToken, Error> {
        let invalid = || {
            Error::Token(format!(
                "invalid join token {}: expected {PREFIX}<50 base-36 digits>-<25 base-36 digits>, as printed by `meshctl join-token worker`",
                // Short: escaped control characters weigh up to 6 bytes each.
                proto::excerpt_within(s, 24)
            ))
        };
        let rest = s.trim().strip_prefix(PREFIX).ok_or_else(invalid)?;
        let (digest, secret) = rest.split_once('-').ok_or_else(invalid)?;
        if digest.len() != DIGEST_DIGITS || secret.len() != SECRET_DIGITS {
            return Err(invalid());
        }
        Ok(JoinToken {
            ca_digest: decode(digest).ok_or_else(invalid)?,
            secret: decode(secret).ok_or_else(invalid)?,
        })
    }
}

impl JoinToken {
    /// A token for the CA whose certificate is `ca_pem`, with a fresh secret.
    pub fn generate(ca_pem: &str) -> Result<JoinToken, Error> {
        Ok(JoinToken {
            ca_digest: ca_digest(ca_pem),
            secret: random()?,
        })
    }

    /// Whether this token's secret is `secret`, in time independent of where they differ.
    pub fn secret_is(&self, secret: &[u8; 16]) -> bool {
        self.secret
            .iter()
            .zip(secret)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }

    /// Whether the token was made for the CA whose certificate is `ca_pem`.
    pub fn pins(&self, ca_pem: &str) -> bool {
        self.ca_digest == ca_digest(ca_pem)
    }
}

/// SHA-256 over the CA certificate bundle exactly as served.
pub fn ca_digest(ca_pem: &str) -> [u8; 32] {
    let d = digest(&SHA256, ca_pem.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

pub(crate) fn random<const N: usize>() -> Result<[u8; N], Error> {
    let mut out = [0u8; N];
    SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| Error::Random)?;
    Ok(out)
}

/// The big-endian number in `bytes`, in base 36, left-padded with zeros to `digits`.
fn encode(bytes: &[u8], digits: usize) -> String {
    let mut n = bytes.to_vec();
    let mut out = Vec::with_capacity(digits);
    while n.iter().any(|&b| b != 0) {
        // Long division of n by 36, keeping the remainder as the next digit.
        let mut rem = 0u32;
        for b in n.iter_mut() {
            let cur = (rem << 8) | u32::from(*b);
            *b = (cur / 36) as u8;
            rem = cur % 36;
        }
        out.push(ALPHABET[rem as usize]);
    }
    while out.len() < digits {
        out.push(b'0');
    }
    out.reverse();
    String::from_utf8(out).expect("base-36 digits are ASCII")
}

/// The inverse of [`encode`]; `None` for a non-digit or a number that does not fit in N bytes.
fn decode<const N: usize>(s: &str) -> Option<[u8; N]> {
    let mut n = [0u8; N];
    for c in s.bytes() {
        let d = ALPHABET.iter().position(|&a| a == c.to_ascii_lowercase())? as u32;
        // n = n * 36 + d
        let mut carry = d;
        for b in n.iter_mut().rev() {
            let cur = u32::from(*b) * 36 + carry;
            *b = cur as u8;
            carry = cur >> 8;
        }
        if carry != 0 {
            return None;
        }
    }
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_have_swarms_shape_and_read_back() {
        let t = JoinToken::generate("-----BEGIN CERTIFICATE-----\nabc\n").unwrap();
        let s = t.to_string();
        assert!(s.starts_with("SWMTKN-1-"), "{s}");
        let parts: Vec<&str> = s.split('-').collect();
        assert_eq!(parts.len(), 4, "{s}");
        assert_eq!(parts[2].len(), 50);
        assert_eq!(parts[3].len(), 25);
        assert!(s[9..]
            .bytes()
            .all(|c| c == b'-' || c.is_ascii_digit() || c.is_ascii_lowercase()));
        assert_eq!(s.parse::<JoinToken>().unwrap(), t);
        assert!(t.pins("-----BEGIN CERTIFICATE-----\nabc\n"));
        assert!(!t.pins("-----BEGIN CERTIFICATE-----\nabd\n"));
    }

    #[test]
    fn base36_is_exact_at_the_edges() {
        assert_eq!(encode(&[0u8; 16], 25), "0".repeat(25));
        assert_eq!(encode(&[0, 35], 3), "00z");
        assert_eq!(encode(&[0, 36], 3), "010");
        let max = [0xffu8; 32];
        let s = encode(&max, 50);
        assert_eq!(s.len(), 50);
        assert_eq!(decode::<32>(&s), Some(max));
        // One more than 2^128 - 1 does not fit in a secret.
        assert_eq!(decode::<16>("f5lxx1zz5pnorynqglhzmsp34"), None);
        assert_eq!(decode::<16>(&encode(&[0xff; 16], 25)), Some([0xff; 16]));
    }

    #[test]
    fn secrets_compare_exactly() {
        let t = JoinToken::generate("ca").unwrap();
        assert!(t.secret_is(&t.secret));
        let mut other = t.secret;
        other[15] ^= 1;
        assert!(!t.secret_is(&other));
    }

    #[test]
    fn malformed_tokens_are_refused_with_a_bounded_excerpt() {
        let good = JoinToken::generate("ca").unwrap().to_string();
        let long = "SWMTKN-1-".to_string() + &"a".repeat(10_000);
        for bad in [
            "",
            "SWMTKN-1-",
            "SWMTKN-2-x-y",
            &good[..good.len() - 1],
            &good.replace("SWMTKN-1", "SWMTKN-9"),
            &format!("{}!", &good[..good.len() - 1]),
            &long,
        ] {
            let err = bad.parse::<JoinToken>().unwrap_err().to_string();
            assert!(err.starts_with("invalid join token"), "{err}");
            assert!(
                err.len() < 400,
                "error echoes too much: {} bytes",
                err.len()
            );
        }
    }

    #[test]
    fn debug_hides_the_secret() {
        let t = JoinToken::generate("ca").unwrap();
        let shown = format!("{t:?}");
        assert!(
            !shown.contains(&encode(&t.secret, SECRET_DIGITS)),
            "{shown}"
        );
    }
}
