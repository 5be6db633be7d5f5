//! Logs and traces: the `tracing` subscriber the binary installs.
//!
//! Logs go to stderr as text or JSON lines, filtered by `CACHEGW_LOG` (or
//! `RUST_LOG`; default `info`). Where something reads them, a `debug` filter
//! or span export, every RPC runs in a `request` span (op, namespace, outcome,
//! deciding policy version), so its log lines carry them; at `info` none is
//! opened (see `api::cache_service`).
//! With the `otel` cargo feature and an OTLP endpoint, the spans are also
//! exported over OTLP/gRPC.

use std::{
    io::IsTerminal,
    sync::atomic::{AtomicBool, Ordering},
};

use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};

/// Spans go to an OTLP endpoint (set once by [`init`]).
static SPANS_EXPORTED: AtomicBool = AtomicBool::new(false);

/// Whether request spans are exported, so that fields recorded into them
/// are read even when no log line shows them.
pub fn spans_exported() -> bool {
    SPANS_EXPORTED.load(Ordering::Relaxed)
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Keeps the exporter alive; flushes pending spans when dropped.
#[must_use = "dropping the guard stops the span export"]
pub struct TelemetryGuard {
    #[cfg(feature = "otel")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        #[cfg(feature = "otel")]
        if let Some(provider) = self.provider.take()
            && let Err(err) = provider.shutdown()
        {
            eprintln!("cachegw: flushing spans to the OTLP endpoint failed: {err}");
        }
    }
}

/// Installs the subscriber. `otlp_endpoint` (e.g. `http://127.0.0.1:4317`)
/// turns on span export; without the `otel` feature asking for it is an
/// error that says how to get it.
pub fn init(format: LogFormat, otlp_endpoint: Option<&str>) -> anyhow::Result<TelemetryGuard> {
    let filter = EnvFilter::try_from_env("CACHEGW_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Text => logs.boxed(),
        LogFormat::Json => logs.json().boxed(),
    };
    let registry = tracing_subscriber::registry().with(filter).with(logs);
    #[cfg(feature = "otel")]
    {
        use opentelemetry::trace::TracerProvider as _;
        use opentelemetry_otlp::WithExportConfig as _;
        let Some(endpoint) = otlp_endpoint else {
            registry.init();
            return Ok(TelemetryGuard { provider: None });
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|err| anyhow::anyhow!("cannot export spans to {endpoint}: {err}"))?;
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name("cachegw")
                    .build(),
            )
            .build();
        let tracer = provider.tracer("cachegw");
        registry
            .with(tracing_opentelemetry::layer().with_tracer(tracer))
            .init();
        SPANS_EXPORTED.store(true, Ordering::Relaxed);
        Ok(TelemetryGuard {
            provider: Some(provider),
        })
    }
    #[cfg(not(feature = "otel"))]
    {
        if let Some(endpoint) = otlp_endpoint {
            anyhow::bail!(
                "span export to {endpoint} needs the `otel` feature: build with `cargo build --release --features otel`"
            );
        }
        registry.init();
        Ok(TelemetryGuard {})
    }
}
