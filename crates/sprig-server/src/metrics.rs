//! `GET /metrics`: the server's counters in Prometheus' (OpenMetrics) text format.

use std::borrow::Cow;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Every model's figures, labelled `model="NAME"`.
#[derive(Debug)]
pub struct ModelMetrics {
    pub prompt_tokens: Counter,
    /// Prompt tokens not run: held by the request's session or restored from the prefix cache.
    pub cached_prompt_tokens: Counter,
    /// Of those, restored from the prefix cache the model's sessions share.
    pub prefix_cache_tokens: Counter,
    /// Requests that found some of their prompt in the shared prefix cache.
    pub prefix_cache_hits: Counter,
    pub generated_tokens: Counter,
    /// Requests whose client went away before the end (while queued or generating).
    pub cancelled: Counter,
    pub failed: Counter,
    /// Requests waiting for the model's worker.
    pub queue_depth: Gauge,
    /// Requests generating now.
    pub active: Gauge,
    /// From queueing to the first piece of text.
    pub time_to_first_token: Histogram,
    /// Bytes the shared prefix cache holds (refreshed when scraped).
    pub prefix_cache_bytes: Gauge,
    /// Speculative decoding: tokens drafted and accepted.
    pub drafted_tokens: Counter,
    pub accepted_tokens: Counter,
    /// Escalation: chat turns handed to the teacher, by outcome (`teacher`, `fallback`).
    pub escalated: Family<Vec<(String, String)>, Counter>,
}

pub struct Metrics {
    registry: Registry,
    /// HTTP requests by route and status code.
    requests: Family<Vec<(String, String)>, Counter>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sprig");
        let requests = Family::default();
        registry.register("http_requests", "HTTP requests by route and status code", requests.clone());
        Metrics { registry, requests }
    }

    /// Registers and returns the figures of model `name`.
    pub fn add_model(&mut self, name: &str) -> ModelMetrics {
        let m = ModelMetrics {
            prompt_tokens: Counter::default(),
            cached_prompt_tokens: Counter::default(),
            prefix_cache_tokens: Counter::default(),
            prefix_cache_hits: Counter::default(),
            generated_tokens: Counter::default(),
            cancelled: Counter::default(),
            failed: Counter::default(),
            queue_depth: Gauge::default(),
            active: Gauge::default(),
            time_to_first_token: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            prefix_cache_bytes: Gauge::default(),
            drafted_tokens: Counter::default(),
            accepted_tokens: Counter::default(),
            escalated: Family::default(),
        };
        let r = self.registry.sub_registry_with_label((Cow::Borrowed("model"), Cow::Owned(name.to_string())));
        r.register("prompt_tokens", "Prompt tokens of finished requests, cached or run", m.prompt_tokens.clone());
        r.register("cached_prompt_tokens", "Prompt tokens not run: the session's own cache or the prefix cache", m.cached_prompt_tokens.clone());
        r.register("prefix_cache_tokens", "Prompt tokens restored from the prefix cache shared by the model's sessions", m.prefix_cache_tokens.clone());
        r.register("prefix_cache_hits", "Requests that found part of their prompt in the shared prefix cache", m.prefix_cache_hits.clone());
        r.register("generated_tokens", "Generated tokens", m.generated_tokens.clone());
        r.register("cancelled_requests", "Requests whose client went away before the end", m.cancelled.clone());
        r.register("failed_requests", "Requests the engine failed", m.failed.clone());
        r.register("queue_depth", "Requests waiting for the model", m.queue_depth.clone());
        r.register("active_requests", "Requests generating now", m.active.clone());
        r.register("time_to_first_token_seconds", "From queueing to the first piece of text", m.time_to_first_token.clone());
        r.register("prefix_cache_bytes", "Bytes held by the shared prefix cache", m.prefix_cache_bytes.clone());
        r.register("drafted_tokens", "Speculative decoding: tokens drafted and checked", m.drafted_tokens.clone());
        r.register("accepted_tokens", "Speculative decoding: drafted tokens accepted", m.accepted_tokens.clone());
        r.register("escalated_requests", "Chat turns handed to the teacher (outcome: teacher answered, or fallback to this model)", m.escalated.clone());
        m
    }

    pub fn request(&self, route: &str, code: u16) {
        self.requests.get_or_create(&vec![("route".into(), route.into()), ("code".into(), code.to_string())]).inc();
    }

    pub fn text(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
