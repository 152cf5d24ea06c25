//! The Rust crates linked into a binary: its package's normal dependencies, transitively, for
//! Linux x86_64, as `cargo metadata` resolves them. Build dependencies and proc macros run only
//! on the build machine and are left out.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use cargo_metadata::{DependencyKind, Metadata, Package, PackageId, TargetKind};

use super::error::{ImageError, Result};

/// One crate in the SBOM.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Crate {
    pub name: String,
    pub version: String,
    /// The SPDX expression from Cargo.toml, if the crate declares one.
    pub license: Option<String>,
    /// From crates.io (else a path or git dependency: ours).
    pub crates_io: bool,
}

/// Reads the resolved graph once for all images.
pub fn metadata(workspace: &std::path::Path) -> Result<Metadata> {
    Ok(cargo_metadata::MetadataCommand::new()
        .current_dir(workspace)
        .other_options(vec![
            "--filter-platform".to_owned(),
            "x86_64-unknown-linux-gnu".to_owned(),
        ])
        .exec()?)
}

pub fn package<'m>(metadata: &'m Metadata, image: &str, name: &str) -> Result<&'m Package> {
    metadata
        .workspace_packages()
        .into_iter()
        .find(|p| p.name.as_str() == name)
        .ok_or_else(|| ImageError::UnknownPackage {
            image: image.to_owned(),
            package: name.to_owned(),
        })
}

/// The crates `root` links, itself included, sorted by name and version.
pub fn linked_crates(metadata: &Metadata, root: &Package) -> Vec<Crate> {
    let packages: BTreeMap<&PackageId, &Package> =
        metadata.packages.iter().map(|p| (&p.id, p)).collect();
    let nodes: BTreeMap<&PackageId, _> = metadata
        .resolve
        .iter()
        .flat_map(|r| r.nodes.iter())
        .map(|n| (&n.id, n))
        .collect();
    let mut seen: BTreeSet<&PackageId> = BTreeSet::new();
    let mut queue = VecDeque::from([&root.id]);
    while let Some(id) = queue.pop_front() {
        if !seen.insert(id) {
            continue;
        }
        let Some(node) = nodes.get(id) else { continue };
        for dep in &node.deps {
            let linked = dep
                .dep_kinds
                .iter()
                .any(|k| k.kind == DependencyKind::Normal);
            let proc_macro = packages.get(&dep.pkg).is_some_and(|p| {
                p.targets
                    .iter()
                    .any(|t| t.kind.contains(&TargetKind::ProcMacro))
            });
            if linked && !proc_macro {
                queue.push_back(&dep.pkg);
            }
        }
    }
    let mut crates: Vec<Crate> = seen
        .into_iter()
        .filter_map(|id| packages.get(id))
        .map(|p| Crate {
            name: p.name.to_string(),
            version: p.version.to_string(),
            license: p.license.clone(),
            crates_io: p.source.as_ref().is_some_and(|s| s.is_crates_io()),
        })
        .collect();
    crates.sort();
    crates
}
