use clap::Parser;

fn main() {
    paft::process::setup();
    let cli = paft::cli::Cli::parse();
    if let Err(e) = paft::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
