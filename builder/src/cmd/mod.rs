//! The command line: ReaR's vocabulary (mkrescue, dump, ...). Subcommands
//! appear here once they work.

use crate::Global;
use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

pub mod backup;
pub mod dump;
pub mod format;
pub mod gen;
pub mod image;
pub mod layout;
pub mod mkbackup;
pub mod mkrescue;
pub mod rear;
pub mod recover;
pub mod rehearse;
pub mod serve;
pub mod udev;

#[derive(Debug, Parser)]
#[command(
    name = "lifeboat",
    version,
    about = "Automated Linux disaster recovery and bare-metal restore"
)]
pub struct Cli {
    /// Extra configuration file, read after /etc/lifeboat (repeatable; later wins).
    #[arg(short = 'c', long = "config", global = true, value_name = "FILE")]
    pub config: Vec<PathBuf>,
    /// More output (repeatable).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build the rescue image (kernel, initramfs layers, manifest).
    Mkrescue(mkrescue::Args),
    /// Capture the layout, back up every local filesystem to BACKUP_URL,
    /// and build the rescue image carrying both.
    Mkbackup(mkbackup::Args),
    /// Inspect (ls) or read back and check (verify) a backup.
    #[command(subcommand)]
    Backup(backup::Command),
    /// In the rescue OS: recreate the disks, restore the backup, make the
    /// system bootable (`--dry-run` prints the commands only).
    Recover(recover::Args),
    /// Print the effective configuration and where each value came from.
    Dump(dump::Args),
    /// Inspect a built image: ls, unpack, verify.
    #[command(subcommand)]
    Image(image::Command),
    /// Prepare a USB stick (or an image file) for OUTPUT = "USB" and
    /// usb:// backups: GPT, GRUB for BIOS and UEFI, ext4 data partition.
    Format(format::Args),
    /// Run udev_workflow when the Lifeboat stick is plugged in (called by
    /// the udev rule that `--rule` prints).
    Udev(udev::Args),
    /// Capture the disk layout (save), show it, or check it for drift.
    #[command(subcommand)]
    Layout(layout::Command),
    /// Serve rescue systems to a fleet over HTTP(S): iPXE scripts, shared
    /// layers, per-host personal layers (registration: OUTPUT_URL =
    /// "lifeboat+http(s)://server/").
    Serve(serve::Args),
    /// In the rescue OS (run by its init): download, check and unpack the
    /// layers named by lifeboat.layers= or lifeboat.chain=.
    #[command(hide = true)]
    FetchLayers(serve::FetchArgs),
    /// Prove that the latest rescue image and backup restore: recover in a
    /// VM onto scratch disks like the originals, boot the result, report
    /// per-phase timings (exit 1 and the failing phase on failure).
    Rehearse(rehearse::Args),
    /// Check the configuration: every file against the schema, then the
    /// values (choices, URLs, the files it names); exit 1 on a problem.
    Validate(rear::ValidateArgs),
    /// Turn a ReaR configuration (/etc/rear/local.conf, mapping files)
    /// into Lifeboat TOML, listing what cannot be carried over.
    ImportRear(rear::ImportArgs),
    /// Make an ed25519 signing key (for `signing_key`): the private key
    /// (PKCS#8 PEM, 0600) and its public key next to it (.pub).
    Keygen(image::KeygenArgs),
    /// Print the shell completion script (bash, zsh, fish, ...).
    Completions(gen::CompletionArgs),
    /// Print the man page, or write every command's page with --dir.
    Man(gen::ManArgs),
}

/// An exit status other than 0/1 chosen by a command (e.g. `layout check`).
#[derive(Debug)]
pub struct Exit(pub i32);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl std::error::Error for Exit {}

pub fn run(cli: Cli) -> Result<()> {
    let g = Global {
        config_files: cli.config,
        verbose: cli.verbose,
        quiet: cli.quiet,
    };
    match cli.command {
        Command::Mkrescue(a) => mkrescue::run(&g, a),
        Command::Mkbackup(a) => mkbackup::run(&g, a),
        Command::Format(a) => format::run(&g, a),
        Command::Udev(a) => udev::run(&g, a),
        Command::Recover(a) => recover::run(&g, a),
        Command::Backup(c) => backup::run(&g, c),
        Command::Dump(a) => dump::run(&g, a),
        Command::Image(c) => image::run(&g, c),
        Command::Layout(c) => layout::run(&g, c),
        Command::Serve(a) => serve::run(&g, a),
        Command::FetchLayers(a) => serve::fetch(&g, a),
        Command::Rehearse(a) => rehearse::run(&g, a),
        Command::Validate(a) => rear::validate(&g, a),
        Command::ImportRear(a) => rear::import(&g, a),
        Command::Keygen(a) => image::keygen(&g, a),
        Command::Completions(a) => gen::completions(&g, a),
        Command::Man(a) => gen::man(&g, a),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
