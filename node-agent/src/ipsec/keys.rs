//! Key and SPI derivation for one direction of one node pair.
//!
//! ```text
//!  PSK (per key generation) ─┐
//!  salt ─────────────────────┼─► HKDF-SHA256 ─► key material for src → dst
//!  info = "meshlet-ipsec" | spi | src | dst ┘
//!  SHA-256("meshlet-ipsec-spi" | spi | src | dst) ─► wire SPI for src → dst
//! ```
//!
//! Both ends compute the same key for each direction (the info names the sender first), and no
//! two pairs, directions or generations share a key or a wire SPI (up to a hash collision, which
//! the reconciler detects and reports).

use hkdf::Hkdf;
use sha2::{Digest, Sha256};

/// Domain label of the key derivation.
pub const KEY_LABEL: &[u8] = b"meshlet-ipsec";
/// Domain label of the wire-SPI derivation.
pub const SPI_LABEL: &[u8] = b"meshlet-ipsec-spi";
/// Wire SPIs below this value are reserved (RFC 4303: 1..=255); derived values are moved above.
pub const FIRST_WIRE_SPI: u32 = 0x100;

/// Errors of the key derivation.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// HKDF cannot produce this many bytes (more than 255 × 32).
    #[error("failed to derive {len} bytes of key material: too long for HKDF-SHA256")]
    Expand {
        /// Bytes asked for.
        len: usize,
    },
}

fn info(label: &[u8], spi: u32, src: &str, dst: &str) -> Vec<u8> {
    let mut info = Vec::with_capacity(label.len() + 8 + src.len() + dst.len());
    info.extend_from_slice(label);
    info.extend_from_slice(&spi.to_be_bytes());
    // Length prefixes keep ("ab", "c") and ("a", "bc") apart.
    for name in [src, dst] {
        info.extend_from_slice(&(name.len() as u32).to_be_bytes());
        info.extend_from_slice(name.as_bytes());
    }
    info
}

/// Key material of `len` bytes for the traffic `src` → `dst` under key generation `spi`.
pub fn derive_key(
    psk: &[u8],
    salt: &[u8],
    spi: u32,
    src: &str,
    dst: &str,
    len: usize,
) -> Result<Vec<u8>, KeyError> {
    let hk = Hkdf::<Sha256>::new(Some(salt), psk);
    let mut out = vec![0u8; len];
    hk.expand(&info(KEY_LABEL, spi, src, dst), &mut out)
        .map_err(|_| KeyError::Expand { len })?;
    Ok(out)
}

/// The SPI carried on the wire for the traffic `src` → `dst` under key generation `spi`.
///
/// The kernel keys inbound SAs by (destination, SPI, protocol), so every sender towards one
/// node needs its own wire SPI; it is derived from public values only.
pub fn wire_spi(spi: u32, src: &str, dst: &str) -> u32 {
    let digest = Sha256::digest(info(SPI_LABEL, spi, src, dst));
    let v = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    if v < FIRST_WIRE_SPI {
        v | FIRST_WIRE_SPI
    } else {
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PSK: &[u8] = b"0123456789abcdef0123456789abcdef";
    const SALT: &[u8] = b"salt";

    #[test]
    fn both_ends_derive_the_same_key_for_a_direction() {
        // Node a computes its outbound key, node b its inbound key for the same direction.
        let at_a = derive_key(PSK, SALT, 7, "a", "b", 36).expect("derive");
        let at_b = derive_key(PSK, SALT, 7, "a", "b", 36).expect("derive");
        assert_eq!(at_a, at_b);
        assert_eq!(wire_spi(7, "a", "b"), wire_spi(7, "a", "b"));
    }

    #[test]
    fn pairs_directions_and_generations_get_distinct_keys_and_spis() {
        let names = ["node-1", "node-2", "node-3", "node-12", "node-1n"];
        let mut keys = std::collections::HashSet::new();
        let mut spis = std::collections::HashSet::new();
        let mut count = 0;
        for generation in [1, 2] {
            for src in names {
                for dst in names {
                    if src == dst {
                        continue;
                    }
                    count += 1;
                    keys.insert(derive_key(PSK, SALT, generation, src, dst, 36).expect("derive"));
                    spis.insert(wire_spi(generation, src, dst));
                }
            }
        }
        assert_eq!(keys.len(), count, "two directions share a key");
        assert_eq!(spis.len(), count, "two directions share a wire SPI");
    }

    #[test]
    fn name_boundaries_do_not_collide() {
        assert_ne!(
            derive_key(PSK, SALT, 1, "ab", "c", 32).expect("derive"),
            derive_key(PSK, SALT, 1, "a", "bc", 32).expect("derive")
        );
    }

    #[test]
    fn another_psk_or_salt_gives_another_key() {
        let base = derive_key(PSK, SALT, 1, "a", "b", 36).expect("derive");
        assert_ne!(
            base,
            derive_key(b"another pre-shared key", SALT, 1, "a", "b", 36).expect("derive")
        );
        assert_ne!(
            base,
            derive_key(PSK, b"pepper", 1, "a", "b", 36).expect("derive")
        );
    }

    #[test]
    fn wire_spis_avoid_the_reserved_range() {
        for i in 0..2000u32 {
            assert!(wire_spi(i, "x", "y") >= FIRST_WIRE_SPI);
        }
    }
}
