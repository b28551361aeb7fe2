//! The Grafana dashboard (deploy/grafana/wick.json) queries only the series docs/metrics.md
//! lists, every query is per model, and the panels the operators need are there.

mod common;

use serde_json::Value;

/// Every `expr` of the dashboard's panels.
fn queries(dashboard: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for t in panel["targets"].as_array().expect("targets") {
            out.push(t["expr"].as_str().expect("expr").to_string());
        }
    }
    out
}

/// The Wick series an expression names (`wick_` and what follows it).
fn series(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("wick_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// The series `name` is, or `None`: a documented name, or a histogram's `_bucket`, `_sum` or
/// `_count`.
fn documented(name: &str, docs: &[(String, String)]) -> bool {
    docs.iter().any(|(n, kind)| {
        n == name
            || (kind == "histogram"
                && ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| name.strip_suffix(s) == Some(n.as_str())))
    })
}

#[test]
fn every_dashboard_query_uses_documented_series_per_model() {
    let path = common::repo_root().join("deploy/grafana/wick.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let docs = common::documented_metrics();
    assert!(
        docs.len() > 20,
        "docs/metrics.md lists {} series",
        docs.len()
    );
    let exprs = queries(&dashboard);
    assert!(exprs.len() >= 12, "{} queries", exprs.len());
    let mut used = Vec::new();
    for e in &exprs {
        let names = series(e);
        assert!(!names.is_empty(), "a query without a Wick series: {e}");
        for n in names {
            assert!(documented(&n, &docs), "{n} is not in docs/metrics.md: {e}");
            used.push(n);
        }
        assert!(
            e.contains(r#"model=~"$model""#),
            "not filtered by the model variable: {e}"
        );
        assert!(
            e.contains("by (") && e.contains("model"),
            "not per model: {e}"
        );
        assert_eq!(e.matches('(').count(), e.matches(')').count(), "{e}");
    }
    // What the issue asks the dashboard to show.
    for needed in [
        "wick_request_success_total",
        "wick_request_failure_total",
        "wick_time_to_first_token_seconds_bucket",
        "wick_inter_token_latency_seconds_bucket",
        "wick_e2e_request_latency_seconds_bucket",
        "wick_generation_tokens_total",
        "wick_requests_running",
        "wick_requests_waiting",
        "wick_kv_cache_usage_ratio",
        "wick_preemptions_total",
        "wick_prefix_cache_hits_total",
        "wick_prefix_cache_queries_total",
    ] {
        assert!(used.iter().any(|u| u == needed), "no panel shows {needed}");
    }
    promql_parses(&exprs);
    // The model variable lists the served models from a documented series.
    let var = &dashboard["templating"]["list"][1];
    assert_eq!(var["name"], "model");
    let q = var["definition"].as_str().unwrap();
    assert!(series(q).iter().all(|n| documented(n, &docs)), "{q}");
}

#[test]
fn the_checker_catches_undocumented_series() {
    let docs = common::documented_metrics();
    assert_eq!(
        series("rate(wick_made_up_total[5m]) / wick_requests_running"),
        vec!["wick_made_up_total", "wick_requests_running"]
    );
    assert!(!documented("wick_made_up_total", &docs));
    assert!(documented("wick_step_duration_seconds_bucket", &docs));
    // Only histograms have buckets.
    assert!(!documented("wick_requests_running_bucket", &docs));
}

/// Every query parses as PromQL: `promtool check rules` on a rule file of them (Grafana's
/// variables replaced by values), when promtool is installed (CI installs it and requires it).
fn promql_parses(exprs: &[String]) {
    let dir = tempfile::tempdir().unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        let e = e.replace("$__rate_interval", "5m").replace("$model", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:q{i}\n        expr: {}\n",
            serde_json::to_string(&e).unwrap()
        ));
    }
    let file = dir.path().join("rules.yml");
    std::fs::write(&file, rules).unwrap();
    let out = match std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
    {
        Ok(o) => o,
        Err(_) if std::env::var("CI").is_err() => {
            eprintln!("promtool not installed: skipping the PromQL check");
            return;
        }
        Err(e) => panic!("promtool is required in CI: {e}"),
    };
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
