//! The watched policy directory: every `NAME.wasm` in it is a policy named
//! `NAME`. A new or changed file is loaded (validated like an upload) and
//! every namespace bound to a module of that name moves to the new version.
//!
//! Polling, not inotify: a file must look the same (size and modification
//! time) on two scans in a row before it is read, which is what keeps
//! half-written files out; and a file that does not validate (truncated,
//! not wasm, failing its dry run) is logged and the old version keeps
//! serving. Writing to a temporary name and renaming is still the best way
//! to publish a module.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use tracing::{info, warn};

use super::{PolicyRegistry, module_name};

type Signature = (u64, Option<SystemTime>);

/// Loads every module in `dir` now, then watches it in the background.
pub async fn start(registry: Arc<PolicyRegistry>, dir: PathBuf, interval: Duration) {
    let mut loaded: HashMap<PathBuf, Signature> = HashMap::new();
    for (path, signature) in scan(&dir) {
        load(&registry, &path).await;
        loaded.insert(path, signature);
    }
    info!(dir = %dir.display(), files = loaded.len(), ?interval, "watching the policy directory");
    tokio::spawn(async move {
        let mut settling: HashMap<PathBuf, Signature> = HashMap::new();
        let mut ticker = tokio::time::interval(interval);
        loop {
            ticker.tick().await;
            for (path, signature) in scan(&dir) {
                if loaded.get(&path) == Some(&signature) {
                    continue;
                }
                if settling.get(&path) == Some(&signature) {
                    settling.remove(&path);
                    load(&registry, &path).await;
                    loaded.insert(path, signature);
                } else {
                    settling.insert(path, signature);
                }
            }
        }
    });
}

/// The `.wasm` files of `dir` and their signatures.
fn scan(dir: &Path) -> Vec<(PathBuf, Signature)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        warn!(dir = %dir.display(), "cannot read the policy directory");
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "wasm"))
        .filter_map(|path| {
            let meta = std::fs::metadata(&path).ok()?;
            meta.is_file()
                .then(|| (path, (meta.len(), meta.modified().ok())))
        })
        .collect()
}

async fn load(registry: &Arc<PolicyRegistry>, path: &Path) {
    let name = module_name(path);
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(err) => {
            warn!(file = %path.display(), cause = %err, "cannot read policy file");
            return;
        }
    };
    let registry = Arc::clone(registry);
    let file = path.display().to_string();
    let outcome =
        tokio::task::spawn_blocking(move || registry.put_and_rebind(&name, &bytes, "dir")).await;
    match outcome {
        Ok(Ok(rebound)) => info!(file, rebound = ?rebound, "policy file loaded"),
        Ok(Err(err)) => warn!(
            file,
            "policy file not loaded, the previous version keeps serving: {err}"
        ),
        Err(err) => warn!(file, cause = %err, "policy file load task failed"),
    }
}
