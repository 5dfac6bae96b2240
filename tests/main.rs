//! All integration tests, in one binary so there is one link step.

mod cli;
mod config;
mod data;
mod manifest;
mod model;
mod optim;
mod registry;
mod sinks;
mod tensor_ops;
mod tokenizers;
mod train;
