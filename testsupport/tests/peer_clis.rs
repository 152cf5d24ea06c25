//! Every CLI peer `ci/peers.sh` builds runs and reports the version it was
//! pinned to, so a wrong build (a dev marker, a drifted version) fails here
//! rather than deep inside another crate's test.

use std::process::Output;

use agentplane_testsupport::peer_command;

fn run(peer: &str, args: &[&str]) -> String {
    let mut cmd = peer_command(peer).unwrap_or_else(|e| panic!("{e}"));
    // Keep OpenTofu/Terraform from phoning home for version checks.
    cmd.args(args).env("CHECKPOINT_DISABLE", "1");
    let Output {
        status,
        stdout,
        stderr,
    } = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {peer}: {e}"));
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr)
    );
    assert!(
        status.success(),
        "{peer} {args:?} failed ({status}):\n{out}"
    );
    out
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or_default()
}

#[test]
fn tofu_is_a_release_build_of_1_10() {
    let out = run("tofu", &["version"]);
    assert_eq!(first_line(&out), "OpenTofu v1.10.10", "{out}");
}

#[test]
fn terraform_is_1_5_7() {
    let out = run("terraform", &["version"]);
    assert_eq!(first_line(&out), "Terraform v1.5.7", "{out}");
}

#[test]
fn crossplane_cli_is_2_2() {
    let out = run("crossplane", &["version", "--client"]);
    assert!(out.contains("v2.2."), "{out}");
}

#[test]
fn helm_is_v3() {
    let out = run("helm", &["version", "--short"]);
    assert!(out.starts_with("v3."), "{out}");
}

#[test]
fn etcd_is_3_5() {
    let out = run("etcd", &["--version"]);
    assert!(out.starts_with("etcd Version: 3.5."), "{out}");
}

#[test]
fn opa_is_1_22_4() {
    let out = run("opa", &["version"]);
    assert_eq!(first_line(&out), "Version: 1.22.4", "{out}");
}

#[test]
fn kube_apiserver_is_1_35_4() {
    let out = run("kube-apiserver", &["--version"]);
    assert_eq!(out.trim(), "Kubernetes v1.35.4");
}

#[test]
fn functions_start() {
    for f in ["function-patch-and-transform", "function-auto-ready"] {
        let out = run(f, &["--help"]);
        assert!(out.contains("--insecure"), "{f}: {out}");
    }
}

/// Kills a function server when the test ends, pass or fail.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn serve(function: &str) -> (Server, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let child = peer_command(function)
        .unwrap_or_else(|e| panic!("{e}"))
        .args(["--insecure", "--address", &addr])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {function}: {e}"));
    let server = Server(child);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "{function} never listened on {addr}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    (server, addr)
}

/// `crossplane render` drives both functions over gRPC; the pinned
/// patch-and-transform release speaks the v1beta1 protocol, which crank must
/// still fall back to.
#[test]
fn crossplane_renders_through_both_functions() {
    let (_pat, pat_addr) = serve("function-patch-and-transform");
    let (_ready, ready_addr) = serve("function-auto-ready");
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write fixture");
        path.to_string_lossy().into_owned()
    };
    let xr = write(
        "xr.yaml",
        "apiVersion: example.agentplane.dev/v1\nkind: XQueue\nmetadata:\n  name: q\nspec:\n  region: eu-west-1\n".into(),
    );
    let composition = write(
        "composition.yaml",
        r#"apiVersion: apiextensions.crossplane.io/v1
kind: Composition
metadata:
  name: queues
spec:
  compositeTypeRef:
    apiVersion: example.agentplane.dev/v1
    kind: XQueue
  mode: Pipeline
  pipeline:
    - step: patch-and-transform
      functionRef:
        name: function-patch-and-transform
      input:
        apiVersion: pt.fn.crossplane.io/v1beta1
        kind: Resources
        resources:
          - name: queue
            base:
              apiVersion: sqs.aws.upbound.io/v1beta1
              kind: Queue
              spec:
                forProvider:
                  region: us-east-1
            patches:
              - type: FromCompositeFieldPath
                fromFieldPath: spec.region
                toFieldPath: spec.forProvider.region
    - step: auto-ready
      functionRef:
        name: function-auto-ready
"#
        .into(),
    );
    let function = |name: &str, addr: &str| {
        format!(
            "apiVersion: pkg.crossplane.io/v1\nkind: Function\nmetadata:\n  name: {name}\n  annotations:\n    render.crossplane.io/runtime: Development\n    render.crossplane.io/runtime-development-target: {addr}\nspec:\n  package: example.invalid/{name}:v0\n"
        )
    };
    let functions = write(
        "functions.yaml",
        format!(
            "{}---\n{}",
            function("function-patch-and-transform", &pat_addr),
            function("function-auto-ready", &ready_addr)
        ),
    );
    let out = run("crossplane", &["render", &xr, &composition, &functions]);
    assert!(out.contains("kind: Queue"), "{out}");
    assert!(out.contains("region: eu-west-1"), "{out}");
    assert!(!out.contains("region: us-east-1"), "{out}");
    // auto-ready saw a composed resource without a Ready condition.
    assert!(out.contains("Unready resources: queue"), "{out}");
}
