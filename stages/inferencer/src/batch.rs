//! Batching: pages handed to a [`Batcher`] queue up for the model's
//! inference threads (one, or one per tract thread: see
//! [`Detector::parallel_runs`]). A thread takes the first waiting page,
//! waits up to `batch_wait` for more (up to `batch_size`, and only when the
//! model takes a batch), runs them as one batch and answers each page. With
//! `batch_size = 1`, or a model with a fixed batch of 1, pages run one by
//! one with no wait.
//!
//! Memory: the consumer pulls at most `batch_size` pages at a time, so at
//! most that many decoded images wait here.

use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use image::RgbImage;
use pagestream_schemas::Detection;
use tokio::sync::oneshot;

use crate::engine::{DetectTimings, Detector, RunError};

type Answer = Result<(Vec<Detection>, DetectTimings), RunError>;

struct Job {
    img: RgbImage,
    reply: oneshot::Sender<Answer>,
}

/// The queue in front of one model's inference thread.
pub struct Batcher {
    pub detector: Arc<Detector>,
    tx: mpsc::Sender<Job>,
}

impl Batcher {
    /// Starts the inference threads; they end when the batcher is dropped.
    pub fn spawn(detector: Arc<Detector>, batch_size: usize, batch_wait: Duration) -> Batcher {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let cap = batch_size.clamp(1, detector.max_batch().max(1));
        for i in 0..detector.parallel_runs().max(1) {
            let (d, rx) = (detector.clone(), rx.clone());
            std::thread::Builder::new()
                .name(format!("infer-{}-{i}", detector.model.name))
                .spawn(move || work(&d, &rx, cap, batch_wait))
                .expect("spawning an inference thread");
        }
        Batcher { detector, tx }
    }

    /// Detects on one page, batched with whatever else is waiting.
    pub async fn detect(&self, img: RgbImage) -> Answer {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Job { img, reply }).map_err(|_| RunError::Backend("the inference thread has stopped".into()))?;
        answer.await.map_err(|_| RunError::Backend("the inference thread dropped the page".into()))?
    }
}

/// One inference thread: collect a batch (holding the queue only while
/// collecting), run it, answer every page.
fn work(d: &Detector, rx: &Mutex<mpsc::Receiver<Job>>, cap: usize, batch_wait: Duration) {
    loop {
        let jobs = {
            let Ok(rx) = rx.lock() else { return };
            let Ok(first) = rx.recv() else { return };
            let mut jobs = vec![first];
            let deadline = Instant::now() + batch_wait;
            while jobs.len() < cap {
                match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            jobs
        };
        let imgs: Vec<&RgbImage> = jobs.iter().map(|j| &j.img).collect();
        match d.detect_batch(&imgs) {
            Ok(results) => {
                for (job, r) in jobs.into_iter().zip(results) {
                    let _ = job.reply.send(Ok(r));
                }
            }
            Err(e) => {
                for job in jobs {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }
}
