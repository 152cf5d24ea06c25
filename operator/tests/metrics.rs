//! `/metrics` read the way Prometheus reads it: scraped over HTTP from the embedded runtime after a
//! few tasks and parsed with a Prometheus text-format parser (prometheus-parse), then checked for the
//! series operators alert and bill on: tasks by phase, admission decisions by reason, queue lag,
//! reconcile and model-call latency, tokens and cost by model and namespace, queue depth.

use std::time::Duration;

use agentplane::client::{DeviceIdentity, GatewayClient};
use agentplane::runtime::{Embedded, EmbeddedConfig};
use agentplane_api::TaskPhase;
use prometheus_parse::{Scrape, Value};

async fn wait_terminal(client: &GatewayClient, d: &DeviceIdentity, id: &str) -> TaskPhase {
    for _ in 0..400 {
        let v = client.task(d, id).await.unwrap();
        if v.phase.is_terminal() {
            return v.phase;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("task {id} did not finish");
}

fn labelled<'a>(
    scrape: &'a Scrape,
    metric: &str,
    labels: &[(&str, &str)],
) -> Vec<&'a prometheus_parse::Sample> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .collect()
}

fn number(v: &Value) -> f64 {
    match v {
        Value::Counter(n) | Value::Gauge(n) | Value::Untyped(n) => *n,
        Value::Histogram(buckets) => buckets.last().map_or(0.0, |b| b.count),
        Value::Summary(_) => f64::NAN,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_carry_the_series_operators_need() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Embedded::start(EmbeddedConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        join_tokens: vec!["join".into()],
        resync: Duration::from_millis(200),
        ..EmbeddedConfig::default()
    })
    .await
    .unwrap();
    let client = GatewayClient::new(&rt.base_url());
    let d = DeviceIdentity::generate("kiosk-1").unwrap();
    client.enroll("join", &d, "owner").await.unwrap();
    let ok = client
        .submit(&d.sign(&d.intent(1, "summarize", "count me")).unwrap())
        .await
        .unwrap();
    let denied = client
        .submit(&d.sign(&d.intent(2, "shell", "rm -rf /")).unwrap())
        .await
        .unwrap();
    assert_eq!(
        wait_terminal(&client, &d, &ok.task_id).await,
        TaskPhase::Succeeded
    );
    assert_eq!(
        wait_terminal(&client, &d, &denied.task_id).await,
        TaskPhase::Denied
    );

    let resp = reqwest::get(format!("{}/metrics", rt.base_url()))
        .await
        .unwrap();
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = resp.text().await.unwrap();
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("parses");

    let one = |metric: &str, labels: &[(&str, &str)]| -> f64 {
        let found = labelled(&scrape, metric, labels);
        assert!(!found.is_empty(), "no {metric} {labels:?} in:\n{text}");
        found.iter().map(|s| number(&s.value)).sum()
    };
    // Eventually consistent gauges: the controller sees the terminal events right after the write.
    assert!(one("agentplane_tasks", &[("phase", "Succeeded")]) >= 1.0);
    assert!(one("agentplane_tasks", &[("phase", "Denied")]) >= 1.0);
    assert_eq!(one("agentplane_tasks", &[("phase", "Pending")]), 0.0);
    assert!(
        one(
            "agentplane_admission_decisions_total",
            &[("decision", "admitted")]
        ) >= 1.0
    );
    assert!(
        one(
            "agentplane_admission_decisions_total",
            &[("decision", "denied")]
        ) >= 1.0
    );
    assert!(one("agentplane_queue_lag_seconds_count", &[]) >= 1.0);
    assert!(one("agentplane_reconcile_seconds_count", &[]) >= 2.0);
    assert!(
        one(
            "agentplane_model_call_seconds_count",
            &[("tier", "builtin")]
        ) >= 1.0
    );
    assert_eq!(
        one(
            "agentplane_model_tokens_total",
            &[
                ("model", "builtin"),
                ("namespace", "default"),
                ("direction", "input")
            ]
        ),
        2.0,
        "two words in the prompt"
    );
    assert!(
        one(
            "agentplane_cost_micros_total",
            &[("model", "builtin"), ("namespace", "default")]
        ) > 0.0
    );
    assert!(
        one(
            "agentplane_task_transitions_total",
            &[("phase", "Succeeded")]
        ) >= 1.0
    );
    assert!(one("agentplane_intents_total", &[("outcome", "accepted")]) >= 2.0);
    // Sampled every few seconds by the worker.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let text = reqwest::get(format!("{}/metrics", rt.base_url()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
        if let Some(s) = labelled(&scrape, "agentplane_queue_depth", &[]).first() {
            assert_eq!(number(&s.value), 0.0);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no queue depth sample"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    rt.stop().await;
}
