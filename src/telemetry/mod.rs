//! Telemetry: the counters, gauges and histograms bumped where things
//! happen ([`registry`]), the Prometheus endpoint that renders them
//! ([`exporter`]), and the `tracing` setup ([`logging`]).

pub mod exporter;
pub mod logging;
pub mod registry;

pub use registry::*;
