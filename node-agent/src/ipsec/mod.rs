//! IPsec between nodes: transport-mode ESP through xfrm, one SA pair per peer, keys derived
//! per node pair and key generation (SPI), rotation in acknowledged phases.
//!
//! ```text
//!  standalone file `ipsec:` ─┐
//!  Kubernetes (kube.rs) ──────┴► IpsecConfig ─► reconcile::wanted (keys, wire SPIs, reqids)
//!                                   │                         │
//!                                   │        Xfrm::list_own ──┴─► reconcile::plan (pure diff)
//!                                   │                                    │
//!                                   └──────► status ◄── reconcile::apply (Xfrm: netlink, or
//!                                                        the file-backed recording test hook)
//! ```
//!
//! Rotation (DESIGN §5): a new generation is first listed in `spis` (inbound SAs installed on
//! every node), then made `active_spi` (outbound SAs and policies move to it), then the old
//! generation is dropped from `spis` (its SAs are deleted). Every state and policy the agent
//! writes is marked as its own (reqid range [`REQID_BASE`], policy priority
//! [`POLICY_PRIORITY`]); start-up adopts what is there, and removal deletes exactly those.

pub mod backend;
pub mod keys;
pub mod kube;
pub mod netlink;
pub mod reconcile;
pub mod runner;
pub mod xfrm;

use std::fmt;
use std::net::IpAddr;

/// High 16 bits of every reqid the agent writes; the low 16 bits carry the key generation.
pub const REQID_BASE: u32 = 0x6d6c_0000;
/// Mask selecting the owner part of a reqid.
pub const REQID_OWNER_MASK: u32 = 0xffff_0000;
/// Priority of every policy the agent writes; marks the policy as the agent's own.
pub const POLICY_PRIORITY: u32 = 0x006d_6c00;
/// Largest key generation (SPI in the configuration): it must fit the reqid's low 16 bits.
pub const MAX_SPI: u32 = 0xffff;

/// The reqid of the agent's SAs of key generation `spi`.
pub fn reqid_for(spi: u32) -> u32 {
    REQID_BASE | (spi & 0xffff)
}

/// The key generation of an own reqid, `None` when the reqid is not the agent's.
pub fn spi_of_reqid(reqid: u32) -> Option<u32> {
    (reqid & REQID_OWNER_MASK == REQID_BASE && reqid & 0xffff != 0).then_some(reqid & 0xffff)
}

/// ESP algorithms the agent can configure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Algorithm {
    /// AES-256-GCM (`rfc4106(gcm(aes))`), 128-bit ICV. The default.
    AesGcm,
    /// AES-256-CBC with HMAC-SHA-256 truncated to 128 bits.
    AesCbcHmacSha256,
    /// ChaCha20-Poly1305 (`rfc7539esp(chacha20,poly1305)`), 128-bit ICV.
    ChaCha20Poly1305,
}

impl Algorithm {
    /// Every accepted algorithm, by configuration name.
    pub const ALL: [Algorithm; 3] = [
        Algorithm::AesGcm,
        Algorithm::AesCbcHmacSha256,
        Algorithm::ChaCha20Poly1305,
    ];

    /// Name used in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::AesGcm => "rfc4106(gcm(aes))",
            Algorithm::AesCbcHmacSha256 => "cbc(aes)+hmac(sha256)",
            Algorithm::ChaCha20Poly1305 => "rfc7539esp(chacha20,poly1305)",
        }
    }

    /// Parse a configuration name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name.trim())
    }

    /// Bytes of key material one SA needs (cipher key + nonce salt, or cipher + MAC key).
    pub fn key_len(self) -> usize {
        match self {
            Algorithm::AesGcm | Algorithm::ChaCha20Poly1305 => 36,
            Algorithm::AesCbcHmacSha256 => 64,
        }
    }

    /// Kernel modules that provide the algorithm (for error messages).
    pub fn modules(self) -> &'static str {
        match self {
            Algorithm::AesGcm => "gcm, ghash-generic, ctr, aes, seqiv, drbg",
            Algorithm::AesCbcHmacSha256 => "authenc, cbc, aes, hmac, sha256, echainiv, drbg",
            Algorithm::ChaCha20Poly1305 => "chacha20poly1305, chacha20, poly1305",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Pre-shared key material of one key generation.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyGeneration {
    /// Key generation number (the configuration's SPI), 1..=65535.
    pub spi: u32,
    /// Pre-shared key (at least 16 bytes).
    pub psk: Vec<u8>,
    /// HKDF salt (may be empty).
    pub salt: Vec<u8>,
    /// ESP algorithm of this generation's SAs. A change of algorithm is a rotation: a new
    /// generation with the new algorithm installed next to the old one.
    pub algorithm: Algorithm,
}

impl fmt::Debug for KeyGeneration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyGeneration")
            .field("spi", &self.spi)
            .field("psk", &"<redacted>")
            .field("salt_len", &self.salt.len())
            .field("algorithm", &self.algorithm)
            .finish()
    }
}

/// A peer node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Peer {
    /// Node name (enters the key derivation).
    pub name: String,
    /// Node address ESP is exchanged with.
    pub address: IpAddr,
}

/// Desired IPsec state of this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpsecConfig {
    /// This node's name.
    pub node_name: String,
    /// This node's address.
    pub local_address: IpAddr,
    /// Installed key generations: inbound SAs exist for each.
    pub keys: Vec<KeyGeneration>,
    /// Generation outbound traffic uses; `None` installs inbound SAs only.
    pub active_spi: Option<u32>,
    /// Peer nodes.
    pub peers: Vec<Peer>,
}

/// What the node reports about IPsec (status, logs, admin).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IpsecStatus {
    /// Key generations with inbound SAs installed for every peer.
    pub installed_spis: Vec<u32>,
    /// Generation outbound policies point at.
    pub active_spi: Option<u32>,
    /// Peers with SAs.
    pub peers: usize,
    /// Own xfrm states present.
    pub states: usize,
    /// Own xfrm policies present.
    pub policies: usize,
    /// Packets sent through own outbound SAs.
    pub tx_packets: u64,
    /// Packets received through own inbound SAs.
    pub rx_packets: u64,
    /// Why the last change was not applied; the previous state stays in force.
    pub error: Option<String>,
}
