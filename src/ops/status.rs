//! The read-only operations: `ping`, `health`, `status`, `models` and
//! `config` (with secrets redacted).

use super::{probation, Ops};
use crate::config::Config;
use serde_json::{json, Map, Value};
use std::sync::atomic::Ordering;

impl Ops {
    pub(super) fn read_only(
        &self,
        op: &str,
        config: &Config,
    ) -> Result<Map<String, Value>, String> {
        let mut m = Map::new();
        match op {
            "ping" => {
                m.insert("device".into(), self.device.clone().into());
            }
            "health" => {
                let snapshot = {
                    let mut sampler = self.sampler.lock().unwrap_or_else(|p| p.into_inner());
                    self.shared.telemetry.snapshot(&self.device, &mut sampler)
                };
                m.insert(
                    "health".into(),
                    serde_json::to_value(snapshot).expect("health"),
                );
            }
            "status" => {
                m.insert("device".into(), self.device.clone().into());
                m.insert(
                    "pipelines".into(),
                    Value::Object(self.pipeline_status(false)),
                );
            }
            "models" => {
                m.insert(
                    "pipelines".into(),
                    Value::Object(self.pipeline_status(true)),
                );
            }
            "config" => {
                m.insert("config".into(), redacted(config));
            }
            _ => unreachable!("read-only operations are listed"),
        }
        Ok(m)
    }

    /// Per pipeline: its state and what it serves. `sha256` is the model
    /// loaded (what results carry), `installed` the bundle record.
    fn pipeline_status(&self, detail: bool) -> Map<String, Value> {
        let active = self
            .shared
            .store
            .as_ref()
            .map(|s| s.load_active())
            .unwrap_or_default();
        let probations = self
            .probations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let pipelines = self
            .shared
            .pipelines
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let failed: Vec<(String, Option<String>)> = self
            .shared
            .telemetry
            .pipeline_stats()
            .into_iter()
            .map(|(n, s)| (n, s.failed.lock().expect("stats lock").clone()))
            .collect();
        let mut out = Map::new();
        for (name, error) in failed {
            let Some(e) = pipelines.get(&name) else {
                out.insert(name, json!({"state": "failed", "error": error}));
                continue;
            };
            let spec = e.control.spec();
            let model = &spec.model;
            let installed = active.pipelines.get(&name);
            let mut v = json!({
                "state": if e.stats.disabled.load(Ordering::Relaxed) { "disabled" } else { "running" },
                "model": model.name,
                "sha256": model.sha256,
                "runs_on": model.runs_on(),
                "installed": installed.and_then(|a| a.current.clone()),
                "can_roll_back": installed.is_some_and(|a| a.previous.is_some()),
            });
            if let Some((op, _)) = probations.get(&name) {
                v["probation"] = json!({"op": op, "figures": e.control.probation().map(|p| probation::figures(&p, None))});
            }
            if detail {
                v["inputs"] = json!(model
                    .inputs
                    .iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>());
                v["outputs"] = json!(model
                    .outputs
                    .iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>());
                v["reason"] = json!(model.placement.reason);
                v["path"] = json!(model.path);
                v["load_ms"] = json!(model.load_ms);
                v["warnings"] = json!(model.warnings);
            }
            out.insert(name, v);
        }
        out
    }
}

/// The configuration with what could help an attacker removed: the broker
/// user name and where the password and private key are.
pub fn redacted(config: &Config) -> Value {
    let mut v = serde_json::to_value(config).expect("config serializes");
    let hidden = json!("<redacted>");
    if let Some(b) = v.get_mut("broker").and_then(|b| b.as_object_mut()) {
        for key in [
            "username",
            "password_file",
            "password_credential",
            "key_file",
        ] {
            if b.get(key).is_some_and(|x| !x.is_null()) {
                b.insert(key.into(), hidden.clone());
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_from_the_config() {
        let text = "[broker]\nurl = \"mqtt://127.0.0.1:1\"\nusername = \"gw\"\npassword_file = \"/etc/pw\"\n";
        let config = Config::parse(text, std::path::Path::new(".")).unwrap();
        let v = redacted(&config);
        let s = v.to_string();
        assert!(!s.contains("/etc/pw") && !s.contains("\"gw\""), "{s}");
        assert_eq!(v["broker"]["url"], "mqtt://127.0.0.1:1");
    }
}
