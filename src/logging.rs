//! `tracing` setup: text or JSON, level from `--log-level`/the file, else
//! `RUST_LOG`, else `info`.

use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};

pub fn init(config: &Config) {
    let filter = match (config.log_level_explicit, EnvFilter::try_from_default_env()) {
        (false, Ok(from_env)) => from_env,
        _ => EnvFilter::new(&config.log_level),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().with_current_span(true).init(),
    }
}
