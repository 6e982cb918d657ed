use clap::Parser;

use memex::config::{Cli, Command};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::TinyModel { dir, seed } => memex::tiny_model::write(&dir, seed)
            .map(|_| println!("wrote tiny Qwen3 model to {}", dir.display())),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("memex: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(args: memex::config::ServeArgs) -> anyhow::Result<()> {
    memex::telemetry::init(args.log_json);
    tracing::info!(config = ?args, "memex {}", env!("CARGO_PKG_VERSION"));
    let running = memex::server::start(args).await?;
    running.task.await?
}
