//! Request errors and their one mapping to an ext_proc `ImmediateResponse`.

use endpoint_picker::director::RouteError;

use crate::body_budget::OverBudget;
use crate::envoy::{self, ext_proc::ProcessingResponse};
use crate::openai::BodyError;
use crate::protocol::DROPPED_REASON;

/// Why a request is answered by the EPP itself instead of a model server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Malformed body: 400.
    #[error(transparent)]
    BadBody(#[from] BodyError),
    /// A control header with an unusable value: 400.
    #[error("invalid {header} header: {reason}")]
    BadHeader {
        /// The header.
        header: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Body over `--max-request-body-bytes`: 413.
    #[error("request body exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// The body did not end within `--request-body-timeout` of its headers: 408.
    #[error("request body not received within {seconds} s of its headers")]
    BodyTimeout {
        /// The deadline, in seconds.
        seconds: u64,
    },
    /// The bodies held by every stream together would pass `--max-gathered-request-bytes`:
    /// 429, `rejected-saturated`.
    #[error(transparent)]
    BodiesOverBudget(#[from] OverBudget),
    /// Routing failed: 503 (no candidates) or 429 (shed, unschedulable).
    #[error(transparent)]
    Route(#[from] RouteError),
    /// The path names an engine's administration endpoint (`openai::ENGINE_ADMIN_ENDPOINTS`),
    /// which the EPP never routes: 404.
    #[error("the path names an engine administration endpoint, not served through the gateway")]
    EngineAdminPath,
    /// The path, percent-decoded, holds a control character or an encoded separator
    /// (`openai::PathRefusal::Malformed`): 400.
    #[error("the path holds a control character or an encoded separator")]
    MalformedPath,
    /// Envoy announced a body mode the EPP cannot answer in (the gateway's ext_proc filter is
    /// misconfigured): 500, on every request, rather than a stream Envoy rejects or answers
    /// it cannot use.
    #[error("the gateway sends {direction} bodies as {mode}; the EPP needs {needs}")]
    UnsupportedBodyMode {
        /// `request` or `response`.
        direction: &'static str,
        /// The mode's protobuf name.
        mode: &'static str,
        /// The modes the EPP answers in, in that direction.
        needs: &'static str,
    },
}

impl From<crate::openai::PathRefusal> for RequestError {
    fn from(refusal: crate::openai::PathRefusal) -> Self {
        match refusal {
            crate::openai::PathRefusal::EngineAdmin => RequestError::EngineAdminPath,
            crate::openai::PathRefusal::Malformed => RequestError::MalformedPath,
        }
    }
}

impl RequestError {
    /// HTTP status and the reference's error-code name.
    pub fn status(&self) -> (u16, &'static str) {
        match self {
            RequestError::BadBody(_)
            | RequestError::BadHeader { .. }
            | RequestError::MalformedPath => (400, "BadRequest"),
            RequestError::TooLarge { .. } => (413, "PayloadTooLarge"),
            RequestError::BodyTimeout { .. } => (408, "RequestTimeout"),
            RequestError::BodiesOverBudget(_) => (429, "ResourceExhausted"),
            RequestError::Route(RouteError::NoCandidates) => (503, "ServiceUnavailable"),
            RequestError::Route(RouteError::Shed(_)) => (429, "ResourceExhausted"),
            RequestError::Route(RouteError::Unschedulable(_)) => (429, "ResourceExhausted"),
            RequestError::UnsupportedBodyMode { .. } => (500, "Internal"),
            RequestError::EngineAdminPath => (404, "NotFound"),
            RequestError::Route(RouteError::FlowControl(r)) => r.status(),
        }
    }

    /// A short label for metrics.
    pub fn code(&self) -> &'static str {
        self.status().1
    }

    /// The reference's `x-llm-d-request-dropped-reason` for a request the EPP refused to route.
    pub fn dropped_reason(&self) -> Option<&'static str> {
        match self {
            RequestError::Route(RouteError::NoCandidates) => Some("rejected-no-endpoints"),
            RequestError::BodiesOverBudget(_) => Some("rejected-saturated"),
            RequestError::Route(RouteError::Shed(_)) => Some("rejected-saturated"),
            RequestError::Route(RouteError::FlowControl(r)) => r.dropped_reason(),
            _ => None,
        }
    }

    /// The `ImmediateResponse` for this error: `inference error: <Code> - <message>`.
    pub fn to_response(&self) -> ProcessingResponse {
        let (status, code) = self.status();
        let body = format!("inference error: {code} - {self}");
        match self.dropped_reason() {
            Some(reason) => envoy::immediate_response(status, body, &[(DROPPED_REASON, reason)]),
            None => envoy::immediate_response(status, body, &[]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use endpoint_picker::scheduling::ScheduleError;

    #[test]
    fn statuses() {
        assert_eq!(RequestError::from(BodyError::MissingModel).status().0, 400);
        assert_eq!(
            RequestError::BadHeader {
                header: "x",
                reason: "y"
            }
            .status()
            .0,
            400
        );
        assert_eq!(RequestError::TooLarge { limit: 1 }.status().0, 413);
        assert_eq!(RequestError::EngineAdminPath.status(), (404, "NotFound"));
        assert_eq!(RequestError::MalformedPath.status(), (400, "BadRequest"));
        assert_eq!(
            RequestError::BodyTimeout { seconds: 1 }.status(),
            (408, "RequestTimeout")
        );
        let over = RequestError::from(OverBudget { limit: 1 });
        assert_eq!(over.status(), (429, "ResourceExhausted"));
        assert_eq!(over.dropped_reason(), Some("rejected-saturated"));
        assert_eq!(
            RequestError::UnsupportedBodyMode {
                direction: "request",
                mode: "STREAMED",
                needs: "FULL_DUPLEX_STREAMED or BUFFERED",
            }
            .status(),
            (500, "Internal")
        );
        assert_eq!(RequestError::from(RouteError::NoCandidates).status().0, 503);
        assert_eq!(RequestError::from(RouteError::Shed(-1)).status().0, 429);
        assert_eq!(
            RequestError::from(RouteError::Unschedulable(ScheduleError::NoResult))
                .status()
                .0,
            429
        );
        assert_eq!(
            RequestError::from(BodyError::MissingModel).to_string(),
            "model not found in request body"
        );
        assert_eq!(
            RequestError::from(RouteError::Shed(-1)).dropped_reason(),
            Some("rejected-saturated")
        );
        assert_eq!(
            RequestError::from(RouteError::NoCandidates).dropped_reason(),
            Some("rejected-no-endpoints")
        );
    }
}
