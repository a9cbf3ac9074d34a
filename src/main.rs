use std::path::PathBuf;
use std::process::ExitCode;

use cachefence::changelog::install;
use cachefence::config::{Config, Settings};
use cachefence::server::{self, Server};
use clap::Parser;
use tracing::{error, info};

/// A Redis-protocol caching proxy that refuses stale cache fills.
#[derive(Debug, Parser)]
#[command(name = "cachefence", version)]
struct Cli {
    /// TOML configuration file (see config.example.toml).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Validate the configuration and exit (0 valid, 1 invalid).
    #[arg(long)]
    check: bool,
    /// Turn fences off: a pure, byte-exact passthrough proxy (same as `fences = false`).
    #[arg(long, conflicts_with = "fences")]
    no_fences: bool,
    #[command(flatten)]
    settings: Settings,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// The PostgreSQL change log's outbox and triggers (`[postgres]` in the config).
    Pg {
        #[command(subcommand)]
        action: PgAction,
    },
}

#[derive(Debug, clap::Subcommand)]
enum PgAction {
    /// Create (or update) the outbox table and one trigger per `[[postgres.table]]`, in one transaction.
    Install {
        /// Print the SQL instead of running it.
        #[arg(long)]
        dry_run: bool,
    },
    /// Drop the triggers, their functions and the outbox (with unconsumed rows).
    Uninstall {
        /// Print the SQL instead of running it.
        #[arg(long)]
        dry_run: bool,
    },
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    cli.settings.log_level = cachefence::logging::level_from_env(cli.settings.log_level.take());
    if cli.no_fences {
        cli.settings.fences = Some(false);
    }
    let config = match Config::load(cli.config.as_deref(), cli.settings) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("cachefence: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(Command::Pg { action }) = cli.command {
        return pg(&config, action);
    }
    if cli.check {
        let source = config
            .source
            .as_ref()
            .map_or("defaults and flags".into(), |p| p.display().to_string());
        println!("cachefence: configuration OK ({source})");
        return ExitCode::SUCCESS;
    }
    cachefence::logging::init(&config);
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.workers > 0 {
        runtime.worker_threads(config.workers);
    }
    let runtime = match runtime.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cachefence: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let server = Server::bind(config.clone()).await?;
        info!(
            listen = %server.local_addr(),
            upstream = %config.upstream,
            tls = config.tls.is_some(),
            upstream_tls = config.upstream.tls.is_some(),
            "cachefence listening"
        );
        server.run(server::signal()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("cachefence: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `cachefence pg install|uninstall [--dry-run]`.
fn pg(config: &Config, action: PgAction) -> ExitCode {
    let Some(changelog) = &config.changelog else {
        eprintln!(
            "cachefence: `pg` needs `[postgres] url` and `[[postgres.table]]` mappings in the config file (--config)"
        );
        return ExitCode::FAILURE;
    };
    let (action, dry_run) = match action {
        PgAction::Install { dry_run } => (install::Action::Install, dry_run),
        PgAction::Uninstall { dry_run } => (install::Action::Uninstall, dry_run),
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
    let result = match runtime {
        Ok(runtime) => runtime.block_on(install::run(changelog, action, dry_run)),
        Err(e) => Err(e.into()),
    };
    match result {
        Ok(sql) if dry_run => {
            print!("{sql}");
            ExitCode::SUCCESS
        }
        Ok(_) => {
            let what = match action {
                install::Action::Install => "installed",
                install::Action::Uninstall => "uninstalled",
            };
            println!(
                "cachefence: change log {what} (outbox {}, {} table(s))",
                changelog.outbox,
                changelog.tables.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cachefence: {e:#}");
            ExitCode::FAILURE
        }
    }
}
