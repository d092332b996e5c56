//! Request errors and their one mapping to an ext_proc `ImmediateResponse`.

use endpoint_picker::director::RouteError;

use crate::envoy::{self, ext_proc::ProcessingResponse};
use crate::openai::BodyError;

/// Why a request is answered by the EPP itself instead of a model server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Malformed body: 400.
    #[error(transparent)]
    BadBody(#[from] BodyError),
    /// Body over `--max-request-body-bytes`: 413.
    #[error("request body exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// Routing failed: 503 (no candidates) or 429 (shed, unschedulable).
    #[error(transparent)]
    Route(#[from] RouteError),
    /// A bug or an impossible state: 500.
    #[error("{0}")]
    Internal(String),
}

impl RequestError {
    /// HTTP status and the reference's error-code name.
    pub fn status(&self) -> (u16, &'static str) {
        match self {
            RequestError::BadBody(_) => (400, "BadRequest"),
            RequestError::TooLarge { .. } => (413, "PayloadTooLarge"),
            RequestError::Route(RouteError::NoCandidates) => (503, "ServiceUnavailable"),
            RequestError::Route(RouteError::Shed(_)) => (429, "ResourceExhausted"),
            RequestError::Route(RouteError::Unschedulable(_)) => (429, "ResourceExhausted"),
            RequestError::Internal(_) => (500, "Internal"),
        }
    }

    /// A short label for metrics.
    pub fn code(&self) -> &'static str {
        self.status().1
    }

    /// The `ImmediateResponse` for this error: `inference error: <Code> - <message>`.
    pub fn to_response(&self) -> ProcessingResponse {
        let (status, code) = self.status();
        envoy::immediate_response(status, format!("inference error: {code} - {self}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use endpoint_picker::scheduling::ScheduleError;

    #[test]
    fn statuses() {
        assert_eq!(RequestError::from(BodyError::MissingModel).status().0, 400);
        assert_eq!(RequestError::TooLarge { limit: 1 }.status().0, 413);
        assert_eq!(RequestError::from(RouteError::NoCandidates).status().0, 503);
        assert_eq!(RequestError::from(RouteError::Shed(-1)).status().0, 429);
        assert_eq!(
            RequestError::from(RouteError::Unschedulable(ScheduleError::NoResult))
                .status()
                .0,
            429
        );
        assert_eq!(RequestError::Internal("x".into()).status().0, 500);
        assert_eq!(
            RequestError::from(BodyError::MissingModel).to_string(),
            "model not found in request body"
        );
    }
}
