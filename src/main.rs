use clap::Parser;

use memex::config::{Cli, Command};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Extract(args) => {
            memex::telemetry::init_offline();
            match memex::batch::run(args).await {
                // Interrupted: the output is whole, but lines are left for a re-run (128 + SIGINT).
                Ok(memex::batch::Finish::Interrupted) => return std::process::ExitCode::from(130),
                other => other.map(drop),
            }
        }
        Command::Eval(args) => {
            memex::telemetry::init_offline();
            memex::eval::run(args).await.map(drop)
        }
        Command::Render { templates } => render(templates.as_deref()),
        Command::TinyModel {
            dir,
            seed,
            preset,
            tokenizer,
        } => memex::tiny_model::write_preset(&dir, seed, preset, tokenizer.as_deref()).map(|_| {
            let name = clap::ValueEnum::to_possible_value(&preset)
                .map(|v| v.get_name().to_string())
                .unwrap_or_default();
            println!("wrote the {name} random-weight Qwen3 to {}", dir.display())
        }),
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

fn render(templates: Option<&std::path::Path>) -> anyhow::Result<()> {
    use std::io::Read;
    let mut body = Vec::new();
    std::io::stdin().read_to_end(&mut body)?;
    let input = memex::api::types::ExtractRequest::from_json(&body)?.into_input();
    let limits = memex::pipeline::schema::OutputLimits::default();
    let prompts = memex::pipeline::prompt::Prompts::new(templates)?;
    let requests = memex::pipeline::Extractor::render(
        input.messages,
        input.extraction_types.as_deref(),
        &limits,
        &prompts,
    )?;
    for (branch, r) in requests {
        let messages: Vec<serde_json::Value> = r
            .messages
            .iter()
            .map(|m| serde_json::json!({ "role": m.role.as_str(), "content": m.content }))
            .collect();
        let line = serde_json::json!({
            "branch": branch.name(),
            "messages": messages,
            "schema": r.schema,
            "max_tokens": r.max_tokens,
        });
        println!("{line}");
    }
    Ok(())
}
