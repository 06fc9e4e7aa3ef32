//! One worker thread per model: it takes requests from a bounded queue and runs them together through the
//! session engine's continuous batch ([`sprig_engine::ContinuousBatch`]): a request joins the running batch at
//! its next step (up to `max_concurrent`; the rest wait in the queue) and leaves when it ends, their prompts
//! share the model's prefix cache, and their decode steps go through the model as one batch. Sessions are pooled: a request gets the idle session whose KV cache holds the longest start of
//! its prompt (a client continuing its conversation usually finds its own), and a session's memory is reused.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Instant;

use sprig_backend::Backend;
use std::cell::RefCell;
use std::rc::Rc;

use sprig_engine::generate::StopReason;
use sprig_engine::session::OnLogprob;
use sprig_engine::{ContextPolicy, ContinuousBatch, Engine, EngineError, Finished, GenerationStats, Prompt, Request, SamplingParams, Session, TokenLogprob};
use tokio::sync::mpsc::UnboundedSender;

use crate::metrics::ModelMetrics;

/// A request for the worker, checked by the HTTP layer (it fits the context, its constraint compiles).
pub struct Job {
    pub prompt: Prompt,
    pub params: SamplingParams,
    pub max_new: usize,
    /// The prompt's tokens as the handler rendered them: picks the pooled session holding most of them.
    pub tokens: Vec<u32>,
    /// `Some(k)`: not a generation: score `tokens` (each one's log-probability and the k most likely tokens
    /// at its position), answered with one [`Event::Scored`].
    pub score: Option<usize>,
    /// Where the generation goes; when its receiver is gone (the client disconnected) the generation stops at
    /// its next token.
    pub events: UnboundedSender<Event>,
    pub queued: Instant,
}

pub enum Event {
    /// Generated text, with the log-probability entries of the tokens since the last piece (when asked).
    Text(String, Vec<TokenLogprob>),
    /// The end: the generation's figures, or why it failed.
    Done(Result<GenerationStats, EngineError>),
    /// A scoring job's answer: one entry per token of the sequence after the first.
    Scored(Result<Vec<TokenLogprob>, EngineError>),
}

/// The HTTP layer's end of a worker.
pub struct Handle {
    queue: SyncSender<Job>,
    metrics: Arc<ModelMetrics>,
    alive: Arc<AtomicBool>,
}

/// Why a job was not queued.
pub enum Refused {
    /// The queue is full.
    Busy,
    /// The worker has stopped (its thread failed).
    Stopped,
}

impl Handle {
    pub fn submit(&self, job: Job) -> Result<(), Refused> {
        if !self.alive.load(Ordering::Acquire) {
            return Err(Refused::Stopped);
        }
        // Counted before the send: the worker takes it off when it picks the job up.
        self.metrics.queue_depth.inc();
        match self.queue.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.metrics.queue_depth.dec();
                Err(match e {
                    TrySendError::Full(_) => Refused::Busy,
                    TrySendError::Disconnected(_) => Refused::Stopped,
                })
            }
        }
    }
}

pub struct WorkerConfig {
    pub max_concurrent: usize,
    pub max_queue: usize,
    /// Each session's context (0: the model's).
    pub context: usize,
    pub speculation: Option<crate::SpeculationFactory>,
}

/// Starts the worker of `engine`.
pub fn spawn<B: Backend + 'static>(
    name: &str,
    engine: Arc<Engine<B>>,
    config: WorkerConfig,
    metrics: Arc<ModelMetrics>,
) -> std::io::Result<Handle> {
    let (tx, rx) = sync_channel(config.max_queue);
    let alive = Arc::new(AtomicBool::new(true));
    let (m, a) = (metrics.clone(), alive.clone());
    std::thread::Builder::new().name(format!("sprig-worker-{name}")).spawn(move || {
        // A panic in the engine would be a bug; the server then refuses this model's requests instead of
        // hanging them.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(engine, rx, &config, &m)));
        a.store(false, Ordering::Release);
        if r.is_err() {
            eprintln!("sprig serve: a model's worker stopped after a panic; its requests now fail");
        }
    })?;
    Ok(Handle { queue: tx, metrics, alive })
}

fn work<B: Backend>(engine: Arc<Engine<B>>, rx: Receiver<Job>, config: &WorkerConfig, metrics: &Arc<ModelMetrics>) {
    let mut pool: Vec<Session<B>> = Vec::new();
    let mut batch: ContinuousBatch<'_, B, Tag> = ContinuousBatch::new(&engine);
    loop {
        // Idle: wait for a request. Busy: take those waiting, up to the limit, and go on at once.
        if batch.is_empty() {
            match rx.recv() {
                Ok(job) => admit(job, &mut batch, &mut pool, &engine, config, metrics),
                Err(_) => return,
            }
        }
        while batch.len() < config.max_concurrent {
            match rx.try_recv() {
                Ok(job) => admit(job, &mut batch, &mut pool, &engine, config, metrics),
                Err(_) => break,
            }
        }
        metrics.active.set(batch.len() as i64);
        let finished = batch.step();
        // Counted before the ends go out: a client that reads the metrics after its reply sees itself gone.
        metrics.active.set(batch.len() as i64);
        for f in finished {
            deliver(f, &mut pool, metrics);
        }
    }
}

/// What the worker keeps of a running request: where its events go.
struct Tag {
    events: UnboundedSender<Event>,
    /// Log-probability entries not yet sent with a piece of text.
    pending: Rc<RefCell<Vec<TokenLogprob>>>,
}

/// A job joins the batch on a pooled session (or is answered at once when it cannot).
fn admit<B: Backend>(
    job: Job,
    batch: &mut ContinuousBatch<'_, B, Tag>,
    pool: &mut Vec<Session<B>>,
    engine: &Arc<Engine<B>>,
    config: &WorkerConfig,
    metrics: &Arc<ModelMetrics>,
) {
    metrics.queue_depth.dec();
    // A client gone while its request waited: nothing to run.
    if job.events.is_closed() {
        metrics.cancelled.inc();
        return;
    }
    if let Some(k) = job.score {
        // Run at once, between the batch's steps (as long as a prompt's prefill).
        let r = engine.prompt_logprobs(&job.tokens, k);
        match &r {
            Ok(_) => {
                metrics.prompt_tokens.inc_by(job.tokens.len() as u64);
            }
            Err(_) => {
                metrics.failed.inc();
            }
        }
        let _ = job.events.send(Event::Scored(r));
        return;
    }
    let session = match take_session(pool, engine, config, &job.tokens) {
        Ok(s) => s,
        Err(e) => {
            metrics.failed.inc();
            let _ = job.events.send(Event::Done(Err(e)));
            return;
        }
    };
    let pending: Rc<RefCell<Vec<TokenLogprob>>> = Rc::default();
    let (events, lps, m, queued) = (job.events.clone(), pending.clone(), metrics.clone(), job.queued);
    let mut first = true;
    let on_text = move |t: &str| {
        if !t.is_empty() {
            if first {
                first = false;
                m.time_to_first_token.observe(queued.elapsed().as_secs_f64());
            }
            let _ = events.send(Event::Text(t.to_string(), std::mem::take(&mut *lps.borrow_mut())));
        }
        // A closed channel: the client has gone; stop now.
        !events.is_closed()
    };
    let lps = pending.clone();
    let on_logprob = job
        .params
        .top_logprobs
        .is_some()
        .then(|| Box::new(move |e: &TokenLogprob| lps.borrow_mut().push(e.clone())) as Box<OnLogprob<'static>>);
    let request = Request { prompt: job.prompt, params: job.params, max_new: job.max_new, on_text: Box::new(on_text), on_logprob };
    if let Err(f) = batch.add(session, request, Tag { events: job.events, pending }) {
        deliver(*f, pool, metrics);
    }
}

/// A request has ended: its figures counted, its end sent, its session back in the pool.
fn deliver<B: Backend>(f: Finished<B, Tag>, pool: &mut Vec<Session<B>>, metrics: &ModelMetrics) {
    match &f.result {
        Ok(s) => {
            metrics.prompt_tokens.inc_by((s.prompt_tokens + s.cached_tokens) as u64);
            metrics.cached_prompt_tokens.inc_by(s.cached_tokens as u64);
            metrics.prefix_cache_tokens.inc_by(s.prefix_cache_tokens as u64);
            if s.prefix_cache_tokens > 0 {
                metrics.prefix_cache_hits.inc();
            }
            metrics.generated_tokens.inc_by(s.generated.len() as u64);
            if s.stop == StopReason::Cancelled {
                metrics.cancelled.inc();
            }
            if let Some(sp) = &s.speculation {
                metrics.drafted_tokens.inc_by(sp.drafted);
                metrics.accepted_tokens.inc_by(sp.accepted);
            }
        }
        Err(_) => {
            metrics.failed.inc();
        }
    }
    // Entries of tokens whose text never came (held back, then cut by a stop string): with the end.
    let left = std::mem::take(&mut *f.tag.pending.borrow_mut());
    if !left.is_empty() {
        let _ = f.tag.events.send(Event::Text(String::new(), left));
    }
    let _ = f.tag.events.send(Event::Done(f.result));
    pool.push(f.session);
}

/// The idle session holding the longest start of `tokens`, or a new one.
fn take_session<B: Backend>(pool: &mut Vec<Session<B>>, engine: &Arc<Engine<B>>, config: &WorkerConfig, tokens: &[u32]) -> Result<Session<B>, EngineError> {
    let common = |s: &Session<B>| s.tokens().iter().zip(tokens).take_while(|(a, b)| a == b).count();
    if let Some((i, _)) = pool.iter().enumerate().max_by_key(|(_, s)| common(s)) {
        let mut s = pool.swap_remove(i);
        // Requests are independent (a raw prompt does not continue the last one; a seed draws the same whichever
        // session serves it); the cache is reused as far as the prompt starts like it.
        s.start_over();
        return Ok(s);
    }
    let mut s = Session::new(engine.clone(), config.context)?;
    if let Some(make) = &config.speculation {
        s.set_speculation(Some(make()?));
    }
    // A request longer than the context is refused up front (400); one that grows past it while decoding
    // stops with `length`, as OpenAI's do: nothing is dropped from a conversation behind the client's back.
    s.set_context_policy(ContextPolicy::Error, 0);
    Ok(s)
}
