//! The file tree of one image layer, built up in memory and keyed by path so it is written in a
//! fixed (sorted) order whatever order things were added in.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use super::error::{ImageError, Result};

/// The nonroot user and group of distroless images; the images run as this user.
pub const NONROOT: u64 = 65532;

/// What a path in the image is. Ownership and modes are fixed by the builder, never copied from
/// the build machine, so the layer does not depend on who built it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir { mode: u32, owner: u64 },
    File { content: Content, mode: u32 },
    Symlink { target: PathBuf },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// A file on this machine, read when the layer is written.
    Host(PathBuf),
    Bytes(Vec<u8>),
}

/// Paths are stored relative to `/` ("usr/lib/..."), as they appear in a layer tarball.
#[derive(Debug, Default, Clone)]
pub struct Tree {
    entries: BTreeMap<String, Node>,
}

const MAX_LINKS: usize = 16;

impl Tree {
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Node)> {
        self.entries.iter().map(|(p, n)| (p.as_str(), n))
    }

    pub fn get(&self, path: &str) -> Option<&Node> {
        self.entries.get(path.trim_start_matches('/'))
    }

    /// A directory owned by root, mode 0755, and its parents.
    pub fn dir(&mut self, path: &str) {
        self.dir_with(path, 0o755, 0);
    }

    pub fn dir_with(&mut self, path: &str, mode: u32, owner: u64) {
        let rel = relative(path);
        self.parents(&rel);
        self.entries.insert(rel, Node::Dir { mode, owner });
    }

    pub fn file(&mut self, path: &str, content: Content, mode: u32) {
        let rel = relative(path);
        self.parents(&rel);
        self.entries.insert(rel, Node::File { content, mode });
    }

    pub fn symlink(&mut self, path: &str, target: impl Into<PathBuf>) {
        let rel = relative(path);
        self.parents(&rel);
        self.entries.insert(
            rel,
            Node::Symlink {
                target: target.into(),
            },
        );
    }

    /// Copies a host file to the same path in the image, with every symlink met on the way
    /// (Debian's merged /usr: /lib -> usr/lib, /lib64 -> usr/lib64 -> ...) recreated as a symlink,
    /// so the paths the ELF interpreter and the loader look up resolve the same way in the image.
    /// Returns the resolved path of the file.
    pub fn copy_host_path(&mut self, host: &Path) -> Result<PathBuf> {
        let mut pending = lexical(host);
        for _ in 0..MAX_LINKS {
            match self.copy_until_link(&pending)? {
                None => return Ok(pending),
                Some(resolved) => pending = resolved,
            }
        }
        Err(ImageError::SymlinkLoop {
            path: host.to_owned(),
            depth: MAX_LINKS,
        })
    }

    /// Walks `path` from the root; records directories, and stops at the first symlink (recorded,
    /// returning the path with it resolved) or at the final regular file (recorded, returning None).
    fn copy_until_link(&mut self, path: &Path) -> Result<Option<PathBuf>> {
        let mut current = PathBuf::from("/");
        let components: Vec<Component> = path.components().skip(1).collect();
        for (i, component) in components.iter().enumerate() {
            current.push(component);
            let meta = std::fs::symlink_metadata(&current).map_err(ImageError::io(&current))?;
            let text = current.to_string_lossy().into_owned();
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&current).map_err(ImageError::io(&current))?;
                self.symlink(&text, target.clone());
                let base = current.parent().unwrap_or(Path::new("/"));
                let mut resolved = base.join(&target);
                for rest in &components[i + 1..] {
                    resolved.push(rest);
                }
                return Ok(Some(lexical(&resolved)));
            }
            if meta.is_dir() {
                if self.get(&text).is_none() {
                    self.dir(&text);
                }
            } else if meta.is_file() {
                use std::os::unix::fs::PermissionsExt;
                let executable = meta.permissions().mode() & 0o111 != 0;
                let mode = if executable { 0o755 } else { 0o644 };
                self.file(&text, Content::Host(current.clone()), mode);
                return Ok(None);
            } else {
                return Err(ImageError::Unsupported {
                    path: current,
                    what: "a device, socket or fifo",
                });
            }
        }
        Err(ImageError::Unsupported {
            path: path.to_owned(),
            what: "a directory where a file was expected",
        })
    }

    fn parents(&mut self, rel: &str) {
        let mut prefix = String::new();
        let parts: Vec<&str> = rel.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            self.entries.entry(prefix.clone()).or_insert(Node::Dir {
                mode: 0o755,
                owner: 0,
            });
        }
    }
}

fn relative(path: &str) -> String {
    path.trim_start_matches('/')
        .trim_end_matches('/')
        .to_owned()
}

/// `a/b/../c` -> `a/c` without touching the file system (the caller resolved symlinks already).
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(part) => out.push(part),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_are_added_once_and_sorted_first() {
        let mut tree = Tree::default();
        tree.file("/usr/local/bin/x", Content::Bytes(b"x".to_vec()), 0o755);
        tree.dir_with("/home/nonroot", 0o700, NONROOT);
        let paths: Vec<&str> = tree.entries().map(|(p, _)| p).collect();
        assert_eq!(
            paths,
            [
                "home",
                "home/nonroot",
                "usr",
                "usr/local",
                "usr/local/bin",
                "usr/local/bin/x"
            ]
        );
        assert_eq!(
            tree.get("/home/nonroot"),
            Some(&Node::Dir {
                mode: 0o700,
                owner: NONROOT
            })
        );
    }

    #[test]
    fn host_symlink_chain_is_recreated() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("usr/lib/x")).unwrap();
        std::fs::write(root.join("usr/lib/x/ld.so"), b"elf").unwrap();
        std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
        std::os::unix::fs::symlink("x/ld.so", root.join("usr/lib/ld-link")).unwrap();
        let mut tree = Tree::default();
        let resolved = tree.copy_host_path(&root.join("lib/ld-link")).unwrap();
        assert_eq!(resolved, root.join("usr/lib/x/ld.so"));
        let rel = |p: &str| {
            format!("{}/{p}", root.display())
                .trim_start_matches('/')
                .to_owned()
        };
        assert_eq!(
            tree.get(&rel("lib")),
            Some(&Node::Symlink {
                target: "usr/lib".into()
            })
        );
        assert_eq!(
            tree.get(&rel("usr/lib/ld-link")),
            Some(&Node::Symlink {
                target: "x/ld.so".into()
            })
        );
        assert!(matches!(
            tree.get(&rel("usr/lib/x/ld.so")),
            Some(Node::File { mode: 0o644, .. })
        ));
    }

    #[test]
    fn missing_host_path_names_it() {
        let mut tree = Tree::default();
        let err = tree
            .copy_host_path(Path::new("/nonexistent/libnothing.so"))
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent"), "{err}");
    }
}
