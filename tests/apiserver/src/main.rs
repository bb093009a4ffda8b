//! `meshlet-test-apiserver`: a Kubernetes API TEST server. Not for production.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
