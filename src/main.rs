use std::path::PathBuf;
use std::process::ExitCode;

use cachefence::changelog::{audit, install};
use cachefence::config::{CacheSection, Config, Settings, Span};
use cachefence::server::{self, Server};
use clap::Parser;
use tracing::{error, info, warn};

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
    /// Keys that are a cache: a Redis glob pattern, fenced with every
    /// `[[cache]]` setting at its default (repeatable; replaces the file's
    /// `[[cache]]` sections). Without it or a `[[cache]]` section no key is fenced.
    #[arg(long = "cache", value_name = "PATTERN", conflicts_with = "no_fences")]
    cache: Vec<String>,
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
    /// Sample cached keys, read their rows from PostgreSQL through the
    /// `values` expressions of `[[postgres.table]]`, and report how many
    /// cached values are stale (exit 0: none, 3: some, 1: error).
    Audit {
        /// Keys to sample, at most.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
        sample: u64,
        /// How long a disagreement may take to resolve (a change in flight) before it counts as stale.
        #[arg(long, default_value = "2s")]
        settle: Span,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
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
    cli.settings.log_level = cachefence::telemetry::logging::level_from_env(cli.settings.log_level.take());
    if cli.no_fences {
        cli.settings.fences = Some(false);
    }
    if !cli.cache.is_empty() {
        cli.settings.cache = Some(cli.cache.iter().map(|p| CacheSection::for_pattern(p)).collect());
    }
    let config = match Config::load(cli.config.as_deref(), cli.settings) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("cachefence: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Some(Command::Pg { action }) => return pg(&config, action),
        Some(Command::Audit { sample, settle, json }) => return audit(&config, sample, settle, json),
        None => {}
    }
    if cli.check {
        let source = config
            .source
            .as_ref()
            .map_or("defaults and flags".into(), |p| p.display().to_string());
        println!("cachefence: configuration OK ({source})");
        return ExitCode::SUCCESS;
    }
    init_logging(&config);
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
        let patterns: Vec<&str> = config.fences.iter().flat_map(|s| s.policies()).map(|p| p.pattern.as_str()).collect();
        info!(
            listen = %server.local_addr(),
            upstream = %config.upstream,
            tls = config.tls.is_some(),
            upstream_tls = config.upstream.tls.is_some(),
            fenced = ?patterns,
            "cachefence listening"
        );
        if config.fences.is_some() && patterns.is_empty() {
            warn!(
                "no key is a cache yet: every command passes through unfenced; declare cache keys with --cache PATTERN or a [[cache]] section"
            );
        }
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

/// `cachefence audit [--sample N] [--settle DURATION] [--json]`: exit 0
/// when no stale value was found, 3 when some were, 1 on errors.
fn audit(config: &Config, sample: u64, settle: Span, json: bool) -> ExitCode {
    let Some(changelog) = &config.changelog else {
        eprintln!(
            "cachefence: `audit` needs `[postgres] url` and `[[postgres.table]]` mappings with `values` in the config file (--config)"
        );
        return ExitCode::FAILURE;
    };
    init_logging(config);
    let options = audit::Options {
        sample: usize::try_from(sample).unwrap_or(usize::MAX),
        settle: settle.0,
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
    let result = match runtime {
        Ok(runtime) => runtime.block_on(audit::run(
            changelog,
            &config.upstream,
            config.connect_timeout,
            options,
        )),
        Err(e) => Err(e.into()),
    };
    match result {
        Ok(report) => {
            match json {
                true => println!("{}", report.json()),
                false => print!("{}", report.text()),
            }
            match report.stale_total() {
                0 => ExitCode::SUCCESS,
                _ => ExitCode::from(3),
            }
        }
        Err(e) => {
            eprintln!("cachefence: audit failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(config: &Config) {
    let json = config.log_format == cachefence::config::LogFormat::Json;
    cachefence::telemetry::logging::init(&config.log_level, json);
}
