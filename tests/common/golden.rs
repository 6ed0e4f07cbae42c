//! Golden-file helper: compare generated text with a committed file, or rewrite the file
//! when `SLUICE_UPDATE_GOLDEN=1` is set (then review the diff and commit it).

use std::path::Path;

/// Check (or with `SLUICE_UPDATE_GOLDEN=1`, write) `path` relative to the crate root.
pub fn check(path: &str, expected: &str) {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    if std::env::var("SLUICE_UPDATE_GOLDEN").as_deref() == Ok("1") {
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(&full, expected).unwrap();
        return;
    }
    let actual = std::fs::read_to_string(&full)
        .unwrap_or_else(|e| panic!("{path}: {e} (run with SLUICE_UPDATE_GOLDEN=1 to create)"));
    assert!(
        actual == expected,
        "{path} differs from what the code generates; rerun with SLUICE_UPDATE_GOLDEN=1 and review the diff"
    );
}

/// Replace the text between `<!-- BEGIN name -->` and `<!-- END name -->` in `doc`.
pub fn splice(doc: &str, name: &str, content: &str) -> String {
    let begin = format!("<!-- BEGIN {name} -->\n");
    let end = format!("<!-- END {name} -->");
    let a = doc
        .find(&begin)
        .unwrap_or_else(|| panic!("marker {begin:?} missing"))
        + begin.len();
    let b = doc[a..]
        .find(&end)
        .unwrap_or_else(|| panic!("marker {end:?} missing"))
        + a;
    format!("{}{}{}", &doc[..a], content, &doc[b..])
}
