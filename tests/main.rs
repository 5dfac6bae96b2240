//! All integration tests, in one binary so there is one link step.

// Data-driven tests spell their case tables as tuples of slices; naming each is noise.
#![allow(clippy::type_complexity)]

mod cli;
mod config;
mod data;
mod docs;
mod elementwise;
mod fuzz;
mod generate;
mod hf;
mod kernels;
mod lora;
mod manifest;
mod model;
mod native;
mod optim;
mod packing;
mod precision;
mod registry;
mod report;
mod resume;
mod sft;
mod sinks;
mod tensor_ops;
mod tokenizers;
mod trackers;
mod train;
mod wasm;
