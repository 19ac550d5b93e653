//! The one task that schedules every probe: a timer heap of `(due, generation, key)`, a
//! command channel from [`super::Prober`] and a channel of finished runs. It alone owns each
//! probe's state, the result it last reported and the channel its updates go to (the pod
//! worker's); nothing of it is mirrored outside, only the metrics are read. An idle probe costs
//! a map entry and a heap entry, no task; each due run is spawned as its own future (so a slow
//! exec never delays other probes), and a probe is never run twice at once: the next run is
//! scheduled only when the previous one finished. Every `start` gets a new generation, so a
//! replaced or stopped probe's heap entries and late results are recognised and dropped; its
//! running future is aborted.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::metrics::{Labels, Metrics};
use super::{
    run_once, Exec, Outcome, ProbeError, ProbeKey, ProbeKind, ProbeResult, ProbeTarget,
    ProbeUpdate, Settings,
};
use crate::events::{pod_ref, EventType, Recorder};

/// Past its own timeout a handler gets this long before its run is abandoned as failed.
const RUN_SLACK: Duration = Duration::from_secs(2);

/// What the [`super::Prober`] handle asks of the scheduler.
pub(super) enum Command {
    Start {
        key: ProbeKey,
        target: Box<ProbeTarget>,
        results: super::Results,
    },
    Stop {
        key: ProbeKey,
    },
    StopPod {
        pod_uid: String,
    },
    /// The result a probe last reported (Unknown when not running).
    #[cfg(test)]
    Result {
        key: ProbeKey,
        reply: tokio::sync::oneshot::Sender<ProbeResult>,
    },
}

/// A run that finished (or timed out).
struct Done {
    key: ProbeKey,
    generation: u64,
    due: Instant,
    started: Instant,
    outcome: Result<Outcome, ProbeError>,
}

/// Where a probe is in its cycle.
enum Phase {
    /// Waiting in the heap for `due`.
    Due(Instant),
    /// A run is in flight.
    Running { due: Instant, task: AbortHandle },
    /// A liveness/readiness probe waiting for its container's startup probe to succeed.
    Gated,
    /// Not scheduled: a startup probe that succeeded, or a liveness/startup probe that failed
    /// (on hold until the next start for a new container attempt).
    Idle,
}

/// One probe's state, owned by the scheduler.
struct Worker {
    generation: u64,
    target: Arc<ProbeTarget>,
    settings: Settings,
    labels: Labels,
    field_path: String,
    /// When the probe was started: the initial delay counts from here.
    started: Instant,
    /// The result last reported.
    reported: ProbeResult,
    /// Where the results go (the pod worker's channel).
    results: super::Results,
    /// The result of the last run and how many runs in a row had it.
    last: Option<ProbeResult>,
    run: u32,
    phase: Phase,
}

pub(super) struct Scheduler {
    exec: Arc<dyn Exec>,
    recorder: Recorder,
    metrics: Arc<Mutex<Metrics>>,
    /// The generation the next start gets.
    next_generation: u64,
    workers: BTreeMap<ProbeKey, Worker>,
    heap: BinaryHeap<Reverse<(Instant, u64, ProbeKey)>>,
    /// (pod UID, container) whose startup probe succeeded in the current attempt; stopping
    /// the startup probe keeps the entry (a terminating pod still runs readiness), a new
    /// startup probe that has not succeeded clears it.
    started: BTreeSet<(String, String)>,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
}

impl Scheduler {
    pub fn new(exec: Arc<dyn Exec>, recorder: Recorder, metrics: Arc<Mutex<Metrics>>) -> Self {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Self {
            exec,
            recorder,
            metrics,
            next_generation: 1,
            workers: BTreeMap::new(),
            heap: BinaryHeap::new(),
            started: BTreeSet::new(),
            done_tx,
            done_rx,
        }
    }

    /// Runs until the [`super::Prober`] is dropped, then aborts every run in flight.
    pub async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(timer);
        loop {
            let next = self.heap.peek().map(|Reverse((due, _, _))| *due);
            if let Some(due) = next {
                timer.as_mut().reset(due);
            }
            tokio::select! {
                // Commands first: a burst of starts is applied before any timer fires.
                biased;
                command = commands.recv() => match command {
                    Some(command) => self.command(command),
                    None => break,
                },
                Some(done) = self.done_rx.recv() => self.finished(done),
                () = &mut timer, if next.is_some() => self.fire(),
            }
        }
        for worker in self.workers.values() {
            if let Phase::Running { task, .. } = &worker.phase {
                task.abort();
            }
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Start {
                key,
                target,
                results,
            } => self.start(key, *target, results),
            Command::Stop { key } => {
                if let Some(worker) = self.workers.remove(&key) {
                    abort(&worker);
                }
                self.metrics().forget(&key);
            }
            Command::StopPod { pod_uid } => {
                self.workers.retain(|key, worker| {
                    let keep = key.pod_uid != pod_uid;
                    if !keep {
                        abort(worker);
                    }
                    keep
                });
                self.metrics().forget_pod(&pod_uid);
                self.started.retain(|(uid, _)| *uid != pod_uid);
            }
            #[cfg(test)]
            Command::Result { key, reply } => {
                let result = self.workers.get(&key).map(|w| w.reported);
                let _ = reply.send(result.unwrap_or(ProbeResult::Unknown));
            }
        }
    }

    /// Starts (or replaces) a probe: a new generation, its initial result sent first.
    fn start(&mut self, key: ProbeKey, target: ProbeTarget, results: super::Results) {
        let generation = self.next_generation;
        self.next_generation += 1;
        let initial = target.resumed.unwrap_or(key.kind.initial_result());
        let _ = results.unbounded_send(ProbeUpdate {
            key: key.clone(),
            container_id: target.container_id.clone(),
            result: initial,
            message: String::new(),
        });
        let settings = Settings::of(key.kind, &target.probe);
        let now = Instant::now();
        let is_init = target
            .pod
            .spec
            .iter()
            .flat_map(|s| s.init_containers.iter().flatten())
            .any(|c| c.name == target.container.name);
        let field_path = if is_init {
            format!("spec.initContainers{{{}}}", target.container.name)
        } else {
            format!("spec.containers{{{}}}", target.container.name)
        };
        let labels = Labels {
            namespace: target.pod.metadata.namespace.clone().unwrap_or_default(),
            pod: target.pod.metadata.name.clone().unwrap_or_default(),
        };
        let first = if target.resumed.is_some() {
            let period = u64::try_from(settings.period.as_nanos()).unwrap_or(u64::MAX);
            now + Duration::from_nanos(rand::random_range(0..period.max(1)))
        } else {
            now + settings.initial_delay
        };
        let done_starting = key.kind == ProbeKind::Startup && initial == ProbeResult::Success;
        let worker = Worker {
            generation,
            target: Arc::new(target),
            settings,
            labels,
            field_path,
            started: now,
            reported: initial,
            results,
            last: None,
            run: 0,
            phase: Phase::Idle,
        };
        if let Some(old) = self.workers.insert(key.clone(), worker) {
            abort(&old);
        }
        if key.kind == ProbeKind::Startup {
            let container = (key.pod_uid.clone(), key.container.clone());
            if done_starting {
                self.started.insert(container);
            } else {
                self.started.remove(&container);
            }
        }
        if done_starting {
            self.release(&key.pod_uid, &key.container);
        } else {
            self.schedule(&key, first);
        }
    }

    /// Puts the probe in the heap for `due`.
    fn schedule(&mut self, key: &ProbeKey, due: Instant) {
        if let Some(worker) = self.workers.get_mut(key) {
            worker.phase = Phase::Due(due);
            self.heap
                .push(Reverse((due, worker.generation, key.clone())));
        }
    }

    /// Whether a container whose spec has a startup probe has seen that probe succeed in its
    /// current attempt (a container without one has started as soon as it runs).
    fn started(&self, key: &ProbeKey, target: &ProbeTarget) -> bool {
        if target.container.startup_probe.is_none() {
            return true;
        }
        self.started
            .contains(&(key.pod_uid.clone(), key.container.clone()))
    }

    /// Schedules the container's gated liveness and readiness probes once it has started.
    fn release(&mut self, pod_uid: &str, container: &str) {
        let now = Instant::now();
        for kind in [ProbeKind::Liveness, ProbeKind::Readiness] {
            let key = ProbeKey {
                pod_uid: pod_uid.to_string(),
                container: container.to_string(),
                kind,
            };
            let due = match self.workers.get(&key) {
                Some(w) if matches!(w.phase, Phase::Gated) => {
                    (w.started + w.settings.initial_delay).max(now)
                }
                _ => continue,
            };
            self.schedule(&key, due);
        }
    }

    /// Starts every run that is due.
    fn fire(&mut self) {
        let now = Instant::now();
        crate::memory::shrink_spare(&mut self.heap);
        while let Some(Reverse((due, _, _))) = self.heap.peek() {
            if *due > now {
                break;
            }
            let Some(Reverse((due, generation, key))) = self.heap.pop() else {
                break;
            };
            let Some(worker) = self.workers.get(&key) else {
                continue;
            };
            if worker.generation != generation || !matches!(worker.phase, Phase::Due(d) if d == due)
            {
                continue;
            }
            let gated = key.kind != ProbeKind::Startup && !self.started(&key, &worker.target);
            let Some(worker) = self.workers.get_mut(&key) else {
                continue;
            };
            if gated {
                worker.phase = Phase::Gated;
                continue;
            }
            let exec = self.exec.clone();
            let target = worker.target.clone();
            let timeout = worker.settings.timeout;
            let done = self.done_tx.clone();
            let run_key = key.clone();
            let task = tokio::spawn(async move {
                let started = Instant::now();
                let budget = timeout + exec_grace(&target) + RUN_SLACK;
                let run = AssertUnwindSafe(run_once(&*exec, &target, timeout)).catch_unwind();
                let outcome = match tokio::time::timeout(budget, run).await {
                    Ok(Ok(outcome)) => outcome,
                    Ok(Err(_)) => Err(ProbeError::Panicked {
                        container: target.container.name.clone(),
                    }),
                    Err(_) => Ok(Outcome::Failure(format!(
                        "probe did not finish within {budget:?}"
                    ))),
                };
                let _ = done.send(Done {
                    key: run_key,
                    generation,
                    due,
                    started,
                    outcome,
                });
            });
            worker.phase = Phase::Running {
                due,
                task: task.abort_handle(),
            };
        }
    }

    /// Applies a finished run: events, metrics, thresholds, the next run.
    fn finished(&mut self, done: Done) {
        let Some(worker) = self.workers.get_mut(&done.key) else {
            return;
        };
        if worker.generation != done.generation
            || !matches!(worker.phase, Phase::Running { due, .. } if due == done.due)
        {
            return;
        }
        let kind = done.key.kind.as_str();
        let reference = || pod_ref(&worker.target.pod, Some(worker.field_path.clone()));
        let (counted, result, message) = match &done.outcome {
            Ok(Outcome::Success(output)) => {
                ("successful", Some(ProbeResult::Success), output.as_str())
            }
            Ok(Outcome::Warning(output)) => {
                self.recorder.record(
                    reference(),
                    EventType::Warning,
                    "ProbeWarning",
                    &format!("{kind} probe warning: {output}"),
                );
                ("successful", Some(ProbeResult::Success), output.as_str())
            }
            Ok(Outcome::Failure(output)) => {
                self.recorder.record(
                    reference(),
                    EventType::Warning,
                    "Unhealthy",
                    &format!("{kind} probe failed: {}", output.trim_end()),
                );
                ("failed", Some(ProbeResult::Failure), output.as_str())
            }
            Err(error) => {
                tracing::warn!(
                    pod = worker.labels.pod,
                    ns = worker.labels.namespace,
                    container = done.key.container,
                    probe = kind,
                    "probe errored: {error}"
                );
                self.recorder.record(
                    reference(),
                    EventType::Warning,
                    "Unhealthy",
                    &format!("{kind} probe errored: {error}"),
                );
                ("unknown", None, "")
            }
        };
        {
            let mut metrics = self.metrics.lock().expect("prober metrics lock");
            metrics.count(&done.key, &worker.labels, counted);
            metrics.observe_delay(done.started.saturating_duration_since(done.due));
        }
        let mut keep_running = true;
        let mut startup_succeeded = false;
        if let Some(result) = result {
            if worker.last == Some(result) {
                worker.run = worker.run.saturating_add(1);
            } else {
                worker.last = Some(result);
                worker.run = 1;
            }
            let threshold = match result {
                ProbeResult::Success => worker.settings.success_threshold,
                _ => worker.settings.failure_threshold,
            };
            if worker.run >= threshold {
                if worker.reported != result {
                    worker.reported = result;
                    let _ = worker.results.unbounded_send(ProbeUpdate {
                        key: done.key.clone(),
                        container_id: worker.target.container_id.clone(),
                        result,
                        message: message.trim_end().to_string(),
                    });
                }
                match (done.key.kind, result) {
                    (ProbeKind::Liveness | ProbeKind::Startup, ProbeResult::Failure) => {
                        worker.run = 0;
                        keep_running = false;
                    }
                    (ProbeKind::Startup, ProbeResult::Success) => {
                        keep_running = false;
                        startup_succeeded = true;
                        self.started
                            .insert((done.key.pod_uid.clone(), done.key.container.clone()));
                    }
                    _ => {}
                }
            }
        }
        if keep_running {
            let next = (done.due + worker.settings.period).max(Instant::now());
            self.schedule(&done.key, next);
        } else {
            worker.phase = Phase::Idle;
        }
        if startup_succeeded {
            self.release(&done.key.pod_uid, &done.key.container);
        }
    }

    fn metrics(&self) -> std::sync::MutexGuard<'_, Metrics> {
        self.metrics.lock().expect("prober metrics lock")
    }
}

/// The extra time an exec run may take for the runtime to kill the command.
fn exec_grace(target: &ProbeTarget) -> Duration {
    if target.probe.exec.is_some() {
        super::exec::KILL_GRACE
    } else {
        Duration::ZERO
    }
}

fn abort(worker: &Worker) {
    if let Phase::Running { task, .. } = &worker.phase {
        task.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, VecDeque};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use futures::channel::mpsc::{unbounded, UnboundedReceiver};
    use futures::future::BoxFuture;
    use k8s_openapi::api::core::v1::{Container, ExecAction, HTTPGetAction, Pod, PodSpec, Probe};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    use super::super::{ProbeUpdate, Prober};
    use super::*;

    /// What the fake does for one call.
    #[derive(Clone, Copy, Debug)]
    enum Step {
        Exit(i32, &'static str),
        Hang,
        Error(&'static str),
        Panic,
    }

    /// A scripted Exec: per command name, a queue of steps then a fallback step.
    #[derive(Default)]
    struct FakeExec {
        script: Mutex<HashMap<String, (VecDeque<Step>, Step)>>,
        calls: Mutex<Vec<(String, Instant)>>,
        in_flight: Arc<AtomicUsize>,
        max_in_flight: Arc<AtomicUsize>,
    }

    impl FakeExec {
        fn set(&self, command: &str, queue: &[Step], fallback: Step) {
            self.script.lock().unwrap().insert(
                command.to_string(),
                (queue.iter().copied().collect(), fallback),
            );
        }

        /// When `command` was called, in seconds since `t0`.
        fn calls(&self, command: &str, t0: Instant) -> Vec<f64> {
            self.calls
                .lock()
                .unwrap()
                .iter()
                .filter(|(c, _)| c == command)
                .map(|(_, at)| (*at - t0).as_secs_f64())
                .collect()
        }
    }

    struct InFlight(Arc<AtomicUsize>);

    impl Drop for InFlight {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    impl Exec for FakeExec {
        fn exec(
            &self,
            _container_id: &str,
            command: &[String],
            _timeout: Duration,
        ) -> BoxFuture<'static, Result<(i32, Vec<u8>), crate::probe::ExecError>> {
            let name = command[0].clone();
            self.calls
                .lock()
                .unwrap()
                .push((name.clone(), Instant::now()));
            let step = {
                let mut script = self.script.lock().unwrap();
                let (queue, fallback) = script
                    .get_mut(&name)
                    .unwrap_or_else(|| panic!("no script for {name}"));
                queue.pop_front().unwrap_or(*fallback)
            };
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_in_flight.fetch_max(now, Ordering::SeqCst);
            let guard = InFlight(self.in_flight.clone());
            async move {
                let _guard = guard;
                match step {
                    Step::Exit(code, out) => Ok((code, out.as_bytes().to_vec())),
                    Step::Error(message) => {
                        Err(crate::probe::ExecError::Failed(message.to_string()))
                    }
                    Step::Hang => futures::future::pending().await,
                    Step::Panic => panic!("the fake exec panics as asked"),
                }
            }
            .boxed()
        }
    }

    const OK: Step = Step::Exit(0, "ok");
    const BAD: Step = Step::Exit(1, "not healthy");

    fn pod() -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("ns".into()),
                uid: Some("u1".into()),
                ..Default::default()
            },
            spec: Some(PodSpec::default()),
            ..Default::default()
        }
    }

    fn exec_probe(command: &str) -> Probe {
        Probe {
            exec: Some(ExecAction {
                command: Some(vec![command.to_string()]),
            }),
            ..Default::default()
        }
    }

    fn target(probe: Probe) -> ProbeTarget {
        ProbeTarget {
            pod: pod().into(),
            container: Container {
                name: "app".into(),
                ..Default::default()
            },
            container_id: "c1".into(),
            pod_ip: None,
            probe,
            resumed: None,
        }
    }

    /// A target whose container also has a startup probe (which gates the others).
    fn gated(probe: Probe) -> ProbeTarget {
        let mut target = target(probe);
        target.container.startup_probe = Some(exec_probe("boot"));
        target
    }

    fn key(kind: ProbeKind) -> ProbeKey {
        ProbeKey {
            pod_uid: "u1".into(),
            container: "app".into(),
            kind,
        }
    }

    fn setup() -> (Arc<FakeExec>, Prober, Recorder) {
        let exec = Arc::new(FakeExec::default());
        let recorder = Recorder::new("node-1", None);
        let prober = Prober::new(exec.clone(), recorder.clone());
        (exec, prober, recorder)
    }

    /// Lets the scheduler and the runs it spawned catch up without moving the clock.
    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    async fn next(rx: &mut UnboundedReceiver<ProbeUpdate>) -> ProbeUpdate {
        rx.recv()
            .await
            .expect("the prober dropped the results channel")
    }

    /// Whether the channel ends (every sender let go) within an hour of paused time, after
    /// what is still queued on it.
    async fn closed(rx: &mut UnboundedReceiver<ProbeUpdate>) -> bool {
        let drained = async { while rx.recv().await.is_ok() {} };
        tokio::time::timeout(Duration::from_secs(3600), drained)
            .await
            .is_ok()
    }

    /// Seconds of (paused) time since `t0`, to the millisecond.
    fn at(t0: Instant) -> f64 {
        ((Instant::now() - t0).as_secs_f64() * 1000.0).round() / 1000.0
    }

    fn messages(recorder: &Recorder, reason: &str) -> Vec<String> {
        // One per occurrence: the recorder counts repeats of one Event.
        let events = recorder.recent().into_iter();
        let events = events.filter(|e| e.reason.as_deref() == Some(reason));
        let count = |e: &k8s_openapi::api::core::v1::Event| e.count.unwrap_or(1).max(1) as usize;
        events
            .flat_map(|e| std::iter::repeat_n(e.message.clone().unwrap_or_default(), count(&e)))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn initial_results_are_sent_first() {
        let (exec, prober, _) = setup();
        exec.set("hang", &[], Step::Hang);
        let (tx, mut rx) = unbounded();
        for kind in [
            ProbeKind::Readiness,
            ProbeKind::Liveness,
            ProbeKind::Startup,
        ] {
            prober.start(key(kind), target(exec_probe("hang")), tx.clone());
            let update = next(&mut rx).await;
            assert_eq!(update.key.kind, kind);
            assert_eq!(update.result, kind.initial_result());
            assert_eq!(update.container_id, "c1");
            assert_eq!(prober.result(&key(kind)).await, kind.initial_result());
        }
        assert_eq!(
            prober
                .result(&ProbeKey {
                    container: "other".into(),
                    ..key(ProbeKind::Liveness)
                })
                .await,
            ProbeResult::Unknown
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_reported_at_the_threshold_and_hold_liveness() {
        let (exec, prober, recorder) = setup();
        exec.set("check", &[], BAD);
        let (tx, mut rx) = unbounded();
        let t0 = Instant::now();
        prober.start(key(ProbeKind::Liveness), target(exec_probe("check")), tx);
        assert_eq!(next(&mut rx).await.result, ProbeResult::Success);
        let update = next(&mut rx).await;
        assert_eq!(update.result, ProbeResult::Failure);
        assert_eq!(update.message, "not healthy");
        assert_eq!(
            at(t0),
            20.0,
            "runs at 0, 10 and 20 s; reported on the third"
        );
        assert_eq!(
            messages(&recorder, "Unhealthy"),
            vec!["Liveness probe failed: not healthy"; 3]
        );
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert_eq!(exec.calls("check", t0).len(), 3, "liveness is on hold");
        assert!(rx.try_recv().is_err());
        assert_eq!(
            prober.result(&key(ProbeKind::Liveness)).await,
            ProbeResult::Failure
        );
    }

    #[tokio::test(start_paused = true)]
    async fn success_threshold_initial_delay_and_period() {
        let (exec, prober, _) = setup();
        exec.set("check", &[], OK);
        let (tx, mut rx) = unbounded();
        let probe = Probe {
            initial_delay_seconds: Some(5),
            success_threshold: Some(2),
            period_seconds: Some(10),
            failure_threshold: Some(2),
            ..exec_probe("check")
        };
        let t0 = Instant::now();
        prober.start(key(ProbeKind::Readiness), target(probe), tx);
        assert_eq!(next(&mut rx).await.result, ProbeResult::Failure);
        assert_eq!(next(&mut rx).await.result, ProbeResult::Success);
        assert_eq!(at(t0), 15.0);
        exec.set("check", &[], BAD);
        let update = next(&mut rx).await;
        assert_eq!(update.result, ProbeResult::Failure);
        assert_eq!(at(t0), 35.0);
        exec.set("check", &[], OK);
        tokio::time::sleep(Duration::from_secs(21)).await;
        assert_eq!(
            exec.calls("check", t0),
            vec![5.0, 15.0, 25.0, 35.0, 45.0, 55.0]
        );
        let update = rx.try_recv().expect("two successes: 45 and 55 s");
        assert_eq!(update.result, ProbeResult::Success);
    }

    #[tokio::test(start_paused = true)]
    async fn only_changes_are_reported() {
        let (exec, prober, _) = setup();
        // Flapping below both thresholds never changes the result.
        exec.set("check", &[OK, BAD, OK, BAD, BAD, OK], OK);
        let (tx, mut rx) = unbounded();
        let probe = Probe {
            success_threshold: Some(2),
            period_seconds: Some(1),
            ..exec_probe("check")
        };
        let t0 = Instant::now();
        prober.start(key(ProbeKind::Readiness), target(probe), tx);
        assert_eq!(next(&mut rx).await.result, ProbeResult::Failure);
        assert_eq!(next(&mut rx).await.result, ProbeResult::Success);
        assert_eq!(
            at(t0),
            6.0,
            "the first two successes in a row: runs at 5 and 6 s"
        );
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(rx.try_recv().is_err(), "steady success sends nothing more");
        assert!(exec.calls("check", t0).len() > 60);
    }

    #[tokio::test(start_paused = true)]
    async fn startup_gates_liveness_and_readiness() {
        let (exec, prober, _) = setup();
        exec.set("boot", &[BAD, BAD], OK);
        exec.set("live", &[], OK);
        exec.set("ready", &[], OK);
        let (tx, mut rx) = unbounded();
        let t0 = Instant::now();
        // Liveness and readiness are started before startup: gating must still hold.
        prober.start(
            key(ProbeKind::Liveness),
            gated(exec_probe("live")),
            tx.clone(),
        );
        prober.start(
            key(ProbeKind::Readiness),
            gated(exec_probe("ready")),
            tx.clone(),
        );
        settle().await;
        assert!(exec.calls("live", t0).is_empty());
        let startup = Probe {
            period_seconds: Some(1),
            failure_threshold: Some(10),
            ..exec_probe("boot")
        };
        prober.start(key(ProbeKind::Startup), target(startup), tx);
        for _ in 0..3 {
            next(&mut rx).await;
        }
        let update = next(&mut rx).await;
        assert_eq!(update.key.kind, ProbeKind::Startup);
        assert_eq!(update.result, ProbeResult::Success);
        assert_eq!(at(t0), 2.0);
        let update = next(&mut rx).await;
        assert_eq!(update.key.kind, ProbeKind::Readiness);
        assert_eq!(update.result, ProbeResult::Success);
        assert_eq!(at(t0), 2.0, "released as soon as startup succeeded");
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(exec.calls("boot", t0), vec![0.0, 1.0, 2.0], "startup stops");
        assert_eq!(exec.calls("live", t0)[0], 2.0);
        assert_eq!(exec.calls("ready", t0)[0], 2.0);
        // A terminating pod stops startup and liveness; readiness goes on running.
        prober.stop(&key(ProbeKind::Startup));
        prober.stop(&key(ProbeKind::Liveness));
        let ready = exec.calls("ready", t0).len();
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(exec.calls("ready", t0).len(), ready + 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_startup_keeps_the_others_gated() {
        let (exec, prober, recorder) = setup();
        exec.set("boot", &[], BAD);
        exec.set("live", &[], OK);
        let (tx, mut rx) = unbounded();
        let t0 = Instant::now();
        let startup = Probe {
            period_seconds: Some(1),
            failure_threshold: Some(2),
            ..exec_probe("boot")
        };
        prober.start(key(ProbeKind::Startup), gated(startup.clone()), tx.clone());
        prober.start(
            key(ProbeKind::Liveness),
            gated(exec_probe("live")),
            tx.clone(),
        );
        next(&mut rx).await;
        next(&mut rx).await;
        let update = next(&mut rx).await;
        assert_eq!(
            (update.key.kind, update.result),
            (ProbeKind::Startup, ProbeResult::Failure)
        );
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(
            exec.calls("boot", t0).len(),
            2,
            "startup is on hold after failing"
        );
        assert!(exec.calls("live", t0).is_empty());
        assert_eq!(
            messages(&recorder, "Unhealthy")[0],
            "Startup probe failed: not healthy"
        );
        // Stopping the startup probe does not release liveness: the container has one.
        prober.stop(&key(ProbeKind::Startup));
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(exec.calls("live", t0).is_empty());
        // The next attempt's startup probe succeeds and releases it at once.
        exec.set("boot", &[], OK);
        prober.start(key(ProbeKind::Startup), gated(startup), tx);
        assert_eq!(next(&mut rx).await.result, ProbeResult::Unknown);
        assert_eq!(next(&mut rx).await.result, ProbeResult::Success);
        settle().await;
        assert_eq!(exec.calls("live", t0), vec![91.0]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_exec_times_out_without_overlapping_runs() {
        let (exec, prober, recorder) = setup();
        exec.set("hang", &[], Step::Hang);
        let (tx, mut rx) = unbounded();
        let probe = Probe {
            period_seconds: Some(1),
            timeout_seconds: Some(3),
            failure_threshold: Some(2),
            ..exec_probe("hang")
        };
        let t0 = Instant::now();
        prober.start(key(ProbeKind::Liveness), target(probe), tx);
        next(&mut rx).await;
        let update = next(&mut rx).await;
        assert_eq!(update.result, ProbeResult::Failure);
        assert_eq!(update.message, "command \"hang\" timed out");
        // Two runs of 3 s + the kill grace each, back to back: never two at once.
        let run = 3.0 + super::super::exec::KILL_GRACE.as_secs_f64();
        assert_eq!(at(t0), 2.0 * run);
        assert_eq!(exec.calls("hang", t0), vec![0.0, run]);
        assert_eq!(exec.max_in_flight.load(Ordering::SeqCst), 1);
        assert_eq!(exec.in_flight.load(Ordering::SeqCst), 0);
        assert_eq!(
            messages(&recorder, "Unhealthy"),
            vec!["Liveness probe failed: command \"hang\" timed out"; 2]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn replace_cancels_the_old_run_and_stop_ends_the_probe() {
        let (exec, prober, _) = setup();
        exec.set("hang", &[], Step::Hang);
        exec.set("check", &[], OK);
        let (tx, mut rx) = unbounded();
        let slow = Probe {
            timeout_seconds: Some(30),
            ..exec_probe("hang")
        };
        let t0 = Instant::now();
        prober.start(key(ProbeKind::Readiness), target(slow), tx.clone());
        assert_eq!(next(&mut rx).await.container_id, "c1");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(exec.in_flight.load(Ordering::SeqCst), 1);
        let replacement = ProbeTarget {
            container_id: "c2".into(),
            ..target(exec_probe("check"))
        };
        prober.start(key(ProbeKind::Readiness), replacement, tx);
        let initial = next(&mut rx).await;
        assert_eq!(
            (initial.container_id.as_str(), initial.result),
            ("c2", ProbeResult::Failure)
        );
        let update = next(&mut rx).await;
        assert_eq!(
            (update.container_id.as_str(), update.result),
            ("c2", ProbeResult::Success)
        );
        assert_eq!(at(t0), 1.0);
        assert_eq!(
            exec.in_flight.load(Ordering::SeqCst),
            0,
            "the hanging run was aborted"
        );
        tokio::time::sleep(Duration::from_secs(45)).await;
        assert!(
            rx.try_recv().is_err(),
            "nothing from the replaced generation"
        );
        prober.stop(&key(ProbeKind::Readiness));
        assert_eq!(
            prober.result(&key(ProbeKind::Readiness)).await,
            ProbeResult::Unknown
        );
        let before = exec.calls("check", t0).len();
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(exec.calls("check", t0).len(), before);
        assert_eq!(exec.calls("hang", t0).len(), 1);
    }

    /// #14: the scheduler alone holds where a probe's results go: a replaced probe's channel
    /// and a stopped one's are let go at once (nothing more arrives, no sender is kept).
    #[tokio::test(start_paused = true)]
    async fn a_replaced_or_stopped_probe_lets_its_results_channel_go() {
        let (exec, prober, _) = setup();
        exec.set("check", &[], OK);
        let (first, mut from_first) = unbounded();
        prober.start(
            key(ProbeKind::Readiness),
            target(exec_probe("check")),
            first,
        );
        assert_eq!(next(&mut from_first).await.result, ProbeResult::Failure);
        assert_eq!(next(&mut from_first).await.result, ProbeResult::Success);
        let (second, mut from_second) = unbounded();
        let replacement = ProbeTarget {
            container_id: "c2".into(),
            ..target(exec_probe("check"))
        };
        prober.start(key(ProbeKind::Readiness), replacement, second);
        assert!(
            closed(&mut from_first).await,
            "the replaced channel is kept"
        );
        let initial = next(&mut from_second).await;
        assert_eq!(
            (initial.container_id.as_str(), initial.result),
            ("c2", ProbeResult::Failure)
        );
        prober.stop(&key(ProbeKind::Readiness));
        let after_stop: Vec<ProbeResult> = std::iter::from_fn(|| from_second.try_recv().ok())
            .map(|u| u.result)
            .collect();
        assert!(after_stop.len() <= 1, "{after_stop:?}");
        assert!(
            closed(&mut from_second).await,
            "the stopped channel is kept"
        );
        let (third, mut from_third) = unbounded();
        prober.start(key(ProbeKind::Liveness), target(exec_probe("check")), third);
        assert_eq!(next(&mut from_third).await.result, ProbeResult::Success);
        prober.stop_pod("u1");
        assert!(
            closed(&mut from_third).await,
            "a stopped pod's channel is kept"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stop_pod_stops_every_probe_of_the_pod() {
        let (exec, prober, _) = setup();
        exec.set("check", &[], OK);
        let (tx, mut rx) = unbounded();
        let t0 = Instant::now();
        prober.start(
            key(ProbeKind::Readiness),
            target(exec_probe("check")),
            tx.clone(),
        );
        prober.start(
            key(ProbeKind::Liveness),
            target(exec_probe("check")),
            tx.clone(),
        );
        let other = ProbeKey {
            pod_uid: "u2".into(),
            ..key(ProbeKind::Liveness)
        };
        prober.start(other.clone(), target(exec_probe("check")), tx);
        tokio::time::sleep(Duration::from_secs(5)).await;
        prober.stop_pod("u1");
        assert_eq!(
            prober.result(&key(ProbeKind::Readiness)).await,
            ProbeResult::Unknown
        );
        assert_eq!(
            prober.result(&key(ProbeKind::Liveness)).await,
            ProbeResult::Unknown
        );
        assert_eq!(prober.result(&other).await, ProbeResult::Success);
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert_eq!(exec.calls("check", t0), vec![0.0, 0.0, 0.0, 10.0, 20.0]);
        while rx.try_recv().is_ok() {}
        let text = prober.metrics_text();
        assert!(!text.contains("pod_uid=\"u1\""), "{text}");
        assert!(text.contains(
            "prober_probe_total{probe_type=\"Liveness\",result=\"successful\",container=\"app\",\
             pod=\"web\",namespace=\"ns\",pod_uid=\"u2\"} 3"
        ));
        assert!(
            text.contains("nodelet_probe_start_delay_seconds_count 5\n"),
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn resumed_probes_start_from_their_result_within_one_period() {
        let (exec, prober, _) = setup();
        exec.set("check", &[], BAD);
        exec.set("boot", &[], OK);
        let (tx, mut rx) = unbounded();
        let probe = Probe {
            failure_threshold: Some(1),
            ..exec_probe("check")
        };
        let resumed = |probe, result| ProbeTarget {
            resumed: Some(result),
            ..target(probe)
        };
        let t0 = Instant::now();
        // The container had started: its startup probe never runs again and does not gate.
        prober.start(
            key(ProbeKind::Startup),
            resumed(exec_probe("boot"), ProbeResult::Success),
            tx.clone(),
        );
        assert_eq!(next(&mut rx).await.result, ProbeResult::Success);
        let mut readiness = resumed(probe, ProbeResult::Success);
        readiness.container.startup_probe = Some(exec_probe("boot"));
        prober.start(key(ProbeKind::Readiness), readiness, tx);
        assert_eq!(next(&mut rx).await.result, ProbeResult::Success);
        settle().await;
        assert!(exec.calls("check", t0).is_empty(), "not run at once");
        let update = next(&mut rx).await;
        assert_eq!(update.result, ProbeResult::Failure);
        let first = exec.calls("check", t0)[0];
        assert!(first > 0.0 && first < 10.0, "first run at {first} s");
        tokio::time::sleep(Duration::from_secs(25)).await;
        let calls = exec.calls("check", t0);
        assert_eq!(calls.len(), 3);
        assert!((calls[1] - first - 10.0).abs() < 0.002);
        assert!(exec.calls("boot", t0).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn handler_errors_are_events_not_results() {
        let (exec, prober, recorder) = setup();
        exec.set("missing", &[], Step::Error("exec: \"missing\": not found"));
        let (tx, mut rx) = unbounded();
        let named = Probe {
            http_get: Some(HTTPGetAction {
                port: IntOrString::String("web".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let named = ProbeTarget {
            pod_ip: Some("10.233.0.1".parse().unwrap()),
            ..target(named)
        };
        prober.start(key(ProbeKind::Readiness), named, tx.clone());
        let missing = Probe {
            failure_threshold: Some(1),
            ..exec_probe("missing")
        };
        prober.start(key(ProbeKind::Liveness), target(missing), tx);
        next(&mut rx).await;
        next(&mut rx).await;
        let update = next(&mut rx).await;
        assert_eq!(update.key.kind, ProbeKind::Liveness);
        assert_eq!(update.result, ProbeResult::Failure);
        assert_eq!(update.message, "exec: \"missing\": not found");
        tokio::time::sleep(Duration::from_secs(25)).await;
        assert!(rx.try_recv().is_err(), "an errored probe keeps its result");
        assert_eq!(
            prober.result(&key(ProbeKind::Readiness)).await,
            ProbeResult::Failure
        );
        let unhealthy = messages(&recorder, "Unhealthy");
        assert!(unhealthy.contains(
            &"Readiness probe errored: container app: no port named \"web\"".to_string()
        ));
        assert!(
            unhealthy.contains(&"Liveness probe failed: exec: \"missing\": not found".to_string())
        );
        let text = prober.metrics_text();
        assert!(
            text.contains("probe_type=\"Readiness\",result=\"unknown\""),
            "{text}"
        );
        let event = recorder
            .recent()
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("Unhealthy"))
            .unwrap();
        assert_eq!(
            event.involved_object.field_path.as_deref(),
            Some("spec.containers{app}")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_handler_is_an_error_and_the_probe_goes_on() {
        let (exec, prober, recorder) = setup();
        exec.set("boom", &[Step::Panic], OK);
        let (tx, mut rx) = unbounded();
        let t0 = Instant::now();
        prober.start(key(ProbeKind::Readiness), target(exec_probe("boom")), tx);
        assert_eq!(next(&mut rx).await.result, ProbeResult::Failure);
        assert_eq!(next(&mut rx).await.result, ProbeResult::Success);
        assert_eq!(at(t0), 10.0);
        assert_eq!(
            messages(&recorder, "Unhealthy"),
            vec!["Readiness probe errored: container app: the probe handler panicked"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_thousand_probes_share_one_scheduler() {
        let (exec, prober, _) = setup();
        exec.set("check", &[], OK);
        let (tx, mut rx) = unbounded();
        let probe = Probe {
            period_seconds: Some(1),
            ..exec_probe("check")
        };
        let t0 = Instant::now();
        for i in 0..1000 {
            let key = ProbeKey {
                pod_uid: format!("u{i}"),
                ..key(ProbeKind::Readiness)
            };
            prober.start(key, target(probe.clone()), tx.clone());
        }
        tokio::time::sleep(Duration::from_millis(10_500)).await;
        assert_eq!(
            exec.calls("check", t0).len(),
            11_000,
            "runs at 0..=10 s each"
        );
        let mut updates = Vec::new();
        while let Ok(update) = rx.try_recv() {
            updates.push(update.result);
        }
        assert_eq!(
            updates.len(),
            2000,
            "the initial Failure and one Success each"
        );
        assert_eq!(
            updates
                .iter()
                .filter(|r| **r == ProbeResult::Success)
                .count(),
            1000
        );
        assert!(prober
            .metrics_text()
            .contains("nodelet_probe_start_delay_seconds_count 11000\n"));
    }
}
