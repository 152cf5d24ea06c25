//! What the image takes from this (Debian) machine: the shared libraries a glibc-dynamic binary
//! loads, found with `ldd`, and the Debian package (name, version) each file came from, for the SBOM.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::error::{ImageError, Result};

/// A Debian package as `dpkg-query` reports it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DebPackage {
    pub name: String,
    pub version: String,
    pub architecture: String,
}

/// Runs a command and returns its stdout, or an error with its stderr.
pub fn output(command: &mut Command) -> Result<String> {
    let shown = format!("{command:?}");
    let out = command.output().map_err(|source| ImageError::Io {
        path: PathBuf::from(command.get_program()),
        source,
    })?;
    if !out.status.success() {
        return Err(ImageError::Command {
            command: shown,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The shared objects `binary` loads (the ELF interpreter included), as the paths `ldd` printed:
/// the paths the loader uses, so the image must resolve them the same way.
pub fn shared_libraries(binary: &Path) -> Result<BTreeSet<PathBuf>> {
    let text = output(Command::new("ldd").arg(binary))?;
    parse_ldd(binary, &text)
}

fn parse_ldd(binary: &Path, text: &str) -> Result<BTreeSet<PathBuf>> {
    let mut libs = BTreeSet::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let bad = || ImageError::Ldd {
            binary: binary.to_owned(),
            line: line.to_owned(),
        };
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)", "/lib64/ld-linux-x86-64.so.2 (0x...)",
        // "linux-vdso.so.1 (0x...)" (in the kernel, nothing to copy), "libfoo.so => not found".
        let path = match line.split_once(" => ") {
            Some((name, rest)) if rest.starts_with("not found") => {
                return Err(ImageError::LibraryNotFound {
                    binary: binary.to_owned(),
                    library: name.to_owned(),
                });
            }
            Some((_, rest)) => rest.split_whitespace().next().ok_or_else(bad)?,
            None => line.split_whitespace().next().ok_or_else(bad)?,
        };
        if path.starts_with('/') {
            libs.insert(PathBuf::from(path));
        } else if !path.starts_with("linux-vdso") && !path.starts_with("linux-gate") {
            return Err(bad());
        }
    }
    Ok(libs)
}

/// The installed package that owns `path` (`dpkg -S`), trying each spelling of the path given:
/// dpkg records the path the package shipped (`/lib/...` before Debian moved files to /usr).
pub fn owning_package(paths: &[&Path]) -> Result<DebPackage> {
    for path in paths {
        let Ok(out) = output(Command::new("dpkg").arg("-S").arg(path)) else {
            continue;
        };
        // "libc6:amd64: /lib/x86_64-linux-gnu/libc.so.6"
        if let Some((package, _)) = out.lines().next().and_then(|l| l.split_once(": ")) {
            return package_named(package);
        }
    }
    Err(ImageError::NotPackaged(
        paths.first().map(|p| p.to_path_buf()).unwrap_or_default(),
    ))
}

/// `dpkg-query` for one installed package ("libc6:amd64" or "ca-certificates").
pub fn package_named(package: &str) -> Result<DebPackage> {
    let out = output(
        Command::new("dpkg-query")
            .arg("-W")
            .arg("-f=${Package}\t${Version}\t${Architecture}")
            .arg(package),
    )?;
    let mut fields = out.trim().split('\t');
    match (fields.next(), fields.next(), fields.next()) {
        (Some(name), Some(version), Some(architecture)) if !version.is_empty() => Ok(DebPackage {
            name: name.to_owned(),
            version: version.to_owned(),
            architecture: architecture.to_owned(),
        }),
        _ => Err(ImageError::NotPackaged(PathBuf::from(package))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_is_read() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f1)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f3)\n";
        let libs = parse_ldd(Path::new("bin"), text).unwrap();
        let libs: Vec<_> = libs.iter().map(|p| p.display().to_string()).collect();
        assert_eq!(
            libs,
            [
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
    }

    #[test]
    fn missing_library_is_an_error_naming_it() {
        let text = "\tlibmissing.so.3 => not found\n";
        let err = parse_ldd(Path::new("bin"), text).unwrap_err();
        assert!(err.to_string().contains("libmissing.so.3"), "{err}");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let err = parse_ldd(Path::new("bin"), "\tnot an ldd line\n").unwrap_err();
        assert!(matches!(err, ImageError::Ldd { .. }), "{err}");
    }

    #[test]
    fn this_machines_libc_is_found_in_dpkg() {
        let pkg = owning_package(&[Path::new("/lib/x86_64-linux-gnu/libc.so.6")]).unwrap();
        assert_eq!(pkg.name, "libc6");
        assert!(!pkg.version.is_empty());
        let err = owning_package(&[Path::new("/nonexistent/file")]).unwrap_err();
        assert!(matches!(err, ImageError::NotPackaged(_)), "{err}");
    }
}
