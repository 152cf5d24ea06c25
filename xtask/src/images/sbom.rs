//! The image's SBOM as an SPDX 2.3 JSON document: the image as the described package, containing
//! the Rust crates its binary links and the Debian packages its files came from.

use serde::Serialize;

use super::crates::Crate;
use super::host::DebPackage;
use super::layer::sha256_hex;

pub const MEDIA_TYPE: &str = "application/spdx+json";

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    spdx_version: &'static str,
    data_license: &'static str,
    #[serde(rename = "SPDXID")]
    spdx_id: &'static str,
    name: String,
    document_namespace: String,
    creation_info: CreationInfo,
    document_describes: Vec<String>,
    packages: Vec<SpdxPackage>,
    relationships: Vec<Relationship>,
}

#[derive(Serialize)]
struct CreationInfo {
    created: String,
    creators: Vec<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SpdxPackage {
    #[serde(rename = "SPDXID")]
    spdx_id: String,
    name: String,
    version_info: String,
    download_location: String,
    files_analyzed: bool,
    license_concluded: &'static str,
    license_declared: String,
    copyright_text: &'static str,
    supplier: String,
    external_refs: Vec<ExternalRef>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ExternalRef {
    reference_category: &'static str,
    reference_type: &'static str,
    reference_locator: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Relationship {
    spdx_element_id: String,
    relationship_type: &'static str,
    related_spdx_element: String,
}

/// What the SBOM describes.
pub struct Subject<'a> {
    pub image: &'a str,
    pub reference: &'a str,
    pub version: &'a str,
    /// RFC 3339, from SOURCE_DATE_EPOCH, so the document is reproducible too.
    pub created: &'a str,
}

/// SPDX ids allow letters, digits, '.' and '-' only.
fn spdx_id(kind: &str, name: &str, version: &str) -> String {
    let clean = |s: &str| {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' {
                    c
                } else {
                    '-'
                }
            })
            .collect::<String>()
    };
    format!("SPDXRef-{kind}-{}-{}", clean(name), clean(version))
}

pub fn document(subject: &Subject, crates: &[Crate], debs: &[DebPackage]) -> serde_json::Value {
    let image_id = format!("SPDXRef-Image-{}", subject.image);
    let mut packages = vec![SpdxPackage {
        spdx_id: image_id.clone(),
        name: subject.reference.to_owned(),
        version_info: subject.version.to_owned(),
        download_location: "NOASSERTION".to_owned(),
        files_analyzed: false,
        license_concluded: "NOASSERTION",
        license_declared: "NOASSERTION".to_owned(),
        copyright_text: "NOASSERTION",
        supplier: "Organization: agentplane".to_owned(),
        external_refs: vec![],
    }];
    for c in crates {
        let (download, supplier) = if c.crates_io {
            (
                format!(
                    "https://crates.io/api/v1/crates/{}/{}/download",
                    c.name, c.version
                ),
                "NOASSERTION".to_owned(),
            )
        } else {
            (
                "NOASSERTION".to_owned(),
                "Organization: agentplane".to_owned(),
            )
        };
        packages.push(SpdxPackage {
            spdx_id: spdx_id("Crate", &c.name, &c.version),
            name: c.name.clone(),
            version_info: c.version.clone(),
            download_location: download,
            files_analyzed: false,
            license_concluded: "NOASSERTION",
            license_declared: c
                .license
                .clone()
                .unwrap_or_else(|| "NOASSERTION".to_owned()),
            copyright_text: "NOASSERTION",
            supplier,
            external_refs: vec![ExternalRef {
                reference_category: "PACKAGE-MANAGER",
                reference_type: "purl",
                reference_locator: format!("pkg:cargo/{}@{}", c.name, c.version),
            }],
        });
    }
    for d in debs {
        packages.push(SpdxPackage {
            spdx_id: spdx_id("Deb", &d.name, &d.version),
            name: d.name.clone(),
            version_info: d.version.clone(),
            download_location: "NOASSERTION".to_owned(),
            files_analyzed: false,
            license_concluded: "NOASSERTION",
            // Debian records licenses in /usr/share/doc/<package>/copyright (shipped in the image).
            license_declared: "NOASSERTION".to_owned(),
            copyright_text: "NOASSERTION",
            supplier: "Organization: Debian".to_owned(),
            external_refs: vec![ExternalRef {
                reference_category: "PACKAGE-MANAGER",
                reference_type: "purl",
                reference_locator: format!(
                    "pkg:deb/debian/{}@{}?arch={}",
                    d.name, d.version, d.architecture
                ),
            }],
        });
    }
    let relationships = packages[1..]
        .iter()
        .map(|p| Relationship {
            spdx_element_id: image_id.clone(),
            relationship_type: "CONTAINS",
            related_spdx_element: p.spdx_id.clone(),
        })
        .collect();
    // A namespace unique to this content and stable across rebuilds of it.
    let listing: String = packages
        .iter()
        .map(|p| format!("{} {}\n", p.spdx_id, p.version_info))
        .collect();
    let doc = Document {
        spdx_version: "SPDX-2.3",
        data_license: "CC0-1.0",
        spdx_id: "SPDXRef-DOCUMENT",
        name: format!("{}-sbom", subject.reference),
        document_namespace: format!(
            "https://agentplane.dev/spdx/{}/{}-{}",
            subject.image,
            subject.version,
            &sha256_hex(listing.as_bytes())[..16]
        ),
        creation_info: CreationInfo {
            created: subject.created.to_owned(),
            creators: vec![format!(
                "Tool: agentplane-xtask-{}",
                env!("CARGO_PKG_VERSION")
            )],
        },
        document_describes: vec![image_id],
        packages,
        relationships,
    };
    serde_json::to_value(doc).expect("an SPDX document of strings serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packages_and_relationships_are_listed() {
        let subject = Subject {
            image: "agentplane",
            reference: "ghcr.io/agentplane/agentplane:0.1.0",
            version: "0.1.0",
            created: "1970-01-01T00:00:00Z",
        };
        let crates = [Crate {
            name: "serde_json".into(),
            version: "1.0.0".into(),
            license: Some("MIT OR Apache-2.0".into()),
            crates_io: true,
        }];
        let debs = [DebPackage {
            name: "libc6".into(),
            version: "2.36-9+deb12u13".into(),
            architecture: "amd64".into(),
        }];
        let doc = document(&subject, &crates, &debs);
        assert_eq!(doc["spdxVersion"], "SPDX-2.3");
        let packages = doc["packages"].as_array().unwrap();
        assert_eq!(packages.len(), 3);
        assert_eq!(packages[1]["SPDXID"], "SPDXRef-Crate-serde-json-1.0.0");
        assert_eq!(packages[1]["licenseDeclared"], "MIT OR Apache-2.0");
        assert_eq!(
            packages[2]["externalRefs"][0]["referenceLocator"],
            "pkg:deb/debian/libc6@2.36-9+deb12u13?arch=amd64"
        );
        assert_eq!(doc["relationships"].as_array().unwrap().len(), 2);
        assert_eq!(doc, document(&subject, &crates, &debs), "deterministic");
    }
}
