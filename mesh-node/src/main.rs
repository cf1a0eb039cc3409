use clap::Parser;
use mesh_node::{
    app,
    cli::{Cli, Command, LogFormat},
};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(config) => {
            init_logging(config.log_format);
            runtime()?.block_on(async { app::build(config).await?.wait().await })
        }
        Command::Ca(config) => {
            init_logging(config.log_format);
            runtime()?.block_on(app::run_ca(config))
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
