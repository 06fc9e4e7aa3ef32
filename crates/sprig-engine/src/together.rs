//! Sessions of one engine generating at the same time from different threads step together: their decode
//! tokens go through the model as one batch (the weights are read once per step for all of them), and a new
//! request's prompt is prefilled in chunks between the others' decode steps ([`ContinuousBatch`]). The C ABI
//! and Kotlin run every request this way, so an app's concurrent conversations batch without asking for it.
//!
//! Each engine has one batch thread, started by its first request and ended with the engine (an idle batch
//! thread holds no reference to it). A request's session moves to that thread while it runs and comes back
//! with the result; its text comes back to the calling thread, where the caller's callback runs (JNI calls
//! back into the JVM on the thread that called in).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use sprig_backend::Backend;

use crate::generate::{Engine, GenerationStats};
use crate::sampler::{SamplingParams, TokenLogprob};
use crate::session::{ContinuousBatch, Finished, Prompt, Request, Session};
use crate::{EngineError, Result};

/// An engine's way to its batch thread (started on first use, started again if it ever failed).
pub(crate) struct Queue<B: Backend> {
    jobs: Mutex<Option<Sender<Job<B>>>>,
}

impl<B: Backend> Default for Queue<B> {
    fn default() -> Self {
        Queue { jobs: Mutex::new(None) }
    }
}

struct Job<B: Backend> {
    session: Session<B>,
    prompt: Prompt,
    params: SamplingParams,
    max_new: usize,
    cancel: Arc<AtomicBool>,
    /// Set when the caller's callback said stop (the caller's `cancel` flag is left as it was).
    stop: Arc<AtomicBool>,
    /// Each token's log-probability entry goes back too (the request asks for them).
    logprobs: bool,
    events: Sender<Event<B>>,
    /// Text buffers the caller has shown, back for the next pieces (no allocation per token once warm).
    spare: Receiver<String>,
}

enum Event<B: Backend> {
    Text(String),
    Logprob(TokenLogprob),
    Done(Box<Session<B>>, Result<GenerationStats>),
}

impl<B: Backend> Queue<B> {
    /// Hands `job` to the batch thread; the job back when no thread could take it.
    fn submit(&self, job: Job<B>) -> std::result::Result<(), Job<B>> {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let job = match jobs.as_ref() {
            Some(tx) => match tx.send(job) {
                Ok(()) => return Ok(()),
                // The thread is gone (it failed): start another.
                Err(std::sync::mpsc::SendError(job)) => job,
            },
            None => job,
        };
        let (tx, rx) = channel();
        let started = std::thread::Builder::new().name("sprig-batch".into()).spawn(move || {
            // A panic would be sprig's bug: the requests in the batch then fail (their callers see the thread
            // gone) and the next request starts a new thread.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(rx)));
        });
        if started.is_err() {
            return Err(job);
        }
        let r = tx.send(job).map_err(|e| e.0);
        *jobs = Some(tx);
        r
    }
}

fn work<B: Backend>(jobs: Receiver<Job<B>>) {
    // Idle: wait for a request, holding nothing of the engine. Busy: take every request waiting, then a step.
    while let Ok(job) = jobs.recv() {
        let engine = job.session.engine.clone();
        let mut batch: ContinuousBatch<'_, B, Sender<Event<B>>> = ContinuousBatch::new(&engine);
        admit(job, &mut batch);
        loop {
            while let Ok(job) = jobs.try_recv() {
                admit(job, &mut batch);
            }
            if batch.is_empty() {
                break;
            }
            for f in batch.step() {
                deliver(f);
            }
        }
    }
}

fn admit<B: Backend>(job: Job<B>, batch: &mut ContinuousBatch<'_, B, Sender<Event<B>>>) {
    let Job { session, prompt, params, max_new, cancel, stop, logprobs, events, spare } = job;
    let text = events.clone();
    let entries = events.clone();
    let on_logprob = logprobs.then(|| {
        Box::new(move |e: &TokenLogprob| {
            let _ = entries.send(Event::Logprob(e.clone()));
        }) as Box<crate::session::OnLogprob<'static>>
    });
    // Each piece goes to the caller in a buffer it sent back (or a new one); an empty piece is the engine's
    // poll. Stops when the caller cancels or is gone.
    let on_text = move |t: &str| {
        let send = |t: &str| {
            let mut piece = spare.try_recv().unwrap_or_default();
            piece.clear();
            piece.push_str(t);
            text.send(Event::Text(piece)).is_ok()
        };
        (t.is_empty() || send(t)) && !cancel.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst)
    };
    let request = Request { prompt, params, max_new, on_text: Box::new(on_text), on_logprob };
    if let Err(f) = batch.add(session, request, events) {
        deliver(*f);
    }
}

fn deliver<B: Backend>(f: Finished<B, Sender<Event<B>>>) {
    let _ = f.tag.send(Event::Done(Box::new(f.session), f.result));
}

impl<B: Backend> Engine<B> {
    /// Runs `prompt` on `session` (as [`Session::chat`], [`Session::chat_with_tools`] or [`Session::generate`]
    /// would) in this engine's shared batch, together with whatever other sessions of it are generating. Each
    /// piece of text goes to `on_text` on the calling thread (and, when the request asks for log-probabilities,
    /// each token's entry to `on_logprob` before its text); false from `on_text`, or `cancel` set from any
    /// thread, stops the request at its next token. The session comes back with the result (`None` only when the
    /// batch thread failed while running it, which would be sprig's bug).
    pub fn generate_together(
        &self,
        session: Session<B>,
        prompt: Prompt,
        params: SamplingParams,
        max_new: usize,
        cancel: Arc<AtomicBool>,
        mut on_text: impl FnMut(&str) -> bool,
        mut on_logprob: Option<&mut dyn FnMut(&TokenLogprob)>,
    ) -> (Option<Session<B>>, Result<GenerationStats>) {
        if !std::ptr::eq(Arc::as_ptr(&session.engine), self) {
            return (Some(session), Err(EngineError::Eval("the session belongs to another model".into())));
        }
        let (events, rx) = channel();
        let (spare_tx, spare) = channel();
        let logprobs = on_logprob.is_some() && params.top_logprobs.is_some();
        let stop = Arc::new(AtomicBool::new(false));
        let job = Job { session, prompt, params, max_new, cancel, stop: stop.clone(), logprobs, events, spare };
        if let Err(job) = self.together.submit(job) {
            return (Some(job.session), Err(EngineError::Eval("could not start the batch thread".into())));
        }
        let mut stopped = false;
        for event in rx {
            match event {
                // Text after the callback said stop (sent before the batch saw the cancel) is not shown.
                Event::Text(t) => {
                    if !stopped && !on_text(&t) {
                        stopped = true;
                        stop.store(true, Ordering::SeqCst);
                    }
                    let _ = spare_tx.send(t);
                }
                Event::Logprob(e) => {
                    if let (false, Some(f)) = (stopped, on_logprob.as_mut()) {
                        f(&e);
                    }
                }
                Event::Done(session, result) => return (Some(*session), result),
            }
        }
        (None, Err(EngineError::Eval("the batch thread stopped while running this request".into())))
    }
}
