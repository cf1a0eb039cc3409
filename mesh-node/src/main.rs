use std::sync::Arc;

use clap::Parser;
use mesh_node::{
    admin::LogControl,
    app,
    cli::{Cli, Command, LogFormat},
};
use tracing_subscriber::{EnvFilter, fmt, layer::SubscriberExt, reload, util::SubscriberInitExt};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(config) => {
            let log = init_logging(config.log_format);
            runtime()?.block_on(async { app::build(config, Some(log)).await?.wait().await })
        }
        Command::Debug(args) => runtime()?.block_on(mesh_node::debug::run(args)),
        Command::Ca(config) => {
            let _ = init_logging(config.log_format);
            runtime()?.block_on(app::run_ca(config))
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// Logs to stdout; the returned handle changes the filter at run time (admin API).
fn init_logging(format: LogFormat) -> LogControl {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry.with(fmt::layer()).init(),
        LogFormat::Json => registry.with(fmt::layer().json()).init(),
    }
    Arc::new(move |level: &str| {
        let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    })
}
