//! The real peers answer the way the runtime relies on: SQS and KMS through
//! moto, the Kubernetes API through kube-apiserver. One stack per binary.

use std::time::{SystemTime, UNIX_EPOCH};

use agentplane_testsupport::Stack;
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{KeySpec, KeyUsageType, MessageType, SigningAlgorithmSpec};
use aws_sdk_sqs::types::MessageAttributeValue;

fn stack() -> &'static Stack {
    Stack::shared().unwrap_or_else(|e| panic!("{e}"))
}

// Tests share one moto; unique names keep them from seeing each other's state.
fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

#[tokio::test]
async fn sqs_message_round_trip_keeps_attributes() {
    let sqs = aws_sdk_sqs::Client::new(&stack().aws_sdk_config().await);
    let queue_name = unique("tasks");
    let queue_url = sqs
        .create_queue()
        .queue_name(&queue_name)
        .send()
        .await
        .expect("create queue")
        .queue_url
        .expect("queue url");
    assert!(queue_url.ends_with(&queue_name), "{queue_url}");

    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let body = r#"{"task":{"namespace":"ns","name":"t1","uid":"u1"},"tier":"small","attempt":1}"#;
    let sent = sqs
        .send_message()
        .queue_url(&queue_url)
        .message_body(body)
        .message_attributes(
            "traceparent",
            MessageAttributeValue::builder()
                .data_type("String")
                .string_value(traceparent)
                .build()
                .unwrap(),
        )
        .message_attributes(
            "taskId",
            MessageAttributeValue::builder()
                .data_type("String")
                .string_value("t1")
                .build()
                .unwrap(),
        )
        .send()
        .await
        .expect("send message");
    let sent_id = sent.message_id.expect("message id");

    let received = sqs
        .receive_message()
        .queue_url(&queue_url)
        .message_attribute_names("All")
        .max_number_of_messages(10)
        .wait_time_seconds(5)
        .send()
        .await
        .expect("receive message");
    let messages = received.messages.unwrap_or_default();
    assert_eq!(messages.len(), 1, "{messages:?}");
    let msg = &messages[0];
    assert_eq!(msg.message_id.as_deref(), Some(sent_id.as_str()));
    assert_eq!(msg.body.as_deref(), Some(body));
    let attrs = msg.message_attributes.as_ref().expect("attributes");
    assert_eq!(
        attrs["traceparent"].string_value.as_deref(),
        Some(traceparent)
    );
    assert_eq!(attrs["taskId"].string_value.as_deref(), Some("t1"));
    assert_eq!(attrs["taskId"].data_type, "String");

    sqs.delete_message()
        .queue_url(&queue_url)
        .receipt_handle(msg.receipt_handle.as_deref().expect("receipt handle"))
        .send()
        .await
        .expect("delete message");

    // Visibility timeout 0 makes an undeleted message visible at once, so an
    // empty receive here means the delete really happened.
    let again = sqs
        .receive_message()
        .queue_url(&queue_url)
        .visibility_timeout(0)
        .wait_time_seconds(1)
        .send()
        .await
        .expect("receive after delete");
    assert!(
        again.messages.unwrap_or_default().is_empty(),
        "message still on the queue after delete"
    );
    let attrs = sqs
        .get_queue_attributes()
        .queue_url(&queue_url)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::All)
        .send()
        .await
        .expect("queue attributes")
        .attributes
        .unwrap_or_default();
    let count = |name| {
        attrs
            .get(&name)
            .map(String::as_str)
            .unwrap_or("missing")
            .to_owned()
    };
    assert_eq!(
        count(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages),
        "0"
    );
    assert_eq!(
        count(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        "0"
    );
}

#[tokio::test]
async fn kms_ecc_key_signs_and_verifies() {
    let kms = aws_sdk_kms::Client::new(&stack().aws_sdk_config().await);
    let key = kms
        .create_key()
        .key_usage(KeyUsageType::SignVerify)
        .key_spec(KeySpec::EccNistP256)
        .description(unique("device-audit"))
        .send()
        .await
        .expect("create key")
        .key_metadata
        .expect("key metadata");
    assert_eq!(key.key_usage, Some(KeyUsageType::SignVerify));
    assert_eq!(key.key_spec, Some(KeySpec::EccNistP256));
    let key_id = key.key_id;

    let message = b"audit checkpoint 42: sha256=9f86d081884c7d659a2feaa0c55ad015".to_vec();
    let signature = kms
        .sign()
        .key_id(&key_id)
        .message(Blob::new(message.clone()))
        .message_type(MessageType::Raw)
        .signing_algorithm(SigningAlgorithmSpec::EcdsaSha256)
        .send()
        .await
        .expect("sign")
        .signature
        .expect("signature");
    assert!(!signature.as_ref().is_empty());

    let verify = |msg: Vec<u8>| {
        kms.verify()
            .key_id(&key_id)
            .message(Blob::new(msg))
            .message_type(MessageType::Raw)
            .signature(signature.clone())
            .signing_algorithm(SigningAlgorithmSpec::EcdsaSha256)
            .send()
    };
    let ok = verify(message.clone()).await.expect("verify");
    assert!(ok.signature_valid, "genuine message must verify");

    let mut tampered = message;
    tampered[0] ^= 0x01;
    // Real KMS answers an invalid signature with KMSInvalidSignatureException;
    // either that or signature_valid=false means "does not verify".
    match verify(tampered).await {
        Ok(out) => assert!(!out.signature_valid, "tampered message verified"),
        Err(err) => {
            let service = err.into_service_error();
            assert!(
                service.is_kms_invalid_signature_exception(),
                "unexpected error for a tampered message: {service:?}"
            );
        }
    }
}

#[tokio::test]
async fn kube_apiserver_reports_its_version() {
    let client = stack().kube_client().await.expect("kube client");
    let info = client.apiserver_version().await.expect("/version");
    assert_eq!(info.git_version, "v1.35.4");
    assert_eq!(info.major, "1");
    assert_eq!(info.minor, "35");
}

#[tokio::test]
async fn kube_admin_token_writes_and_anonymous_is_refused() {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::api::{Api, ObjectMeta, PostParams};

    let stack = stack();
    let admin: Api<Namespace> = Api::all(stack.kube_client().await.expect("kube client"));
    let name = unique("ns");
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    let created = admin
        .create(&PostParams::default(), &ns)
        .await
        .expect("admin creates a namespace");
    assert!(created.metadata.uid.is_some());
    let read = admin.get(&name).await.expect("namespace reads back");
    assert_eq!(read.metadata.uid, created.metadata.uid);

    // Same server and CA, no token: RBAC must stop it.
    let kubeconfig = kube::config::Kubeconfig::read_from(stack.kubeconfig_path()).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    config.auth_info = Default::default();
    let anonymous: Api<Namespace> = Api::all(kube::Client::try_from(config).unwrap());
    match anonymous.get(&name).await {
        Err(kube::Error::Api(status)) => {
            assert!(matches!(status.code, 401 | 403), "{status:?}")
        }
        other => panic!("anonymous read of a namespace was not refused: {other:?}"),
    }
}
