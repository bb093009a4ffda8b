//! `meshlet-agent` binary.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("the node agent is not implemented yet")
}
