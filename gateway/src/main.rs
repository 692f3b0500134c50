//! `isthmus`: the gateway binary.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    gateway::cli::run(gateway::cli::Cli::parse())
}
