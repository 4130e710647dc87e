//! The code has one direction: a module uses only modules of its own layer or below (the drawing
//! in `src/lib.rs`). Read from the sources, so a new import across the layers fails here.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Layers, bottom first. The OCI vocabulary is a leaf of its own below everything.
const LAYERS: &[&[&str]] = &[
    &["oci"],
    &["config", "metrics"],
    &["storage", "upstream", "tls"],
    &["cache", "auth", "cluster", "gc", "prefetch"],
    &["registry", "app", "status"],
    &["server"],
    &["cli"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules a file names as `crate::<module>`.
fn crate_paths(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        // Not part of a longer identifier such as `regmirror_crate::`.
        if text[..i].chars().last().is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &text[i + "crate::".len()..];
        let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        if !name.is_empty() {
            found.insert(name);
        }
    }
    found
}

#[test]
fn no_module_uses_a_layer_above_its_own() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut violations = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let module = rel.components().next().unwrap().as_os_str().to_string_lossy().trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        let own = layer_of(&module)
            .unwrap_or_else(|| panic!("src/{}: module {module} has no layer in tests/layers.rs", rel.display()));
        let text = std::fs::read_to_string(file).unwrap();
        for used in crate_paths(&text) {
            let Some(theirs) = layer_of(&used) else { continue };
            let leaf_breach = module == "oci" && used != "oci";
            if theirs > own || leaf_breach {
                violations.push(format!("src/{} ({module}) uses crate::{used}", rel.display()));
            }
        }
    }
    assert!(violations.is_empty(), "imports against the layers:\n  {}", violations.join("\n  "));
}

#[test]
fn the_check_sees_a_violation() {
    assert_eq!(
        crate_paths("use crate::registry::error::Code;\nfn f() { crate::app::x() }"),
        ["app", "registry"].map(String::from).into()
    );
    assert!(crate_paths("regmirror_crate::x").is_empty());
}
