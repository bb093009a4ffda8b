//! IPsec key management: the rotation phase machine (pure) and, later, the controller that
//! writes keys and status.

pub mod rotation;
