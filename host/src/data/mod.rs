//! Data: documents from files, tokenized once into a content-addressed cache, served as
//! batches of token windows whose order is a pure function of (seed, epoch).

pub mod config;

pub use config::{DataConfig, Source};
