//! KMS envelope-encrypted secrets against real peers: moto as KMS and kube-apiserver holding the
//! Secrets. Each test makes its own KMS key and namespace, since the stack is shared by the binary.

use std::collections::BTreeMap;
use std::time::Duration;

use agentplane::secrets::envelope::{self, SealedSecret};
use agentplane::secrets::kube::{FORMAT_LABEL, encryption_context};
use agentplane::secrets::{KubeKmsSecrets, SecretError, SecretSource};
use agentplane_api::policy::SecretKeyRef;
use agentplane_testsupport::Stack;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, ObjectMeta, PostParams};

const PLAINTEXT: &str = "sk-live-kms-sealed-0123456789";

struct Env {
    kube: kube::Client,
    kms: aws_sdk_kms::Client,
    namespace: String,
    key_id: String,
}

impl Env {
    async fn new() -> Env {
        let stack = Stack::shared().expect("the real-peer stack");
        let kube = stack.kube_client().await.unwrap();
        let kms = aws_sdk_kms::Client::new(&stack.aws_sdk_config().await);
        let key_id = kms
            .create_key()
            .description("agentplane kms_secrets test")
            .send()
            .await
            .unwrap()
            .key_metadata
            .unwrap()
            .key_id;
        let namespace = format!("kms-{}", uuid::Uuid::new_v4().simple());
        Api::<Namespace>::all(kube.clone())
            .create(
                &PostParams::default(),
                &Namespace {
                    metadata: ObjectMeta {
                        name: Some(namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    ..Namespace::default()
                },
            )
            .await
            .unwrap();
        Env {
            kube,
            kms,
            namespace,
            key_id,
        }
    }

    fn source(&self) -> KubeKmsSecrets {
        KubeKmsSecrets::new(self.kube.clone(), &self.namespace, self.kms.clone())
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.kube.clone(), &self.namespace)
    }

    async fn replace_data(&self, name: &str, data: BTreeMap<String, ByteString>) {
        let mut s = self.secrets().get(name).await.unwrap();
        s.data = Some(data);
        s.metadata.managed_fields = None;
        self.secrets()
            .replace(name, &PostParams::default(), &s)
            .await
            .unwrap();
    }

    async fn create_secret(&self, name: &str, data: BTreeMap<String, ByteString>) {
        self.secrets()
            .create(
                &PostParams::default(),
                &Secret {
                    metadata: ObjectMeta {
                        name: Some(name.into()),
                        ..ObjectMeta::default()
                    },
                    data: Some(data),
                    ..Secret::default()
                },
            )
            .await
            .unwrap();
    }
}

fn r(name: &str, key: &str) -> SecretKeyRef {
    SecretKeyRef {
        name: name.into(),
        key: key.into(),
    }
}

/// No error text or debug output may carry the plaintext.
fn assert_secret_free(e: &SecretError) {
    assert!(!e.to_string().contains(PLAINTEXT), "{e}");
    assert!(!format!("{e:?}").contains(PLAINTEXT), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_values_round_trip_through_a_secret() {
    let env = Env::new().await;
    let source = env.source();
    let openai = r("model-keys", "openai");
    source
        .put(&env.key_id, &openai, PLAINTEXT.as_bytes())
        .await
        .unwrap();
    // A second key beside the first, in the same Secret.
    let other = r("model-keys", "anthropic");
    source
        .put(&env.key_id, &other, b"sk-ant-other")
        .await
        .unwrap();

    let v = source.get(&openai).await.unwrap();
    assert_eq!(v.expose_str(), Some(PLAINTEXT));
    assert_eq!(source.get(&other).await.unwrap().expose(), b"sk-ant-other");
    assert!(!format!("{v:?}").contains(PLAINTEXT), "{v:?}");
    assert!(!format!("{v}").contains(PLAINTEXT));

    // What is stored: the envelope entries and the format label, and nowhere the plaintext.
    let stored = env.secrets().get("model-keys").await.unwrap();
    let data = stored.data.clone().unwrap();
    let mut keys: Vec<&str> = data.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "anthropic.ciphertext",
            "anthropic.edk",
            "anthropic.nonce",
            "openai.ciphertext",
            "openai.edk",
            "openai.nonce"
        ]
    );
    for value in data.values() {
        assert!(
            !value
                .0
                .windows(PLAINTEXT.len())
                .any(|w| w == PLAINTEXT.as_bytes()),
            "plaintext stored in the Secret"
        );
    }
    assert_eq!(
        stored
            .metadata
            .labels
            .unwrap()
            .get(FORMAT_LABEL)
            .map(String::as_str),
        Some("kms-envelope-v1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_written_by_hand_opens() {
    let env = Env::new().await;
    let key = r("by-hand", "api-key");
    let sealed = envelope::seal(
        &env.kms,
        &env.key_id,
        PLAINTEXT.as_bytes(),
        &encryption_context(&env.namespace, &key),
    )
    .await
    .unwrap();
    assert!(!format!("{sealed:?}").contains(PLAINTEXT), "{sealed:?}");
    let mut data = sealed.to_secret_data("api-key");
    data.insert("unrelated".into(), ByteString(b"plain".to_vec()));
    env.create_secret("by-hand", data).await;
    assert_eq!(
        env.source().get(&key).await.unwrap().expose_str(),
        Some(PLAINTEXT)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_opens_only_under_its_own_encryption_context() {
    let env = Env::new().await;
    let ctx = |secret: &str| encryption_context(&env.namespace, &r(secret, "api-key"));
    let sealed = envelope::seal(&env.kms, &env.key_id, PLAINTEXT.as_bytes(), &ctx("a"))
        .await
        .unwrap();
    assert_eq!(
        envelope::open(&env.kms, &sealed, &ctx("a"))
            .await
            .unwrap()
            .expose_str(),
        Some(PLAINTEXT)
    );

    // Opened under another context, directly...
    let e = envelope::open(&env.kms, &sealed, &ctx("b"))
        .await
        .unwrap_err();
    assert_secret_free(&e);
    // KMS refuses to decrypt the data key under another context (moto enforces this as AWS does).
    assert!(
        matches!(
            e,
            SecretError::Kms {
                op: "Decrypt",
                transient: false,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("InvalidCiphertextException"), "{e}");
    assert!(!e.is_transient());

    // ...or copied into another Secret: the copy does not open.
    env.create_secret("copied", sealed.to_secret_data("api-key"))
        .await;
    let e = env.source().get(&r("copied", "api-key")).await.unwrap_err();
    assert_secret_free(&e);
    assert!(matches!(e, SecretError::Open { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains(&format!("{}/copied", env.namespace)), "{msg}");
    assert!(!e.is_transient());

    // Envelope parts are not interchangeable: a's data key (which KMS opens under a's context) does
    // not open the ciphertext of another seal. (That the AEAD binds the context by itself is a unit
    // test in secrets::envelope, which can hold one data key across two contexts.)
    let sealed_b = envelope::seal(&env.kms, &env.key_id, PLAINTEXT.as_bytes(), &ctx("b"))
        .await
        .unwrap();
    let mixed = SealedSecret {
        encrypted_data_key: sealed.encrypted_data_key.clone(),
        ..sealed_b
    };
    let e = envelope::open(&env.kms, &mixed, &ctx("a"))
        .await
        .unwrap_err();
    assert!(matches!(e, SecretError::Integrity), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_envelopes_are_refused() {
    let env = Env::new().await;
    let source = env.source().with_ttl(Duration::ZERO);
    let key = r("tampered", "api-key");
    source
        .put(&env.key_id, &key, PLAINTEXT.as_bytes())
        .await
        .unwrap();
    let original = env.secrets().get("tampered").await.unwrap().data.unwrap();

    let flip = |entry: &str| {
        let mut data = original.clone();
        let v = data.get_mut(entry).unwrap();
        let last = v.0.len() - 1;
        v.0[last] ^= 0x01;
        data
    };

    for entry in ["api-key.ciphertext", "api-key.nonce"] {
        env.replace_data("tampered", flip(entry)).await;
        let e = source.get(&key).await.unwrap_err();
        assert_secret_free(&e);
        let SecretError::Open { source: inner, .. } = &e else {
            panic!("{entry}: {e:?}")
        };
        assert!(matches!(**inner, SecretError::Integrity), "{entry}: {e:?}");
        assert!(e.to_string().contains("altered"), "{e}");
    }

    env.replace_data("tampered", flip("api-key.edk")).await;
    let e = source.get(&key).await.unwrap_err();
    assert_secret_free(&e);
    let SecretError::Open { source: inner, .. } = &e else {
        panic!("{e:?}")
    };
    assert!(
        matches!(**inner, SecretError::Kms { op: "Decrypt", .. }),
        "{e:?}"
    );
    assert!(!e.is_transient(), "{e:?}");

    // Put back, it opens again: nothing was cached or poisoned along the way.
    env.replace_data("tampered", original).await;
    assert_eq!(
        source.get(&key).await.unwrap().expose_str(),
        Some(PLAINTEXT)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_secrets_and_keys_are_named() {
    let env = Env::new().await;
    let source = env.source();

    let e = source.get(&r("nowhere", "api-key")).await.unwrap_err();
    assert!(matches!(e, SecretError::NotFound(_)), "{e:?}");
    assert!(
        e.to_string()
            .contains(&format!("{}/nowhere not found", env.namespace)),
        "{e}"
    );
    assert!(!e.is_transient());

    source
        .put(&env.key_id, &r("some", "present"), PLAINTEXT.as_bytes())
        .await
        .unwrap();
    let e = source.get(&r("some", "absent")).await.unwrap_err();
    assert!(matches!(e, SecretError::MissingKey { .. }), "{e:?}");
    assert!(e.to_string().contains("\"absent\""), "{e}");

    // A plain (not sealed) value under the key is refused, with a hint, and not returned.
    env.create_secret(
        "plain",
        BTreeMap::from([("api-key".to_owned(), ByteString(PLAINTEXT.into()))]),
    )
    .await;
    let e = source.get(&r("plain", "api-key")).await.unwrap_err();
    assert_secret_free(&e);
    assert!(e.to_string().contains("not a KMS-sealed one"), "{e}");

    // An incomplete envelope says which entry is missing.
    let sealed = envelope::seal(
        &env.kms,
        &env.key_id,
        PLAINTEXT.as_bytes(),
        &encryption_context(&env.namespace, &r("partial", "api-key")),
    )
    .await
    .unwrap();
    let mut data = sealed.to_secret_data("api-key");
    data.remove("api-key.edk");
    env.create_secret("partial", data).await;
    let e = source.get(&r("partial", "api-key")).await.unwrap_err();
    assert!(e.to_string().contains("api-key.edk missing"), "{e}");

    // A reference that could never name a Secret key is refused before any call.
    let e = source.get(&r("some", "../etc")).await.unwrap_err();
    assert!(matches!(e, SecretError::InvalidRef { .. }), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opened_values_are_cached_for_the_ttl() {
    let env = Env::new().await;
    let cached = env.source();
    let uncached = env.source().with_ttl(Duration::ZERO);
    let key = r("cached", "api-key");
    cached
        .put(&env.key_id, &key, PLAINTEXT.as_bytes())
        .await
        .unwrap();
    assert!(cached.get(&key).await.is_ok());
    assert!(uncached.get(&key).await.is_ok());

    env.secrets()
        .delete("cached", &Default::default())
        .await
        .unwrap();
    // Within the TTL the cached copy serves without Kubernetes or KMS...
    assert_eq!(
        cached.get(&key).await.unwrap().expose_str(),
        Some(PLAINTEXT)
    );
    // ...a source without a cache sees the deletion at once...
    assert!(matches!(
        uncached.get(&key).await,
        Err(SecretError::NotFound(_))
    ));
    // ...and invalidation (an endpoint refused the key) drops the cached copy.
    cached.invalidate(&key);
    assert!(matches!(
        cached.get(&key).await,
        Err(SecretError::NotFound(_))
    ));

    let short = env.source().with_ttl(Duration::from_millis(200));
    short
        .put(&env.key_id, &key, PLAINTEXT.as_bytes())
        .await
        .unwrap();
    assert!(short.get(&key).await.is_ok());
    env.secrets()
        .delete("cached", &Default::default())
        .await
        .unwrap();
    assert!(short.get(&key).await.is_ok());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(matches!(
        short.get(&key).await,
        Err(SecretError::NotFound(_))
    ));
}
