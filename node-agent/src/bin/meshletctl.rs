//! `meshletctl`: admin CLI talking to the local agent over its unix socket.

use clap::Parser;

fn main() -> std::process::ExitCode {
    meshlet_agent::admin::ctl::main(meshlet_agent::admin::ctl::CtlCli::parse())
}
