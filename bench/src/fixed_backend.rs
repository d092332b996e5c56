//! A fixed, near-free model-server stand-in for the overhead and scale scenarios.
//!
//! Every inference POST is read to the end and answered at once with an SSE completion: one
//! text event per output token (`max_tokens` of the request, 1 when absent), each its own
//! write 1 ms apart past the first (the simulator's granularity: one event per token), then
//! usage and `[DONE]`. `/metrics` returns a vLLM-sized exposition (idle engine, prefix caching
//! on, histograms, a process counter that moves) so that the EPP scrapes something realistic;
//! `/health` is 200 and `/v1/models` lists the model (the EPP's readiness check). With nothing
//! simulated, the latency difference between two gateway paths in front of it is the cost of
//! the path.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

const METRICS: &str = "\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine=\"0\",model_name=\"meta-llama/Llama-3.1-8B-Instruct\"} 0.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine=\"0\",model_name=\"meta-llama/Llama-3.1-8B-Instruct\"} 0.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"meta-llama/Llama-3.1-8B-Instruct\"} 0.0
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size=\"16\",enable_prefix_caching=\"True\",engine=\"0\",num_gpu_blocks=\"27000\"} 1.0
";

/// The families a vLLM exposition carries besides the four the EPP reads: latency and token
/// histograms (about 300 lines, 30 KB, as vLLM 0.11 exposes for one model).
/// The `n`-th scrape's `/metrics`, about 30 KB. As a real engine's: the series the EPP reads,
/// histograms it does not, and a process counter that moves with every scrape (so no two
/// bodies are identical and the EPP parses every one).
pub fn exposition(n: u64) -> String {
    let mut text = String::with_capacity(METRICS.len() + extra_metrics().len() + 64);
    text.push_str(METRICS);
    text.push_str(extra_metrics());
    text.push_str(&format!(
        "process_cpu_seconds_total {}.{:03}\n",
        n / 1000,
        n % 1000
    ));
    text
}

fn extra_metrics() -> &'static str {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| {
        use std::fmt::Write as _;
        let mut s = String::new();
        let model = "model_name=\"meta-llama/Llama-3.1-8B-Instruct\",engine=\"0\"";
        for family in [
            "vllm:time_to_first_token_seconds",
            "vllm:inter_token_latency_seconds",
            "vllm:e2e_request_latency_seconds",
            "vllm:request_queue_time_seconds",
            "vllm:request_prefill_time_seconds",
            "vllm:request_decode_time_seconds",
            "vllm:request_prompt_tokens",
            "vllm:request_generation_tokens",
            "vllm:iteration_tokens_total",
            "vllm:request_params_max_tokens",
        ] {
            let _ = writeln!(s, "# HELP {family} Histogram.\n# TYPE {family} histogram");
            for le in [
                "0.001", "0.005", "0.01", "0.02", "0.04", "0.06", "0.08", "0.1", "0.25", "0.5",
                "0.75", "1.0", "2.5", "5.0", "7.5", "10.0", "20.0", "40.0", "80.0", "160.0",
                "640.0", "2560.0", "+Inf",
            ] {
                let _ = writeln!(s, "{family}_bucket{{{model},le=\"{le}\"}} 0.0");
            }
            let _ = writeln!(
                s,
                "{family}_sum{{{model}}} 0.0\n{family}_count{{{model}}} 0.0"
            );
        }
        for counter in [
            "vllm:num_preemptions_total",
            "vllm:prompt_tokens_total",
            "vllm:generation_tokens_total",
            "vllm:prefix_cache_queries_total",
            "vllm:prefix_cache_hits_total",
        ] {
            let _ = writeln!(s, "# TYPE {counter} counter\n{counter}{{{model}}} 0.0");
        }
        s
    })
}

/// `/metrics` requests answered so far, over all ports (`GET /admin/scrapes` returns it), so
/// that the scale scenario can report the scrape rate the EPP actually achieves.
static SCRAPES: AtomicU64 = AtomicU64::new(0);

/// Most output tokens one answer streams.
const MAX_OUTPUT_TOKENS: usize = 4096;

/// `max_tokens` of a request body (1 when absent), read without parsing the whole body.
fn max_tokens(body: &[u8]) -> usize {
    let key = b"\"max_tokens\":";
    let Some(at) = body.windows(key.len()).position(|w| w == key) else {
        return 1;
    };
    let digits: String = body[at + key.len()..]
        .iter()
        .skip_while(|b| b.is_ascii_whitespace())
        .take_while(|b| b.is_ascii_digit())
        .map(|&b| b as char)
        .collect();
    digits.parse().unwrap_or(1).clamp(1, MAX_OUTPUT_TOKENS)
}

type Body = BoxBody<Bytes, Infallible>;

fn full(b: Bytes) -> Body {
    Full::new(b).boxed()
}

/// An SSE answer of `tokens` text events (1 ms apart), usage and `[DONE]`.
fn sse_stream(prompt_bytes: usize, tokens: usize) -> Body {
    if tokens <= 1 {
        return full(sse(prompt_bytes));
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(1));
        for _ in 0..tokens {
            tick.tick().await;
            let event = Bytes::from_static(
                b"data: {\"choices\":[{\"index\":0,\"text\":\" ok\",\"finish_reason\":null}]}\n\n",
            );
            if tx.send(event).await.is_err() {
                return;
            }
        }
        let tail = format!(
            "data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":{},\"completion_tokens\":{tokens},\
             \"prompt_tokens_details\":{{\"cached_tokens\":0}}}}}}\n\ndata: [DONE]\n\n",
            prompt_bytes / 4
        );
        let _ = tx.send(Bytes::from(tail)).await;
    });
    let frames = futures::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((Ok::<_, Infallible>(hyper::body::Frame::data(chunk)), rx))
    });
    BodyExt::boxed(StreamBody::new(frames))
}

fn sse(prompt_bytes: usize) -> Bytes {
    Bytes::from(format!(
        "data: {{\"choices\":[{{\"index\":0,\"text\":\" ok\",\"finish_reason\":\"length\"}}]}}\n\n\
         data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":{},\"completion_tokens\":1,\
         \"prompt_tokens_details\":{{\"cached_tokens\":0}}}}}}\n\n\
         data: [DONE]\n\n",
        prompt_bytes / 4
    ))
}

async fn handle(
    req: http::Request<Incoming>,
    pod: std::sync::Arc<str>,
) -> Result<Response<Body>, Infallible> {
    let (parts, body) = req.into_parts();
    let builder = Response::builder().header("x-inference-pod", &*pod);
    let resp = match (parts.method, parts.uri.path()) {
        (Method::GET, "/metrics") => {
            let text = exposition(SCRAPES.fetch_add(1, Ordering::Relaxed));
            builder
                .header("content-type", "text/plain; version=0.0.4")
                .body(full(Bytes::from(text)))
        }
        (Method::GET, "/admin/scrapes") => builder.body(full(Bytes::from(
            SCRAPES.load(Ordering::Relaxed).to_string(),
        ))),
        (Method::GET, "/health") => builder.body(full(Bytes::new())),
        // The EPP's readiness check (an endpoint becomes a candidate once its engine lists a
        // model): without it every endpoint stays `loading` and every request gets a 503.
        (Method::GET, "/v1/models") => builder
            .header("content-type", "application/json")
            .body(full(Bytes::from_static(
                br#"{"object":"list","data":[{"id":"meta-llama/Llama-3.1-8B-Instruct","object":"model"}]}"#,
            ))),
        (Method::POST, _) => {
            // Read the whole body, as a real server would before scheduling it.
            let (n, tokens) = match body.collect().await {
                Ok(b) => {
                    let b = b.to_bytes();
                    (b.len(), max_tokens(&b))
                }
                Err(_) => (0, 1),
            };
            builder
                .header("content-type", "text/event-stream")
                .body(sse_stream(n, tokens))
        }
        _ => builder
            .status(StatusCode::NOT_FOUND)
            .body(full(Bytes::new())),
    };
    Ok(resp.unwrap_or_else(|_| Response::new(full(Bytes::new()))))
}

/// Binds `n` listeners on 127.0.0.1 (ephemeral ports), serves them until the process ends,
/// and returns their addresses (after binding, before serving starts).
pub async fn serve(n: usize) -> anyhow::Result<Vec<SocketAddr>> {
    let mut addrs = Vec::with_capacity(n);
    for i in 0..n {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        addrs.push(listener.local_addr()?);
        let pod: std::sync::Arc<str> = format!("backend-{i}").into();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let pod = pod.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |r| handle(r, pod.clone()));
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
    }
    Ok(addrs)
}
