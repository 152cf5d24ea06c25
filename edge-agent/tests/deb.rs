//! The .deb: cargo-deb (a peer built by ci/peers.sh) packages the binary the tests just built, and
//! the package holds what a device needs: the binary, the docs and the maintainer scripts that
//! install the hardened unit on configure and remove it on remove. The test then does what the
//! postinst does, under a scratch root, with the binary taken out of the package.
//!
//! `make deb` builds the release package the same way (`--profile release`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_deb_holds_the_agent_its_docs_and_the_service_scripts() {
    let cargo_deb = agentplane_testsupport::peer_path("cargo-deb")
        .unwrap_or_else(|e| panic!("cargo-deb is needed for this test: {e}"));
    let dpkg_deb = Path::new("/usr/bin/dpkg-deb");
    assert!(
        dpkg_deb.exists(),
        "dpkg-deb is needed for this test (Debian package dpkg)"
    );
    let out = tempfile::tempdir().unwrap();
    // The binary under test is this build's (`cargo test` built it); --no-build packages it as is.
    run(Command::new(&cargo_deb)
        .args([
            "-p",
            "agentplane-edge",
            "--no-build",
            "--profile",
            "dev",
            "--output",
        ])
        .arg(out.path())
        .current_dir(repo_root()));
    let deb = std::fs::read_dir(out.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .expect("a .deb was written");
    let name = deb.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with(&format!("agentplane-edge_{}", env!("CARGO_PKG_VERSION"))),
        "{name}"
    );

    let info = run(Command::new(dpkg_deb).arg("--info").arg(&deb));
    for field in [
        "Package: agentplane-edge",
        "Architecture: amd64",
        "Section: net",
        "Depends: libc6",
    ] {
        assert!(info.contains(field), "control lacks {field:?}:\n{info}");
    }
    for script in ["postinst", "prerm", "postrm"] {
        assert!(info.contains(script), "no {script} in:\n{info}");
    }
    let contents = run(Command::new(dpkg_deb).arg("--contents").arg(&deb));
    for path in [
        "./usr/bin/agentplane-edge",
        "./usr/share/doc/agentplane-edge/README.md",
    ] {
        assert!(contents.contains(path), "package lacks {path}:\n{contents}");
    }

    // Unpack and do what the postinst does (without systemd), under a scratch root.
    let unpacked = tempfile::tempdir().unwrap();
    run(Command::new(dpkg_deb)
        .arg("-x")
        .arg(&deb)
        .arg(unpacked.path()));
    let bin = unpacked.path().join("usr/bin/agentplane-edge");
    let version = run(Command::new(&bin).arg("--version"));
    assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");
    let root = tempfile::tempdir().unwrap();
    run(Command::new(&bin)
        .args(["install", "--no-copy-binary", "--no-systemctl"])
        .args(["--bin-path", "/usr/bin/agentplane-edge", "--root"])
        .arg(root.path()));
    let unit = std::fs::read_to_string(
        root.path()
            .join("etc/systemd/system/agentplane-edge.service"),
    )
    .expect("the postinst path writes the unit");
    assert!(
        unit.contains("ExecStart=/usr/bin/agentplane-edge run"),
        "{unit}"
    );
    assert!(unit.contains("NoNewPrivileges=yes"), "{unit}");
    // And the prerm path removes it again.
    run(Command::new(&bin)
        .args(["uninstall", "--no-systemctl", "--root"])
        .arg(root.path()));
    assert!(
        !root
            .path()
            .join("etc/systemd/system/agentplane-edge.service")
            .exists()
    );
}
