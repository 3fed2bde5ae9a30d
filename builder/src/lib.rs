//! Lifeboat: automated Linux disaster recovery and bare-metal restore.
//!
//! The library behind the `lifeboat` command. Modules are grouped by domain;
//! each CLI subcommand lives in [`cmd`] with a `run(args) -> Result<()>`.

pub mod backup;
pub mod bootdisk;
pub mod chain;
pub mod cmd;
pub mod compress;
pub mod config;
pub mod config_ref;
pub mod cpio;
pub mod elf;
pub mod fetch;
pub mod fstab;
pub mod hooks;
pub mod http;
pub mod image;
pub mod integrity;
pub mod iso;
pub mod kmod;
pub mod layers;
pub mod layout;
pub mod layout_parse;
pub mod lvmmeta;
pub mod migrate;
pub mod netcapture;
pub mod plan;
pub mod portable;
pub mod programs;
pub mod pxe;
pub mod rear;
pub mod recipe;
pub mod recover;
pub mod rehearse;
pub mod rescue;
pub mod safety;
pub mod secrets;
pub mod serve;
pub mod sftp;
pub mod signing;
pub mod tape;
pub mod tree;
pub mod uki;
pub mod url;

/// Global options shared by every subcommand.
#[derive(Debug, Clone, Default)]
pub struct Global {
    /// Extra configuration files (`-c`), read last.
    pub config_files: Vec<std::path::PathBuf>,
    pub verbose: u8,
    pub quiet: bool,
}

impl Global {
    /// Load the configuration for this invocation.
    pub fn load_config(&self) -> anyhow::Result<config::Loaded> {
        // A portable lifeboat reads the configuration it was made with first.
        let mut extra: Vec<std::path::PathBuf> = portable::dir()
            .map(|d| d.join("lifeboat.toml"))
            .into_iter()
            .collect();
        extra.extend(self.config_files.iter().cloned());
        let files = config::config_files(&extra)?;
        config::load(&files)
    }
}
