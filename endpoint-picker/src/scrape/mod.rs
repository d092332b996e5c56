//! Engine metrics, scraped off the request path.

pub mod prometheus;
