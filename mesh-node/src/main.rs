use std::{ffi::OsStr, io::Read as _, path::PathBuf, process::ExitCode, sync::Arc};

use clap::Parser;
use mesh_node::{
    admin::LogControl,
    app,
    cli::{Cli, CniAction, CniArgs, Command, LogFormat},
    cni::{
        install::{self, PLUGIN_TYPE as CNI_PLUGIN_NAME},
        plugin,
    },
};
use tracing_subscriber::{EnvFilter, fmt, layer::SubscriberExt, reload, util::SubscriberInitExt};

/// mimalloc rather than the C library's malloc: see `mesh_node::memory`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<ExitCode> {
    // The runtime executes the plugin by its file name, with no arguments.
    let invoked_as = std::env::args_os().next().map(PathBuf::from);
    if invoked_as.is_some_and(|path| path.file_name() == Some(OsStr::new(CNI_PLUGIN_NAME))) {
        return Ok(run_cni_plugin());
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Run(config) => {
            let log = init_logging(config.log_format);
            agent_runtime(config.worker_threads)?
                .block_on(async { app::build(config, Some(log)).await?.wait().await })?;
        }
        Command::Gateway(config) => {
            let log = init_logging(config.log_format);
            runtime()?
                .block_on(async { app::build_gateway(config, Some(log)).await?.wait().await })?;
        }
        Command::Debug(args) => runtime()?.block_on(mesh_node::debug::run(args))?,
        Command::Ca(config) => {
            let _ = init_logging(config.log_format);
            runtime()?.block_on(app::run_ca(config))?;
        }
        Command::Holder(args) => {
            let _ = init_logging(LogFormat::Text);
            mesh_node::holder::run_holder(&args.socket)?;
        }
        Command::Uninstall(args) => {
            let _ = init_logging(LogFormat::Text);
            runtime()?.block_on(app::uninstall::run(&args))?;
        }
        Command::Cni(CniArgs { action: None }) => return Ok(run_cni_plugin()),
        Command::Cni(CniArgs {
            action:
                Some(CniAction::Uninstall {
                    cni_bin_dir,
                    cni_conf_dir,
                }),
        }) => install::uninstall(&cni_bin_dir, &cni_conf_dir)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// One CNI call: the result goes to stdout, as the runtime expects, logs to stderr.
fn run_cni_plugin() -> ExitCode {
    let mut stdin = Vec::new();
    if let Err(error) = std::io::stdin().read_to_end(&mut stdin) {
        eprintln!("nodemesh-cni: reading stdin: {error}");
    }
    let env = plugin::CniEnv::from_env();
    if plugin::run(&env, &stdin, &mut std::io::stdout(), &mut std::io::stderr()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// The agent's runtime: `--worker-threads`, or half the CPUs it may use, at least one.
fn agent_runtime(workers: Option<u16>) -> std::io::Result<tokio::runtime::Runtime> {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let workers = workers.map_or((cpus / 2).max(1), usize::from);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
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
