//! What can go wrong while building an image, with the path or command it concerns.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("the binary {0} is missing; build it first or drop --no-build")]
    MissingBinary(PathBuf),
    #[error("ldd {binary}: cannot read the line {line:?}")]
    Ldd { binary: PathBuf, line: String },
    #[error("ldd {binary}: {library} was not found on this machine")]
    LibraryNotFound { binary: PathBuf, library: String },
    #[error("{0} belongs to no installed Debian package (dpkg -S); the SBOM could not name it")]
    NotPackaged(PathBuf),
    #[error("{path}: a symlink chain deeper than {depth} links")]
    SymlinkLoop { path: PathBuf, depth: usize },
    #[error("{path}: {what} is not supported in an image layer")]
    Unsupported { path: PathBuf, what: &'static str },
    #[error("image {image}: no package {package} in `cargo metadata`")]
    UnknownPackage { image: String, package: String },
    #[error("cargo metadata: {0}")]
    Metadata(#[from] cargo_metadata::Error),
    #[error("OCI document: {0}")]
    Oci(#[from] oci_spec::OciSpecError),
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("SOURCE_DATE_EPOCH={0:?} is not a number of seconds")]
    SourceDateEpoch(String),
}

impl ImageError {
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }
}

pub type Result<T, E = ImageError> = std::result::Result<T, E>;
