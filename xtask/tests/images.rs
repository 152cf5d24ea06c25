//! The images as a real registry and an independent client see them.
//!
//! Both layouts are built twice from this build's binaries (the dev profile: `make images` packs
//! the release ones with the same code) and must give the same digests. Then crane (from
//! go-containerregistry, built by ci/peers.sh) pushes each layout to the distribution registry
//! (also from ci/peers.sh) started here on 127.0.0.1 with a fresh storage dir, pulls the image by
//! digest, and the binary runs from the pulled, unpacked rootfs.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentplane_testsupport::{peer_path, repo_root};
use serde_json::Value;
use xtask::images::{self, Built, CA_BUNDLE, IMAGES, REPOSITORY_PREFIX};

/// The distribution registry on a free port, its storage in a temp dir; stopped on drop.
struct Registry {
    child: Child,
    host: String,
    dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    fn start() -> Self {
        let bin = peer_path("registry").unwrap_or_else(|e| {
            panic!("the distribution registry is needed (ci/peers.sh registry): {e}")
        });
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let host = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {host}\n",
                dir.path().join("storage").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start the registry");
        let registry = Self { child, host, dir };
        registry.wait_ready();
        registry
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if TcpStream::connect(&self.host).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default();
        panic!(
            "the registry did not listen on {} in 30 s:\n{log}",
            self.host
        );
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn crane(args: &[&str]) -> String {
    let bin =
        peer_path("crane").unwrap_or_else(|e| panic!("crane is needed (ci/peers.sh crane): {e}"));
    run(Command::new(bin).args(args))
}

fn target_dir(workspace: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace.join(dir),
        None => workspace.join("target"),
    }
}

fn build_into(out: &Path) -> Vec<Built> {
    let workspace = repo_root();
    let bin = target_dir(&workspace).join("debug");
    // `cargo test --workspace` has built both binaries; built alone, this test builds them.
    let missing = IMAGES.iter().any(|s| !bin.join(s.binary).is_file());
    images::build(&images::Options {
        workspace,
        profile: "dev".into(),
        out: out.to_owned(),
        build: missing,
        source_date_epoch: 0,
        only: vec![],
    })
    .unwrap_or_else(|e| panic!("building the images: {e}"))
}

fn blob_names(layout: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Every path under `root` whose file name is a shell.
fn shells(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            if ["sh", "bash", "dash", "ash", "busybox"].contains(&name.as_str()) {
                found.push(entry.path());
            }
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            }
        }
    }
    found
}

#[test]
fn images_are_reproducible_push_pull_by_digest_and_run() {
    let first_dir = tempfile::tempdir().unwrap();
    let second_dir = tempfile::tempdir().unwrap();
    let first = build_into(first_dir.path());
    let second = build_into(second_dir.path());
    assert_eq!(first.len(), IMAGES.len());
    for (a, b) in first.iter().zip(&second) {
        assert_eq!(
            a.manifest_digest, b.manifest_digest,
            "{}: image digest differs between two builds",
            a.name
        );
        assert_eq!(
            a.index_digest, b.index_digest,
            "{}: index digest differs",
            a.name
        );
        assert_eq!(
            a.sbom_digest, b.sbom_digest,
            "{}: SBOM digest differs",
            a.name
        );
        assert_eq!(blob_names(&a.layout), blob_names(&b.layout));
        assert_eq!(
            std::fs::read(a.layout.join("index.json")).unwrap(),
            std::fs::read(b.layout.join("index.json")).unwrap()
        );
    }

    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    for image in &first {
        let spec = IMAGES.iter().find(|s| s.name == image.name).unwrap();
        let version = image.reference.rsplit_once(':').unwrap().1;
        assert_eq!(
            image.reference,
            format!("{REPOSITORY_PREFIX}/{}:{version}", image.name)
        );
        let repo = format!("{}/agentplane/{}", registry.host, image.name);
        let tag = format!("{repo}:{version}");
        let layout = image.layout.to_str().unwrap();

        // The layout's index (image + SBOM artifact) goes up as the tag's target.
        crane(&["push", "--insecure", "--index", layout, &tag]);
        assert_eq!(
            crane(&["digest", "--insecure", &tag]).trim(),
            image.index_digest
        );

        // Pulled by digest, the image is the one built.
        let by_digest = format!("{repo}@{}", image.manifest_digest);
        assert_eq!(
            crane(&["digest", "--insecure", &by_digest]).trim(),
            image.manifest_digest
        );
        let pulled = work.path().join(format!("{}-pulled", image.name));
        crane(&[
            "pull",
            "--insecure",
            "--format",
            "oci",
            &by_digest,
            pulled.to_str().unwrap(),
        ]);
        let pulled_index: Value =
            serde_json::from_slice(&std::fs::read(pulled.join("index.json")).unwrap()).unwrap();
        assert_eq!(
            pulled_index["manifests"][0]["digest"],
            image.manifest_digest.as_str()
        );

        let config: Value =
            serde_json::from_str(&crane(&["config", "--insecure", &by_digest])).unwrap();
        assert_eq!(config["config"]["User"], "65532:65532");
        assert_eq!(config["architecture"], "amd64");
        assert_eq!(
            config["config"]["Entrypoint"][0],
            format!("/usr/local/bin/{}", spec.binary)
        );

        // The SBOM: an artifact in the index whose subject is the image.
        let index: Value = serde_json::from_str(&crane(&["manifest", "--insecure", &tag])).unwrap();
        let sbom_entry = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["artifactType"] == "application/spdx+json")
            .expect("an SPDX artifact in the index");
        assert_eq!(sbom_entry["digest"], image.sbom_digest.as_str());
        let sbom_manifest: Value = serde_json::from_str(&crane(&[
            "manifest",
            "--insecure",
            &format!("{repo}@{}", image.sbom_digest),
        ]))
        .unwrap();
        assert_eq!(
            sbom_manifest["subject"]["digest"],
            image.manifest_digest.as_str()
        );
        let sbom_blob = sbom_manifest["layers"][0]["digest"].as_str().unwrap();
        let sbom: Value = serde_json::from_str(&crane(&[
            "blob",
            "--insecure",
            &format!("{repo}@{sbom_blob}"),
        ]))
        .unwrap();
        assert_eq!(sbom["spdxVersion"], "SPDX-2.3");
        let names: Vec<&str> = sbom["packages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        for wanted in [spec.package, "tokio", "libc6", "ca-certificates"] {
            assert!(
                names.contains(&wanted),
                "{}: SBOM lacks {wanted}: {names:?}",
                image.name
            );
        }

        // Unpacked by crane (the layers flattened), the rootfs runs the binary.
        let flat = work.path().join(format!("{}.tar", image.name));
        crane(&["export", "--insecure", &by_digest, flat.to_str().unwrap()]);
        let rootfs = work.path().join(format!("{}-rootfs", image.name));
        std::fs::create_dir(&rootfs).unwrap();
        run(Command::new("tar")
            .arg("-xf")
            .arg(&flat)
            .arg("-C")
            .arg(&rootfs));
        assert_eq!(
            shells(&rootfs),
            Vec::<PathBuf>::new(),
            "{}: a shell in the image",
            image.name
        );
        let bundle =
            std::fs::read_to_string(rootfs.join(CA_BUNDLE.trim_start_matches('/'))).unwrap();
        assert!(
            bundle.contains("BEGIN CERTIFICATE"),
            "{}: no CA certificates",
            image.name
        );
        let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
        assert!(passwd.contains("nonroot:x:65532:65532:"), "{passwd}");
        let entry = format!("/usr/local/bin/{}", spec.binary);
        let version_line = if running_as_root() {
            run(Command::new("chroot")
                .arg(&rootfs)
                .arg(&entry)
                .arg("--version"))
        } else {
            // Without root, the rootfs's own loader with its own libraries.
            run(Command::new(rootfs.join("lib64/ld-linux-x86-64.so.2"))
                .arg("--library-path")
                .arg(rootfs.join("usr/lib/x86_64-linux-gnu"))
                .arg(rootfs.join(entry.trim_start_matches('/')))
                .arg("--version"))
        };
        assert_eq!(version_line.trim(), format!("{} {version}", spec.binary));
    }
}

fn running_as_root() -> bool {
    run(Command::new("id").arg("-u")).trim() == "0"
}

#[test]
fn chart_and_provider_default_to_the_image_built() {
    let root = repo_root();
    let version = env!("CARGO_PKG_VERSION");
    let chart = std::fs::read_to_string(root.join("charts/agentplane/Chart.yaml")).unwrap();
    assert!(
        chart
            .lines()
            .any(|l| l.trim() == format!("appVersion: \"{version}\"")),
        "Chart.yaml appVersion is not {version}"
    );
    let values = std::fs::read_to_string(root.join("charts/agentplane/values.yaml")).unwrap();
    let repository = format!("repository: {REPOSITORY_PREFIX}/agentplane");
    assert!(
        values.lines().any(|l| l.trim() == repository),
        "values.yaml lacks {repository}"
    );
    let platform =
        std::fs::read_to_string(root.join("provider/src/resources/platform.rs")).unwrap();
    let default =
        format!("concat!(\"{REPOSITORY_PREFIX}/agentplane:\", env!(\"CARGO_PKG_VERSION\"))");
    assert!(
        platform.contains(&default),
        "the provider's DEFAULT_IMAGE is not {default}"
    );
}
