//! One contract for every [`TaskQueue`] backend, written once over `&dyn TaskQueue` and run against
//! the embedded SQLite queue, a standard SQS queue and a FIFO SQS queue (both on moto, the shared
//! real-peer stack).
//!
//! Where a backend legitimately differs the check asserts what that backend does and says why
//! ([`Pair::refuses_stale_leases`], [`Pair::deduplicates`], [`Pair::dedup_returns_first_id`]). Known
//! moto gaps (DESIGN.md §6) are stated at the assertion that depends on them.
//!
//! Timing: leases are 1-2 s, and every wait for something to *happen* polls against a deadline, so a
//! loaded machine makes the run slower, not flaky. A check that something has *not happened yet*
//! only asserts while the time it depends on has not run out (see [`assert_hidden_while`]).

use std::collections::BTreeMap;
use std::time::Duration;

use agentplane::queue::sqlite::{Redrive, SqliteQueue};
use agentplane::queue::sqs::{SqsQueue, ensure_queue_pair};
use agentplane::queue::{
    ATTR_TASK_ID, ATTR_TRACEPARENT, Delivery, DynQueue, LeaseId, Outgoing, QueueError, TaskQueue,
};
use agentplane::store::sqlite::Db;
use tokio::time::Instant;

/// Receives before a message moves to the dead-letter queue, for every pair.
const MAX_RECEIVE_COUNT: u32 = 2;
/// A lease that outlives any check.
const LONG: Duration = Duration::from_secs(60);
/// How long to wait for something that must happen (a delivery, a redelivery, a depth).
const DEADLINE: Duration = Duration::from_secs(30);
/// Slack for comparing our monotonic clock with the backend's wall clock (same machine).
const CLOCK_SLACK: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Sqs,
    SqsFifo,
}

/// A fresh main queue and its dead-letter queue, redriving after [`MAX_RECEIVE_COUNT`] receives.
struct Pair {
    backend: Backend,
    main: DynQueue,
    dlq: DynQueue,
    // Keeps the SQLite file alive as long as the queues.
    _dir: Option<tempfile::TempDir>,
}

impl Pair {
    /// Whether a lease is refused once its message was received again.
    ///
    /// The embedded queue refuses it for every operation. Real SQS refuses it on
    /// ChangeMessageVisibility (InvalidParameterValue "The receipt handle has expired", or
    /// ReceiptHandleIsInvalid / MessageNotInflight), which `SqsQueue` maps to `LeaseExpired`; but
    /// moto 5.2.5 accepts any receipt handle a message ever had (`Message.had_receipt_handle`), for
    /// ChangeMessageVisibility and DeleteMessage alike. That gap needs real SQS to close.
    fn refuses_stale_leases(&self) -> bool {
        self.backend == Backend::Sqlite
    }

    /// Standard SQS queues never deduplicate; the embedded queue always honours `dedup_id`.
    fn deduplicates(&self) -> bool {
        self.backend != Backend::Sqs
    }

    /// The embedded queue answers a deduplicated send with the first message's id. SQS FIFO
    /// accepts the duplicate without promising that (moto returns a new id), so callers must not
    /// rely on it.
    fn dedup_returns_first_id(&self) -> bool {
        self.backend == Backend::Sqlite
    }
}

async fn fresh_pair(backend: Backend, check: &str) -> Pair {
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().expect("tempdir");
            let db = Db::open(&dir.path().join("queue.sqlite")).expect("open the embedded db");
            let main = SqliteQueue::new(
                db.clone(),
                "tasks",
                Some(Redrive {
                    dead_letter_queue: "tasks-dlq".into(),
                    max_receive_count: MAX_RECEIVE_COUNT,
                }),
            );
            let dlq = SqliteQueue::new(db, "tasks-dlq", None);
            Pair {
                backend,
                main,
                dlq,
                _dir: Some(dir),
            }
        }
        Backend::Sqs | Backend::SqsFifo => {
            let client = sqs_client().await;
            let name = unique_name(check);
            let pair = ensure_queue_pair(
                &client,
                &name,
                backend == Backend::SqsFifo,
                MAX_RECEIVE_COUNT,
                Duration::from_secs(30),
            )
            .await
            .expect("create the queue pair on moto");
            Pair {
                backend,
                main: SqsQueue::new(client.clone(), pair.queue_url),
                dlq: SqsQueue::new(client, pair.dlq_url),
                _dir: None,
            }
        }
    }
}

async fn sqs_client() -> aws_sdk_sqs::Client {
    let stack = agentplane_testsupport::Stack::shared().expect("the real-peer stack");
    aws_sdk_sqs::Client::new(&stack.aws_sdk_config().await)
}

/// Queue names are unique per run because the moto instance is shared by the whole test binary.
fn unique_name(check: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let check: String = check.chars().take(40).collect();
    format!("qc-{}-{}", check.replace('_', "-"), &id[..12])
}

fn outgoing(task: &str) -> Outgoing {
    Outgoing {
        body: format!(
            r#"{{"task":{{"namespace":"ns","name":"{task}","uid":"{task}"}},"tier":"small","attempt":1}}"#
        ),
        attributes: BTreeMap::from([
            (
                ATTR_TRACEPARENT.to_owned(),
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
            ),
            (ATTR_TASK_ID.to_owned(), task.to_owned()),
        ]),
        // One group per task keeps FIFO ordering out of checks that are not about it.
        group_id: Some(format!("device-{task}")),
        dedup_id: Some(task.to_owned()),
    }
}

/// Polls until at least one message arrives or `within` passes; returns what arrived.
async fn receive_within(
    q: &dyn TaskQueue,
    max: usize,
    visibility: Duration,
    within: Duration,
) -> Vec<Delivery> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let got = q
            .receive(max, visibility, left.min(Duration::from_secs(1)))
            .await
            .expect("receive");
        if !got.is_empty() || Instant::now() >= deadline {
            return got;
        }
    }
}

/// Receives exactly one message, failing the check if none arrives before [`DEADLINE`].
async fn receive_one(q: &dyn TaskQueue, visibility: Duration) -> Delivery {
    let mut got = receive_within(q, 1, visibility, DEADLINE).await;
    assert_eq!(got.len(), 1, "expected one message within {DEADLINE:?}");
    got.remove(0)
}

/// Asserts nothing is visible, provided the check runs before `until` (when a lease or delay
/// could have run out and the message legitimately reappear). Returns whether it asserted.
async fn assert_hidden_while(q: &dyn TaskQueue, until: Instant, what: &str) -> bool {
    if Instant::now() + Duration::from_millis(300) >= until {
        eprintln!("{what}: machine too slow to check before the lease ran out; not asserted");
        return false;
    }
    let got = q.receive(10, LONG, Duration::ZERO).await.expect("receive");
    if Instant::now() < until {
        assert!(
            got.is_empty(),
            "{what}: message visible while it should be hidden"
        );
        true
    } else {
        eprintln!("{what}: the receive returned after the lease ran out; not asserted");
        false
    }
}

/// Polls `depth` until it equals `expected` (SQS's counts are approximate and may lag).
async fn assert_depth(q: &dyn TaskQueue, expected: u64, what: &str) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let depth = q.depth().await.expect("depth");
        if depth == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: depth {depth}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn assert_lease_expired(r: Result<(), QueueError>, what: &str) {
    assert!(
        matches!(r, Err(QueueError::LeaseExpired(_))),
        "{what}: expected LeaseExpired, got {r:?}"
    );
}

// ---- the contract ------------------------------------------------------------------------------

async fn round_trip_with_attributes(p: &Pair) {
    let q = &*p.main;
    let sent = outgoing("t-round-trip");
    let id = q.send(sent.clone()).await.expect("send");
    assert!(!id.is_empty());

    let d = receive_one(q, LONG).await;
    assert_eq!(d.message_id, id);
    assert_eq!(d.body, sent.body);
    assert_eq!(
        d.attributes, sent.attributes,
        "attributes round trip exactly"
    );
    assert_eq!(d.receive_count, 1);

    q.delete(&d.lease).await.expect("delete with a live lease");
    assert_depth(q, 0, "after delete").await;
    assert!(
        receive_within(q, 10, LONG, Duration::from_secs(1))
            .await
            .is_empty(),
        "a deleted message is never delivered again"
    );
}

async fn hidden_while_leased(p: &Pair) {
    let q = &*p.main;
    q.send(outgoing("t-hidden-1")).await.expect("send");
    q.send(outgoing("t-hidden-2")).await.expect("send");
    let start = Instant::now();
    let mut leased = Vec::new();
    while leased.len() < 2 {
        assert!(
            start.elapsed() < DEADLINE,
            "only {} of 2 arrived",
            leased.len()
        );
        leased.extend(receive_within(q, 10, LONG, Duration::from_secs(1)).await);
    }
    assert_eq!(leased.len(), 2);
    assert_ne!(leased[0].message_id, leased[1].message_id);
    // A long poll sees nothing: both are leased.
    let got = q
        .receive(10, LONG, Duration::from_secs(1))
        .await
        .expect("receive");
    assert!(got.is_empty(), "leased messages are hidden: {got:?}");
    // ... but still counted.
    assert_depth(q, 2, "in-flight messages").await;
    for d in &leased {
        q.delete(&d.lease).await.expect("delete");
    }
}

async fn visibility_expiry_redelivers(p: &Pair) {
    let q = &*p.main;
    let vis = Duration::from_secs(2);
    let id = q.send(outgoing("t-expiry")).await.expect("send");
    let received_at = Instant::now();
    let first = receive_one(q, vis).await;
    assert_eq!(first.receive_count, 1);
    assert_hidden_while(q, received_at + vis, "during the first lease").await;

    let second = receive_one(q, LONG).await;
    assert!(
        received_at.elapsed() + CLOCK_SLACK >= vis,
        "redelivered after {:?}, before the {vis:?} lease ran out",
        received_at.elapsed()
    );
    assert_eq!(second.message_id, id);
    assert_eq!(second.body, first.body);
    assert_eq!(second.receive_count, 2);
    assert_ne!(second.lease, first.lease, "each receive has its own lease");
    q.delete(&second.lease).await.expect("delete");
}

async fn release_with_delay(p: &Pair) {
    let q = &*p.main;
    let delay = Duration::from_secs(2);
    q.send(outgoing("t-release")).await.expect("send");
    let d = receive_one(q, LONG).await;
    let released_at = Instant::now();
    q.release(&d.lease, delay).await.expect("release");
    assert_hidden_while(q, released_at + delay, "during the release delay").await;

    let again = receive_one(q, LONG).await;
    assert!(
        released_at.elapsed() + CLOCK_SLACK >= delay,
        "visible again after {:?}, before the {delay:?} delay",
        released_at.elapsed()
    );
    assert_eq!(again.message_id, d.message_id);
    assert_eq!(again.receive_count, 2);
    q.delete(&again.lease).await.expect("delete");
}

async fn extend_keeps_hidden(p: &Pair) {
    let q = &*p.main;
    let vis = Duration::from_secs(1);
    let extended = Duration::from_secs(8);
    q.send(outgoing("t-extend")).await.expect("send");
    let received_at = Instant::now();
    let d = receive_one(q, vis).await;
    let extended_at = Instant::now();
    q.extend(&d.lease, extended)
        .await
        .expect("extend a live lease");
    // Waiting for time to pass is the point here: past the first lease, inside the extension.
    tokio::time::sleep_until(received_at + vis + Duration::from_millis(1500)).await;
    let asserted = assert_hidden_while(q, extended_at + extended, "after the extension").await;
    if asserted {
        // The lease is still ours, so the delete goes through.
        q.delete(&d.lease)
            .await
            .expect("delete with the extended lease");
        assert_depth(q, 0, "after delete").await;
    }
}

async fn deduplicates_by_id(p: &Pair) {
    let q = &*p.main;
    let a = q.send(outgoing("t-dedup")).await.expect("first send");
    let b = q.send(outgoing("t-dedup")).await.expect("second send");
    if p.dedup_returns_first_id() {
        assert_eq!(
            a, b,
            "the duplicate is answered with the first message's id"
        );
    }
    let mut got = receive_within(q, 10, LONG, DEADLINE).await;
    // Give a second copy, if any, time to show up too.
    got.extend(receive_within(q, 10, LONG, Duration::from_secs(2)).await);
    if !p.deduplicates() {
        // Standard SQS queues ignore deduplication ids (SqsQueue does not send them there).
        assert_eq!(got.len(), 2, "a standard queue keeps both: {got:?}");
        return;
    }
    assert_eq!(got.len(), 1, "one message for one dedup id: {got:?}");
    assert_eq!(got[0].message_id, a);
    // Still deduplicated while the first is in flight.
    q.send(outgoing("t-dedup"))
        .await
        .expect("third send while in flight");
    assert_depth(q, 1, "duplicates sent while in flight").await;
    // A different id is a different message.
    q.send(outgoing("t-dedup-other")).await.expect("send");
    assert_depth(q, 2, "another dedup id").await;
}

async fn redrive_after_max_receives(p: &Pair) {
    let (q, dlq) = (&*p.main, &*p.dlq);
    let sent = outgoing("t-redrive");
    q.send(sent.clone()).await.expect("send");
    for n in 1..=MAX_RECEIVE_COUNT {
        let d = receive_one(q, LONG).await;
        assert_eq!(d.receive_count, n);
        // A failed attempt: hand it back at once.
        q.release(&d.lease, Duration::ZERO).await.expect("release");
    }
    // Received MAX_RECEIVE_COUNT times: the next receive moves it to the DLQ instead.
    let got = receive_within(q, 10, LONG, Duration::from_secs(2)).await;
    assert!(got.is_empty(), "redriven, not delivered again: {got:?}");

    let dead = receive_one(dlq, LONG).await;
    assert_eq!(dead.body, sent.body);
    assert_eq!(
        dead.attributes, sent.attributes,
        "attributes survive the redrive"
    );
    assert_depth(q, 0, "main queue after redrive").await;
    dlq.delete(&dead.lease)
        .await
        .expect("delete the dead letter");
    assert_depth(dlq, 0, "DLQ after delete").await;
}

async fn depth_counts(p: &Pair) {
    let q = &*p.main;
    assert_depth(q, 0, "fresh queue").await;
    for i in 0..3 {
        q.send(outgoing(&format!("t-depth-{i}")))
            .await
            .expect("send");
    }
    assert_depth(q, 3, "three sent").await;
    let d = receive_one(q, LONG).await;
    assert_depth(q, 3, "one in flight still counts").await;
    q.delete(&d.lease).await.expect("delete");
    assert_depth(q, 2, "one deleted").await;
    let d = receive_one(q, LONG).await;
    q.release(&d.lease, LONG).await.expect("release with delay");
    assert_depth(q, 2, "a delayed message still counts").await;
    assert_depth(&*p.dlq, 0, "DLQ untouched").await;
}

async fn stale_lease_after_redelivery(p: &Pair) {
    let q = &*p.main;
    q.send(outgoing("t-stale")).await.expect("send");
    let first = receive_one(q, Duration::from_secs(1)).await;
    let second = receive_one(q, LONG).await;
    assert_eq!(second.receive_count, 2);

    let stale_extend = q.extend(&first.lease, LONG).await;
    if p.refuses_stale_leases() {
        assert_lease_expired(stale_extend, "extend with the first lease");
        assert_lease_expired(
            q.release(&first.lease, Duration::ZERO).await,
            "release with the first lease",
        );
        assert_lease_expired(q.delete(&first.lease).await, "delete with the first lease");
    } else {
        // moto gap (see Pair::refuses_stale_leases): real SQS answers this with an expired receipt
        // handle error, which SqsQueue turns into LeaseExpired; moto accepts it.
        assert!(
            stale_extend.is_ok(),
            "moto accepts a stale receipt handle: {stale_extend:?}"
        );
    }
    // The current lease works either way.
    q.extend(&second.lease, LONG)
        .await
        .expect("extend with the current lease");
    q.delete(&second.lease)
        .await
        .expect("delete with the current lease");
    assert_depth(q, 0, "after delete").await;

    let again = q.delete(&second.lease).await;
    if p.refuses_stale_leases() {
        assert_lease_expired(again, "delete of a deleted message");
    } else {
        // moto answers a repeated DeleteMessage with success (it remembers deleted handles), as
        // SQS does within a receipt handle's lifetime.
        assert!(again.is_ok(), "moto: repeated delete succeeds: {again:?}");
    }
}

async fn unknown_lease_is_refused(p: &Pair) {
    let q = &*p.main;
    q.send(outgoing("t-unknown")).await.expect("send");
    let d = receive_one(q, LONG).await;
    // Never issued by this queue (SQS: ReceiptHandleIsInvalid).
    let bogus = LeaseId("AQEBbm90LWEtcmVjZWlwdC1oYW5kbGU=".to_owned());
    assert_lease_expired(q.extend(&bogus, LONG).await, "extend with a bogus lease");
    assert_lease_expired(
        q.release(&bogus, Duration::ZERO).await,
        "release with a bogus lease",
    );
    assert_lease_expired(q.delete(&bogus).await, "delete with a bogus lease");
    // None of that touched the real lease.
    assert_depth(q, 1, "still there").await;
    q.delete(&d.lease).await.expect("delete");
}

/// Runs every check against every backend: `sqlite::round_trip_with_attributes`, `sqs::…`,
/// `sqs_fifo::…`.
macro_rules! contract {
    ($($check:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $check() {
                    let p = super::fresh_pair(super::Backend::Sqlite, stringify!($check)).await;
                    super::$check(&p).await;
                }
            )*
        }
        mod sqs {
            $(
                #[tokio::test]
                async fn $check() {
                    let p = super::fresh_pair(super::Backend::Sqs, stringify!($check)).await;
                    super::$check(&p).await;
                }
            )*
        }
        mod sqs_fifo {
            $(
                #[tokio::test]
                async fn $check() {
                    let p = super::fresh_pair(super::Backend::SqsFifo, stringify!($check)).await;
                    super::$check(&p).await;
                }
            )*
        }
    };
}

contract!(
    round_trip_with_attributes,
    hidden_while_leased,
    visibility_expiry_redelivers,
    release_with_delay,
    extend_keeps_hidden,
    deduplicates_by_id,
    redrive_after_max_receives,
    depth_counts,
    stale_lease_after_redelivery,
    unknown_lease_is_refused,
);

// ---- SQS only: provisioning and error reporting -------------------------------------------------

#[tokio::test]
async fn sqs_ensure_queue_pair_is_idempotent_and_typed() {
    let client = sqs_client().await;
    let name = unique_name("pair");
    let pair = ensure_queue_pair(&client, &name, true, 3, Duration::from_secs(45))
        .await
        .expect("create");
    assert!(
        pair.queue_url.ends_with(&format!("/{name}.fifo")),
        "{pair:?}"
    );
    assert!(
        pair.dlq_url.ends_with(&format!("/{name}-dlq.fifo")),
        "{pair:?}"
    );
    let again = ensure_queue_pair(
        &client,
        &format!("{name}.fifo"),
        true,
        3,
        Duration::from_secs(45),
    )
    .await
    .expect("same attributes: idempotent");
    assert_eq!(again, pair);

    use aws_sdk_sqs::types::QueueAttributeName as A;
    let attr = |url: String, names: Vec<A>| {
        let client = client.clone();
        async move {
            client
                .get_queue_attributes()
                .queue_url(url)
                .set_attribute_names(Some(names))
                .send()
                .await
                .expect("GetQueueAttributes")
                .attributes()
                .cloned()
                .unwrap_or_default()
        }
    };
    let dlq = attr(pair.dlq_url.clone(), vec![A::QueueArn, A::FifoQueue]).await;
    let main = attr(
        pair.queue_url.clone(),
        vec![A::RedrivePolicy, A::VisibilityTimeout, A::FifoQueue],
    )
    .await;
    assert_eq!(dlq[&A::FifoQueue], "true");
    assert_eq!(main[&A::FifoQueue], "true");
    assert_eq!(main[&A::VisibilityTimeout], "45");
    let redrive: serde_json::Value =
        serde_json::from_str(&main[&A::RedrivePolicy]).expect("RedrivePolicy is JSON");
    assert_eq!(redrive["deadLetterTargetArn"], dlq[&A::QueueArn].as_str());
    // SQS echoes maxReceiveCount as a number or a string depending on the endpoint.
    let count = &redrive["maxReceiveCount"];
    assert!(count == 3 || count == "3", "{redrive}");

    let by_name = SqsQueue::from_name(client.clone(), &format!("{name}.fifo"))
        .await
        .expect("GetQueueUrl");
    assert_eq!(by_name.url(), pair.queue_url);
    assert!(by_name.is_fifo());
}

#[tokio::test]
async fn sqs_ensure_queue_pair_refuses_bad_input() {
    let client = sqs_client().await;
    for (name, mrc, vis) in [
        ("bad name", 2, 30),
        (r#"x","maxReceiveCount":1}"#, 2, 30),
        ("ok-name", 0, 30),
        ("ok-name", 1001, 30),
        ("ok-name", 2, 43_201),
    ] {
        let r = ensure_queue_pair(&client, name, false, mrc, Duration::from_secs(vis)).await;
        assert!(
            matches!(r, Err(QueueError::Backend(_))),
            "{name:?} {mrc} {vis}: {r:?}"
        );
    }
    let standard = unique_name("std");
    ensure_queue_pair(&client, &standard, false, 2, Duration::from_secs(30))
        .await
        .expect("create standard");
    // A name already used with other attributes is SQS's error, never a silent reconfiguration.
    let r = ensure_queue_pair(&client, &standard, false, 5, Duration::from_secs(30)).await;
    assert!(matches!(r, Err(QueueError::Backend(_))), "{r:?}");
}

#[tokio::test]
async fn sqs_errors_name_the_operation_and_queue() {
    let client = sqs_client().await;
    let missing = unique_name("missing");
    match SqsQueue::from_name(client.clone(), &missing).await {
        Err(QueueError::Backend(m)) => {
            assert!(m.contains("GetQueueUrl") && m.contains(&missing), "{m}")
        }
        other => panic!("expected a backend error, got {other:?}"),
    }
    let pair = ensure_queue_pair(
        &client,
        &unique_name("gone"),
        false,
        2,
        Duration::from_secs(30),
    )
    .await
    .expect("create");
    client
        .delete_queue()
        .queue_url(&pair.queue_url)
        .send()
        .await
        .expect("DeleteQueue");
    let q = SqsQueue::new(client, pair.queue_url.clone());
    match q.send(outgoing("t-gone")).await {
        Err(QueueError::Backend(m)) => {
            assert!(
                m.contains("SendMessage") && m.contains(&pair.queue_url),
                "{m}"
            )
        }
        other => panic!("expected a backend error, got {other:?}"),
    }
    match q.depth().await {
        Err(QueueError::Backend(m)) => assert!(m.contains("GetQueueAttributes"), "{m}"),
        other => panic!("expected a backend error, got {other:?}"),
    }
}
