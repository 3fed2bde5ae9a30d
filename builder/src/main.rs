use clap::Parser;

fn main() {
    let cli = lifeboat::cmd::Cli::parse();
    if let Err(e) = lifeboat::cmd::run(cli) {
        if let Some(lifeboat::cmd::Exit(code)) = e.downcast_ref::<lifeboat::cmd::Exit>() {
            std::process::exit(*code);
        }
        eprintln!("lifeboat: error: {e:#}");
        std::process::exit(1);
    }
}
