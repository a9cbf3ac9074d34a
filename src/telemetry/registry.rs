//! The metric types and the two macros the declarations in
//! [`crate::telemetry`] are written with.
//!
//! Bumping a metric is a relaxed atomic add on a struct field: no lock, no
//! allocation, no lookup by name. Names, help and labels are `'static` data
//! beside the fields, read only by `CACHE.STATS` and a scrape, through each
//! group's `visit`.

use std::ops::Index;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub const fn new() -> Counter {
        Counter(AtomicU64::new(0))
    }

    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        if n > 0 {
            self.0.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Brings the count up to `total`, a count kept elsewhere (it never
    /// goes down).
    pub fn catch_up(&self, total: u64) {
        self.0.fetch_max(total, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn set(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A gauge that is always 1, for a family whose information is its label
/// (`cachefence_build_info`).
#[derive(Debug, Default)]
pub struct Info;

/// Upper bounds of the latency buckets, in seconds (Prometheus `le`).
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0,
];

/// A latency histogram with fixed buckets: observing is a few relaxed
/// atomic adds, no lock and no allocation.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last is `+Inf`.
    buckets: [Counter; LATENCY_BUCKETS.len() + 1],
    sum_nanos: Counter,
    count: Counter,
}

impl Histogram {
    pub const fn new() -> Histogram {
        Histogram {
            buckets: [const { Counter::new() }; LATENCY_BUCKETS.len() + 1],
            sum_nanos: Counter::new(),
            count: Counter::new(),
        }
    }

    /// Records `n` observations of `latency`.
    pub fn observe(&self, latency: std::time::Duration, n: u64) {
        if n == 0 {
            return;
        }
        let seconds = latency.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|&le| seconds <= le)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[bucket].add(n);
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.add(nanos.saturating_mul(n));
        self.count.add(n);
    }

    pub fn count(&self) -> u64 {
        self.count.get()
    }

    /// Cumulative counts per bucket, `+Inf` last.
    pub fn cumulative(&self) -> Vec<u64> {
        let mut total = 0;
        self.buckets
            .iter()
            .map(|b| {
                total += b.get();
                total
            })
            .collect()
    }

    pub fn sum_seconds(&self) -> f64 {
        self.sum_nanos.get() as f64 / 1e9
    }
}

/// How a command was handled, for counts and latency by class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Forwarded unchanged.
    Passthrough = 0,
    /// A fenced key's command, rewritten or watched (fences).
    Intercepted = 1,
    /// `CACHE.*`, answered by the proxy.
    Admin = 2,
}

impl Class {
    pub const ALL: [Class; 3] = [Class::Passthrough, Class::Intercepted, Class::Admin];
    /// The `class` label's values, indexed by `Class as usize`.
    pub const NAMES: [&'static str; 3] = ["passthrough", "intercepted", "admin"];

    pub fn as_str(self) -> &'static str {
        Class::NAMES[self as usize]
    }
}

/// Commands of one batch per [`Class`].
pub type ClassCounts = [u32; 3];

/// One metric per [`Class`], indexed by `Class as usize`; it reports each
/// with its `class` label.
#[derive(Debug, Default)]
pub struct PerClass<T>(pub [T; 3]);

impl<T> Index<usize> for PerClass<T> {
    type Output = T;

    fn index(&self, class: usize) -> &T {
        &self.0[class]
    }
}

/// A Prometheus metric type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A Prometheus metric family: what its `# HELP` and `# TYPE` lines say,
/// and its label with every value it is written with, in order.
#[derive(Debug)]
pub struct Family {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    /// The label's name and values; each value is one sample, written 0
    /// when no field reports it (a part of the proxy that is off).
    pub label: Option<(&'static str, &'static [&'static str])>,
}

impl Family {
    pub const fn new(kind: Kind, name: &'static str, help: &'static str) -> Family {
        Family {
            name,
            kind,
            help,
            label: None,
        }
    }

    pub const fn by(self, label: &'static str, values: &'static [&'static str]) -> Family {
        Family {
            label: Some((label, values)),
            ..self
        }
    }
}

/// A metric's value when read.
#[derive(Debug, Clone, Copy)]
pub enum Value<'a> {
    Int(u64),
    Float(f64),
    Histogram(&'a Histogram),
}

impl Value<'_> {
    /// The value as `CACHE.STATS` reports it (an integer).
    pub fn as_u64(self) -> u64 {
        match self {
            Value::Int(n) => n,
            Value::Float(x) => x as u64,
            Value::Histogram(h) => h.count(),
        }
    }
}

/// One reading of a declared field, as a group's `visit` yields it: either
/// its `CACHE.STATS` entry (`stats`) or one of its Prometheus samples
/// (`family`, with the label value), never both.
#[derive(Debug, Clone, Copy)]
pub struct Sample<'a> {
    /// The struct field it was read from.
    pub field: &'static str,
    /// The field's type, as a Prometheus type.
    pub kind: Kind,
    pub stats: Option<&'static str>,
    pub family: Option<&'static Family>,
    pub label: Option<&'static str>,
    pub value: Value<'a>,
}

impl<'a> Sample<'a> {
    #[doc(hidden)]
    pub fn stats(field: &'static str, kind: Kind, name: &'static str, value: Value<'a>) -> Sample<'a> {
        Sample {
            field,
            kind,
            stats: Some(name),
            family: None,
            label: None,
            value,
        }
    }

    #[doc(hidden)]
    pub fn prom(
        field: &'static str,
        kind: Kind,
        family: &'static Family,
        label: Option<&'static str>,
        value: Value<'a>,
        divisor: Option<f64>,
    ) -> Sample<'a> {
        let value = match (value, divisor) {
            (Value::Int(n), Some(d)) => Value::Float(n as f64 / d),
            (value, _) => value,
        };
        Sample {
            field,
            kind,
            stats: None,
            family: Some(family),
            label,
            value,
        }
    }
}

/// What a declared field can be: something that reads as one or more
/// values (more for [`PerClass`], each with its label value).
pub trait Read {
    const KIND: Kind;
    fn read<'a>(&'a self, out: &mut dyn FnMut(Option<&'static str>, Value<'a>));
}

impl Read for Counter {
    const KIND: Kind = Kind::Counter;
    fn read<'a>(&'a self, out: &mut dyn FnMut(Option<&'static str>, Value<'a>)) {
        out(None, Value::Int(self.get()));
    }
}

impl Read for Gauge {
    const KIND: Kind = Kind::Gauge;
    fn read<'a>(&'a self, out: &mut dyn FnMut(Option<&'static str>, Value<'a>)) {
        out(None, Value::Int(self.get()));
    }
}

impl Read for Info {
    const KIND: Kind = Kind::Gauge;
    fn read<'a>(&'a self, out: &mut dyn FnMut(Option<&'static str>, Value<'a>)) {
        out(None, Value::Int(1));
    }
}

impl Read for Histogram {
    const KIND: Kind = Kind::Histogram;
    fn read<'a>(&'a self, out: &mut dyn FnMut(Option<&'static str>, Value<'a>)) {
        out(None, Value::Histogram(self));
    }
}

impl<T: Read> Read for PerClass<T> {
    const KIND: Kind = T::KIND;
    fn read<'a>(&'a self, out: &mut dyn FnMut(Option<&'static str>, Value<'a>)) {
        for class in Class::ALL {
            self.0[class as usize].read(&mut |_, value| out(Some(class.as_str()), value));
        }
    }
}

/// `Some(x)` for one argument, `None` for none.
macro_rules! opt {
    () => {
        None
    };
    ($x:expr) => {
        Some($x)
    };
}

/// Declares Prometheus families as statics, and per list a static slice of
/// them in the order a scrape writes them:
///
/// ```text
/// LIST = [
///     NAME: Counter "prometheus_name" [by "label" [values]], "Help.";
/// ];
/// ```
macro_rules! families {
    ($(
        $(#[$list_meta:meta])*
        $list:ident = [
            $( $id:ident: $kind:ident $name:literal $(by $label:literal $values:expr)?, $help:literal; )*
        ];
    )*) => {
        $(
            $(
                pub static $id: $crate::telemetry::Family =
                    $crate::telemetry::Family::new($crate::telemetry::Kind::$kind, $name, $help)
                    $(.by($label, &$values))?;
            )*
            $(#[$list_meta])*
            pub static $list: &[&$crate::telemetry::Family] = &[$(&$id),*];
        )*
    };
}

/// Declares groups of metrics: a struct of public fields (`Default`, so
/// every metric starts at 0) and its `visit`, which reads each field, in
/// declaration order, as its `CACHE.STATS` entry and its Prometheus samples:
///
/// ```text
/// pub struct Group {
///     /// Doc.
///     field: Counter [, stats "stats_name"] [, prom FAMILY ["label value"] [/ divisor]]* ;
/// }
/// ```
///
/// A field may be in several families (or none); `/ divisor` writes it
/// divided, as a float (milliseconds as seconds).
macro_rules! metrics {
    ($(
        $(#[$meta:meta])*
        pub struct $name:ident {
            $(
                $(#[$field_meta:meta])*
                $field:ident: $ty:ty
                $(, stats $stats:literal)?
                $(, prom $family:ident $([$label:expr])? $(/ $divisor:literal)?)*;
            )*
        }
    )*) => {$(
        $(#[$meta])*
        #[derive(Debug, Default)]
        pub struct $name {
            $( $(#[$field_meta])* pub $field: $ty, )*
        }

        impl $name {
            /// Reads every field, in declaration order.
            pub fn visit<'a>(&'a self, out: &mut dyn FnMut($crate::telemetry::Sample<'a>)) {
                use $crate::telemetry::{Read, Sample};
                $(
                    Read::read(&self.$field, &mut |_by, _value| {
                        let _kind = <$ty as Read>::KIND;
                        $( out(Sample::stats(stringify!($field), _kind, $stats, _value)); )?
                        $(
                            out(Sample::prom(
                                stringify!($field),
                                _kind,
                                &$family,
                                _by.or($crate::telemetry::registry::opt!($($label)?)),
                                _value,
                                $crate::telemetry::registry::opt!($($divisor)?),
                            ));
                        )*
                    });
                )*
            }
        }
    )*};
}

pub(crate) use {families, metrics, opt};
