//! The local HTTP API the UI uses: submit, list, get, the Host check, and the errors a user must see.

use std::sync::Arc;

use agentplane_edge::capture::{Capturer, LocalPolicy};
use agentplane_edge::identity::SoftKey;
use agentplane_edge::outbox::{Outbox, OutboxConfig};
use agentplane_edge::sender::Link;
use agentplane_edge::ui::{UiState, allowed_hosts, router};
use reqwest_edge as reqwest;
use serde_json::{Value, json};

async fn serve(max_unfinished: u64) -> (String, tempfile::TempDir) {
    agentplane_edge::gateway::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = OutboxConfig::new(dir.path().join("o.db"));
    cfg.max_unfinished = max_unfinished;
    let capturer = Capturer {
        outbox: Outbox::open(cfg).unwrap(),
        signer: Arc::new(SoftKey::generate().unwrap()),
        device_id: "kiosk-1".into(),
        default_user: "alice".into(),
        policy: LocalPolicy::default(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(UiState {
        capturer,
        link: Arc::new(Link::default()),
        wake: Arc::new(tokio::sync::Notify::new()),
        local_wake: Arc::new(tokio::sync::Notify::new()),
        allowed_hosts: Arc::new(allowed_hosts(addr)),
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), dir)
}

#[tokio::test]
async fn submit_list_get_and_static_files() {
    let (base, _dir) = serve(100).await;
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{base}/api/intents"))
        .json(&json!({"type": "summarize", "prompt": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let accepted: Value = r.json().await.unwrap();
    assert_eq!(accepted["seq"], 1);
    let id = accepted["taskId"].as_str().unwrap().to_owned();

    let list: Value = http
        .get(format!("{base}/api/intents"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list[0]["taskId"], id.as_str());
    assert_eq!(list[0]["state"], "pending");
    assert!(
        list[0].get("envelope").is_none(),
        "the envelope stays internal"
    );

    let one: Value = http
        .get(format!("{base}/api/intents/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one["prompt"], "hello");
    let missing = http
        .get(format!("{base}/api/intents/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    let state: Value = http
        .get(format!("{base}/api/state"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(state["deviceId"], "kiosk-1");
    assert_eq!(state["counts"]["pending"], 1);
    assert!(state["link"]["online"].is_null());

    for (path, ct) in [
        ("/", "text/html"),
        ("/app.js", "text/javascript"),
        ("/style.css", "text/css"),
    ] {
        let r = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let got = r.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(got.starts_with(ct), "{path}: {got}");
        let body = r.text().await.unwrap();
        assert!(
            !body.contains("http://") && !body.contains("https://"),
            "{path} must not load anything remote"
        );
    }
}

#[tokio::test]
async fn refuses_what_it_must() {
    let (base, _dir) = serve(2).await;
    let http = reqwest::Client::new();
    let post = |body: Value| http.post(format!("{base}/api/intents")).json(&body).send();

    // DNS rebinding: a page served from another name pointing at 127.0.0.1.
    let r = http
        .get(format!("{base}/api/state"))
        .header("Host", "evil.example:7420")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 421);

    // A cross-site form post cannot send JSON.
    let r = http
        .post(format!("{base}/api/intents"))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("type=x&prompt=y")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);

    let r = http
        .post(format!("{base}/api/intents"))
        .header("Content-Type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    let r = post(json!({"type": "bad type!", "prompt": "x"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = post(json!({"type": "t", "prompt": "x", "privacyLevel": "private"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "private_stays_local");

    assert_eq!(
        post(json!({"type": "t", "prompt": "1"}))
            .await
            .unwrap()
            .status(),
        201
    );
    assert_eq!(
        post(json!({"type": "t", "prompt": "2"}))
            .await
            .unwrap()
            .status(),
        201
    );
    let r = post(json!({"type": "t", "prompt": "3"})).await.unwrap();
    assert_eq!(r.status(), 507);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "outbox_full");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("already queued intents are safe")
    );
}
