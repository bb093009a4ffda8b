//! `cargo xtask`: generators and checks for Meshlet's committed artifacts.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("usage: cargo xtask <gen|verify|olm-validate DIR>")
}
