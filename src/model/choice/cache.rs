//! The engine decisions cached in the state directory, keyed by the
//! model, edgeinfer's and ONNX Runtime's versions, the CPU and the options.

use super::*;

/// Decisions are valid for one model file, one pair of engine versions,
/// one CPU and one set of engine options.
pub(super) fn cache_key(sha256: &str, ort_version: &str, options: &EngineOptions) -> String {
    format!(
        "{sha256} edgeinfer-{} onnxruntime-{ort_version} cpu={} providers={} strict={} threads={}",
        env!("CARGO_PKG_VERSION"),
        cpu_identity(),
        options.providers.join(","),
        options.strict,
        options.threads
    )
}

/// The CPU model (x86: `model name`; ARM: implementer and part) and the
/// number of CPUs this process may use.
pub fn cpu_identity() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |k: &str| {
        info.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().to_owned())
    };
    let model = field("model name")
        .or_else(|| {
            Some(format!(
                "{}/{}",
                field("CPU implementer")?,
                field("CPU part")?
            ))
        })
        .unwrap_or_else(|| std::env::consts::ARCH.into());
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{model} x{n}")
}

pub(super) fn cache_file(options: &EngineOptions) -> Option<PathBuf> {
    options
        .cache_dir
        .as_ref()
        .map(|d| d.join("engine-choices.json"))
}

pub(super) fn read_cache(file: &Path) -> BTreeMap<String, EngineReport> {
    std::fs::read(file)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

pub(super) fn write_cache(
    file: &Path,
    all: &BTreeMap<String, EngineReport>,
) -> std::io::Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = file.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(all)?)?;
    std::fs::rename(tmp, file)
}
