//! Switchyard's decision core.
//!
//! Everything that decides where a request goes lives here, free of tonic and Envoy types:
//! the endpoint datastore, engine-metric scraping, the scheduler framework and its plugins,
//! the approximate prefix-cache index, the precise one fed by the engines' KV-cache events, saturation
//! detection, flow control and `EndpointPickerConfig` loading.

#![warn(missing_docs)]

pub mod config;
pub mod cost;
pub mod datastore;
pub mod director;
pub mod discovery;
pub mod files;
pub mod flow;
pub mod kv_index;
pub mod lora;
pub mod prefix;
pub mod request;
pub mod saturation;
pub mod scheduling;
pub mod scrape;
pub mod tokens;
pub mod yaml;
