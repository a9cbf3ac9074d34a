//! `tracing` setup: text or JSON. The level comes from `--log-level`, else
//! `RUST_LOG`, else the file's `log_level`, else `info` (the flag and
//! `RUST_LOG` are merged into the settings by [`level_from_env`]).

use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};

/// `RUST_LOG`, to be used as the `log_level` flag when that flag is absent.
pub fn level_from_env(flag: Option<String>) -> Option<String> {
    flag.or_else(|| std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty()))
}

pub fn init(config: &Config) {
    let filter = EnvFilter::new(&config.log_level);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().with_current_span(true).init(),
    }
}
