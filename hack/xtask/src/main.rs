//! `cargo xtask`: generators and checks for Meshlet's committed artifacts.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Meshlet developer tooling.
#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Regenerate manifests/ and olm/ from the Rust types and examples/.
    Gen,
    /// Fail if manifests/ or olm/ differ from what `gen` would write.
    Verify,
    /// Check an OLM bundle (registry+v1 or flat layout).
    OlmValidate {
        /// Bundle directory.
        dir: PathBuf,
    },
    /// Build the container images (oci-archive files) from this workspace, offline.
    Images {
        /// Cargo profile of the binaries.
        #[arg(long, value_enum, default_value = "release")]
        profile: xtask::images::Profile,
        /// Directory the archives are written to [default: target/images of the workspace].
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let root = xtask::workspace_root();
    match Cli::parse().command {
        Command::Gen => {
            let tree = xtask::generate::generate(&root)?;
            let written = xtask::generate::write(&tree, &root)?;
            println!("wrote {} files under manifests/ and olm/", written.len());
        }
        Command::Verify => {
            let drift = xtask::generate::verify(&root)?;
            if !drift.is_empty() {
                for d in &drift {
                    eprintln!("drift: {d}");
                }
                anyhow::bail!(
                    "{} generated file(s) out of date; run `cargo xtask gen` and commit",
                    drift.len()
                );
            }
            println!("generated files are up to date");
        }
        Command::OlmValidate { dir } => {
            let dir = if dir.is_relative() {
                std::env::current_dir()?.join(dir)
            } else {
                dir
            };
            let report = xtask::bundle::check_bundle(&dir)?;
            for note in &report.notes {
                println!("note: {note}");
            }
            for warning in &report.warnings {
                eprintln!("warning: {warning}");
            }
            if !report.problems.is_empty() {
                for p in &report.problems {
                    eprintln!("problem: {p}");
                }
                anyhow::bail!(
                    "bundle {} has {} problem(s)",
                    dir.display(),
                    report.problems.len()
                );
            }
            let warnings = match report.warnings.len() {
                0 => String::new(),
                n => format!(" with {n} warning(s)"),
            };
            println!(
                "bundle {} is valid{warnings} ({})",
                dir.display(),
                report.summary
            );
        }
        Command::Images { profile, out } => {
            let root = root.canonicalize()?;
            let out = match out {
                None => root.join(xtask::images::DEFAULT_OUT),
                Some(out) => std::env::current_dir()?.join(out),
            };
            let opts = xtask::images::Options { profile, out };
            xtask::images::build(&root, &opts, |outcome| println!("{outcome}"))?;
        }
    }
    Ok(())
}
