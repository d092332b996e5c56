//! Engine metrics, scraped off the request path.

pub mod engine;
pub mod prometheus;
pub mod scraper;

pub use engine::{EngineMapping, MetricSpec};
pub use scraper::{
    DEFAULT_MAX_IDLE_INTERVAL, MetricsScheme, ScrapeConfig, ScrapeError, ScrapeObserver, ScrapeTls,
    ScrapeTlsError,
};
