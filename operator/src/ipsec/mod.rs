//! IPsec key management: the operator publishes ESP key generations and walks every
//! `IPsecPolicy` through its rotation phases as the nodes acknowledge them.
//!
//! ```text
//!  watches (IPsecPolicy, NodeEnrollment, Node, Secrets) ─► controller (effects)
//!                                                            │ per policy
//!                    decide (pure) ◄─ select, user_key, trigger, rotation::step
//!                                                            │
//!     Secret meshlet-ipsec-key (gains first) ─► IPsecPolicy.status ─► Secret (drops last)
//! ```

pub mod controller;
pub mod decide;
pub mod interval;
pub mod rotation;
