//! Host tier (docs/TESTING.md).
//!
//! The crate's layout is a promise (docs/ARCHITECTURE.md): this checks it on the source.
//!
//! * The top-level modules are layers: `src/lib.rs` declares them in order, and each may
//!   use only the ones declared before it, so there is no import cycle between them. A
//!   use is a `crate::NAME` path in code (comments and doc links do not count).
//! * docs/ARCHITECTURE.md's map names every file under `src/`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The top-level modules in the order `src/lib.rs` declares them.
fn layers() -> Vec<String> {
    let lib = fs::read_to_string(root().join("src/lib.rs")).unwrap();
    lib.lines()
        .filter_map(|l| {
            let l = l.trim();
            let rest = l
                .strip_prefix("pub mod ")
                .or_else(|| l.strip_prefix("mod "))?;
            Some(rest.trim_end_matches(';').to_string())
        })
        .collect()
}

/// The top-level module a file under src/ belongs to (None for lib.rs and main.rs).
fn owner(file: &Path) -> Option<String> {
    let rel = file.strip_prefix(root().join("src")).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    let name = first.trim_end_matches(".rs").to_string();
    (name != "lib" && name != "main").then_some(name)
}

/// The `crate::NAME` paths used in `text`'s code, outside comments.
fn crate_uses(text: &str) -> Vec<String> {
    let mut uses = Vec::new();
    for line in text.lines() {
        let code = match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        };
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let before = rest[..i].chars().last();
            let tail = &rest[i + "crate::".len()..];
            let name: String = tail
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // `microvm_crate::x` or `$crate::x` are not this crate's paths.
            if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$') {
                uses.push(name);
            }
            rest = tail;
        }
    }
    uses
}

#[test]
fn top_level_modules_are_layers_without_cycles() {
    let layers = layers();
    assert!(
        layers.len() >= 8,
        "src/lib.rs declares too few modules: {layers:?}"
    );
    let rank: BTreeMap<&str, usize> = layers
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    let mut wrong = Vec::new();
    for f in &files {
        let Some(own) = owner(f) else { continue };
        let own_rank = *rank
            .get(own.as_str())
            .unwrap_or_else(|| panic!("{} belongs to no module src/lib.rs declares", f.display()));
        let text = fs::read_to_string(f).unwrap();
        for used in crate_uses(&text) {
            if used == own {
                continue;
            }
            match rank.get(used.as_str()) {
                Some(&r) if r < own_rank => {}
                Some(_) => wrong.push(format!(
                    "{} ({own}) uses crate::{used}, a later layer",
                    f.strip_prefix(root()).unwrap().display()
                )),
                None => wrong.push(format!(
                    "{} uses crate::{used}, which is no top-level module",
                    f.strip_prefix(root()).unwrap().display()
                )),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "layers in src/lib.rs order {layers:?}; each may use only earlier ones:\n{}",
        wrong.join("\n")
    );
}

/// True when the map names `rel` (a path under src/): in full, or by its path relative to
/// a folder heading (`src/mux/` at the start of a line) within that folder's section.
fn map_names(doc: &str, rel: &str) -> bool {
    if doc.contains(rel) {
        return true;
    }
    let mut section: Option<&str> = None;
    for line in doc.lines() {
        // A heading starts at the left margin; any such line ends the section before.
        if !line.starts_with(char::is_whitespace) {
            section = line
                .split_whitespace()
                .next()
                .filter(|h| h.starts_with("src/") && h.ends_with('/'));
        }
        if let Some(dir) = section
            && let Some(inner) = rel.strip_prefix(dir)
            && line
                .split(|c: char| c.is_whitespace() || c == ',' || c == '(' || c == ')')
                .any(|w| w == inner)
        {
            return true;
        }
    }
    false
}

#[test]
fn the_architecture_map_names_every_source_file() {
    let doc = fs::read_to_string(root().join("docs/ARCHITECTURE.md")).unwrap();
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    let missing: Vec<String> = files
        .iter()
        .map(|f| f.strip_prefix(root()).unwrap().display().to_string())
        .filter(|rel| !map_names(&doc, rel))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/ARCHITECTURE.md's map must name every file in src/ (in full, or relative to \
         its folder's heading); missing:\n{}",
        missing.join("\n")
    );
}

#[test]
fn the_map_check_resolves_paths_under_their_folder_heading() {
    let doc =
        "src/mux/     hub\n  hub.rs  routing; hub/epoll.rs (tokens)\nsrc/ci/  ci\n  mod.rs x\n";
    assert!(map_names(doc, "src/mux/hub/epoll.rs"));
    assert!(map_names(doc, "src/ci/mod.rs"));
    assert!(
        !map_names(doc, "src/mux/mod.rs"),
        "mod.rs is named under src/ci/ only"
    );
    assert!(!map_names(doc, "src/mux/epoll.rs"));
    let doc = "src/vmm/  core\n  mod.rs x\ntests/  signals.rs\n";
    assert!(
        !map_names(doc, "src/vmm/signals.rs"),
        "tests/ ends the src/vmm/ section"
    );
}

#[test]
fn the_layer_checker_reads_code_not_comments() {
    let uses =
        crate_uses("use crate::mux::Hub; // crate::vmm\n/// [`crate::cli`]\n$crate::x; a::b");
    assert_eq!(uses, vec!["mux".to_string()]);
}
