//! Real model files the unit tests use when they are present: where `scripts/fetch-models.sh`
//! puts them (`MEMEX_CACHE`, default `.cache/`). CI fetches them first; on a fresh clone without
//! them the tests that need them say so and skip, so `cargo test` works anywhere.

use std::path::PathBuf;

/// `<cache>/<rel>` if it exists; otherwise prints why `test` is skipped and how to fetch it.
pub fn cached(rel: &str, test: &str, fetch: &str) -> Option<PathBuf> {
    let cache = std::env::var_os("MEMEX_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache"));
    let path = cache.join(rel);
    if path.is_file() {
        return Some(path);
    }
    eprintln!(
        "SKIPPED {test}: no {}; run `scripts/fetch-models.sh {fetch}` (CI does)",
        path.display()
    );
    None
}
