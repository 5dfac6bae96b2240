//! The adapter for sandboxed WebAssembly plugins: a manifest entry's limits and grants become
//! the sandbox's settings, and the component becomes a registry entry whose sink `codex-wasm`
//! opens, isolated like any other sink.

use super::manifest::{Capabilities, PluginSpec, WasmLimits};
use super::registry::{self, Origin, Registry};

/// The sandbox settings of a WASM plugin, from its manifest entry.
pub fn wasm_sink_plugin(
    spec: &PluginSpec,
    limits: &WasmLimits,
    capabilities: &Capabilities,
) -> codex_wasm::SinkPlugin {
    codex_wasm::SinkPlugin {
        name: spec.name.clone(),
        path: spec.path.clone(),
        limits: codex_wasm::Limits {
            memory_bytes: limits.memory_mib.saturating_mul(1 << 20),
            call_timeout: std::time::Duration::from_millis(limits.call_timeout_ms),
            fuel: limits.fuel,
            max_instances: limits.max_instances,
            max_tables: limits.max_tables,
            max_return_bytes: limits.max_return_bytes,
            queue_size: limits.queue_size,
        },
        grants: codex_wasm::Grants {
            output_file: capabilities
                .output_file
                .as_ref()
                .map(|o| codex_wasm::OutputGrant {
                    path: o.path.clone(),
                    quota_bytes: o.quota_bytes,
                }),
            log_lines: capabilities.log_lines,
            env: capabilities.env.clone(),
            clock: capabilities.clock,
        },
    }
}

/// Register the WASM sink a manifest entry declares, under the plugin's name. The component is
/// compiled and checked now; one that cannot be loaded (not a component, another world or
/// interface version, a trap while describing itself) is still registered, so that a run
/// naming it starts, warns once that the sink is disabled and why, and trains on: an untrusted
/// plugin never decides whether a run happens. Returns what the check found: the sink's own
/// name and version, or why it cannot be loaded.
pub fn register_wasm_sink(
    registry: &mut Registry,
    spec: &PluginSpec,
    limits: &WasmLimits,
    capabilities: &Capabilities,
) -> Result<Result<codex_wasm::Described, String>, registry::RegistryError> {
    let plugin = wasm_sink_plugin(spec, limits, capabilities);
    match codex_wasm::PreparedSink::prepare(&plugin) {
        Ok(prepared) => {
            let d = prepared.described().clone();
            let found = d.clone();
            let description = format!("wasm sink `{}` {} (sandboxed)", d.name, d.version);
            let factory: registry::HostSinkFactory =
                std::sync::Arc::new(move |params, run_dir, resume_step| {
                    Ok(prepared
                        .open(params, run_dir, resume_step)
                        .unwrap_or_else(|e| codex_wasm::failed_sink(e.to_string())))
                });
            registry.add_sandboxed_sink(
                &spec.name,
                &d.version,
                &description,
                Origin::of_plugin(spec),
                factory,
            )?;
            Ok(Ok(found))
        }
        Err(e) => {
            let reason = e.to_string();
            let found = reason.clone();
            tracing::debug!("wasm plugin `{}` cannot be loaded: {reason}", spec.name);
            let description = format!("cannot be loaded: {reason}");
            let refusal = format!("wasm plugin `{}` cannot be loaded: {reason}", spec.name);
            let factory: registry::HostSinkFactory =
                std::sync::Arc::new(move |_, _, _| Ok(codex_wasm::failed_sink(refusal.clone())));
            registry.add_sandboxed_sink(
                &spec.name,
                "unknown",
                &description,
                Origin::of_plugin(spec),
                factory,
            )?;
            Ok(Err(found))
        }
    }
}
