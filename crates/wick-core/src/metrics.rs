//! Every Prometheus series Wick exports: names, help text and buckets live here and nowhere
//! else. The engine loop updates them after each step; the server only renders them.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5,
    5.0, 10.0, 20.0, 40.0, 80.0,
];
const REQUEST_TIME_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0,
];
const STEP_TOKEN_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];
const BATCH_SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
const LENGTH_BUCKETS: &[f64] = &[
    1.0, 4.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
    32768.0, 65536.0, 131072.0,
];
const STEP_TIME_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12,
];

pub use crate::error_type;

/// The engine's series. Cloning shares them (they are reference-counted inside).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub requests_running: IntGauge,
    pub requests_waiting: IntGauge,
    pub kv_blocks_used: IntGauge,
    pub kv_blocks_total: IntGauge,
    pub kv_cache_usage: Gauge,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub request_success: IntCounterVec,
    pub request_failure: IntCounterVec,
    pub preemptions: IntCounter,
    pub engine_stalls: IntCounter,
    pub prefix_cache_queries: IntCounter,
    pub prefix_cache_hits: IntCounter,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub time_per_output_token: Histogram,
    pub e2e_request_latency: Histogram,
    pub queue_time: Histogram,
    pub prefill_time: Histogram,
    pub decode_time: Histogram,
    pub prompt_length: Histogram,
    pub generation_length: Histogram,
    pub step_tokens: Histogram,
    pub step_batch_size: Histogram,
    pub step_duration: Histogram,
}

fn register<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    // Names are constants of this module, each registered once: a failure is a bug here.
    registry
        .register(Box::new(c.clone()))
        .expect("unique, valid metric");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    register(r, IntGauge::new(name, help).expect("valid metric name"))
}

fn float_gauge(r: &Registry, name: &str, help: &str) -> Gauge {
    register(r, Gauge::new(name, help).expect("valid metric name"))
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    register(r, IntCounter::new(name, help).expect("valid metric name"))
}

fn counter_vec(r: &Registry, name: &str, help: &str, label: &str) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric name");
    register(r, c)
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("valid histogram");
    register(r, h)
}

impl Metrics {
    /// Series without a `model` label (tests, tools).
    pub fn new() -> Self {
        Self::with_registry(Registry::new())
    }

    /// Every series labelled `model="<name>"`: the name clients use, so that dashboards and
    /// routers can tell replicas of different models apart.
    pub fn for_model(name: &str) -> Self {
        let labels = std::collections::HashMap::from([("model".to_string(), name.to_string())]);
        // A registry with constant labels only fails on an invalid label name, and "model"
        // is valid.
        Self::with_registry(Registry::new_custom(None, Some(labels)).expect("valid labels"))
    }

    fn with_registry(r: Registry) -> Self {
        let m = Metrics {
            requests_running: gauge(&r, "wick_requests_running", "Requests being computed."),
            requests_waiting: gauge(
                &r,
                "wick_requests_waiting",
                "Requests accepted and waiting to be scheduled, including queued ones.",
            ),
            kv_blocks_used: gauge(&r, "wick_kv_cache_blocks_used", "KV cache blocks in use."),
            kv_blocks_total: gauge(
                &r,
                "wick_kv_cache_blocks",
                "KV cache blocks in all, used or free.",
            ),
            kv_cache_usage: float_gauge(
                &r,
                "wick_kv_cache_usage_ratio",
                "Fraction of the KV cache blocks in use, 0 to 1.",
            ),
            prompt_tokens: counter(
                &r,
                "wick_prompt_tokens_total",
                "Prompt tokens of the requests accepted.",
            ),
            generation_tokens: counter(&r, "wick_generation_tokens_total", "Tokens generated."),
            request_success: counter_vec(
                &r,
                "wick_request_success_total",
                "Requests that finished, by finish reason.",
                "finish_reason",
            ),
            request_failure: counter_vec(
                &r,
                "wick_request_failure_total",
                "Requests that ended with an error or were refused for load, by error type.",
                "error_type",
            ),
            preemptions: counter(
                &r,
                "wick_preemptions_total",
                "Sequences preempted (KV blocks freed, to be recomputed).",
            ),
            engine_stalls: counter(
                &r,
                "wick_engine_stalls_total",
                "Times the engine had work and did not move (no step began or ended) for --step-timeout.",
            ),
            prefix_cache_queries: counter(
                &r,
                "wick_prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache.",
            ),
            prefix_cache_hits: counter(
                &r,
                "wick_prefix_cache_hits_total",
                "Prompt tokens found in the prefix cache (not recomputed).",
            ),
            time_to_first_token: histogram(
                &r,
                "wick_time_to_first_token_seconds",
                "Time from a request's arrival to its first generated token.",
                LATENCY_BUCKETS,
            ),
            inter_token_latency: histogram(
                &r,
                "wick_inter_token_latency_seconds",
                "Time between two consecutive generated tokens of one request.",
                LATENCY_BUCKETS,
            ),
            time_per_output_token: histogram(
                &r,
                "wick_time_per_output_token_seconds",
                "Per request: decode time divided by the tokens after the first.",
                LATENCY_BUCKETS,
            ),
            e2e_request_latency: histogram(
                &r,
                "wick_e2e_request_latency_seconds",
                "Time from a request's arrival to its end.",
                REQUEST_TIME_BUCKETS,
            ),
            queue_time: histogram(
                &r,
                "wick_request_queue_time_seconds",
                "Time from a request's arrival to its first scheduled step.",
                REQUEST_TIME_BUCKETS,
            ),
            prefill_time: histogram(
                &r,
                "wick_request_prefill_time_seconds",
                "Time from a request's first scheduled step to its first generated token.",
                REQUEST_TIME_BUCKETS,
            ),
            decode_time: histogram(
                &r,
                "wick_request_decode_time_seconds",
                "Time from a request's first generated token to its end.",
                REQUEST_TIME_BUCKETS,
            ),
            prompt_length: histogram(
                &r,
                "wick_request_prompt_tokens",
                "Prompt length of the requests that finished, in tokens.",
                LENGTH_BUCKETS,
            ),
            generation_length: histogram(
                &r,
                "wick_request_generation_tokens",
                "Tokens generated by the requests that finished.",
                LENGTH_BUCKETS,
            ),
            step_tokens: histogram(
                &r,
                "wick_step_tokens",
                "Tokens computed in one engine step, over all scheduled sequences.",
                STEP_TOKEN_BUCKETS,
            ),
            step_batch_size: histogram(
                &r,
                "wick_step_batch_size",
                "Sequences computed together in one engine step.",
                BATCH_SIZE_BUCKETS,
            ),
            step_duration: histogram(
                &r,
                "wick_step_duration_seconds",
                "Time of one engine step: the batched forward pass and sampling.",
                STEP_TIME_BUCKETS,
            ),
            registry: r,
        };
        for reason in ["stop", "length", "abort"] {
            m.request_success.with_label_values(&[reason]);
        }
        for kind in error_type::ALL {
            m.request_failure.with_label_values(&[kind]);
        }
        m
    }

    /// Counts one failed or refused request.
    pub fn failure(&self, error_type: &str) {
        self.request_failure.with_label_values(&[error_type]).inc();
    }

    /// Name, type (`counter`, `gauge`, `histogram`) and help of every series, sorted by name.
    pub fn describe(&self) -> Vec<(String, String, String)> {
        self.registry
            .gather()
            .iter()
            .map(|f| {
                let kind = match f.get_field_type() {
                    prometheus::proto::MetricType::COUNTER => "counter",
                    prometheus::proto::MetricType::GAUGE => "gauge",
                    prometheus::proto::MetricType::HISTOGRAM => "histogram",
                    prometheus::proto::MetricType::SUMMARY => "summary",
                    prometheus::proto::MetricType::UNTYPED => "untyped",
                };
                (f.name().to_string(), kind.to_string(), f.help().to_string())
            })
            .collect()
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        Self::render_all(&[self])
    }

    /// The series of several models (each with its own `model` label) in one exposition:
    /// each metric family once, with every model's samples under it.
    pub fn render_all(all: &[&Metrics]) -> String {
        let mut families: Vec<prometheus::proto::MetricFamily> = Vec::new();
        for m in all {
            for mut f in m.registry.gather() {
                match families.iter_mut().find(|g| g.name() == f.name()) {
                    Some(g) => g.mut_metric().extend(f.take_metric()),
                    None => families.push(f),
                }
            }
        }
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&families, &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_models_render_each_family_once() {
        let (a, b) = (Metrics::for_model("a"), Metrics::for_model("b"));
        a.prompt_tokens.inc_by(3);
        b.prompt_tokens.inc_by(5);
        let text = Metrics::render_all(&[&a, &b]);
        assert_eq!(
            text.matches("# TYPE wick_prompt_tokens_total counter")
                .count(),
            1
        );
        assert!(
            text.contains("wick_prompt_tokens_total{model=\"a\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("wick_prompt_tokens_total{model=\"b\"} 5"),
            "{text}"
        );
    }

    #[test]
    fn renders_help_type_and_buckets() {
        let m = Metrics::new();
        m.time_to_first_token.observe(0.03);
        m.prompt_tokens.inc_by(7);
        let text = m.render();
        assert!(text.contains("# HELP wick_time_to_first_token_seconds"));
        assert!(text.contains("# TYPE wick_time_to_first_token_seconds histogram"));
        assert!(text.contains("wick_time_to_first_token_seconds_bucket{le=\"0.04\"} 1"));
        assert!(text.contains("wick_prompt_tokens_total 7"));
        assert!(text.contains("wick_request_success_total{finish_reason=\"stop\"} 0"));
        assert!(text.contains("wick_request_failure_total{error_type=\"queue_full\"} 0"));
    }

    /// docs/metrics.md lists exactly the series this module registers, with their types and
    /// help texts.
    #[test]
    fn the_docs_table_matches_the_registry() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/metrics.md");
        let doc = std::fs::read_to_string(path).expect("docs/metrics.md");
        let mut documented: Vec<(String, String, String)> = doc
            .lines()
            .filter(|l| l.starts_with("| `wick_"))
            .map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                (
                    cells[1].trim_matches('`').to_string(),
                    cells[2].to_string(),
                    cells[4].to_string(),
                )
            })
            .collect();
        documented.sort();
        assert_eq!(documented, Metrics::new().describe());
    }
}
