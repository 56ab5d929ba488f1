//! The idle pause: a consumer's partition read to its end is not fetched
//! again for a while.
//!
//! A broker that honours `fetch.wait.max.ms` holds a fetch at the end of the
//! log until records arrive. One that does not (noida-db 0.2.3) answers it
//! at once, empty, and librdkafka fetches again at once: a caught-up applier
//! keeps a core busy, and the broker another. With an idle pause, when
//! librdkafka reports a partition's end (`enable.partition.eof`), the
//! partition is paused that long, then resumed.
//!
//! Resuming alone is not enough. librdkafka resumes a partition on its main
//! thread without waking the broker thread that fetches it, and that thread,
//! with every partition it serves paused, sleeps up to one second
//! (`rd_kafka_max_block_ms`, fixed): a record arriving after a quiet spell
//! was read 0.5–1 s late. Any request queued to the broker wakes its thread,
//! which then sees the partition resumed and fetches it. So each resume is
//! followed by an offset query for the partitions resumed together (one
//! `ListOffsets` to each leader), sent from a thread of the pause's own
//! because the call blocks until the answer.
//!
//! Nothing is skipped: the end is reported after every record fetched
//! before it, and a fetch that was under way when the pause began is
//! dropped; on resume librdkafka fetches from the record after the last one
//! delivered. Pausing and resuming bump the partition's fetch version, which
//! resets its end-of-partition mark, so the next empty fetch reports the end
//! again.

use rdkafka::consumer::{Consumer as _, ConsumerContext, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::time::Instant;

/// How long a wake's offset query may take (a broker that is down).
const WAKE_TIMEOUT: Duration = Duration::from_secs(1);

pub(super) struct IdlePause {
    pause: Duration,
    /// Resumes fall on multiples of the pause from here, so partitions that
    /// reach their end close together are resumed, woken and fetched together.
    origin: Instant,
    topic: String,
    /// Partitions paused at their end, and when to resume each.
    paused: Mutex<Vec<(i32, Instant)>>,
    waker: Option<Waker>,
}

impl IdlePause {
    /// An idle pause of `pause` (zero: none) for `topic`'s partitions.
    pub(super) fn new<C: ConsumerContext + 'static>(
        pause: Duration,
        topic: &str,
        consumer: &Arc<StreamConsumer<C>>,
    ) -> IdlePause {
        IdlePause {
            pause,
            origin: Instant::now(),
            topic: topic.to_string(),
            paused: Mutex::new(Vec::new()),
            waker: (!pause.is_zero()).then(|| Waker::start(consumer.clone(), topic)),
        }
    }

    pub(super) fn is_on(&self) -> bool {
        !self.pause.is_zero()
    }

    /// `partition` was read to its end: pause it for the idle pause.
    pub(super) fn at_end<C: ConsumerContext>(&self, consumer: &StreamConsumer<C>, partition: i32) {
        if !self.is_on() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topic, partition);
        if consumer.pause(&tpl).is_err() {
            return;
        }
        if let Ok(mut paused) = self.paused.lock() {
            let at = self.next_tick();
            paused.retain(|(p, _)| *p != partition);
            paused.push((partition, at));
        }
    }

    /// The first multiple of the pause from `origin` after now.
    fn next_tick(&self) -> Instant {
        let pause = self.pause.as_nanos().max(1);
        let ticks = self.origin.elapsed().as_nanos() / pause + 1;
        self.origin + Duration::from_nanos(u64::try_from(ticks * pause).unwrap_or(u64::MAX))
    }

    /// Resumes the paused partitions that are due and wakes their broker
    /// threads; returns when the next one is due.
    pub(super) fn resume_due<C: ConsumerContext>(
        &self,
        consumer: &StreamConsumer<C>,
    ) -> Option<Instant> {
        let mut paused = self.paused.lock().ok()?;
        let now = Instant::now();
        let mut tpl = TopicPartitionList::new();
        let mut due = Vec::new();
        paused.retain(|(p, at)| {
            if *at <= now {
                tpl.add_partition(&self.topic, *p);
                due.push(*p);
            }
            *at > now
        });
        if !due.is_empty() {
            // Synchronous: librdkafka has taken the resume when this returns,
            // so the wake that follows finds the partitions fetchable.
            match consumer.resume(&tpl) {
                Ok(()) => {
                    if let Some(waker) = &self.waker {
                        waker.wake(due);
                    }
                }
                Err(e) => {
                    tracing::warn!(topic = %self.topic, error = %e, "kafka: resuming partitions after an idle pause failed")
                }
            }
        }
        paused.iter().map(|(_, at)| *at).min()
    }
}

/// The thread that wakes broker threads (see the module docs). It ends when
/// the pause is dropped, which waits for it.
struct Waker {
    tx: Option<mpsc::Sender<Vec<i32>>>,
    thread: Option<JoinHandle<()>>,
}

impl Waker {
    fn start<C: ConsumerContext + 'static>(consumer: Arc<StreamConsumer<C>>, topic: &str) -> Waker {
        let (tx, rx) = mpsc::channel::<Vec<i32>>();
        let topic = topic.to_string();
        let thread = std::thread::Builder::new()
            .name("rowshift-kafka-wake".into())
            .spawn(move || {
                while let Ok(mut partitions) = rx.recv() {
                    // Resumes that queued up meanwhile need one wake each.
                    while let Ok(more) = rx.try_recv() {
                        partitions.extend(more);
                    }
                    partitions.sort_unstable();
                    partitions.dedup();
                    // One `ListOffsets` (latest) to each partition's leader:
                    // librdkafka groups the partitions by leader.
                    let mut tpl = TopicPartitionList::new();
                    for p in &partitions {
                        let _ = tpl.add_partition_offset(&topic, *p, Offset::End);
                    }
                    if let Err(e) = consumer.offsets_for_times(tpl, WAKE_TIMEOUT) {
                        tracing::debug!(topic = %topic, error = %e, "kafka: waking the fetcher after an idle pause failed");
                    }
                }
            });
        match thread {
            Ok(thread) => Waker {
                tx: Some(tx),
                thread: Some(thread),
            },
            Err(e) => {
                // Without it a resumed partition is fetched within a second.
                tracing::warn!(error = %e, "kafka: could not start the idle pause's wake thread");
                Waker {
                    tx: None,
                    thread: None,
                }
            }
        }
    }

    fn wake(&self, partitions: Vec<i32>) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(partitions);
        }
    }
}

impl Drop for Waker {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
