//! One layer: the tree as a tar archive, gzipped, with everything that could differ between two
//! builds of the same files pinned (entry order, mtimes, owners, modes, gzip header).

use std::io::Write;

use flate2::{Compression, GzBuilder};
use sha2::{Digest, Sha256};

use super::error::{ImageError, Result};
use super::rootfs::{Content, Node, Tree};

/// A gzipped layer and the two digests the OCI documents name it by.
pub struct Layer {
    pub gzip: Vec<u8>,
    /// sha256 of the gzip bytes: the blob digest in the manifest.
    pub digest: String,
    /// sha256 of the uncompressed tar: the diff_id in the image config.
    pub diff_id: String,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Writes `tree` as a tarball with every mtime set to `mtime` (SOURCE_DATE_EPOCH).
pub fn write(tree: &Tree, mtime: u64) -> Result<Layer> {
    let mut archive = tar::Builder::new(Vec::new());
    // Paths in the archive are as the tree sorted them; symlinks are stored, never followed.
    archive.follow_symlinks(false);
    for (path, node) in tree.entries() {
        append(&mut archive, path, node, mtime)?;
    }
    let tar = archive.into_inner().map_err(ImageError::io("layer.tar"))?;
    let diff_id = sha256_hex(&tar);
    // No file name and mtime 0 in the gzip header; the OS byte is fixed by flate2.
    let mut gz = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::default());
    gz.write_all(&tar).map_err(ImageError::io("layer.tar.gz"))?;
    let gzip = gz.finish().map_err(ImageError::io("layer.tar.gz"))?;
    Ok(Layer {
        digest: sha256_hex(&gzip),
        diff_id,
        gzip,
    })
}

fn append(archive: &mut tar::Builder<Vec<u8>>, path: &str, node: &Node, mtime: u64) -> Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_mtime(mtime);
    header.set_uid(0);
    header.set_gid(0);
    let io = ImageError::io(path);
    match node {
        Node::Dir { mode, owner } => {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(*mode);
            header.set_uid(*owner);
            header.set_gid(*owner);
            header.set_size(0);
            archive
                .append_data(&mut header, format!("{path}/"), std::io::empty())
                .map_err(io)
        }
        Node::File { content, mode } => {
            let bytes = match content {
                Content::Bytes(b) => b.clone(),
                Content::Host(p) => std::fs::read(p).map_err(ImageError::io(p))?,
            };
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(*mode);
            header.set_size(bytes.len() as u64);
            archive
                .append_data(&mut header, path, bytes.as_slice())
                .map_err(io)
        }
        Node::Symlink { target } => {
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_mode(0o777);
            header.set_size(0);
            archive.append_link(&mut header, path, target).map_err(io)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::rootfs::NONROOT;

    fn add_passwd(t: &mut Tree) {
        t.file("/etc/passwd", Content::Bytes(b"root\n".to_vec()), 0o644);
    }
    fn add_home(t: &mut Tree) {
        t.dir_with("/home/nonroot", 0o700, NONROOT);
    }
    fn add_lib(t: &mut Tree) {
        t.symlink("/lib", "usr/lib");
    }

    fn sample(order_reversed: bool) -> Tree {
        let mut tree = Tree::default();
        let mut steps: Vec<fn(&mut Tree)> = vec![add_passwd, add_home, add_lib];
        if order_reversed {
            steps.reverse();
        }
        for step in steps {
            step(&mut tree);
        }
        tree
    }

    #[test]
    fn same_tree_same_digest_whatever_the_insertion_order() {
        let a = write(&sample(false), 0).unwrap();
        let b = write(&sample(true), 0).unwrap();
        assert_eq!(a.digest, b.digest);
        assert_eq!(a.diff_id, b.diff_id);
        let c = write(&sample(false), 1).unwrap();
        assert_ne!(a.diff_id, c.diff_id, "the mtime is part of the layer");
    }

    #[test]
    fn entries_carry_fixed_owner_mode_and_mtime() {
        let layer = write(&sample(false), 42).unwrap();
        let tar = flate2::read::GzDecoder::new(layer.gzip.as_slice());
        let mut archive = tar::Archive::new(tar);
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            let h = entry.header();
            assert_eq!(h.mtime().unwrap(), 42);
            seen.push((
                entry.path().unwrap().display().to_string(),
                h.uid().unwrap(),
                h.mode().unwrap(),
            ));
        }
        assert_eq!(
            seen,
            [
                ("etc/".to_owned(), 0, 0o755),
                ("etc/passwd".to_owned(), 0, 0o644),
                ("home/".to_owned(), 0, 0o755),
                ("home/nonroot/".to_owned(), NONROOT, 0o700),
                ("lib".to_owned(), 0, 0o777),
            ]
        );
        assert_eq!(sha256_hex(&layer.gzip), layer.digest);
    }
}
