//! Differential test: agentplane's Rego module (regorus) and the reference implementation, the
//! real `opa` binary (v1.22.4, built from its Go module by `ci/peers.sh opa`), decide the same
//! policies over the same 200 generated inputs, and must agree on every one.
//!
//! The policies (`tests/rego/*.rego`) use sets and set operations, comprehensions, `some ... in`,
//! `every`, default rules, string builtins, regex, functions and nested input. Inputs come from a
//! seeded generator, so a failure names an input that reproduces. OPA evaluates all inputs of a
//! policy in one process: the query binds each input with `with input as`, and an input whose
//! decision is undefined is simply absent from its answer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use agentplane::policy::rego::{CompiledRego, RegoError, RegoSource, read_decision};
use agentplane_api::policy::{DEFAULT_REGO_QUERY, RegoDecisionKind};
use serde_json::{Value, json};

const INPUTS: usize = 200;
const SEED: u64 = 0x5eed_0016;

/// SplitMix64: a tiny, well-known PRNG, so the inputs are the same on every run and machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

const WORDS: &[&str] = &[
    "summarize",
    "the",
    "report",
    "password",
    "SSN",
    "secret",
    "quarterly",
    "numbers",
    "please",
    "URGENT",
    "ssn",
    "café",
    "  ",
    "draft",
    "email",
    "to",
    "bob",
];

fn generate(rng: &mut Rng) -> Value {
    if rng.chance(25) {
        let mut args = serde_json::Map::new();
        let path = rng.pick(&[
            "/tmp/notes.txt",
            "/etc/passwd",
            "/var/log/app.log",
            "/var/log/secret.log",
            "/tmp/x.log",
            "relative/path",
        ]);
        args.insert("path".into(), json!(path));
        if rng.chance(40) {
            args.insert("mode".into(), json!(rng.pick(&["r", "w"])));
        }
        if rng.chance(20) {
            args.insert("recursive".into(), json!(rng.chance(50)));
        }
        if rng.chance(15) {
            args.insert("averyverylongkey".into(), json!("v"));
        }
        return json!({
            "kind": "tool_call",
            "namespace": "team-a",
            "task": {"id": format!("t{}", rng.below(1000)), "step": rng.below(16)},
            "intent": {"type": rng.pick(&["summarize", "purchase"])},
            "tool": {
                "server": rng.pick(&["fs", "web", "fs"]),
                "name": rng.pick(&["read_file", "write_file", "fetch"]),
                "arguments": args,
            },
        });
    }
    let n_words = rng.below(20);
    let mut prompt = (0..n_words)
        .map(|_| rng.pick(WORDS))
        .collect::<Vec<_>>()
        .join(" ");
    if rng.chance(10) {
        prompt = prompt.to_uppercase();
    }
    let scopes: Vec<&str> = [
        "contacts", "location", "health", "calendar", "files", "mail",
    ]
    .into_iter()
    .filter(|_| rng.chance(30))
    .collect();
    let mut params = serde_json::Map::new();
    match rng.below(4) {
        0 => {}
        1 => {
            params.insert("maxTokens".into(), json!(rng.below(8000)));
        }
        2 => {
            params.insert("maxTokens".into(), json!("lots"));
        }
        _ => {
            params.insert("maxTokens".into(), json!(100 * rng.below(60)));
        }
    }
    if rng.chance(50) {
        let tags: Vec<&str> = (0..rng.below(4))
            .map(|_| rng.pick(&["urgent", "urgent-now", "later", "urgently"]))
            .collect();
        params.insert("tags".into(), json!(tags));
    }
    let mut resources = serde_json::Map::new();
    if rng.chance(70) {
        resources.insert("gpu".into(), json!(rng.below(4)));
    }
    if rng.chance(40) {
        resources.insert("model".into(), json!(rng.pick(&["large", "small"])));
    }
    json!({
        "kind": "admission",
        "namespace": "team-a",
        "task": {"id": format!("t{}", rng.below(1000))},
        "device": {
            "id": rng.pick(&["dev-1", "dev-42", "laptop", "dev-x"]),
            "seq": rng.below(100),
        },
        "user": {"id": rng.pick(&["alice", "bob"])},
        "intent": {
            "type": rng.pick(&["summarize", "translate", "delete-everything", "wire-money", "purchase"]),
            "prompt": prompt,
            "promptBytes": 0,
            "params": params,
        },
        "privacyLevel": rng.pick(&["public", "regulated", "private"]),
        "requiredResources": resources,
        "consent": {"scopes": scopes},
    })
}

/// A decision as both sides are compared on.
#[derive(Debug, PartialEq)]
enum Outcome {
    Decided(RegoDecisionKind, Vec<String>),
    Undefined,
    NotADecision(String),
}

impl Outcome {
    fn label(&self) -> String {
        match self {
            Outcome::Decided(k, _) => k.as_str().to_owned(),
            Outcome::Undefined => "undefined".into(),
            Outcome::NotADecision(_) => "not a decision".into(),
        }
    }
}

fn policies() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/rego");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rego"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "policies in {}", dir.display());
    files
}

fn regorus_outcome(policy: &CompiledRego, input: &Value) -> Outcome {
    match policy.decide(input) {
        Ok(v) => {
            assert!(v.digest.starts_with("sha256:"));
            Outcome::Decided(v.decision, v.reasons)
        }
        Err(RegoError::Undefined { .. }) => Outcome::Undefined,
        Err(RegoError::NotADecision { problem, .. }) => Outcome::NotADecision(problem),
        Err(e) => panic!("regorus failed on {input}: {e}"),
    }
}

fn opa_outcomes(opa: &Path, policy: &Path, inputs: &[Value]) -> BTreeMap<usize, Outcome> {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("inputs.json");
    std::fs::write(&data, json!({ "diffinputs": inputs }).to_string()).unwrap();
    let query = format!(
        "{{i: d | some i, x in data.diffinputs; d := {DEFAULT_REGO_QUERY} with input as x}}"
    );
    let out = Command::new(opa)
        .args([
            "eval",
            "--format",
            "json",
            "--strict-builtin-errors",
            "--data",
        ])
        .arg(policy)
        .arg("--data")
        .arg(&data)
        .arg(&query)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", opa.display()));
    assert!(
        out.status.success(),
        "opa eval of {} failed: {}{}",
        policy.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let answers = doc["result"][0]["expressions"][0]["value"]
        .as_object()
        .unwrap_or_else(|| panic!("unexpected opa output: {doc}"));
    (0..inputs.len())
        .map(|i| {
            let outcome = match answers.get(&i.to_string()) {
                None => Outcome::Undefined,
                Some(v) => match read_decision(DEFAULT_REGO_QUERY, v) {
                    Ok((kind, reasons)) => Outcome::Decided(kind, reasons),
                    Err(RegoError::NotADecision { problem, .. }) => Outcome::NotADecision(problem),
                    Err(e) => panic!("{e}"),
                },
            };
            (i, outcome)
        })
        .collect()
}

#[test]
fn regorus_and_opa_decide_every_generated_input_alike() {
    let opa = agentplane_testsupport::peer_path("opa")
        .expect("opa is a required peer: run ci/peers.sh opa");
    let mut rng = Rng(SEED);
    let inputs: Vec<Value> = (0..INPUTS).map(|_| generate(&mut rng)).collect();
    let mut compared = 0;
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    let mut differences = Vec::new();
    for path in policies() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let source = RegoSource {
            name: name.clone(),
            text: std::fs::read_to_string(&path).unwrap(),
        };
        let compiled = CompiledRego::compile(DEFAULT_REGO_QUERY, &[source])
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let reference = opa_outcomes(&opa, &path, &inputs);
        for (i, input) in inputs.iter().enumerate() {
            let ours = regorus_outcome(&compiled, input);
            let theirs = &reference[&i];
            compared += 1;
            *kinds.entry(ours.label()).or_default() += 1;
            if &ours != theirs {
                differences.push(format!(
                    "{name}, input #{i} {input}:\n  regorus: {ours:?}\n  opa:     {theirs:?}"
                ));
            }
        }
    }
    println!(
        "compared {compared} decisions ({INPUTS} inputs x {} policies, seed {SEED:#x}): {kinds:?}",
        policies().len()
    );
    assert!(
        differences.is_empty(),
        "{} of {compared} decisions differ:\n{}",
        differences.len(),
        differences.join("\n")
    );
    // The inputs exercise every verdict, so agreement is not agreement on one answer.
    for k in ["allow", "deny", "require_approval"] {
        assert!(
            kinds.get(k).copied().unwrap_or(0) > 0,
            "no {k} among {kinds:?}"
        );
    }
}
