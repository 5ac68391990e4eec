//! `troop`: the worker and gateway node. The mesh itself is the next issue;
//! for now it offers `keygen`, which the coordinator's users already need.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "troop",
    version,
    about = "Troop: a peer-to-peer inference mesh"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Write a new ed25519 identity (mode 0600) and print its PeerId.
    Keygen {
        /// Where to write the key; an existing file is never overwritten.
        #[arg(long, env = "TROOP_IDENTITY")]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Keygen { out } => {
            let key = troop_protocol::identity::generate();
            match troop_protocol::identity::write_keypair(&out, &key) {
                Ok(()) => {
                    println!("{}", key.public().to_peer_id());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}
