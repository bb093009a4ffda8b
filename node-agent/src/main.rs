//! `meshlet-agent` binary: parses flags and hands over to [`meshlet_agent::agent::main`].

use clap::Parser;

fn main() -> std::process::ExitCode {
    meshlet_agent::agent::main(meshlet_agent::config::Cli::parse())
}
