//! One supervisor for every long-lived task of the process.
//!
//! Each task is registered with a name, a factory (so that it can be started again) and what
//! its unexpected end means ([`OnExit`]). A task ends "unexpectedly" when it returns, panics or
//! is aborted before shutdown; then the supervisor counts it
//! (`inference_extension_task_exits_total{task, reason}`), logs it, and restarts it after an
//! exponential backoff (100 ms doubling to 30 s; back to 100 ms once a run lasted a minute).
//! A task whose absence makes the EPP's view of the world wrong ([`OnExit::Degrade`], e.g. a
//! Kubernetes watch) also takes readiness down until it runs again. A task that cannot be
//! recreated (a server whose listener is gone) is adopted as [`OnExit::Shutdown`]: its end
//! stops the process, and Kubernetes restarts the pod.
//!
//! Every task runs in a span named after it. At shutdown the supervisor stops restarting and
//! waits for the tasks, which end with the shutdown token they were given. A process that
//! drains after shutdown begins can keep its restartable tasks (scrapers, watches, the flow
//! dispatcher) running through the drain with [`Supervisor::run_tasks_until`]: streams still
//! open are then routed on live state, and a request still queued by flow control is let go
//! rather than left waiting for a dispatcher that has stopped.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::watch;
use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// What an unexpected end of a task means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnExit {
    /// Start it again after the backoff.
    Restart,
    /// Not ready while it is down; start it again after the backoff.
    Degrade,
    /// Shut the process down (the task cannot be recreated).
    Shutdown,
}

/// A task's name: fixed for the process's own tasks, made from the plugin instance's name for
/// a task each instance of a plugin needs (`kv-events:<scorer>`), so that two instances never
/// share one.
pub type TaskName = Cow<'static, str>;

/// `task, reason` of an unexpected task end.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskExitLabels {
    /// The task's name.
    pub task: TaskName,
    /// `returned`, `panicked` or `aborted`.
    pub reason: &'static str,
}

/// Starts one run of a task; the token ends it.
pub type Factory =
    Arc<dyn Fn(CancellationToken) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Wraps an async closure as a [`Factory`].
pub fn factory<F, Fut>(f: F) -> Factory
where
    F: Fn(CancellationToken) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    Arc::new(move |token| Box::pin(f(token)))
}

/// How long tasks get to end on their shutdown token before they are aborted (a lease is handed
/// back in this time).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A run at least this long resets the backoff.
const STABLE_RUN: Duration = Duration::from_secs(60);

struct Spec {
    on_exit: OnExit,
    factory: Option<Factory>,
    backoff: Duration,
}

struct Ended {
    task: TaskName,
    started: Instant,
}

/// A task the process cannot run without ([`OnExit::Shutdown`]) ended, and the process shut
/// down for it: the binaries exit non-zero (1) then, so that Kubernetes reports an error, not
/// a completion, and a service manager's restart-on-failure restarts it.
#[derive(Debug, thiserror::Error)]
#[error("the {0} task, which the process cannot run without, ended")]
pub struct TaskEnded(pub TaskName);

/// The exit status of a binary that failed with `error`: 1 when a task it cannot run without
/// ended ([`TaskEnded`] anywhere in the chain), else 2 (configuration or start-up, as
/// linkerd's EX_USAGE-like code).
pub fn failure_exit_code(error: &(dyn std::error::Error + 'static)) -> u8 {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.is::<TaskEnded>() {
            return 1;
        }
        cause = e.source();
    }
    2
}

/// The supervisor. Register tasks, then [`Supervisor::run`] it until shutdown.
pub struct Supervisor {
    set: JoinSet<Ended>,
    ids: HashMap<tokio::task::Id, (TaskName, Instant)>,
    specs: HashMap<TaskName, Spec>,
    shutdown: CancellationToken,
    /// Ends the restartable tasks: `shutdown` unless [`Supervisor::run_tasks_until`] says
    /// later.
    tasks_stop: CancellationToken,
    exits: Family<TaskExitLabels, Counter>,
    down: watch::Sender<BTreeSet<TaskName>>,
    /// The first task the process could not run without that ended.
    fatal: Option<TaskName>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("tasks", &self.specs.keys().collect::<Vec<_>>())
            .field("down", &*self.down.borrow())
            .finish_non_exhaustive()
    }
}

impl Supervisor {
    /// A supervisor whose tasks end with `shutdown`, counting unexpected ends into `exits`.
    pub fn new(shutdown: CancellationToken, exits: Family<TaskExitLabels, Counter>) -> Self {
        Self {
            set: JoinSet::new(),
            ids: HashMap::new(),
            specs: HashMap::new(),
            tasks_stop: shutdown.clone(),
            shutdown,
            exits,
            down: watch::channel(BTreeSet::new()).0,
            fatal: None,
        }
    }

    /// Keeps the restartable tasks running after `shutdown` until `stop` is cancelled (the
    /// caller cancels it once its drain is over). Tasks that end between the two are not
    /// restarted, and not counted: the process is on its way out.
    pub fn run_tasks_until(mut self, stop: CancellationToken) -> Self {
        self.tasks_stop = stop;
        self
    }

    /// The tasks whose absence takes readiness down, currently down (empty = ready as far as
    /// tasks go).
    pub fn down(&self) -> watch::Receiver<BTreeSet<TaskName>> {
        self.down.subscribe()
    }

    /// Starts a task that can be restarted. A name already taken gets a suffix (`#2`, `#3`, …)
    /// and a warning: two tasks under one name would be restarted with one factory.
    pub fn spawn(&mut self, task: impl Into<TaskName>, on_exit: OnExit, factory: Factory) {
        let task = self.unique(task.into());
        self.specs.insert(
            task.clone(),
            Spec {
                on_exit,
                factory: Some(factory.clone()),
                backoff: INITIAL_BACKOFF,
            },
        );
        self.start(task, factory, Duration::ZERO);
    }

    /// Watches a task that was started elsewhere and cannot be recreated; its unexpected end
    /// is counted and handled as `on_exit` says ([`OnExit::Restart`] is treated as
    /// [`OnExit::Degrade`]: there is nothing to restart).
    pub fn adopt<T: Send + 'static>(
        &mut self,
        task: impl Into<TaskName>,
        on_exit: OnExit,
        handle: tokio::task::JoinHandle<T>,
    ) {
        let task = self.unique(task.into());
        let on_exit = match on_exit {
            OnExit::Restart => OnExit::Degrade,
            other => other,
        };
        self.specs.insert(
            task.clone(),
            Spec {
                on_exit,
                factory: None,
                backoff: INITIAL_BACKOFF,
            },
        );
        let started = Instant::now();
        let ended = task.clone();
        let abort = self.set.spawn(async move {
            // A panic inside the adopted task surfaces here as one in this wrapper.
            if let Err(e) = handle.await
                && let Ok(panic) = e.try_into_panic()
            {
                std::panic::resume_unwind(panic);
            }
            Ended {
                task: ended,
                started,
            }
        });
        self.ids.insert(abort.id(), (task, started));
    }

    /// `task`, or the first of `task#2`, `task#3`, … not taken yet.
    fn unique(&self, task: TaskName) -> TaskName {
        if !self.specs.contains_key(&task) {
            return task;
        }
        let renamed = (2..)
            .map(|n| TaskName::Owned(format!("{task}#{n}")))
            .find(|name| !self.specs.contains_key(name))
            .unwrap_or_else(|| task.clone());
        tracing::warn!(%task, %renamed, "two supervised tasks share a name");
        renamed
    }

    fn start(&mut self, task: TaskName, factory: Factory, delay: Duration) {
        let token = self.tasks_stop.child_token();
        let started = Instant::now() + delay;
        let span = tracing::info_span!("task", name = %task);
        let ended = task.clone();
        let abort = self.set.spawn(
            async move {
                let task = ended;
                if !delay.is_zero() {
                    tokio::select! {
                        _ = token.cancelled() => return Ended { task, started },
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                factory(token).await;
                Ended { task, started }
            }
            .instrument(span),
        );
        self.ids.insert(abort.id(), (task, started));
    }

    /// Supervises until `shutdown` (and the tasks' stop, when later), then waits for every
    /// task to end. An error when the shutdown was a task's ([`OnExit::Shutdown`]).
    pub async fn run(mut self) -> Result<(), TaskEnded> {
        let stop = self.tasks_stop.clone();
        loop {
            let joined = tokio::select! {
                _ = stop.cancelled() => break,
                joined = self.set.join_next_with_id() => joined,
            };
            let Some(joined) = joined else {
                // Nothing left to supervise: wait for the end.
                stop.cancelled().await;
                break;
            };
            if stop.is_cancelled() {
                break;
            }
            if self.shutdown.is_cancelled() {
                // Draining: a task that ends now (an adopted server on the shutdown token)
                // ended on purpose.
                match joined {
                    Ok((id, _)) => self.ids.remove(&id),
                    Err(error) => self.ids.remove(&error.id()),
                };
                continue;
            }
            let (task, started, reason) = match joined {
                Ok((id, ended)) => {
                    self.ids.remove(&id);
                    (ended.task, ended.started, "returned")
                }
                Err(error) => {
                    let (task, started) = self
                        .ids
                        .remove(&error.id())
                        .unwrap_or((Cow::Borrowed("unknown"), Instant::now()));
                    (task, started, failure_reason(&error))
                }
            };
            self.exited(task, started, reason);
        }
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while self.set.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                tasks = self.set.len(),
                "tasks still running after the shutdown grace; aborting them"
            );
        }
        self.set.shutdown().await;
        self.fatal.map_or(Ok(()), |task| Err(TaskEnded(task)))
    }

    fn exited(&mut self, task: TaskName, started: Instant, reason: &'static str) {
        self.exits
            .get_or_create(&TaskExitLabels {
                task: task.clone(),
                reason,
            })
            .inc();
        let Some(spec) = self.specs.get_mut(&task) else {
            return;
        };
        let ran = started.elapsed();
        if ran >= STABLE_RUN {
            spec.backoff = INITIAL_BACKOFF;
        }
        let delay = spec.backoff;
        spec.backoff = (spec.backoff * 2).min(MAX_BACKOFF);
        let on_exit = spec.on_exit;
        let make = spec.factory.clone();
        match on_exit {
            OnExit::Shutdown => {
                tracing::error!(
                    %task,
                    reason,
                    "a task the process cannot run without ended; shutting down"
                );
                self.fatal.get_or_insert(task);
                self.shutdown.cancel();
                return;
            }
            OnExit::Degrade => {
                tracing::error!(
                    %task,
                    reason,
                    ?delay,
                    "task ended; not ready until it runs again"
                );
                self.down.send_modify(|down| {
                    down.insert(task.clone());
                });
            }
            OnExit::Restart => {
                tracing::error!(%task, reason, ?delay, "task ended; restarting");
            }
        }
        if let Some(make) = make {
            // Readiness comes back when the new run starts, not before.
            let down = self.down.clone();
            let name = task.clone();
            let restart = factory(move |token| {
                down.send_if_modified(|d| d.remove(&name));
                make(token)
            });
            self.start(task, restart, delay);
        }
    }
}

fn failure_reason(error: &JoinError) -> &'static str {
    if error.is_panic() {
        "panicked"
    } else {
        "aborted"
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn exits(
        family: &Family<TaskExitLabels, Counter>,
        task: &'static str,
        reason: &'static str,
    ) -> u64 {
        family
            .get_or_create(&TaskExitLabels {
                task: task.into(),
                reason,
            })
            .get()
    }

    /// A task that panics on its first `failures` runs and then runs until cancelled,
    /// counting its starts.
    fn flaky(failures: usize, starts: Arc<AtomicUsize>) -> Factory {
        factory(move |token: CancellationToken| {
            let starts = starts.clone();
            async move {
                let n = starts.fetch_add(1, Ordering::SeqCst);
                if n < failures {
                    panic!("run {n} fails");
                }
                token.cancelled().await;
            }
        })
    }

    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        for _ in 0..10_000 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never: {what}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_task_is_restarted_with_backoff_and_counted() {
        let shutdown = CancellationToken::new();
        let family = Family::default();
        let mut sup = Supervisor::new(shutdown.clone(), family.clone());
        let starts = Arc::new(AtomicUsize::new(0));
        sup.spawn("scraper", OnExit::Restart, flaky(3, starts.clone()));
        let down = sup.down();
        let began = Instant::now();
        let running = tokio::spawn(sup.run());
        until("four starts", || starts.load(Ordering::SeqCst) == 4).await;
        // 100 + 200 + 400 ms of backoff between the four starts.
        assert!(
            began.elapsed() >= Duration::from_millis(700),
            "{:?}",
            began.elapsed()
        );
        assert_eq!(exits(&family, "scraper", "panicked"), 3);
        assert!(
            down.borrow().is_empty(),
            "a restartable task never takes readiness down"
        );
        // Alive: it runs until shutdown, and shutdown is not counted as an exit.
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert_eq!(starts.load(Ordering::SeqCst), 4);
        shutdown.cancel();
        running.await.unwrap().unwrap();
        assert_eq!(exits(&family, "scraper", "panicked"), 3);
        assert_eq!(exits(&family, "scraper", "returned"), 0);
    }

    /// Two instances of a plugin whose tasks were given one name (the clash two
    /// `precise-prefix-cache-scorer`s had with one `kv-events` name): each is restarted with its
    /// own factory, under its own name.
    #[tokio::test(start_paused = true)]
    async fn tasks_given_one_name_are_restarted_each_with_its_own_factory() {
        let shutdown = CancellationToken::new();
        let family = Family::default();
        let mut sup = Supervisor::new(shutdown.clone(), family.clone());
        let (first, second) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        sup.spawn("kv-events", OnExit::Restart, flaky(2, first.clone()));
        sup.spawn("kv-events", OnExit::Restart, flaky(0, second.clone()));
        let running = tokio::spawn(sup.run());
        until("the first restarted twice", || {
            first.load(Ordering::SeqCst) == 3
        })
        .await;
        assert_eq!(exits(&family, "kv-events", "panicked"), 2);
        assert_eq!(exits(&family, "kv-events#2", "panicked"), 0);
        // Alive: the second ran once and still runs; neither is started again.
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert_eq!(second.load(Ordering::SeqCst), 1);
        assert_eq!(first.load(Ordering::SeqCst), 3);
        shutdown.cancel();
        running.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_watch_takes_readiness_down_until_it_runs_again() {
        let shutdown = CancellationToken::new();
        let family = Family::default();
        let mut sup = Supervisor::new(shutdown.clone(), family.clone());
        let starts = Arc::new(AtomicUsize::new(0));
        // Returns at once the first time (a watch stream that ended), then keeps running.
        let s = starts.clone();
        sup.spawn(
            "watch-pods",
            OnExit::Degrade,
            factory(move |token: CancellationToken| {
                let n = s.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n > 0 {
                        token.cancelled().await;
                    }
                }
            }),
        );
        let mut down = sup.down();
        let running = tokio::spawn(sup.run());
        down.wait_for(|d| d.contains("watch-pods")).await.unwrap();
        assert_eq!(exits(&family, "watch-pods", "returned"), 1);
        down.wait_for(BTreeSet::is_empty).await.unwrap();
        assert_eq!(starts.load(Ordering::SeqCst), 2);
        shutdown.cancel();
        running.await.unwrap().unwrap();
    }

    /// SIGTERM begins the drain: adopted servers end with the shutdown token, but restartable
    /// tasks keep running (and are not counted as exits) until the drain's end stops them.
    #[tokio::test(start_paused = true)]
    async fn restartable_tasks_run_through_the_drain_until_told_to_stop() {
        let shutdown = CancellationToken::new();
        let stop = CancellationToken::new();
        let family = Family::default();
        let mut sup =
            Supervisor::new(shutdown.clone(), family.clone()).run_tasks_until(stop.clone());
        let starts = Arc::new(AtomicUsize::new(0));
        let ended = Arc::new(AtomicUsize::new(0));
        let (s, e) = (starts.clone(), ended.clone());
        sup.spawn(
            "flow-control",
            OnExit::Restart,
            factory(move |token: CancellationToken| {
                s.fetch_add(1, Ordering::SeqCst);
                let e = e.clone();
                async move {
                    token.cancelled().await;
                    e.fetch_add(1, Ordering::SeqCst);
                }
            }),
        );
        let server_token = shutdown.clone();
        sup.adopt(
            "metrics-server",
            OnExit::Shutdown,
            tokio::spawn(async move { server_token.cancelled().await }),
        );
        let running = tokio::spawn(sup.run());
        until("started", || starts.load(Ordering::SeqCst) == 1).await;
        shutdown.cancel();
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert_eq!(
            ended.load(Ordering::SeqCst),
            0,
            "still running while draining"
        );
        assert!(!running.is_finished());
        assert_eq!(exits(&family, "metrics-server", "returned"), 0);
        stop.cancel();
        running.await.unwrap().unwrap();
        assert_eq!(ended.load(Ordering::SeqCst), 1);
        assert_eq!(starts.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_adopted_server_that_ends_shuts_the_process_down() {
        let shutdown = CancellationToken::new();
        let family = Family::default();
        let mut sup = Supervisor::new(shutdown.clone(), family.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        sup.adopt(
            "admin-server",
            OnExit::Shutdown,
            tokio::spawn(async move {
                let _ = rx.await;
            }),
        );
        let running = tokio::spawn(sup.run());
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!shutdown.is_cancelled(), "alive while the server runs");
        drop(tx);
        shutdown.cancelled().await;
        // The shutdown was the task's: the binaries exit 1 for it.
        let ended = running.await.unwrap().unwrap_err();
        assert_eq!(ended.0, "admin-server");
        assert_eq!(failure_exit_code(&ended), 1);
        assert_eq!(exits(&family, "admin-server", "returned"), 1);
    }
}
