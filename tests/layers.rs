//! The crate's layers hold: the module list in `src/lib.rs` (top first) is the order, and no
//! module imports one listed above it (so no two modules import each other). Also: no source
//! file grows past 700 lines outside its tests.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// Most lines a file under `src/` may have before its `#[cfg(test)]` module.
const MAX_LINES: usize = 700;

#[test]
fn modules_import_only_modules_below_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let order = layer_order(&fs::read_to_string(src.join("lib.rs")).unwrap());
    let declared = declared_modules(&fs::read_to_string(src.join("lib.rs")).unwrap());
    assert_eq!(
        order.iter().cloned().collect::<BTreeSet<_>>(),
        declared,
        "src/lib.rs's layer list names exactly the modules it declares"
    );
    let wrong = wrong_way_imports(&src, &order);
    assert!(wrong.is_empty(), "imports that run up the layers of src/lib.rs:\n{}", wrong.join("\n"));
}

#[test]
fn no_source_file_is_past_700_lines_outside_its_tests() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let long: Vec<String> = rust_files(&src)
        .into_iter()
        .filter(|path| path.file_name().is_some_and(|name| name != "tests.rs"))
        .filter_map(|path| {
            let lines = lines_outside_tests(&fs::read_to_string(&path).unwrap());
            (lines > MAX_LINES).then(|| format!("{} has {lines} lines", path.display()))
        })
        .collect();
    assert!(long.is_empty(), "files past {MAX_LINES} lines (split them by responsibility):\n{}", long.join("\n"));
}

/// The checker itself finds what it is there to find.
#[test]
fn a_planted_wrong_way_import_is_found() {
    let dir = std::env::temp_dir().join(format!("layers-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("low")).unwrap();
    let lib = "//! # Layout\n//! - [`high`]: top.\n//! - [`low`]: bottom.\n\npub mod high;\npub mod low;\n";
    fs::write(dir.join("lib.rs"), lib).unwrap();
    fs::write(dir.join("high.rs"), "use crate::low::Thing;\n").unwrap();
    fs::write(dir.join("low/mod.rs"), "mod inner;\n").unwrap();
    let order = layer_order(lib);
    assert_eq!(order, ["high", "low"]);
    assert!(wrong_way_imports(&dir, &order).is_empty(), "a downward import is fine");
    // Upward, by a path from the crate root and by `super` out of a nested module.
    fs::write(dir.join("low/inner.rs"), "fn f() { crate::high::g(); }\nuse super::super::high::H;\n").unwrap();
    let wrong = wrong_way_imports(&dir, &order);
    assert_eq!(wrong.len(), 2, "{wrong:?}");
    assert!(wrong.iter().all(|w| w.contains("low/inner.rs") && w.contains("`low` imports `high`")), "{wrong:?}");
    // Comments and doc comments do not count.
    fs::write(dir.join("low/inner.rs"), "// crate::high::g\n/// see [`crate::high`]\nfn f() {}\n").unwrap();
    assert!(wrong_way_imports(&dir, &order).is_empty());
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn lines_are_counted_up_to_the_test_module() {
    let text = "fn a() {}\nfn b() {}\n\n#[cfg(test)]\nmod tests {\n    fn c() {}\n}\n";
    assert_eq!(lines_outside_tests(text), 3);
    assert_eq!(lines_outside_tests("fn a() {}\n"), 1);
}

/// The modules of the `# Layout` list in `lib.rs`'s doc (`//! - [`name`]: …`), top first.
fn layer_order(lib: &str) -> Vec<String> {
    lib.lines()
        .filter_map(|line| line.strip_prefix("//! - [`"))
        .filter_map(|rest| rest.split_once("`]").map(|(name, _)| name.to_owned()))
        .collect()
}

/// The modules `lib.rs` declares.
fn declared_modules(lib: &str) -> BTreeSet<String> {
    lib.lines()
        .filter_map(|line| line.trim().strip_prefix("pub mod ").or_else(|| line.trim().strip_prefix("mod ")))
        .map(|rest| rest.trim_end_matches(';').to_owned())
        .collect()
}

/// Every import, in any file under `src`, of a module listed above the file's own module.
fn wrong_way_imports(src: &Path, order: &[String]) -> Vec<String> {
    let rank = |module: &str| order.iter().position(|m| m == module);
    let mut wrong = Vec::new();
    for path in rust_files(src) {
        let relative = path.strip_prefix(src).unwrap();
        let module_path = module_path(relative);
        let Some(own) = module_path.first() else { continue };
        let Some(own_rank) = rank(own) else { continue };
        let text = fs::read_to_string(&path).unwrap();
        for (number, line) in text.lines().enumerate() {
            for used in top_modules_named(code_of(line), &module_path) {
                if used != *own && rank(&used).is_some_and(|used_rank| used_rank < own_rank) {
                    wrong.push(format!(
                        "{}:{}: `{own}` imports `{used}`, which is above it",
                        relative.display(),
                        number + 1
                    ));
                }
            }
        }
    }
    wrong
}

/// A line without its comment (a `//` outside a string).
fn code_of(line: &str) -> &str {
    let mut in_string = false;
    let bytes = line.as_bytes();
    for (at, &byte) in bytes.iter().enumerate() {
        match byte {
            b'"' if at == 0 || bytes[at - 1] != b'\\' => in_string = !in_string,
            b'/' if !in_string && bytes.get(at + 1) == Some(&b'/') => return &line[..at],
            _ => {}
        }
    }
    line
}

/// The top-level modules a line of code names: `crate::m…`, or `super::…` climbing to the
/// crate's root from the file's module (`module_path`, its own name last).
fn top_modules_named(code: &str, module_path: &[String]) -> Vec<String> {
    let mut named = Vec::new();
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    for (at, _) in code.match_indices("crate::") {
        if code[..at].chars().next_back().is_some_and(is_ident) {
            continue;
        }
        let rest = &code[at + "crate::".len()..];
        let name: String = rest.chars().take_while(|&c| is_ident(c)).collect();
        if !name.is_empty() {
            named.push(name);
        }
    }
    for (at, _) in code.match_indices("super::") {
        // Only the first `super` of a chain.
        if code[..at].ends_with("::") || code[..at].chars().next_back().is_some_and(is_ident) {
            continue;
        }
        let mut rest = &code[at..];
        let mut climbs = 0;
        while let Some(after) = rest.strip_prefix("super::") {
            climbs += 1;
            rest = after;
        }
        // A file's module is its path; `super` from it goes to its parent.
        if climbs >= module_path.len() {
            let name: String = rest.chars().take_while(|&c| is_ident(c)).collect();
            if !name.is_empty() {
                named.push(name);
            }
        }
    }
    named
}

/// The module path of a file relative to `src/`: `shard/state/mod.rs` → `[shard, state]`.
fn module_path(relative: &Path) -> Vec<String> {
    let mut parts: Vec<String> = relative.iter().map(|part| part.to_string_lossy().into_owned()).collect();
    if let Some(last) = parts.pop() {
        let stem = last.trim_end_matches(".rs");
        if stem != "mod" && stem != "lib" && stem != "main" {
            parts.push(stem.to_owned());
        }
    }
    parts
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// Lines before the file's `#[cfg(test)]` module, or all of them.
fn lines_outside_tests(text: &str) -> usize {
    let lines: Vec<&str> = text.lines().collect();
    let tests =
        lines.windows(2).position(|pair| pair[0].trim() == "#[cfg(test)]" && pair[1].trim_start().starts_with("mod "));
    tests.unwrap_or(lines.len())
}
