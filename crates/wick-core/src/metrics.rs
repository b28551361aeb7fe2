//! Every Prometheus series Wick exports: names, help text and buckets live here and nowhere
//! else. The engine loop updates them after each step; the server only renders them.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5,
    5.0, 10.0, 20.0, 40.0, 80.0,
];
const E2E_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0,
];
const STEP_TOKEN_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];

/// The engine's series. Cloning shares them (they are reference-counted inside).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub requests_running: IntGauge,
    pub requests_waiting: IntGauge,
    pub kv_blocks_used: IntGauge,
    pub kv_blocks_total: IntGauge,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub request_success: IntCounterVec,
    pub requests_rejected: IntCounterVec,
    pub preemptions: IntCounter,
    pub prefix_cache_queries: IntCounter,
    pub prefix_cache_hits: IntCounter,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub e2e_request_latency: Histogram,
    pub step_tokens: Histogram,
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric name");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric name");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn counter_vec(registry: &Registry, name: &str, help: &str, label: &str) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric name");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("valid histogram");
    registry
        .register(Box::new(h.clone()))
        .expect("unique metric");
    h
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
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
            requests_rejected: counter_vec(
                &r,
                "wick_requests_rejected_total",
                "Requests refused before they reached the engine, by reason.",
                "reason",
            ),
            preemptions: counter(
                &r,
                "wick_preemptions_total",
                "Sequences preempted (KV blocks freed, to be recomputed).",
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
            e2e_request_latency: histogram(
                &r,
                "wick_e2e_request_latency_seconds",
                "Time from a request's arrival to its end.",
                E2E_BUCKETS,
            ),
            step_tokens: histogram(
                &r,
                "wick_step_tokens",
                "Tokens computed in one engine step, over all scheduled sequences.",
                STEP_TOKEN_BUCKETS,
            ),
            registry: r,
        };
        for reason in ["stop", "length", "abort"] {
            m.request_success.with_label_values(&[reason]);
        }
        for reason in ["queue_full", "queue_timeout"] {
            m.requests_rejected.with_label_values(&[reason]);
        }
        m
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
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
    }
}
