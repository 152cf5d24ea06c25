//! A silent endpoint, Ctrl-C and a dead client, through the real clients (OpenTofu and
//! Terraform 1.5.7), over protocol 6 (Ctrl-C over protocol 5 too: `Stop` there, `StopProvider`
//! in 6).
//!
//! The silent endpoint is a real listener on 127.0.0.1 that accepts connections and never
//! writes a byte: the failure under test, not a stand-in for AWS or Kubernetes. The provider's
//! SQS endpoint and Kubernetes host both point at it; `plan` then reads a data source (SQS
//! GetQueueUrl) and, through an `import` block, an edge device (a Kubernetes GET).
//!
//! - timeouts: with short `connect_timeout`/`read_timeout`/`operation_timeout` the plan fails
//!   on its own, naming both calls.
//! - Ctrl-C: with the default (long) timeouts, one SIGINT to the client's process group (what
//!   a terminal sends) ends the run; the time it took is printed, the bound asserted is generous
//!   (timing thresholds belong in benchmarks).
//! - dead client: SIGKILL of the client mid-plan; the provider process must not linger.
//!
//! A missing client fails the test with the reason (`ci/peers.sh` builds them).

mod common;

use std::io::Read as _;
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a client may take to start, init and reach the silent endpoint on a busy machine.
const REACH: Duration = Duration::from_secs(120);
/// Generous bound on exiting after Ctrl-C; the measured figure is printed.
const AFTER_INTERRUPT: Duration = Duration::from_secs(10);
/// Generous bound on the provider exiting after its client was killed.
const AFTER_CLIENT_DEATH: Duration = Duration::from_secs(10);

/// A listener that accepts every connection and never answers. Accepted connections are held
/// open (never read, never written) for the life of the test process.
struct Silent {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicUsize>,
}

impl Silent {
    fn start() -> Silent {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            let mut held: Vec<TcpStream> = Vec::new();
            for conn in listener.incoming().flatten() {
                held.push(conn);
                count.fetch_add(1, Ordering::SeqCst);
            }
        });
        Silent { addr, accepted }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits until at least one connection was accepted.
    fn wait_reached(&self, client: &mut Child, what: &str) {
        let deadline = Instant::now() + REACH;
        while self.accepted.load(Ordering::SeqCst) == 0 {
            if let Ok(Some(status)) = client.try_wait() {
                panic!("the client exited ({status}) before the provider reached the {what}");
            }
            assert!(
                Instant::now() < deadline,
                "the provider did not connect to the {what} within {REACH:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A client workspace whose provider talks to two silent endpoints.
struct Workspace {
    client: &'static str,
    protocol: u32,
    dir: tempfile::TempDir,
    aws: Silent,
    kube: Silent,
}

impl Workspace {
    /// `settings` is spliced into the provider block.
    fn new(client: &'static str, protocol: u32, settings: &str) -> Workspace {
        agentplane_testsupport::peer_path(client).unwrap_or_else(|e| panic!("{client}: {e}"));
        let dir = tempfile::Builder::new()
            .prefix(&format!("agentplane-hangs-{client}."))
            .tempdir()
            .unwrap();
        common::install_provider(dir.path());
        let ws = Workspace {
            client,
            protocol,
            dir,
            aws: Silent::start(),
            kube: Silent::start(),
        };
        ws.configure(settings);
        let init = ws.command(&["init", "-no-color", "-input=false"]).output();
        let init = init.unwrap_or_else(|e| panic!("running {client} init: {e}"));
        assert!(
            init.status.success(),
            "{client} init failed:\n{}{}",
            String::from_utf8_lossy(&init.stdout),
            String::from_utf8_lossy(&init.stderr)
        );
        ws
    }

    /// Writes main.tf with `settings` spliced into the provider block.
    fn configure(&self, settings: &str) {
        let terraform = common::required_providers();
        let (aws, kube) = (self.aws.url(), self.kube.url());
        let tf = format!(
            r#"{terraform}
provider "agentplane" {{
  region     = "us-east-1"
  access_key = "testing"
  secret_key = "testing"
{settings}
  endpoints {{
    sqs = "{aws}"
  }}
  kubernetes {{
    host = "{kube}"
  }}
}}

data "agentplane_queue" "jobs" {{
  name = "jobs"
}}

import {{
  to = agentplane_edge_device.pi
  id = "default/pi"
}}

resource "agentplane_edge_device" "pi" {{
  namespace = "default"
  name      = "pi"
  owner     = "alice"
  public_key {{
    id  = "k1"
    key = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
  }}
}}
"#
        );
        std::fs::write(self.dir.path().join("main.tf"), tf).unwrap();
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = agentplane_testsupport::peer_command(self.client).unwrap();
        common::client_env(&mut cmd, self.dir.path(), self.protocol);
        cmd.args(args).stdin(Stdio::null());
        cmd
    }

    /// Starts `plan` in its own process group (as a shell starts a foreground job), output
    /// to files so a full pipe never blocks it.
    fn start_plan(&self) -> Child {
        let out = std::fs::File::create(self.dir.path().join("plan.out")).unwrap();
        let err = std::fs::File::create(self.dir.path().join("plan.err")).unwrap();
        self.command(&["plan", "-no-color", "-input=false"])
            .process_group(0)
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} plan: {e}", self.client))
    }

    /// What the plan printed, stdout then stderr.
    fn plan_output(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
        format!("{}{}", read("plan.out"), read("plan.err"))
    }

    fn wait_reached(&self, plan: &mut Child) {
        self.aws.wait_reached(plan, "silent SQS endpoint");
        self.kube.wait_reached(plan, "silent Kubernetes host");
    }
}

/// Waits for `child` to exit within `bound`; `None` if it is still running.
fn wait_within(child: &mut Child, bound: Duration) -> Option<(std::process::ExitStatus, Duration)> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some((status, start.elapsed()));
        }
        if start.elapsed() > bound {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `signal` to process group `pgid`.
fn signal_group(pgid: u32, signal: libc::c_int) {
    let pgid = libc::pid_t::try_from(pgid).unwrap();
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::kill(-pgid, signal) };
    assert_eq!(
        rc,
        0,
        "kill(-{pgid}, {signal}): {}",
        std::io::Error::last_os_error()
    );
}

/// One field of /proc/<pid>/stat after the command name (field 3 is index 0: the state).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself hold spaces or parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    Some(rest.split(' ').map(str::to_string).collect())
}

/// Whether `pid` is a live process (a zombie waiting for a reaper has already exited).
fn alive(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|f| f[0] != "Z")
}

/// The provider processes `client_pid` started, found by parent pid and command line.
fn providers_of(client_pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Some(fields) = stat_fields(pid) else {
            continue;
        };
        if fields[1] != client_pid.to_string() || fields[0] == "Z" {
            continue;
        }
        let mut cmdline = Vec::new();
        if std::fs::File::open(Path::new("/proc").join(pid.to_string()).join("cmdline"))
            .and_then(|mut f| f.read_to_end(&mut cmdline))
            .is_ok()
            && String::from_utf8_lossy(&cmdline).contains("terraform-provider-agentplane")
        {
            found.push(pid);
        }
    }
    found
}

/// Kills whatever a failed test left running.
fn cleanup(plan: &mut Child, providers: &[u32]) {
    let _ = plan.kill();
    let _ = plan.wait();
    for &pid in providers {
        // SAFETY: as in signal_group.
        unsafe { libc::kill(libc::pid_t::try_from(pid).unwrap(), libc::SIGKILL) };
    }
}

/// Runs `plan` to its end (it must end on its own) and returns its output.
fn plan_must_fail_on_its_own(ws: &Workspace, what: &str) -> String {
    let client = ws.client;
    let mut plan = ws.start_plan();
    let bound = REACH + Duration::from_secs(30);
    let Some((status, took)) = wait_within(&mut plan, bound) else {
        let providers = providers_of(plan.id());
        cleanup(&mut plan, &providers);
        panic!(
            "{client} plan against silent endpoints ({what}) was still running after {bound:?}: the calls are not bounded\n{}",
            ws.plan_output()
        );
    };
    let out = ws.plan_output();
    println!("{client}: plan against silent endpoints ({what}) failed on its own after {took:.2?}");
    assert_eq!(status.code(), Some(1), "{out}");
    out
}

fn silent_endpoints_time_out(client: &'static str) {
    // The read timeout ends each call (no retries, a generous operation bound).
    let ws = Workspace::new(
        client,
        6,
        "  max_retries       = 0\n  connect_timeout   = \"2s\"\n  read_timeout      = \"2s\"\n  operation_timeout = \"1m\"",
    );
    let out = plan_must_fail_on_its_own(&ws, "read_timeout 2s");
    assert!(
        out.contains(
            "AWS did not answer sqs:GetQueueUrl for data.agentplane_queue \"jobs\" in time"
        ),
        "{out}"
    );
    assert!(
        out.contains("Cannot reach the Kubernetes API for agentplane_edge_device \"pi\"")
            && out.contains("timed out"),
        "{out}"
    );
    assert!(
        out.contains("read_timeout"),
        "the diagnostics do not name the setting to raise:\n{out}"
    );

    // The operation timeout ends each call although one attempt could wait far longer, with
    // the default retry budget.
    ws.configure("  read_timeout      = \"1m\"\n  operation_timeout = \"3s\"");
    let out = plan_must_fail_on_its_own(&ws, "operation_timeout 3s");
    assert!(
        out.contains(
            "AWS did not answer sqs:GetQueueUrl for data.agentplane_queue \"jobs\" in time"
        ) && out.contains("operation timeout"),
        "{out}"
    );
    assert!(
        out.contains("Kubernetes API timed out for agentplane_edge_device \"pi\""),
        "{out}"
    );
    assert!(out.contains("operation_timeout = 3s"), "{out}");
}

fn invalid_timeouts_are_attribute_errors(client: &'static str) {
    let bad = [
        ("connect_timeout", "soon", "is not a duration"),
        ("read_timeout", "0s", "is zero"),
        ("operation_timeout", "-5s", "is negative"),
    ];
    let ws = Workspace::new(client, 6, "");
    let lines: Vec<String> = bad
        .iter()
        .map(|(attr, value, _)| format!("  {attr} = \"{value}\""))
        .collect();
    ws.configure(&lines.join("\n"));
    let out = ws.command(&["validate", "-no-color"]).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    for ((attr, _, why), line) in bad.iter().zip(&lines) {
        assert!(text.contains(&format!("Invalid {attr}")), "{attr}:\n{text}");
        assert!(text.contains(why), "{attr}:\n{text}");
        // An attribute-path diagnostic: the client quotes the attribute's own line.
        assert!(text.contains(line.trim()), "{attr} not pointed at:\n{text}");
    }
}

fn first_interrupt_ends_the_run(client: &'static str, protocol: u32) {
    let ws = Workspace::new(client, protocol, "");
    let mut plan = ws.start_plan();
    ws.wait_reached(&mut plan);
    let providers = providers_of(plan.id());
    assert!(!providers.is_empty(), "no provider process under {client}");
    // A terminal's Ctrl-C: SIGINT to the whole foreground group, client and provider alike.
    signal_group(plan.id(), libc::SIGINT);
    let Some((status, took)) = wait_within(&mut plan, AFTER_INTERRUPT) else {
        cleanup(&mut plan, &providers);
        panic!(
            "{client} was still running {AFTER_INTERRUPT:?} after one Ctrl-C\n{}",
            ws.plan_output()
        );
    };
    println!("{client} (protocol {protocol}): exited {took:.2?} after the first Ctrl-C ({status})");
    let out = ws.plan_output();
    assert!(!status.success(), "{out}");
    assert!(
        out.contains("Cancelled by the client"),
        "the interrupted calls did not report the cancellation:\n{out}"
    );
    let lingering = wait_gone(&providers, Duration::from_secs(5));
    assert!(
        lingering.is_empty(),
        "provider processes {lingering:?} outlived {client} after Ctrl-C"
    );
}

fn killed_client_leaves_no_provider(client: &'static str) {
    let ws = Workspace::new(client, 6, "");
    let mut plan = ws.start_plan();
    ws.wait_reached(&mut plan);
    let providers = providers_of(plan.id());
    assert!(!providers.is_empty(), "no provider process under {client}");
    plan.kill().unwrap(); // SIGKILL to the client alone: no Stop, no Shutdown.
    plan.wait().unwrap();
    let start = Instant::now();
    let lingering = wait_gone(&providers, AFTER_CLIENT_DEATH);
    if !lingering.is_empty() {
        cleanup(&mut plan, &lingering);
        panic!(
            "provider processes {lingering:?} still running {AFTER_CLIENT_DEATH:?} after {client} was killed"
        );
    }
    println!(
        "{client}: provider exited {:.2?} after its client was killed",
        start.elapsed()
    );
}

/// Waits up to `bound` for every pid to exit; returns those still alive.
fn wait_gone(pids: &[u32], bound: Duration) -> Vec<u32> {
    let deadline = Instant::now() + bound;
    loop {
        let left: Vec<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn tofu_silent_endpoints_time_out() {
    silent_endpoints_time_out("tofu");
}

#[test]
fn terraform_silent_endpoints_time_out() {
    silent_endpoints_time_out("terraform");
}

#[test]
fn tofu_invalid_timeouts_are_attribute_errors() {
    invalid_timeouts_are_attribute_errors("tofu");
}

#[test]
fn terraform_invalid_timeouts_are_attribute_errors() {
    invalid_timeouts_are_attribute_errors("terraform");
}

#[test]
fn tofu_protocol6_first_interrupt_ends_the_run() {
    first_interrupt_ends_the_run("tofu", 6);
}

#[test]
fn tofu_protocol5_first_interrupt_ends_the_run() {
    first_interrupt_ends_the_run("tofu", 5);
}

#[test]
fn terraform_protocol6_first_interrupt_ends_the_run() {
    first_interrupt_ends_the_run("terraform", 6);
}

#[test]
fn terraform_protocol5_first_interrupt_ends_the_run() {
    first_interrupt_ends_the_run("terraform", 5);
}

#[test]
fn tofu_killed_client_leaves_no_provider() {
    killed_client_leaves_no_provider("tofu");
}

#[test]
fn terraform_killed_client_leaves_no_provider() {
    killed_client_leaves_no_provider("terraform");
}
