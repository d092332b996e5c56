//! The `epp` binary's [`Recorder`]: every event of the request path becomes the reference's
//! metrics, a decision record for `/debug/pool`, and the request's trace span.
//!
//! Every label value that a client could choose goes through [`ModelLabels`] or
//! [`FairnessLabels`] (bounded), the canonical families' label sets are bounded together, and
//! the only other per-request labels come from fixed sets (error codes, outcomes) or from the
//! operator (priorities, pods). Each request is recorded under the deprecated names and the
//! canonical ones (`crate::metrics::canonical`).

use std::sync::Arc;
use std::time::Duration;

use endpoint_picker::request::InferenceRequest;
use ext_proc::envoy::{self, HeaderMap};
use ext_proc::error::RequestError;
use ext_proc::recorder::{
    Completion, Observation, ObserverOutcome, RecordKey, Recorder, Scheduled, StreamOutcome,
};

use crate::debug::{DecisionLog, DecisionRecord};
use crate::labels::{FairnessLabels, FirstSeen, ModelLabels};
use crate::metrics::canonical::{
    ErrorLabels as CanonicalErrorLabels, MAX_REQUEST_LABEL_SETS, RequestLabels as CanonicalLabels,
    TtftLabels,
};
use crate::metrics::{
    AttemptLabels, EppMetrics, ErrorLabels, ModelLabels as ModelPair, ModelOnly, ObserverLabels,
    RequestLabels, RewriteDecisionLabels, RewriteLabels, StreamLabels,
};

/// A request's labels under the canonical names: (model, served model, fairness id, priority).
type LabelSet = (Arc<str>, Arc<str>, Arc<str>, Arc<str>);
use crate::telemetry;

/// Metrics, decisions and traces of the request path.
#[derive(Debug)]
pub struct EppRecorder {
    metrics: Arc<EppMetrics>,
    decisions: Arc<DecisionLog>,
    labels: Arc<ModelLabels>,
    fairness: Arc<FairnessLabels>,
    /// The canonical families' label sets given out so far ([`MAX_REQUEST_LABEL_SETS`]).
    label_sets: FirstSeen<LabelSet>,
    /// Priorities as label values, so that a request does not allocate its own (priorities
    /// come from the operator's objectives: a few; past [`MAX_PRIORITY_LABELS`] each request
    /// allocates).
    priorities: parking_lot::RwLock<std::collections::HashMap<i32, Arc<str>>>,
    /// The priority label of an observed request (its tag carries none), allocated once.
    no_priority: Arc<str>,
}

/// Most priorities whose label value is kept.
const MAX_PRIORITY_LABELS: usize = 256;

impl EppRecorder {
    /// A recorder over the process's metrics, decision ring and label policies.
    pub fn new(
        metrics: Arc<EppMetrics>,
        decisions: Arc<DecisionLog>,
        labels: Arc<ModelLabels>,
        fairness: Arc<FairnessLabels>,
    ) -> Self {
        Self {
            metrics,
            decisions,
            labels,
            fairness,
            label_sets: FirstSeen::new(MAX_REQUEST_LABEL_SETS),
            priorities: parking_lot::RwLock::default(),
            no_priority: Arc::from(""),
        }
    }

    /// `priority` as a label value.
    fn priority_label(&self, priority: i32) -> Arc<str> {
        {
            let priorities = self.priorities.read();
            if let Some(label) = priorities.get(&priority) {
                return label.clone();
            }
            if priorities.len() >= MAX_PRIORITY_LABELS {
                return Arc::from(priority.to_string());
            }
        }
        let label: Arc<str> = Arc::from(priority.to_string());
        let mut priorities = self.priorities.write();
        if priorities.len() < MAX_PRIORITY_LABELS {
            priorities.insert(priority, label.clone());
        }
        label
    }

    fn pair(&self, key: &RecordKey) -> ModelPair {
        ModelPair {
            model_name: key.model.to_string(),
            target_model_name: key.target_model.to_string(),
        }
    }

    fn canonical(key: &RecordKey) -> CanonicalLabels {
        CanonicalLabels {
            model_name: key.model.clone(),
            target_model_name: key.target_model.clone(),
            fairness_id: key.fairness_id.clone(),
            priority: key.priority.clone(),
        }
    }

    /// What the answer itself tells (size, usage, first chunk), from the routing stream on the
    /// full path or from a response observer, under both names.
    fn record_answer(&self, labels: &ModelPair, key: &RecordKey, o: &Observation<'_>) {
        let m = &self.metrics;
        let c = &m.canonical;
        let labelled = Self::canonical(key);
        if let Some(bytes) = o.response_bytes {
            m.response_sizes.get_or_create(labels).observe(bytes as f64);
            c.response_sizes
                .get_or_create(&labelled)
                .observe(bytes as f64);
        }
        if let Some(u) = o.usage {
            for (legacy, canonical, value) in [
                (&m.input_tokens, &c.input_tokens, u.prompt_tokens),
                (&m.output_tokens, &c.output_tokens, u.completion_tokens),
                (&m.cached_tokens, &c.cached_tokens, u.cached_tokens),
            ] {
                legacy.get_or_create(labels).observe(value as f64);
                canonical.get_or_create(&labelled).observe(value as f64);
            }
            if u.completion_tokens > 0 {
                let ntpot = o.elapsed.as_secs_f64() / u.completion_tokens as f64;
                m.normalized_tpot.get_or_create(labels).observe(ntpot);
                c.normalized_tpot.get_or_create(&labelled).observe(ntpot);
            }
            // Between a streamed answer's first chunk and its end; a whole answer's chunks
            // say nothing of its tokens' pace.
            if let Some(after) = o.after_first_chunk.filter(|_| o.streaming)
                && u.completion_tokens > 1
            {
                let tpot = after.as_secs_f64() / (u.completion_tokens - 1) as f64;
                m.tpot.get_or_create(labels).observe(tpot);
                c.streaming_tpot.get_or_create(&labelled).observe(tpot);
            }
        }
        // A successful answer's time to its first token: a streamed one's first chunk (also
        // under the legacy name, which counts streamed answers only); a whole answer's first
        // token is known only with the answer, so its duration, under `streaming="false"`,
        // as the reference records it.
        if let Some(ttft) = o.time_to_first_chunk {
            let (ttft, streaming) = if o.streaming {
                m.ttft.get_or_create(labels).observe(ttft.as_secs_f64());
                (ttft, "true")
            } else {
                (o.elapsed, "false")
            };
            c.ttft
                .get_or_create(&TtftLabels {
                    model_name: labelled.model_name,
                    target_model_name: labelled.target_model_name,
                    fairness_id: labelled.fairness_id,
                    priority: labelled.priority,
                    streaming,
                })
                .observe(ttft.as_secs_f64());
        }
    }

    fn key(&self, request: &InferenceRequest) -> RecordKey {
        self.key_of(
            &request.model,
            &request.target_model,
            &request.fairness_id,
            self.priority_label(request.priority),
        )
    }

    /// The labels of a request: each bounded alone, and their set bounded too (a set past
    /// [`MAX_REQUEST_LABEL_SETS`] loses its fairness id).
    fn key_of(
        &self,
        model: &str,
        target_model: &str,
        fairness_id: &str,
        priority: Arc<str>,
    ) -> RecordKey {
        let model = self.labels.label(model);
        let target_model = self.labels.label(target_model);
        let mut fairness_id = self.fairness.label_of(fairness_id);
        let set = (
            model.clone(),
            target_model.clone(),
            fairness_id.clone(),
            priority.clone(),
        );
        if !self.label_sets.admits(&set) {
            fairness_id = self.fairness.overflow().clone();
        }
        RecordKey {
            model,
            target_model,
            fairness_id,
            priority,
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
        let c = &m.canonical;
        let labelled = Self::canonical(&key);
        c.requests.get_or_create(&labelled).inc();
        c.request_sizes
            .get_or_create(&labelled)
            .observe(request.body_len as f64);
        c.running.get_or_create(&labelled).inc();
        key
    }

    fn on_rejected(&self, request: Option<&InferenceRequest>, error: &RequestError) {
        if matches!(error, RequestError::BodiesOverBudget(_)) {
            self.metrics.request_body_budget_rejections.inc();
        }
        let key = request.map(|r| self.key(r)).unwrap_or_default();
        self.count_error(&key, error.code().to_owned());
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
        m.canonical
            .request_duration
            .get_or_create(&Self::canonical(c.key))
            .observe(elapsed);
        self.record_answer(
            &labels,
            c.key,
            &Observation {
                key: c.key,
                elapsed: c.elapsed,
                response_bytes: c.response_bytes,
                usage: c.usage,
                time_to_first_chunk: c.time_to_first_chunk,
                after_first_chunk: c.after_first_chunk,
                streaming: c.streaming,
            },
        );
        if let Some(status) = c.status
            && !status.starts_with('2')
        {
            self.count_error(c.key, model_server_error_code(status));
        }
    }

    fn on_observed(&self, observation: &Observation<'_>) {
        self.record_answer(&self.pair(observation.key), observation.key, observation);
    }

    fn observed_key(
        &self,
        model: &str,
        target_model: &str,
        fairness_id: &str,
        priority: Option<i32>,
    ) -> RecordKey {
        // A tag from an EPP of an earlier release carries no priority.
        let priority =
            priority.map_or_else(|| self.no_priority.clone(), |p| self.priority_label(p));
        self.key_of(model, target_model, fairness_id, priority)
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
        self.metrics
            .canonical
            .running
            .get_or_create(&Self::canonical(key))
            .dec();
    }
}

impl EppRecorder {
    /// One more error of `code` under both names.
    fn count_error(&self, key: &RecordKey, code: String) {
        let m = &self.metrics;
        m.request_errors
            .get_or_create(&ErrorLabels {
                model_name: key.model.to_string(),
                target_model_name: key.target_model.to_string(),
                error_code: code.clone(),
            })
            .inc();
        m.canonical
            .request_errors
            .get_or_create(&CanonicalErrorLabels {
                model_name: key.model.clone(),
                target_model_name: key.target_model.clone(),
                fairness_id: key.fairness_id.clone(),
                priority: key.priority.clone(),
                error_code: code,
            })
            .inc();
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
    use ext_proc::openai::Usage;
    use prometheus_client::registry::Registry;

    fn recorder(fairness_limit: usize) -> (EppRecorder, Registry) {
        let mut registry = Registry::default();
        let metrics = EppMetrics::register(&mut registry);
        let recorder = EppRecorder::new(
            metrics,
            Arc::new(DecisionLog::new(0)),
            Arc::new(ModelLabels::default()),
            Arc::new(FairnessLabels::with_limit(fairness_limit)),
        );
        (recorder, registry)
    }

    fn encode(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text
    }

    fn request(model: &str, fairness_id: &str, priority: i32) -> InferenceRequest {
        InferenceRequest {
            model: model.into(),
            target_model: model.into(),
            fairness_id: fairness_id.into(),
            priority,
            body_len: 1000,
            ..Default::default()
        }
    }

    /// A request is recorded under the reference's canonical names too, with its flow and
    /// priority, and its running gauge falls back under the labels it rose with.
    #[test]
    fn a_request_is_recorded_under_both_names() {
        let (r, registry) = recorder(10);
        let key = r.on_routed(&request("m", "tenant-a", 2), false, Duration::ZERO);
        let labels =
            "model_name=\"m\",target_model_name=\"m\",fairness_id=\"tenant-a\",priority=\"2\"";
        let text = encode(&registry);
        for line in [
            format!("llm_d_epp_request_total{{{labels}}} 1"),
            format!("llm_d_epp_request_running{{{labels}}} 1"),
            format!("llm_d_epp_request_size_bytes_sum{{{labels}}} 1000.0"),
            "inference_objective_request_total{model_name=\"m\",target_model_name=\"m\",priority=\"2\"} 1".to_owned(),
            "inference_objective_running_requests{model_name=\"m\"} 1".to_owned(),
        ] {
            assert!(text.contains(&line), "{line} not in\n{text}");
        }
        r.on_complete(&Completion {
            key: &key,
            elapsed: Duration::from_secs(2),
            response_bytes: Some(4096),
            usage: Some(Usage {
                prompt_tokens: 100,
                completion_tokens: 11,
                total_tokens: 111,
                cached_tokens: 64,
            }),
            time_to_first_chunk: Some(Duration::from_millis(250)),
            after_first_chunk: Some(Duration::from_secs(1)),
            streaming: true,
            status: Some("503"),
        });
        r.on_released(&key);
        let text = encode(&registry);
        for line in [
            format!("llm_d_epp_request_running{{{labels}}} 0"),
            format!("llm_d_epp_request_duration_seconds_sum{{{labels}}} 2.0"),
            format!("llm_d_epp_response_size_bytes_sum{{{labels}}} 4096.0"),
            format!("llm_d_epp_request_input_tokens_sum{{{labels}}} 100.0"),
            format!("llm_d_epp_request_output_tokens_sum{{{labels}}} 11.0"),
            format!("llm_d_epp_request_cached_tokens_sum{{{labels}}} 64.0"),
            format!("llm_d_epp_request_streaming_tpot_seconds_sum{{{labels}}} 0.1"),
            format!("llm_d_epp_request_ttft_seconds_sum{{{labels},streaming=\"true\"}} 0.25"),
            format!(
                "llm_d_epp_request_error_total{{{labels},error_code=\"ModelServerError503\"}} 1"
            ),
            "inference_objective_running_requests{model_name=\"m\"} 0".to_owned(),
            "inference_objective_input_tokens_sum{model_name=\"m\",target_model_name=\"m\"} 100.0"
                .to_owned(),
        ] {
            assert!(text.contains(&line), "{line} not in\n{text}");
        }
        assert!(
            text.contains("llm_d_epp_request_ntpot_seconds_sum{"),
            "{text}"
        );
    }

    /// Review: a whole (non-streamed) answer was recorded as a streamed one, its first body
    /// chunk a TTFT under `streaming="true"` and the time to its last chunk a TPOT near zero.
    /// It is the reference's `streaming="false"` TTFT, the answer's duration, and no TPOT.
    #[test]
    fn a_whole_answer_is_a_non_streaming_ttft_and_no_tpot() {
        let (r, registry) = recorder(10);
        let key = r.on_routed(&request("m", "t", 0), false, Duration::ZERO);
        r.on_complete(&Completion {
            key: &key,
            elapsed: Duration::from_secs(3),
            response_bytes: Some(4096),
            usage: Some(Usage {
                prompt_tokens: 100,
                completion_tokens: 50,
                total_tokens: 150,
                cached_tokens: 0,
            }),
            time_to_first_chunk: Some(Duration::from_millis(2990)),
            after_first_chunk: Some(Duration::from_millis(10)),
            streaming: false,
            status: Some("200"),
        });
        r.on_released(&key);
        let text = encode(&registry);
        let labels = "model_name=\"m\",target_model_name=\"m\",fairness_id=\"t\",priority=\"0\"";
        assert!(
            text.contains(&format!(
                "llm_d_epp_request_ttft_seconds_sum{{{labels},streaming=\"false\"}} 3.0"
            )),
            "{text}"
        );
        assert!(!text.contains("streaming=\"true\""), "{text}");
        assert!(!text.contains("streaming_tpot_seconds_sum{"), "{text}");
        assert!(!text.contains("request_tpot_seconds_sum{"), "{text}");
        assert!(
            !text.contains("inference_objective_request_ttft_seconds_sum{"),
            "{text}"
        );
        // The per-token rate over the whole answer is still there.
        assert!(
            text.contains("llm_d_epp_request_ntpot_seconds_sum{"),
            "{text}"
        );
    }

    /// Fairness ids past the limit are `other`; label sets past their cap keep their models
    /// and priority and lose only the fairness id.
    #[test]
    fn fairness_ids_and_label_sets_are_bounded() {
        let (r, registry) = recorder(2);
        for tenant in ["a", "b", "c"] {
            let key = r.on_routed(&request("m", tenant, 0), false, Duration::ZERO);
            r.on_released(&key);
        }
        let text = encode(&registry);
        assert!(text.contains("fairness_id=\"b\""), "{text}");
        assert!(!text.contains("fairness_id=\"c\""), "{text}");
        assert!(
            text.contains("llm_d_epp_request_total{model_name=\"m\",target_model_name=\"m\",fairness_id=\"other\",priority=\"0\"} 1"),
            "{text}"
        );

        let (r, registry) = recorder(usize::MAX);
        for i in 0..=MAX_REQUEST_LABEL_SETS {
            let key = r.on_routed(&request("m", &format!("t{i}"), 1), false, Duration::ZERO);
            r.on_released(&key);
        }
        // Past the cap: the same model and priority, fairness `other`.
        let key = r.on_routed(&request("m", "late", 1), false, Duration::ZERO);
        assert_eq!(
            (&*key.model, &*key.fairness_id, &*key.priority),
            ("m", "other", "1")
        );
        let text = encode(&registry);
        assert!(text.contains("fairness_id=\"t0\""));
        assert!(!text.contains("fairness_id=\"late\""));
        let sets = text
            .lines()
            .filter(|l| l.starts_with("llm_d_epp_request_total{"))
            .count();
        assert_eq!(
            sets,
            MAX_REQUEST_LABEL_SETS + 1,
            "the cap's sets and one `other`"
        );
    }

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
