//! The pod state machine: a pure step function from the desired pod and what the worker last
//! observed to the worker's state (Pending → Syncing → Terminating → Terminated, never
//! backwards) and the actions to carry out. All I/O is in `worker`; everything here is data.
//!
//! Rules (the kubelet's): regular init containers run one at a time and must exit 0; sidecars
//! (init containers with restartPolicy Always) start in their place, the next init container
//! waits until the sidecar has `started`; app containers start once initialised; restart per
//! the pod's restartPolicy (sidecars always restart) behind a back-off window the worker
//! computes; activeDeadlineSeconds and completion (Never/OnFailure) end the pod; termination
//! kills app and init containers first, then sidecars in reverse order.

use litemap::LiteMap;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Container, Pod};

use super::api::RestartPolicy;
use super::backoff::{Backoff, Window};
use super::{Deletion, Desired};

/// The least time between the stop signal and KILL.
pub const MIN_KILL_GRACE: Duration = Duration::from_secs(2);
/// terminationGracePeriodSeconds when the spec leaves it out.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);
/// A kill under way is re-issued only when the grace shrank by more than this.
const KILL_SLACK: Duration = Duration::from_secs(1);
/// The longest span a spec number of seconds stands for (activeDeadlineSeconds,
/// terminationGracePeriodSeconds up to i64::MAX): longer ones wait as long, so every sum with a
/// clock stays in range.
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// A spec number of seconds as a duration: negative is zero, beyond [`FOREVER`] is FOREVER.
pub fn spec_secs(secs: i64) -> Duration {
    Duration::from_secs(secs.max(0) as u64).min(FOREVER)
}

/// `t + d`, saturating: a sum beyond the clock's range is `t` plus [`FOREVER`].
pub fn later(t: SystemTime, d: Duration) -> SystemTime {
    t.checked_add(d.min(FOREVER))
        .or_else(|| t.checked_add(Duration::from_secs(1)))
        .unwrap_or(t)
}

/// Whether a re-adopted container (found running after an agent restart) is ready: one with
/// no readiness probe is ready while it runs; a probed one keeps what was reported before, until
/// its probe says otherwise.
pub fn adopted_ready(container: &Container, running: bool, reported_ready: bool) -> bool {
    running && (container.readiness_probe.is_none() || reported_ready)
}

/// The pod worker's state; it only moves forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum PodState {
    /// Volumes or sandbox not ready yet.
    #[default]
    Pending,
    /// Containers are being started and kept running.
    Syncing,
    /// Containers are being stopped.
    Terminating,
    /// Every container has stopped.
    Terminated,
}

/// Why a pod terminates (the first reason wins and is kept by the worker).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// A source deleted the pod.
    Deleted,
    /// activeDeadlineSeconds passed: phase Failed, reason DeadlineExceeded.
    DeadlineExceeded,
    /// Every app container finished for good (or an init container failed under Never).
    Completed,
}

/// Which list a container is in, and how it behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Init,
    /// An init container with restartPolicy Always.
    Sidecar,
    App,
    /// Added to a running pod through `pods/ephemeralcontainers`: started once, never
    /// restarted, no part of the pod's phase or readiness.
    Ephemeral,
}

impl Kind {
    /// The checkpoint label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Init => "init",
            Kind::Sidecar => "sidecar",
            Kind::App => "app",
            Kind::Ephemeral => "ephemeral",
        }
    }
}

/// How one attempt ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exit {
    pub code: i32,
    pub oom_killed: bool,
    /// The attempt never ran: its task could not start (reason StartError, code 128).
    pub start_error: bool,
    pub started_at: Option<SystemTime>,
    pub finished_at: SystemTime,
    /// From the termination-message file (or the log tail, per policy).
    pub message: Option<String>,
}

impl Exit {
    /// How long the attempt ran (None when it never started).
    pub fn ran_for(&self) -> Option<Duration> {
        self.started_at
            .map(|s| self.finished_at.duration_since(s).unwrap_or_default())
    }
}

/// The latest attempt of one container.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Attempt {
    /// Not created (or created and removed before it ran).
    #[default]
    None,
    Running {
        started_at: SystemTime,
    },
    Exited(Exit),
}

/// Why a container is killed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KillReason {
    /// The pod is terminating (deleted, deadline, completed).
    PodTerminating,
    /// A liveness or startup probe failed.
    Unhealthy,
    /// The postStart hook failed.
    PostStartHookFailed,
    /// The container's spec changed (e.g. its image): it restarts with the new one.
    SpecChanged,
}

/// A request (from a probe or a hook) to kill the running attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KillRequest {
    pub reason: KillReason,
    /// A probe-level terminationGracePeriodSeconds.
    pub grace: Option<Duration>,
}

/// A container waiting reason the worker hit (ErrImagePull, CreateContainerConfigError, …).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waiting {
    pub reason: String,
    pub message: String,
}

/// What the worker knows about one container (by name).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerObs {
    /// The latest attempt's number; also the restart count.
    pub attempt: u32,
    pub state: Attempt,
    /// The previous attempt's exit (lastState).
    pub last_exit: Option<Exit>,
    /// Startup probe passed (or none): liveness/readiness run, the next init may start.
    pub started: bool,
    pub ready: bool,
    pub kill: Option<KillRequest>,
    /// A kill is under way; KILL is sent no later than this.
    pub killing: Option<SystemTime>,
    /// No new attempt before this window ends (crash loop or pull/create failures).
    pub backoff: Option<Window>,
    pub waiting: Option<Waiting>,
    pub container_id: Option<String>,
    /// The image the latest attempt runs (the spec's may have changed since).
    pub image: Option<String>,
    /// The image's repo digest.
    pub image_id: Option<String>,
    /// The running attempt was made from an older spec: kill it and start the new spec,
    /// whatever the restartPolicy.
    pub spec_changed: bool,
}

impl ContainerObs {
    pub fn running(&self) -> bool {
        matches!(self.state, Attempt::Running { .. })
    }

    fn exit(&self) -> Option<&Exit> {
        match &self.state {
            Attempt::Exited(e) => Some(e),
            _ => None,
        }
    }

    fn in_backoff(&self, now: SystemTime) -> Option<SystemTime> {
        self.backoff.map(|w| w.until).filter(|&u| u > now)
    }
}

/// Everything the worker observed, at `now`.
#[derive(Clone, Debug)]
pub struct Observed {
    pub now: SystemTime,
    /// The state the last step returned.
    pub state: PodState,
    /// When the worker first synced the pod (status.startTime).
    pub start_time: Option<SystemTime>,
    /// When, and why, the pod started terminating.
    pub terminating: Option<(SystemTime, Why)>,
    pub sandbox_ready: bool,
    pub volumes_ready: bool,
    /// Volumes and sandbox were torn down after termination.
    pub released: bool,
    /// By name, a sorted vector: a pod has a few containers, and a B-tree's first node has
    /// room for eleven (3.9 KiB for one container).
    pub containers: LiteMap<String, ContainerObs>,
}

impl Default for Observed {
    fn default() -> Self {
        Self {
            now: SystemTime::UNIX_EPOCH,
            state: PodState::default(),
            start_time: None,
            terminating: None,
            sandbox_ready: false,
            volumes_ready: false,
            released: false,
            containers: LiteMap::new(),
        }
    }
}

/// One action for the worker, carried out in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    SetupVolumes,
    EnsureSandbox,
    /// Pull the image (per policy) and create and start this attempt.
    StartContainer {
        name: String,
        attempt: u32,
    },
    /// Run preStop (if `pre_stop`), send the stop signal, KILL after `grace`.
    KillContainer {
        name: String,
        grace: Duration,
        pre_stop: bool,
        reason: KillReason,
    },
    /// Remove every container of the pod (the pod is deleted).
    RemoveContainers,
    TeardownVolumes,
    TeardownSandbox,
    /// The pod is terminal and released but not deleted: report it finished, then idle.
    Finish,
    /// The pod is deleted and released: the worker ends.
    Done,
    /// Step again no later than this.
    WaitUntil(SystemTime),
}

/// The result of one step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub state: PodState,
    /// Set when the pod starts terminating in this step.
    pub why: Option<Why>,
    pub actions: Vec<Action>,
}

/// Whether an init container is a sidecar.
pub fn is_sidecar(container: &Container) -> bool {
    RestartPolicy::of_container(container) == Some(RestartPolicy::Always)
}

/// The pod's containers in start order, with their kind.
pub fn containers(pod: &Pod) -> Vec<(Kind, &Container)> {
    let Some(spec) = pod.spec.as_ref() else {
        return Vec::new();
    };
    let init = spec.init_containers.iter().flatten().map(|c| {
        let kind = if is_sidecar(c) {
            Kind::Sidecar
        } else {
            Kind::Init
        };
        (kind, c)
    });
    init.chain(spec.containers.iter().map(|c| (Kind::App, c)))
        .collect()
}

/// The pod's ephemeral containers as the containers they run as (the same fields, less
/// `targetContainerName`), in the order they were added.
pub fn ephemeral(pod: &Pod) -> Vec<Container> {
    let list = pod
        .spec
        .as_ref()
        .and_then(|s| s.ephemeral_containers.as_ref());
    list.into_iter()
        .flatten()
        .filter_map(|e| {
            let mut value = serde_json::to_value(e).ok()?;
            value.as_object_mut()?.remove("targetContainerName");
            serde_json::from_value(value).ok()
        })
        .collect()
}

/// Whether a container that ended with `exit` runs again.
pub fn wants_restart(policy: RestartPolicy, kind: Kind, exit: &Exit) -> bool {
    match (kind, policy) {
        (Kind::Ephemeral, _) => false,
        (Kind::Sidecar, _) => true,
        (_, RestartPolicy::Never) => false,
        (Kind::Init, _) | (Kind::App, RestartPolicy::OnFailure) => exit.code != 0,
        (Kind::App, RestartPolicy::Always) => true,
    }
}

/// The latest attempt of a container ended (`restarts`: the policy restarts it). Returns the
/// back-off window the next attempt waits for (None: it starts at once, or never).
pub fn record_exit(
    o: &mut ContainerObs,
    exit: Exit,
    restarts: bool,
    crash: &mut Backoff,
    name: &str,
) -> Option<Window> {
    let window = restarts
        .then(|| crash.failed(name, exit.finished_at, exit.ran_for()))
        .flatten();
    o.state = Attempt::Exited(exit);
    o.started = false;
    o.ready = false;
    o.kill = None;
    o.killing = None;
    o.waiting = None;
    o.backoff = window;
    window
}

/// The pod's grace: terminationGracePeriodSeconds, shrunk by the deletion's (a force delete
/// asks for 0: no preStop, KILL after [`MIN_KILL_GRACE`]).
pub fn grace(pod: &Pod, deletion: Option<&Deletion>) -> Duration {
    let secs = spec_secs;
    let mut grace = pod
        .spec
        .as_ref()
        .and_then(|s| s.termination_grace_period_seconds)
        .map_or(DEFAULT_GRACE, secs);
    if let Some(g) = pod.metadata.deletion_grace_period_seconds {
        grace = grace.min(secs(g));
    }
    match deletion {
        Some(d) => grace.min(d.grace),
        None => grace,
    }
}

/// When activeDeadlineSeconds runs out.
pub fn active_deadline(pod: &Pod, start_time: Option<SystemTime>) -> Option<SystemTime> {
    let secs = pod.spec.as_ref()?.active_deadline_seconds?;
    Some(later(start_time?, spec_secs(secs)))
}

/// The step function.
pub fn step(desired: &Desired, obs: &Observed) -> Step {
    let pod = &desired.pod;
    let mut state = obs.state;
    let mut why = None;
    if state < PodState::Terminating {
        why = termination_reason(desired, obs);
        if why.is_some() {
            state = PodState::Terminating;
        }
    }
    let since = obs.terminating.map_or(obs.now, |(t, _)| t);
    let mut actions = Vec::new();
    if state < PodState::Terminating {
        state = sync(pod, obs, state, &mut actions);
    }
    if state == PodState::Terminating && terminate(desired, obs, since, &mut actions) {
        state = PodState::Terminated;
    }
    if state == PodState::Terminated {
        terminated(desired, obs, &mut actions);
    }
    Step {
        state,
        why,
        actions,
    }
}

fn termination_reason(desired: &Desired, obs: &Observed) -> Option<Why> {
    if desired.deletion.is_some() {
        return Some(Why::Deleted);
    }
    if active_deadline(&desired.pod, obs.start_time).is_some_and(|d| d <= obs.now) {
        return Some(Why::DeadlineExceeded);
    }
    completed(&desired.pod, obs).then_some(Why::Completed)
}

/// Every app container finished for good, or an init container failed under Never.
fn completed(pod: &Pod, obs: &Observed) -> bool {
    let policy = RestartPolicy::of(pod);
    if policy == RestartPolicy::Always {
        return false;
    }
    let all = containers(pod);
    let finished = |kind: Kind, name: &str| {
        let o = obs.containers.get(name);
        let exit = o.filter(|o| !o.spec_changed).and_then(ContainerObs::exit);
        exit.is_some_and(|e| !wants_restart(policy, kind, e))
    };
    // An init container that exited 0 is done, not failed: the next one runs.
    let init_failed = all.iter().any(|(k, c)| {
        *k == Kind::Init
            && finished(*k, &c.name)
            && obs
                .containers
                .get(&c.name)
                .and_then(ContainerObs::exit)
                .is_some_and(|e| e.code != 0)
    });
    let apps: Vec<_> = all.iter().filter(|(k, _)| *k == Kind::App).collect();
    init_failed || (!apps.is_empty() && apps.iter().all(|(k, c)| finished(*k, &c.name)))
}

/// Progress of one container in the start sequence.
enum Progress {
    /// Later containers may start.
    Done,
    /// Later containers wait.
    Blocked,
}

fn sync(pod: &Pod, obs: &Observed, state: PodState, actions: &mut Vec<Action>) -> PodState {
    if !obs.volumes_ready {
        actions.push(Action::SetupVolumes);
    }
    if !obs.sandbox_ready {
        actions.push(Action::EnsureSandbox);
    }
    if !actions.is_empty() {
        return state;
    }
    let base_grace = grace(pod, None);
    let policy = RestartPolicy::of(pod);
    let mut wake: Option<SystemTime> = active_deadline(pod, obs.start_time);
    let none = ContainerObs::default();
    let all = containers(pod);
    let initialized = all.iter().any(|(k, c)| {
        *k == Kind::App
            && obs
                .containers
                .get(&c.name)
                .is_some_and(|o| o.state != Attempt::None)
    });
    let mut blocked = false;
    for (kind, c) in &all {
        let o = obs.containers.get(&c.name).unwrap_or(&none);
        let changed = o.spec_changed.then_some(KillRequest {
            reason: KillReason::SpecChanged,
            grace: None,
        });
        if let (Some(req), true, None) = (o.kill.or(changed), o.running(), o.killing) {
            let grace = req.grace.map_or(base_grace, |g| g.min(base_grace));
            actions.push(Action::KillContainer {
                name: c.name.clone(),
                grace: grace.max(MIN_KILL_GRACE),
                pre_stop: !grace.is_zero(),
                reason: req.reason,
            });
        }
        if blocked || (initialized && *kind == Kind::Init) {
            continue;
        }
        let progress = advance(&c.name, *kind, o, policy, obs.now, actions, &mut wake);
        if *kind != Kind::App && matches!(progress, Progress::Blocked) && !initialized {
            blocked = true;
        }
    }
    // Ephemeral containers start once the sandbox is up, even before initialization ends
    // (as the kubelet starts them), and never again.
    for c in ephemeral(pod) {
        let o = obs.containers.get(&c.name).unwrap_or(&none);
        advance(
            &c.name,
            Kind::Ephemeral,
            o,
            policy,
            obs.now,
            actions,
            &mut wake,
        );
    }
    if let Some(at) = wake {
        actions.push(Action::WaitUntil(at));
    }
    PodState::Syncing
}

/// Starts or restarts one container when due; says whether later ones may go on.
fn advance(
    name: &str,
    kind: Kind,
    o: &ContainerObs,
    policy: RestartPolicy,
    now: SystemTime,
    actions: &mut Vec<Action>,
    wake: &mut Option<SystemTime>,
) -> Progress {
    let mut start = |attempt: u32, wake: &mut Option<SystemTime>| match o.in_backoff(now) {
        Some(until) => *wake = Some(wake.map_or(until, |w| w.min(until))),
        None => actions.push(Action::StartContainer {
            name: name.to_string(),
            attempt,
        }),
    };
    match &o.state {
        Attempt::None => {
            start(o.attempt, wake);
            Progress::Blocked
        }
        Attempt::Running { .. } if kind == Kind::Init => Progress::Blocked,
        Attempt::Running { .. } if kind == Kind::Sidecar && !o.started => Progress::Blocked,
        Attempt::Running { .. } => Progress::Done,
        Attempt::Exited(e) if kind == Kind::Init && e.code == 0 => Progress::Done,
        Attempt::Exited(_) if o.spec_changed => {
            actions.push(Action::StartContainer {
                name: name.to_string(),
                attempt: o.attempt + 1,
            });
            Progress::Blocked
        }
        Attempt::Exited(e) => {
            if wants_restart(policy, kind, e) {
                start(o.attempt + 1, wake);
            }
            Progress::Blocked
        }
    }
}

/// Kills what must stop, in order; true once nothing runs any more.
fn terminate(
    desired: &Desired,
    obs: &Observed,
    since: SystemTime,
    actions: &mut Vec<Action>,
) -> bool {
    let pod = &desired.pod;
    let grace = grace(pod, desired.deletion.as_ref());
    let deadline = later(since, grace);
    let all = containers(pod);
    let running = |kinds: &[Kind]| {
        all.iter()
            .filter(|(k, c)| {
                kinds.contains(k)
                    && obs
                        .containers
                        .get(&c.name)
                        .is_some_and(ContainerObs::running)
            })
            .map(|(_, c)| c.name.as_str())
            .collect::<Vec<_>>()
    };
    let mut kill = |name: &str| {
        let o = &obs.containers.get(name).expect("a container listed above");
        let left = deadline
            .duration_since(obs.now)
            .unwrap_or_default()
            .max(MIN_KILL_GRACE);
        let pre_stop = match o.killing {
            None => !grace.is_zero() && deadline > obs.now,
            Some(at) if at > later(obs.now, left.saturating_add(KILL_SLACK)) => false,
            Some(_) => return,
        };
        actions.push(Action::KillContainer {
            name: name.to_string(),
            grace: left,
            pre_stop,
            reason: KillReason::PodTerminating,
        });
    };
    let ephemeral = ephemeral(pod);
    let mut main = running(&[Kind::Init, Kind::App]);
    main.extend(
        ephemeral
            .iter()
            .map(|c| c.name.as_str())
            .filter(|name| obs.containers.get(*name).is_some_and(ContainerObs::running)),
    );
    if !main.is_empty() {
        main.into_iter().for_each(&mut kill);
        return false;
    }
    match running(&[Kind::Sidecar]).last() {
        Some(last) => {
            kill(last);
            false
        }
        None => true,
    }
}

fn terminated(desired: &Desired, obs: &Observed, actions: &mut Vec<Action>) {
    let deleted = desired.deletion.is_some();
    if deleted {
        actions.push(Action::RemoveContainers);
    }
    if !obs.released {
        actions.push(Action::TeardownVolumes);
        actions.push(Action::TeardownSandbox);
    }
    if deleted {
        actions.push(Action::Done);
    } else if !obs.released {
        actions.push(Action::Finish);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodSpec;

    const T0: u64 = 1_700_000_000;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(T0 + secs)
    }

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    fn c(name: &str) -> Container {
        Container {
            name: name.into(),
            image: Some("busybox".into()),
            ..Default::default()
        }
    }

    fn sidecar(name: &str) -> Container {
        Container {
            restart_policy: Some("Always".into()),
            ..c(name)
        }
    }

    fn pod(policy: &str, init: Vec<Container>, apps: Vec<Container>) -> Pod {
        Pod {
            spec: Some(PodSpec {
                restart_policy: Some(policy.into()),
                init_containers: Some(init),
                containers: apps,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn desired(pod: Pod) -> Desired {
        Desired {
            pod: pod.into(),
            deletion: None,
        }
    }

    fn ready_obs() -> Observed {
        Observed {
            now: t(100),
            state: PodState::Syncing,
            start_time: Some(t(0)),
            sandbox_ready: true,
            volumes_ready: true,
            ..Default::default()
        }
    }

    fn running(attempt: u32) -> ContainerObs {
        ContainerObs {
            attempt,
            state: Attempt::Running { started_at: t(1) },
            started: true,
            ..Default::default()
        }
    }

    fn exited(attempt: u32, code: i32) -> ContainerObs {
        ContainerObs {
            attempt,
            state: Attempt::Exited(Exit {
                code,
                oom_killed: false,
                start_error: false,
                started_at: Some(t(1)),
                finished_at: t(2),
                message: None,
            }),
            ..Default::default()
        }
    }

    fn with(mut obs: Observed, items: &[(&str, ContainerObs)]) -> Observed {
        for (n, o) in items {
            obs.containers.insert(n.to_string(), o.clone());
        }
        obs
    }

    fn start(name: &str, attempt: u32) -> Action {
        Action::StartContainer {
            name: name.into(),
            attempt,
        }
    }

    fn starts(step: &Step) -> Vec<(String, u32)> {
        step.actions
            .iter()
            .filter_map(|a| match a {
                Action::StartContainer { name, attempt } => Some((name.clone(), *attempt)),
                _ => None,
            })
            .collect()
    }

    fn kills(step: &Step) -> Vec<(String, Duration, bool)> {
        step.actions
            .iter()
            .filter_map(|a| match a {
                Action::KillContainer {
                    name,
                    grace,
                    pre_stop,
                    ..
                } => Some((name.clone(), *grace, *pre_stop)),
                _ => None,
            })
            .collect()
    }

    fn deleting(p: Pod, grace: u64, gone: bool) -> Desired {
        Desired {
            pod: p.into(),
            deletion: Some(Deletion {
                grace: s(grace),
                gone,
            }),
        }
    }

    #[test]
    fn pending_sets_up_volumes_then_sandbox() {
        let d = desired(pod("Always", vec![], vec![c("app")]));
        let st = step(&d, &Observed::default());
        assert_eq!(st.state, PodState::Pending);
        assert_eq!(
            st.actions,
            vec![Action::SetupVolumes, Action::EnsureSandbox]
        );
    }

    #[test]
    fn syncing_once_volumes_and_sandbox_ready() {
        let d = desired(pod("Always", vec![], vec![c("a"), c("b")]));
        let st = step(&d, &ready_obs());
        assert_eq!(st.state, PodState::Syncing);
        assert_eq!(st.actions, vec![start("a", 0), start("b", 0)]);
    }

    #[test]
    fn init_containers_run_one_at_a_time_in_order() {
        let d = desired(pod("Always", vec![c("i1"), c("i2")], vec![c("app")]));
        assert_eq!(starts(&step(&d, &ready_obs())), vec![("i1".into(), 0)]);
        let obs = with(ready_obs(), &[("i1", running(0))]);
        assert!(starts(&step(&d, &obs)).is_empty());
        let obs = with(ready_obs(), &[("i1", exited(0, 0))]);
        assert_eq!(starts(&step(&d, &obs)), vec![("i2".into(), 0)]);
        let obs = with(ready_obs(), &[("i1", exited(0, 0)), ("i2", exited(0, 0))]);
        assert_eq!(starts(&step(&d, &obs)), vec![("app".into(), 0)]);
    }

    #[test]
    fn failed_init_container_restarts_under_on_failure() {
        let d = desired(pod("OnFailure", vec![c("i1")], vec![c("app")]));
        let obs = with(ready_obs(), &[("i1", exited(0, 1))]);
        let st = step(&d, &obs);
        assert_eq!(starts(&st), vec![("i1".into(), 1)]);
        assert_eq!(st.state, PodState::Syncing);
    }

    #[test]
    fn failed_init_container_restarts_under_always() {
        let d = desired(pod("Always", vec![c("i1")], vec![c("app")]));
        let obs = with(ready_obs(), &[("i1", exited(3, 2))]);
        assert_eq!(starts(&step(&d, &obs)), vec![("i1".into(), 4)]);
    }

    #[test]
    fn failed_init_container_under_never_ends_the_pod() {
        let d = desired(pod("Never", vec![c("i1"), c("i2")], vec![c("app")]));
        let obs = with(ready_obs(), &[("i1", exited(0, 1))]);
        let st = step(&d, &obs);
        assert_eq!(st.why, Some(Why::Completed));
        assert_eq!(st.state, PodState::Terminated);
        assert!(starts(&st).is_empty());
        assert_eq!(
            st.actions,
            vec![
                Action::TeardownVolumes,
                Action::TeardownSandbox,
                Action::Finish
            ]
        );
    }

    #[test]
    fn successful_init_containers_lead_to_the_apps_under_never_and_on_failure() {
        for policy in ["Never", "OnFailure"] {
            let d = desired(pod(policy, vec![c("i1"), c("i2")], vec![c("app")]));
            let obs = with(ready_obs(), &[("i1", exited(0, 0))]);
            let st = step(&d, &obs);
            assert_eq!(st.why, None, "{policy}");
            assert_eq!(starts(&st), vec![("i2".into(), 0)], "{policy}");
            let obs = with(obs, &[("i2", exited(0, 0))]);
            let st = step(&d, &obs);
            assert_eq!(st.why, None, "{policy}");
            assert_eq!(starts(&st), vec![("app".into(), 0)], "{policy}");
            let obs = with(obs, &[("app", exited(0, 0))]);
            assert_eq!(step(&d, &obs).why, Some(Why::Completed), "{policy}");
        }
    }

    #[test]
    fn init_restart_waits_for_backoff() {
        let d = desired(pod("OnFailure", vec![c("i1")], vec![c("app")]));
        let mut o = exited(1, 1);
        o.backoff = Some(Window {
            until: t(110),
            delay: s(10),
        });
        let st = step(&d, &with(ready_obs(), &[("i1", o)]));
        assert!(starts(&st).is_empty());
        assert!(st.actions.contains(&Action::WaitUntil(t(110))));
    }

    #[test]
    fn sidecar_blocks_next_init_until_started() {
        let d = desired(pod(
            "Always",
            vec![sidecar("side"), c("i1")],
            vec![c("app")],
        ));
        assert_eq!(starts(&step(&d, &ready_obs())), vec![("side".into(), 0)]);
        let mut o = running(0);
        o.started = false;
        assert!(starts(&step(&d, &with(ready_obs(), &[("side", o)]))).is_empty());
        let obs = with(ready_obs(), &[("side", running(0))]);
        assert_eq!(starts(&step(&d, &obs)), vec![("i1".into(), 0)]);
        let obs = with(ready_obs(), &[("side", running(0)), ("i1", exited(0, 0))]);
        assert_eq!(starts(&step(&d, &obs)), vec![("app".into(), 0)]);
    }

    #[test]
    fn sidecar_always_restarts_even_under_never() {
        let d = desired(pod("Never", vec![sidecar("side")], vec![c("app")]));
        let obs = with(ready_obs(), &[("side", exited(0, 0)), ("app", running(0))]);
        assert_eq!(starts(&step(&d, &obs)), vec![("side".into(), 1)]);
    }

    #[test]
    fn sidecar_restart_after_init_does_not_block_apps() {
        let d = desired(pod("Always", vec![sidecar("side")], vec![c("a"), c("b")]));
        let obs = with(
            ready_obs(),
            &[
                ("side", exited(2, 1)),
                ("a", running(0)),
                ("b", exited(0, 1)),
            ],
        );
        assert_eq!(
            starts(&step(&d, &obs)),
            vec![("side".into(), 3), ("b".into(), 1)]
        );
    }

    #[test]
    fn sidecar_does_not_block_completion() {
        let d = desired(pod("Never", vec![sidecar("side")], vec![c("app")]));
        let obs = with(ready_obs(), &[("side", running(0)), ("app", exited(0, 0))]);
        let st = step(&d, &obs);
        assert_eq!(st.why, Some(Why::Completed));
        assert_eq!(st.state, PodState::Terminating);
        assert_eq!(kills(&st), vec![("side".into(), s(30), true)]);
    }

    #[test]
    fn always_restarts_app_after_success() {
        let d = desired(pod("Always", vec![], vec![c("app")]));
        let obs = with(ready_obs(), &[("app", exited(0, 0))]);
        assert_eq!(starts(&step(&d, &obs)), vec![("app".into(), 1)]);
    }

    #[test]
    fn on_failure_restarts_only_failures() {
        let d = desired(pod("OnFailure", vec![], vec![c("app")]));
        let obs = with(ready_obs(), &[("app", exited(0, 1))]);
        assert_eq!(starts(&step(&d, &obs)), vec![("app".into(), 1)]);
        let obs = with(ready_obs(), &[("app", exited(1, 0))]);
        let st = step(&d, &obs);
        assert!(starts(&st).is_empty());
        assert_eq!(st.why, Some(Why::Completed));
        assert_eq!(st.state, PodState::Terminated);
    }

    #[test]
    fn never_does_not_restart() {
        let d = desired(pod("Never", vec![], vec![c("app")]));
        let obs = with(ready_obs(), &[("app", exited(0, 1))]);
        let st = step(&d, &obs);
        assert!(starts(&st).is_empty());
        assert_eq!(st.state, PodState::Terminated);
    }

    #[test]
    fn never_pod_waits_for_every_app_container() {
        let d = desired(pod("Never", vec![], vec![c("a"), c("b")]));
        let obs = with(ready_obs(), &[("a", exited(0, 0)), ("b", running(0))]);
        let st = step(&d, &obs);
        assert_eq!(st.state, PodState::Syncing);
        assert!(st.actions.is_empty());
    }

    /// A container that crashes 1 s after every start, driven through `step` and
    /// `record_exit` on tokio's paused clock: starts come after 0, 10, 20, 40 … 300 s of
    /// back-off, and an attempt that ran 10 minutes resets it.
    #[tokio::test(start_paused = true)]
    async fn crash_loop_back_off_on_paused_time() {
        let d = desired(pod("Always", vec![], vec![c("app")]));
        let mut obs = ready_obs();
        let mut crash = Backoff::default();
        let origin = tokio::time::Instant::now();
        let clock = || t(0) + origin.elapsed();
        let mut gaps = Vec::new();
        let mut last_exit = None;
        while gaps.len() < 10 {
            obs.now = clock();
            let st = step(&d, &obs);
            match st.actions.as_slice() {
                [Action::StartContainer { attempt, .. }] => {
                    if let Some(exited) = last_exit {
                        gaps.push((obs.now.duration_since(exited).unwrap()).as_secs());
                    }
                    let o = obs.containers.entry("app".into()).or_default();
                    o.attempt = *attempt;
                    o.state = Attempt::Running {
                        started_at: obs.now,
                    };
                    // The 8th attempt runs for 10 minutes, the others for 1 s.
                    let runs = if *attempt == 7 { 600 } else { 1 };
                    tokio::time::sleep(Duration::from_secs(runs)).await;
                    let exit = Exit {
                        code: 1,
                        oom_killed: false,
                        start_error: false,
                        started_at: Some(obs.now),
                        finished_at: clock(),
                        message: None,
                    };
                    last_exit = Some(exit.finished_at);
                    let o = obs.containers.get_mut("app").unwrap();
                    record_exit(o, exit, true, &mut crash, "app");
                }
                [Action::WaitUntil(at)] => {
                    let wait = at.duration_since(clock()).unwrap();
                    tokio::time::sleep(wait).await;
                }
                other => panic!("unexpected actions {other:?}"),
            }
        }
        assert_eq!(gaps, [0, 10, 20, 40, 80, 160, 300, 0, 10, 20]);
    }

    #[test]
    fn crash_loop_waits_for_backoff_then_restarts() {
        let d = desired(pod("Always", vec![], vec![c("app")]));
        let mut o = exited(2, 1);
        o.backoff = Some(Window {
            until: t(120),
            delay: s(20),
        });
        let st = step(&d, &with(ready_obs(), &[("app", o.clone())]));
        assert_eq!(st.actions, vec![Action::WaitUntil(t(120))]);
        let mut later = with(ready_obs(), &[("app", o)]);
        later.now = t(120);
        assert_eq!(starts(&step(&d, &later)), vec![("app".into(), 3)]);
    }

    #[test]
    fn pull_backoff_delays_a_first_start() {
        let d = desired(pod("Always", vec![], vec![c("app")]));
        let o = ContainerObs {
            backoff: Some(Window {
                until: t(110),
                delay: s(10),
            }),
            ..Default::default()
        };
        let st = step(&d, &with(ready_obs(), &[("app", o)]));
        assert_eq!(st.actions, vec![Action::WaitUntil(t(110))]);
    }

    #[test]
    fn active_deadline_wakes_and_then_terminates() {
        let mut p = pod("Always", vec![], vec![c("app")]);
        p.spec.as_mut().unwrap().active_deadline_seconds = Some(200);
        let d = desired(p);
        let obs = with(ready_obs(), &[("app", running(0))]);
        let st = step(&d, &obs);
        assert_eq!(st.actions, vec![Action::WaitUntil(t(200))]);
        let mut late = obs;
        late.now = t(200);
        let st = step(&d, &late);
        assert_eq!(st.why, Some(Why::DeadlineExceeded));
        assert_eq!(st.state, PodState::Terminating);
        assert_eq!(kills(&st), vec![("app".into(), s(30), true)]);
    }

    #[test]
    fn terminal_pod_stays_terminal() {
        let d = desired(pod("Never", vec![], vec![c("app")]));
        let mut obs = with(ready_obs(), &[("app", exited(0, 0))]);
        obs.state = PodState::Terminated;
        obs.released = true;
        obs.terminating = Some((t(50), Why::Completed));
        let st = step(&d, &obs);
        assert_eq!(st.state, PodState::Terminated);
        assert!(st.actions.is_empty());
    }

    #[test]
    fn state_never_goes_backwards() {
        let d = desired(pod("Always", vec![], vec![c("app")]));
        let mut obs = ready_obs();
        obs.state = PodState::Terminating;
        obs.terminating = Some((t(90), Why::DeadlineExceeded));
        let st = step(&d, &obs);
        assert_eq!(st.state, PodState::Terminated);
        assert!(starts(&st).is_empty());
        obs.sandbox_ready = false;
        obs.state = PodState::Syncing;
        assert_eq!(step(&d, &obs).state, PodState::Syncing);
    }

    #[test]
    fn graceful_delete_kills_with_pre_stop_and_pod_grace() {
        let d = deleting(pod("Always", vec![], vec![c("app")]), 60, false);
        let obs = with(ready_obs(), &[("app", running(0))]);
        let st = step(&d, &obs);
        assert_eq!(st.why, Some(Why::Deleted));
        assert_eq!(kills(&st), vec![("app".into(), s(30), true)]);
    }

    #[test]
    fn deletion_grace_shrinks_pod_grace() {
        let d = deleting(pod("Always", vec![], vec![c("app")]), 5, false);
        let obs = with(ready_obs(), &[("app", running(0))]);
        assert_eq!(kills(&step(&d, &obs)), vec![("app".into(), s(5), true)]);
    }

    #[test]
    fn zero_grace_skips_pre_stop_and_keeps_two_seconds() {
        let d = deleting(pod("Always", vec![], vec![c("app")]), 0, false);
        let obs = with(ready_obs(), &[("app", running(0))]);
        assert_eq!(kills(&step(&d, &obs)), vec![("app".into(), s(2), false)]);
    }

    #[test]
    fn force_delete_uses_minimal_grace() {
        let d = deleting(pod("Always", vec![], vec![c("app")]), 0, true);
        let obs = with(ready_obs(), &[("app", running(0))]);
        assert_eq!(kills(&step(&d, &obs)), vec![("app".into(), s(2), false)]);
    }

    #[test]
    fn gone_with_a_grace_still_stops_gracefully() {
        let d = deleting(pod("Always", vec![], vec![c("app")]), 10, true);
        let obs = with(ready_obs(), &[("app", running(0))]);
        assert_eq!(kills(&step(&d, &obs)), vec![("app".into(), s(10), true)]);
    }

    #[test]
    fn kill_under_way_is_not_repeated() {
        let d = deleting(pod("Always", vec![], vec![c("app")]), 30, false);
        let mut o = running(0);
        o.killing = Some(t(130));
        let mut obs = with(ready_obs(), &[("app", o)]);
        obs.state = PodState::Terminating;
        obs.terminating = Some((t(100), Why::Deleted));
        obs.now = t(105);
        assert!(kills(&step(&d, &obs)).is_empty());
    }

    #[test]
    fn kill_is_not_repeated_as_time_passes() {
        let d = deleting(pod("Always", vec![], vec![c("app")]), 0, true);
        let mut o = running(0);
        o.killing = Some(t(102));
        let mut obs = with(ready_obs(), &[("app", o)]);
        obs.state = PodState::Terminating;
        obs.terminating = Some((t(100), Why::Deleted));
        for now in [t(100), t(101), t(102), t(110)] {
            obs.now = now;
            assert!(kills(&step(&d, &obs)).is_empty(), "at {now:?}");
        }
    }

    #[test]
    fn grace_only_shrinks() {
        let mut o = running(0);
        o.killing = Some(t(130));
        let mut obs = with(ready_obs(), &[("app", o)]);
        obs.state = PodState::Terminating;
        obs.terminating = Some((t(100), Why::Deleted));
        obs.now = t(105);
        let longer = deleting(pod("Always", vec![], vec![c("app")]), 300, false);
        assert!(kills(&step(&longer, &obs)).is_empty());
        let shorter = deleting(pod("Always", vec![], vec![c("app")]), 10, false);
        assert_eq!(
            kills(&step(&shorter, &obs)),
            vec![("app".into(), s(5), false)]
        );
    }

    #[test]
    fn sidecars_stop_after_apps_in_reverse_order() {
        let d = deleting(
            pod("Always", vec![sidecar("s1"), sidecar("s2")], vec![c("app")]),
            30,
            false,
        );
        let obs = with(
            ready_obs(),
            &[("s1", running(0)), ("s2", running(0)), ("app", running(0))],
        );
        assert_eq!(kills(&step(&d, &obs)), vec![("app".into(), s(30), true)]);
        let mut obs = with(
            ready_obs(),
            &[
                ("s1", running(0)),
                ("s2", running(0)),
                ("app", exited(0, 143)),
            ],
        );
        obs.state = PodState::Terminating;
        obs.terminating = Some((t(90), Why::Deleted));
        assert_eq!(kills(&step(&d, &obs)), vec![("s2".into(), s(20), true)]);
        let obs = with(obs, &[("s2", exited(0, 143))]);
        assert_eq!(kills(&step(&d, &obs)), vec![("s1".into(), s(20), true)]);
    }

    #[test]
    fn sidecar_gets_at_least_two_seconds_when_grace_is_spent() {
        let d = deleting(
            pod("Always", vec![sidecar("s1")], vec![c("app")]),
            10,
            false,
        );
        let mut obs = with(ready_obs(), &[("s1", running(0)), ("app", exited(0, 137))]);
        obs.state = PodState::Terminating;
        obs.terminating = Some((t(50), Why::Deleted));
        assert_eq!(kills(&step(&d, &obs)), vec![("s1".into(), s(2), false)]);
    }

    #[test]
    fn no_restart_while_terminating() {
        let d = deleting(pod("Always", vec![], vec![c("a"), c("b")]), 30, false);
        let mut obs = with(ready_obs(), &[("a", exited(0, 1)), ("b", running(0))]);
        obs.state = PodState::Terminating;
        obs.terminating = Some((t(90), Why::Deleted));
        assert!(starts(&step(&d, &obs)).is_empty());
    }

    #[test]
    fn deleted_pod_is_removed_released_and_done() {
        let d = deleting(pod("Always", vec![], vec![c("app")]), 30, false);
        let mut obs = with(ready_obs(), &[("app", exited(0, 143))]);
        obs.state = PodState::Terminating;
        obs.terminating = Some((t(90), Why::Deleted));
        let st = step(&d, &obs);
        assert_eq!(st.state, PodState::Terminated);
        assert_eq!(
            st.actions,
            vec![
                Action::RemoveContainers,
                Action::TeardownVolumes,
                Action::TeardownSandbox,
                Action::Done
            ]
        );
    }

    #[test]
    fn finished_pod_deleted_later_only_removes() {
        let d = deleting(pod("Never", vec![], vec![c("app")]), 30, false);
        let mut obs = with(ready_obs(), &[("app", exited(0, 0))]);
        obs.state = PodState::Terminated;
        obs.released = true;
        let st = step(&d, &obs);
        assert_eq!(st.actions, vec![Action::RemoveContainers, Action::Done]);
    }

    #[test]
    fn deleting_a_pending_pod_needs_no_kill() {
        let d = deleting(pod("Always", vec![], vec![c("app")]), 30, false);
        let st = step(&d, &Observed::default());
        assert_eq!(st.state, PodState::Terminated);
        assert!(kills(&st).is_empty());
        assert_eq!(st.actions.last(), Some(&Action::Done));
    }

    #[test]
    fn unhealthy_container_is_killed_with_probe_grace() {
        let d = desired(pod("Always", vec![], vec![c("app")]));
        let mut o = running(0);
        o.kill = Some(KillRequest {
            reason: KillReason::Unhealthy,
            grace: Some(s(5)),
        });
        let st = step(&d, &with(ready_obs(), &[("app", o.clone())]));
        assert_eq!(kills(&st), vec![("app".into(), s(5), true)]);
        o.killing = Some(t(105));
        assert!(kills(&step(&d, &with(ready_obs(), &[("app", o)]))).is_empty());
    }

    #[test]
    fn changed_spec_kills_the_running_container() {
        let d = desired(pod("Never", vec![], vec![c("app")]));
        let mut o = running(0);
        o.spec_changed = true;
        let st = step(&d, &with(ready_obs(), &[("app", o)]));
        assert_eq!(kills(&st), vec![("app".into(), s(30), true)]);
        assert!(matches!(
            st.actions[0],
            Action::KillContainer {
                reason: KillReason::SpecChanged,
                ..
            }
        ));
    }

    #[test]
    fn changed_spec_restarts_at_once_whatever_the_policy() {
        let d = desired(pod("Never", vec![], vec![c("app")]));
        let mut o = exited(2, 137);
        o.spec_changed = true;
        o.backoff = Some(Window {
            until: t(500),
            delay: s(40),
        });
        let st = step(&d, &with(ready_obs(), &[("app", o)]));
        assert_eq!(st.why, None);
        assert_eq!(starts(&st), vec![("app".into(), 3)]);
    }

    #[test]
    fn unhealthy_under_never_fails_the_pod_after_exit() {
        let d = desired(pod("Never", vec![], vec![c("app")]));
        let obs = with(ready_obs(), &[("app", exited(0, 137))]);
        assert_eq!(step(&d, &obs).why, Some(Why::Completed));
    }

    #[test]
    fn recovered_attempt_without_task_restarts_same_number() {
        let d = desired(pod("Always", vec![], vec![c("app")]));
        let o = ContainerObs {
            attempt: 4,
            ..Default::default()
        };
        assert_eq!(
            starts(&step(&d, &with(ready_obs(), &[("app", o)]))),
            vec![("app".into(), 4)]
        );
    }

    #[test]
    fn huge_and_negative_spec_seconds_never_panic() {
        for secs in [i64::MAX, i64::MAX - 1, i64::MIN, -1, 0] {
            let mut p = pod("Always", vec![], vec![c("app")]);
            let spec = p.spec.as_mut().unwrap();
            spec.active_deadline_seconds = Some(secs);
            spec.termination_grace_period_seconds = Some(secs);
            let deadline = active_deadline(&p, Some(t(0))).unwrap();
            assert!(deadline >= t(0), "{secs}");
            let d = desired(p.clone());
            let mut o = running(0);
            o.kill = Some(KillRequest {
                reason: KillReason::Unhealthy,
                grace: Some(Duration::MAX),
            });
            let obs = with(ready_obs(), &[("app", o)]);
            step(&d, &obs);
            let mut obs = with(ready_obs(), &[("app", running(0))]);
            obs.state = PodState::Terminating;
            obs.terminating = Some((t(90), Why::DeadlineExceeded));
            assert_eq!(kills(&step(&d, &obs)).len(), 1, "{secs}");
            let mut o = running(0);
            o.killing = Some(t(95));
            let obs = with(obs, &[("app", o)]);
            step(&deleting(p, u64::MAX, false), &obs);
        }
        let mut p = pod("Always", vec![], vec![c("app")]);
        p.spec.as_mut().unwrap().active_deadline_seconds = Some(i64::MAX);
        let st = step(&desired(p), &with(ready_obs(), &[("app", running(0))]));
        assert_eq!(st.why, None, "a deadline beyond any clock never passes");
    }

    #[test]
    fn adopted_running_container_without_readiness_probe_is_ready() {
        let plain = c("app");
        assert!(adopted_ready(&plain, true, false));
        assert!(!adopted_ready(&plain, false, true));
        let probed = Container {
            readiness_probe: Some(Default::default()),
            ..c("app")
        };
        assert!(!adopted_ready(&probed, true, false));
        assert!(adopted_ready(&probed, true, true));
    }

    #[test]
    fn grace_defaults_and_clamps() {
        let p = pod("Always", vec![], vec![c("app")]);
        assert_eq!(grace(&p, None), DEFAULT_GRACE);
        let mut q = p.clone();
        q.spec.as_mut().unwrap().termination_grace_period_seconds = Some(-5);
        assert_eq!(grace(&q, None), Duration::ZERO);
        let del = Deletion {
            grace: s(90),
            gone: false,
        };
        assert_eq!(grace(&p, Some(&del)), DEFAULT_GRACE);
    }

    #[test]
    fn restart_rules_table() {
        let e = |code| Exit {
            code,
            oom_killed: false,
            start_error: false,
            started_at: None,
            finished_at: t(0),
            message: None,
        };
        let table = [
            ("Always", Kind::App, 0, true),
            ("Always", Kind::App, 1, true),
            ("OnFailure", Kind::App, 0, false),
            ("OnFailure", Kind::App, 1, true),
            ("Never", Kind::App, 1, false),
            ("Always", Kind::Init, 0, false),
            ("Always", Kind::Init, 1, true),
            ("OnFailure", Kind::Init, 1, true),
            ("Never", Kind::Init, 1, false),
            ("Never", Kind::Sidecar, 0, true),
            ("OnFailure", Kind::Sidecar, 0, true),
        ];
        for (policy, kind, code, want) in table {
            assert_eq!(
                wants_restart(RestartPolicy::parse(policy).unwrap(), kind, &e(code)),
                want,
                "{policy} {kind:?} {code}"
            );
        }
    }

    fn with_ephemeral(mut p: Pod, names: &[&str]) -> Pod {
        let spec = p.spec.as_mut().unwrap();
        spec.ephemeral_containers = Some(
            names
                .iter()
                .map(|n| k8s_openapi::api::core::v1::EphemeralContainer {
                    name: n.to_string(),
                    image: Some("busybox".into()),
                    target_container_name: Some("app".into()),
                    ..Default::default()
                })
                .collect(),
        );
        p
    }

    #[test]
    fn ephemeral_containers_run_as_containers_without_their_target() {
        let p = with_ephemeral(pod("Always", vec![], vec![c("app")]), &["debugger"]);
        let converted = ephemeral(&p);
        assert_eq!(converted.len(), 1);
        assert_eq!(converted[0].name, "debugger");
        assert_eq!(converted[0].image.as_deref(), Some("busybox"));
    }

    #[test]
    fn ephemeral_container_starts_once_and_never_restarts() {
        let d = desired(with_ephemeral(
            pod("Always", vec![], vec![c("app")]),
            &["debugger"],
        ));
        let obs = with(ready_obs(), &[("app", running(0))]);
        assert_eq!(starts(&step(&d, &obs)), vec![("debugger".into(), 0)]);
        let obs = with(obs, &[("debugger", running(0))]);
        assert!(starts(&step(&d, &obs)).is_empty());
        for code in [0, 1] {
            let obs = with(obs.clone(), &[("debugger", exited(0, code))]);
            let st = step(&d, &obs);
            assert!(starts(&st).is_empty(), "exit {code}");
            assert_eq!(st.why, None, "an ephemeral container never ends the pod");
        }
    }

    #[test]
    fn ephemeral_container_starts_while_init_containers_still_run() {
        let d = desired(with_ephemeral(
            pod("Always", vec![c("i1")], vec![c("app")]),
            &["debugger"],
        ));
        let obs = with(ready_obs(), &[("i1", running(0))]);
        assert_eq!(starts(&step(&d, &obs)), vec![("debugger".into(), 0)]);
    }

    #[test]
    fn ephemeral_container_is_killed_with_the_pod() {
        let d = deleting(
            with_ephemeral(pod("Always", vec![], vec![c("app")]), &["debugger"]),
            30,
            false,
        );
        let obs = with(
            ready_obs(),
            &[("app", running(0)), ("debugger", running(0))],
        );
        let st = step(&d, &obs);
        assert_eq!(
            kills(&st),
            vec![
                ("app".into(), s(30), true),
                ("debugger".into(), s(30), true)
            ]
        );
        assert_ne!(st.state, PodState::Terminated);
    }
}
