use clap::Parser;

fn main() {
    let cli = lifeboat::cmd::Cli::parse();
    if let Err(e) = lifeboat::cmd::run(cli) {
        eprintln!("lifeboat: error: {e:#}");
        std::process::exit(1);
    }
}
