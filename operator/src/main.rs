//! `meshlet-operator` binary: parses flags and starts the controllers.

use clap::Parser;

/// Meshlet cluster operator.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address of the health and metrics HTTP server.
    #[arg(long, env = "MESHLET_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt().json().init();
    tracing::info!(metrics_addr = %args.metrics_addr, field_manager = meshlet_operator::FIELD_MANAGER, "meshlet-operator starting");
    anyhow::bail!("the operator controllers are not implemented yet")
}
