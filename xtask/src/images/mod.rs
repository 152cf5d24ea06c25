//! `cargo xtask images`: distroless-style OCI images of the release binaries.
//!
//! Each image is two layers: a base (the dynamic loader and the shared libraries the binary
//! needs, taken from this machine's Debian packages; Debian's CA bundle; /etc/passwd and
//! /etc/group with `nonroot:x:65532`; no shell) and the binary at /usr/local/bin. The OCI layout
//! written per image holds an image index naming the image manifest (linux/amd64) and an SPDX SBOM
//! artifact manifest whose `subject` is the image. Every input that could vary between builds
//! (mtimes, owners, entry order, gzip header, JSON key order, timestamps) is pinned, so the same
//! binaries give the same digests.

mod crates;
pub mod error;
mod host;
pub mod layer;
pub mod layout;
pub mod rootfs;
mod sbom;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, DescriptorBuilder, HistoryBuilder, ImageConfigurationBuilder,
    ImageIndexBuilder, ImageManifestBuilder, MediaType, Os, PlatformBuilder, RootFsBuilder,
};

use error::{ImageError, Result};
use host::DebPackage;
use rootfs::{Content, NONROOT, Tree};

/// Where the images are published; the chart's `image.repository` and the provider's default
/// `agentplane_platform.image` name the same place (a test checks).
pub const REPOSITORY_PREFIX: &str = "ghcr.io/agentplane";

/// One image: which workspace package builds its binary.
#[derive(Debug, Clone, Copy)]
pub struct ImageSpec {
    pub name: &'static str,
    pub package: &'static str,
    pub binary: &'static str,
    pub description: &'static str,
}

pub const IMAGES: &[ImageSpec] = &[
    ImageSpec {
        name: "agentplane",
        package: "agentplane",
        binary: "agentplane",
        description: "agentplane runtime: operator, gateway and worker in one binary",
    },
    ImageSpec {
        name: "agentplane-edge",
        package: "agentplane-edge",
        binary: "agentplane-edge",
        description: "agentplane edge agent",
    },
];

pub const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
pub const BIN_DIR: &str = "/usr/local/bin";

#[derive(Debug, Clone)]
pub struct Options {
    pub workspace: PathBuf,
    /// Cargo profile of the binaries: "release" for `make images`, "dev" for the test.
    pub profile: String,
    /// Layouts go to `<out>/<image name>/`.
    pub out: PathBuf,
    /// Run `cargo build` for each binary first (one package at a time, as the benches and the
    /// .deb build them, so features are unified the same way).
    pub build: bool,
    /// mtime of every file and the `created` time of every document (SOURCE_DATE_EPOCH).
    pub source_date_epoch: u64,
    /// Image names to build; empty means all.
    pub only: Vec<String>,
}

/// What `build` produced for one image.
#[derive(Debug, Clone)]
pub struct Built {
    pub name: String,
    /// `ghcr.io/agentplane/<name>:<version>`.
    pub reference: String,
    pub layout: PathBuf,
    /// Digest of the image manifest (what `repo@sha256:...` pulls).
    pub manifest_digest: String,
    /// Digest of index.json (what the tag points at once pushed as an index).
    pub index_digest: String,
    pub sbom_digest: String,
}

/// SOURCE_DATE_EPOCH from the environment, 0 when unset.
pub fn source_date_epoch() -> Result<u64> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => v.trim().parse().map_err(|_| ImageError::SourceDateEpoch(v)),
        Err(_) => Ok(0),
    }
}

pub fn build(options: &Options) -> Result<Vec<Built>> {
    let metadata = crates::metadata(&options.workspace)?;
    let profile_dir = match options.profile.as_str() {
        "dev" | "test" => "debug",
        other => other,
    };
    let bin_dir = metadata.target_directory.as_std_path().join(profile_dir);
    let created = rfc3339(options.source_date_epoch)?;
    let mut built = Vec::new();
    for spec in IMAGES
        .iter()
        .filter(|s| options.only.is_empty() || options.only.iter().any(|o| o == s.name))
    {
        let package = crates::package(&metadata, spec.name, spec.package)?;
        if options.build {
            cargo_build(&options.workspace, &options.profile, spec)?;
        }
        let binary = bin_dir.join(spec.binary);
        if !binary.is_file() {
            return Err(ImageError::MissingBinary(binary));
        }
        let version = package.version.to_string();
        let reference = format!("{REPOSITORY_PREFIX}/{}:{version}", spec.name);
        let crates = crates::linked_crates(&metadata, package);
        let span = tracing::info_span!("image", name = spec.name);
        let _enter = span.enter();
        let image = assemble(&ImageInput {
            spec,
            binary: &binary,
            version: &version,
            reference: &reference,
            created: &created,
            mtime: options.source_date_epoch,
            crates: &crates,
            out: &options.out.join(spec.name),
        })?;
        tracing::info!(
            reference,
            manifest = image.manifest_digest,
            index = image.index_digest,
            "image written"
        );
        built.push(image);
    }
    Ok(built)
}

fn cargo_build(workspace: &Path, profile: &str, spec: &ImageSpec) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(workspace)
        .args([
            "build",
            "--profile",
            profile,
            "-p",
            spec.package,
            "--bin",
            spec.binary,
        ])
        .status()
        .map_err(ImageError::io("cargo"))?;
    if !status.success() {
        return Err(ImageError::Command {
            command: format!("cargo build --profile {profile} -p {}", spec.package),
            status: status.to_string(),
            stderr: "see the cargo output above".to_owned(),
        });
    }
    Ok(())
}

struct ImageInput<'a> {
    spec: &'a ImageSpec,
    binary: &'a Path,
    version: &'a str,
    reference: &'a str,
    created: &'a str,
    mtime: u64,
    crates: &'a [crates::Crate],
    out: &'a Path,
}

/// The base layer: everything but the binary.
fn base_tree(binary: &Path) -> Result<(Tree, BTreeSet<DebPackage>)> {
    let mut tree = Tree::default();
    let mut debs = BTreeSet::new();
    tree.dir_with("/tmp", 0o1777, 0);
    tree.dir_with("/root", 0o700, 0);
    tree.dir_with("/home/nonroot", 0o700, NONROOT);
    tree.dir(BIN_DIR);
    let text = |s: &str| Content::Bytes(s.as_bytes().to_vec());
    tree.file(
        "/etc/passwd",
        text(
            "root:x:0:0:root:/root:/sbin/nologin\n\
             nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n",
        ),
        0o644,
    );
    tree.file("/etc/group", text("root:x:0:\nnonroot:x:65532:\n"), 0o644);
    // glibc's resolver reads this; "files dns" is what a distroless base ships.
    tree.file("/etc/nsswitch.conf", text("hosts: files dns\n"), 0o644);

    // Debian's bundle, generated by update-ca-certificates from the ca-certificates package.
    tree.copy_host_path(Path::new(CA_BUNDLE))?;
    debs.insert(host::package_named("ca-certificates")?);

    for library in host::shared_libraries(binary)? {
        let resolved = tree.copy_host_path(&library)?;
        let deb = host::owning_package(&[&library, &resolved])?;
        debs.insert(deb);
    }
    // Each package's license and copyright notice, as Debian ships them.
    for deb in &debs {
        let copyright = PathBuf::from(format!("/usr/share/doc/{}/copyright", deb.name));
        if copyright.exists() {
            tree.copy_host_path(&copyright)?;
        }
    }
    Ok((tree, debs))
}

fn assemble(input: &ImageInput) -> Result<Built> {
    let spec = input.spec;
    let (base, debs) = base_tree(input.binary)?;
    let mut app = Tree::default();
    let entrypoint = format!("{BIN_DIR}/{}", spec.binary);
    app.file(&entrypoint, Content::Host(input.binary.to_owned()), 0o755);

    let layers = [
        layer::write(&base, input.mtime)?,
        layer::write(&app, input.mtime)?,
    ];
    let layout = layout::Layout::create(input.out)?;
    let mut layer_descriptors = Vec::new();
    for l in &layers {
        layer_descriptors.push(layout.blob(&l.gzip, MediaType::ImageLayerGzip)?);
    }

    let labels: HashMap<String, String> = [
        ("org.opencontainers.image.title", spec.name),
        ("org.opencontainers.image.description", spec.description),
        ("org.opencontainers.image.version", input.version),
        ("org.opencontainers.image.licenses", "Apache-2.0"),
        (
            "org.opencontainers.image.source",
            "https://github.com/agentplane/agentplane",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let config = ImageConfigurationBuilder::default()
        .created(input.created.to_owned())
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .config(
            ConfigBuilder::default()
                .user(format!("{NONROOT}:{NONROOT}"))
                .env(vec![
                    format!("PATH={BIN_DIR}"),
                    format!("SSL_CERT_FILE={CA_BUNDLE}"),
                ])
                .entrypoint(vec![entrypoint.clone()])
                .working_dir("/home/nonroot".to_owned())
                .labels(labels.clone())
                .build()?,
        )
        .rootfs(
            RootFsBuilder::default()
                .typ("layers".to_owned())
                .diff_ids(
                    layers
                        .iter()
                        .map(|l| format!("sha256:{}", l.diff_id))
                        .collect::<Vec<_>>(),
                )
                .build()?,
        )
        .history(vec![
            HistoryBuilder::default()
                .created(input.created.to_owned())
                .created_by(
                    "xtask images: dynamic loader, shared libraries, CA certificates, nonroot user"
                        .to_owned(),
                )
                .build()?,
            HistoryBuilder::default()
                .created(input.created.to_owned())
                .created_by(format!("xtask images: {entrypoint}"))
                .build()?,
        ])
        .build()?;
    let config_descriptor = layout.json_blob(&config, MediaType::ImageConfig)?;

    let annotations: HashMap<String, String> = [
        ("org.opencontainers.image.created", input.created),
        ("org.opencontainers.image.version", input.version),
        ("org.opencontainers.image.title", spec.name),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config_descriptor)
        .layers(layer_descriptors)
        .annotations(annotations.clone())
        .build()?;
    let manifest_descriptor = layout.json_blob(&manifest, MediaType::ImageManifest)?;
    let platform =
        |os: Os, arch: Arch| PlatformBuilder::default().os(os).architecture(arch).build();

    // The SBOM: an OCI 1.1 artifact (empty config, one SPDX blob) whose subject is the image, so
    // registries with the referrers API list it under the image and `crane`/`oras` can find it.
    let sbom = sbom::document(
        &sbom::Subject {
            image: spec.name,
            reference: input.reference,
            version: input.version,
            created: input.created,
        },
        input.crates,
        &debs.into_iter().collect::<Vec<_>>(),
    );
    let sbom_media = MediaType::Other(sbom::MEDIA_TYPE.to_owned());
    let mut sbom_blob = layout.json_blob(&sbom, sbom_media.clone())?;
    sbom_blob.set_annotations(Some(HashMap::from([(
        "org.opencontainers.image.title".to_owned(),
        format!("{}.spdx.json", spec.name),
    )])));
    let empty = layout.blob(b"{}", MediaType::EmptyJSON)?;
    let sbom_manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .artifact_type(sbom_media.clone())
        .config(empty)
        .layers(vec![sbom_blob])
        .subject(manifest_descriptor.clone())
        .annotations(HashMap::from([(
            "org.opencontainers.image.created".to_owned(),
            input.created.to_owned(),
        )]))
        .build()?;
    let sbom_descriptor = layout.json_blob(&sbom_manifest, MediaType::ImageManifest)?;

    let mut image_entry = manifest_descriptor.clone();
    image_entry.set_platform(Some(platform(Os::Linux, Arch::Amd64)?));
    let mut ref_annotations = annotations;
    ref_annotations.insert(
        "org.opencontainers.image.ref.name".to_owned(),
        input.version.to_owned(),
    );
    ref_annotations.insert(
        "io.containerd.image.name".to_owned(),
        input.reference.to_owned(),
    );
    image_entry.set_annotations(Some(ref_annotations));
    // Never selected as a runnable image: the same convention BuildKit uses for attestations.
    let sbom_entry = DescriptorBuilder::default()
        .media_type(MediaType::ImageManifest)
        .digest(sbom_descriptor.digest().clone())
        .size(sbom_descriptor.size())
        .artifact_type(sbom_media)
        .platform(platform(
            Os::Other("unknown".to_owned()),
            Arch::Other("unknown".to_owned()),
        )?)
        .build()?;
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![image_entry, sbom_entry.clone()])
        .build()?;
    let index_digest = layout.finish(&index)?;
    Ok(Built {
        name: spec.name.to_owned(),
        reference: input.reference.to_owned(),
        layout: input.out.to_owned(),
        manifest_digest: digest_string(&manifest_descriptor),
        index_digest: format!("sha256:{index_digest}"),
        sbom_digest: digest_string(&sbom_entry),
    })
}

fn digest_string(descriptor: &Descriptor) -> String {
    descriptor.digest().to_string()
}

/// `1970-01-01T00:00:00Z` style, from seconds since the epoch.
fn rfc3339(epoch: u64) -> Result<String> {
    let seconds =
        i64::try_from(epoch).map_err(|_| ImageError::SourceDateEpoch(epoch.to_string()))?;
    let timestamp = jiff::Timestamp::from_second(seconds)
        .map_err(|_| ImageError::SourceDateEpoch(epoch.to_string()))?;
    Ok(timestamp.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_of_known_instants() {
        assert_eq!(rfc3339(0).unwrap(), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400).unwrap(), "2000-02-29T00:00:00Z");
        assert!(rfc3339(u64::MAX).is_err());
    }
}
