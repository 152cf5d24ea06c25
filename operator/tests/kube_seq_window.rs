//! The per-device replay window of the Kubernetes store against a real kube-apiserver + etcd: out of
//! order within the window accepted, a taken seq refused, the boundary exact, and concurrent
//! admissions (many seqs at once, and two task ids racing for one seq) leave exactly one live task per
//! (device, seq). No operator runs, so the tasks stay as admission left them.

mod cluster;

use std::collections::BTreeMap;

use agentplane::client::DeviceIdentity;
use agentplane::store::kubernetes::{DEVICE_LABEL, SEQ_LABEL};
use agentplane::store::seq_window::SeqRefusal;
use agentplane::store::{Admission, NewTask, TaskStore};
use agentplane_api::TaskPhase;
use agentplane_api::device::SEQ_WINDOW;
use agentplane_api::task::{AgentTask, AgentTaskSpec};
use cluster::Cluster;
use kube::api::{Api, ListParams};

fn new_task(d: &DeviceIdentity, seq: u64, prompt: &str) -> NewTask {
    let payload = d.intent(seq, "summarize", prompt);
    let envelope = d.sign(&payload).unwrap();
    NewTask {
        id: payload.task_id.clone(),
        spec: AgentTaskSpec::for_payload(envelope, &payload),
        seq,
        trace_id: None,
    }
}

async fn admit(c: &Cluster, d: &DeviceIdentity, seq: u64) -> Admission {
    c.store
        .admit(new_task(d, seq, &format!("seq {seq}")))
        .await
        .unwrap()
}

fn created(a: &Admission) -> bool {
    matches!(a, Admission::Created(_))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kube_store_keeps_one_task_per_seq_within_the_window() {
    let c = Cluster::new("seqwin").await;
    let d = c.device("kiosk-w").await;

    assert!(created(&admit(&c, &d, 100).await));
    // Out of order within the window.
    assert!(created(&admit(&c, &d, 98).await));
    assert!(created(&admit(&c, &d, 99).await));
    // The same task id again is the existing task.
    let again = new_task(&d, 120, "resubmitted");
    assert!(created(&c.store.admit(again.clone()).await.unwrap()));
    assert!(matches!(
        c.store.admit(again).await.unwrap(),
        Admission::Existing(_)
    ));
    // A new task id under a taken seq, and the boundary of the window (lastSeq is now 120).
    assert_eq!(
        admit(&c, &d, 98).await,
        Admission::SeqReplay(SeqRefusal::Taken { last_seq: 120 })
    );
    assert_eq!(
        admit(&c, &d, 120 - SEQ_WINDOW).await,
        Admission::SeqReplay(SeqRefusal::BelowWindow { last_seq: 120 })
    );
    assert!(created(&admit(&c, &d, 120 - SEQ_WINDOW + 1).await));

    // 48 seqs at once, in no particular order: every one admitted, each a conflict-retried write of
    // the one EdgeDevice.
    let seqs: Vec<u64> = (121..=168).rev().collect();
    let results = futures::future::join_all(seqs.iter().map(|&s| admit(&c, &d, s))).await;
    for (s, r) in seqs.iter().zip(&results) {
        assert!(created(r), "seq {s}: {r:?}");
    }
    // Two task ids racing for each of 8 fresh seqs: exactly one of each pair is admitted.
    let racing: Vec<NewTask> = (169..=176)
        .flat_map(|s| [new_task(&d, s, "first"), new_task(&d, s, "second")])
        .collect();
    let results = futures::future::join_all(racing.iter().map(|t| c.store.admit(t.clone()))).await;
    let mut winners: BTreeMap<u64, usize> = BTreeMap::new();
    for (t, r) in racing.iter().zip(results) {
        match r.unwrap() {
            Admission::Created(_) => *winners.entry(t.seq).or_default() += 1,
            Admission::SeqReplay(SeqRefusal::Taken { .. }) => {}
            other => panic!("seq {}: {other:?}", t.seq),
        }
    }
    assert_eq!(winners, (169..=176).map(|s| (s, 1)).collect());

    let device = c.store.get_device("kiosk-w").await.unwrap().unwrap();
    assert_eq!(device.status.last_seq, Some(176));
    assert!(device.status.seq_window.is_some(), "{:?}", device.status);

    // What the API server holds: per seq, at most one task that is not a withdrawn (Denied) loser,
    // found by the device and seq labels.
    let api: Api<AgentTask> = Api::namespaced(c.client.clone(), &c.namespace);
    for s in 169..=176u64 {
        let list = api
            .list(&ListParams::default().labels(&format!("{DEVICE_LABEL}=kiosk-w,{SEQ_LABEL}={s}")))
            .await
            .unwrap();
        let live: Vec<_> = list
            .items
            .iter()
            .filter(|t| t.status.as_ref().and_then(|s| s.phase) != Some(TaskPhase::Denied))
            .collect();
        assert_eq!(live.len(), 1, "seq {s}: {:?}", list.items);
        for t in &list.items {
            if t.status.as_ref().and_then(|s| s.phase) == Some(TaskPhase::Denied) {
                let reason = t.status.as_ref().and_then(|s| s.reason.clone());
                assert!(
                    reason.as_deref().unwrap_or("").starts_with("replayed_seq"),
                    "{reason:?}"
                );
            }
        }
    }
}
