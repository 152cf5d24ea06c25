//! The plugin process as go-plugin sees it: cookie check, client-certificate errors, the
//! handshake line, protocol 5 and 6 from one binary, health, controller Shutdown timing, and
//! malformed DynamicValues over the wire.
//!
//! These start the real binary. The AutoMTLS path is exercised end to end by the
//! OpenTofu/Terraform tests in `e2e.rs`; here the client runs without a certificate, which
//! go-plugin also allows, so a plain tonic client can drive the RPCs.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use tfplugin_protocol::{health, plugin, tfplugin5, tfplugin6};

const BIN: &str = env!("CARGO_BIN_EXE_terraform-provider-agentplane");
const COOKIE: (&str, &str) = (
    "TF_PLUGIN_MAGIC_COOKIE",
    "d602bf8f470bc67ca7faa0386276bbdd4330efaf76d1a219cb4d6991ca9872b2",
);

struct Plugin {
    child: Child,
    fields: Vec<String>,
}

impl Plugin {
    fn start(envs: &[(&str, &str)]) -> Plugin {
        let mut cmd = Command::new(BIN);
        cmd.env_clear()
            .env(COOKIE.0, COOKIE.1)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn provider");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let fields = line.trim_end().split('|').map(str::to_string).collect();
        Plugin { child, fields }
    }
    fn url(&self) -> String {
        format!("http://{}", self.fields[3])
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn run_by_hand_explains_and_fails() {
    let out = Command::new(BIN).env_clear().output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Terraform/OpenTofu provider plugin"), "{err}");
    let wrong = Command::new(BIN)
        .env_clear()
        .env(COOKIE.0, "wrong")
        .output()
        .unwrap();
    assert_eq!(wrong.status.code(), Some(1));
}

#[test]
fn garbage_client_certificate_is_a_clean_error() {
    let out = Command::new(BIN)
        .env_clear()
        .env(COOKIE.0, COOKIE.1)
        .env("PLUGIN_CLIENT_CERT", "garbage")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "no handshake line may be printed");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("PLUGIN_CLIENT_CERT does not contain a PEM certificate"),
        "{err}"
    );
}

#[test]
fn no_common_protocol_version() {
    let out = Command::new(BIN)
        .env_clear()
        .env(COOKIE.0, COOKIE.1)
        .env("PLUGIN_PROTOCOL_VERSIONS", "4,7")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("serves only 5 and 6"));
}

#[test]
fn automtls_handshake_line_carries_unpadded_der() {
    let client = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let p = Plugin::start(&[
        ("PLUGIN_CLIENT_CERT", &client.cert.pem()),
        ("PLUGIN_PROTOCOL_VERSIONS", "5,6"),
    ]);
    assert_eq!(p.fields.len(), 6, "{:?}", p.fields);
    assert_eq!(&p.fields[..3], ["1", "6", "tcp"]);
    assert!(p.fields[3].starts_with("127.0.0.1:"));
    assert_eq!(p.fields[4], "grpc");
    assert!(!p.fields[5].ends_with('='));
    let der = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(&p.fields[5])
        .unwrap();
    assert_eq!(der[0], 0x30, "DER certificate starts with a SEQUENCE");
}

#[tokio::test]
async fn protocol6_schema_health_and_fast_shutdown() {
    let mut p = Plugin::start(&[("PLUGIN_PROTOCOL_VERSIONS", "5,6")]);
    assert_eq!(p.fields[1], "6");
    let url = p.url();

    let mut h = health::health_client::HealthClient::connect(url.clone())
        .await
        .unwrap();
    let st = h
        .check(health::HealthCheckRequest {
            service: "plugin".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        st.status,
        health::health_check_response::ServingStatus::Serving as i32
    );

    let mut c = tfplugin6::provider_client::ProviderClient::connect(url.clone())
        .await
        .unwrap();
    let s = c
        .get_provider_schema(tfplugin6::get_provider_schema::Request {})
        .await
        .unwrap()
        .into_inner();
    assert!(s.resource_schemas.contains_key("agentplane_queue"));
    assert!(s.resource_schemas.contains_key("agentplane_kms_key"));
    assert!(s.data_source_schemas.contains_key("agentplane_queue"));
    let caps = s.server_capabilities.unwrap();
    assert!(caps.plan_destroy && caps.get_provider_schema_optional);

    // Malformed DynamicValue: a diagnostic, and the server keeps serving.
    let r = c
        .validate_resource_config(tfplugin6::validate_resource_config::Request {
            type_name: "agentplane_queue".into(),
            config: Some(tfplugin6::DynamicValue {
                msgpack: vec![0xdd, 0xff, 0xff, 0xff, 0xff],
                json: vec![],
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.diagnostics.len(), 1);
    assert!(
        r.diagnostics[0]
            .summary
            .contains("Invalid resource configuration"),
        "{:?}",
        r.diagnostics
    );

    // A stdio stream is open, as go-plugin keeps one; Shutdown must still finish quickly.
    let mut stdio = plugin::grpc_stdio_client::GrpcStdioClient::connect(url.clone())
        .await
        .unwrap();
    let _stream = stdio.stream_stdio(()).await.unwrap();
    let mut ctl = plugin::grpc_controller_client::GrpcControllerClient::connect(url)
        .await
        .unwrap();
    let t = Instant::now();
    ctl.shutdown(plugin::Empty {}).await.unwrap();
    loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "provider still running 2 s after Shutdown"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn queue_config_v5(visibility: i64) -> Vec<u8> {
    // Only the attributes under test; the decoder fills the rest with null.
    let mut buf = Vec::new();
    rmp::encode::write_map_len(&mut buf, 2).unwrap();
    rmp::encode::write_str(&mut buf, "name").unwrap();
    rmp::encode::write_str(&mut buf, "jobs").unwrap();
    rmp::encode::write_str(&mut buf, "visibility_timeout_seconds").unwrap();
    rmp::encode::write_sint(&mut buf, visibility).unwrap();
    buf
}

#[tokio::test]
async fn protocol5_from_the_same_definition() {
    let p = Plugin::start(&[("PLUGIN_PROTOCOL_VERSIONS", "5")]);
    assert_eq!(p.fields[1], "5");
    let mut c = tfplugin5::provider_client::ProviderClient::connect(p.url())
        .await
        .unwrap();
    let s = c
        .get_schema(tfplugin5::get_provider_schema::Request {})
        .await
        .unwrap()
        .into_inner();
    let q = &s.resource_schemas["agentplane_queue"];
    let vis = q
        .block
        .as_ref()
        .unwrap()
        .attributes
        .iter()
        .find(|a| a.name == "visibility_timeout_seconds")
        .unwrap();
    assert!(vis.optional && vis.computed);
    assert_eq!(vis.r#type, br#""number""#);

    let r = c
        .validate_resource_type_config(tfplugin5::validate_resource_type_config::Request {
            type_name: "agentplane_queue".into(),
            config: Some(tfplugin5::DynamicValue {
                msgpack: queue_config_v5(50_000),
                json: vec![],
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.diagnostics.len(), 1, "{:?}", r.diagnostics);
    let d = &r.diagnostics[0];
    assert_eq!(d.severity, tfplugin5::diagnostic::Severity::Error as i32);
    use tfplugin5::attribute_path::step::Selector;
    let steps = &d.attribute.as_ref().unwrap().steps;
    assert_eq!(
        steps[0].selector,
        Some(Selector::AttributeName("visibility_timeout_seconds".into()))
    );

    let ok = c
        .validate_resource_type_config(tfplugin5::validate_resource_type_config::Request {
            type_name: "agentplane_queue".into(),
            config: Some(tfplugin5::DynamicValue {
                msgpack: queue_config_v5(60),
                json: vec![],
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ok.diagnostics.is_empty(), "{:?}", ok.diagnostics);
}
