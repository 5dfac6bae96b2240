//! The cost per metric record of a sandboxed sink, next to the built-in `csv` sink.
//!
//! Usage: `cargo run -p codex-wasm --example sink_overhead -- GUEST.wasm [RECORDS]`, with a
//! guest built for `wasm32-wasip2` (e.g. the summary example, or the test guest in mode `none`
//! for the bare cost of crossing into the sandbox). Both sinks get the same records in batches
//! of 1024 (the hub's largest batch); the time runs from the first `write` to the end of
//! `finish`, so the wasm figure includes its queue, its thread and the copy into guest memory.

use std::time::Instant;

use codex_plugin_api::abi_stable::std_types::{RResult, RSlice};
use codex_plugin_api::sink::{RecordAbi, SinkBox};
use codex_plugin_api::Record;
use codex_wasm::{Grants, Limits, PreparedSink, SinkPlugin};

const BATCH: usize = 1024;

fn records(n: usize) -> Vec<Record> {
    let names = ["loss", "lr", "grad_norm", "tokens_per_s"];
    (0..n)
        .map(|i| Record {
            step: (i / names.len()) as u64 + 1,
            split: "train".into(),
            name: names[i % names.len()].into(),
            value: 5.0 / (1.0 + i as f64 * 1e-3),
            time: 1_764_000_000.0 + i as f64,
        })
        .collect()
}

/// Seconds per record to write `records` through `sink` and finish it.
fn per_record(mut sink: SinkBox, records: &[Record]) -> Result<f64, String> {
    let start = Instant::now();
    for batch in records.chunks(BATCH) {
        let batch: Vec<RecordAbi<'_>> = batch.iter().map(RecordAbi::from).collect();
        if let RResult::RErr(e) = sink.write(RSlice::from_slice(&batch)) {
            return Err(e.message.into_string());
        }
    }
    if let RResult::RErr(e) = sink.finish() {
        return Err(e.message.into_string());
    }
    Ok(start.elapsed().as_secs_f64() / records.len() as f64)
}

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let guest = args
        .next()
        .ok_or("usage: sink_overhead GUEST.wasm [RECORDS]")?;
    let n: usize = match args.next() {
        Some(n) => n.parse().map_err(|e| format!("RECORDS: {e}"))?,
        None => 200_000,
    };
    let records = records(n);
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;

    let decl = codex_plugin_api::sink::declare::<codex_sinks::CsvSink>();
    let codex_plugin_api::Factory::Sink(factory) = decl.factory else {
        return Err("csv is not a sink".to_owned());
    };
    let run_dir = dir.path().to_string_lossy().into_owned();
    let env = codex_plugin_api::sink::SinkEnv {
        run_dir: run_dir.as_str().into(),
        resume_step: None.into(),
    };
    let csv = match factory("{}".into(), env) {
        RResult::ROk(s) => s,
        RResult::RErr(e) => return Err(e.message.into_string()),
    };
    let builtin = per_record(csv, &records)?;

    let plugin = SinkPlugin {
        name: "bench".to_owned(),
        path: guest.into(),
        limits: Limits {
            queue_size: n,
            call_timeout: std::time::Duration::from_secs(60),
            ..Limits::default()
        },
        grants: Grants {
            output_file: Some(codex_wasm::OutputGrant {
                path: "bench.out".to_owned(),
                quota_bytes: 1 << 30,
            }),
            ..Grants::default()
        },
    };
    let prepared = PreparedSink::prepare(&plugin).map_err(|e| e.to_string())?;
    let sink = prepared
        .open(r#"{"mode": "none"}"#, dir.path(), None)
        .or_else(|_| prepared.open("{}", dir.path(), None))
        .map_err(|e| e.to_string())?;
    let wasm = per_record(sink, &records)?;

    println!("records: {n} in batches of {BATCH}");
    println!("built-in csv: {:.0} ns per record", builtin * 1e9);
    println!(
        "wasm sink `{}` {}: {:.0} ns per record ({:+.0} ns against csv)",
        prepared.described().name,
        prepared.described().version,
        wasm * 1e9,
        (wasm - builtin) * 1e9
    );
    Ok(())
}
