//! `meshletctl`: admin CLI talking to the local agent over its unix socket.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("meshletctl is not implemented yet")
}
