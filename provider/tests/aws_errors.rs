//! AWS error handling through the real SDK client the provider builds: throttling is retried
//! with backoff, access denied is reported once with the resource named.
//!
//! moto cannot be told to throttle or deny, so a scripted SQS endpoint on 127.0.0.1 plays the
//! failing service. It speaks just enough of SQS's JSON protocol for `agentplane_queue` reads.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use terraform_provider_agentplane::config::{
    AwsSettings, Endpoints, KubeSettings, ProviderData, StaticKeys,
};
use terraform_provider_agentplane::framework::{Resource, Value};
use terraform_provider_agentplane::resources::queue::Queue;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

#[derive(Default)]
struct Script {
    /// Error responses (status, __type) served before normal answers.
    errors: VecDeque<(u16, &'static str)>,
    /// Repeat the last error forever.
    sticky: Option<(u16, &'static str)>,
    /// X-Amz-Target of every request received.
    seen: Vec<String>,
}

async fn serve(script: Arc<Mutex<Script>>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let script = script.clone();
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut r = BufReader::new(r);
                loop {
                    let (mut target, mut len) = (String::new(), 0usize);
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let line = line.trim_end();
                        if line.is_empty() {
                            break;
                        }
                        let lower = line.to_ascii_lowercase();
                        if let Some(v) = lower.strip_prefix("x-amz-target:") {
                            target = v.trim().to_string();
                        } else if let Some(v) = lower.strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; len];
                    r.read_exact(&mut body).await.unwrap();
                    let (status, payload) = {
                        let mut s = script.lock().unwrap();
                        s.seen.push(target.clone());
                        match s.errors.pop_front().or(s.sticky) {
                            Some((code, ty)) => (
                                code,
                                format!(r#"{{"__type":"{ty}","message":"scripted {ty}"}}"#),
                            ),
                            None => (200, answer(&target, &body)),
                        }
                    };
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/x-amz-json-1.0\r\ncontent-length: {}\r\n\r\n{payload}",
                        payload.len()
                    );
                    if w.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("http://{addr}")
}

/// The answer to a successful call. GetQueueAttributes of the DLQ (its URL in the request
/// body) answers the DLQ's own ARN: the read only keeps `max_receive_count` when the redrive
/// targets that ARN.
fn answer(target: &str, body: &[u8]) -> String {
    let about_dlq = String::from_utf8_lossy(body).contains("jobs-dlq");
    match target {
        "amazonsqs.getqueueattributes" if about_dlq => r#"{"Attributes":{"QueueArn":"arn:aws:sqs:us-east-1:123456789012:jobs-dlq","MessageRetentionPeriod":"1209600"}}"#.into(),
        "amazonsqs.getqueueattributes" => r#"{"Attributes":{"QueueArn":"arn:aws:sqs:us-east-1:123456789012:jobs","VisibilityTimeout":"30","MessageRetentionPeriod":"345600","ReceiveMessageWaitTimeSeconds":"0","DelaySeconds":"0","RedrivePolicy":"{\"deadLetterTargetArn\":\"arn:aws:sqs:us-east-1:123456789012:jobs-dlq\",\"maxReceiveCount\":5}"}}"#.into(),
        "amazonsqs.listqueuetags" => r#"{"Tags":{}}"#.into(),
        "amazonsqs.getqueueurl" => r#"{"QueueUrl":"http://127.0.0.1/123456789012/jobs-dlq"}"#.into(),
        _ => "{}".into(),
    }
}

fn data(endpoint: String, max_retries: u32) -> ProviderData {
    ProviderData::new(
        AwsSettings {
            region: Some("us-east-1".into()),
            profile: None,
            keys: Some(StaticKeys {
                access_key: "testing".into(),
                secret_key: "testing".into(),
                token: None,
            }),
            endpoints: Endpoints {
                sqs: Some(endpoint),
                kms: None,
                eks: None,
            },
            max_retries,
            timeouts: Default::default(),
        },
        KubeSettings::default(),
    )
}

fn state() -> Value {
    Queue
        .import_state("http://127.0.0.1/123456789012/jobs")
        .unwrap()
}

#[tokio::test]
async fn throttling_is_retried_with_backoff() {
    let script = Arc::new(Mutex::new(Script::default()));
    script.lock().unwrap().errors.extend([
        (400, "ThrottlingException"),
        (400, "com.amazonaws.sqs#RequestThrottled"),
    ]);
    let d = data(serve(script.clone()).await, 8);
    let t = std::time::Instant::now();
    let s = Queue
        .read(&d, &state())
        .await
        .unwrap()
        .expect("queue exists");
    assert_eq!(s.get("max_receive_count"), &Value::int(5));
    let seen = script.lock().unwrap().seen.clone();
    assert_eq!(
        &seen[..3],
        ["amazonsqs.getqueueattributes"; 3],
        "the throttled call is retried: {seen:?}"
    );
    // Two backoffs happened (the first starts around 200 ms, with jitter).
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(50),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn throttling_beyond_the_budget_is_a_clear_diagnostic() {
    let script = Arc::new(Mutex::new(Script {
        sticky: Some((400, "ThrottlingException")),
        ..Default::default()
    }));
    let d = data(serve(script.clone()).await, 1);
    let diags = Queue.read(&d, &state()).await.unwrap_err();
    assert_eq!(
        script.lock().unwrap().seen.len(),
        2,
        "one try plus max_retries = 1"
    );
    assert!(
        diags.0[0]
            .summary
            .contains("kept throttling sqs:GetQueueAttributes"),
        "{diags}"
    );
    assert!(diags.0[0].detail.contains("max_retries"), "{diags}");
}

#[tokio::test]
async fn access_denied_names_the_resource_and_is_not_retried() {
    let script = Arc::new(Mutex::new(Script {
        sticky: Some((400, "com.amazon.coral.service#AccessDeniedException")),
        ..Default::default()
    }));
    let d = data(serve(script.clone()).await, 8);
    let diags = Queue.read(&d, &state()).await.unwrap_err();
    assert_eq!(
        script.lock().unwrap().seen.len(),
        1,
        "access denied must not be retried"
    );
    assert_eq!(
        diags.0[0].summary,
        "Access denied to agentplane_queue \"jobs\""
    );
    assert!(
        diags.0[0].detail.contains("sqs:GetQueueAttributes"),
        "{diags}"
    );
}
