//! The `epp` binary's [`Recorder`]: every event of the request path becomes the reference's
//! metrics, a decision record for `/debug/pool`, and the request's trace span.
//!
//! Every label value that a client could choose goes through [`ModelLabels`] (bounded), and
//! the only other per-request labels come from fixed sets (error codes, outcomes) or from the
//! operator (priorities, pods).

use std::sync::Arc;
use std::time::Duration;

use endpoint_picker::request::InferenceRequest;
use ext_proc::envoy::{self, HeaderMap};
use ext_proc::error::RequestError;
use ext_proc::recorder::{
    Completion, Observation, ObserverOutcome, RecordKey, Recorder, Scheduled, StreamOutcome,
};

use crate::debug::{DecisionLog, DecisionRecord};
use crate::labels::ModelLabels;
use crate::metrics::{
    AttemptLabels, EppMetrics, ErrorLabels, ModelLabels as ModelPair, ModelOnly, ObserverLabels,
    RequestLabels, RewriteDecisionLabels, RewriteLabels, StreamLabels,
};
use crate::telemetry;

/// Metrics, decisions and traces of the request path.
#[derive(Debug)]
pub struct EppRecorder {
    metrics: Arc<EppMetrics>,
    decisions: Arc<DecisionLog>,
    labels: Arc<ModelLabels>,
}

impl EppRecorder {
    /// A recorder over the process's metrics, decision ring and label policy.
    pub fn new(
        metrics: Arc<EppMetrics>,
        decisions: Arc<DecisionLog>,
        labels: Arc<ModelLabels>,
    ) -> Self {
        Self {
            metrics,
            decisions,
            labels,
        }
    }

    fn pair(&self, key: &RecordKey) -> ModelPair {
        ModelPair {
            model_name: key.model.to_string(),
            target_model_name: key.target_model.to_string(),
        }
    }

    /// What the answer itself tells (size, usage, first chunk), from the routing stream on the
    /// full path or from a response observer.
    fn record_answer(&self, labels: &ModelPair, o: &Observation<'_>) {
        let m = &self.metrics;
        if let Some(bytes) = o.response_bytes {
            m.response_sizes.get_or_create(labels).observe(bytes as f64);
        }
        if let Some(u) = o.usage {
            m.input_tokens
                .get_or_create(labels)
                .observe(u.prompt_tokens as f64);
            m.output_tokens
                .get_or_create(labels)
                .observe(u.completion_tokens as f64);
            m.cached_tokens
                .get_or_create(labels)
                .observe(u.cached_tokens as f64);
            if u.completion_tokens > 0 {
                m.normalized_tpot
                    .get_or_create(labels)
                    .observe(o.elapsed.as_secs_f64() / u.completion_tokens as f64);
            }
            if let Some(after) = o.after_first_chunk
                && u.completion_tokens > 1
            {
                m.tpot
                    .get_or_create(labels)
                    .observe(after.as_secs_f64() / (u.completion_tokens - 1) as f64);
            }
        }
        if let Some(ttft) = o.time_to_first_chunk {
            m.ttft.get_or_create(labels).observe(ttft.as_secs_f64());
        }
    }

    fn key(&self, request: &InferenceRequest) -> RecordKey {
        RecordKey {
            model: self.labels.label(&request.model),
            target_model: self.labels.label(&request.target_model),
        }
    }
}

impl Recorder for EppRecorder {
    fn wants_explanation(&self) -> bool {
        self.decisions.enabled()
    }

    fn stream_opened(&self) {
        self.metrics.active_streams.inc();
    }

    fn stream_closed(&self, outcome: StreamOutcome) {
        self.metrics.active_streams.dec();
        self.metrics
            .streams
            .get_or_create(&StreamLabels {
                outcome: outcome.as_str().to_owned(),
            })
            .inc();
    }

    fn request_span(&self, first_headers: Option<&HeaderMap>) -> tracing::Span {
        let span = tracing::info_span!("gateway.request", request_id = tracing::field::Empty);
        // With traces exported, an incoming W3C trace context becomes the span's parent.
        if telemetry::otel_active()
            && let Some(headers) = first_headers
        {
            telemetry::adopt_parent(&span, &envoy::headers(Some(headers)));
        }
        span
    }

    fn trace_headers(&self, span: &tracing::Span) -> Vec<(&'static str, String)> {
        if telemetry::otel_active() {
            telemetry::trace_headers(span)
        } else {
            Vec::new()
        }
    }

    fn on_scheduled(&self, s: &Scheduled<'_>) {
        let m = &self.metrics;
        m.scheduler_e2e.observe(s.took.as_secs_f64());
        let target = self.labels.label(&s.request.target_model);
        let attempt = match s.outcome {
            Ok(routed) => {
                let first = routed.targets.first();
                AttemptLabels {
                    status: "success".into(),
                    target_model_name: target.to_string(),
                    pod_name: first.map(|t| t.spec.pod_name.clone()).unwrap_or_default(),
                    namespace: first.map(|t| t.spec.namespace.clone()).unwrap_or_default(),
                    port: first
                        .map(|t| t.spec.address.port().to_string())
                        .unwrap_or_default(),
                }
            }
            Err(_) => AttemptLabels {
                status: "failure".into(),
                target_model_name: target.to_string(),
                pod_name: String::new(),
                namespace: String::new(),
                port: String::new(),
            },
        };
        m.count_attempt(&attempt);
        if self.decisions.enabled() {
            let outcome = match s.outcome {
                Ok(_) => "routed",
                Err(e) => RequestError::Route(e.clone()).code(),
            };
            let mut record = DecisionRecord::new(
                &s.request.request_id,
                &s.request.model,
                &s.request.target_model,
                outcome,
                s.took,
            );
            if let Ok(routed) = s.outcome {
                record.destination = Some(routed.destination());
                if let Some(e) = routed
                    .result
                    .primary_result()
                    .and_then(|p| p.explanation.as_ref())
                {
                    record = record.with_explanation(e);
                }
            }
            self.decisions.push(record);
        }
    }

    fn on_routed(
        &self,
        request: &InferenceRequest,
        _rewritten: bool,
        overhead: Duration,
    ) -> RecordKey {
        let m = &self.metrics;
        let key = self.key(request);
        let pair = self.pair(&key);
        m.request_path_overhead.observe(overhead.as_secs_f64());
        // As the reference counts: a decision of an InferenceModelRewrite's rule, even one
        // that chose the model asked for; the trusted rewrite header is not one.
        if let Some(rewrite) = &request.rewrite {
            m.rewrites
                .get_or_create(&RewriteDecisionLabels {
                    model_rewrite_name: rewrite.clone(),
                    model_name: pair.model_name.clone(),
                    target_model: pair.target_model_name.clone(),
                })
                .inc();
        }
        m.requests
            .get_or_create(&RequestLabels {
                model_name: pair.model_name.clone(),
                target_model_name: pair.target_model_name.clone(),
                priority: request.priority.to_string(),
            })
            .inc();
        m.request_sizes
            .get_or_create(&pair)
            .observe(request.body_len as f64);
        m.running_requests
            .get_or_create(&ModelOnly {
                model_name: pair.model_name,
            })
            .inc();
        key
    }

    fn on_rejected(&self, request: Option<&InferenceRequest>, error: &RequestError) {
        if matches!(error, RequestError::BodiesOverBudget(_)) {
            self.metrics.request_body_budget_rejections.inc();
        }
        let key = request.map(|r| self.key(r)).unwrap_or_default();
        let pair = self.pair(&key);
        self.metrics
            .request_errors
            .get_or_create(&ErrorLabels {
                model_name: pair.model_name,
                target_model_name: pair.target_model_name,
                error_code: error.code().to_owned(),
            })
            .inc();
    }

    fn on_response_overflow(&self, rewrite: bool) {
        self.metrics
            .response_body_overflows
            .get_or_create(&RewriteLabels {
                rewrite: if rewrite { "true" } else { "false" },
            })
            .inc();
    }

    fn on_complete(&self, c: &Completion<'_>) {
        let m = &self.metrics;
        let labels = self.pair(c.key);
        let elapsed = c.elapsed.as_secs_f64();
        m.request_duration.get_or_create(&labels).observe(elapsed);
        self.record_answer(
            &labels,
            &Observation {
                key: c.key,
                elapsed: c.elapsed,
                response_bytes: c.response_bytes,
                usage: c.usage,
                time_to_first_chunk: c.time_to_first_chunk,
                after_first_chunk: c.after_first_chunk,
            },
        );
        if let Some(status) = c.status
            && !status.starts_with('2')
        {
            m.request_errors
                .get_or_create(&ErrorLabels {
                    model_name: labels.model_name,
                    target_model_name: labels.target_model_name,
                    error_code: model_server_error_code(status),
                })
                .inc();
        }
    }

    fn on_observed(&self, observation: &Observation<'_>) {
        self.record_answer(&self.pair(observation.key), observation);
    }

    fn observed_key(&self, model: &str, target_model: &str) -> RecordKey {
        RecordKey {
            model: self.labels.label(model),
            target_model: self.labels.label(target_model),
        }
    }

    fn on_observer_stream(&self, outcome: ObserverOutcome) {
        self.metrics
            .observer_streams
            .get_or_create(&ObserverLabels {
                outcome: outcome.as_str(),
            })
            .inc();
    }

    fn on_released(&self, key: &RecordKey) {
        self.metrics
            .running_requests
            .get_or_create(&ModelOnly {
                model_name: key.model.to_string(),
            })
            .dec();
    }
}

/// `ModelServerError<status>` for a real HTTP status; anything else is one bounded value.
fn model_server_error_code(status: &str) -> String {
    match status.parse::<u16>() {
        Ok(code) if (100..600).contains(&code) => format!("ModelServerError{code}"),
        _ => "ModelServerErrorInvalidStatus".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_server_error_codes_are_bounded() {
        assert_eq!(model_server_error_code("503"), "ModelServerError503");
        assert_eq!(
            model_server_error_code("5033"),
            "ModelServerErrorInvalidStatus"
        );
        assert_eq!(
            model_server_error_code("\nforged"),
            "ModelServerErrorInvalidStatus"
        );
    }
}
