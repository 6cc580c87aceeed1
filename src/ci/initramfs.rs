//! An initramfs built in memory (`microvm run`, and the boot tests' guests): host files at
//! their own paths, the shared libraries their ELF headers ask for, kernel modules with
//! their dependencies, written as one newc cpio archive (the `cpio` crate writes the
//! format; the kernel unpacks an uncompressed archive as well as a compressed one).
//!
//! Shared libraries: an executable's `PT_INTERP` (the dynamic loader) and its `DT_NEEDED`
//! entries, recursively, looked up the way the loader does on the host: `DT_RPATH` /
//! `DT_RUNPATH` (with `$ORIGIN`), `LD_LIBRARY_PATH`, then the multiarch and standard
//! directories. Each lands at the path it was found at (its content: symlinks followed),
//! and the init that `microvm run` writes points `LD_LIBRARY_PATH` at those directories.
//!
//! Kernel modules: `NAME.ko`, `.ko.gz` or `.ko.zst` found anywhere under a directory
//! (a `/lib/modules/VERSION` tree or a flat one), their `depends=` (the module's
//! `.modinfo` section) resolved first, stored decompressed (busybox's insmod reads plain
//! ELF) under `/lib/modules/microvm/` with a load `order` file.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use goblin::elf::Elf;

/// Errors building the initramfs (runtime errors: the files are the host's).
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A shared library an ELF file needs is nowhere to be found.
    #[error(
        "{needed}, needed by {by}, not found (looked in {dirs}); add its directory to LD_LIBRARY_PATH"
    )]
    LibraryNotFound {
        /// The library's name.
        needed: String,
        /// Who needs it.
        by: PathBuf,
        /// Where it was looked for.
        dirs: String,
    },
    /// A kernel module is not under the modules directory.
    #[error("module {name} not found under --modules {dir} (as {name}.ko, .ko.gz or .ko.zst)")]
    ModuleNotFound {
        /// The module.
        name: String,
        /// The directory given.
        dir: PathBuf,
    },
    /// A module file that cannot be used.
    #[error("module {path}: {why}")]
    BadModule {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A file larger than the format allows (4 GiB).
    #[error("{0}: too large for an initramfs entry")]
    TooLarge(PathBuf),
}

fn read(path: &Path) -> Result<Vec<u8>, InitramfsError> {
    std::fs::read(path).map_err(|source| InitramfsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

#[derive(Debug, Clone)]
enum Node {
    Dir,
    File { data: Vec<u8>, mode: u32 },
    Symlink(String),
}

/// The archive being built: absolute paths to nodes; parents are added as directories.
#[derive(Debug, Default)]
pub struct Initramfs {
    nodes: BTreeMap<String, Node>,
}

/// `/a/b/c` -> `a/b/c` (cpio names are relative); `.` for the root.
fn entry_name(path: &str) -> String {
    let t = path.trim_start_matches('/');
    if t.is_empty() { ".".into() } else { t.into() }
}

impl Initramfs {
    /// An empty archive.
    pub fn new() -> Self {
        Initramfs::default()
    }

    fn parents(&mut self, path: &str) {
        let mut p = Path::new(path).parent();
        while let Some(dir) = p {
            let s = dir.to_string_lossy().into_owned();
            if s == "/" || s.is_empty() {
                break;
            }
            self.nodes.entry(s).or_insert(Node::Dir);
            p = dir.parent();
        }
    }

    /// A directory at `path`.
    pub fn dir(&mut self, path: &str) {
        self.parents(path);
        self.nodes.entry(path.to_string()).or_insert(Node::Dir);
    }

    /// A file at `path` with `data` and permission bits `mode`.
    pub fn file_from_bytes(&mut self, path: &str, data: Vec<u8>, mode: u32) {
        self.parents(path);
        self.nodes
            .insert(path.to_string(), Node::File { data, mode });
    }

    /// A symbolic link at `path` pointing to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) {
        self.parents(path);
        self.nodes
            .insert(path.to_string(), Node::Symlink(target.to_string()));
    }

    /// The host file `host` (symlinks followed) at `path`, with its permission bits.
    pub fn file(&mut self, path: &str, host: &Path) -> Result<(), InitramfsError> {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(host).map_err(|source| InitramfsError::Read {
            path: host.to_path_buf(),
            source,
        })?;
        let data = read(host)?;
        self.file_from_bytes(path, data, meta.permissions().mode() & 0o7777);
        Ok(())
    }

    /// The host file or directory `host` at its own absolute path (directories
    /// recursively), with the shared libraries of every dynamically linked executable in
    /// it. Returns the directories those libraries are in.
    pub fn include(&mut self, host: &Path) -> Result<BTreeSet<String>, InitramfsError> {
        let abs = std::path::absolute(host).map_err(|source| InitramfsError::Read {
            path: host.to_path_buf(),
            source,
        })?;
        let mut lib_dirs = BTreeSet::new();
        let meta = std::fs::metadata(&abs).map_err(|source| InitramfsError::Read {
            path: abs.clone(),
            source,
        })?;
        if meta.is_dir() {
            self.dir(&abs.to_string_lossy());
            let entries = std::fs::read_dir(&abs).map_err(|source| InitramfsError::Read {
                path: abs.clone(),
                source,
            })?;
            let mut names: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
            names.sort();
            for p in names {
                lib_dirs.extend(self.include(&p)?);
            }
            return Ok(lib_dirs);
        }
        self.file(&abs.to_string_lossy(), &abs)?;
        for lib in shared_objects(&abs)? {
            let s = lib.to_string_lossy().into_owned();
            if let Some(d) = lib.parent() {
                lib_dirs.insert(d.to_string_lossy().into_owned());
            }
            if !self.nodes.contains_key(&s) {
                self.file(&s, &lib)?;
            }
        }
        Ok(lib_dirs)
    }

    /// Kernel modules `names` and what they depend on, from under `dir`, at
    /// `/lib/modules/microvm/NAME.ko` with an `order` file (dependencies first). Returns
    /// the load order.
    pub fn modules(&mut self, dir: &Path, names: &[&str]) -> Result<Vec<String>, InitramfsError> {
        let found = find_modules(dir);
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        let mut data = BTreeMap::new();
        for n in names {
            visit(n, dir, &found, &mut seen, &mut order, &mut data)?;
        }
        for m in &order {
            if let Some(d) = data.remove(m) {
                self.file_from_bytes(&format!("/lib/modules/microvm/{m}.ko"), d, 0o644);
            }
        }
        let list: String = order.iter().map(|m| format!("{m}.ko\n")).collect();
        self.file_from_bytes("/lib/modules/microvm/order", list.into_bytes(), 0o644);
        Ok(order)
    }

    /// The archive: newc cpio, every entry owned by root, mtime 0, then the trailer.
    pub fn to_cpio(&self) -> Result<Vec<u8>, InitramfsError> {
        use cpio::newc::{Builder, trailer};
        let mut out = Vec::new();
        let io_err = |source| InitramfsError::Read {
            path: PathBuf::from("(initramfs)"),
            source,
        };
        for (ino, (path, node)) in self.nodes.iter().enumerate() {
            let b = Builder::new(&entry_name(path))
                .ino(ino as u32 + 1)
                .uid(0)
                .gid(0)
                .mtime(0);
            let (b, data): (Builder, &[u8]) = match node {
                Node::Dir => (b.mode(0o040_755).nlink(2), &[]),
                Node::File { data, mode } => (b.mode(0o100_000 | mode).nlink(1), data),
                Node::Symlink(t) => (b.mode(0o120_777).nlink(1), t.as_bytes()),
            };
            let size =
                u32::try_from(data.len()).map_err(|_| InitramfsError::TooLarge(path.into()))?;
            let mut w = b.write(&mut out, size);
            w.write_all(data).map_err(io_err)?;
            w.finish().map_err(io_err)?;
        }
        trailer(&mut out).map_err(io_err)?;
        Ok(out)
    }
}

/// Directories the dynamic loader searches by default (x86_64 Debian and others).
const DEFAULT_LIB_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
    "/usr/local/lib",
];

/// The dynamic loader and every shared library `path` needs, recursively (none for a
/// static executable or a file that is not ELF).
pub fn shared_objects(path: &Path) -> Result<Vec<PathBuf>, InitramfsError> {
    let mut out = Vec::new();
    let mut todo = vec![path.to_path_buf()];
    let mut done: BTreeSet<String> = BTreeSet::new();
    let env_dirs: Vec<String> = std::env::var("LD_LIBRARY_PATH")
        .map(|v| {
            v.split(':')
                .filter(|d| !d.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    while let Some(file) = todo.pop() {
        let data = read(&file)?;
        let Ok(elf) = Elf::parse(&data) else {
            continue;
        };
        if let Some(interp) = elf.interpreter {
            let p = PathBuf::from(interp);
            if done.insert(interp.to_string()) {
                out.push(p);
            }
        }
        let origin = file
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut dirs: Vec<String> = elf
            .rpaths
            .iter()
            .chain(elf.runpaths.iter())
            .flat_map(|r| r.split(':'))
            .map(|d| d.replace("$ORIGIN", &origin).replace("${ORIGIN}", &origin))
            .collect();
        dirs.extend(env_dirs.iter().cloned());
        dirs.extend(DEFAULT_LIB_DIRS.iter().map(|d| d.to_string()));
        for needed in &elf.libraries {
            let Some(found) = dirs
                .iter()
                .map(|d| Path::new(d).join(needed))
                .find(|p| p.is_file())
            else {
                return Err(InitramfsError::LibraryNotFound {
                    needed: needed.to_string(),
                    by: file.clone(),
                    dirs: dirs.join(":"),
                });
            };
            if done.insert(found.to_string_lossy().into_owned()) {
                out.push(found.clone());
                todo.push(found);
            }
        }
    }
    Ok(out)
}

/// `NAME` (dashes as underscores) -> module files under `dir`.
fn find_modules(dir: &Path) -> BTreeMap<String, PathBuf> {
    let mut found = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(stem) = [".ko", ".ko.gz", ".ko.zst", ".ko.xz"]
                .iter()
                .find_map(|ext| name.strip_suffix(ext))
            {
                found.entry(stem.replace('-', "_")).or_insert(p);
            }
        }
    }
    found
}

/// A module file's ELF, decompressed.
fn module_bytes(path: &Path) -> Result<Vec<u8>, InitramfsError> {
    let data = read(path)?;
    let bad = |why: String| InitramfsError::BadModule {
        path: path.to_path_buf(),
        why,
    };
    let name = path.to_string_lossy();
    let mut out = Vec::new();
    if name.ends_with(".gz") {
        flate2::read::GzDecoder::new(&data[..])
            .read_to_end(&mut out)
            .map_err(|e| bad(format!("gzip: {e}")))?;
    } else if name.ends_with(".zst") {
        ruzstd::decoding::StreamingDecoder::new(&data[..])
            .map_err(|e| bad(format!("zstd: {e}")))?
            .read_to_end(&mut out)
            .map_err(|e| bad(format!("zstd: {e}")))?;
    } else if name.ends_with(".xz") {
        return Err(bad(
            "xz-compressed modules are not supported; decompress them with xz -d".into(),
        ));
    } else {
        out = data;
    }
    Ok(out)
}

/// The `depends=` of a module (from its `.modinfo` section).
fn depends(path: &Path, elf_bytes: &[u8]) -> Result<Vec<String>, InitramfsError> {
    let elf = Elf::parse(elf_bytes).map_err(|e| InitramfsError::BadModule {
        path: path.to_path_buf(),
        why: format!("not an ELF module: {e}"),
    })?;
    let section = elf
        .section_headers
        .iter()
        .find(|s| elf.shdr_strtab.get_at(s.sh_name) == Some(".modinfo"));
    let Some(s) = section else {
        return Ok(Vec::new());
    };
    let start = s.sh_offset as usize;
    let info = elf_bytes
        .get(start..start.saturating_add(s.sh_size as usize))
        .unwrap_or_default();
    Ok(info
        .split(|&b| b == 0)
        .filter_map(|kv| kv.strip_prefix(b"depends="))
        .flat_map(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(|d| d.trim().replace('-', "_"))
                .collect::<Vec<_>>()
        })
        .filter(|d| !d.is_empty())
        .collect())
}

fn visit(
    name: &str,
    dir: &Path,
    found: &BTreeMap<String, PathBuf>,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<String>,
    data: &mut BTreeMap<String, Vec<u8>>,
) -> Result<(), InitramfsError> {
    let key = name.replace('-', "_");
    if !seen.insert(key.clone()) {
        return Ok(());
    }
    let path = found
        .get(&key)
        .ok_or_else(|| InitramfsError::ModuleNotFound {
            name: key.clone(),
            dir: dir.to_path_buf(),
        })?;
    let bytes = module_bytes(path)?;
    for d in depends(path, &bytes)? {
        visit(&d, dir, found, seen, order, data)?;
    }
    data.insert(key.clone(), bytes);
    order.push(key);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_has_parents_links_and_trailer() {
        let mut i = Initramfs::new();
        i.file_from_bytes("/init", b"#!/bin/sh\n".to_vec(), 0o755);
        i.symlink("/bin/sh", "busybox");
        i.dir("/proc");
        let cpio = i.to_cpio().unwrap();
        let mut names = Vec::new();
        let mut r = &cpio[..];
        loop {
            let e = cpio::newc::Reader::new(r).unwrap();
            if e.entry().is_trailer() {
                break;
            }
            names.push((e.entry().name().to_string(), e.entry().mode()));
            r = e.finish().unwrap();
        }
        assert_eq!(
            names,
            [
                ("bin".to_string(), 0o040_755),
                ("bin/sh".to_string(), 0o120_777),
                ("init".to_string(), 0o100_755),
                ("proc".to_string(), 0o040_755)
            ]
        );
    }

    #[test]
    fn a_dynamic_executable_brings_its_loader_and_libraries() {
        // This test binary itself is dynamically linked against glibc.
        let me = std::env::current_exe().unwrap();
        let libs = shared_objects(&me).unwrap();
        let names: Vec<String> = libs
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().any(|n| n.starts_with("ld-linux")), "{names:?}");
        assert!(names.iter().any(|n| n.starts_with("libc.so")), "{names:?}");
        let mut i = Initramfs::new();
        let dirs = i.include(&me).unwrap();
        assert!(!dirs.is_empty());
        assert!(i.nodes.contains_key(&me.to_string_lossy().into_owned()));
        // Not ELF: nothing needed.
        let script = std::env::temp_dir().join(format!("mvinit-{}", std::process::id()));
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        assert!(shared_objects(&script).unwrap().is_empty());
        std::fs::remove_file(script).unwrap();
    }

    #[test]
    fn missing_modules_and_files_are_errors() {
        let dir = std::env::temp_dir().join(format!("mvmods-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("bad.ko"), b"not elf").unwrap();
        let mut i = Initramfs::new();
        let e = i
            .modules(&dir, &["virtio_console"])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("module virtio_console not found under --modules"),
            "{e}"
        );
        let e = i.modules(&dir, &["bad"]).unwrap_err().to_string();
        assert!(e.contains("not an ELF module"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
        assert!(i.include(Path::new("/nonexistent/x")).is_err());
    }
}
