//! `tracing` setup: text or JSON. The level comes from `--log-level`, else
//! `RUST_LOG`, else the file's `log_level`, else `info` (the flag and
//! `RUST_LOG` are merged into the settings by [`level_from_env`]). A reload
//! changes the level in place ([`set_level`]).

use std::sync::OnceLock;

use tracing_subscriber::EnvFilter;

/// Replaces the filter of the subscriber [`init`] installed.
type SetFilter = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

static SET_FILTER: OnceLock<SetFilter> = OnceLock::new();

/// `RUST_LOG`, to be used as the `log_level` flag when that flag is absent.
pub fn level_from_env(flag: Option<String>) -> Option<String> {
    flag.or_else(|| std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty()))
}

/// Installs the subscriber: `level` in `log_level` syntax; JSON lines or text.
pub fn init(level: &str, json: bool) {
    let filter = EnvFilter::new(level);
    // Colours only on a terminal: a log file or journal gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match json {
        false => {
            let builder = builder.with_filter_reloading();
            let handle = builder.reload_handle();
            let _ = SET_FILTER.set(Box::new(move |f| handle.reload(f).map_err(|e| e.to_string())));
            builder.init();
        }
        true => {
            let builder = builder.json().with_current_span(true).with_filter_reloading();
            let handle = builder.reload_handle();
            let _ = SET_FILTER.set(Box::new(move |f| handle.reload(f).map_err(|e| e.to_string())));
            builder.init();
        }
    }
}

/// Sets the log filter (`log_level` syntax). Without [`init`] (the proxy
/// embedded in a test) there is nothing to change and that is not an error.
pub fn set_level(level: &str) -> Result<(), String> {
    let filter = EnvFilter::try_new(level).map_err(|e| format!("bad filter `{level}`: {e}"))?;
    match SET_FILTER.get() {
        Some(set) => set(filter),
        None => Ok(()),
    }
}
